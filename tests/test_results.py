"""Truthful results: exit 0 and "exact mirror" only when true; a rename
match that could leave other bytes than a copy is verified; a full disk
fails only what does not fit on its own; the trash keeps what has not
really aged; a replica that cannot store a time is not copied to forever."""

import calendar
import errno
import os
import shutil
import stat
import threading
import time

import pytest

import sync
from conftest import append_during_copies, paths, run_cli, sync_once
from trees import BASE_MTIME_NS, Dir, File, assert_mirror, leftover_temp_files, make_tree


# --- 8. exit 0 means an exact mirror ----------------------------------------------


def test_once_exits_1_when_a_file_changed_while_it_was_copied(src, dst, log, monkeypatch):
    make_tree(src, {"growing.log": "first line\n"})
    append_during_copies(monkeypatch, src / "growing.log", "written during the copy\n")
    assert sync.main([str(src), str(dst), "1", str(log), "--once", "--workers", "1", "-q"]) == 1
    assert "changed while copying growing.log" in log.read_text()
    assert "replica is NOT yet an exact mirror" in log.read_text()
    monkeypatch.undo()
    assert sync.main([str(src), str(dst), "1", str(log), "--once", "-q"]) == 0
    assert_mirror(src, dst)


def test_once_exits_1_when_a_file_vanished_before_it_was_copied(src, dst, log, monkeypatch, capsys):
    make_tree(src, {"gone.tmp": "short-lived", "kept.txt": "k"})
    real_copy = sync._copy_file

    def vanish_first(sd, dd, name, *args):
        if name == "gone.tmp":
            os.unlink(src / name)
        return real_copy(sd, dd, name, *args)

    monkeypatch.setattr(sync, "_copy_file", vanish_first)
    assert sync.main([str(src), str(dst), "1", str(log), "--once", "--workers", "1", "-q"]) == 1
    assert "vanished before copying gone.tmp" in log.read_text()
    # Not an error, but the pass failed: even -q says why, in its summary.
    [said] = capsys.readouterr().err.splitlines()
    assert " WARNING pass finished " in said and said.endswith("vanished 1, errors 0; 1 bytes copied; "
                                                                  "replica is NOT yet an exact mirror")


# --- 9. a folder matched as a rename is verified -------------------------------------


def test_a_copied_then_edited_folder_is_not_mistaken_for_a_rename(src, dst):
    # cp -a album album-v2; a same-size edit that keeps the mtime (touch -r,
    # exiftool -P); rm -rf album: the match used to leave album's old bytes.
    make_tree(src, {"album": Dir({"cover.jpg": File(b"A" * 4096, mtime_ns=BASE_MTIME_NS + 7),
                                  "sub": Dir({"track.mp3": File(b"T" * 2048, mtime_ns=BASE_MTIME_NS + 9)})}),
                    "other": "o"})
    assert sync_once(src, dst)[0].exact
    shutil.copytree(src / "album", src / "album-v2", copy_function=shutil.copy2)
    for rel, data in (("cover.jpg", b"B" * 4096), ("sub/track.mp3", b"U" * 2048)):
        path = src / "album-v2" / rel
        kept = os.lstat(path)
        path.write_bytes(data)
        os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    shutil.rmtree(src / "album")
    result, events = sync_once(src, dst)
    assert result.exact
    assert paths(events, "move") == ["album-v2"], "the rename still saves the copy"
    assert paths(events, "update") == ["album-v2/cover.jpg", "album-v2/sub/track.mp3"]
    assert_mirror(src, dst)


def test_a_real_rename_still_copies_nothing(src, dst):
    make_tree(src, {"data": Dir({f"f{i}": File(os.urandom(1000), mtime_ns=BASE_MTIME_NS + i)
                                 for i in range(5)})})
    assert sync_once(src, dst)[0].exact
    (src / "data").rename(src / "data-renamed")
    result, events = sync_once(src, dst)
    assert [e.action for e in events] == ["move"] and result.bytes_copied == 0
    assert_mirror(src, dst)


# --- 10. a full disk while several copies run ----------------------------------------


