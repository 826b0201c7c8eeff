"""Operator features: filters, trash, progress, tolerant times, itemized
output, the start line."""

import io
import os
import pty
import sys
import re
import shutil

import pytest

import sync
from conftest import paths, sync_once
from trees import Fifo, File, Link, assert_mirror, make_tree, snapshot


# --- 1. --exclude ------------------------------------------------------------------

EXCLUDE_TREE = {
    "keep.txt": "k", "junk.tmp": "t", ".git": {"HEAD": "ref", "pipe": Fifo()},
    "src": {"a.py": "a", "b.tmp": "t", ".git": "a file named .git is not a folder"},
    "cache": {"big": "x", "sub": {"more": "y"}},
    "docs": {"a.pdf": "p", "deep": {"b.pdf": "q"}, "c.txt": "c"},
}


def test_exclude_rules_for_names_folders_and_paths(src, dst):
    make_tree(src, EXCLUDE_TREE)
    excludes = sync.Excludes(["*.tmp", ".git/", "/cache/**", "docs/*.pdf"])
    result, events = sync_once(src, dst, excludes=excludes)
    assert result.exact
    assert [e for e in events if e.action == "skip"] == [], "an excluded folder is not looked into"
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == ["docs/c.txt", "docs/deep/b.pdf", "keep.txt", "src/.git", "src/a.py"]
    assert (dst / "cache").is_dir() and not list((dst / "cache").iterdir())


@pytest.mark.parametrize("pattern, matches, misses", [
    ("f[ab]", ["fa", "fb"], ["ff", "f[", "fab", "f]", "a"]),
    ("f[!ab]", ["fc", "f]"], ["fa", "fb", "f/"]),
    ("f[]a]", ["f]", "fa"], ["fb"]),
    ("f[a-c]x", ["fax", "fbx", "fcx"], ["fdx", "f-x"]),
    ("f[ac-]", ["fa", "fc", "f-"], ["fb"]),
    ("f[z-a]", [], ["fz", "fa", "f-"]),
    ("f[", [], ["f[", "fa"]),  # not closed: rsync's wildmatch then matches nothing
    ("f[[:digit:]x]", ["f1", "fx"], ["fa", "f/"]),
    ("f[\\]]", ["f]"], ["f\\"]),
])
def test_bracket_expressions_match_exactly_their_members(pattern, matches, misses):
    excludes = sync.Excludes([pattern])
    for name in matches:
        assert excludes.match(name, name, False), name
    for name in misses:
        assert not excludes.match(name, name, False), name


def test_excluded_replica_entries_are_left_alone_unless_delete_excluded(src, dst):
    make_tree(src, {"keep.txt": "k"})
    make_tree(dst, {"keep.txt": "k", "notes.tmp": "mine", ".git": {"HEAD": "x"}, "other": "o"})
    excludes = sync.Excludes(["*.tmp", ".git/"])
    result, events = sync_once(src, dst, excludes=excludes)
    assert paths(events, "remove") == ["other"]
    assert (dst / "notes.tmp").read_text() == "mine" and (dst / ".git" / "HEAD").exists()
    result, events = sync_once(src, dst, excludes=excludes, delete_excluded=True)
    assert paths(events, "remove") == [".git/HEAD", "notes.tmp"] and paths(events, "rmdir") == [".git"]
    assert_mirror(src, dst)


def test_exclude_from_file_and_the_cli(src, dst, log, cli, tmp_path):
    make_tree(src, EXCLUDE_TREE)
    rules = tmp_path / "rules.txt"
    rules.write_text("# build output\n*.tmp\n\n.git/\n/cache/**\n")
    proc = cli(src, dst, 1, log, "--once", "--exclude-from", rules, "--exclude", "docs/*.pdf")
    assert proc.returncode == 0, proc.stderr
    assert not (dst / "junk.tmp").exists() and not (dst / ".git").exists()
    assert not (dst / "docs" / "a.pdf").exists() and (dst / "docs" / "deep" / "b.pdf").exists()
    assert f"--exclude-from {rules} --exclude docs/*.pdf" in log.read_text(), "in the order given"
    missing = cli(src, dst, 1, log, "--once", "--exclude-from", tmp_path / "nope.txt")
    assert missing.returncode == 2 and "cannot read --exclude-from" in missing.stderr
    (dst / "junk.tmp").write_text("made in the replica")
    proc = cli(src, dst, 1, log, "--once", "--exclude-from", rules, "--exclude", "docs/*.pdf")
    assert proc.returncode == 0 and (dst / "junk.tmp").exists(), "excluded: left alone"
    proc = cli(src, dst, 1, log, "--once", "--exclude-from", rules, "--exclude", "docs/*.pdf",
               "--delete-excluded")
    assert proc.returncode == 0 and not (dst / "junk.tmp").exists()


