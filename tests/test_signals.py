"""Stopping: a stop signal (SIGTERM, SIGINT, SIGHUP) at any moment of the
loop stops it promptly and cleanly; a second one stops a copy of any size
within about a second and leaves no temporary file."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SYNC_PY
from test_loop import passes_logged, wait_for
from trees import leftover_temp_files, make_tree

SIGNAL_TRIALS = int(os.environ.get("SYNCPY_SIGNAL_TRIALS", "12"))  # per signal; more: opt in

# sync.py with copies slowed down to 1 MiB per 50 ms: a 96 MiB file then takes
# about 5 s to copy, whatever the disk, so "at once" can be told from "after
# the copy".
SLOW_COPY = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
real = os.copy_file_range
def slow(src, dst, count, *args):
    time.sleep(0.05)
    return real(src, dst, min(count, 1 << 20), *args)
os.copy_file_range = slow
import sync
sys.exit(sync.main(sys.argv[1:]))
"""


def signal_pending(pid, signum):
    """Whether signum is still pending for process pid (not yet handled)."""
    with open(f"/proc/{pid}/status") as status:
        masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_signal_stops_a_large_copy_within_a_second(tmp_path, workers):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("the slowed-down copy needs os.copy_file_range (Linux, Python 3.8+)")
    src, dst, log = tmp_path / "src", tmp_path / "dst", tmp_path / "sync.log"
    block = os.urandom(1 << 20)
    make_tree(src, {"a": {"big.bin": block * 96}, "b": {"small.txt": "s"}, "c": {"small.txt": "c"}})
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COPY, str(src), str(dst), "1", str(log),
                             "--once", "--workers", workers, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # In dst/a: the probe of REPLICA at the start makes a temporary file in dst too.
        wait_for(lambda: leftover_temp_files(dst / "a"), "the large copy to begin")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        wait_for(lambda: not signal_pending(proc.pid, signal.SIGINT), "the first Ctrl-C to be noted")
        asked = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - asked
    finally:
        proc.kill()
    assert took < 2.0, f"the second Ctrl-C took {took:.1f} s to stop a copy"
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert log.read_text().splitlines()[-1].endswith("stopped at once by a second signal (SIGINT)")
    assert err.splitlines()[-1].endswith("stopped at once by a second signal (SIGINT)"), "even with --quiet"
    assert leftover_temp_files(dst) == [], "the half-written temporary file is removed"
    assert not (dst / "a" / "big.bin").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_at_any_moment_of_the_loop_stops_it_promptly(tmp_path, signum):
    # Half the signals land at a random moment, half the moment a pass has
    # ended (when the loop goes to sleep: a handler that set a
    # threading.Event could deadlock there).
    rng = random.Random(signum)
    src = tmp_path / "src"
    make_tree(src, {f"d{i}": {f"f{j}.txt": f"{i}{j}" for j in range(20)} for i in range(5)})
    for trial in range(SIGNAL_TRIALS):
        dst, log = tmp_path / f"dst{trial}", tmp_path / f"sync{trial}.log"
        proc = subprocess.Popen([sys.executable, SYNC_PY, str(src), str(dst), "0.05", str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if trial % 2:  # the moment the console shows a pass's summary
                for line in proc.stderr:
                    if "pass finished" in line:
                        break
            else:
                wait_for(lambda: passes_logged(log) >= 1, "the first pass")
                time.sleep(rng.uniform(0, 0.3))  # a random moment, not a wait for something
            proc.send_signal(signum)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"trial {trial}: {signum.name} was not acted on within 10 s")
        finally:
            proc.kill()
        # The status of the last pass: 0 when it ended exact before the signal,
        # 1 when the signal cut it short (then it is not exact).
        last = [line for line in log.read_text().splitlines() if "pass finished" in line][-1]
        assert proc.returncode == (0 if last.endswith("replica is an exact mirror") else 1), f"trial {trial}: {err}"
        assert "Traceback" not in err
        assert log.read_text().splitlines()[-1].endswith(f"stopped by {signum.name}"), f"trial {trial}"


def test_a_huge_interval_sleeps_instead_of_crashing(src, dst, log):
    make_tree(src, {"f": "x"})
    proc = subprocess.Popen([sys.executable, SYNC_PY, str(src), str(dst), "1e10", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: passes_logged(log) == 1, "the first pass")
        assert proc.poll() is None or proc.returncode == 0, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err and "internal error" not in err
    assert log.read_text().splitlines()[-1].endswith("stopped by SIGTERM")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_first_signal_lets_the_copy_in_flight_finish(tmp_path, workers):
    # One Ctrl-C asks the pass to stop after the current item: a worker
    # process that is copying a large file finishes it.
    if not hasattr(os, "copy_file_range"):
        pytest.skip("the slowed-down copy needs os.copy_file_range (Linux, Python 3.8+)")
    src, dst, log = tmp_path / "src", tmp_path / "dst", tmp_path / "sync.log"
    data = os.urandom(1 << 20) * 24
    # Enough folders at the top for the tree to be split among the workers.
    make_tree(src, {"a": {"big.bin": data}, **{f"f{i}": {"small.txt": str(i)} for i in range(10)}})
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COPY, str(src), str(dst), "1", str(log),
                             "--once", "--workers", workers],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # In dst/a: the probe of REPLICA at the start makes a temporary file in dst too.
        wait_for(lambda: leftover_temp_files(dst / "a"), "the large copy to begin")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    assert (dst / "a" / "big.bin").read_bytes() == data, "the copy in flight was finished"
    assert leftover_temp_files(dst) == []
    assert log.read_text().splitlines()[-1].endswith("stopped by SIGINT")
