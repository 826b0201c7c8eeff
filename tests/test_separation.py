"""SOURCE, REPLICA and TRASH stay apart at every pass, whatever mounts and
links join them; a REPLICA whose drive went away is never refilled on the
disk underneath; a pass never deletes more than half of REPLICA, or empties
a replica folder whose source looks unmounted, without being told to.

All on real bind mounts, tmpfs and loop-mounted images (root, as in CI)."""

import os
import shutil

import pytest

import sync
from conftest import run_cli, sync_once
from trees import assert_mirror, make_tree, snapshot


def refusals(events):
    return [e.detail for e in events if e.action == "error"]


# --- 1. bind mounts: overlap found by identity, up front and in the walk ----------


def test_source_bind_mounted_from_inside_replica_is_refused(tmp_path, mounts, log):
    # mount --bind REPLICA/x SOURCE: a pass used to delete x, i.e. every source file.
    dst, src = tmp_path / "dst", tmp_path / "src"
    make_tree(dst, {"x": {"a.txt": "precious", "sub": {"b.txt": "more"}}, "other.txt": "o"})
    src.mkdir()
    mounts.bind(dst / "x", src)
    before = snapshot(dst)
    proc = run_cli(src, dst, 1, log, "--once")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"SOURCE '{src}' is inside REPLICA '{dst}' (through a mount); mirroring would delete it" \
        in proc.stderr
    assert snapshot(dst) == before and not log.exists()


def test_replica_bind_mounted_from_inside_source_is_refused(tmp_path, mounts, log):
    # mount --bind SOURCE/sub REPLICA: a pass used to delete from SOURCE and
    # then copy SOURCE into itself until it ran out of descriptors.
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {"top.txt": "t", "sub": {"inner.txt": "i", "deeper": {"d.txt": "d"}}})
    dst.mkdir()
    mounts.bind(src / "sub", dst)
    before = snapshot(src)
    proc = run_cli(src, dst, 1, log, "--once")
    assert proc.returncode == 2
    assert f"REPLICA '{dst}' is inside SOURCE '{src}' (through a mount)" in proc.stderr
    assert snapshot(src) == before


def test_source_mounted_deep_inside_replica_is_refused(tmp_path, mounts, log):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {"f": "x"})
    make_tree(dst, {"deep": {"mirror": {}}})
    mounts.bind(src, dst / "deep" / "mirror")
    before = snapshot(src)
    proc = run_cli(src, dst, 1, log, "--once")
    assert proc.returncode == 2 and "is inside REPLICA" in proc.stderr and "through a mount" in proc.stderr
    assert snapshot(src) == before


def test_trash_bind_mounted_from_inside_source_is_refused(tmp_path, mounts, log):
    src, dst, trash = tmp_path / "src", tmp_path / "dst", tmp_path / "trash"
    make_tree(src, {"f": "x", "t": {}})
    trash.mkdir()
    mounts.bind(src / "t", trash)
    before = snapshot(src)
    proc = run_cli(src, dst, 1, log, "--once", "--trash", trash)
    assert proc.returncode == 2
    assert f"TRASH '{trash}' is inside SOURCE '{src}' (through a mount)" in proc.stderr
    assert snapshot(src) == before


def test_a_replica_folder_that_is_source_is_never_entered_or_deleted(tmp_path, mounts, monkeypatch):
    # Where the mount table cannot tell (another OS, or a mount made after
    # the pass began), the walk itself compares identities.
    dst, src = tmp_path / "dst", tmp_path / "src"
    make_tree(dst, {"x": {"a.txt": "precious", "sub": {"b.txt": "more"}}})
    src.mkdir()
    mounts.bind(dst / "x", src)
    monkeypatch.setattr(sync, "MOUNTINFO", str(tmp_path / "no-mountinfo"))
    source_before = snapshot(src)
    result, events = sync_once(src, dst)
    assert result.refused and not result.exact
    assert refusals(events) == ["this folder is SOURCE, REPLICA or TRASH (or a folder above one of "
                                "them) seen again through a mount; it was left alone"]
    assert [e.path for e in events if e.action == "error"] == ["x"]
    assert snapshot(src) == source_before, "SOURCE lost files"
    assert not any(e.action in ("remove", "rmdir") for e in events)


