"""What one pass does, called in-process through sync.run_pass."""

import errno
import os
import resource
import shutil
import stat
import subprocess
import sys

import pytest

import sync
from conftest import append_during_copies, paths, sync_once
from trees import BASE_MTIME_NS, Dir, Fifo, File, Link, assert_mirror, leftover_temp_files, make_tree, snapshot

RICH_TREE = {
    "a.txt": "alpha",
    "empty.bin": b"",
    "exec.sh": File("#!/bin/sh\n", mode=0o755),
    "private": File("secret", mode=0o600),
    "readonly.txt": File("ro", mode=0o444),
    "docs": {
        "guide.md": "# guide\n" * 100,
        "deep": {"deeper": {"deepest": {"leaf.txt": "leaf"}}},
        "empty-dir": {},
    },
    "locked": Dir({"inside.txt": "x"}, mode=0o555),
    "links": {
        "rel": Link("../a.txt"),
        "abs": Link("/etc/passwd"),
        "dangling": Link("does/not/exist"),
        "to-dir": Link("../docs"),
    },
    "big.bin": os.urandom(3 * 1024 * 1024 + 17),
    "ünïcode ñame.txt": "unicode",
    "with space": {"and\nnewline": "nl"},
}


def test_initial_copy_mirrors_everything(src, dst):
    make_tree(src, RICH_TREE, root_mode=0o750)
    before = snapshot(src)
    result, events = sync_once(src, dst)
    assert result.errors == 0 and result.exact
    assert_mirror(src, dst)
    assert snapshot(src) == before, "SOURCE must only be read"
    assert "docs/deep/deeper/deepest/leaf.txt" in paths(events, "copy")
    assert "docs/empty-dir" in paths(events, "mkdir")
    assert "links/dangling" in paths(events, "link")
    assert result.bytes_copied == sum(len(v[1]) for v in before.values() if v[0] == "file")


def test_second_pass_changes_nothing(src, dst):
    make_tree(src, RICH_TREE)
    sync_once(src, dst)
    replica_before = snapshot(dst)
    result, events = sync_once(src, dst)
    assert events == [] and result.exact
    assert snapshot(dst) == replica_before


def test_nanosecond_mtimes_are_kept(src, dst):
    make_tree(src, {"f": File("x", mtime_ns=1_234_567_890_987_654_321)})
    sync_once(src, dst)
    assert os.lstat(dst / "f").st_mtime_ns == 1_234_567_890_987_654_321


def test_extra_replica_entries_are_removed(src, dst):
    make_tree(src, {"keep.txt": "k"})
    make_tree(dst, {"keep.txt": "k", "old.txt": "o", "olddir": {"x": {"y": "z"}, "l": Link("/")},
                    "stray-link": Link("keep.txt"), "fifo": Fifo()})
    result, events = sync_once(src, dst)
    assert_mirror(src, dst)
    assert paths(events, "remove") == ["fifo", "old.txt", "olddir/l", "olddir/x/y", "stray-link"]
    assert paths(events, "rmdir") == ["olddir", "olddir/x"]


def test_changed_file_is_updated(src, dst):
    make_tree(src, {"f.txt": "version 1"})
    sync_once(src, dst)
    make_tree(src, {"g": "new"})
    with open(src / "f.txt", "w") as f:
        f.write("version 2, longer")
    result, events = sync_once(src, dst)
    assert paths(events, "update") == ["f.txt"] and paths(events, "copy") == ["g"]
    assert_mirror(src, dst)


def test_file_restored_to_an_older_version_is_copied_back(src, dst):
    make_tree(src, {"f.txt": File("new", mtime_ns=BASE_MTIME_NS)})
    make_tree(dst, {"f.txt": File("NEW", mtime_ns=BASE_MTIME_NS + 10**9)})  # replica newer
    result, events = sync_once(src, dst)
    assert paths(events, "update") == ["f.txt"]
    assert (dst / "f.txt").read_text() == "new"


