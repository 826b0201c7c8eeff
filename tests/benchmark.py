"""Benchmark sync.py against rsync on the same trees, in the same run.

    python3 tests/benchmark.py [--repeat N] [--root DIR] [--sync-args ARGS] [--installed] [CASE ...]
    python3 tests/benchmark.py --floor lstat|listxattr|copy SRC DST     (one Python floor alone)

Trees are built deterministically on tmpfs (/dev/shm where it exists, else the
system temp folder; the output says which), so the tools are measured and not
the disk.  The 1,000,000-file case needs about 3 million inodes; where
/dev/shm has fewer, give --root a tmpfs mounted with more, for example
    mount -t tmpfs -o size=16g,nr_inodes=8m tmpfs /mnt/bench
For each case the commands run alternately, REPEAT times each:

    python sync.py SRC DST 1 LOG --once -q
        (--installed: sync.py imported from its cached bytecode, as the
        installed command and python3 -m sync run it; as a script it is
        compiled at every start, 0.07-0.15 s here)
    rsync -a --delete SRC/ DST/
    rsync -aHAXS --delete SRC/ DST/      (the cases marked so: what sync.py keeps by default)

and the table gives, per reference, each one's median wall time, the ratio
sync.py / reference, each one's median CPU time (user + system, worker
processes and rsync's helpers included) and its ratio, each one's peak
RSS (of its largest process), and sync.py's peak memory in all its
processes together (the summed PSS, see TreeMemory).

Small-file cases come in tree shapes (issue 14): "uniform" (the first
release's tree: 20 groups of folders, each folder the same size), "top"
(a third of the files directly in 7 top-level folders, the rest nested
below them), "deep" (a chain of 100 folders, files at every level), "wide"
(a top level of many folders of 10 files each) and "flat" (one folder
holding every file).  NAS cases put the replica (nas-source-*: the source)
behind ../shared/slowfs (a FUSE file system adding latency per request;
built here when gcc and libfuse3 are installed, mounted afresh before every
run) and also run an 8-way parallel rsync, one per top-level entry, as a
reference.  No-change and first-copy cases also run a "Python floor": the
system calls any such pass must make, from Python, spread over as many
processes as there are CPUs, and nothing else.  For a no-change pass
(floor_pass) lstat of every entry on both sides (and listxattr, which
sync.py makes by default; in incremental cases the same, a lower bound as
it copies nothing); for a first copy (floor_copy) each file copied
to a temporary name and renamed into place, with its mode, times and a log
line.  Its ratio says how much of sync.py's time its own work adds, and
how near to rsync a Python program can come on this machine at all.

Wall time is taken around each run; CPU time and peak RSS come from GNU
time's %U, %S and %M where it is installed, else from wait4() of a child
started by this small process (never from a fork of a large one); the
summed PSS from /proc, sampled every 10 ms by a thread here.  This file
is not collected by pytest: speed is a goal, never a test assertion.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNC_PY = str(Path(__file__).resolve().parent.parent / "sync.py")
MTIME = 1_600_000_000


def build_small_files(root: Path, files: int, dirs: int, max_size: int = 0) -> None:
    """files spread evenly over dirs directories (two levels); sizes cycle
    deterministically from 0 to max_size bytes."""
    per_dir = files // dirs
    payload = bytes(range(256)) * (max_size // 256 + 1)
    for d in range(dirs):
        folder = root / f"group{d % 20:02}" / f"dir{d:05}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(per_dir):
            size = (d * 7919 + f * 104729) % (max_size + 1) if max_size else 0
            path = folder / f"file{f:05}.dat"
            path.write_bytes(payload[:size])
            os.utime(path, (MTIME, MTIME))


def build_shape(root: Path, shape: str, files: int, max_size: int = 0) -> None:
    """files small files laid out as shape (see the module docstring)."""
    if shape == "uniform":
        build_small_files(root, files, max(1, files // 50), max_size)
        return
    payload = bytes(range(256)) * (max_size // 256 + 1)
    if shape == "top":  # a third directly in 7 top folders, the rest 2 levels below them
        folders = [root / f"top{t}" for t in range(7)]
        nested = files - files // 3
        folders_below = max(1, nested // 40)
        places = [folders[i % 7] for i in range(files // 3)]
        places += [folders[d % 7] / f"sub{d % 13:02}" / f"dir{d:05}" for d in range(folders_below)
                   for _ in range(nested // folders_below)]
    elif shape == "deep":  # a chain of 100 folders
        chain, folder = [], root
        for level in range(100):
            folder = folder / f"level{level:03}"
            chain.append(folder)
        places = [chain[i % 100] for i in range(files)]
    elif shape == "wide":  # folders of 10 files, all at the top
        places = [root / f"dir{i // 10:05}" for i in range(files)]
    elif shape == "flat":  # one folder holding everything
        places = [root / "all"] * files
    else:
        raise ValueError(shape)
    made = set()
    for i, folder in enumerate(places):
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        size = (i * 104729) % (max_size + 1) if max_size else 0
        path = folder / f"file{i:06}.dat"
        path.write_bytes(payload[:size])
        os.utime(path, (MTIME, MTIME))


def cache_bytecode() -> None:
    """Write sync.py's bytecode where an import looks for it (as installing does)."""
    import importlib.util
    import py_compile
    py_compile.compile(SYNC_PY, cfile=importlib.util.cache_from_source(SYNC_PY), doraise=True)