def test_a_source_folder_that_is_replica_is_never_entered(tmp_path, mounts, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {"f": "x", "loop": {}})
    make_tree(dst, {"f": "x"})
    mounts.bind(dst, src / "loop")  # the source walk would copy REPLICA into itself
    monkeypatch.setattr(sync, "MOUNTINFO", str(tmp_path / "no-mountinfo"))
    result, events = sync_once(src, dst)
    assert result.refused and [e.path for e in events if e.action == "error"] == ["loop"]
    assert sorted(os.listdir(dst)) == ["f"], "nothing of REPLICA was copied into itself"


# --- 2. every precondition holds at the start of every pass ------------------------


def test_replica_link_repointed_at_source_parent_refuses_the_next_pass(tmp_path):
    # In loop mode a REPLICA symlink re-pointed at SOURCE's parent used to
    # make the next pass delete SOURCE.
    src, real, link = tmp_path / "src", tmp_path / "real-replica", tmp_path / "replica"
    make_tree(src, {"f": "x", "d": {"g": "y"}})
    real.mkdir()
    os.symlink(real, link)
    mirror = sync.Mirror(src, link)
    assert mirror.run_pass().exact
    os.unlink(link)
    os.symlink(tmp_path, link)
    before = snapshot(tmp_path)
    events = []
    result = mirror.run_pass(events.append)
    assert result.refused and result.errors == 1
    assert refusals(events) == [f"SOURCE '{src}' is inside REPLICA '{link}'; mirroring would delete it"]
    assert snapshot(tmp_path) == before
    os.unlink(link)
    os.symlink(real, link)
    assert mirror.run_pass().exact, "the next pass goes on once the link is right again"


def test_log_file_and_trash_are_checked_at_every_pass(tmp_path):
    src, dst, logs, trash = (tmp_path / n for n in ("src", "dst", "logs", "trash"))
    make_tree(src, {"f": "x"})
    logs.mkdir()
    link = tmp_path / "replica"
    os.symlink(dst, link)
    dst.mkdir()
    options = sync.Options(protect={"LOG_FILE": str(logs / "sync.log")}, trash=str(trash))
    mirror = sync.Mirror(src, link, options)
    assert mirror.run_pass().exact
    os.unlink(link)
    os.symlink(logs, link)  # REPLICA is now the log's folder
    events = []
    assert mirror.run_pass(events.append).refused
    assert refusals(events) == [f"LOG_FILE '{logs / 'sync.log'}' is inside REPLICA '{link}', where the "
                                "mirror would delete it; put it elsewhere"]
    assert os.listdir(logs) == []
    os.unlink(link)
    os.symlink(trash, link)  # REPLICA is now the trash
    events = []
    assert mirror.run_pass(events.append).refused
    assert "is the same folder as" in refusals(events)[0] or "is inside" in refusals(events)[0]


# --- 3. a REPLICA whose drive goes away --------------------------------------------


def mirror_onto_a_drive(tmp_path, mounts):
    """SOURCE, a loop-mounted ext4 drive, and a Mirror onto drive/data."""
    src, drive, image = tmp_path / "src", tmp_path / "drive", tmp_path / "disk.img"
    make_tree(src, {"f": "x", "d": {"g": "y"}})
    drive.mkdir()
    mounts.image(drive, image)
    return src, drive, image, sync.Mirror(src, drive / "data")


def test_replica_on_a_drive_that_goes_away_is_refused_and_recovers(tmp_path, mounts):
    src, drive, image, mirror = mirror_onto_a_drive(tmp_path, mounts)
    replica = drive / "data"
    assert mirror.run_pass().exact
    mounts.umount(drive)  # unplugged while the loop runs
    events = []
    result = mirror.run_pass(events.append)
    assert result.refused and not result.exact
    assert refusals(events) == [f"REPLICA '{replica}' is missing: the drive it is on may be unmounted; "
                                "nothing was created, and the next pass tries again"]
    assert os.listdir(drive) == [], "nothing was recreated on the disk underneath"
    mounts.image(drive, image)  # plugged in again
    events = []
    result = mirror.run_pass(events.append)
    assert result.exact and events == [], "the same drive: nothing to copy again"
    assert_mirror(src, replica)


