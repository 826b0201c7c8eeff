"""Metadata fidelity: a root-run mirror restores like ``rsync -aHAXS``.

Owners, groups, set-id and sticky bits, extended attributes, access and
default ACLs, hard links across folders, sparse files and links with their
own owner and time, on a loop-mounted ext4 image, checked with rsync itself
as the oracle: ``rsync -aHAXSc --delete -n -i`` must find nothing to do.
"""

import os
import shutil
import stat
import subprocess

import pytest

import sync
from conftest import paths, sync_once
from trees import assert_mirror, make_tree

RSYNC, SETFACL = shutil.which("rsync"), shutil.which("setfacl")
MiB = 1 << 20


@pytest.fixture
def tools():
    # .ci/run installs both (apt); a machine without them cannot check this.
    missing = [name for name, path in (("rsync", RSYNC), ("setfacl", SETFACL)) if path is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: install them (apt-get install rsync acl)")


@pytest.fixture
def ext4(tmp_path, mounts, tools):
    disk = tmp_path / "ext4"
    disk.mkdir()
    mounts.image(disk, tmp_path / "ext4.img", size="192M")
    return disk


def oracle(src, dst, flags="-aHAXSc"):
    """What rsync would still change to make dst a mirror of src ([] : nothing)."""
    proc = subprocess.run([RSYNC, flags, "--numeric-ids", "--delete", "-n", "-i", f"{src}/", f"{dst}/"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def setfacl(*args):
    subprocess.run([SETFACL, *map(str, args)], check=True)


def give(path, uid, gid, bits=None):
    os.chown(path, uid, gid, follow_symlinks=False)
    if bits is not None:
        os.chmod(path, bits)  # after the chown, which clears set-id bits


def sparse(path, size=64 * MiB, data_at=8 * MiB, data=b"x" * 8192):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(data_at)
        f.write(data)


def allocated(path):
    return os.lstat(path).st_blocks * 512


def rich_tree(src):
    """Everything a root-run backup of /srv or /home meets."""
    make_tree(src, {"a.txt": "hello", "prog": "#!/bin/sh\n", "sgid-prog": "#!/bin/sh\n",
                    "d1": {"f": "shared bytes", "x": "y"}, "d2": {}, "tmp": {}, "team": {"doc": "d"},
                    "acl": {"inherits": "i"}, "sub": {"deeper": {}}})
    give(src / "a.txt", 1000, 1000)
    give(src / "prog", 1000, 1000, 0o4755)  # a user's setuid program: kept as such
    give(src / "sgid-prog", 0, 1001, 0o2755)
    give(src / "tmp", 0, 0, 0o1777)
    give(src / "team", 0, 1000, 0o2775)
    give(src / "d1", 1001, 1002)
    give(src / "team" / "doc", 1002, 1000, 0o664)
    os.setxattr(src / "a.txt", "user.note", b"kept")
    os.setxattr(src / "d1", "user.folder", b"too")
    os.setxattr(src / "d1" / "x", "trusted.root-only", b"secret")
    setfacl("-m", "u:1000:rwx", src / "a.txt")
    setfacl("-m", "u:1001:rx", src / "acl")
    setfacl("-d", "-m", "g:1000:rx", src / "acl")
    # Hard links: a group across three folders, and a pair in one folder.
    os.link(src / "d1" / "f", src / "d2" / "g")
    os.link(src / "d1" / "f", src / "sub" / "deeper" / "h")
    os.link(src / "a.txt", src / "a-again.txt")
    sparse(src / "disk.img")
    os.symlink("a.txt", src / "link")
    os.utime(src / "link", ns=(1_500_000_000_123_456_789,) * 2, follow_symlinks=False)
    give(src / "link", 1000, 1000)
    for folder in ("d1", "d2", "sub/deeper", ""):  # the new names changed the folders' times
        os.utime(src / folder, ns=(1_600_000_000_987_654_321,) * 2)


def replica_inodes(dst):
    return {os.path.relpath(os.path.join(root, name), dst): os.lstat(os.path.join(root, name)).st_ino
            for root, dirs, files in os.walk(dst) for name in files}


@pytest.mark.parametrize("workers", [1, 3])
def test_a_root_run_mirror_restores_like_rsync_then_follows_metadata_changes_in_place(ext4, workers):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    rich_tree(src)
    result, events = sync_once(src, dst, workers=workers)
    assert result.exact and result.summary().endswith("replica is an exact mirror"), result.summary()
    assert oracle(src, dst) == []
    assert_mirror(src, dst)
    assert os.path.samefile(dst / "d1" / "f", dst / "d2" / "g")
    assert os.path.samefile(dst / "d1" / "f", dst / "sub" / "deeper" / "h")
    assert os.lstat(dst / "d1" / "f").st_nlink == 3
    assert allocated(dst / "disk.img") <= allocated(src / "disk.img") + 64 * 1024, "holes stay holes"
    assert stat.S_IMODE(os.lstat(dst / "prog").st_mode) == 0o4755
    assert sorted((e.path, e.detail) for e in events if e.action == "hardlink") == [
        ("a.txt", "a-again.txt"), ("d2/g", "d1/f"), ("sub/deeper/h", "d1/f")]

    # Metadata-only changes, and hard-link groups that gain and lose names.
    before = replica_inodes(dst)
    give(src / "a.txt", 1002, 1003)
    os.chmod(src / "team" / "doc", 0o600)
    os.setxattr(src / "d1" / "x", "user.added", b"1")
    os.removexattr(src / "a.txt", "user.note")
    setfacl("-m", "g:1001:r", src / "team" / "doc")
    setfacl("-k", src / "acl")
    give(src / "d2", 1000, 1000)
    os.utime(src / "link", ns=(1_400_000_000_000_000_001,) * 2, follow_symlinks=False)
    os.unlink(src / "d2" / "g")
    os.link(src / "d1" / "f", src / "team" / "f-too")
    for folder in ("d2", "team"):
        os.utime(src / folder, ns=(1_600_000_000_987_654_321,) * 2)
    result, events = sync_once(src, dst, workers=workers)
    assert result.exact and oracle(src, dst) == []
    assert not paths(events, "copy") and not paths(events, "update"), "no data copied again"
    itemized = sorted(e.itemized() for e in events if e.action == "attrs")
    assert itemized == sorted([".f....og..x a-again.txt", ".f...p...a. team/doc", ".f........x d1/x",
                               ".d.......a. acl/", ".d....og... d2/", ".L..t...... link"])
    assert paths(events, "hardlink") == ["team/f-too"] and paths(events, "remove") == ["d2/g"]
    after = replica_inodes(dst)
    assert all(after[name] == inode for name, inode in before.items() if name in after), "changed in place"
    assert os.lstat(dst / "d1" / "f").st_nlink == 3

    result, events = sync_once(src, dst, workers=workers)
    assert result.exact and events == [], "a third pass rewrites nothing"
    assert oracle(src, dst) == []


def test_a_dry_run_reports_the_metadata_changes_the_pass_then_makes(ext4):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    rich_tree(src)
    assert sync_once(src, dst)[0].exact
    give(src / "prog", 1001, 1001, 0o4750)
    os.setxattr(src / "d1", "user.folder", b"changed")
    setfacl("-m", "u:1002:r", src / "a.txt")
    os.link(src / "prog", src / "d2" / "prog-link")
    os.utime(src / "d2", ns=(1_600_000_000_987_654_321,) * 2)
    dry, planned = sync_once(src, dst, dry_run=True)
    assert oracle(src, dst) != [], "the dry run changed nothing"
    real, done = sync_once(src, dst)
    assert [e.text(dry_run=True) for e in planned] == [e.text(dry_run=True) for e in done]
    assert [e.text() for e in done] == [
        "set attributes of d1 (extended attributes)", "set attributes of a-again.txt (ACL)",
        "set attributes of prog (owner 1001, group 1001 and permissions 0o4750)",
        "linked d2/prog-link (to prog)"]
    assert oracle(src, dst) == []


def test_each_kind_of_metadata_can_be_turned_off_from_the_command_line(ext4, cli, log):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    rich_tree(src)
    proc = cli(src, dst, 1, log, "--once", "--no-owner", "--no-group", "--no-xattrs", "--no-acls",
               "--no-hard-links")
    assert proc.returncode == 0, proc.stderr
    # Bytes, modes and times are still mirrored; set-id bits dropped with the owner and group.
    assert sorted(oracle(src, dst, "-rlptSc")) == [".d...p..... team/", ".f...p..... prog", ".f...p..... sgid-prog"]
    left = oracle(src, dst)
    assert ".f....og.ax a-again.txt" in left and "hf          d2/g => d1/f" in left
    assert os.lstat(dst / "a.txt").st_uid == 0 and os.listxattr(dst / "a.txt") == []
    assert not os.path.samefile(dst / "d1" / "f", dst / "d2" / "g")
    assert stat.S_IMODE(os.lstat(dst / "prog").st_mode) == 0o755, "setuid dropped with the owner"
    assert "options: --once --no-owner --no-group --no-xattrs --no-acls --no-hard-links" in log.read_text()


def test_without_root_groups_are_kept_where_a_member_and_owners_are_said_to_be_left_out(unprivileged):
    src, dst, log = unprivileged.base / "src", unprivileged.base / "dst", unprivileged.base / "sync.log"
    make_tree(src, {"mine": "m", "theirs": "t", "folder": {"f": "x"}})
    give(src / "theirs", 1000, 1000)
    give(src / "folder", 1000, 0)
    os.chmod(unprivileged.base, 0o777)
    proc = unprivileged.run(src, dst, 1, log, "--once")
    assert proc.returncode == 0, log.read_text()
    assert "replica is an exact mirror except for the owners of 2 entries (only root may give them)" \
        in log.read_text()
    assert os.lstat(dst / "theirs").st_uid == os.lstat(dst / "mine").st_uid == 0
    assert os.lstat(dst / "folder").st_gid == 0, "a group this process is in"
    assert "cannot" not in log.read_text(), "nothing attempted or logged per file"


def test_a_replica_file_with_a_link_outside_the_mirror_is_never_changed_through_it(ext4):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    make_tree(src, {"f": "data"})
    assert sync_once(src, dst)[0].exact
    outside = ext4 / "outside"
    os.link(dst / "f", outside)  # someone with access to the replica linked it elsewhere
    give(src / "f", 1000, 1000, 0o600)
    os.setxattr(src / "f", "user.x", b"1")
    result, events = sync_once(src, dst)
    assert result.exact and oracle(src, dst) == []
    st = os.lstat(outside)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), os.listxattr(outside)) == (0, 0o644, [])
    assert not os.path.samefile(outside, dst / "f")


@pytest.mark.parametrize("seek_data", [True, False], ids=["SEEK_DATA", "zero blocks"])
def test_sparse_files_keep_their_holes(ext4, monkeypatch, seek_data):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    if not seek_data:  # a platform without SEEK_DATA: blocks of zeros are skipped instead
        monkeypatch.delattr(os, "SEEK_DATA")
    sparse(src / "vm.img", 96 * MiB, 40 * MiB, os.urandom(3 * MiB + 5))
    sparse(src / "hole-at-end", 8 * MiB, 0, b"head")
    sparse(src / "empty-but-long", 16 * MiB, 0, b"")
    assert sync_once(src, dst)[0].exact
    assert oracle(src, dst) == []
    for name in ("vm.img", "hole-at-end", "empty-but-long"):
        assert os.lstat(dst / name).st_size == os.lstat(src / name).st_size
        assert allocated(dst / name) <= allocated(src / name) + 1 * MiB, name


def test_hard_link_groups_span_the_subtrees_of_worker_processes(ext4):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    make_tree(src, {f"top{i:02}": {f"sub{j}": {"f": f"{i}-{j}"} for j in range(3)} for i in range(12)})
    first = src / "top00" / "sub0" / "f"
    for i in range(1, 12):
        os.link(first, src / f"top{i:02}" / "sub2" / "same")
    result, events = sync_once(src, dst, workers=3)
    assert result.exact and oracle(src, dst) == []
    assert os.lstat(dst / "top00" / "sub0" / "f").st_nlink == 12
    assert len(paths(events, "hardlink")) == 11


def test_a_file_system_that_stores_no_owners_or_xattrs_is_said_so_once_and_the_rest_mirrored(
        tmp_path, mounts, tools):
    exfat = shutil.which("mount.exfat-fuse")
    if exfat is None:
        pytest.fail("mount.exfat-fuse missing: apt-get install exfat-fuse exfatprogs")
    stick = tmp_path / "stick"
    stick.mkdir()
    image = tmp_path / "stick.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        subprocess.run([exfat, loop, str(stick)], check=True, capture_output=True)
        mounts.made.append(str(stick))
        src, dst = tmp_path / "src", stick / "dst"
        src.mkdir()
        make_tree(src, {"a": "a", "d": {"b": "b"}})
        give(src / "a", 1000, 1000)
        os.setxattr(src / "a", "user.x", b"1")
        os.link(src / "a", src / "d" / "a-too")
        os.chmod(src / "d", 0o1777)  # a mode exFAT cannot store (chmod is refused)
        mirror = sync.Mirror(src, dst, sync.Options(owner=True))
        mirror.check(create=True)
        texts = []
        for _ in range(2):
            events = []
            result = mirror.run_pass(events.append)
            texts.append([e.text() for e in events])
            assert result.exact, result.summary()
            assert result.summary().endswith(
                "replica is an exact mirror except for permission bits, owners, extended attributes, ACLs and "
                "hard links (REPLICA's file system does not store them)")
        unstored = "REPLICA's file system does not store permission bits, owners, extended attributes, ACLs " \
                   "and hard links: they are not mirrored"
        assert texts[0].count(unstored) == 1
        assert texts[1] == [], "it settles: nothing it cannot store is set again on the next pass"
        assert (dst / "d" / "a-too").read_text() == "a", "each name a copy of its own"
    finally:
        subprocess.run(["umount", str(stick)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_file_swapped_in_for_a_replica_link_is_not_given_the_links_owner_or_time(ext4, monkeypatch):
    src, dst = ext4 / "src", ext4 / "dst"
    src.mkdir()
    os.symlink("target", src / "l")
    assert sync_once(src, dst)[0].exact
    give(src / "l", 1000, 1000)
    os.utime(src / "l", ns=(1_400_000_000_000_000_001,) * 2, follow_symlinks=False)
    outside = ext4 / "precious"
    outside.write_text("root's")
    before = os.lstat(outside)
    real_scan = sync._scan

    def scan_then_swap(d):
        entries, failed = real_scan(d)
        if "l" in entries and os.path.islink(dst / "l") and os.path.samestat(os.stat(d), os.lstat(dst)):
            os.unlink(dst / "l")
            os.link(outside, dst / "l")  # someone with access to the replica
        return entries, failed

    monkeypatch.setattr(sync, "_scan", scan_then_swap)
    result, events = sync_once(src, dst)
    assert [(e.path, e.detail) for e in events if e.action == "error"] == [
        ("l", "cannot set owner, group and time: replaced while being updated (ESTALE)")]
    after = os.lstat(outside)
    assert (after.st_uid, after.st_gid, after.st_mtime_ns) == (before.st_uid, before.st_gid, before.st_mtime_ns)
    monkeypatch.undo()
    assert sync_once(src, dst)[0].exact and oracle(src, dst) == [], "the next pass puts the link back"


@pytest.mark.parametrize("other_thread", [False, True], ids=["from inside the folder", "through /proc"])
def test_attributes_are_listed_alike_whichever_way_and_the_working_directory_stays(tmp_path, other_thread):
    # By name from inside the folder while no other thread could use the
    # working directory; through /proc/self/fd while one could.
    import threading
    make_tree(tmp_path / "d", {"a": "a", "b": "b", "sub": {}})
    os.setxattr(tmp_path / "d" / "a", "user.k", b"v")
    os.setxattr(tmp_path / "d" / "sub", "user.s", b"w")
    keep = sync.Keep(xattrs=True, namespaces=frozenset({"user"}))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="host-thread") if other_thread else None
    if other:
        other.start()
    here = os.getcwd()
    d = sync._open_root(str(tmp_path / "d"))  # a descriptor, or (path mode) a path
    try:
        assert sync._cwd_is_ours() is not other_thread
        entries, failed = sync._scan(d)
        assert sync._list_xattrs(d, entries, keep, failed) == {"a": {"user.k": b"v"}, "sub": {"user.s": b"w"}}
        assert failed == [] and os.getcwd() == here
    finally:
        sync._close_dir(d)
        stop.set()
        if other:
            other.join()


def test_ntfs_that_takes_acls_and_trusted_attributes_without_keeping_them_is_found_out(tmp_path, mounts, tools):
    # ntfs-3g as desktops mount it accepts an ACL, and reads back a
    # trusted.* attribute it never lists: set-and-list probing tells.
    ntfs = shutil.which("ntfs-3g")
    if ntfs is None:
        pytest.fail("ntfs-3g missing: apt-get install ntfs-3g")
    disk, image = tmp_path / "ntfs", tmp_path / "ntfs.img"
    disk.mkdir()
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkntfs", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run([ntfs, str(image), str(disk)], check=True, capture_output=True)
    mounts.made.append(str(disk))
    src, dst = tmp_path / "src", disk / "dst"
    src.mkdir()
    make_tree(src, {"f": "x"})
    os.setxattr(src / "f", "user.kept", b"1")
    os.setxattr(src / "f", "trusted.dropped", b"2")
    setfacl("-m", "u:1000:r", src / "f")
    mirror = sync.Mirror(src, dst, sync.Options(modify_window_ns=2 * 10**9))
    mirror.check(create=True)
    first, second = [], []
    mirror.run_pass(first.append)
    mirror.run_pass(second.append)
    assert [e.text() for e in first if e.action == "unstored"] == [
        "REPLICA's file system does not store permission bits, owners, ACLs, security.* attributes and "
        "trusted.* attributes: they are not mirrored"]
    assert os.getxattr(dst / "f", "user.kept") == b"1"
    assert second == [], "it settles: nothing it cannot store is set again on the next pass"


def test_no_perms_gives_new_entries_modes_as_the_umask_allows_and_never_sets_them(ext4, cli, log):
    src, dst = ext4 / "src", ext4 / "dst"
    make_tree(src, {"prog": "#!/bin/sh\n", "d": {"secret": "s"}})
    os.chmod(src / "prog", 0o751)
    os.chmod(src / "d" / "secret", 0o666)
    os.chmod(src / "d", 0o777)
    old_umask = os.umask(0o022)  # the child's
    try:
        assert cli(src, dst, 1, log, "--once", "--no-perms").returncode == 0
    finally:
        os.umask(old_umask)
    # New entries get the source's bits less the umask (022 here), as with rsync --no-perms.
    assert [stat.S_IMODE(os.lstat(dst / p).st_mode) for p in ("prog", "d", "d/secret")] == [0o751, 0o755, 0o644]
    os.chmod(src / "prog", 0o700)
    proc = cli(src, dst, 1, log, "--once", "--no-perms", "-i")
    assert proc.returncode == 0 and proc.stdout == "", "a mode change alone is not mirrored"
    assert cli(src, dst, 1, log, "--once").returncode == 0
    assert sorted(oracle(src, dst, "-rlptc")) == []
