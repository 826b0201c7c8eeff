import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYNC_PY = str(ROOT / "sync.py")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # sync.py and trees.py, installed or not


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    path.mkdir()
    return path


@pytest.fixture
def dst(tmp_path):
    return tmp_path / "dst"


@pytest.fixture
def log(tmp_path):
    return tmp_path / "sync.log"


def run_cli(*args, timeout=120, user_cmd=(), cwd=None):
    """Run sync.py as a user would; returns the CompletedProcess."""
    command = [*user_cmd, sys.executable, SYNC_PY, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "PYTHONUTF8": "0"})


@pytest.fixture
def cli():
    return run_cli


# --- running as an unprivileged user -----------------------------------------
#
# Permission failures are invisible to root.  CI runs as root, so these tests
# drop to "nobody" with setpriv; run as any other user they run as that user.


class Unprivileged:
    """A scratch folder owned by the unprivileged user, and a way to run sync.py as them."""

    def __init__(self, base: Path, user_cmd: tuple):
        self.base = base
        self.user_cmd = user_cmd

    def own(self, *paths):
        """Hand paths (recursively) to the unprivileged user."""
        if not self.user_cmd:
            return
        for path in paths:
            for dirpath, dirnames, filenames in os.walk(path):
                os.lchown(dirpath, 65534, 65534)
                for name in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, name), 65534, 65534)

    def run(self, *args, timeout=120):
        return run_cli(*args, timeout=timeout, user_cmd=self.user_cmd)


@pytest.fixture
def unprivileged():
    if os.geteuid() != 0:
        base = Path(tempfile.mkdtemp(prefix="syncpy-test-"))
        yield Unprivileged(base, ())
    else:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("running as root without setpriv: cannot test permission failures")
        base = Path(tempfile.mkdtemp(prefix="syncpy-test-"))
        os.chmod(base, 0o755)
        user_cmd = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
        os.chown(base, 65534, 65534)
        yield Unprivileged(base, user_cmd)
    subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)  # undo chmod 000
    shutil.rmtree(base, ignore_errors=True)
