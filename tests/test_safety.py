"""Safety under faults and hostile trees: real kills, a really full disk,
links swapped in mid-pass, odd names, a lost log file, a second instance."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import sync
from conftest import SYNC_PY, run_cli
from test_loop import passes_logged, start_loop, wait_for
from trees import File, assert_mirror, leftover_temp_files, make_tree, snapshot

KILL_TRIALS = int(os.environ.get("SYNCPY_KILL_TRIALS", "50"))  # more: opt in (see .ci/run)


# --- 1. killed mid-pass ---------------------------------------------------------


def versioned_trees(root, rng):
    """An old and a new version of a tree with large and small files, new,
    updated, unchanged and deleted ones."""
    def blob(size):
        return rng.randbytes(size)

    old = {f"big{i}.bin": blob(6 * 1024 * 1024 + i) for i in range(5)}
    old.update({f"small/s{i:03}.txt": f"old {i}\n" * (i + 1) for i in range(150)})
    old.update({f"gone/g{i}.txt": f"gone {i}" for i in range(20)})
    new = {k: v for k, v in old.items() if not k.startswith("gone/")}
    new["big0.bin"] = blob(7 * 1024 * 1024)  # updated, larger
    new["big1.bin"] = blob(5 * 1024 * 1024)  # updated, smaller
    del new["big4.bin"]
    new["big5.bin"] = blob(6 * 1024 * 1024)  # new
    for i in range(0, 150, 3):
        new[f"small/s{i:03}.txt"] = f"new {i}\n" * (i + 2)
    for i in range(1, 150, 7):
        del new[f"small/s{i:03}.txt"]
    new.update({f"fresh/f{i}.txt": f"fresh {i}" for i in range(30)})
    for version, files in (("old", old), ("new", new)):
        for rel, data in files.items():
            path = root / version / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
            os.utime(path, ns=(1_600_000_000_000_000_000 + len(data), 1_600_000_000_000_000_000 + len(data)))
    return {k: (v.encode() if isinstance(v, str) else v) for k, v in old.items()}, \
           {k: (v.encode() if isinstance(v, str) else v) for k, v in new.items()}


def process_group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def random_kills(command, pristine, replica, trials, rng):
    """Run command (a sync.py --once into replica) trials times, each from a
    fresh copy of pristine, and SIGKILL its whole process group (sync.py and
    its workers) at a random moment of an uninterrupted run's length.  Yields
    (trial, killed mid-run) after each kill, once every process is gone."""
    def reset():
        shutil.rmtree(replica, ignore_errors=True)
        shutil.copytree(pristine, replica, symlinks=True)

    reset()  # how long an uninterrupted run takes, to spread the kills over it
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True)
    full_run = time.monotonic() - started
    for trial in range(trials):
        reset()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(0, full_run))  # a random moment, not a wait for something
        os.killpg(proc.pid, signal.SIGKILL)
        killed = proc.wait() == -signal.SIGKILL
        wait_for(lambda pgid=proc.pid: not process_group_alive(pgid), "the worker processes to be gone")
        yield trial, killed


def test_kill_at_random_moments_never_leaves_a_partial_file(tmp_path):
    rng = random.Random(20261125)
    old, new = versioned_trees(tmp_path, rng)
    pristine = tmp_path / "pristine"
    assert sync.run_pass(tmp_path / "old", pristine).exact
    replica, log = tmp_path / "replica", tmp_path / "sync.log"
    command = [sys.executable, SYNC_PY, str(tmp_path / "new"), str(replica), "1", str(log), "--once", "-q"]
    killed = 0
    for trial, landed in random_kills(command, pristine, replica, KILL_TRIALS, rng):
        killed += landed
        for dirpath, _, filenames in os.walk(replica):
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), replica)
                if name.startswith(".syncpy-") or ".syncpy-" in os.path.dirname(rel):
                    continue  # a temporary file (or the replica probe's folder): never under a real name
                data = open(os.path.join(dirpath, name), "rb").read()
                assert data in (old.get(rel), new.get(rel)), f"trial {trial}: {rel} is partial or mixed"
        result = sync.run_pass(tmp_path / "new", replica)
        assert result.exact, f"trial {trial}"
        assert_mirror(tmp_path / "new", replica)
        assert leftover_temp_files(replica) == []
    print(f"{killed} of {KILL_TRIALS} kills landed during a pass; every replica intact")
    assert killed >= KILL_TRIALS // 2, f"only {killed} of {KILL_TRIALS} kills landed during a pass"


# --- 2. disk full -----------------------------------------------------------------


def test_disk_full_keeps_old_versions_and_leaves_no_temporary_files(src, small_disk, tmp_path):
    dst, log = small_disk / "replica", tmp_path / "sync.log"
    make_tree(src, {"a-big.bin": os.urandom(1024 * 1024), "keep.txt": "k" * 100_000})
    assert run_cli(src, dst, 1, log, "--once").returncode == 0
    old_big = (dst / "a-big.bin").read_bytes()
    # The update needs a second copy beside the old one: 1 + 1.5 MiB > 2 MiB.
    (src / "a-big.bin").write_bytes(os.urandom(1536 * 1024))
    (src / "new-small.txt").write_text("fits")
    proc = run_cli(src, dst, 1, log, "--once")
    assert proc.returncode == 1
    assert "ERROR   a-big.bin: cannot copy file: No space left on device (ENOSPC)" in log.read_text()
    assert (dst / "a-big.bin").read_bytes() == old_big, "a failed update keeps the old version"
    assert (dst / "keep.txt").read_text() == "k" * 100_000
    assert (dst / "new-small.txt").read_text() == "fits", "the pass goes on"
    assert leftover_temp_files(dst) == []
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert run_cli(src, dst, 1, log, "--once").returncode == 0
    assert_mirror(src, dst)


def test_disk_full_for_a_new_file_and_a_new_directory(src, small_disk, tmp_path):
    dst, log = small_disk / "replica", tmp_path / "sync.log"
    make_tree(src, {"huge.bin": os.urandom(3 * 1024 * 1024), "d": {"f": "x"}})
    proc = run_cli(src, dst, 1, log, "--once")
    assert proc.returncode == 1
    assert "huge.bin: cannot copy file: No space left on device (ENOSPC)" in log.read_text()
    assert (dst / "d" / "f").read_text() == "x"
    assert leftover_temp_files(dst) == [] and not (dst / "huge.bin").exists()


# --- 5. source empty or too many deletions -----------------------------------------


def test_empty_source_does_not_empty_the_replica(src, dst, log, cli):
    make_tree(src, {"f": "x", "d": {"g": "y"}})
    assert cli(src, dst, 1, log, "--once").returncode == 0
    for entry in ("f", "d/g", "d"):
        (src / entry).rmdir() if (src / entry).is_dir() else (src / entry).unlink()
    before = snapshot(dst)
    proc = cli(src, dst, 1, log, "--once")
    assert proc.returncode == 3
    assert "SOURCE is empty but REPLICA is not: refusing to delete everything" in proc.stderr
    assert "--allow-empty-source" in proc.stderr
    assert snapshot(dst) == before
    proc = cli(src, dst, 1, log, "--once", "--allow-empty-source")
    assert proc.returncode == 0 and os.listdir(dst) == []


def test_empty_replica_from_empty_source_is_fine(src, dst, log, cli):
    assert cli(src, dst, 1, log, "--once").returncode == 0
    assert cli(src, dst, 1, log, "--once").returncode == 0


def test_max_delete_refuses_the_whole_pass(src, dst, log, cli):
    make_tree(src, {f"f{i}": str(i) for i in range(10)} | {"d": {"a": "1", "b": "2"}})
    assert cli(src, dst, 1, log, "--once").returncode == 0
    for i in range(5):
        (src / f"f{i}").unlink()
    shutil.rmtree(src / "d")
    (src / "new").write_text("would be copied")
    before = snapshot(dst)
    proc = cli(src, dst, 1, log, "--once", "--max-delete", "7")
    assert proc.returncode == 3
    assert ("this pass would delete 8 entries, more than the limit of 7; nothing was changed. If that "
            "many deletions are intended, run once with a higher --max-delete.") in proc.stderr
    assert snapshot(dst) == before
    proc = cli(src, dst, 1, log, "--once", "--max-delete", "8")
    assert proc.returncode == 0
    assert_mirror(src, dst)


def test_max_delete_holds_even_if_the_source_changes_after_counting(src, dst, monkeypatch):
    make_tree(src, {f"f{i}": str(i) for i in range(6)})
    sync.run_pass(src, dst)
    for i in range(6):
        (src / f"f{i}").unlink()
    (src / "other").write_text("so the source is not empty")
    monkeypatch.setattr(sync, "_count_deletions", lambda *args: 0)  # counted before the deletions
    events = []
    result = sync.run_pass(src, dst, sync.Options(max_delete=2), events.append)
    assert [e.path for e in events if e.action == "remove"] == ["f0", "f1"]
    assert result.errors == 4
    assert sorted(os.listdir(dst)) == ["f2", "f3", "f4", "f5", "other"]


def test_bad_max_delete_is_a_usage_error(src, dst, log, cli):
    proc = cli(src, dst, 1, log, "--once", "--max-delete", "-1")
    assert proc.returncode == 2 and "expected a whole number of zero or more, not '-1'" in proc.stderr


# --- 6. two instances on one replica -------------------------------------------------


def test_second_instance_is_refused_and_a_killed_holder_leaves_no_stale_lock(src, dst, log, tmp_path):
    make_tree(src, {"f": "x"})
    before = sorted(os.listdir(tmp_path))
    holder = start_loop(src, dst, log, 3600)
    try:
        wait_for(lambda: passes_logged(log) == 1, "the first instance's first pass")
        second = run_cli(src, dst, 1, tmp_path / "second.log", "--once")
        assert second.returncode == 4 and second.stderr.count("\n") == 1
        assert f"REPLICA '{dst}' is locked by another sync.py (process {holder.pid})" in second.stderr
        assert cli_dry_run_allowed(src, dst, tmp_path)
    finally:
        holder.kill()  # SIGKILL: no chance to clean anything up
        holder.wait()
    third = run_cli(src, dst, 1, log, "--once")
    assert third.returncode == 0, third.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["dst", "second.log", "sync.log", "dry.log"])
    assert sorted(os.listdir(dst)) == ["f"], "no lock file in the mirror"


def cli_dry_run_allowed(src, dst, tmp_path):
    """A dry run changes nothing, so it may look while another instance runs."""
    return run_cli(src, dst, 1, tmp_path / "dry.log", "--once", "--dry-run").returncode == 0


# --- 7. links can't redirect anything ---------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A folder outside both trees that no pass may touch."""
    path = tmp_path / "outside"
    make_tree(path, {"victim.txt": File("precious", mode=0o640), "sub": {"deep.txt": "deep"}})
    return path