def test_equal_size_and_mtime_means_current_unless_checksum(src, dst):
    make_tree(src, {"f": File("same-size-AAA")})
    make_tree(dst, {"f": File("same-size-BBB")})  # same size and mtime, other bytes
    result, events = sync_once(src, dst)
    assert events == [] and (dst / "f").read_text() == "same-size-BBB"
    result, events = sync_once(src, dst, checksum=True)
    assert paths(events, "update") == ["f"]
    assert_mirror(src, dst)
    result, events = sync_once(src, dst, checksum=True)
    assert events == []


def test_permission_change_alone_is_applied_in_place(src, dst):
    make_tree(src, {"f": File("data", mode=0o644), "d": Dir({}, mode=0o755)})
    sync_once(src, dst)
    inode = os.lstat(dst / "f").st_ino
    os.chmod(src / "f", 0o600)
    os.chmod(src / "d", 0o700)
    result, events = sync_once(src, dst)
    assert paths(events, "attrs") == ["d", "f"] and not paths(events, "update")
    assert os.lstat(dst / "f").st_ino == inode
    assert_mirror(src, dst)


def test_hard_linked_replica_file_is_replaced_not_chmodded(src, dst, tmp_path):
    # A second name for the replica file outside the replica must not change.
    make_tree(src, {"f": File("data", mode=0o600)})
    make_tree(dst, {"f": File("data", mode=0o644)})
    os.link(dst / "f", tmp_path / "outside")
    sync_once(src, dst)
    assert_mirror(src, dst)
    assert stat.S_IMODE(os.lstat(tmp_path / "outside").st_mode) == 0o644


@pytest.mark.parametrize("old, new", [
    ("data", {"inner": "x"}),                  # file -> directory
    ({"inner": {"deep": "x"}}, "data"),         # directory -> file
    ("data", Link("target")),                   # file -> link
    (Link("target"), "data"),                   # link -> file
    ({"inner": "x"}, Link("..")),               # directory -> link
    (Link(".."), {"inner": "x"}),               # link -> directory
    (Link("a"), Link("b")),                     # link target changes
])
def test_type_changes_replace_the_replica_entry(src, dst, old, new):
    make_tree(src, {"x": old})
    sync_once(src, dst)
    assert_mirror(src, dst)
    shutil.rmtree(src)
    make_tree(src, {"x": new})
    result, _ = sync_once(src, dst)
    assert result.exact
    assert_mirror(src, dst)


def test_links_are_never_followed(src, dst, tmp_path):
    outside = tmp_path / "outside"
    make_tree(outside, {"victim.txt": "do not touch"})
    before = snapshot(outside)
    make_tree(src, {"l": Link(str(outside)), "d": {"f": "x"}})
    # The replica holds links where the source has a directory and a file.
    make_tree(dst, {"d": Link(str(outside)), "victim.txt": Link(str(outside / "victim.txt"))})
    sync_once(src, dst)
    assert_mirror(src, dst)
    assert snapshot(outside) == before


def test_read_only_directory_gets_its_mode_after_its_contents(src, dst):
    make_tree(src, {"ro": Dir({"a": "1"}, mode=0o555)})
    sync_once(src, dst)
    assert_mirror(src, dst)
    # Change what is inside the read-only directory: it must still be updated.
    os.chmod(src / "ro", 0o755)
    (src / "ro" / "a").write_text("22")
    (src / "ro" / "b").write_text("3")
    os.chmod(src / "ro", 0o555)
    result, _ = sync_once(src, dst)
    assert result.exact
    assert_mirror(src, dst)


def test_leftover_temporary_files_are_removed_and_never_copied(src, dst):
    temp = ".syncpy-0123456789abcdef.tmp"
    make_tree(src, {"f": "x", temp: "half-written by another sync.py"})
    make_tree(dst, {"sub": {temp: "left by a killed pass"}, temp: "also left"})
    result, events = sync_once(src, dst)
    assert sorted(paths(events, "temp")) == [temp, f"sub/{temp}"]
    assert leftover_temp_files(dst) == []
    assert sorted(os.listdir(dst)) == ["f"]


