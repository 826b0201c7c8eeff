"""sync.py run as a user runs it: a subprocess, its exit status, its log."""

import os
import re

import pytest

from trees import Fifo, File, Link, assert_mirror, make_tree, snapshot

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR)\s+\S")


def messages(text):
    """Log lines without their timestamp and level."""
    return [line.split(None, 3)[3] for line in text.splitlines()]


def test_once_mirrors_and_logs_every_action(src, dst, log, cli):
    make_tree(src, {"a.txt": "hello", "sub": {"b.txt": "world"}, "l": Link("a.txt")})
    make_tree(dst, {"stale.txt": "bye"})
    proc = cli(src, dst, 1, log, "--once")
    assert proc.returncode == 0, proc.stderr
    assert_mirror(src, dst)
    logged = log.read_text(encoding="utf-8")
    assert all(LINE.match(line) for line in logged.splitlines()), logged
    assert messages(logged)[1:-2] == [
        "removed file stale.txt",
        "created link l -> a.txt",
        "created directory sub",
        "copied a.txt (5 bytes)",  # files are copied in parallel, reported in name order
        "copied sub/b.txt (5 bytes)",
    ]
    assert messages(logged)[-2].startswith("pass finished in ")
    assert "copied 2, directories created 1, links created 1, removed 1, errors 0; 10 bytes copied; " \
           "replica is an exact mirror" in logged
    assert messages(proc.stderr) == messages(logged), "the console shows the same lines"
    assert proc.stdout == ""


def test_log_is_appended_never_truncated(src, dst, log, cli):
    make_tree(src, {"f": "x"})
    log.write_text("an earlier line\n")
    assert cli(src, dst, 1, log, "--once").returncode == 0
    assert cli(src, dst, 1, log, "--once").returncode == 0
    text = log.read_text()
    assert text.startswith("an earlier line\n") and text.count("pass finished") == 2


def test_odd_names_are_logged_on_one_line_without_logging_errors(src, dst, log, cli):
    make_tree(src, {b"bad-\xff-utf8": "x", "new\nline": "y", "-leading-dash": "z", "é.txt": "é"})
    proc = cli(src, dst, 1, log, "--once")
    assert proc.returncode == 0, proc.stderr
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    logged = log.read_bytes().decode("utf-8")  # valid UTF-8
    assert 'copied "bad-\\xff-utf8" (1 bytes)' in logged
    assert 'copied "new\\nline" (1 bytes)' in logged
    assert "copied -leading-dash" in logged and "copied é.txt" in logged
    assert all(LINE.match(line) for line in logged.splitlines())
    assert_mirror(src, dst)


def test_quiet_keeps_warnings_on_console_and_the_summary_only_of_a_failed_pass(src, dst, log, cli):
    make_tree(src, {"f": "x", "pipe": Fifo()})
    proc = cli(src, dst, 1, log, "--once", "-q")
    assert proc.returncode == 0
    assert messages(proc.stderr) == ["skipped pipe (FIFO)"]
    assert "copied f (1 bytes)" in log.read_text(), "the log file still has everything"
    (dst / "f").unlink()
    os.mkdir(dst / "f")  # a folder in the way of a file...
    (dst / "f" / "kept").write_text("excluded")  # ...holding what the rules leave alone
    proc = cli(src, dst, 1, log, "--once", "-q", "--exclude", "kept")
    assert proc.returncode == 1
    said = messages(proc.stderr)
    assert said[-1].startswith("pass finished") and said[-1].endswith("replica is NOT yet an exact mirror")


def test_dry_run_changes_nothing_and_says_what_it_would_do(src, dst, log, cli):
    make_tree(src, {"new": "n", "d": {"f": "1"}})
    make_tree(dst, {"old": "o"})
    before = snapshot(dst)
    proc = cli(src, dst, 1, log, "--once", "--dry-run")
    assert proc.returncode == 0
    assert snapshot(dst) == before
    said = messages(log.read_text())
    assert {"would remove file old", "would copy new (1 bytes)", "would create directory d",
            "would copy d/f (1 bytes)"} <= set(said)
    assert any(m.startswith("dry run finished") for m in said)