def copy_tree(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)


def build_large_files(root: Path, count: int, size: int, folder: str = "") -> None:
    """count files of size bytes (deterministic, incompressible-looking content)."""
    target = root / folder if folder else root
    target.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(b"sync.py").digest() * (1 << 15)  # 1 MiB
    for i in range(count):
        path = target / f"large{i}.bin"
        with open(path, "wb") as f:
            for offset in range(0, size, len(block)):
                f.write(bytes([i]) + block[1:min(len(block), size - offset)])
        os.utime(path, ns=(MTIME * 10**9 + 123_456_789, MTIME * 10**9 + 123_456_789 + i))


def change_one_percent_each(root: Path) -> None:
    """Modify, delete and add 1% of the files of a small-files tree."""
    files = sorted(root.rglob("*.dat"))
    for path in files[0::100]:
        path.write_bytes(b"modified " + path.name.encode())
    for path in files[50::100]:
        path.unlink()
    for path in files[25::100]:
        path.with_name("added-" + path.name).write_bytes(b"added")


def build_sparse(root: Path) -> None:
    """A 1 GiB sparse file (a VM image) holding 8 KiB of data."""
    with open(root / "vm.img", "wb") as f:
        f.truncate(1 << 30)
        f.seek(300 << 20)
        f.write(hashlib.sha256(b"data").digest() * 256)
    os.utime(root / "vm.img", (MTIME, MTIME))


def rename_top_folder(root: Path) -> None:
    (root / "data").rename(root / "data-renamed")


class Case:
    """build(src) makes the source; the replica starts as a mirror of that
    source (replica_from_source) or empty; then mutate(src) changes the
    source.  Where the pass changes the replica (restore), every repetition
    starts again from a pristine copy."""

    def __init__(self, name, build, mutate=None, replica_from_source=True, restore=True,
                 sync_args=(), rsync_args=(), repeat=None, references=("-a",), nas_ms=None, nas_side="replica",
                 others=None):
        self.name, self.build, self.mutate = name, build, mutate
        self.replica_from_source, self.restore = replica_from_source, restore
        self.sync_args, self.rsync_args, self.repeat = sync_args, rsync_args, repeat
        self.references = references  # rsync's flags, one reference command each
        # The replica (or, nas_side "source", the source) behind slowfs, this
        # many ms per request (None: not), with an 8-way parallel rsync as a
        # further reference.
        self.nas_ms, self.nas_side = nas_ms, nas_side
        # Further references: {name: a function of the source and the replica giving a command}.
        self.others = others or {}