def test_dry_runs_in_a_loop_do_not_plan_into_a_lost_drive(tmp_path, mounts):
    src, drive, image, mirror = mirror_onto_a_drive(tmp_path, mounts)
    assert mirror.run_pass().exact
    looking = sync.Mirror(src, drive / "data", sync.Options(dry_run=True))
    assert looking.run_pass().exact
    mounts.umount(drive)
    events = []
    assert looking.run_pass(events.append).refused
    assert [e.action for e in events] == ["error"], "no 'would copy' of everything"


def test_the_lock_follows_a_replica_whose_drive_came_back(tmp_path, mounts):
    # The lock held on the old REPLICA would not keep a second instance off
    # the new one: every pass makes sure it holds the lock of its REPLICA.
    src, drive, image, mirror = mirror_onto_a_drive(tmp_path, mounts)
    assert mirror.check(create=True, lock=True) is None
    assert mirror.run_pass().exact
    mounts.umount(drive, lazy=True)  # pulled out while the lock is held
    assert mirror.run_pass().refused
    mounts.image(drive, image)
    assert mirror.run_pass().exact
    with pytest.raises(sync.Refused, match="is locked by another sync.py"):
        os.close(sync.lock_replica(str(drive / "data")))
    mirror.unlock()
    os.close(sync.lock_replica(str(drive / "data")))


def test_replica_on_another_file_system_than_before_is_refused(tmp_path, mounts):
    src, drive, image, mirror = mirror_onto_a_drive(tmp_path, mounts)
    assert mirror.run_pass().exact
    mounts.umount(drive)
    (drive / "data").mkdir()  # someone made the folder on the disk underneath
    (drive / "data" / "mine.txt").write_text("not a replica file")
    events = []
    result = mirror.run_pass(events.append)
    assert result.refused
    assert "is now on another file system" in refusals(events)[0]
    assert "the drive may be unmounted" in refusals(events)[0]
    assert os.listdir(drive / "data") == ["mine.txt"], "nothing changed there"


def test_replica_below_an_unmounted_fstab_mount_point_is_refused(tmp_path, monkeypatch):
    # At boot, before the backup drive is mounted, REPLICA's parent exists:
    # /etc/fstab says a drive belongs there.
    src, drive = tmp_path / "src", tmp_path / "backup"
    make_tree(src, {"f": "x"})
    drive.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# comment\nUUID=1234 / ext4 defaults 0 1\nUUID=abcd {drive} ext4 noauto 0 2\n"
                     "/swapfile none swap sw 0 0\n")
    monkeypatch.setattr(sync, "FSTAB", str(fstab))
    result, events = sync_once(src, drive / "data")
    assert result.refused
    assert refusals(events) == [f"REPLICA '{drive / 'data'}' is on {drive}, which {fstab} lists as a "
                                "mount point, but nothing is mounted there: the drive may be unmounted; "
                                "nothing was changed"]
    assert os.listdir(drive) == []


# --- 4. the guard against mass deletion --------------------------------------------


def test_an_unmounted_drive_inside_source_does_not_empty_its_replica(tmp_path, mounts):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {"keep.txt": "k", "media": {}, "big": {f"b{i}": "x" for i in range(800)}})
    mounts.tmpfs(src / "media")
    make_tree(src / "media", {"photos": {f"p{i:03}.jpg": f"photo {i}" for i in range(150)}})
    assert sync_once(src, dst)[0].exact
    mounts.umount(src / "media")  # the drive is gone; its mount point is an empty folder
    (src / "keep.txt").write_text("changed meanwhile")
    before = snapshot(dst / "media")
    result, events = sync_once(src, dst)
    assert result.refused and not result.exact
    assert [(e.path, e.detail) for e in events if e.action == "error"] == [(
        "media", "the source folder is empty, but the replica folder holds 151 entries: a drive "
        "that is not mounted looks like this, so nothing in it was changed.")]
    assert [e.advice for e in events if e.action == "error"] == ["allow_mass_delete"]
    assert snapshot(dst / "media") == before
    assert (dst / "keep.txt").read_text() == "changed meanwhile", "the rest of the pass goes on"
    result, events = sync_once(src, dst, allow_mass_delete=True)
    assert result.exact and os.listdir(dst / "media") == []