def test_checksum_option_compares_contents(src, dst, log, cli):
    make_tree(src, {"f": File("AAAA")})
    make_tree(dst, {"f": File("BBBB")})
    assert cli(src, dst, 1, log, "--once").returncode == 0
    assert (dst / "f").read_text() == "BBBB"
    assert cli(src, dst, 1, log, "--once", "--checksum").returncode == 0
    assert (dst / "f").read_text() == "AAAA"


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "{dst}", "1"], "SOURCE '{tmp}/missing' does not exist"),
    (["{src}/file.txt", "{dst}", "1"], "SOURCE '{src}/file.txt' is not a directory"),
    (["{src}", "{src}", "1"], "REPLICA '{src}' is the same folder as SOURCE '{src}'"),
    (["{src}", "{src}/inner", "1"], "REPLICA '{src}/inner' is inside SOURCE '{src}'"),
    (["{src}", "{src}/../src/./sub/x", "1"], "is inside SOURCE"),
    (["{src}/sub", "{src}", "1"], "SOURCE '{src}/sub' is inside REPLICA '{src}'"),
    (["{src}", "{tmp}/alias/inner", "1"], "is inside SOURCE"),  # through a symlink
    (["{src}", "{src}/file.txt", "1"], "REPLICA '{src}/file.txt' exists and is not a directory"),
    (["{src}", "{dst}", "0"], "INTERVAL must be a positive number of seconds, not '0'"),
    (["{src}", "{dst}", "-5"], "INTERVAL must be a positive number of seconds"),
    (["{src}", "{dst}", "soon"], "INTERVAL must be a number of seconds, not 'soon'"),
    (["{src}", "{dst}", "nan"], "INTERVAL must be a positive number of seconds"),
    (["{src}", "{dst}", "inf"], "INTERVAL must be a positive number of seconds"),
])
def test_bad_arguments_exit_2_with_one_line_and_change_nothing(tmp_path, src, dst, cli, args, message):
    make_tree(src, {"file.txt": "x", "sub": {}})
    os.symlink(src, tmp_path / "alias")
    fmt = dict(tmp=tmp_path, src=src, dst=dst)
    before = snapshot(tmp_path)
    proc = cli(*[a.format(**fmt) for a in args], tmp_path / "log.txt", "--once")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("sync.py: error: "), proc.stderr
    assert message.format(**fmt) in proc.stderr
    assert snapshot(tmp_path) == before, "a refused run must change nothing"


@pytest.mark.parametrize("where, message", [
    ("{dst}/sync.log", "LOG_FILE '{dst}/sync.log' is inside REPLICA '{dst}'"),
    ("{tmp}/no-such-folder/sync.log", "folder '{tmp}/no-such-folder' does not exist"),
    ("{tmp}", "is a directory"),
])
def test_unusable_log_file_exits_2(tmp_path, src, dst, cli, where, message):
    dst.mkdir()
    where, message = (s.format(tmp=tmp_path, dst=dst) for s in (where, message))
    proc = cli(src, dst, 1, where, "--once")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert message in proc.stderr


def test_missing_arguments_exit_2_with_one_line(cli):
    proc = cli("only-one")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "the following arguments are required" in proc.stderr


def test_replica_is_created_but_never_its_parents(src, tmp_path, log, cli):
    # A missing parent is a drive that is not mounted (yet): sync.py creates
    # at most REPLICA itself, as rsync does, never a tree on the disk below.
    make_tree(src, {"f": "x"})
    dst = tmp_path / "a" / "b" / "c"
    before = snapshot(tmp_path)
    proc = cli(src, dst, 1, log, "--once")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"REPLICA '{dst}' cannot be created: its folder '{dst.parent}' does not exist " \
           "(is the drive mounted?); nothing was changed" in proc.stderr
    assert snapshot(tmp_path) == before
    dst.parent.mkdir(parents=True)
    assert cli(src, dst, 1, log, "--once").returncode == 0
    assert_mirror(src, dst)


def test_version_and_help(cli):
    version = cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"sync\.py \d+\.\d+\.\d+\n", version.stdout)
    usage = cli("--help")
    assert usage.returncode == 0
    for option in ("--once", "--dry-run", "--checksum", "--quiet", "--verbose", "exit status"):
        assert option in usage.stdout


def test_main_returns_status_instead_of_exiting(src, dst, log):
    import sync
    make_tree(src, {"f": "x"})
    assert sync.main([str(src), str(dst), "1", str(log), "--once", "-q"]) == 0
    assert sync.main([str(src), str(src), "1", str(log), "--once"]) == 2


@pytest.mark.parametrize("flag", ["--delete", "--allow", "--delete-exc", "--allow-empty", "--chec"])
def test_abbreviations_are_not_options(src, dst, log, cli, flag):
    # --delete (an rsync habit) used to mean --delete-excluded, --allow
    # --allow-empty-source: a silent change of meaning.
    make_tree(src, {"f": "x"})
    proc = cli(src, dst, 1, log, "--once", flag)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"unrecognized arguments: {flag}" in proc.stderr
    assert not dst.exists()


