"""Running sync.py unattended (issue 13): quiet when all is well, exit
statuses monitoring can act on, the status file, systemd's notifications,
a log that parses back into its events, the progress line in a real
terminal, and --fsync's order of flushes."""

import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import fcntl

import pytest

import sync
from conftest import ROOT, SYNC_PY, run_cli
from test_loop import passes_logged, wait_for
from trees import assert_mirror, make_tree

LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) +(.*)\Z")


def last_pass_status(log) -> int:
    """The status a loop stopped by a signal should exit with: its last pass's
    (a signal that lands during a pass cuts it short: then not exact)."""
    last = [line for line in log.read_text().splitlines() if "pass finished" in line][-1]
    return 0 if last.endswith("replica is an exact mirror") else 1


def start(*args, env=None, **popen):
    return subprocess.Popen([sys.executable, SYNC_PY, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


# --- 1. quiet means quiet ------------------------------------------------------------


def test_quiet_says_nothing_at_all_when_all_is_well(src, dst, log):
    make_tree(src, {"a": "1", "d": {"b": "2"}})
    for _ in range(2):  # a pass that copies, then one that finds nothing to do
        proc = run_cli(src, dst, 1, log, "--once", "-q")
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert passes_logged(log) == 2, "LOG_FILE still gets everything"
    loop = start(src, dst, 3600, log, "-q")
    wait_for(lambda: passes_logged(log) == 3, "a pass of the loop")
    loop.send_signal(signal.SIGTERM)
    out, err = loop.communicate(timeout=20)
    assert (loop.returncode, out, err) == (0, "", "")
    assert log.read_text().splitlines()[-1].endswith("INFO    stopped by SIGTERM")


def test_quiet_shows_at_most_twenty_problems_a_pass_and_says_where_the_rest_are(src, dst, log):
    make_tree(src, {"ok": "x"})
    for i in range(30):
        os.mkfifo(src / f"fifo{i:02d}")
    proc = run_cli(src, dst, 1, log, "--once", "-q", "--workers", "1")
    assert proc.returncode == 0, proc.stderr  # special files are skipped, not errors
    lines = proc.stderr.splitlines()
    assert len(lines) == 21
    assert all(" WARNING skipped fifo" in line for line in lines[:20])
    assert lines[20].endswith(f"WARNING 10 more warnings and errors of this pass are in LOG_FILE {log}")
    assert log.read_text().count("WARNING skipped fifo") == 30
    assert "more warnings" not in log.read_text(), "the count is for the console only"


def test_a_warning_with_an_unchanged_cause_is_a_warning_once_a_run(src, dst, log):
    make_tree(src, {"ok": "x"})
    os.mkfifo(src / "pipe")
    loop = start(src, dst, 0.05, log, "-q")
    try:
        wait_for(lambda: passes_logged(log) >= 3, "three passes")
    finally:
        loop.send_signal(signal.SIGTERM)
        out, err = loop.communicate(timeout=20)
    text = log.read_text()
    assert text.count("WARNING skipped pipe (FIFO)") == 1
    # Every later pass said it at info level (the last one too, unless the
    # signal stopped it before it reached the FIFO).
    assert passes_logged(log) - 2 <= text.count("INFO    skipped pipe (FIFO)") <= passes_logged(log) - 1
    assert err.count("skipped pipe") == 1 and loop.returncode == last_pass_status(log)


# --- 3. exit statuses ---------------------------------------------------------------------


def test_each_outcome_has_its_own_exit_status(src, dst, log, tmp_path):
    make_tree(src, {"f": "x", "g": "y"})
    assert run_cli(src, dst, 1, log, "--once").returncode == sync.EXIT_OK == 0
    assert run_cli(src, dst, "0", log, "--once").returncode == sync.EXIT_USAGE == 2
    for name in ("f", "g"):
        (src / name).unlink()
    refused = run_cli(src, dst, 1, log, "--once")  # an empty SOURCE: an unmounted drive?
    assert refused.returncode == sync.EXIT_REFUSED == 3, refused.stderr
    (src / "h").write_text("z")
    over = run_cli(src, dst, 1, log, "--once", "--max-delete", "1")
    assert over.returncode == 3 and "more than the limit of 1" in over.stderr
    holder = start(src, dst, 3600, tmp_path / "holder.log")
    try:
        wait_for(lambda: passes_logged(tmp_path / "holder.log") == 1, "the first instance's pass")
        second = run_cli(src, dst, 1, log, "--once")
        assert second.returncode == sync.EXIT_LOCKED == 4
        assert second.stderr.count("\n") == 1 and "is locked by another sync.py" in second.stderr
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=20)
    assert holder.returncode == 0


def test_a_bug_exits_5_with_the_traceback_in_the_log(src, dst, log):
    broken = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sync\n"
              "def bug(self, roots): raise RuntimeError('planted')\n"
              "sync._Walk.run = bug\n"
              "sys.exit(sync.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", broken, str(src), str(dst), "1", str(log), "--once"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == sync.EXIT_BUG == 5
    lines = log.read_text().splitlines()
    crash = next(i for i, line in enumerate(lines) if " CRITICAL internal error: " in line)
    assert lines[crash].endswith(" CRITICAL internal error: this is a bug in sync.py; please report it with "
                                 "these lines")
    assert lines[crash + 1] == "Traceback (most recent call last):", "the whole traceback follows"
    assert lines[-1] == "RuntimeError: planted"
    assert "RuntimeError: planted" in proc.stderr, "the console shows it too"


def test_a_loop_stopped_by_a_signal_exits_with_its_last_pass_status(src, dst, log):
    make_tree(dst, {"precious": "data"})
    loop = start(src, dst, 3600, log)  # an empty SOURCE beside a full REPLICA: the pass is refused
    try:
        wait_for(lambda: passes_logged(log) == 1, "the refused pass")
    finally:
        loop.send_signal(signal.SIGHUP)
        loop.communicate(timeout=20)
    assert loop.returncode == sync.EXIT_REFUSED
    assert log.read_text().splitlines()[-1].endswith("stopped by SIGHUP")
    assert (dst / "precious").read_text() == "data"


def test_no_arguments_print_the_usage_and_where_to_read_more(tmp_path):
    proc = subprocess.run([sys.executable, SYNC_PY], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "usage: sync.py SOURCE REPLICA INTERVAL LOG_FILE [options]", *sync._DESCRIPTION.splitlines(),
        "Try 'sync.py --help' for the options and exit statuses."]
    help_text = subprocess.run([sys.executable, SYNC_PY, "--help"], capture_output=True, text=True).stdout
    for status in range(6):
        assert re.search(rf"^  {status}  \w", help_text, re.M), f"exit status {status} is explained"


def test_the_start_line_says_the_values_in_effect(src, dst, log):
    assert run_cli(src, dst, 1, log, "--once", "--workers", "0").returncode == 0
    assert log.read_text().splitlines()[0].endswith("options: --once --workers 1")


# --- 4. the status file -----------------------------------------------------------------


def test_the_status_file_says_what_each_pass_did(src, dst, log, tmp_path):
    status = tmp_path / "status.json"
    make_tree(src, {"f": "hello", "d": {"g": "world"}})
    assert run_cli(src, dst, 1, log, "--once", "--status-file", status).returncode == 0
    first = json.loads(status.read_text())
    assert first["schema"] == 1 and first["exact"] is True and first["status"] == 0
    assert first["counts"] == {"copy": 2, "mkdir": 1} and first["bytes_copied"] == 10
    assert first["errors"] == 0 and first["last_errors"] == [] and first["next_pass"] is None
    assert first["replica"] == str(dst) and first["mode"] == "once"
    for key in ("started", "finished"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first[key])
    shutil.rmtree(src / "d")
    (src / "f").unlink()
    assert run_cli(src, dst, 1, log, "--once", "--status-file", status).returncode == 3
    refused = json.loads(status.read_text())
    assert refused["exact"] is False and refused["refused"] is True and refused["status"] == 3
    assert refused["errors"] == 1 and "SOURCE is empty" in refused["last_errors"][0]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".status")] == [], "no temporary file left"