def swap_after_scan(monkeypatch, which_dir, action):
    """Run action() right after the pass lists which_dir: the moment between
    seeing an entry and acting on it."""
    real_scan = sync._scan
    target = os.stat(which_dir)
    done = []

    def scan(d):
        result = real_scan(d)
        if not done and os.path.samestat(os.fstat(d), target):
            done.append(True)
            action()
        return result

    monkeypatch.setattr(sync, "_scan", scan)
    return done


def replace_with_link(path, target):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.symlink(target, path)


ATTACKS = {
    # replica directory swapped for a link before the pass descends into it
    "replica-dir-before-descend": (
        {"d": {"victim.txt": "from source", "new.txt": "n"}}, {"d": {"victim.txt": "old"}},
        "dst", lambda src, dst, out: replace_with_link(dst / "d", out)),
    # replica file swapped for a link before its mode is set in place
    "replica-file-before-chmod": (
        {"victim.txt": File("precious", mode=0o600)}, {"victim.txt": File("precious", mode=0o640)},
        "dst", lambda src, dst, out: replace_with_link(dst / "victim.txt", out / "victim.txt")),
    # replica file swapped for a link before it is updated
    "replica-file-before-update": (
        {"victim.txt": "new content"}, {"victim.txt": "old"},
        "dst", lambda src, dst, out: replace_with_link(dst / "victim.txt", out / "victim.txt")),
    # replica directory to be deleted swapped for a link to a full folder
    "replica-dir-before-delete": (
        {"keep": "k"}, {"keep": "k", "sub": {"deep.txt": "x", "more": {"y": "y"}}},
        "dst", lambda src, dst, out: replace_with_link(dst / "sub", out / "sub")),
    # replica file to be deleted swapped for a link
    "replica-file-before-delete": (
        {"keep": "k"}, {"keep": "k", "victim.txt": "x"},
        "dst", lambda src, dst, out: replace_with_link(dst / "victim.txt", out / "victim.txt")),
    # source directory swapped for a link to outside before the pass descends
    "source-dir-before-descend": (
        {"sub": {"deep.txt": "mine"}, "keep": "k"}, None,
        "src", lambda src, dst, out: replace_with_link(src / "sub", out / "sub")),
    # source file swapped for a link to an outside file before it is read
    "source-file-before-read": (
        {"victim.txt": "mine", "keep": "k"}, None,
        "src", lambda src, dst, out: replace_with_link(src / "victim.txt", out / "victim.txt")),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_link_swapped_in_mid_pass_never_redirects_anything(attack, src, dst, outside, monkeypatch):
    source_tree, replica_tree, side, swap = ATTACKS[attack]
    make_tree(src, source_tree)
    if replica_tree is not None:
        make_tree(dst, replica_tree)
    else:
        dst.mkdir()
    before = snapshot(outside)
    before_modes = {p: os.lstat(p).st_mode for p in (outside / "victim.txt", outside / "sub")}
    done = swap_after_scan(monkeypatch, src if side == "src" else dst,
                           lambda: swap(src, dst, outside))
    sync.run_pass(src, dst)
    assert done, "the attack ran"
    assert snapshot(outside) == before, "something outside the replica changed"
    assert {p: os.lstat(p).st_mode for p in before_modes} == before_modes
    if side == "src":  # nothing of outside's was read through the link and copied in
        copied = [v[1] for v in snapshot(dst).values() if v[0] == "file"]
        assert b"precious" not in copied and b"deep" not in copied
    monkeypatch.undo()
    assert sync.run_pass(src, dst, sync.Options(allow_empty_source=True)).exact
    assert_mirror(src, dst)
    assert snapshot(outside) == before


# --- 8, 9. names and hard links ------------------------------------------------------


def test_longest_names_mirror_and_log(src, dst, log, cli):
    ascii_name = "n" * 255
    utf8_name = "é" * 127  # 254 bytes
    make_tree(src, {ascii_name: "a", utf8_name: {ascii_name: "b"}, "-rf": "dash", "--help": "h"})
    proc = cli(src, dst, 1, log, "--once")
    assert proc.returncode == 0, proc.stderr
    assert_mirror(src, dst)
    assert f"copied {utf8_name}/{ascii_name} (1 bytes)" in log.read_text(encoding="utf-8")
    (src / ascii_name).write_text("changed")  # an update needs a temporary name beside it
    assert cli(src, dst, 1, log, "--once").returncode == 0
    assert_mirror(src, dst)


def test_without_hard_links_they_become_separate_files_with_the_right_contents(src, dst):
    make_tree(src, {"a": "shared", "d": {}})
    os.link(src / "a", src / "d" / "b")
    options = sync.Options(hard_links=False)
    assert sync.run_pass(src, dst, options).exact
    assert_mirror(src, dst, hard_links=False)
    assert not os.path.samefile(dst / "a", dst / "d" / "b")
    with open(src / "a", "a") as f:  # an edit through one name changes both
        f.write(" and edited")
    assert sync.run_pass(src, dst, options).exact
    assert (dst / "d" / "b").read_text() == "shared and edited"
    assert_mirror(src, dst, hard_links=False)


def test_deep_tree_through_the_cli(src, dst, log, cli, tmp_path):
    depth = 1100
    fd = os.open(src, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("level", dir_fd=fd)
        fd2 = os.open("level", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = fd2
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    try:
        proc = cli(src, dst, 1, log, "--once")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "copied " + "level/" * depth + "leaf (0 bytes)" in log.read_text()
    finally:
        subprocess.run(["rm", "-rf", str(src), str(dst)], check=True)


# --- 10. the log file becomes unwritable -------------------------------------------


def test_a_console_nobody_reads_costs_no_line_of_the_log_and_no_file(src, dst, log):
    # stderr a pipe whose reader has gone (a terminal closed, `| head`
    # done): every write to it fails; the pass and LOG_FILE do not.
    make_tree(src, {f"f{i}": str(i) for i in range(50)} | {"d": {"g": "g"}})
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, SYNC_PY, str(src), str(dst), "1", str(log), "--once"],
                              stdout=subprocess.DEVNULL, stderr=write_end, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    assert_mirror(src, dst)
    logged = log.read_text()
    assert logged.count("INFO    copied ") == 51 and "replica is an exact mirror" in logged
    assert "Traceback" not in logged


def test_lost_log_file_is_reported_once_and_syncing_goes_on(src, dst, tmp_path):
    make_tree(src, {"f": "x"})
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "sync.log"
    proc = start_loop(src, dst, log, 0.1)
    try:
        wait_for(lambda: passes_logged(log) >= 1, "the first pass")
        logs.rename(tmp_path / "gone")  # at once: rmtree could race the log's reopening
        for name in ("one", "two", "three"):
            (src / name).write_text(name)
            wait_for(lambda name=name: (dst / name).exists(), f"{name} to be mirrored without a log file")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert err.count("cannot write to") == 1, err
    assert f"sync.py: cannot write to {log}: No such file or directory (ENOENT); syncing goes on" in err
    assert "Traceback" not in err and "Logging error" not in err
    assert "copied three" in err, "the console still gets every line"
