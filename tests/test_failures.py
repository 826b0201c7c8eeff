"""A failure injected on each path of a pass: each is reported in its own
words with its path, nothing else is touched, the rest of the pass goes on,
and the next pass repairs it."""

import errno
import os
import stat

import sync
from conftest import sync_once
from trees import Dir, File, assert_mirror, make_tree, snapshot

DENIED = PermissionError(errno.EACCES, "Permission denied")


def errors(events):
    return [(e.path, e.detail) for e in events if e.action == "error"]


def refuse_chmod_of(monkeypatch, path):
    """Make every chmod of this folder through a descriptor fail with EPERM."""
    folder, real_chmod = os.stat(path), os.chmod

    def chmod(target, mode, *args, **kwargs):
        if isinstance(target, int) and os.path.samestat(os.fstat(target), folder):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)


def test_reasons_name_the_system_error_or_say_what_happened():
    assert sync._reason(DENIED) == "Permission denied (EACCES)"
    assert sync._reason(OSError(999999, "Strange")) == "Strange"
    assert sync._reason(OSError("no errno here")) == "no errno here"
    assert sync._reason(ValueError("bad value")) == "bad value"
    assert sync._reason(KeyError()) == "KeyError"


def test_entries_that_cannot_be_examined_are_reported_and_their_replica_entries_kept(src, dst, monkeypatch):
    make_tree(src, {"x": "x", "y": "y", "z": "z"})
    assert sync_once(src, dst)[0].exact
    for name in ("x", "y"):
        (src / name).write_text("changed")
    real_scan = sync._scan
    source, replica = os.stat(src), os.stat(dst)

    def scan(d):
        entries, failed = real_scan(d)
        for side, name in ((source, "x"), (replica, "y")):
            if os.path.samestat(os.stat(d), side):
                del entries[name]
                failed.append((name, DENIED))
        return entries, failed

    monkeypatch.setattr(sync, "_scan", scan)
    (src / "z").write_text("changed too")
    result, events = sync_once(src, dst)
    assert errors(events) == [("x", "cannot read: Permission denied (EACCES)"),
                              ("y", "cannot examine replica entry: Permission denied (EACCES)")]
    assert (dst / "x").read_text() == "x" and (dst / "y").read_text() == "y", "left as they were"
    assert (dst / "z").read_text() == "changed too"
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_a_folder_that_cannot_be_restricted_is_not_entered(src, dst, monkeypatch):
    make_tree(src, {"private": {"a": "a"}, "other": {"b": "b"}})
    assert sync_once(src, dst)[0].exact
    (src / "private" / "new.txt").write_text("secret")
    os.chmod(src / "private", 0o700)
    (src / "other" / "b").write_text("changed")
    refuse_chmod_of(monkeypatch, dst / "private")
    before = snapshot(dst / "private")
    result, events = sync_once(src, dst)
    assert errors(events) == [("private", "cannot restrict the permissions of the replica directory: "
                                          "Operation not permitted (EPERM)")]
    assert snapshot(dst / "private") == before, "nothing was written into the folder"
    assert (dst / "other" / "b").read_text() == "changed"
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_a_folder_that_cannot_be_created_is_reported_and_skipped(src, dst, monkeypatch):
    make_tree(src, {"new": {"inside": "i"}, "z.txt": "z"})
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.fsdecode(path) == "new":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    result, events = sync_once(src, dst)
    assert errors(events) == [("new", "cannot create directory: Read-only file system (EROFS)")]
    assert os.listdir(dst) == ["z.txt"]
    assert not result.exact
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_a_replica_folder_that_cannot_be_opened_for_deletion_stays(src, dst, monkeypatch):
    make_tree(src, {"gone": {"f": "f"}, "kept": "k"})
    assert sync_once(src, dst)[0].exact
    os.unlink(src / "gone" / "f")
    os.rmdir(src / "gone")
    real_open = sync._open_dir

    def open_dir(d, name):
        if name == "gone":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(d, name)

    monkeypatch.setattr(sync, "_open_dir", open_dir)
    result, events = sync_once(src, dst)
    assert errors(events) == [("gone", "cannot list replica directory: Permission denied (EACCES)")]
    assert (dst / "gone" / "f").exists()
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)


def test_a_replica_file_that_cannot_be_given_its_mode_is_reported(src, dst, monkeypatch):
    make_tree(src, {"f": File("x", mode=0o644)})
    assert sync_once(src, dst)[0].exact
    os.chmod(src / "f", 0o600)
    monkeypatch.setattr(sync, "_set_file_attrs", lambda *args: (_ for _ in ()).throw(DENIED))
    result, events = sync_once(src, dst)
    assert errors(events) == [("f", "cannot set permissions: Permission denied (EACCES)")]
    assert stat.S_IMODE(os.stat(dst / "f").st_mode) == 0o644
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact


def test_a_read_only_folder_moved_to_the_trash_keeps_its_mode(src, dst, tmp_path):
    # Moving a folder to another parent rewrites its "..": it needs u+w for
    # the move and gets its own mode back.
    make_tree(src, {"ro": Dir({"f": "f"}, mode=0o555), "x": "x"})
    assert sync_once(src, dst)[0].exact
    os.chmod(src / "ro", 0o755)
    os.unlink(src / "ro" / "f")
    os.rmdir(src / "ro")
    trash = tmp_path / "trash"
    result, events = sync_once(src, dst, trash=str(trash))
    assert result.exact and [(e.action, e.path) for e in events] == [("rmdir", "ro")]
    assert events[0].trash.endswith("/ro")
    [kept] = list(trash.glob("*/ro"))
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o555 and (kept / "f").read_text() == "f"
    assert_mirror(src, dst)


def test_a_folder_that_cannot_be_made_writable_is_reported_once_and_left(src, dst, monkeypatch):
    # x changed kind (file -> folder) inside a read-only folder whose
    # replica cannot be made writable: one error, and x stays as it was.
    make_tree(src, {"ro": Dir({"x": "file"}, mode=0o555)})
    assert sync_once(src, dst)[0].exact
    os.chmod(src / "ro", 0o755)
    os.unlink(src / "ro" / "x")
    os.mkdir(src / "ro" / "x")
    os.chmod(src / "ro", 0o555)
    refuse_chmod_of(monkeypatch, dst / "ro")
    result, events = sync_once(src, dst)
    assert errors(events) == [("ro", "cannot make replica directory writable: Operation not permitted (EPERM)")]
    assert (dst / "ro" / "x").read_text() == "file"
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact
    assert_mirror(src, dst)
