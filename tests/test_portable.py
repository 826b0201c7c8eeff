"""The path-based code that platforms without directory descriptors
(Windows) use, run here on Linux by forcing it: the core suites must pass
with it too.  (Link-swap races and paths longer than PATH_MAX are the stated
limits of that fallback, so test_safety is not part of this run.)"""

import os
import subprocess
import sys

from conftest import ROOT


def test_core_suites_pass_without_directory_descriptors():
    suites = ["tests/test_mirror.py", "tests/test_property.py", "tests/test_cli.py",
              "tests/test_workers.py", "tests/test_loop.py", "tests/test_operator.py",
              "tests/test_separation.py", "tests/test_results.py", "tests/test_metadata.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
                          cwd=ROOT, env={**os.environ, "SYNCPY_NO_DIR_FD": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1]


def test_the_switch_really_switches():
    probe = "import sync; print(sync._DIR_FD)"
    forced = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "SYNCPY_NO_DIR_FD": "1"})
    assert forced.stdout.strip() == "False"