def test_failed_copy_leaves_old_version_and_no_temporary_file(src, dst, monkeypatch):
    make_tree(src, {"f": "old"})
    sync_once(src, dst)
    (src / "f").write_text("new content")

    def broken(fin, fout, size_hint, abort=None):
        os.write(fout, b"partial")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sync, "_copy_bytes", broken)
    result, events = sync_once(src, dst)
    assert result.errors == 1 and not result.exact
    assert [e.detail for e in events if e.action == "error"] == ["cannot copy file: Input/output error (EIO)"]
    assert (dst / "f").read_text() == "old"
    assert leftover_temp_files(dst) == []
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_special_files_are_skipped_with_a_warning_and_never_opened(src, dst):
    # Opening a FIFO for reading would block this test forever.
    make_tree(src, {"pipe": Fifo(), "f": "x"})
    make_tree(dst, {"pipe": "a file where the source has a FIFO"})
    result, events = sync_once(src, dst)
    assert [(e.action, e.path, e.detail) for e in events if e.action == "skip"] == [("skip", "pipe", "FIFO")]
    assert result.exact
    assert sorted(os.listdir(dst)) == ["f"]


def test_fifo_swapped_in_after_listing_does_not_hang(src, dst, monkeypatch):
    make_tree(src, {"f": "x"})
    real_scan = sync._scan

    def scan_then_swap(d):
        entries, failed = real_scan(d)
        if "f" in entries and not os.path.lexists(dst / "f"):
            os.unlink(src / "f")
            os.mkfifo(src / "f")
        return entries, failed

    monkeypatch.setattr(sync, "_scan", scan_then_swap)
    result, events = sync_once(src, dst)
    assert [(e.action, e.path) for e in events] == [("skip", "f")]


def test_source_file_vanishing_before_copy_is_info_not_error(src, dst, monkeypatch):
    make_tree(src, {"f": "x", "g": "y"})
    real_copy = sync._copy_file

    def vanish_first(sd, dd, name, *args):
        if name == "f":
            os.unlink(src / "f")
        return real_copy(sd, dd, name, *args)

    monkeypatch.setattr(sync, "_copy_file", vanish_first)
    result, events = sync_once(src, dst)
    assert result.errors == 0
    assert [(e.action, e.path) for e in events] == [("vanished", "f"), ("copy", "g")]


def test_source_changing_during_copy_is_not_recorded_as_current(src, dst, monkeypatch):
    make_tree(src, {"f": "first"})
    append_during_copies(monkeypatch, src / "f", " and more")
    result, events = sync_once(src, dst)
    assert paths(events, "changed") == ["f"] and not result.exact
    assert os.lstat(dst / "f").st_mtime_ns != os.lstat(src / "f").st_mtime_ns
    monkeypatch.undo()
    result, events = sync_once(src, dst)
    assert paths(events, "update") == ["f"]
    assert_mirror(src, dst)


def test_missing_source_deletes_nothing(src, dst, tmp_path):
    make_tree(src, {"f": "x"})
    sync_once(src, dst)
    before = snapshot(dst)
    result, events = sync_once(tmp_path / "gone", dst)
    assert result.errors == 1 and not result.exact
    assert "cannot open SOURCE" in events[0].detail
    assert snapshot(dst) == before


