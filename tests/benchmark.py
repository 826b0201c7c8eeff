"""Benchmark sync.py against rsync on the same trees, in the same run.

    python tests/benchmark.py [--repeat N] [--root DIR] [CASE ...]

Trees are built deterministically on tmpfs (/dev/shm where it exists, else the
system temp folder; the output says which), so the tools are measured and not
the disk.  The 1,000,000-file case needs about 3 million inodes; where
/dev/shm has fewer, give --root a tmpfs mounted with more, for example
    mount -t tmpfs -o size=16g,nr_inodes=8m tmpfs /mnt/bench
For each case the commands run alternately, REPEAT times each:

    python sync.py SRC DST 1 LOG --once -q
    rsync -a --delete SRC/ DST/
    rsync -aHAXS --delete SRC/ DST/      (the cases marked so: what sync.py keeps by default)

and the table gives, per reference, each one's median wall time, the ratio
sync.py / reference and each one's peak RSS.  Wall time is taken around each run; peak RSS comes from
GNU time's %M where it is installed, else from wait4() of a child started by
this small process (never from a fork of a large one).  This
file is not collected by pytest: speed is a goal, never a test assertion.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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
                 sync_args=(), rsync_args=(), repeat=None, references=("-a",)):
        self.name, self.build, self.mutate = name, build, mutate
        self.replica_from_source, self.restore = replica_from_source, restore
        self.sync_args, self.rsync_args, self.repeat = sync_args, rsync_args, repeat
        self.references = references  # rsync's flags, one reference command each


FIDELITY = ("-a", "-aHAXS")  # sync.py keeps owners, ACLs, xattrs, hard links and holes by default


GIB_FILES = 8, 128 * 1024 * 1024  # 1 GiB as 8 files of 128 MiB

CASES = {
    "initial-small": Case("initial copy, 20,000 files of 0-16 KiB in 400 directories",
                          lambda s: build_small_files(s, 20_000, 400, 16 * 1024),
                          replica_from_source=False),
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
                           references=FIDELITY),
    "incremental-100k": Case("100,000 files, 1% modified, 1% deleted, 1% added",
                             lambda s: build_small_files(s, 100_000, 2_000, 1024),
                             mutate=change_one_percent_each, references=FIDELITY),
    "sparse-1g": Case("initial copy of a 1 GiB sparse file holding 8 KiB",
                      build_sparse, replica_from_source=False, references=("-aS", "-a")),
    "rename-1g": Case("pass after renaming a directory holding 1 GiB",
                      lambda s: build_large_files(s, *GIB_FILES, folder="data"),
                      mutate=rename_top_folder),
    "checksum-1g": Case("--checksum no-change pass over 1 GiB (rsync -a -c)",
                        lambda s: build_large_files(s, *GIB_FILES), restore=False,
                        sync_args=("--checksum",), rsync_args=("-c",)),
    "no-change-1m": Case("no-change pass, 1,000,000 empty files in 20,000 directories (memory)",
                         lambda s: build_small_files(s, 1_000_000, 20_000), restore=False, repeat=1),
}


def measure(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of one run of command."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time:
        with tempfile.NamedTemporaryFile("r") as out:
            started = time.perf_counter()
            subprocess.run([gnu_time, "-o", out.name, "-f", "%M", *command],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            return wall, int(out.read().split()[-1])
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status:
        raise RuntimeError(f"{command} failed")
    return wall, usage.ru_maxrss


def run_case(key: str, case: Case, base: Path, repeat: int, extra_args=()) -> dict:
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
        "sync.py": lambda dst: [sys.executable, SYNC_PY, str(src), str(dst), "1", str(log), "--once", "-q",
                                *case.sync_args, *extra_args],
    }
    if shutil.which("rsync"):
        for flags in case.references:
            commands[f"rsync {flags}"] = lambda dst, flags=flags: [
                "rsync", flags, "--delete", *case.rsync_args, f"{src}/", f"{dst}/"]
    samples = {tool: [] for tool in commands}
    replicas = {tool: work / f"dst-{tool}" for tool in commands}
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
            samples[tool].append(measure(make_command(dst)))
    shutil.rmtree(work)
    return {tool: (statistics.median(w for w, _ in s), max(m for _, m in s)) for tool, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", choices=[[], *CASES], default=[], metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sync-args", default="", help="extra options for sync.py, e.g. '--workers 1'")
    parser.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                        help="where to build the trees (default: /dev/shm, a tmpfs)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="syncpy-bench-", dir=args.root))
    rsync = (subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
             if shutil.which("rsync") else "rsync not installed")
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(base)], capture_output=True, text=True).stdout.strip()
    where = fs_type or "unknown file system"
    print(f"trees under {base} ({where}); {args.repeat} runs each; Python {sys.version.split()[0]}; {rsync}; "
          f"{os.cpu_count()} CPUs; sync.py options: {args.sync_args or '(defaults)'}")
    print("| case | reference | sync.py median s | reference median s | ratio | sync.py peak RSS MiB "
          "| reference peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    try:
        for key in args.cases or CASES:
            result = run_case(key, CASES[key], base, args.repeat, args.sync_args.split())
            ours = result.pop("sync.py")
            if not result:
                print(f"| {key} | - | {ours[0]:.3f} | - | - | {ours[1] / 1024:.1f} | - |", flush=True)
            for reference, theirs in result.items():
                print(f"| {key}: {CASES[key].name} | {reference} --delete | {ours[0]:.3f} | {theirs[0]:.3f} | "
                      f"{ours[0] / theirs[0]:.2f} | {ours[1] / 1024:.1f} | {theirs[1] / 1024:.1f} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