FIDELITY = ("-a", "-aHAXS")  # sync.py keeps owners, ACLs, xattrs, hard links and holes by default


def floor_pass(src: str, dst: str, xattrs: bool, processes: int) -> None:
    """The least a no-change pass in Python can do, as a reference: the
    floor under sync.py's time on a machine.  PROCESSES processes each list
    every folder of both trees and take every PROCESSES-th name of each
    listing (by hash, so every tree shape, even one folder, is shared out in
    full): lstat of it on both sides (os.DirEntry.stat), size and mtime
    compared, and with XATTRS listxattr of both by name from inside the
    folder (as sync.py reads them).  Nothing else: no decisions, no log, no
    folders' own attributes, no messages between the processes.  Where
    the trees differ (an incremental case) nothing is copied: the floor
    is then a lower bound."""
    def side(fd: int, share: int) -> tuple[dict, list]:
        found, folders = {}, []
        with os.scandir(fd) as listing:
            for item in listing:
                if item.is_dir(follow_symlinks=False):
                    folders.append(item.name)
                if hash(item.name) % processes == share:
                    found[item.name] = item.stat(follow_symlinks=False)
        if xattrs and found:
            os.fchdir(fd)
            for name in found:
                os.listxattr(name, follow_symlinks=False)
        return found, folders

    differ = [0]  # names that differ (counted, so that the comparison is made)

    def walk(share: int) -> None:
        stack, flags = [""], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        while stack:
            rel = stack.pop()
            sd, dd = os.open(os.path.join(src, rel), flags), os.open(os.path.join(dst, rel), flags)
            ours, folders = side(sd, share)
            theirs, _ = side(dd, share)
            for name, st in ours.items():  # what differs is found, not copied: see INCREMENTAL_FLOOR
                other = theirs.get(name)
                differ[0] += other is None or (other.st_size, other.st_mtime_ns) != (st.st_size, st.st_mtime_ns)
            stack.extend(os.path.join(rel, name) for name in folders)
            os.close(sd)
            os.close(dd)

    _in_processes(walk, processes)


def floor_copy(src: str, dst: str, log: str, processes: int) -> None:
    """The least a first copy in Python can do as safely as sync.py, and
    log as it does: PROCESSES processes share the files out by name as
    floor_pass does (folders are made by each that meets them); each file
    is opened without following a link, written to a new temporary name
    (copy_file_range), given its mode and times, renamed into place, and
    logged with a line of its own (LOG appended to, checked before each
    line as sync.py checks for logrotate).  Nothing else: no decisions,
    no owners, no extended attributes, no folders' own attributes."""
    def walk(share: int) -> None:
        out = open(log, "a", encoding="utf-8")
        stack = [""]
        while stack:
            rel = stack.pop()
            here, there = os.path.join(src, rel), os.path.join(dst, rel)
            with os.scandir(here) as listing:
                items = list(listing)
            for item in items:
                target = os.path.join(there, item.name)
                if item.is_dir(follow_symlinks=False):
                    os.makedirs(target, exist_ok=True)
                    stack.append(os.path.join(rel, item.name))
                    continue
                if hash(item.name) % processes != share:
                    continue
                st = item.stat(follow_symlinks=False)
                temp = os.path.join(there, f".floor-{share}.tmp")
                fin = os.open(item.path, os.O_RDONLY | os.O_NOFOLLOW)
                fout = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                left = st.st_size
                while left > 0:
                    copied = os.copy_file_range(fin, fout, left)
                    if not copied:
                        break
                    left -= copied
                os.chmod(fout, st.st_mode & 0o7777)
                os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.close(fin)
                os.close(fout)
                os.rename(temp, target)
                os.stat(log)
                now = time.time()
                out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} "
                          f"INFO    copied {os.path.join(rel, item.name)} ({st.st_size} bytes)\n")
                out.flush()

    _in_processes(walk, processes)


