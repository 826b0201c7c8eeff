"""The periodic loop: schedule (on a fake clock), signals, log rotation, a
source that goes away and comes back."""

import os
import signal
import subprocess
import sys
import time

import pytest

import sync
from conftest import SYNC_PY
from trees import assert_mirror, make_tree


class FakeTime:
    """A monotonic clock that only moves when a pass 'takes time' or the loop waits."""

    def __init__(self, pass_durations, passes):
        self.now = 1000.0
        self.durations = list(pass_durations)
        self.passes = passes
        self.starts, self.waits = [], []
        self.stop = self  # the loop's stop event

    def clock(self):
        return self.now

    def is_set(self):
        return len(self.starts) >= self.passes

    def wait(self, seconds):
        self.waits.append(round(seconds, 6))
        self.now += seconds

    def run_pass(self, mirror, report, should_stop, progress=None, abort=None):
        self.starts.append(self.now)
        self.now += self.durations.pop(0)
        return sync.PassResult()


def run_fake_loop(monkeypatch, interval, durations):
    fake = FakeTime(durations, passes=len(durations))
    monkeypatch.setattr(sync.Mirror, "run_pass", fake.run_pass)
    events = []
    sync.run_periodically("s", "r", interval, report=events.append, stop=fake, clock=fake.clock)
    return fake, events


def test_passes_start_every_interval_start_to_start(monkeypatch):
    fake, events = run_fake_loop(monkeypatch, 10, [3, 3, 0.5, 9.9])
    assert fake.waits == [7, 7, 9.5]
    assert [s - fake.starts[0] for s in fake.starts] == [0, 10, 20, 30]
    assert events == []


def test_a_wait_that_ends_early_does_not_start_the_next_pass_early(monkeypatch):
    # Where the wait cannot be woken by a signal it naps (Windows: 0.25 s at
    # a time); a signal that is not a stop ends a wait early too.
    fake = FakeTime([1, 1, 1], passes=3)
    fake.wait = lambda seconds: setattr(fake, "now", fake.now + min(seconds, 0.25))
    monkeypatch.setattr(sync.Mirror, "run_pass", fake.run_pass)
    sync.run_periodically("s", "r", 10, stop=fake, clock=fake.clock)
    assert fake.starts == [1000.0, 1010.0, 1020.0]


def test_a_pass_longer_than_interval_is_followed_at_once_with_a_warning(monkeypatch):
    fake, events = run_fake_loop(monkeypatch, 10, [12, 3, 3])
    assert fake.waits == [7]  # no wait after the long pass
    assert fake.starts == [1000, 1012, 1022]
    assert [(e.action, e.detail) for e in events] == [("overrun", "12.0")]


def test_source_that_disappears_fails_the_pass_deletes_nothing_and_recovers(src, dst, monkeypatch):
    make_tree(src, {"f": "x", "d": {"g": "y"}})
    moved = src.with_name("unmounted")
    results = []
    real_run_pass = sync.Mirror.run_pass

    def pass_with_source_changes(*args):
        if len(results) == 1:
            os.rename(src, moved)  # the drive is unmounted before pass 2
        if len(results) == 2:
            os.rename(moved, src)  # ...and back before pass 3
        return real_run_pass(*args)

    class Stop:
        def is_set(self):
            return len(results) >= 3

        def wait(self, seconds):
            pass

    monkeypatch.setattr(sync.Mirror, "run_pass", pass_with_source_changes)
    # Interval 0: each pass follows the last at once (Stop.wait does not wait).
    sync.run_periodically(str(src), str(dst), 0, on_pass=results.append, stop=Stop())
    assert [r.errors for r in results] == [0, 1, 0]
    assert results[2].counts == {}, "nothing was deleted, so nothing needed copying back"
    assert_mirror(src, dst)


# --- the real loop in a subprocess ---------------------------------------------


def wait_for(condition, what, timeout=30.0):
    """Poll until condition() is true; fail with what when it never is."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_loop(src, dst, log, interval):
    return subprocess.Popen([sys.executable, SYNC_PY, str(src), str(dst), str(interval), str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def passes_logged(log):
    return log.read_text().count("pass finished") if log.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_sleeping_stops_at_once_with_status_0(src, dst, log, signum):
    make_tree(src, {"f": "x"})
    proc = start_loop(src, dst, log, 3600)  # it would sleep an hour
    try:
        wait_for(lambda: passes_logged(log) == 1, "the first pass")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert log.read_text().splitlines()[-1].endswith(f"stopped by {signum.name}")
    assert_mirror(src, dst)


def test_loop_repeats_and_picks_up_changes(src, dst, log):
    make_tree(src, {"f": "x"})
    proc = start_loop(src, dst, log, 0.2)
    try:
        wait_for(lambda: passes_logged(log) >= 1, "the first pass")
        (src / "later.txt").write_text("added while running")
        wait_for(lambda: (dst / "later.txt").exists(), "the new file to be mirrored")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "copied later.txt" in log.read_text()


def test_log_file_moved_by_logrotate_is_reopened(src, dst, log):
    make_tree(src, {"f": "x"})
    proc = start_loop(src, dst, log, 0.2)
    try:
        wait_for(lambda: passes_logged(log) >= 1, "the first pass")
        rotated = log.with_name("sync.log.1")
        os.rename(log, rotated)
        (src / "after-rotation.txt").write_text("y")
        wait_for(lambda: log.exists() and "copied after-rotation.txt" in log.read_text(),
                 "a new log file with the new lines")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "after-rotation" not in rotated.read_text()
    assert proc.returncode == 0


@pytest.mark.parametrize("threads", [False, True])
def test_stop_during_a_copy_finishes_the_files_in_flight_then_stops(src, dst, threads, monkeypatch):
    # In-process: the stop request arrives while a file is being copied.
    make_tree(src, {f"f{i:02}": str(i) * 1000 for i in range(20)})
    stop_requested = []
    real_copy_bytes = sync._copy_bytes

    def copy_then_request_stop(fin, fout, size_hint, abort=None):
        n = real_copy_bytes(fin, fout, size_hint, abort)
        stop_requested.append(True)
        return n

    monkeypatch.setattr(sync, "_copy_bytes", copy_then_request_stop)
    # With threads, even these small files go through the large-file threads.
    monkeypatch.setattr(sync, "PARALLEL_MIN_SIZE", 0 if threads else 1 << 60)
    result = sync.run_pass(src, dst, sync.Options(workers=1), should_stop=lambda: bool(stop_requested))
    assert result.interrupted
    copied = sorted(os.listdir(dst))
    assert 1 <= len(copied) <= (sync.LARGE_FILE_THREADS if threads else 1), \
        "each thread finishes at most the file it had begun"
    if not threads:
        assert copied == ["f00"]
    for name in copied:
        assert (dst / name).read_bytes() == (src / name).read_bytes()