@pytest.mark.parametrize("args, message", [
    (["", "{dst}", "1", "{log}"], "SOURCE is empty: give a path"),
    (["{src}", "", "1", "{log}"], "REPLICA is empty: give a path"),
    (["{src}", "{dst}", "1", ""], "LOG_FILE is empty: give a path"),
    (["{src}", "{dst}", "1", "{log}", "--trash", ""], "--trash is empty: give a path"),
    (["{src}", "{dst}", "1", "{log}", "--exclude-from", " "], "--exclude-from is empty: give a path"),
])
def test_an_empty_path_is_refused(tmp_path, src, dst, log, cli, args, message):
    # An unset shell variable: --trash "" used to turn versioning off silently.
    make_tree(src, {"f": "x"})
    before = snapshot(tmp_path)
    proc = cli(*[a.format(src=src, dst=dst, log=log) for a in args], "--once")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option, value", [
    ("--exclude", "[z-a]"), ("--exclude", "[!]"), ("--exclude", "[^]"), ("--exclude", "a[b-"),
    ("--modify-window", "1e300"), ("--trash-keep", "1e300"), ("--max-delete", "99999999999999999999"),
])
def test_odd_values_give_no_traceback(src, dst, log, cli, tmp_path, option, value):
    make_tree(src, {"f": "x", "[z-a]": "y"})
    extra = ["--trash", str(tmp_path / "trash")] if option == "--trash-keep" else []
    proc = cli(src, dst, 1, log, "--once", option, value, *extra)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 2:
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("sync.py: error: ")
    else:
        assert "internal error" not in log.read_text()


def test_help_and_version_return_from_main(capsys):
    import sync
    assert sync.main(["--version"]) == 0 and "sync.py" in capsys.readouterr().out
    assert sync.main(["--help"]) == 0 and "--allow-mass-delete" in capsys.readouterr().out


HELP = """
usage: sync.py SOURCE REPLICA INTERVAL LOG_FILE [options]

Keep REPLICA an exact one-way mirror of SOURCE, re-syncing every INTERVAL
seconds and logging every action to the console and LOG_FILE.

positional arguments:
  SOURCE                folder to copy from (only read)
  REPLICA               folder to make identical to SOURCE (created if
                        missing; its parent folder must exist)
  INTERVAL              seconds between the starts of two passes
  LOG_FILE              file to append the log to (not inside REPLICA)

options:
  -h, --help            show this help message and exit
  --once                run one pass and exit with its status (below)
  -n, --dry-run         log what would be done, change nothing
  -c, --checksum        also compare contents of files whose size and mtime
                        match
  --exclude PATTERN     leave out paths matching PATTERN on both sides, as
                        rsync does (repeatable): '*.tmp' any name, '.git/'
                        folders only, '/cache/***' a top folder and all in it;
                        see README
  --include PATTERN     keep paths matching PATTERN in: the first --include or
                        --exclude that matches decides, as in rsync
  --exclude-from FILE   read exclude patterns from FILE, one a line (# or ;
                        starts a comment; '+ ' and '- ' say the kind)
  --include-from FILE   read include patterns from FILE, the same way
  --delete-excluded     remove excluded paths from REPLICA (by default they
                        are left alone)
  --trash DIR           instead of destroying what a pass deletes or
                        overwrites, move it to DIR/<pass time>/<path> (DIR on
                        REPLICA's file system)
  --trash-keep DAYS     with --trash, remove trash folders of passes older
                        than DAYS
  --modify-window SECONDS
                        count mtimes this close as equal (not needed for FAT,
                        exFAT or NTFS: REPLICA's time resolution is probed; an
                        override for shares that change it)
  --no-perms            do not mirror permission bits (new replica entries get
                        the source's less the umask; existing ones keep
                        theirs)
  --no-links            leave symbolic links out of the mirror (for USB sticks
                        that cannot store them); replica entries of their
                        names are left alone
  --no-owner            do not give replica entries the source's owner (kept
                        by default when run as root)
  --no-group            do not give replica entries the source's group (kept
                        by default where allowed: any as root, a user's own
                        groups otherwise)
  --no-xattrs           do not mirror extended attributes (user.* by default;
                        all as root)
  --no-acls             do not mirror POSIX ACLs
  --no-hard-links       copy each name of a file with several names as a file
                        of its own
  -i, --itemize         print a change code and path per change on stdout, for
                        scripts
  --allow-empty-source  let an empty SOURCE empty a non-empty REPLICA (refused
                        by default: an unmounted drive looks empty)
  --max-delete N        refuse a pass that would delete more than N entries
                        (it changes nothing and fails); replaces the default
                        guard below
  --allow-mass-delete   let a folder's deletions remove more than half of
                        REPLICA, or empty a replica folder of more than 100
                        entries (refused by default: a wrong REPLICA or an
                        unmounted drive looks like this)
  --workers N           processes that mirror separate subtrees at once
                        (default: the number of CPUs, at most 8, here
                        {workers}; 16 where SOURCE or REPLICA is slow to
                        answer, such as a NAS)
  --status-file PATH    after every pass, replace PATH with the pass's outcome
                        as JSON (or, for a name ending in .prom, as Prometheus
                        metrics); see README
  --fsync               flush each copied file, and each changed folder, to
                        the disk before going on, so that a power cut leaves
                        every replica file whole (slower)
  -q, --quiet           console shows nothing when all is well: only warnings
                        and errors, at most 20 a pass, and the summary of a
                        pass that failed (LOG_FILE gets every line)
  -v, --verbose         also log why each entry was judged current or not,
                        moves considered, the worker split and the time of
                        each phase
  --version             show program's version number and exit

exit status (of the last pass: --once, or a loop stopped by a signal):
  0  REPLICA is an exact mirror of SOURCE
  1  not exact: some items could not be mirrored (see the log), or the pass
     was cut short
  2  bad arguments or a failed precondition; nothing was changed
  3  a safety check refused the pass or a folder (empty SOURCE, mass
     deletion, --max-delete, REPLICA's drive gone); nothing there was changed
  4  another sync.py is writing to REPLICA (a scheduled run overlapping);
     nothing was done
  5  internal error (a bug: please report the log lines)
"""