def _in_processes(walk, processes: int) -> None:
    """walk(share) for each share in a forked process of its own; exits 1 if one fails."""
    children = []
    for share in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                walk(share)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    if any(os.waitpid(pid, 0)[1] for pid in children):
        sys.exit(1)


def floor_command(what: str):
    """A function of the source and the replica giving the command of a floor (see --floor)."""
    return lambda src, dst: [sys.executable, __file__, "--floor", what, str(src), str(dst)]


FLOORS = {"Python floor: lstat": floor_command("lstat"),
          "Python floor: lstat, listxattr": floor_command("listxattr")}
COPY_FLOOR = {"Python floor: safe copy, log line": floor_command("copy")}
# In an incremental case, floor_pass is a lower bound: it finds what
# differs and copies nothing, so any pass takes longer.
INCREMENTAL_FLOOR = {"Python floor: lstat, nothing copied (a lower bound)": floor_command("lstat")}


GIB_FILES = 8, 128 * 1024 * 1024  # 1 GiB as 8 files of 128 MiB

CASES = {
    "initial-small": Case("initial copy, 20,000 files of 0-16 KiB in 400 directories",
                          lambda s: build_small_files(s, 20_000, 400, 16 * 1024),
                          replica_from_source=False, others=COPY_FLOOR),
    # --fsync costs a disk flush per file and per changed folder: measure it
    # where flushes are real (--root on a disk file system, not tmpfs).
    "initial-small-fsync": Case("initial copy, 20,000 files of 0-16 KiB, --fsync (rsync --fsync)",
                                lambda s: build_small_files(s, 20_000, 400, 16 * 1024),
                                replica_from_source=False, sync_args=("--fsync",), rsync_args=("--fsync",)),
    "initial-large": Case("initial copy, 4 files of 128 MiB",
                          lambda s: build_large_files(s, 4, 128 * 1024 * 1024),
                          replica_from_source=False),
    "no-change-100k": Case("no-change pass, 100,000 empty files in 2,000 directories",
                           lambda s: build_small_files(s, 100_000, 2_000), restore=False,
                           references=FIDELITY, others=FLOORS),
    "incremental-100k": Case("100,000 files, 1% modified, 1% deleted, 1% added",
                             lambda s: build_small_files(s, 100_000, 2_000, 1024),
                             mutate=change_one_percent_each, references=FIDELITY, others=INCREMENTAL_FLOOR),
    "sparse-1g": Case("initial copy of a 1 GiB sparse file holding 8 KiB",
                      build_sparse, replica_from_source=False, references=("-aS", "-a")),
    "rename-1g": Case("pass after renaming a directory holding 1 GiB",
                      lambda s: build_large_files(s, *GIB_FILES, folder="data"),
                      mutate=rename_top_folder),
    "checksum-1g": Case("--checksum no-change pass over 1 GiB (rsync -a -c)",
                        lambda s: build_large_files(s, *GIB_FILES), restore=False,
                        sync_args=("--checksum",), rsync_args=("-c",)),
    "no-change-flat-100k": Case("no-change pass, one folder holding 100,000 empty files",
                                lambda s: build_shape(s, "flat", 100_000), restore=False,
                                references=FIDELITY, others=FLOORS),
    "nas-no-change-20k": Case("NAS replica (2 ms a request): no-change pass, 20,000 files, top-heavy tree",
                              lambda s: build_shape(s, "top", 20_000, 1024), restore=False, nas_ms=2.0),
    "nas-no-change-flat-20k": Case("NAS replica (2 ms): no-change pass, one folder holding 20,000 files",
                                   lambda s: build_shape(s, "flat", 20_000, 1024), restore=False, nas_ms=2.0),
    "nas-incremental-20k": Case("NAS replica (2 ms): 20,000 files, 1% modified, deleted, added",
                                lambda s: build_shape(s, "top", 20_000, 1024), mutate=change_one_percent_each,
                                nas_ms=2.0),
    "nas-source-no-change-20k": Case("NAS source (2 ms a request): no-change pass, 20,000 files, top-heavy tree",
                                     lambda s: build_shape(s, "top", 20_000, 1024), restore=False, nas_ms=2.0,
                                     nas_side="source"),
    "nas-initial-5k": Case("NAS replica (0.5 ms): initial copy, 5,000 files of 0-16 KiB, top-heavy tree",
                           lambda s: build_shape(s, "top", 5_000, 16 * 1024), replica_from_source=False,
                           nas_ms=0.5),
    # Start-up: the goal is at most twice a bare interpreter's start.  Run as
    # a script, sync.py is compiled at every start; imported (the installed
    # command), its cached bytecode is used.
    "startup": Case("--once over an empty tree", lambda s: cache_bytecode(), restore=False, repeat=21, references=(),
                    others={"python3 -c pass": lambda src, dst: [sys.executable, "-c", "pass"],
                            "imported, bytecode cached": lambda src, dst: [
                                *sync_command(installed=True),
                                str(src), str(dst), "1", str(dst.parent / "sync.log"), "--once", "-q"]}),
    "no-change-1m": Case("no-change pass, 1,000,000 empty files in 20,000 directories (memory)",
                         lambda s: build_small_files(s, 1_000_000, 20_000), restore=False, repeat=1),
}


