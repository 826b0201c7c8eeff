"""Benchmark sync.py against rsync on the same trees, in the same run.

    python tests/benchmark.py [--repeat N] [--root DIR] [CASE ...]

Trees are built deterministically on tmpfs (/dev/shm where it exists, else the
system temp folder; the output says which), so the tools are measured and not
the disk.  For each case the two commands run alternately, REPEAT times each:

    python sync.py SRC DST 1 LOG --once -q
    rsync -a --delete SRC/ DST/

and the table gives each one's median wall time, the ratio sync.py / rsync and
each one's peak RSS.  Times and memory come from GNU time (%e %M) where it is
installed, else from wait4() of a child started by this small process.  This
file is not collected by pytest: speed is a goal, never a test assertion.
"""

from __future__ import annotations

import argparse
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


class Case:
    """prepare(src, dst) builds the starting state; every repetition restores
    DST from a pristine copy where the case changes it."""

    def __init__(self, name, build, mutate=None, replica_from_source=True, restore=True):
        self.name, self.build, self.mutate = name, build, mutate
        self.replica_from_source, self.restore = replica_from_source, restore


CASES = {
    "initial-small": Case("initial copy, 20,000 files of 0-16 KiB in 400 directories",
                          lambda s: build_small_files(s, 20_000, 400, 16 * 1024),
                          replica_from_source=False),
    "no-change-100k": Case("no-change pass, 100,000 empty files in 2,000 directories",
                           lambda s: build_small_files(s, 100_000, 2_000), restore=False),
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


def run_case(key: str, case: Case, base: Path, repeat: int) -> dict:
    work = base / key
    shutil.rmtree(work, ignore_errors=True)
    src, pristine = work / "src", work / "pristine"
    src.mkdir(parents=True)
    case.build(src)
    pristine.mkdir()
    if case.replica_from_source:
        copy_tree(src, pristine)
    if case.mutate:
        case.mutate(src)
    log = work / "sync.log"
    commands = {
        "sync.py": lambda dst: [sys.executable, SYNC_PY, str(src), str(dst), "1", str(log), "--once", "-q"],
        "rsync": lambda dst: ["rsync", "-a", "--delete", f"{src}/", f"{dst}/"],
    }
    if not shutil.which("rsync"):
        del commands["rsync"]
    samples = {tool: [] for tool in commands}
    replicas = {tool: work / f"dst-{tool}" for tool in commands}
    for dst in replicas.values():
        dst.mkdir()
        copy_tree(pristine, dst)
    for _ in range(repeat):
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
    parser.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="syncpy-bench-", dir=args.root))
    rsync = (subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
             if shutil.which("rsync") else "rsync not installed")
    where = "tmpfs" if str(base).startswith("/dev/shm") else "temp folder"
    print(f"trees under {base} ({where}); {args.repeat} runs each; Python {sys.version.split()[0]}; {rsync}")
    print("| case | sync.py median s | rsync median s | ratio | sync.py peak RSS MiB | rsync peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    try:
        for key in args.cases or CASES:
            result = run_case(key, CASES[key], base, args.repeat)
            ours, theirs = result["sync.py"], result.get("rsync")
            ratio = f"{ours[0] / theirs[0]:.2f}" if theirs else "-"
            print(f"| {key}: {CASES[key].name} | {ours[0]:.3f} | {theirs[0]:.3f} | {ratio} | "
                  f"{ours[1] / 1024:.1f} | {theirs[1] / 1024:.1f} |" if theirs else
                  f"| {key} | {ours[0]:.3f} | - | - | {ours[1] / 1024:.1f} | - |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