def test_empty_source_check_ignores_excluded_replica_entries(src, dst):
    make_tree(dst, {"notes.tmp": "mine"})
    result, _ = sync_once(src, dst, excludes=sync.Excludes(["*.tmp"]))
    assert result.exact and (dst / "notes.tmp").exists()


# --- 2. --trash ----------------------------------------------------------------------


def trash_folders(trash):
    return sorted(p.name for p in trash.iterdir())


def test_deleted_and_overwritten_items_go_to_the_trash(src, dst, tmp_path):
    trash = tmp_path / "trash"
    trash.mkdir()
    make_tree(src, {"doc.txt": "v1", "old.txt": "gone soon", "dir": {"inner": {"f": "deep"}},
                    "l": Link("doc.txt"), "k": "k"})
    sync_once(src, dst, trash=str(trash))
    (src / "doc.txt").write_text("v2 is longer")
    os.unlink(src / "old.txt")
    shutil.rmtree(src / "dir")
    os.unlink(src / "l")
    os.symlink("k", src / "l")
    result, events = sync_once(src, dst, trash=str(trash))
    assert result.exact
    [stamp] = trash_folders(trash)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d{6}\.\d{3}", stamp)
    kept = trash / stamp
    assert (kept / "doc.txt").read_text() == "v1" and (dst / "doc.txt").read_text() == "v2 is longer"
    assert (kept / "old.txt").read_text() == "gone soon"
    assert (kept / "dir" / "inner" / "f").read_text() == "deep"
    assert os.readlink(kept / "l") == "doc.txt"
    # Overwritten: kept first ("trash"); deleted: removed into the trash.
    assert paths(events, "trash") == ["doc.txt", "l"]
    assert {e.detail for e in events if e.action == "trash"} == {f"{stamp}/doc.txt", f"{stamp}/l"}
    assert sorted((e.action, e.path, e.trash) for e in events if e.trash) == [
        ("remove", "old.txt", f"{stamp}/old.txt"), ("rmdir", "dir", f"{stamp}/dir")]
    assert result.counts["trash"] == 4
    assert_mirror(src, dst)


def test_a_file_deleted_by_mistake_can_be_restored_from_the_trash(src, dst, log, cli, tmp_path):
    trash = tmp_path / "trash"
    make_tree(src, {"thesis": {"chapter1.tex": "precious words"}, "k": "k"})
    assert cli(src, dst, 1, log, "--once", "--trash", trash).returncode == 0
    os.unlink(src / "thesis" / "chapter1.tex")  # the mistake
    assert cli(src, dst, 1, log, "--once", "--trash", trash).returncode == 0
    assert not (dst / "thesis" / "chapter1.tex").exists()
    [stamp] = trash_folders(trash)
    assert f"removed file thesis/chapter1.tex (kept in trash as {stamp}/thesis/chapter1.tex)" in log.read_text()
    shutil.copy2(trash / stamp / "thesis" / "chapter1.tex", src / "thesis")  # the rescue
    assert (src / "thesis" / "chapter1.tex").read_text() == "precious words"


def test_trash_keep_prunes_old_pass_folders_only(src, dst, tmp_path):
    trash = tmp_path / "trash"
    make_tree(trash, {"2020-01-01_000000.000": {"old.txt": "old"}, "2999-01-01_000000.000": {"f": "x"},
                      "not-a-pass-folder": {"mine": "keep"}})
    make_tree(src, {"f": "x"})
    result, events = sync_once(src, dst, trash=str(trash), trash_keep_days=30)
    assert paths(events, "prune") == ["2020-01-01_000000.000"]
    assert trash_folders(trash) == ["2999-01-01_000000.000", "not-a-pass-folder"]
    assert result.exact and events[0].action == "prune"


def test_trash_with_worker_processes_uses_one_folder_per_pass(src, dst, tmp_path):
    trash = tmp_path / "trash"
    trash.mkdir()
    make_tree(src, {f"d{i}": {f"s{j}": {"f": f"{i}{j}"} for j in range(3)} for i in range(10)})
    sync_once(src, dst, workers=3)
    for i in range(10):
        os.unlink(src / f"d{i}" / "s1" / "f")
    result, events = sync_once(src, dst, workers=3, trash=str(trash))
    assert result.exact and len(paths(events, "remove")) == 10 and all(e.trash for e in events)
    [stamp] = trash_folders(trash)
    assert sorted(str(p.relative_to(trash / stamp)) for p in (trash / stamp).rglob("f")) == \
        [f"d{i}/s1/f" for i in range(10)]