def test_a_stray_file_in_an_unmounted_mount_point_does_not_empty_the_replica(src, dst):
    # The folder is not empty (a file was written into the bare mount point),
    # but mirroring it would delete most of REPLICA.
    make_tree(src, {"media": {f"d{i}": {f"f{j}": "x" for j in range(30)} for i in range(10)}, "a": "a"})
    assert sync_once(src, dst)[0].exact
    shutil.rmtree(src / "media")
    make_tree(src, {"media": {"stray.txt": "written while unmounted"}})
    before = snapshot(dst / "media")
    result, events = sync_once(src, dst)
    assert result.refused
    assert [(e.path, e.detail) for e in events if e.action == "error"] == [(
        "media", "mirroring this folder would delete 310 of the 312 entries in REPLICA, more than "
        "half: a wrong REPLICA or a drive that is not mounted looks like this, so nothing in this "
        "folder was changed.")]
    assert [e.advice for e in events if e.action == "error"] == ["allow_mass_delete"]
    assert snapshot(dst / "media") == before, "not even the stray file was copied in"


def test_a_wrong_replica_path_is_not_emptied(tmp_path, log):
    # REPLICA typed wrong: a home folder instead of the backup folder.
    src, home = tmp_path / "Documents", tmp_path / "home"
    make_tree(src, {f"doc{i}.txt": "d" for i in range(20)})
    make_tree(home, {".config": {f"c{i}": "c" for i in range(120)}, "photos": {f"p{i}": "p" for i in range(200)},
                     "notes.txt": "mine"})
    before = snapshot(home)
    proc = run_cli(src, home, 1, log, "--once")
    assert proc.returncode == 3
    assert ("mirroring this folder would delete 323 of the 323 entries in REPLICA, more than half: a "
            "wrong REPLICA or a drive that is not mounted looks like this, so nothing in this folder was "
            "changed. If that is intended, run once with --allow-mass-delete (or with --max-delete at "
            "least the number of deletions you expect).") in proc.stderr
    assert snapshot(home) == before, "nothing at all was changed"
    proc = run_cli(src, home, 1, log, "--once", "--max-delete", "400")
    assert proc.returncode == 0, "an explicit --max-delete replaces the guard"
    assert_mirror(src, home)


def test_large_deletions_within_the_limits_go_ahead(src, dst):
    make_tree(src, {f"d{i}": {f"f{j}": "x" for j in range(100)} for i in range(10)})
    assert sync_once(src, dst)[0].exact
    for i in range(4):  # 404 entries of 1010: a lot, but less than half
        shutil.rmtree(src / f"d{i}")
    result, events = sync_once(src, dst)
    assert result.exact and len([e for e in events if e.action in ("remove", "rmdir")]) == 404
    assert_mirror(src, dst)


def test_the_guard_holds_in_dry_runs_and_with_workers(src, dst):
    make_tree(src, {"media": {f"d{i}": {f"f{j}": "x" for j in range(30)} for i in range(10)},
                    **{f"w{i}": {"f": "x"} for i in range(12)}})
    assert sync_once(src, dst)[0].exact
    shutil.rmtree(src / "media")
    (src / "media").mkdir()
    before = snapshot(dst / "media")
    for options in (dict(dry_run=True), dict(workers=3)):
        result, events = sync_once(src, dst, **options)
        assert result.refused and [e.path for e in events if e.action == "error"] == ["media"]
        assert not [e for e in events if e.action in ("remove", "rmdir")]
        assert snapshot(dst / "media") == before