SHAPED = {  # the small-file cases, each also in the other tree shapes
    "initial-small": ("initial copy, 20,000 files of 0-16 KiB, {} tree", 20_000, 16 * 1024,
                      dict(replica_from_source=False, others=COPY_FLOOR)),
    "no-change-100k": ("no-change pass, 100,000 empty files, {} tree", 100_000, 0,
                       dict(restore=False, references=FIDELITY, others=FLOORS)),
    "incremental-100k": ("100,000 files, 1% modified, deleted, added, {} tree", 100_000, 1024,
                         dict(mutate=change_one_percent_each, references=FIDELITY, others=INCREMENTAL_FLOOR)),
}
for _key, (_name, _files, _size, _how) in SHAPED.items():
    for _shape in ("top", "deep", "wide", "flat"):
        if _key == "no-change-100k" and _shape == "flat":
            continue  # no-change-flat-100k, named so before the other shapes came
        CASES[f"{_key}-{_shape}"] = Case(_name.format(_shape),
                                         lambda s, shape=_shape, n=_files, size=_size: build_shape(s, shape, n, size),
                                         **_how)


class TreeMemory:
    """The peak, over a run, of the summed PSS (proportional set size: pages
    shared between processes counted once, shared) of a process and all its
    descendants, sampled every 10 ms from /proc (Linux; 0 elsewhere).  This
    is memory "in all processes together": the sum of their RSS would count
    each page a forked worker shares with its parent once per process."""

    def __init__(self, pid: int):
        import threading
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        if os.path.exists(f"/proc/{pid}/smaps_rollup"):
            self.thread.start()

    def tree(self, pid: int) -> list:
        try:
            children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        except OSError:
            return [pid]
        return [pid] + [p for child in children for p in self.tree(int(child))]

    @staticmethod
    def pss_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                return next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)
        except OSError:
            return 0  # it has just ended

    def sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak_kib = max(self.peak_kib, sum(self.pss_kib(p) for p in self.tree(self.pid)))

    def stop(self) -> int:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        return self.peak_kib


def measure(command: list[str], shell: bool = False) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS KiB, peak summed PSS KiB) of one
    run of command (CPU: user + system of it and every child it waited for;
    RSS: of its largest process; PSS: of all its processes together, see
    TreeMemory)."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if shell:
        command = ["sh", "-c", command]
    with tempfile.NamedTemporaryFile("r") as out:
        if gnu_time:
            command = [gnu_time, "-o", out.name, "-f", "%U %S %M", *command]
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        memory = TreeMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        pss = memory.stop()
        if status:
            raise RuntimeError(f"{command} failed")
        if gnu_time:
            user, system, rss = out.read().split()[-3:]
            return wall, float(user) + float(system), int(rss), pss
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, pss