@pytest.mark.parametrize("folder", ["", "deep/read-only"])
def test_a_full_disk_fails_only_what_does_not_fit_on_its_own(src, small_disk, monkeypatch, folder):
    # A 3 MiB file cannot fit in the 2 MiB replica; while its copy fills the
    # disk, the small files copied beside it fail too, although each fits.
    # (In a read-only folder, the retries open it below the root, make it
    # writable for the copy and give it back its mode and mtime.)
    dst = small_disk / "replica"
    small = {f"b{i}.txt": os.urandom(32 * 1024) for i in range(4)}
    files = {"a-big.bin": File(os.urandom(3 * 1024 * 1024)), **{n: File(d) for n, d in small.items()}}
    if folder:
        make_tree(src, {"deep": {"read-only": Dir(files, mode=0o555)}})
    else:
        make_tree(src, files)
    prefix = folder + "/" if folder else ""
    disk_full, small_tried = threading.Event(), threading.Event()
    real_copy_bytes = sync._copy_bytes

    def copy(fin, fout, size_hint, abort=None):
        if size_hint > 1024 * 1024:  # the large file, in a copy thread: fill the disk and hold it
            block = b"\0" * 65536
            try:
                while True:
                    os.write(fout, block)
            except OSError as err:
                assert err.errno == errno.ENOSPC
            disk_full.set()
            small_tried.wait(10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        disk_full.wait(10)
        try:
            return real_copy_bytes(fin, fout, size_hint, abort)
        finally:
            small_tried.set()

    monkeypatch.setattr(sync, "_copy_bytes", copy)
    result, events = sync_once(src, dst, workers=1)
    assert [(e.path, e.detail) for e in events if e.action == "error"] == [
        (prefix + "a-big.bin", "cannot copy file: No space left on device (ENOSPC)")]
    assert sorted(paths(events, "copy")) == sorted(prefix + name for name in small)
    for name, data in small.items():
        assert (dst / prefix / name).read_bytes() == data
    assert leftover_temp_files(dst) == []
    if folder:
        st, source = os.stat(dst / folder), os.stat(src / folder)
        assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime_ns == source.st_mtime_ns


@pytest.mark.parametrize("then", ["vanishes", "cannot be read"])
def test_a_file_left_for_a_space_retry_that_vanishes_or_fails_is_reported_as_such(src, small_disk, monkeypatch,
                                                                                then):
    dst = small_disk / "replica"
    make_tree(src, {"a-big.bin": os.urandom(3 * 1024 * 1024), "b.txt": "b"})
    real_copy_bytes, real_stat = sync._copy_bytes, os.stat

    def copy(fin, fout, size_hint, abort=None):
        if size_hint > 1024 * 1024:  # fails for space, then the file goes (or turns unreadable)
            if then == "vanishes":
                os.unlink(src / "a-big.bin")
            else:
                monkeypatch.setattr(os, "stat", stat_denied)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy_bytes(fin, fout, size_hint, abort)

    def stat_denied(path, *args, **kwargs):
        if not isinstance(path, int) and os.path.basename(os.fsdecode(path)) == "a-big.bin":  # by name or path
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(sync, "_copy_bytes", copy)
    result, events = sync_once(src, dst, workers=1)
    errors = [(e.path, e.detail) for e in events if e.action == "error"]
    if then == "vanishes":
        assert errors == [] and paths(events, "vanished") == ["a-big.bin"]
    else:
        assert errors == [("a-big.bin", "cannot copy file: Permission denied (EACCES)")]
    assert not result.exact and (dst / "b.txt").read_text() == "b"


# --- 12. the trash keeps what has not really aged ----------------------------------------


def stamp(days_ago):
    return time.strftime("%Y-%m-%d_%H%M%S", time.localtime(time.time() - days_ago * 86400)) + ".000"


def age(path, days_ago):
    t = time.time() - days_ago * 86400
    os.utime(path, (t, t))


def test_a_trash_folder_named_while_the_clock_was_wrong_is_not_pruned(src, dst, tmp_path):
    trash = tmp_path / "trash"
    skewed, old, newest = stamp(2000), stamp(400), stamp(1)
    make_tree(trash, {skewed: {"report.odt": "kept yesterday"}, old: {"a": "a"}, newest: {"b": "b"},
                      "2026-02-30_120000.000": {"x": "an impossible date: not a pass folder"}})
    age(trash / old / "a", 400)
    age(trash / old, 400)  # old by its name, its own time and its files: pruned
    for path in (trash / newest / "b", trash / newest, trash / skewed / "report.odt", trash / skewed):
        age(path, 0)  # the skewed folder: named 2000 days ago, but made (and its file written) today
    make_tree(src, {"f": "x"})
    result, events = sync_once(src, dst, trash=str(trash), trash_keep_days=30)
    assert paths(events, "prune") == [old]
    assert sorted(os.listdir(trash)) == sorted([skewed, newest, "2026-02-30_120000.000"])


def test_a_folder_named_and_dated_old_but_holding_new_files_is_kept(src, dst, tmp_path):
    # A clock that was wrong dates the folder and its mtime alike; the
    # files it kept were written before, by a right clock.
    trash = tmp_path / "trash"
    skewed, newest = stamp(3000), stamp(1)
    make_tree(trash, {skewed: {"docs": {"report.odt": "written this week"}}, newest: {}})
    age(trash / skewed / "docs" / "report.odt", 3)
    age(trash / skewed / "docs", 3000)
    age(trash / skewed, 3000)
    make_tree(src, {"f": "x"})
    result, events = sync_once(src, dst, trash=str(trash), trash_keep_days=30)
    assert paths(events, "prune") == [] and sorted(os.listdir(trash)) == sorted([skewed, newest])


def test_the_newest_pass_folder_is_never_pruned(src, dst, tmp_path):
    trash = tmp_path / "trash"
    only = stamp(900)
    make_tree(trash, {only: {"last.txt": "the only copy"}})
    age(trash / only / "last.txt", 900)
    age(trash / only, 900)
    make_tree(src, {"f": "x"})
    result, events = sync_once(src, dst, trash=str(trash), trash_keep_days=30)
    assert paths(events, "prune") == [] and os.listdir(trash) == [only]


def test_old_pass_folders_are_pruned_with_everything_in_them(src, dst, tmp_path):
    # Pass folders hold relative paths: folders in folders.
    trash = tmp_path / "trash"
    old, newest = stamp(90), stamp(1)
    make_tree(trash, {old: {"docs": {"2025": {"report.odt": "r"}}, "a.txt": "a"}, newest: {}})
    for path in (trash / old / "docs" / "2025" / "report.odt", trash / old / "a.txt", trash / old):
        age(path, 90)
    make_tree(src, {"f": "x"})
    result, events = sync_once(src, dst, trash=str(trash), trash_keep_days=30)
    assert result.exact and paths(events, "prune") == [old] and os.listdir(trash) == [newest]


def test_an_impossible_trash_folder_name_is_no_traceback(src, dst, log, tmp_path):
    trash = tmp_path / "trash"
    make_tree(trash, {"2026-02-30_120000.000": {"x": "x"}, "2026-13-01_000000.000": {}})
    make_tree(src, {"f": "x"})
    proc = run_cli(src, dst, 1, log, "--once", "--trash", trash, "--trash-keep", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and len(os.listdir(trash)) == 2


# --- 13. a replica that cannot store a time ------------------------------------------------


def test_times_the_replica_cannot_store_are_reported_once_and_not_copied_again(tmp_path, mounts):
    # ext4 with 128-byte inodes keeps whole seconds and stops in January 2038.
    src, drive = tmp_path / "src", tmp_path / "drive"
    far = calendar.timegm((2302, 1, 1, 0, 0, 0)) * 10**9
    make_tree(src, {"future.txt": File("from 2302", mtime_ns=far),
                    "now.txt": File("nanoseconds", mtime_ns=BASE_MTIME_NS),
                    "d": Dir({"f": "x"}, mtime_ns=far + 5 * 10**9)})
    drive.mkdir()
    mounts.image(drive, tmp_path / "small-inodes.img", mkfs=("mkfs.ext4", "-q", "-I", "128"))
    mirror = sync.Mirror(src, drive / "replica")
    events = []
    result = mirror.run_pass(events.append)
    assert result.exact
    clamped = sorted((e.path, e.detail) for e in events if e.action == "clamped")
    assert clamped == [("d", "2302-01-01 00:00:05 UTC is kept as 2038-01-19 03:14:07 UTC"),
                       ("future.txt", "2302-01-01 00:00:00 UTC is kept as 2038-01-19 03:14:07 UTC")]
    for again in range(2):
        events = []
        assert mirror.run_pass(events.append).exact
        assert events == [], f"pass {again + 2} did something"
    events = []
    assert sync.Mirror(src, drive / "replica").run_pass(events.append).exact
    assert [e.text() for e in events] == ["replica file system: ext4, times 1 s"], \
        "nor does a new run, which says once what it found"