def test_missing_replica_is_created_but_never_its_parents(src, tmp_path):
    make_tree(src, {"f": "x"})
    dst = tmp_path / "not" / "yet" / "there"
    result, events = sync_once(src, dst)
    assert result.refused and not result.exact
    assert [e.action for e in events] == ["error"] and "does not exist (is the drive mounted?)" in events[0].detail
    assert not (tmp_path / "not").exists()
    dst.parent.mkdir(parents=True)
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_dry_run_reports_everything_and_changes_nothing(src, dst):
    make_tree(src, {"new.txt": "n", "changed.txt": "new", "newdir": {"inner": {"f": "1"}},
                    "l": Link("new.txt")})
    make_tree(dst, {"changed.txt": "old!", "stale": {"x": "1"}, "gone.txt": "g"})
    before_src, before_dst = snapshot(src), snapshot(dst)
    result, events = sync_once(src, dst, dry_run=True)
    assert snapshot(src) == before_src and snapshot(dst) == before_dst
    seen = sorted((e.action, e.path) for e in events)
    assert seen == [("copy", "new.txt"), ("copy", "newdir/inner/f"), ("link", "l"),
                    ("mkdir", "newdir"), ("mkdir", "newdir/inner"),
                    ("remove", "gone.txt"), ("remove", "stale/x"), ("rmdir", "stale"),
                    ("update", "changed.txt")]
    # ...and a real pass does exactly what the dry run said.
    result, real = sync_once(src, dst)
    assert sorted((e.action, e.path) for e in real) == seen


def test_dry_run_into_missing_replica_creates_nothing(src, tmp_path):
    make_tree(src, {"d": {"f": "x"}})
    dst = tmp_path / "new-replica"
    result, events = sync_once(src, dst, dry_run=True)
    assert not dst.exists()
    assert sorted((e.action, e.path) for e in events) == [("copy", "d/f"), ("mkdir", "d")]


def test_stop_request_ends_the_pass_early(src, dst):
    make_tree(src, {f"f{i:02}": str(i) for i in range(20)})
    calls = []

    def stop_after_five():
        calls.append(1)
        return len(calls) > 5

    result = sync.run_pass(src, dst, sync.Options(), should_stop=stop_after_five)
    assert result.interrupted and not result.exact
    assert 0 < len(os.listdir(dst)) < 20
    assert leftover_temp_files(dst) == []


@pytest.fixture
def deep_cleanup(tmp_path):
    yield
    # shutil.rmtree before Python 3.12 recurses and cannot remove such a tree.
    subprocess.run(["rm", "-rf", str(tmp_path / "src"), str(tmp_path / "dst")], check=True)


@pytest.mark.skipif(not sync._DIR_FD, reason="the path-based fallback (Windows) is bound by path length")
def test_deep_tree_beyond_recursion_limit_and_path_max(src, dst, deep_cleanup):
    depth = sys.getrecursionlimit() + 50
    name = "d" * 8  # 1050 levels x 9 bytes > PATH_MAX (4096)
    # Build it with directory descriptors: the path is too long for one call.
    fd = os.open(src, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"bottom")
    os.close(leaf)
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * depth:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * depth), hard))
    result, events = sync_once(src, dst)
    assert result.exact, [e for e in events if e.action == "error"][:3]
    copied = paths(events, "copy")
    assert copied == ["/".join([name] * depth + ["leaf.txt"])]
    # And removing it again is just as deep.
    subprocess.run(["rm", "-rf", str(src / name)], check=True)
    result, events = sync_once(src, dst, allow_empty_source=True)
    assert result.exact and len(paths(events, "rmdir")) == depth


# --- moves and renames inside SOURCE ---------------------------------------------


def inode(path):
    return os.lstat(path).st_ino


def test_renamed_directory_is_moved_not_copied(src, dst):
    make_tree(src, {"photos": {"a.jpg": os.urandom(5000), "sub": {"b.jpg": os.urandom(7000)}}, "k": "k"})
    os.utime(src / "photos", ns=(0, 1_700_000_000_123_456_789))
    sync_once(src, dst)
    before = inode(dst / "photos" / "sub" / "b.jpg")
    os.rename(src / "photos", src / "pictures")
    result, events = sync_once(src, dst)
    assert [(e.action, e.path, e.detail) for e in events] == [("move", "pictures", "photos")]
    assert inode(dst / "pictures" / "sub" / "b.jpg") == before
    assert_mirror(src, dst)