def test_help_says_exactly_this(cli):
    # The help is the interface most users read: every word of it is meant.
    import sync
    usage = cli("--help")
    said = " ".join(usage.stdout.replace("optional arguments:", "options:").split())  # 3.10 says the former
    assert said == " ".join(HELP.format(workers=sync.DEFAULT_WORKERS).split())


def test_usage_errors_name_the_arguments(cli):
    proc = cli("only-source")
    assert proc.returncode == 2
    assert "the following arguments are required: REPLICA, INTERVAL, LOG_FILE" in proc.stderr
    for option, value, message in [("--max-delete", "-3", "expected a whole number of zero or more, not '-3'"),
                                   ("--trash-keep", "x", "expected a number of days of zero or more, not 'x'"),
                                   ("--modify-window", "-1", "expected a number of seconds of zero or more, not '-1'"),
                                   ("--workers", "1.5", "expected a whole number of zero or more, not '1.5'")]:
        proc = cli("s", "r", "1", "l", option, value)
        assert proc.returncode == 2 and f"argument {option}: {message}" in proc.stderr, proc.stderr


def test_the_cli_raises_its_open_file_limit_for_deep_trees(src, dst, log, cli):
    # Two descriptors per level of depth: 150 levels need more than a soft
    # limit of 128, which sync.py raises towards the hard limit at start.
    import resource
    folder = src
    for _ in range(150):
        folder = folder / "d"
    folder.mkdir(parents=True)
    (folder / "leaf").write_text("deep")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = "unlimited" if hard == resource.RLIM_INFINITY else hard
    proc = cli(src, dst, 1, log, "--once", "--workers", "1", user_cmd=("prlimit", f"--nofile=128:{hard}"))
    assert proc.returncode == 0, proc.stderr[-500:]
    assert (dst / os.path.relpath(folder, src) / "leaf").read_text() == "deep"


def test_the_cli_collects_garbage_less_often_during_its_passes_and_restores_the_collector(tmp_path, monkeypatch):
    # A pass's objects are nearly all freed with their folder: a sweep for
    # cycles every 700 new objects cost 7% of a pass over one big folder.
    import gc

    import sync
    seen = []
    real_run_pass = sync.Mirror.run_pass

    def run_pass(self, *args):
        seen.append(gc.get_threshold()[0])
        return real_run_pass(self, *args)

    monkeypatch.setattr(sync.Mirror, "run_pass", run_pass)
    before = gc.get_threshold()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    assert sync.main([str(tmp_path / "src"), str(tmp_path / "dst"), "1", str(tmp_path / "log"), "--once", "-q"]) == 0
    assert seen == [50_000] and gc.get_threshold() == before