@pytest.mark.parametrize("where, message", [
    ("{dst}/trash", "TRASH '{dst}/trash' is inside REPLICA"),
    ("{src}/trash", "TRASH '{src}/trash' is inside SOURCE"),
])
def test_trash_inside_the_trees_is_refused(src, dst, log, cli, where, message):
    where, message = where.format(src=src, dst=dst), message.format(src=src, dst=dst)
    proc = cli(src, dst, 1, log, "--once", "--trash", where)
    assert proc.returncode == 2 and message in proc.stderr


def test_trash_on_another_file_system_is_refused(src, dst, log, cli):
    other = "/dev/shm"
    if not os.path.isdir(other) or os.stat(other).st_dev == os.stat(src).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    trash = os.path.join(other, f"syncpy-trash-{os.getpid()}")
    try:
        proc = cli(src, dst, 1, log, "--once", "--trash", trash)
        assert proc.returncode == 2 and "is not on the file system of REPLICA" in proc.stderr
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def test_trash_keep_needs_trash(src, dst, log, cli):
    proc = cli(src, dst, 1, log, "--once", "--trash-keep", "3")
    assert proc.returncode == 2 and "--trash-keep needs --trash" in proc.stderr


# --- 3. progress ---------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_line_appears_after_two_seconds_and_is_rate_limited(monkeypatch):
    monkeypatch.setattr(sync._Progress, "width", lambda self: 200)
    stream, clock = io.StringIO(), Clock()
    progress = sync._Progress(stream, clock)
    copy = sync.Event("copy", "f", "1048576")
    for t in (0.5, 1.0, 1.9):
        clock.now = t
        progress.event(copy)
    assert stream.getvalue() == "", "short passes show nothing"
    draws = 0
    for i in range(40):  # 40 files over one second
        clock.now = 2.0 + i / 40
        before = stream.getvalue()
        progress.event(copy)
        draws += stream.getvalue() != before
    assert draws == 4, "at most four updates a second"
    line = stream.getvalue().split("\r")[-1]
    assert line == "sync.py: 0 entries checked, 34 files copied (34.0 MiB, 12.4 MiB/s), 0:02 elapsed\x1b[K"
    progress.finish()
    assert stream.getvalue().endswith("\r\x1b[K"), "the line is cleared when the pass ends"


def test_progress_counts_copies_and_updates_from_the_start_of_each_pass():
    stream, clock = io.StringIO(), Clock()
    clock.now = 1000.0  # a monotonic clock starts anywhere
    progress = sync._Progress(stream, clock)
    clock.now = 1001.9
    progress.event(sync.Event("update", "f", "2048"))
    assert stream.getvalue() == "", "nothing in the first two seconds"
    clock.now = 1002.5
    progress.event(sync.Event("copy", "g", "1024"))
    progress.event(sync.Event("mkdir", "d"))
    line = stream.getvalue().split("\r")[-1]
    assert line == "sync.py: 0 entries checked, 2 files copied (3.0 KiB, 1.2 KiB/s), 0:02 elapsed\x1b[K"


def test_progress_counts_the_total_only_for_long_passes_and_shows_what_is_left(monkeypatch):
    monkeypatch.setattr(sync._Progress, "width", lambda self: 200)  # the full wording
    stream, clock, calls = io.StringIO(), Clock(), []

    def count(stop):
        calls.append(1)
        return 1000

    progress = sync._Progress(stream, clock, count=count)
    clock.now = 1.5
    progress.progress(100)
    progress.finish()  # a short pass: no count at all
    assert calls == [] and stream.getvalue() == ""
    clock.now += 2.0
    progress.progress(250)  # 2 s into the next pass: the count starts
    progress.counter.join()
    clock.now += 0.5
    progress.progress(500)
    line = stream.getvalue().split("\r")[-1]
    assert line == ("sync.py: 500 of 1,000 entries checked (50%), 0 files copied (0 bytes, 0 bytes/s), "
                    "0:02 elapsed, about 0:02 left\x1b[K")
    assert calls == [1]


def test_finishing_a_pass_stops_the_count():
    started = []

    def endless_count(stop):
        started.append(1)
        while not stop():
            pass
        return None

    clock = Clock()
    progress = sync._Progress(io.StringIO(), clock, count=endless_count)
    clock.now = 3.0
    progress.progress(1)
    progress.finish()  # returns only once the counting thread has ended
    assert started == [1] and progress.counter is None