class SlowFS:
    """A slowfs mount of a backing folder (see ../shared/slowfs/README.md)."""

    SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "slowfs" / "slowfs.c"
    binary = None

    @classmethod
    def available(cls) -> bool:
        if cls.binary is None:
            cls.binary = ""
            if cls.SOURCE.exists() and shutil.which("gcc") and shutil.which("pkg-config") \
                    and shutil.which("fusermount3"):
                flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True,
                                       text=True)
                if flags.returncode == 0:
                    out = Path(tempfile.mkdtemp(prefix="slowfs-")) / "slowfs"
                    built = subprocess.run(["gcc", "-O2", "-o", str(out), str(cls.SOURCE), *flags.stdout.split()],
                                           capture_output=True)
                    cls.binary = str(out) if built.returncode == 0 else ""
        return bool(cls.binary)

    def __init__(self, backing: Path, mount: Path, delay_ms: float):
        self.backing, self.mount, self.delay_ms = backing, mount, delay_ms
        mount.mkdir(exist_ok=True)

    def __enter__(self):
        options = (f"delay_ms={self.delay_ms},mib_ms=10,max_threads=64,entry_timeout=1,attr_timeout=1,"
                   "negative_timeout=0")
        subprocess.run([self.binary, str(self.backing), str(self.mount), "-o", options], check=True)
        return self.mount

    def __exit__(self, *exc):
        subprocess.run(["fusermount3", "-u", str(self.mount)], check=True)


def parallel_rsync(src: Path, dst: Path) -> str:
    """8 rsyncs at once, one per top-level entry of src (deletions at the top
    level itself are left out: a reference for speed, not a mirror)."""
    return (f"cd {shlex.quote(str(src))} && ls -A | xargs -d '\\n' -P 8 -I '{{}}' "
            f"rsync -a --delete '{{}}' {shlex.quote(str(dst))}/")


def sync_command(installed: bool) -> list[str]:
    """The start of a command that runs sync.py: as a script, or (installed)
    imported from its cached bytecode, as the console command does."""
    if not installed:
        return [sys.executable, SYNC_PY]
    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); import sync; "
            "sys.exit(sync.main(sys.argv[1:]))", str(Path(SYNC_PY).parent)]