def test_a_loop_says_when_its_next_pass_starts_and_prometheus_can_read_it(src, dst, log, tmp_path):
    prom = tmp_path / "sync.prom"
    make_tree(src, {"f": "x"})
    loop = start(src, dst, 3600, log, "--status-file", prom)
    try:
        wait_for(lambda: passes_logged(log) == 1 and prom.exists(), "the first pass")
    finally:
        loop.send_signal(signal.SIGTERM)
        loop.communicate(timeout=20)
    samples = {}
    for line in prom.read_text().splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    where = f'{{replica="{dst}"}}'
    assert samples[f"syncpy_last_pass_exact{where}"] == 1
    assert samples[f"syncpy_last_pass_errors{where}"] == 0
    assert samples[f'syncpy_last_pass_actions{{replica="{dst}",action="copy"}}'] == 1
    ended, next_pass = samples[f"syncpy_last_pass_end_timestamp_seconds{where}"], \
        samples[f"syncpy_next_pass_timestamp_seconds{where}"]
    assert 3590 < next_pass - ended <= 3600


def test_a_status_file_that_cannot_be_written_is_said_once_and_syncing_goes_on(src, dst, log, tmp_path):
    folder = tmp_path / "status"
    folder.mkdir()
    make_tree(src, {"f": "x"})
    loop = start(src, dst, 0.05, log, "--status-file", folder / "sync.json")
    try:
        wait_for(lambda: passes_logged(log) >= 1, "a pass")
        # Moved away at once, not removed: rmtree could race a status write
        # of the loop (a temporary file made after rmtree listed the folder).
        folder.rename(tmp_path / "gone")
        seen = passes_logged(log)
        wait_for(lambda: passes_logged(log) >= seen + 3, "three more passes")
    finally:
        loop.send_signal(signal.SIGTERM)
        loop.communicate(timeout=20)
    assert loop.returncode == last_pass_status(log)
    assert log.read_text().count("cannot write --status-file") == 1


