"""Resources and fallbacks: no descriptor, pipe or thread outlives a pass,
however many passes a loop runs; each slow path that stands in for a fast
one gives the same bytes; a replica folder that cannot be listed is left
alone; a folder that was entered is always finished."""

import errno
import os
import stat
import threading

import pytest

import sync
from conftest import sync_once
from trees import Dir, File, assert_mirror, make_tree, snapshot


def open_descriptors() -> set:
    return set(os.listdir("/proc/self/fd"))


class StopAfter:
    """A loop's stop event that ends the loop after n passes, never sleeping."""

    def __init__(self, n):
        self.n, self.passes = n, 0

    def is_set(self):
        return self.passes >= self.n

    def wait(self, seconds):
        pass


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count descriptors")
@pytest.mark.parametrize("workers", [1, 3])
def test_no_descriptor_outlives_a_pass_across_many_passes(tmp_path, monkeypatch, workers):
    # Every kind of work, each pass: copies (threads for the large file),
    # updates, moves, deletions into the trash, a checksum comparison, an
    # unreadable source entry, worker processes, and the replica lock.
    monkeypatch.setattr(sync, "PARALLEL_MIN_SIZE", 1000)
    monkeypatch.setattr(sync, "SPLIT_MIN_TASKS", 1)
    src, dst, trash = tmp_path / "src", tmp_path / "dst", tmp_path / "trash"
    make_tree(src, {f"d{i}": {"f": f"{i}", "big": os.urandom(5000), "sub": {"g": "g"}} for i in range(6)})
    options = sync.Options(workers=workers, trash=str(trash), trash_keep_days=0, checksum=True)
    before = open_descriptors()
    mirror = sync.Mirror(src, dst, options)
    mirror.check(create=True, lock=True)
    stop, counts, results = StopAfter(12), [], []

    def on_pass(result):
        results.append(result)
        stop.passes += 1
        counts.append(len(open_descriptors()))
        n = stop.passes
        (src / f"d{n % 6}" / "f").write_text(f"pass {n}")  # an update
        folder = src / f"d{(n + 1) % 6}"
        big = next(p for p in folder.iterdir() if p.name.startswith("big"))
        os.rename(big, folder / f"big{n}")  # a move
        (src / f"d{(n + 2) % 6}" / "sub" / "g").unlink(missing_ok=True)  # a deletion
        (src / f"d{(n + 3) % 6}" / f"new{n}").write_bytes(os.urandom(3000))  # a copy
        os.chmod(src / f"d{(n + 4) % 6}" / "f", 0o600 if n % 2 else 0o640)  # permissions only

    threads_before = threading.active_count()
    sync.run_periodically(src, dst, 0.01, options, on_pass=on_pass, stop=stop, mirror=mirror)
    mirror.unlock()
    assert open_descriptors() == before
    assert threading.active_count() == threads_before
    assert len(set(counts)) == 1, f"descriptors held between passes grew: {counts}"
    assert all(r.errors == 0 for r in results)
    assert sum(r.counts["move"] for r in results) >= 10
    assert sum(r.counts["attrs"] for r in results) >= 5
    assert sync_once(src, dst, workers=workers)[0].exact
    assert_mirror(src, dst)


def test_no_descriptor_outlives_failures(tmp_path, monkeypatch):
    # Failures in the middle of work: a copy that fails, a replica folder
    # that cannot be listed, a stop request in the middle of a folder.
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {f"d{i}": {f"f{j}": "x" * 100 for j in range(5)} for i in range(4)})
    before = open_descriptors()
    real_copy_bytes = sync._copy_bytes
    calls = []

    def failing(fin, fout, size_hint, abort=None):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise OSError(errno.EIO, "Input/output error")
        return real_copy_bytes(fin, fout, size_hint, abort)

    monkeypatch.setattr(sync, "_copy_bytes", failing)
    for _ in range(3):
        result, _ = sync_once(src, dst)
        assert result.errors
    seen = []
    sync.run_pass(src, dst, sync.Options(), seen.append, should_stop=lambda: bool(seen))
    assert open_descriptors() == before