def run_case(key: str, case: Case, base: Path, repeat: int, extra_args=(), installed: bool = False) -> dict:
    """{tool: (median wall s, median CPU s, peak RSS KiB, peak summed PSS KiB)}"""
    work = base / key
    shutil.rmtree(work, ignore_errors=True)
    src, pristine = work / "src", work / "pristine"
    src.mkdir(parents=True)
    case.build(src)
    if not case.restore:  # replicas are made once, from the source itself
        pristine = src
    else:
        pristine.mkdir()
        if case.replica_from_source:
            copy_tree(src, pristine)
    if case.mutate:
        case.mutate(src)
    log = work / "sync.log"
    commands = {
        "sync.py": lambda src, dst: [*sync_command(installed), str(src), str(dst), "1", str(log), "--once", "-q",
                                *case.sync_args, *extra_args],
    }
    if shutil.which("rsync"):
        for flags in case.references:
            commands[f"rsync {flags}"] = lambda src, dst, flags=flags: [
                "rsync", flags, "--delete", *case.rsync_args, f"{src}/", f"{dst}/"]
        if case.nas_ms is not None:
            commands["rsync -a, 8 at once"] = parallel_rsync
    commands.update(case.others)
    samples = {tool: [] for tool in commands}
    replicas = {tool: work / f"dst-{tool.replace(' ', '_')}" for tool in commands}
    for dst in replicas.values():
        dst.mkdir()
        copy_tree(pristine, dst)
    for _ in range(case.repeat or repeat):
        for tool, make_command in commands.items():  # alternate the tools
            dst = replicas[tool]
            if case.restore:
                shutil.rmtree(dst)
                dst.mkdir()
                copy_tree(pristine, dst)
            if case.nas_ms is None:
                samples[tool].append(measure(make_command(src, dst)))
                continue
            slow = dst if case.nas_side == "replica" else src
            with SlowFS(slow, work / "nas", case.nas_ms) as mount:  # mounted afresh: cold caches
                command = make_command(mount, dst) if slow is src else make_command(src, mount)
                samples[tool].append(measure(command, shell=isinstance(command, str)))
    shutil.rmtree(work)
    return {tool: (statistics.median(w for w, _, _, _ in s), statistics.median(c for _, c, _, _ in s),
                   max(m for _, _, m, _ in s), max(p for _, _, _, p in s)) for tool, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", choices=[[], *CASES], default=[], metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sync-args", default="", help="extra options for sync.py, e.g. '--workers 1'")
    parser.add_argument("--installed", action="store_true",
                        help="run sync.py imported from its cached bytecode, as the installed command does "
                             "(default: as a script, compiled at every start)")
    parser.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                        help="where to build the trees (default: /dev/shm, a tmpfs)")
    parser.add_argument("--floor", nargs=3, metavar=("KIND", "SRC", "DST"),
                        help="run only a Python floor over SRC and DST, in as many processes as there are CPUs: "
                             "lstat or listxattr (a no-change pass, see floor_pass), or copy (a first copy, "
                             "see floor_copy, logging to DST's parent/floor.log)")
    args = parser.parse_args()
    if args.floor:
        kind, src, dst = args.floor
        if kind not in ("lstat", "listxattr", "copy"):
            parser.error(f"--floor: KIND is lstat, listxattr or copy, not {kind!r}")
        processes = os.cpu_count() or 1
        if kind == "copy":
            floor_copy(src, dst, os.path.join(os.path.dirname(os.path.abspath(dst)), "floor.log"), processes)
        else:
            floor_pass(src, dst, kind == "listxattr", processes)
        return
    base = Path(tempfile.mkdtemp(prefix="syncpy-bench-", dir=args.root))
    if args.installed:
        cache_bytecode()
    rsync = (subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
             if shutil.which("rsync") else "rsync not installed")
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(base)], capture_output=True, text=True).stdout.strip()
    where = fs_type or "unknown file system"
    print(f"trees under {base} ({where}); {args.repeat} runs each; Python {sys.version.split()[0]}; {rsync}; "
          f"{os.cpu_count()} CPUs; sync.py options: {args.sync_args or '(defaults)'}; "
          f"run {'as the installed command (cached bytecode)' if args.installed else 'as a script'}")
    print("| case | reference | sync.py median s | reference median s | ratio | sync.py CPU s "
          "| reference CPU s | CPU ratio | sync.py peak RSS MiB | reference peak RSS MiB "
          "| sync.py all processes MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for key in args.cases or CASES:
            case = CASES[key]
            if case.nas_ms is not None and not SlowFS.available():
                print(f"| {key} | skipped: slowfs needs gcc, pkg-config, libfuse3-dev and fusermount3 |", flush=True)
                continue
            result = run_case(key, case, base, args.repeat, args.sync_args.split(), args.installed)
            ours = result.pop("sync.py")
            if not result:
                print(f"| {key} | - | {ours[0]:.3f} | - | - | {ours[1]:.2f} | - | - | {ours[2] / 1024:.1f} | - "
                      f"| {ours[3] / 1024:.1f} |", flush=True)
            for reference, theirs in result.items():
                said = f"{reference} --delete" if reference in (f"rsync {f}" for f in case.references) else reference
                print(f"| {key}: {case.name} | {said} | {ours[0]:.3f} | {theirs[0]:.3f} | "
                      f"{ours[0] / theirs[0]:.2f} | {ours[1]:.2f} | {theirs[1]:.2f} | "
                      f"{ours[1] / theirs[1] if theirs[1] else float('nan'):.2f} | "
                      f"{ours[2] / 1024:.1f} | {theirs[2] / 1024:.1f} | {ours[3] / 1024:.1f} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