def test_a_status_file_inside_replica_is_refused(src, dst, log):
    dst.mkdir()
    proc = run_cli(src, dst, 1, log, "--once", "--status-file", dst / "status.json")
    assert proc.returncode == 2 and "--status-file" in proc.stderr and "inside REPLICA" in proc.stderr


# --- 5. systemd ---------------------------------------------------------------------


def test_systemd_hears_ready_status_watchdog_and_stopping(src, dst, log, tmp_path):
    make_tree(src, {"f": "x"})
    address = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "300000"}
    loop = start(src, dst, 3600, log, env=env)
    try:
        heard = []
        while heard.count("WATCHDOG=1") < 3:  # pinged while it sleeps between passes
            heard += listener.recv(4096).decode().split("\n")
        loop.send_signal(signal.SIGHUP)
        while "STOPPING=1" not in heard:
            heard += listener.recv(4096).decode().split("\n")
        loop.communicate(timeout=20)
    finally:
        loop.kill()
        listener.close()
    assert heard[0] == "READY=1" and heard[1].startswith("STATUS=first pass running")
    assert any(m.startswith("STATUS=pass finished") and m.endswith("replica is an exact mirror") for m in heard)
    assert heard.index("STOPPING=1") > heard.index("WATCHDOG=1")
    assert loop.returncode == 0 and log.read_text().splitlines()[-1].endswith("stopped by SIGHUP")


def test_without_notify_socket_nothing_is_sent():
    notifier = sync._Notifier({})
    assert notifier.sock is None and notifier.watchdog is None
    notifier.send("READY=1")  # and nothing fails


# --- 6. the log parses ------------------------------------------------------------------

# The phrases an action line starts with (README, "The log"); longest first.
PHRASES = {
    "copied": "copy", "updated": "update", "moved": "move", "created directory": "mkdir",
    "created link": "link", "updated link": "relink", "linked": "hardlink", "set attributes of": "attrs",
    "removed file": "remove", "removed link": "remove", "removed special file": "remove",
    "removed directory": "rmdir", "kept old version of": "trash", "pruned trash folder": "prune",
    "removed leftover temporary file": "temp", "skipped": "skip", "changed while copying": "changed",
    "vanished before copying": "vanished", "kept another time for": "clamped",
}
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^ ]+')


