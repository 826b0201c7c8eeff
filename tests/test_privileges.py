"""What a replica must never hand out: a setuid program of another owner,
or a new file readable by others through a folder the source made private
(not even for a moment, not even after a kill)."""

import os
import random
import stat
import sys

import pytest

import sync
from conftest import SYNC_PY, sync_once
from test_safety import KILL_TRIALS, random_kills
from trees import Dir, File, assert_mirror, make_tree


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- 5. setuid and setgid ------------------------------------------------------------


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.skip("giving files to other owners needs root (CI runs as root)")


def give(path, uid, gid, bits):
    os.chown(path, uid, gid)  # chown clears the set-id bits: set them after it
    os.chmod(path, bits)


def test_setuid_and_setgid_are_dropped_where_the_owner_differs(src, dst, root):
    make_tree(src, {"user-suid": File("#!/bin/sh\n"), "user-sgid": File("#!/bin/sh\n"),
                    "root-suid": File("#!/bin/sh\n"), "shared": Dir({"f": "x"})})
    give(src / "user-suid", 1000, 1000, 0o4755)  # an ordinary user's setuid program
    give(src / "user-sgid", 0, 1000, 0o2755)  # root's, but set-group of another group
    give(src / "root-suid", 0, 0, 0o4755)  # root's own: the copy has the same owner
    give(src / "shared", 0, 1000, 0o2775)  # a group folder
    result, events = sync_once(src, dst, owner=False, group=False)
    assert result.exact
    assert mode(dst / "user-suid") == 0o755, "a user's setuid program became root's"
    assert mode(dst / "user-sgid") == 0o755
    assert mode(dst / "root-suid") == 0o4755
    assert mode(dst / "shared") == 0o775
    assert [os.lstat(dst / n).st_uid for n in ("user-suid", "root-suid")] == [0, 0]
    result, events = sync_once(src, dst, owner=False, group=False)
    assert result.exact and events == [], "the dropped bits are not set again and again"


def test_setuid_dropped_on_a_file_that_was_current_already(src, dst, root):
    make_tree(src, {"prog": File("#!/bin/sh\n", mode=0o755)})
    assert sync_once(src, dst)[0].exact
    give(src / "prog", 1000, 1000, 0o4755)
    result, events = sync_once(src, dst, owner=False, group=False)
    assert result.exact and mode(dst / "prog") == 0o755
    assert [e.action for e in events] == []


def test_setuid_and_setgid_stay_where_owner_and_group_are_kept(src, dst, root):
    make_tree(src, {"user-suid": File("#!/bin/sh\n"), "prog": File("#!/bin/sh\n", mode=0o755),
                    "shared": Dir({"f": "x"})})
    give(src / "user-suid", 1000, 1000, 0o4755)
    give(src / "shared", 0, 1000, 0o2775)
    assert sync_once(src, dst)[0].exact
    give(src / "prog", 1000, 1000, 0o6755)  # made a user's set-id program after it was mirrored
    result, events = sync_once(src, dst)
    assert result.exact and [(e.action, e.path, e.detail) for e in events] == [
        ("attrs", "prog", "owner 1000, group 1000 and permissions 0o6755")]
    for name, bits in [("user-suid", 0o4755), ("prog", 0o6755), ("shared", 0o2775)]:
        assert mode(dst / name) == bits, name
        assert os.lstat(dst / name)[4:6] == os.lstat(src / name)[4:6]
    assert sync_once(src, dst)[1] == []


# --- 6. a folder made private -----------------------------------------------------------


def make_private_tree(src, count=3):
    """A folder that was public, then made private and given new files."""
    make_tree(src, {"private": Dir({"old.txt": "o", "sub": Dir({"s.txt": "s"}, mode=0o755)},
                                   mode=0o755), "public.txt": "p"})


def privatise(src, count):
    for i in range(count):
        (src / "private" / f"new{i:03}.txt").write_text(f"secret {i}\n" * 50)
        os.chmod(src / "private" / f"new{i:03}.txt", 0o644)
    (src / "private" / "sub" / "new-deep.txt").write_text("deep secret")
    os.chmod(src / "private" / "sub" / "new-deep.txt", 0o644)
    os.chmod(src / "private", 0o700)


def exposed(replica):
    """New files readable by a user other than the owner, through replica/private."""
    folder = mode(replica / "private")
    found = []
    for dirpath, _, files in os.walk(replica / "private"):
        for name in files:
            if name.startswith("new"):
                path = os.path.join(dirpath, name)
                file = mode(path)
                if folder & 0o001 and file & 0o004 or folder & 0o010 and file & 0o040:
                    found.append(os.path.relpath(path, replica))
    return found


def test_a_folder_made_private_is_closed_before_new_files_land(src, dst, monkeypatch):
    make_private_tree(src)
    assert sync_once(src, dst)[0].exact
    privatise(src, 3)
    real_replace = os.replace
    seen = []

    def replace(old, new, *, src_dir_fd=None, dst_dir_fd=None):
        real_replace(old, new, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        seen.append((new, exposed(dst)))  # the very moment a new file lands under its name

    monkeypatch.setattr(os, "replace", replace)
    result, events = sync_once(src, dst, workers=1)
    monkeypatch.undo()
    assert result.exact and len(seen) == 4
    assert [(name, files) for name, files in seen if files] == []
    assert mode(dst / "private") == 0o700
    assert_mirror(src, dst)


def test_killed_at_any_moment_no_new_private_file_is_readable_by_others(tmp_path):
    rng = random.Random(20261126)
    src, pristine, replica = tmp_path / "src", tmp_path / "pristine", tmp_path / "replica"
    make_private_tree(src)
    assert sync.run_pass(src, pristine).exact
    privatise(src, 300)
    command = [sys.executable, SYNC_PY, str(src), str(replica), "1", str(tmp_path / "log"), "--once", "-q"]
    for trial, _ in random_kills(command, pristine, replica, max(10, KILL_TRIALS // 2), rng):
        assert exposed(replica) == [], f"trial {trial}: new private files readable by others"