def test_renamed_directory_with_changes_inside_is_moved_then_fixed(src, dst):
    make_tree(src, {"d1": {"a": "1", "b": "2"}, "k": "k"})
    os.utime(src / "d1", ns=(0, 1_700_000_000_000_000_001))
    sync_once(src, dst)
    os.rename(src / "d1", src / "d2")
    stamp = os.lstat(src / "d2").st_mtime_ns
    (src / "d2" / "a").write_text("changed")
    os.unlink(src / "d2" / "b")
    os.utime(src / "d2", ns=(0, stamp))  # as if the edits came before the rename
    expected = [("move", "d2"), ("remove", "d2/b"), ("update", "d2/a")]
    result, dry = sync_once(src, dst, dry_run=True)
    assert [(e.action, e.path) for e in dry] == expected
    result, real = sync_once(src, dst)
    assert [(e.action, e.path) for e in real] == expected
    assert_mirror(src, dst)


def test_renamed_file_is_moved_after_its_bytes_are_compared(src, dst):
    make_tree(src, {"big.iso": File(os.urandom(100_000), mtime_ns=1_700_000_000_000_000_007), "k": "k"})
    sync_once(src, dst)
    before = inode(dst / "big.iso")
    os.rename(src / "big.iso", src / "renamed.iso")
    result, events = sync_once(src, dst)
    assert [(e.action, e.path, e.detail) for e in events] == [("move", "renamed.iso", "big.iso")]
    assert inode(dst / "renamed.iso") == before
    assert_mirror(src, dst)


def test_same_size_and_mtime_under_another_name_is_not_taken_for_a_move(src, dst):
    stamp = 1_700_000_000_000_000_009
    make_tree(src, {"new.txt": File("AAAA", mtime_ns=stamp), "k": "k"})
    make_tree(dst, {"old.txt": File("BBBB", mtime_ns=stamp), "k": "k"})
    result, events = sync_once(src, dst)
    assert sorted(e.action for e in events) == ["copy", "remove"]
    assert_mirror(src, dst)


def test_whole_second_times_are_never_matched(src, dst):
    make_tree(src, {"d": Dir({"f": "x"}, mtime_ns=1_700_000_000_000_000_000), "k": "k"})
    sync_once(src, dst)
    os.rename(src / "d", src / "e")
    result, events = sync_once(src, dst)
    assert "move" not in [e.action for e in events]
    assert_mirror(src, dst)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_folders_lines_come_in_the_documented_order(src, dst, monkeypatch, workers):
    # README, Order: renames, removals, then links and new subfolders, then
    # files, each in name order; then the subfolders.  Names alternate
    # between kinds, and settling every 2 queued files (not 256) shows
    # whether a batch of copies slips in among the links.
    monkeypatch.setattr(sync, "PENDING_LIMIT", 2)
    make_tree(src, {"a": "a", "b0": "x", "c": "c", "f": Link("a"), "g": "g", "m": File("mm" * 500, mtime_ns=7),
                    "sub": {"y": "y"}, "zz": "zz", "zz-dir": {"q": "q"}})
    sync_once(src, dst)
    (src / "a").write_text("a changed")
    (src / "b").symlink_to("c")
    os.chmod(src / "c", 0o600)
    (src / "d").mkdir()
    (src / "d" / "x").write_text("x")
    (src / "e").write_text("new")
    (src / "f").unlink()
    (src / "f").symlink_to("g")
    (src / "g").write_text("g changed")
    (src / "h").write_text("new")
    os.rename(src / "m", src / "n")
    (src / "sub" / "y").write_text("y changed")
    (src / "b0").unlink()
    (src / "zz").unlink()
    shutil.rmtree(src / "zz-dir")
    result, events = sync_once(src, dst, workers=workers)
    assert [(e.action, e.path) for e in events] == [
        ("move", "n"), ("remove", "b0"), ("remove", "zz"), ("remove", "zz-dir/q"), ("rmdir", "zz-dir"),
        ("link", "b"), ("mkdir", "d"), ("relink", "f"),
        ("update", "a"), ("attrs", "c"), ("copy", "e"), ("update", "g"), ("copy", "h"),
        ("copy", "d/x"), ("update", "sub/y")]
    assert result.exact
    assert_mirror(src, dst)
