import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYNC_PY = str(ROOT / "sync.py")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # sync.py and trees.py, installed or not


def sync_once(src, dst, **options):
    """One pass in-process: (PassResult, [Event, ...])."""
    import sync
    events = []
    result = sync.run_pass(src, dst, sync.Options(**options), events.append)
    return result, events


def append_during_copies(monkeypatch, path, text):
    """Make every copy sync.py does append text to path while it copies (a
    file written to while it is mirrored)."""
    import sync
    real_copy_bytes = sync._copy_bytes

    def copy_while_written(fin, fout, size_hint, abort=None):
        copied = real_copy_bytes(fin, fout, size_hint, abort)
        with open(path, "a") as f:
            f.write(text)
        return copied

    monkeypatch.setattr(sync, "_copy_bytes", copy_while_written)


def count_forks(monkeypatch) -> list:
    """Note the pid of every child os.fork makes (worker processes) in the
    list returned, until monkeypatch is undone."""
    forks, real_fork = [], os.fork

    def fork():
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return forks


def paths(events, action):
    """The sorted paths of the events of one action."""
    return sorted(e.path for e in events if e.action == action)


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


# --- running without privileges ----------------------------------------------
#
# Permission failures are invisible to root.  CI runs as root, so these tests
# run sync.py as root *without capabilities* (setpriv empties the bounding
# set): permission bits then apply to it as to any user, and the interpreter
# under /root stays reachable, which it would not be for "nobody".  Run by any
# other user, they run as that user.


class Unprivileged:
    """A scratch folder, and a way to run sync.py there without privileges."""

    def __init__(self, base: Path, user_cmd: tuple):
        self.base = base
        self.user_cmd = user_cmd

    def run(self, *args, timeout=120):
        return run_cli(*args, timeout=timeout, user_cmd=self.user_cmd)

    def give_away(self, path):
        """Make path belong to another user, so sync.py can't change its mode."""
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        os.chown(path, 65534, 65534)


@pytest.fixture
def unprivileged(tmp_path):
    base = tmp_path / "unprivileged"
    base.mkdir()
    user_cmd = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("running as root without setpriv (util-linux): cannot test permission failures")
        user_cmd = (setpriv, "--bounding-set=-all", "--inh-caps=-all")
        check = subprocess.run([*user_cmd, "cat", "/proc/self/status"], capture_output=True, text=True)
        assert "CapEff:\t0000000000000000" in check.stdout, "could not drop capabilities"
    yield Unprivileged(base, user_cmd)
    subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)  # undo chmod 000


# --- real mounts ---------------------------------------------------------------
#
# Bind mounts, small tmpfs and loop-mounted images are how real machines join
# and split trees; the tests use the real thing.  Mounting needs root, which
# CI has (.ci/run runs as root).


class Mounts:
    """Mounts made by one test, all undone (lazily) after it."""

    def __init__(self):
        self.made = []

    def _mount(self, target, *args):
        subprocess.run(["mount", *map(str, args), str(target)], check=True, capture_output=True)
        self.made.append(str(target))

    def bind(self, source, target):
        self._mount(target, "--bind", source)

    def tmpfs(self, target, size="4m"):
        self._mount(target, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")

    def image(self, target, image, size="16M", mkfs=("mkfs.ext4", "-q")):
        """A file system image (made on first use) loop-mounted at target."""
        if not os.path.exists(image):
            subprocess.run(["truncate", "-s", size, str(image)], check=True)
            subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
        self._mount(target, "-o", "loop", image)

    def umount(self, target, lazy=False):
        """Unmount; lazy (umount -l) also when something still has it open, as
        when a drive is pulled out."""
        subprocess.run(["umount", *(["-l"] if lazy else []), str(target)], check=True, capture_output=True)
        self.made.remove(str(target))

    def undo(self):
        for target in reversed(self.made):
            subprocess.run(["umount", "-l", target], capture_output=True)
        self.made.clear()


@pytest.fixture
def mounts():
    if os.geteuid() != 0:
        pytest.skip("mounting needs root (CI runs as root)")
    made = Mounts()
    yield made
    made.undo()


@pytest.fixture
def small_disk(tmp_path, mounts):
    """A 2 MiB tmpfs: a disk that fills up."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounts.tmpfs(disk, "2m")
    return disk