def unquote(token: str) -> str:
    """A path token back to the path (the README's rule)."""
    if not token.startswith('"'):
        return "" if token == "." else token
    out, body, i = [], token[1:-1], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        kind = body[i + 1]
        if kind in '\\"':
            out.append(kind)
            i += 2
        elif kind in "ntr":
            out.append({"n": "\n", "t": "\t", "r": "\r"}[kind])
            i += 2
        elif kind == "x":  # a byte that is not UTF-8
            out.append(chr(0xDC00 + int(body[i + 2:i + 4], 16)))
            i += 4
        else:
            width = 4 if kind == "u" else 8
            out.append(chr(int(body[i + 2:i + 2 + width], 16)))
            i += 2 + width
    return "".join(out)


def parse(message: str, level: str):
    """(action, path) of a line about an entry, or None for a line about the run."""
    if level in ("ERROR", "DEBUG"):
        action = "error" if level == "ERROR" else "debug"
        match = TOKEN.match(message)
        token = match.group(0)
        if token.startswith('"') and message[match.end():].startswith(": "):
            return action, unquote(token)
        if not token.startswith('"') and token.endswith(":"):
            return action, unquote(token[:-1])
        return action, ""  # about the whole pass
    message = message.removeprefix("would ")
    for phrase in sorted(PHRASES, key=len, reverse=True):
        would = {"copied": "copy", "updated": "update", "moved": "move", "linked": "link",
                 "kept old version of": "keep old version of", "pruned trash folder": "prune trash folder",
                 "set attributes of": "set attributes of"}
        for said in {phrase, would.get(phrase, phrase), phrase.replace("removed", "remove")
                     .replace("created", "create").replace("updated", "update")}:
            if message.startswith(said + " "):
                return PHRASES[phrase], unquote(TOKEN.match(message[len(said) + 1:]).group(0))
    return None


NAMES = ["plain.txt", "with space.txt", 'quote".txt', "back\\slash", "new\nline", "tab\there",
         "caf\u00e9", "\u00a0nbsp", "arrow -> x", "paren (1)", "colon: x", "ends with colon:"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_every_line_of_a_varied_run_splits_back_into_its_event(src, dst, log, tmp_path, monkeypatch, dry_run):
    make_tree(src, {name: name for name in NAMES} | {"d e": {"x y": "1"}, "gone dir": {"f": "2"},
                                                      "gone file": "3", "renamed from": "r" * 50})
    os.symlink("with space.txt", src / "link me")
    os.link(src / "plain.txt", src / "hard link")
    os.mkfifo(src / "fifo pipe")
    (src / os.fsdecode(b"bad\xffbyte")).write_text("latin-1")
    assert sync.main([str(src), str(dst), "1", str(tmp_path / "first.log"), "--once", "-q"]) == 0
    os.rename(src / "renamed from", src / "renamed to")
    for name in ("gone file",):
        (src / name).unlink()
    shutil.rmtree(src / "gone dir")
    os.chmod(src / "d e", 0o700)
    (src / "with space.txt").write_text("changed!")
    (dst / ".syncpy-0123456789abcdef.tmp").write_text("left by a killed pass")
    events = []
    real_event = sync._Reporter.event
    monkeypatch.setattr(sync._Reporter, "event", lambda self, e: (events.append(e), real_event(self, e)))
    trash = tmp_path / "trash"
    args = [str(src), str(dst), "1", str(log), "--once", "-q", "-v", "--trash", str(trash), "--workers", "1"]
    assert sync.main(args + ["--dry-run"] * dry_run) == 0
    parsed = []
    for line in log.read_text().splitlines():
        time_, level, message = LINE.match(line).groups()
        got = parse(message, level)
        if got is not None:
            parsed.append(got)
    expected = [(e.action, e.path) for e in events if e.action not in sync._RUN_ACTIONS]
    assert parsed == expected
    actions = {e.action for e in events}
    assert {"update", "move", "remove", "rmdir", "attrs", "temp", "skip", "debug"} <= actions, actions
    removed = [line for line in log.read_text().splitlines() if "gone file" in line and "remove" in line]
    assert removed == [line for line in removed if ("would keep it in trash" if dry_run else "kept in trash as")
                       in line] and removed
    assert "would" in log.read_text().splitlines()[-2] if dry_run else True


def test_folder_permission_changes_are_logged_itemized_and_previewed(src, dst, log):
    make_tree(src, {"d": {"f": "x"}})
    assert run_cli(src, dst, 1, log, "--once").returncode == 0
    os.chmod(src / "d", 0o750)
    preview = run_cli(src, dst, 1, log, "--once", "--dry-run", "--itemize")
    assert preview.stdout == ".d...p..... d/\n" and "would set attributes of d (permissions 0o750)" in preview.stderr
    assert os.stat(dst / "d").st_mode & 0o777 != 0o750
    done = run_cli(src, dst, 1, log, "--once", "--itemize")
    assert done.stdout == ".d...p..... d/\n" and "set attributes of d (permissions 0o750)" in done.stderr
    assert os.stat(dst / "d").st_mode & 0o777 == 0o750


# --- 7. the progress line in a real terminal ----------------------------------------------

SLOW_PASS = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import sync
sync._Progress.DELAY, sync._Progress.PERIOD = 0.1, 0.02
real = sync._copy_file
def slow(*args, **kwargs):
    time.sleep(0.03)
    return real(*args, **kwargs)
sync._copy_file = slow
sys.exit(sync.main(sys.argv[1:]))
"""


def run_in_terminal(src, dst, log, columns, resize_to=None):
    """Run a slow pass on a pseudo-terminal of the given width; returns what
    it wrote there.  resize_to: narrow the window halfway, with SIGWINCH."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PASS, str(src), str(dst), "1", str(log), "--once",
                             "--workers", "1"], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output, resized = b"", resize_to is None
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        output += chunk
        if not resized and output.count(b"copied") >= 20:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, resize_to, 0, 0))
            proc.send_signal(signal.SIGWINCH)
            output += b"<RESIZED>"
            resized = True
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return output.decode()