BIG = os.urandom(3 * sync.COPY_CHUNK + 12345)  # more than one chunk of the buffered copy


def no_fast_copy(monkeypatch, how):
    """Make the kernel's fast copy paths refuse (as on a file system that
    lacks them) or answer 0 bytes for a non-empty file (as some do)."""
    def refuse(*args):
        raise OSError(errno.EXDEV if how == "refuse" else errno.ENOSYS, "not here")

    def nothing(*args):
        return 0

    for name in ("copy_file_range", "sendfile"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse if how != "zero" else nothing)


@pytest.mark.parametrize("how", ["refuse", "nosys", "zero"])
def test_buffered_copy_fallback_copies_every_byte(src, dst, monkeypatch, how):
    make_tree(src, {"big.bin": BIG, "small.txt": "s", "empty": ""})
    no_fast_copy(monkeypatch, how)
    result, events = sync_once(src, dst)
    assert result.exact and result.bytes_copied == len(BIG) + 1
    assert (dst / "big.bin").read_bytes() == BIG
    assert_mirror(src, dst)


def test_short_writes_are_finished(src, dst, monkeypatch):
    make_tree(src, {"big.bin": BIG})
    no_fast_copy(monkeypatch, "refuse")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
    assert sync_once(src, dst)[0].exact
    assert (dst / "big.bin").read_bytes() == BIG


def test_a_fast_path_that_fails_midway_is_an_error_not_a_short_file(src, dst, monkeypatch):
    make_tree(src, {"big.bin": BIG})
    real = os.copy_file_range
    calls = []

    def fail_second(*args):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args[:2], sync.COPY_CHUNK)

    monkeypatch.setattr(os, "copy_file_range", fail_second)
    monkeypatch.setattr(sync, "COPY_CHUNK", sync.COPY_CHUNK)
    result, events = sync_once(src, dst)
    assert [e.path for e in events if e.action == "error"] == ["big.bin"]
    assert not (dst / "big.bin").exists(), "no partial file under the final name"
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact


def test_a_replica_folder_that_cannot_be_listed_is_left_alone(src, dst, monkeypatch):
    make_tree(src, {"a": {"new.txt": "n"}, "b": {"x": "x"}})
    assert sync_once(src, dst)[0].exact
    (dst / "a" / "stale.txt").write_text("only in the replica")
    (src / "b" / "x").write_text("changed")
    real_scan = sync._scan
    replica_a = os.stat(dst / "a")

    def scan(d):
        if os.path.samestat(os.stat(d), replica_a):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_scan(d)

    monkeypatch.setattr(sync, "_scan", scan)
    before = snapshot(dst / "a")
    result, events = sync_once(src, dst)
    assert [(e.path, e.detail) for e in events if e.action == "error"] == [
        ("a", "cannot list replica directory: Permission denied (EACCES)")]
    assert snapshot(dst / "a") == before, "nothing in it was changed"
    assert (dst / "b" / "x").read_text() == "changed", "the rest of the pass went on"
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_a_folder_that_was_entered_is_finished_even_when_the_pass_stops(src, dst, monkeypatch):
    # The pass stops after the first copy inside a read-only folder: the
    # folder still gets its own mode back (never left writable).
    make_tree(src, {"ro": Dir({f"f{i}": File("x") for i in range(10)}, mode=0o555)})
    real_copy_bytes, copies = sync._copy_bytes, []

    def copy(*args):
        copies.append(1)
        return real_copy_bytes(*args)

    monkeypatch.setattr(sync, "_copy_bytes", copy)
    seen = []
    result = sync.run_pass(src, dst, sync.Options(), seen.append, should_stop=lambda: bool(copies))
    assert result.interrupted
    assert [e.action for e in seen] == ["mkdir", "copy"]
    assert stat.S_IMODE(os.stat(dst / "ro").st_mode) == 0o555
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_with_checksum_and_trash_a_large_file_is_compared_kept_and_copied_in_one_thread(src, dst, tmp_path,
                                                                                       monkeypatch):
    # One job per file: the old version goes to the trash and the new bytes
    # are written by the same copy thread that compared them, not again on
    # the main thread.
    make_tree(src, {"big.bin": File(b"a" * 5000), "other": "o"})
    assert sync_once(src, dst)[0].exact
    make_tree(src, {"big.bin": File(b"b" * 5000)})  # same size and mtime: only checksum sees it
    monkeypatch.setattr(sync, "PARALLEL_MIN_SIZE", 1000)
    real_copy_bytes, threads = sync._copy_bytes, []

    def copy(*args):
        threads.append(threading.current_thread())
        return real_copy_bytes(*args)

    monkeypatch.setattr(sync, "_copy_bytes", copy)
    trash = tmp_path / "trash"
    result, events = sync_once(src, dst, checksum=True, trash=str(trash))
    assert result.exact
    assert [(e.action, e.path) for e in events] == [("trash", "big.bin"), ("update", "big.bin")]
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    assert (dst / "big.bin").read_bytes() == b"b" * 5000
    kept = [p for p in trash.rglob("big.bin")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"a" * 5000


@pytest.mark.parametrize("where", ["_FanOut", "walk"])
def test_an_internal_error_mid_pass_closes_every_folder_and_passes_on(src, dst, monkeypatch, where):
    # A bug (here: an exception injected where the work is handed out, or
    # into a subtree's walk) must surface as itself, with no folder left open.
    monkeypatch.setattr(sync, "SPLIT_MIN_TASKS", 1)
    make_tree(src, {f"d{i}": {"sub": {"f": "x"}} for i in range(4)})
    if where == "_FanOut":
        monkeypatch.setattr(sync._FanOut, "run", lambda self: (_ for _ in ()).throw(RuntimeError("bug")))
        workers = 2
    else:
        real_enter = sync._Walk.enter

        def enter(self, frame):
            if frame.rel == "d2/sub":
                raise RuntimeError("bug")
            return real_enter(self, frame)

        monkeypatch.setattr(sync._Walk, "enter", enter)
        workers = 1
    before = open_descriptors()
    with pytest.raises(RuntimeError, match="bug"):
        sync.run_pass(src, dst, sync.Options(workers=workers))
    assert open_descriptors() == before


def test_an_internal_error_waits_for_the_copy_threads_before_it_passes_on(src, dst, monkeypatch):
    # A copy thread still writing when the error surfaces would write into
    # folders whose descriptors are being closed: the pass waits for it.
    monkeypatch.setattr(sync, "PARALLEL_MIN_SIZE", 1000)
    make_tree(src, {"a": {"big.bin": os.urandom(5000)}})
    raised, checked = threading.Event(), threading.Event()
    real_copy_bytes = sync._copy_bytes

    def copy(*args):
        raised.wait(10)  # still copying when the error surfaces
        checked.wait(2)  # the test looks first, unless the pass waits for this thread
        return real_copy_bytes(*args)

    real_settle = sync._Walk.settle

    def settle(self, frame, pending):
        if not pending:  # a folder with no copy under way
            return real_settle(self, frame, pending)
        raised.set()
        raise RuntimeError("bug")

    monkeypatch.setattr(sync, "_copy_bytes", copy)
    monkeypatch.setattr(sync._Walk, "settle", settle)
    with pytest.raises(RuntimeError, match="bug"):
        sync.run_pass(src, dst, sync.Options())
    running = [t for t in threading.enumerate() if t.name.startswith("sync")]
    checked.set()
    assert running == [], "a copy thread outlived the pass"