def test_count_entries_matches_what_a_pass_checks(src, dst):
    make_tree(src, EXCLUDE_TREE)
    for excludes in (None, sync.Excludes(["*.tmp", ".git/", "/cache/**"])):
        result, _ = sync_once(src, dst, excludes=excludes, delete_excluded=True, workers=2)
        assert sync.count_entries(str(src), excludes) == result.checked
    assert sync.count_entries(str(src), None, should_stop=lambda: True) is None


def test_progress_only_on_a_terminal_and_never_with_quiet():
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            assert sync._Progress.wanted(terminal, quiet=False)
            assert not sync._Progress.wanted(terminal, quiet=True)
        assert not sync._Progress.wanted(io.StringIO(), quiet=False)
    finally:
        os.close(master)
        os.close(slave)


def test_the_cli_shows_progress_on_a_terminal(src, dst, log, monkeypatch):
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            args = [str(src), str(dst), "1", str(log), "--once"]
            reporter = sync._Reporter(sync._Settings(args))
            assert isinstance(reporter.progress, sync._Progress)
            assert reporter.console.progress is reporter.progress
            assert reporter.checked == reporter.progress.progress
            reporter.output.close()
            quiet = sync._Reporter(sync._Settings(args + ["--quiet"]))
            assert quiet.progress is None and quiet.checked is None
            quiet.output.close()
    finally:
        os.close(master)
        os.close(slave)


def test_console_writes_log_lines_above_the_progress_line():
    stream = io.StringIO()
    progress = sync._Progress(stream, Clock())
    progress.draw(3.0)
    assert stream.getvalue().startswith("\rsync.py: ")
    console = sync._Console(stream)
    console.progress = progress
    line = stream.getvalue()
    console.write("copied f\n")
    assert stream.getvalue() == line + "\r\x1b[Kcopied f\n" + line, "the status line stays at the bottom"


# --- 4. --modify-window ----------------------------------------------------------------


def round_mtimes_like_fat(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            t = os.lstat(path).st_mtime_ns
            rounded = (t // 2_000_000_000 + 1) * 2_000_000_000
            os.utime(path, ns=(rounded, rounded))


def test_modify_window_accepts_a_replica_with_rounded_times(src, dst, log, cli):
    make_tree(src, {"a": File("1", mtime_ns=1_700_000_000_300_000_000), "d": {"b": "2"}})
    sync_once(src, dst)
    round_mtimes_like_fat(dst)
    before = snapshot(dst)
    result, events = sync_once(src, dst, modify_window_ns=2_000_000_000)
    assert events == [] and snapshot(dst) == before
    proc = cli(src, dst, 1, log, "--once", "--modify-window", "2")
    assert proc.returncode == 0 and "INFO    copied" not in log.read_text()
    assert "INFO    updated" not in log.read_text()
    result, events = sync_once(src, dst)  # without it, every rounded file is copied again
    assert paths(events, "update") == ["a", "d/b"]


def test_modify_window_still_sees_real_changes(src, dst):
    make_tree(src, {"a": File("1", mtime_ns=1_700_000_000_000_000_000)})
    sync_once(src, dst)
    os.utime(src / "a", ns=(0, 1_700_000_005_000_000_000))  # 5 s later
    result, events = sync_once(src, dst, modify_window_ns=2_000_000_000)
    assert paths(events, "update") == ["a"]


# --- 5, 6. itemized output, the start line ------------------------------------------------


def test_itemize_prints_change_codes_on_stdout(src, dst, log, cli):
    make_tree(src, {"new.txt": "n", "changed.txt": "new!", "d": {}, "l": Link("new.txt")})
    make_tree(dst, {"changed.txt": "old", "gone.txt": "g", "olddir": {"f": "x"}})
    proc = cli(src, dst, 1, log, "--once", "--itemize", "-q")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "*deleting   gone.txt",
        "*deleting   olddir/f",
        "*deleting   olddir/",
        "cd+++++++++ d/",
        "cL+++++++++ l -> new.txt",
        ">f.st...... changed.txt",
        ">f+++++++++ new.txt",
    ]
    assert "*deleting" not in proc.stderr and "*deleting" not in log.read_text()


def test_start_line_names_version_paths_and_options(src, dst, log, cli):
    proc = cli(src, dst, 1, log, "--once", "--checksum", "--exclude", "*.tmp", "--exclude", "x/",
               "--max-delete", "5", "--workers", "2")
    assert proc.returncode == 0
    first = log.read_text().splitlines()[0]
    assert f"sync.py {sync.__version__} started: {src} -> {dst}, once, log {log}; options: " in first
    assert first.endswith("; options: --once --checksum --exclude *.tmp --exclude x/ --max-delete 5 --workers 2")