def progress_segments(output: str) -> list:
    """The progress lines drawn: what follows a carriage return on a line."""
    segments = []
    for line in output.replace("\r\n", "\n").split("\n"):
        for part in line.split("\r")[1:]:
            part = part.replace("\x1b[K", "")
            if part and not re.match(r"\d{4}-\d\d-\d\d ", part):  # not a log line
                segments.append(part)
    return segments


@pytest.mark.parametrize("columns", [80, 40])
def test_the_progress_line_never_wraps_and_stays_below_the_log(src, dst, log, columns):
    make_tree(src, {f"file-with-a-long-name-{i:03d}.txt": "x" * i for i in range(60)})
    output = run_in_terminal(src, dst, log, columns)
    segments = progress_segments(output)
    assert len(segments) >= 5, output[-500:]
    assert all(len(s) <= columns - 1 for s in segments), max(segments, key=len)
    assert any("copied" in s and "checked" in s for s in segments)
    # Each log line first clears the progress line, so none is left mixed in it.
    for line in output.replace("\r\n", "\n").split("\n"):
        if " INFO " in line:
            assert re.match(r"(\r\x1b\[K)*\d{4}-", line.split("\r\x1b[K")[-1] if "\r" in line else line)


def test_finished_copies_are_reported_while_their_folder_is_copied(src, dst, monkeypatch):
    # The progress line and the log's times follow the events: a folder's copies
    # held back until the folder is done would freeze both, then flood the log.
    # Reported every REPORT_EVERY seconds; at 0, after each copy.
    monkeypatch.setattr(sync, "REPORT_EVERY", 0.0)
    make_tree(src, {f"f{i}": "x" for i in range(5)})
    seen, real = [], sync._copy_file
    def copy(sd, dd, name, *args):
        seen.append(("copying", name))
        return real(sd, dd, name, *args)
    monkeypatch.setattr(sync, "_copy_file", copy)
    sync.run_pass(str(src), str(dst), sync.Options(workers=1), lambda e: seen.append((e.action, e.path)))
    assert seen == [step for i in range(5) for step in (("copying", f"f{i}"), ("copy", f"f{i}"))]
    assert_mirror(src, dst)


