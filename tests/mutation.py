"""Mutation testing of sync.py on a random sample of mutants.

    python -m pip install mutmut          # a development tool, not in the test extra
    python tests/mutation.py --sample 100 --seed 20261126

mutmut (3.x) makes the mutants: single changes such as a flipped condition,
a removed argument, a changed string.  Its own runner picks the tests for a
mutant by what each test calls in-process, which misses the many tests that
run sync.py as a subprocess, so this script judges every sampled mutant by
the whole suite instead: the mutant is written into a copy of the tree and
`pytest -x` runs there.  A mutant is killed when the suite fails (or runs
past --timeout); it survives when the suite passes.  The long variants are
kept short (SYNCPY_*_EXAMPLES/TRIALS) so that a sample takes minutes per
mutant at most.  Prints one line per mutant and the score; the survivors'
diffs are shown with `mutmut show NAME` in the work folder it names.
"""

import argparse
import concurrent.futures
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"SYNCPY_CLI_EXAMPLES": "10", "SYNCPY_SIGNAL_TRIALS": "3", "SYNCPY_KILL_TRIALS": "10",
         "SYNCPY_PROPERTY_EXAMPLES": "30", "PYTHONDONTWRITEBYTECODE": "1"}


def make_mutants(work: Path) -> list:
    """Copy the tree to work, let mutmut generate its mutants there, and
    return their names."""
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "mutants", "__pycache__", ".hypothesis"))
    with open(work / "pyproject.toml", "a") as config:
        # mutmut maps tests to functions by running them (its "stats"):
        # one quick file is enough, as the whole suite judges each mutant.
        config.write('\n[tool.mutmut]\nsource_paths = ["sync.py"]\n'
                     'pytest_add_cli_args_test_selection = ["tests/test_planner.py"]\n')
    mutmut = [sys.executable, "-m", "mutmut"]
    # A filter that matches nothing: mutmut generates the mutants and then
    # stops, without running any of them.
    subprocess.run([*mutmut, "run", "sync.no_such_function*"], cwd=work, env={**os.environ, **SHORT},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, capture_output=True,
                             text=True, check=True).stdout
    return [line.split(":")[0].strip() for line in listing.splitlines() if "__mutmut_" in line]


def mutant_source(work: Path, name: str) -> str:
    """sync.py with mutant NAME applied (mutmut shows it as a diff of its function)."""
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    body = [line for line in diff if not line.startswith(("---", "+++", "@@", "#"))]
    source = (ROOT / "sync.py").read_text()
    function = re.sub(r"__mutmut_\d+$", "", name.split(".", 1)[1]).split("ǁ")[-1].removeprefix("x_")
    start = max(source.find(f"def {function}(") - 200, 0)
    hunks = [([l[1:] for l in body if not l.startswith("+")], [l[1:] for l in body if not l.startswith("-")]),
             ([l[1:] for l in body if l.startswith("-")], [l[1:] for l in body if l.startswith("+")])]
    for old, new in hunks:  # with its context, else the changed lines alone
        for indent in ("", "    "):  # methods are shown dedented
            before = "\n".join(indent + l if l else l for l in old)
            at = source.find(before, start)
            if old and at >= 0:
                return source[:at] + "\n".join(indent + l if l else l for l in new) + source[at + len(before):]
    raise ValueError(f"cannot place {name} in sync.py")


def judge(work: Path, name: str, timeout: float) -> tuple:
    scratch = Path(tempfile.mkdtemp(prefix="syncpy-mutant-"))
    try:
        (scratch / "sync.py").write_text(mutant_source(work, name))
        shutil.copytree(ROOT / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", scratch)
        # test_portable runs other suites again, by path: last, so that a
        # mutant most tests kill is killed sooner.
        files = sorted(p.name for p in (scratch / "tests").glob("test_*.py"))
        files = [f"tests/{f}" for f in files if f != "test_portable.py"] + ["tests/test_portable.py"]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files],
                              cwd=scratch, env={**os.environ, **SHORT}, capture_output=True, text=True,
                              timeout=timeout)
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        return name, "survived" if proc.returncode == 0 else "killed", last
    except subprocess.TimeoutExpired:
        return name, "killed", f"ran past {timeout:g} s"
    except ValueError as err:
        return name, "skipped", str(err)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=100, help="mutants to judge (default 100)")
    parser.add_argument("--seed", type=int, default=20261126, help="of the random sample")
    parser.add_argument("--jobs", type=int, default=2, help="mutants judged at once")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a suite may run")
    parser.add_argument("--work", type=Path, help="folder for mutmut (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="syncpy-mutmut-")) / "tree"
    names = make_mutants(work)
    sample = sorted(random.Random(args.seed).sample(names, min(args.sample, len(names))))
    print(f"{len(sample)} of {len(names)} mutants, seed {args.seed}; work folder {work}", flush=True)
    verdicts = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for name, verdict, detail in pool.map(lambda n: judge(work, n, args.timeout), sample):
            verdicts.append(verdict)
            print(f"{verdict:8} {name}  ({detail})", flush=True)
    judged = [v for v in verdicts if v != "skipped"]
    killed = judged.count("killed")
    print(f"killed {killed} of {len(judged)} ({100 * killed / max(len(judged), 1):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