def test_the_progress_line_is_fitted_again_when_the_window_narrows(src, dst, log):
    make_tree(src, {f"f{i:03d}": "x" for i in range(80)})
    output = run_in_terminal(src, dst, log, 100, resize_to=40)
    before, after = output.split("<RESIZED>")
    wide, narrow = progress_segments(before), progress_segments(after)
    assert any(len(s) > 40 for s in wide), "at 100 columns the long wording is used"
    # What the terminal shows after the resize may still hold lines drawn
    # before it (not read yet); once a line fits 40 columns, every later one does.
    fitted = next(i for i, s in enumerate(narrow) if len(s) <= 39)
    assert narrow[fitted:] and all(len(s) <= 39 for s in narrow[fitted:]), narrow


# --- 12. --fsync ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (.ci/run installs it)")
def test_fsync_flushes_each_file_before_its_rename_and_each_changed_folder_after(src, dst, log, tmp_path):
    make_tree(src, {"a": "1", "d": {"b": "2", "e": {"c": "3"}}})
    def trace(*extra):
        out = tmp_path / "trace"
        subprocess.run(["strace", "-f", "-o", str(out), "-e", "trace=openat,fsync,fdatasync,renameat,renameat2",
                        sys.executable, SYNC_PY, str(src), str(dst), "1", str(log), "--once", "--workers", "1",
                        *extra], check=True, capture_output=True)
        return [line.split(None, 1)[1] for line in out.read_text().splitlines() if "resumed" not in line]
    calls = trace("--fsync")
    temp_fds, flushed, renamed_into = {}, set(), []
    for call in calls:
        opened = re.match(r'openat\((\d+), "(\.syncpy-[0-9a-f]{16}\.tmp)", O_WRONLY.* = (\d+)', call)
        if opened:
            temp_fds[opened[2]] = int(opened[3])
            flushed.discard(int(opened[3]))  # a descriptor number used again
        elif (m := re.match(r"fsync\((\d+)\)", call)):
            flushed.add(int(m[1]))
            if renamed_into and int(m[1]) in renamed_into:
                renamed_into = [fd for fd in renamed_into if fd != int(m[1])]
        elif (m := re.match(r'renameat2?\((\d+), "(\.syncpy-[0-9a-f]{16}\.tmp)", (\d+), "([^"]+)"', call)):
            if m[4] in ("a", "b", "c"):
                assert temp_fds[m[2]] in flushed, f"{m[4]} took its name before its data was flushed"
                renamed_into.append(int(m[3]))
    assert sorted(n for n in ("a", "b", "c") if any(f'"{n}")' in c for c in calls)) == ["a", "b", "c"]
    assert renamed_into == [], "every folder a file was renamed into is flushed after it"
    assert_mirror(src, dst)
    shutil.rmtree(dst)
    assert not any(call.startswith("fsync") for call in trace()), "without --fsync, nothing is flushed"


def test_the_watchdog_is_fed_only_while_the_run_moves(monkeypatch):
    class Signals:
        def is_set(self):
            return False

        def aborted(self):
            return False

        def wait(self, seconds):
            assert heart.alive(1.0), "asleep between passes counts as alive"
            now[0] += seconds

    now = [100.0]
    monkeypatch.setattr(sync.time, "monotonic", lambda: now[0])
    heart = sync._Heartbeat(Signals())
    assert heart.alive(1.0)
    now[0] += 5  # five seconds inside one system call (a hung share): no poll
    assert not heart.alive(1.0)
    heart.is_set()  # the pass polls between entries
    assert heart.alive(1.0)
    now[0] += 5
    heart.aborted()  # a copy polls every chunk
    assert heart.alive(1.0)
    heart.wait(600)
    assert heart.alive(1.0)


def test_the_status_file_is_readable_by_monitoring_and_never_writes_through_a_link(src, dst, log, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    status = tmp_path / "status.json"
    os.symlink(victim, status)  # planted where the status file goes
    assert run_cli(src, dst, 1, log, "--once", "--status-file", status).returncode == 0
    assert victim.read_text() == "precious" and not status.is_symlink()
    assert json.loads(status.read_text())["exact"] is True
    assert os.stat(status).st_mode & 0o777 == 0o666 & ~sync._umask(), "a monitoring user may read it"
