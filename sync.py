"""sync.py: keep REPLICA an exact one-way mirror of SOURCE.

    python sync.py SOURCE REPLICA INTERVAL LOG_FILE [options]

What a pass guarantees
----------------------
After a pass that reports no errors, REPLICA holds exactly the relative paths
of SOURCE, and each path is the same kind of entry (regular file, directory,
symbolic link):

* files have the same bytes, permission bits and modification time
  (nanoseconds where the file system keeps them);
* directories have the same permission bits (read-only ones included, applied
  after their contents are written) and modification time; empty directories
  are mirrored;
* symbolic links are recreated with the same target text and are never
  followed, on either side;
* everything else under REPLICA is removed, except paths left out with
  ``excludes`` (unless ``delete_excluded``).

SOURCE is only ever read.  A replica file is current when its size and mtime
*equal* the source's (never "newer than"); ``checksum=True`` also compares the
bytes.  Files are written to a uniquely named temporary file in the target
directory and moved over the final name with ``os.replace``, so a process
killed at any moment leaves each file either complete-old or complete-new;
leftover temporary files are removed by the next pass.  Errors are per item: an
entry that cannot be read or written is reported and skipped, the pass goes on,
and the next pass retries it.  A source directory that cannot be listed never
looks empty: nothing under its replica counterpart is deleted.  Special files
(FIFOs, sockets, devices) are never opened; they are skipped with a warning.

Where the OS allows (Linux, macOS, BSD) every operation inside the trees is made
relative to an open directory file descriptor with O_NOFOLLOW, as
``shutil.rmtree`` does, so a symbolic link swapped into either tree cannot
redirect a read, a write or a deletion, and path length is not limited by
PATH_MAX.  The walk keeps an explicit stack, so depth is not limited by
Python's recursion limit.

Refusals that protect the replica: an empty SOURCE root beside a non-empty
REPLICA (an unmounted drive) changes nothing unless ``allow_empty_source``;
a pass that would delete more than ``max_delete`` entries changes nothing.
With ``trash``, what a pass deletes or overwrites is moved (or hard-linked)
to TRASH/<pass time>/<path> instead of destroyed.  Entries the source renamed
within a folder are renamed in the replica rather than copied again.  Worker
processes walk separate subtrees at once; the events still come in the order
one process would give.

The core (everything above the CLI section) never prints and never exits: it
reports what it does through a callback, returns results and raises.  Only
``main()`` turns them into log lines, messages and exit codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import logging.handlers
import math
import mmap
import os
import pickle
import itertools
import re
import selectors
import signal
import stat
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__version__ = "0.1.0"

# ---------------------------------------------------------------- constants --

EXIT_OK = 0  # the replica is an exact mirror (or the loop was stopped)
EXIT_FAILED = 1  # at least one item could not be mirrored
EXIT_USAGE = 2  # bad arguments or a precondition failed; nothing was changed

# Temporary files are named so that they can never collide with each other and
# are recognised by a later pass: ".syncpy-<16 hex digits>.tmp".  The name has a
# fixed length, so a 255-byte source name still gets a valid temporary name.
TEMP_PREFIX = ".syncpy-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.syncpy-[0-9a-f]{16}\.tmp\Z")
# A trash folder per pass: TRASH/2026-11-25_114530.123/<relative path>
_TRASH_STAMP = re.compile(r"(\d{4}-\d\d-\d\d_\d{6})\.\d{3}\Z")

COPY_CHUNK = 1 << 20  # bytes per read for the buffered copy and comparisons
# Worker processes walk separate subtrees at once.  Processes, not threads:
# a pass is mostly system calls of a microsecond each, and threads spend
# more handing the GIL around such calls than they win.
DEFAULT_WORKERS = max(1, min(os.cpu_count() or 1, 8))
SPLIT_MIN_TASKS = 4  # subtrees per worker before the tree is split among workers
SPLIT_MAX_DEPTH = 6  # levels the main process walks looking for them
_CAN_FORK = hasattr(os, "fork") and sys.platform != "darwin"  # fork is unsafe on macOS
# Threads do pay where one system call moves much data and releases the GIL
# for long: files from this size are copied and compared by a few threads.
PARALLEL_MIN_SIZE = 1 << 20
LARGE_FILE_THREADS = 4

_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not block open()
_O_NOATIME = getattr(os, "O_NOATIME", 0)  # reading should not touch the source's atime

# Directory file descriptors, where the platform has every call we need.
_DIR_FD = (
    {os.open, os.stat, os.mkdir, os.rmdir, os.unlink, os.rename, os.readlink, os.symlink}
    <= os.supports_dir_fd
    and os.scandir in os.supports_fd
    and os.chmod in os.supports_fd
    and os.utime in os.supports_fd
    and bool(_O_NOFOLLOW)
    # Tests set this to run the path-based code that Windows uses, on Linux.
    and not os.environ.get("SYNCPY_NO_DIR_FD")
)

# Kinds of entry.
FILE = "file"
DIR = "directory"
LINK = "link"
SPECIAL = "special file"

# ------------------------------------------------------------- small types --


class Entry(NamedTuple):
    """One directory entry as lstat saw it (st is None for links)."""

    kind: str
    st: Optional[os.stat_result]
    target: Optional[str] = None  # link target text


class Event(NamedTuple):
    """Something a pass did, would do (dry run), or failed to do.

    action is one of ACTIONS; path is relative to the mirror root, with "/"
    between components ("" is the root itself).
    """

    action: str
    path: str
    detail: str = ""


# Every action a pass reports, and the severity main() logs it at.
ACTIONS = {
    "mkdir": logging.INFO,  # created a directory
    "copy": logging.INFO,  # copied a new file
    "update": logging.INFO,  # replaced a changed file
    "link": logging.INFO,  # created a symbolic link
    "relink": logging.INFO,  # replaced a symbolic link whose target changed
    "chmod": logging.INFO,  # changed permission bits only
    "remove": logging.INFO,  # removed a file, link or special file
    "rmdir": logging.INFO,  # removed a directory
    "temp": logging.INFO,  # removed a temporary file left by an interrupted pass
    "move": logging.INFO,  # renamed a replica entry the source renamed (detail: old path)
    "trash": logging.INFO,  # moved (or, for an update, linked) an old version to the trash
    "prune": logging.INFO,  # removed a trash folder older than --trash-keep (path: its name)
    "vanished": logging.INFO,  # a source file disappeared before it could be copied
    "skip": logging.WARNING,  # a source entry that is never mirrored (special file)
    "changed": logging.WARNING,  # a source file changed while it was being copied
    "overrun": logging.WARNING,  # a pass took longer than the interval
    "error": logging.ERROR,  # an item could not be mirrored
}


@dataclass
class Options:
    """How a pass behaves."""

    checksum: bool = False  # also compare bytes when size and mtime are equal
    dry_run: bool = False  # report what would be done, change nothing
    allow_empty_source: bool = False  # let an empty SOURCE empty a non-empty REPLICA
    max_delete: Optional[int] = None  # refuse a pass that would delete more entries
    # Processes that walk subtrees at once (forked where the OS allows; a
    # multi-threaded program calling run_pass should pass 1: all in the caller).
    workers: int = DEFAULT_WORKERS
    excludes: Optional["Excludes"] = None  # paths left out of the mirror on both sides
    delete_excluded: bool = False  # remove excluded paths from REPLICA after all
    modify_window_ns: int = 0  # mtimes this close count as equal (FAT, SMB)
    trash: Optional[str] = None  # move what a pass deletes or overwrites here, not destroy it
    trash_keep_days: Optional[float] = None  # prune trash folders of older passes


@dataclass
class PassResult:
    """What one pass did."""

    counts: Counter = field(default_factory=Counter)  # action -> number of events
    checked: int = 0  # source entries examined
    bytes_copied: int = 0
    errors: int = 0
    duration: float = 0.0
    interrupted: bool = False  # stopped early on request

    @property
    def exact(self) -> bool:
        """True when the replica is now an exact mirror of the source."""
        unsettled = self.counts["changed"] + self.counts["vanished"]
        return not (self.errors or self.interrupted or unsettled)


class UsageError(Exception):
    """Bad arguments or a failed precondition: nothing has been changed."""


class _Vanished(Exception):
    """The source file disappeared between listing and copying."""


class _NotRegular(Exception):
    """The source name no longer refers to a regular file."""


def _ignore(event: Event) -> None:
    pass


class Excludes:
    """Glob patterns for paths left out of the mirror.

    A pattern is matched, case-sensitively, against the entry's path relative
    to the mirror root when it contains a "/" (a leading "/" is optional),
    and against the entry's name at any depth when it does not.  A trailing
    "/" limits it to directories.  "*" and "?" match within one path
    component, "**" across components, [abc] and [!abc] one character of a
    set.  An excluded directory is not looked into.
    """

    def __init__(self, patterns):
        self.patterns = [p for p in patterns if p.strip("/")]
        names, paths, dir_names, dir_paths = [], [], [], []
        for pattern in self.patterns:
            dir_only = pattern.endswith("/")
            body = pattern.strip("/") if pattern.startswith("/") else pattern.rstrip("/")
            anchored = pattern.startswith("/") or "/" in body
            regex = _glob_regex(body)
            if anchored:
                (dir_paths if dir_only else paths).append(regex)
            else:
                (dir_names if dir_only else names).append(regex)
        self._names, self._paths = _union(names), _union(paths)
        self._dir_names, self._dir_paths = _union(dir_names), _union(dir_paths)

    def __bool__(self):
        return bool(self.patterns)

    def match(self, rel: str, name: str, is_dir: bool) -> bool:
        if self._names and self._names.fullmatch(name) or self._paths and self._paths.fullmatch(rel):
            return True
        return is_dir and bool(self._dir_names and self._dir_names.fullmatch(name)
                               or self._dir_paths and self._dir_paths.fullmatch(rel))


def _glob_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = glob[i]
        end = glob.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end > 0:
            inner = glob[i + 1:end]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _union(regexes: list):
    return re.compile("|".join(f"(?:{r})" for r in regexes), re.DOTALL) if regexes else None


def read_exclude_file(path: str) -> list:
    """Patterns from a file: one a line; blank lines and lines starting with # are ignored."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [line.rstrip("\r\n") for line in f if line.strip() and not line.startswith("#")]


# ---------------------------------------------- directories, scanning, comparing --
#
# A "directory handle" is an open file descriptor where _DIR_FD holds and a
# path elsewhere.  _at() turns a handle and a name into the (path, dir_fd) pair
# that os functions take, so the rest of the code is the same on both.

if _DIR_FD:

    def _at(d, name):
        return name, d

    def _open_dir(d, name):
        """Open the directory NAME inside D without following a link."""
        return os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=d)

    def _open_root(path):
        # The roots the user named may be links (followed once, on purpose).
        return os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)

    def _close_dir(d):
        os.close(d)

else:  # Windows, and SYNCPY_NO_DIR_FD in the tests

    def _at(d, name):
        return os.path.join(d, name), None

    def _open_dir(d, name):
        path = os.path.join(d, name)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
        return path

    def _open_root(path):
        os.stat(path)  # FileNotFoundError and the like, as os.open would raise
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
        return path

    def _close_dir(d):
        pass


_KINDS = {stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: LINK}  # else SPECIAL


def _scan(d) -> tuple[dict, list]:
    """List one directory without following links.

    Returns {name: Entry} and [(name, OSError)] for entries that were listed but
    could not be examined.  An entry that vanished since it was listed is
    simply absent.  Raises OSError when the directory itself cannot be listed.
    """
    # This loop runs once per entry on both sides: it is kept lean on purpose
    # (tuple.__new__ skips the NamedTuple's Python-level constructor).
    entries, failed = {}, []
    make, kinds, ifmt = tuple.__new__, _KINDS, 0o170000
    with os.scandir(d) as listing:
        for item in listing:
            name = item.name
            try:
                if item.is_symlink():  # answered by d_type: no stat needed
                    path, fd = _at(d, name)
                    entries[name] = make(Entry, (LINK, None, os.readlink(path, dir_fd=fd)))
                else:
                    st = item.stat(follow_symlinks=False)
                    entries[name] = make(Entry, (kinds.get(st.st_mode & ifmt, SPECIAL), st, None))
            except FileNotFoundError:
                continue
            except OSError as err:
                failed.append((name, err))
    return entries, failed


def _same_signature(a: os.stat_result, b: os.stat_result, window_ns: int = 0) -> bool:
    """Size equal and mtime equal (within window_ns): the cheap test, as filecmp._sig does."""
    return a.st_size == b.st_size and abs(a.st_mtime_ns - b.st_mtime_ns) <= window_ns


def _open_source_file(d, name) -> int:
    """Open a source file for reading: no link followed, no FIFO blocking."""
    path, fd = _at(d, name)
    flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY
    if _O_NOATIME:
        try:
            return os.open(path, flags | _O_NOATIME, dir_fd=fd)
        except PermissionError as err:
            if err.errno != errno.EPERM:  # EPERM: not our file, O_NOATIME not allowed
                raise
    return os.open(path, flags, dir_fd=fd)


def _same_contents(sd, dd, name, dst_name=None) -> bool:
    """Compare the bytes of NAME in sd with those of DST_NAME (or NAME) in dd."""
    fa = _open_source_file(sd, name)
    try:
        fb = _open_source_file(dd, dst_name or name)
        try:
            while True:
                a = os.read(fa, COPY_CHUNK)
                b = os.read(fb, COPY_CHUNK)
                if a != b:
                    return False
                if not a:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


# ------------------------------------------------------------------ actions --


_temp_counter = itertools.count()


def _temp_name() -> str:
    # Unique among running processes (the pid) and within one (a counter); a
    # clash with a file left by a dead process is met by O_EXCL: see _create_temp.
    return f"{TEMP_PREFIX}{os.getpid() & 0xFFFFFFFF:08x}{next(_temp_counter) & 0xFFFFFFFF:08x}{TEMP_SUFFIX}"


def _create_temp(dd, create):
    """create(path, dir_fd) under fresh temporary names until one is free;
    returns (path, dir_fd, what create returned)."""
    for _ in range(1000):
        path, fd = _at(dd, _temp_name())
        try:
            return path, fd, create(path, fd)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name")


def _create_temp_file(path, dir_fd) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
    return os.open(path, flags, 0o600, dir_fd=dir_fd)


def _copy_bytes(fin: int, fout: int, size_hint: int) -> int:
    """Copy from fin's position until size_hint bytes are copied or EOF;
    return the number of bytes copied.  (A file that grew meanwhile is
    caught by _copy_file, which compares fstat before and after.)

    Tries the kernel's fast paths first (copy_file_range can clone blocks on
    btrfs/XFS/NFS 4.2; sendfile avoids user-space buffers) and falls back to a
    buffered copy when a fast path is refused before it copied anything.
    """
    total = 0
    for fast in (getattr(os, "copy_file_range", None), getattr(os, "sendfile", None)):
        if fast is None or sys.platform == "win32":
            continue
        try:
            while True:
                if fast is os.sendfile:
                    n = os.sendfile(fout, fin, total, COPY_CHUNK * 8)
                else:
                    n = os.copy_file_range(fin, fout, COPY_CHUNK * 8)
                if n == 0:
                    break
                total += n
                if total >= size_hint:
                    break  # saves the call that would find EOF; growth shows in the caller's fstat
        except OSError as err:
            if total or err.errno not in (
                errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                errno.ENOTSUP, errno.EBADF, errno.ETXTBSY, errno.EPERM,
            ):
                raise
            continue
        # Some file systems answer 0 for a non-empty file: try the next way.
        if total or not size_hint:
            return total
    while True:
        chunk = os.read(fin, COPY_CHUNK)
        if not chunk:
            return total
        view = memoryview(chunk)
        while view:
            written = os.write(fout, view)
            view = view[written:]
        total += len(chunk)


def _set_file_stat(fout: int, path, dir_fd, st: os.stat_result) -> None:
    """Give a freshly written file the source's permission bits and times."""
    mode = stat.S_IMODE(st.st_mode)
    times = (st.st_atime_ns, st.st_mtime_ns)
    if _DIR_FD:
        os.chmod(fout, mode)
        os.utime(fout, ns=times)
    else:  # by path (Windows, and SYNCPY_NO_DIR_FD), after the data is flushed
        os.utime(path, ns=times)
        os.chmod(path, mode)


def _copy_file(sd, dd, name) -> tuple[int, bool]:
    """Copy NAME from directory sd to directory dd atomically.

    Returns (bytes copied, stable) where stable is False when the source's size
    or mtime changed during the copy.  The replica then carries the pre-copy
    mtime, so the next pass copies it again.
    """
    try:
        fin = _open_source_file(sd, name)
    except FileNotFoundError:
        raise _Vanished() from None
    except OSError as err:
        if err.errno == errno.ELOOP:  # became a link since it was listed
            raise _NotRegular() from None
        raise
    try:
        before = os.fstat(fin)
        if not stat.S_ISREG(before.st_mode):
            raise _NotRegular()
        tmp_path, tmp_fd, fout = _create_temp(dd, _create_temp_file)
        try:
            try:
                copied = _copy_bytes(fin, fout, before.st_size)
                if _DIR_FD:
                    _set_file_stat(fout, tmp_path, tmp_fd, before)
            finally:
                os.close(fout)
            if not _DIR_FD:  # by path, once the data is written and the file closed
                _set_file_stat(fout, tmp_path, tmp_fd, before)
            after = os.fstat(fin)
            final_path, final_fd = _at(dd, name)
            os.replace(tmp_path, final_path, src_dir_fd=tmp_fd, dst_dir_fd=final_fd)
        except BaseException:
            _discard_temp(tmp_path, tmp_fd)
            raise
    finally:
        os.close(fin)
    return copied, _same_signature(before, after)


def _discard_temp(path, dir_fd) -> None:
    """Remove a temporary file after a failure."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass  # already gone, or its folder is unusable: the next pass removes it


def _make_link(dd, name, target: str) -> None:
    """Create or replace the link NAME -> target, atomically."""
    tmp_path, fd, _ = _create_temp(dd, lambda path, dir_fd: os.symlink(target, path, dir_fd=dir_fd))
    try:
        final_path, _ = _at(dd, name)
        os.replace(tmp_path, final_path, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        _discard_temp(tmp_path, fd)
        raise


def _chmod_file(dd, name, mode: int, expected: os.stat_result) -> None:
    """Set the permission bits of a replica file in place, never via a link."""
    path, fd = _at(dd, name)
    if not _DIR_FD:  # by path: a link swapped in between is the stated window
        if not os.path.samestat(os.lstat(path), expected):
            raise OSError(errno.ESTALE, "replaced while being updated")
        os.chmod(path, mode)
        return
    handle = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=fd)
    try:
        st = os.fstat(handle)
        if not (stat.S_ISREG(st.st_mode) and os.path.samestat(st, expected)):
            raise OSError(errno.ESTALE, "replaced while being updated")
        os.chmod(handle, mode)
    finally:
        os.close(handle)


def _make_writable(d, mode: int) -> int:
    """Let us add and remove entries in directory d; return its new mode."""
    wanted = mode | stat.S_IRWXU
    if wanted != mode:
        os.chmod(d, wanted)
    return wanted


class _Listing(NamedTuple):
    """Both sides of one directory pair, as _list_pair found them."""

    src: Optional[dict] = None
    unreadable: Optional[list] = None
    dst: Optional[dict] = None  # the walk updates it as it renames and removes
    dst_unreadable: Optional[list] = None
    failure: Optional[tuple] = None  # (what could not be done, OSError)


def _list_pair(frame) -> _Listing:
    """Open (below the root) and list both sides of a directory pair.

    Reports nothing: it returns what it found, failures included, and the
    walk reports them.
    """
    if frame.parent is not None:
        try:
            frame.sd = _open_dir(frame.parent.sd, frame.name)
        except OSError as err:
            return _Listing(failure=("list directory", err))
        if frame.dst_exists:
            try:
                frame.dd = _open_dir(frame.parent.dd, frame.dst_name)
                if frame.dst_mode is None:  # created by this pass
                    frame.dst_mode = stat.S_IMODE(os.stat(frame.dd).st_mode)
            except OSError as err:
                return _Listing(failure=("list replica directory", err))
    try:
        src, unreadable = _scan(frame.sd)
    except OSError as err:
        return _Listing(failure=("list directory", err))
    if frame.dd is None:
        return _Listing(src, unreadable, {}, [])
    try:
        dst, dst_unreadable = _scan(frame.dd)
    except OSError as err:
        return _Listing(failure=("list replica directory", err))
    return _Listing(src, unreadable, dst, dst_unreadable)


def _file_job(sd, dd, name, compare_first: bool, copy: bool, should_stop) -> tuple:
    """The slow part of bringing one file up to date; runs in a worker thread.

    Returns ("same",) when compare_first found equal contents, ("differs",)
    when it found other contents and copy is False, ("copied", bytes, stable),
    or ("vanished",), ("not regular",), ("stopped",), ("failed", what, OSError).
    """
    if should_stop():
        return ("stopped",)
    if compare_first:
        try:
            if _same_contents(sd, dd, name):
                return ("same",)
        except OSError as err:
            return ("failed", "compare contents", err)
        if not copy:
            return ("differs",)
    try:
        return ("copied", *_copy_file(sd, dd, name))
    except _Vanished:
        return ("vanished",)
    except _NotRegular:
        return ("not regular",)
    except OSError as err:
        return ("failed", "copy file", err)


def _match_moves(gone: dict, new: dict):
    """Pairs (old name, new name) of one directory's entries that were renamed.

    Candidates need an mtime with a sub-second part (a real write, not a time
    set in whole seconds by an archiver) and a signature that is unique on
    both sides.  Directories match on (mtime, mode): renaming a folder does
    not change its own mtime, and the walk then checks its contents file by
    file as usual.  Files match on (size, mtime) and the caller compares
    their bytes before moving.
    """
    def key(entry):
        st = entry.st
        if st is None or not st.st_mtime_ns % 1_000_000_000:  # links have no st
            return None
        if entry.kind == DIR:
            return (DIR, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
        if entry.kind == FILE and st.st_size:
            return (FILE, st.st_size, st.st_mtime_ns)
        return None

    def unique(entries):
        found = {}
        for name, entry in entries.items():
            k = key(entry)
            if k is not None:
                found[k] = None if k in found else name
        return {k: name for k, name in found.items() if name is not None}

    if not gone or not new:
        return []
    olds = unique(gone)
    return sorted((olds[k], name) for k, name in unique(new).items() if k in olds)


class _Done:
    """A result that is already there, answering like a Future (a real Future
    per small file costs more than copying it on tmpfs)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Worker:
    """The parent's view of one worker process."""

    def __init__(self, pid, task_w, msg_r):
        self.pid, self.task_w, self.msg_r = pid, task_w, msg_r
        self.task = None  # the task index it was last given
        self.finished = False  # sent its result
        self.checked = 0  # source entries it has examined
        self.inbox = _Inbox()

    def close(self):
        for fd in (self.task_w, self.msg_r):
            try:
                os.close(fd)
            except OSError:
                pass  # closed already


class _Inbox:
    """Reassembles length-prefixed pickled messages from a pipe."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self.buffer += data
        messages = []
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "little")
            if len(self.buffer) < 4 + size:
                break
            messages.append(pickle.loads(self.buffer[4:4 + size]))
            del self.buffer[:4 + size]
        return messages


def _send(fd: int, message) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(4, "little") + data)
    while view:
        view = view[os.write(fd, view):]


def _read_index(fd: int) -> int:
    data = b""
    while len(data) < 4:
        chunk = os.read(fd, 4 - len(data))
        if not chunk:
            return -1  # the parent has gone
        data += chunk
    return int.from_bytes(data, "little", signed=True)


# ----------------------------------------------------------------- one pass --


class _Frame:
    """A directory pair on the walk's stack."""

    __slots__ = ("parent", "name", "dst_name", "rel", "src_st", "dst_exists", "dst_mode",
                 "dst_mtime", "sd", "dd", "changed", "writable")

    def __init__(self, parent, name, rel, src_st, dst_st, dst_exists):
        self.parent = parent
        self.name = name
        self.dst_name = name  # differs in a dry run that "moved" the directory
        self.rel = rel
        self.src_st = src_st
        self.dst_exists = dst_exists
        self.dst_mode = stat.S_IMODE(dst_st.st_mode) if dst_st else None
        self.dst_mtime = dst_st.st_mtime_ns if dst_st else None
        self.sd = None
        self.dd = None
        self.changed = False  # entries added or removed: the mtime must be reset
        self.writable = False


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        code = errno.errorcode.get(err.errno)
        return f"{err.strerror} ({code})" if code else err.strerror
    return str(err) or type(err).__name__


class _Pass:
    """The state of one pass; see run_pass()."""

    def __init__(self, options: Options, report, should_stop, progress=None):
        self.options = options
        self.report = report
        self.should_stop = should_stop
        self.progress = progress  # called with the number of entries checked so far
        self.result = PassResult()
        self.deleted = 0  # entries removed (or, in a dry run, that would be), temporary files aside
        self.pool = None  # worker threads, while run() runs
        now = time.time()  # names this pass's trash folder; workers inherit it
        self.trash_stamp = time.strftime("%Y-%m-%d_%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"

    # -- reporting

    def emit(self, action: str, rel: str, detail: str = "") -> None:
        self.result.counts[action] += 1
        self.report(Event(action, rel, detail))

    def fail(self, rel: str, what: str, err: BaseException) -> None:
        self.error(rel, f"cannot {what}: {_reason(err)}")

    def error(self, rel: str, message: str) -> None:
        self.result.errors += 1
        self.emit("error", rel, message)

    def may_delete(self, rel: str) -> bool:
        """The --max-delete safety net, for a source that changed after the
        pass counted its deletions (see run_pass)."""
        limit = self.options.max_delete
        if limit is None or self.deleted < limit:
            return True
        self.error(rel, f"not removed: --max-delete {limit} reached")
        return False

    def stopping(self) -> bool:
        if not self.result.interrupted and self.should_stop():
            self.result.interrupted = True
        return self.result.interrupted

    # -- the walk

    def run(self, source: str, replica: str) -> None:
        dry = self.options.dry_run
        try:
            sd = _open_root(source)
        except OSError as err:
            self.fail("", f"open SOURCE {source!r}", err)
            return
        try:
            src_st = os.stat(sd)  # a descriptor or, on Windows, the path
            if not dry:
                os.makedirs(replica, exist_ok=True)
            try:
                dd = _open_root(replica)
            except FileNotFoundError:
                if not dry:
                    raise
                dd = None
        except OSError as err:
            _close_dir(sd)
            self.fail("", f"open REPLICA {replica!r}", err)
            return
        if self.options.trash and self.options.trash_keep_days is not None:
            self.prune_trash()
        root = _Frame(None, None, "", src_st, None, dd is not None)
        root.sd, root.dd = sd, dd
        if dd is not None:
            dst_st = os.stat(dd)
            root.dst_mode = stat.S_IMODE(dst_st.st_mode)
            root.dst_mtime = dst_st.st_mtime_ns
        try:
            if self.options.workers > 1 and _CAN_FORK and self.options.max_delete is None:
                self.walk_split(root)
            else:
                self.walk(root)
        finally:
            self.stop_threads()

    def stop_threads(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def walk(self, root: _Frame) -> None:
        # Depth first with an explicit stack: (frame, entered).  A directory's
        # permission bits and mtime are set when it is popped the second time,
        # after everything inside it is written.  Only the directories on the
        # current path are open: two descriptors per level.
        stack = [(root, False)]
        try:
            while stack:
                frame, entered = stack.pop()
                if entered:
                    self.finish(frame)
                    continue
                children = self.try_enter(frame)
                if children is None:
                    continue
                stack.append((frame, True))
                stack.extend((child, False) for child in reversed(children))
        finally:
            for frame, entered in stack:
                if entered or frame is root:
                    self.close(frame)

    def try_enter(self, frame: _Frame):
        """enter() unless the pass is stopping; None (frame closed) when not entered."""
        if self.stopping():
            self.close(frame)
            return None
        try:
            return self.enter(frame)
        except BaseException:
            self.close(frame)
            raise

    # -- the walk split among worker processes

    def walk_split(self, root: _Frame) -> None:
        """Walk the top levels here, breadth first, until they hold enough
        subtrees to keep the workers busy; hand those to worker processes;
        then finish the top levels, deepest first, once all are done."""
        entered, level, tasks = [], [root], []
        completed = False
        try:
            for _ in range(SPLIT_MAX_DEPTH):
                tasks = []
                for frame in level:
                    children = self.try_enter(frame)
                    if children is not None:
                        entered.append(frame)
                        tasks.extend(children)
                if len(tasks) >= SPLIT_MIN_TASKS * self.options.workers or not tasks:
                    break
                level = tasks
            if len(tasks) > 1 and not self.stopping():
                self.fan_out(tasks)
            else:
                for task in tasks:
                    self.walk(task)
            completed = True
        finally:
            for frame in reversed(entered):
                if completed:
                    self.finish(frame)
                else:
                    self.close(frame)

    def fan_out(self, tasks: list) -> None:
        """Walk tasks (subtrees whose parents are open here) in forked worker
        processes, handed out one at a time; report their events in task
        order, as a single process would have."""
        self.stop_threads()  # no threads may be running across a fork
        stop_flag = mmap.mmap(-1, 1)  # shared with the workers: set to ask them to stop
        workers, parent = {}, os.getpid()
        try:
            for _ in range(min(self.options.workers, len(tasks))):
                task_r, task_w = os.pipe()
                msg_r, msg_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker: never returns
                    code = 70
                    try:
                        for w in workers.values():
                            os.close(w.task_w)
                            os.close(w.msg_r)
                        os.close(task_w)
                        os.close(msg_r)
                        code = self.serve(tasks, task_r, msg_w, stop_flag, parent)
                    finally:
                        os._exit(code)
                os.close(task_r)
                os.close(msg_w)
                workers[msg_r] = _Worker(pid, task_w, msg_r)
            self.collect(tasks, workers, stop_flag)
        finally:
            stop_flag[0] = 1
            for w in workers.values():
                w.close()
                os.waitpid(w.pid, 0)

    def serve(self, tasks, task_r, msg_w, stop_flag, parent) -> int:
        """A worker's life: walk each task index the parent sends, stream its
        events back, and end with this worker's share of the counts."""
        outer_stop = self.should_stop
        self.should_stop = lambda: stop_flag[0] != 0 or os.getppid() != parent or outer_stop()
        self.result, self.deleted, self.progress = PassResult(), 0, None
        batch, current = [], [None]

        def report(event):
            batch.append(event)
            if len(batch) >= 256:
                _send(msg_w, ("events", current[0], batch, self.result.checked))
                batch.clear()

        self.report = report
        while True:
            index = _read_index(task_r)
            if index < 0:
                break
            current[0] = index
            self.walk(tasks[index])
            _send(msg_w, ("done", index, batch, self.result.checked))
            batch.clear()
        r = self.result
        _send(msg_w, ("result", dict(r.counts), r.bytes_copied, r.errors, r.interrupted, self.deleted))
        return 0

    def collect(self, tasks, workers: dict, stop_flag) -> None:
        """The parent's side of fan_out: hand out tasks, merge what comes back."""
        handed, reported = 0, 0
        held, done = {}, set()  # events of tasks ahead of the one being reported

        def hand_out(worker):
            nonlocal handed
            worker.task = handed if handed < len(tasks) else -1
            try:
                os.write(worker.task_w, worker.task.to_bytes(4, "little", signed=True))
            except BrokenPipeError:  # it has just died: its end of pipe reports that
                worker.task = -1
                return
            handed += worker.task >= 0

        def forward(index, events, finished):
            # Events of the task being reported go out at once; those of
            # later tasks wait until every task before them is done.
            nonlocal reported
            held.setdefault(index, []).extend(events)
            if finished:
                done.add(index)
            while reported in held:
                for event in held.pop(reported):
                    self.report(event)
                if reported not in done:
                    held[reported] = []
                    break
                reported += 1

        selector = selectors.DefaultSelector()
        for w in workers.values():
            selector.register(w.msg_r, selectors.EVENT_READ)
            hand_out(w)
        alive = dict(workers)
        while alive:
            for key, _ in selector.select(timeout=0.2):
                w = alive[key.fd]
                data = os.read(w.msg_r, 1 << 16)
                if not data:  # the worker has ended
                    selector.unregister(key.fd)
                    del alive[key.fd]
                    if not w.finished:
                        self.error("", f"worker process {w.pid} ended unexpectedly; "
                                       "the next pass retries what it had not done")
                        if w.task is not None and w.task >= 0:
                            forward(w.task, [], True)
                    continue
                for message in w.inbox.feed(data):
                    kind = message[0]
                    if kind in ("events", "done"):
                        forward(message[1], message[2], kind == "done")
                        w.checked = message[3]
                        if self.progress is not None:
                            self.progress(self.result.checked + sum(x.checked for x in workers.values()))
                    if kind == "done":
                        hand_out(w)
                    elif kind == "result":  # this worker's share
                        counts, copied, errors, interrupted, deleted = message[1:]
                        self.result.counts.update(counts)
                        self.result.bytes_copied += copied
                        self.result.errors += errors
                        self.result.interrupted |= interrupted
                        self.deleted += deleted
                        w.finished = True
            if self.stopping():
                stop_flag[0] = 1
        selector.close()
        self.result.checked += sum(w.checked for w in workers.values())
        for index in range(handed, len(tasks)):  # left by workers that died
            self.walk(tasks[index])

    def close(self, frame: _Frame) -> None:
        for d in (frame.sd, frame.dd):
            if d is not None:
                _close_dir(d)
        frame.sd = frame.dd = None

    def enter(self, frame: _Frame):
        """Mirror one directory's entries; return the subdirectories to walk.

        Returns None (and leaves the replica side untouched) when either side
        cannot be opened or listed.
        """
        rel = frame.rel
        listing = _list_pair(frame)
        if listing.failure:
            # An unlistable source directory must not look empty: touch nothing.
            self.close(frame)
            self.fail(rel, *listing.failure)
            return None
        src, dst = listing.src, listing.dst
        excluded = self.excluded(rel, src, dst)
        if excluded:
            src = {n: e for n, e in src.items() if n not in excluded}
            if not self.options.delete_excluded:
                dst = {n: e for n, e in dst.items() if n not in excluded}
        self.result.checked += len(src)
        if self.progress is not None:
            self.progress(self.result.checked)

        if frame.parent is None and not self.options.allow_empty_source and _looks_unmounted(src, dst):
            self.close(frame)
            self.error("", "SOURCE is empty but REPLICA is not: refusing to delete everything in "
                           "REPLICA (an unmounted drive looks like this); nothing was changed. "
                           "Use --allow-empty-source if SOURCE is meant to be empty.")
            return None

        keep = set()  # names whose replica entry must not be touched this pass
        for name, err in listing.unreadable:
            self.fail(_join(rel, name), "read", err)
            keep.add(name)
        for name, err in listing.dst_unreadable:
            self.fail(_join(rel, name), "examine replica entry", err)
            keep.add(name)
        wanted = {}
        for name, entry in src.items():
            if _TEMP_NAME.match(name):
                continue  # another sync.py's half-written file, not user data
            if entry.kind == SPECIAL:
                self.emit("skip", _join(rel, name), _special_kind(entry.st.st_mode))
                continue
            wanted[name] = entry

        renamed = self.sync_moves(frame, wanted, dst, keep)

        for name in sorted(dst):
            if name in keep:
                continue
            have, want = dst[name], wanted.get(name)
            if want is None or want.kind != have.kind:
                if self.stopping():
                    return []
                if self.remove(frame, name, have):
                    del dst[name]
                else:
                    keep.add(name)

        children, pending = [], []
        checksum, window = self.options.checksum, self.options.modify_window_ns
        for name in sorted(wanted):
            want, have = wanted[name], dst.get(name)
            if want.kind == FILE:
                # The no-change path, inline: it runs for nearly every file of most passes.
                if (have is not None and have.kind == FILE and not checksum
                        and want.st.st_size == have.st.st_size
                        and abs(want.st.st_mtime_ns - have.st.st_mtime_ns) <= window
                        and want.st.st_mode == have.st.st_mode):
                    continue
                if name in keep:
                    continue
                if self.stopping():
                    break
                self.sync_file(frame, name, want, have, pending)
                continue
            if name in keep:
                continue
            if self.stopping():
                break
            if want.kind == LINK:
                self.sync_link(frame, name, want, have)
            else:
                child = self.sync_dir(frame, name, want, have, renamed.get(name, name))
                if child is not None:
                    children.append(child)
        self.settle(frame, pending)
        return children

    def excluded(self, rel: str, src: dict, dst: dict) -> set:
        """Names in this directory that --exclude leaves out of the mirror."""
        patterns = self.options.excludes
        if not patterns:
            return set()
        found = {n for n, e in src.items() if patterns.match(_join(rel, n), n, e.kind == DIR)}
        # A replica entry is left alone when its path is excluded and the
        # source does not want that name (as a kind the pattern allows).
        found |= {n for n, e in dst.items()
                  if n not in src and patterns.match(_join(rel, n), n, e.kind == DIR)}
        return found

    def finish(self, frame: _Frame) -> None:
        """Give a replica directory the source's permission bits and mtime."""
        try:
            if frame.dd is None or self.options.dry_run:
                return
            src_mode = stat.S_IMODE(frame.src_st.st_mode)
            try:
                if frame.dst_mode != src_mode:
                    os.chmod(frame.dd, src_mode)
                if frame.changed or frame.dst_mtime is None or \
                        abs(frame.dst_mtime - frame.src_st.st_mtime_ns) > self.options.modify_window_ns:
                    os.utime(frame.dd, ns=(frame.src_st.st_atime_ns, frame.src_st.st_mtime_ns))
            except OSError as err:
                self.fail(frame.rel, "set directory permissions and times", err)
        finally:
            self.close(frame)

    # -- changes inside one replica directory

    def prepare(self, frame: _Frame) -> bool:
        """Note that frame's replica directory is about to change; make it writable.

        Returns False (after reporting) when that is impossible.
        """
        frame.changed = True
        if frame.writable or self.options.dry_run or frame.dd is None:
            return True
        try:
            frame.dst_mode = _make_writable(frame.dd, frame.dst_mode)
        except OSError as err:
            self.fail(frame.rel, "make replica directory writable", err)
            return False
        frame.writable = True
        return True

    def sync_moves(self, frame, wanted: dict, dst: dict, keep: set) -> dict:
        """Rename replica entries that the source renamed within this directory,
        instead of copying them again and deleting the old names.

        Updates dst to match; returns {new name: old name} for directories
        "moved" in a dry run, which must still be read under their old name.
        """
        if frame.dd is None:
            return {}
        gone = {n: e for n, e in dst.items() if n not in wanted and n not in keep and not _is_temp(n, e)}
        new = {n: e for n, e in wanted.items() if n not in dst and n not in keep}
        renamed = {}
        for old, name in _match_moves(gone, new):
            rel = _join(frame.rel, name)
            if new[name].kind == FILE:
                # Equal size and mtime across two names is no proof: compare the
                # bytes (two reads still spare the write of a new copy).
                try:
                    if not _same_contents(frame.sd, frame.dd, name, old):
                        continue
                except OSError:
                    continue  # not proven equal: copy it as a new file instead
            if not self.prepare(frame):
                return renamed
            if not self.options.dry_run:
                try:
                    old_path, fd = _at(frame.dd, old)
                    new_path, _ = _at(frame.dd, name)
                    os.rename(old_path, new_path, src_dir_fd=fd, dst_dir_fd=fd)
                except OSError:
                    continue  # e.g. a mount point in between: copy and delete instead
            elif new[name].kind == DIR:
                renamed[name] = old
            dst[name] = dst.pop(old)
            self.emit("move", rel, _join(frame.rel, old))
        return renamed

    def sync_file(self, frame, name, want: Entry, have: Optional[Entry], pending: list) -> None:
        """Bring one file up to date now, or queue the work on pending."""
        rel = _join(frame.rel, name)
        same_signature = have is not None and _same_signature(want.st, have.st, self.options.modify_window_ns)
        if same_signature and not self.options.checksum:
            self.sync_mode(frame, name, rel, want, have)
            return
        trash = bool(self.options.trash) and have is not None
        if not same_signature and self.options.dry_run:
            frame.changed = True
            if trash:
                self.to_trash(frame, name, rel, keep=True)
            self.emit("copy" if have is None else "update", rel, str(want.st.st_size))
            return
        if not self.options.dry_run and not self.prepare(frame):
            return
        if trash and not same_signature and not self.to_trash(frame, name, rel, keep=True):
            return
        # With a trash, a comparison only compares: settle() keeps the old
        # version in the trash before it copies.
        copy = not self.options.dry_run and not trash
        job = self.submit(want.st.st_size >= PARALLEL_MIN_SIZE, _file_job, frame.sd, frame.dd, name,
                          same_signature, copy or not same_signature, self.stopping)
        pending.append((name, rel, want, have, job))

    def settle(self, frame, pending: list) -> None:
        """Wait for this directory's queued file work, reporting it in name order."""
        for name, rel, want, have, job in pending:
            outcome, *details = job.result()
            if outcome == "same":
                self.sync_mode(frame, name, rel, want, have)
            elif outcome == "differs":  # --checksum found other bytes; nothing copied yet
                frame.changed = True
                if self.options.trash and not self.to_trash(frame, name, rel, keep=True):
                    continue
                if self.options.dry_run:
                    self.emit("update", rel, str(want.st.st_size))
                    continue
                outcome, *details = _file_job(frame.sd, frame.dd, name, False, True, self.stopping)
            if outcome == "copied":
                copied, stable = details
                self.result.bytes_copied += copied
                self.emit("copy" if have is None else "update", rel, str(copied))
                if not stable:
                    self.emit("changed", rel)
            if outcome == "vanished":
                self.emit("vanished", rel)
            elif outcome == "not regular":
                self.emit("skip", rel, "no longer a regular file")
            elif outcome == "failed":
                self.fail(rel, *details)
            # "stopped": the pass is ending; the next one does it

    def sync_mode(self, frame, name, rel, want: Entry, have: Entry) -> None:
        """Contents are current: set the permission bits if they differ."""
        mode = stat.S_IMODE(want.st.st_mode)
        if stat.S_IMODE(have.st.st_mode) == mode:
            return
        if have.st.st_nlink > 1:
            # A second hard link could reach outside the replica: replace the file instead.
            if not self.options.dry_run and self.prepare(frame):
                outcome, *details = _file_job(frame.sd, frame.dd, name, False, True, self.stopping)
                if outcome == "failed":
                    self.fail(rel, *details)
                    return
            self.emit("chmod", rel, f"{mode:#o}")
            return
        if not self.options.dry_run:
            try:
                _chmod_file(frame.dd, name, mode, have.st)
            except OSError as err:
                self.fail(rel, "set permissions", err)
                return
        self.emit("chmod", rel, f"{mode:#o}")

    def submit(self, large: bool, fn, *args):
        """Run fn in a worker thread when the work is large, else here and now."""
        if large:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(LARGE_FILE_THREADS, thread_name_prefix="sync")
            return self.pool.submit(fn, *args)
        return _Done(fn(*args))

    def sync_link(self, frame, name, want: Entry, have: Optional[Entry]) -> None:
        if have is not None and have.target == want.target:
            return
        rel = _join(frame.rel, name)
        if not self.prepare(frame):
            return
        if have is not None and self.options.trash and not self.to_trash(frame, name, rel, keep=True):
            return
        if not self.options.dry_run:
            try:
                _make_link(frame.dd, name, want.target)
            except OSError as err:
                self.fail(rel, "create link", err)
                return
        self.emit("link" if have is None else "relink", rel, want.target)

    def sync_dir(self, frame, name, want: Entry, have: Optional[Entry], dst_name: str):
        rel = _join(frame.rel, name)
        if have is None:
            if not self.prepare(frame):
                return None
            if not self.options.dry_run:
                try:
                    path, fd = _at(frame.dd, name)
                    os.mkdir(path, 0o700, dir_fd=fd)
                except OSError as err:
                    self.fail(rel, "create directory", err)
                    return None
            self.emit("mkdir", rel)
        exists = frame.dd is not None and not (self.options.dry_run and have is None)
        child = _Frame(frame, name, rel, want.st, have.st if have else None, exists)
        child.dst_name = dst_name
        return child

    def remove(self, frame, name, have: Entry) -> bool:
        """Remove one replica entry (a directory with all it holds)."""
        rel = _join(frame.rel, name)
        if not self.prepare(frame):
            return False
        if self.options.trash and not _is_temp(name, have):
            if not self.may_delete(rel):
                return False
            if self.to_trash(frame, name, rel, keep=False):
                self.deleted += 1
                return True
            return False
        if have.kind == DIR:
            return self.remove_tree(frame.dd, name, rel)
        if not _is_temp(name, have) and not self.may_delete(rel):
            return False
        if not self.options.dry_run:
            try:
                path, fd = _at(frame.dd, name)
                os.unlink(path, dir_fd=fd)
            except FileNotFoundError:
                pass  # already gone: that is what we wanted
            except OSError as err:
                self.fail(rel, "remove", err)
                return False
        self.emit_removed(name, rel, have)
        return True

    def to_trash(self, frame, name, rel, keep: bool) -> bool:
        """Move replica entry NAME (keep=False) or link it (keep=True, for a
        file about to be replaced) to TRASH/<pass stamp>/<rel>."""
        where = f"{self.trash_stamp}/{rel}"
        if not self.options.dry_run:
            try:
                folder = self.trash_folder(rel)
                try:
                    path, fd = _at(frame.dd, name)
                    target, tfd = _at(folder, name)
                    if keep:
                        os.link(path, target, src_dir_fd=fd, dst_dir_fd=tfd, follow_symlinks=False)
                    else:
                        os.rename(path, target, src_dir_fd=fd, dst_dir_fd=tfd)
                finally:
                    _close_dir(folder)
            except OSError as err:
                self.fail(rel, "move the old version to the trash", err)
                return False
        self.emit("trash", rel, where)
        return True

    def prune_trash(self) -> None:
        """Remove the trash folders of passes older than --trash-keep days."""
        limit = time.time() - self.options.trash_keep_days * 86400
        try:
            d = _open_root(self.options.trash)
        except OSError as err:
            self.fail("", f"open TRASH {self.options.trash!r}", err)
            return
        try:
            for name in sorted(_scan(d)[0]):
                match = _TRASH_STAMP.match(name)
                if not match or time.mktime(time.strptime(match[1], "%Y-%m-%d_%H%M%S")) >= limit:
                    continue
                if self.options.dry_run or self.remove_tree(d, name, name, accounting=False):
                    self.emit("prune", name)
        except OSError as err:
            self.fail("", f"list TRASH {self.options.trash!r}", err)
        finally:
            _close_dir(d)

    def trash_folder(self, rel: str):
        """Open (creating) the folder of TRASH/<pass stamp> that rel goes into."""
        d = _open_root(self.options.trash)
        try:
            for part in [self.trash_stamp, *rel.split("/")[:-1]]:
                path, fd = _at(d, part)
                try:
                    os.mkdir(path, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass  # made by an earlier item (or another worker) of this pass
                inner = _open_dir(d, part)
                _close_dir(d)
                d = inner
        except BaseException:
            _close_dir(d)
            raise
        return d

    def emit_removed(self, name, rel, entry: Entry) -> None:
        if _is_temp(name, entry):
            self.emit("temp", rel)
        else:
            self.deleted += 1
            self.emit("remove", rel, entry.kind)

    def remove_tree(self, parent, name, rel, accounting=True) -> bool:
        """Remove a replica directory and everything in it, deepest first.

        Iterative and descriptor-based like shutil.rmtree's safe variant: every
        directory is opened with O_NOFOLLOW relative to its parent, so a link
        swapped in cannot send the deletion elsewhere.
        """
        dry = self.options.dry_run
        # Each level: [parent handle, name, rel, handle, remaining entries, ok]
        stack = []

        def descend(p, n, r) -> bool:
            try:
                d = _open_dir(p, n)
            except OSError as err:
                self.fail(r, "list replica directory", err)
                return False
            try:
                if not dry:
                    _make_writable(d, stat.S_IMODE(os.stat(d).st_mode))
                entries, failed = _scan(d)
            except OSError as err:
                _close_dir(d)
                self.fail(r, "list replica directory", err)
                return False
            for bad, err in failed:
                self.fail(_join(r, bad), "examine replica entry", err)
            stack.append([p, n, r, d, sorted(entries.items(), reverse=True), not failed])
            return True

        if not descend(parent, name, rel):
            return False
        try:
            while stack:
                level = stack[-1]
                p, n, r, d, remaining, ok = level
                if remaining and not self.stopping():
                    child, entry = remaining.pop()
                    child_rel = _join(r, child)
                    if entry.kind == DIR:
                        if not descend(d, child, child_rel):
                            level[5] = False
                        continue
                    if accounting and not _is_temp(child, entry) and not self.may_delete(child_rel):
                        level[5] = False
                        continue
                    if not dry:
                        try:
                            path, fd = _at(d, child)
                            os.unlink(path, dir_fd=fd)
                        except FileNotFoundError:
                            pass
                        except OSError as err:
                            self.fail(child_rel, "remove", err)
                            level[5] = False
                            continue
                    if accounting:
                        self.emit_removed(child, child_rel, entry)
                    continue
                stack.pop()
                _close_dir(d)
                ok = ok and not remaining and (not accounting or self.may_delete(r))
                if ok and not dry:
                    try:
                        path, fd = _at(p, n)
                        os.rmdir(path, dir_fd=fd)
                    except OSError as err:
                        self.fail(r, "remove directory", err)
                        ok = False
                if ok and accounting:
                    self.deleted += 1
                    self.emit("rmdir", r)
                elif stack:
                    stack[-1][5] = False
                if not stack:
                    return ok
        finally:
            for level in stack:
                _close_dir(level[3])
        return False


def _is_temp(name: str, entry: Entry) -> bool:
    return entry.kind == FILE and bool(_TEMP_NAME.match(name))


def _looks_unmounted(src: dict, dst: dict) -> bool:
    """An empty SOURCE root beside a non-empty REPLICA root."""
    def real(entries):
        return any(not _is_temp(name, entry) for name, entry in entries.items())
    return not real(src) and real(dst)


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def run_pass(source: str, replica: str, options: Options = None,
             report: Callable[[Event], None] = _ignore,
             should_stop: Callable[[], bool] = lambda: False,
             progress: Optional[Callable[[int], None]] = None) -> PassResult:
    """Make REPLICA an exact mirror of SOURCE, once.

    Every action is passed to ``report`` as an Event the moment it is done.
    ``should_stop`` is polled between items; when it returns True the pass
    ends after the current item and the result says it was interrupted.
    ``progress``, if given, is called now and then with the number of source
    entries checked so far (see count_entries for the total).  Item failures
    are counted in the result, never raised.
    """
    started = time.monotonic()
    options = options or Options()
    source, replica = os.fspath(source), os.fspath(replica)
    work = _Pass(options, report, should_stop, progress)
    would_delete = _count_deletions(source, replica, options, should_stop)
    if would_delete is not None and would_delete > options.max_delete:
        work.error("", f"this pass would delete {would_delete} entries, more than "
                       f"--max-delete {options.max_delete}; nothing was changed. If that many "
                       "deletions are intended, run once with a higher --max-delete.")
    else:
        work.run(source, replica)
    work.result.duration = time.monotonic() - started
    return work.result


def _count_deletions(source, replica, options: Options, should_stop) -> Optional[int]:
    """With --max-delete, how many entries the pass would delete: counted by a
    dry run first, so that a pass over the limit changes nothing at all."""
    if options.max_delete is None or options.dry_run:
        return None
    probe = _Pass(dataclasses.replace(options, dry_run=True, max_delete=None), _ignore, should_stop)
    probe.run(source, replica)
    return probe.deleted


def count_entries(source: str, excludes: Optional[Excludes] = None,
                  should_stop: Callable[[], bool] = lambda: False) -> Optional[int]:
    """How many source entries a pass will check, for a progress total.

    A walk by name only (no stat: d_type tells folders), so it costs a
    fraction of a pass.  An estimate: it skips what it cannot list, and the
    source may change meanwhile.  None when asked to stop first.
    """
    total, pending = 0, [("", source)]
    while pending:
        if should_stop():
            return None
        rel, path = pending.pop()
        try:
            with os.scandir(path) as listing:
                items = list(listing)
        except OSError:
            continue
        for item in items:
            here = _join(rel, item.name)
            is_dir = item.is_dir(follow_symlinks=False)
            if excludes and excludes.match(here, item.name, is_dir):
                continue
            total += 1
            if is_dir:
                pending.append((here, item.path))
    return total


# ----------------------------------------------------------------- the loop --


def run_periodically(source: str, replica: str, interval: float, options: Options = None,
                     report: Callable[[Event], None] = _ignore,
                     on_pass: Callable[[PassResult], None] = lambda result: None,
                     stop: threading.Event = None,
                     clock: Callable[[], float] = time.monotonic,
                     progress: Optional[Callable[[int], None]] = None) -> None:
    """Run passes every ``interval`` seconds, start to start, until ``stop`` is set.

    The first pass starts at once.  A pass that takes longer than the interval
    is followed at once by the next, and reported with an "overrun" event.
    """
    stop = stop or threading.Event()
    while not stop.is_set():
        started = clock()
        on_pass(run_pass(source, replica, options, report, stop.is_set, progress))
        if stop.is_set():
            return
        elapsed = clock() - started
        if elapsed >= interval:
            report(Event("overrun", "", f"{elapsed:.1f}"))
            continue
        stop.wait(interval - elapsed)


# ------------------------------------------------------------ preconditions --


def _is_within(path: str, root: str) -> bool:
    """True when path is root or lies inside it, after resolving links.

    Compares (device, inode) of path and each of its existing ancestors with
    root, so case-insensitive file systems and bind mounts are caught too;
    falls back to comparing normalised paths when root does not exist yet.
    """
    path = os.path.realpath(path)
    try:
        root_st = os.stat(root)
    except OSError:
        root_norm = os.path.normcase(os.path.realpath(root))
        here = os.path.normcase(path)
        return here == root_norm or here.startswith(root_norm.rstrip(os.sep) + os.sep)
    while True:
        try:
            if os.path.samestat(os.stat(path), root_st):
                return True
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def check_paths(source: str, replica: str, log_file: Optional[str]) -> None:
    """Refuse, before anything changes, arguments that cannot work safely."""
    if not os.path.exists(source):
        raise UsageError(f"SOURCE {source!r} does not exist")
    if not os.path.isdir(source):
        raise UsageError(f"SOURCE {source!r} is not a directory")
    if os.path.lexists(replica) and not os.path.isdir(replica):
        raise UsageError(f"REPLICA {replica!r} exists and is not a directory")
    if _is_within(replica, source):
        what = "the same folder as" if _is_within(source, replica) else "inside"
        raise UsageError(f"REPLICA {replica!r} is {what} SOURCE {source!r}; "
                         "a mirror must be outside the tree it copies")
    if _is_within(source, replica):
        raise UsageError(f"SOURCE {source!r} is inside REPLICA {replica!r}; "
                         "mirroring would delete it")
    if log_file is None:
        return
    if _is_within(log_file, replica):
        raise UsageError(f"LOG_FILE {log_file!r} is inside REPLICA {replica!r}, "
                         "where the mirror would delete it; put it elsewhere")
    if os.path.isdir(log_file):
        raise UsageError(f"LOG_FILE {log_file!r} is a directory")
    folder = os.path.dirname(os.path.abspath(log_file))
    if not os.path.isdir(folder):
        raise UsageError(f"LOG_FILE {log_file!r}: folder {folder!r} does not exist")


def lock_replica(replica: str) -> Optional[int]:
    """Take an exclusive lock on the REPLICA folder itself; it is held while
    the returned descriptor stays open.

    No lock file is created, inside the mirror or anywhere else, so there is
    nothing stale to clean up by hand: the OS drops the lock when the process
    ends, however it ends.  Raises UsageError when another process holds it,
    OSError when the file system cannot lock, and returns None where the
    platform has no flock.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return _lock_replica_windows(replica)
    fd = os.open(replica, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(os.fstat(fd))
        os.close(fd)
        who = f"another sync.py (process {holder})" if holder else "another sync.py"
        raise UsageError(f"REPLICA {replica!r} is locked by {who}; only one may write "
                         "to a replica at a time: stop that one, or wait for it to finish") from None
    except OSError:
        os.close(fd)
        raise
    return fd


def _lock_replica_windows(replica: str) -> Optional[int]:  # pragma: no cover - Windows
    """Windows cannot lock a folder: lock a file named after the replica in
    the temp folder (outside the mirror); Windows drops it when we end."""
    try:
        import msvcrt
        import tempfile
        import zlib
    except ImportError:
        return None
    key = zlib.crc32(os.path.normcase(os.path.realpath(replica)).encode("utf-8", "surrogatepass"))
    fd = os.open(os.path.join(tempfile.gettempdir(), f"syncpy-{key:08x}.lock"), os.O_RDWR | os.O_CREAT)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        os.close(fd)
        raise UsageError(f"REPLICA {replica!r} is locked by another sync.py; only one may write "
                         "to a replica at a time: stop that one, or wait for it to finish") from None
    return fd


def _lock_holder(st: os.stat_result) -> Optional[int]:
    """The process holding a flock on st's file, from /proc/locks, if known."""
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return int(fields[4])
    except (OSError, ValueError):
        pass  # not Linux, or not readable: the message does without the number
    return None


def check_trash(trash: str, source: str, replica: str) -> None:
    """TRASH lies outside both trees, neither inside it, and on REPLICA's file
    system (old versions are moved there, not copied).  Creates it."""
    for name, path in (("SOURCE", source), ("REPLICA", replica)):
        if _is_within(trash, path):
            raise UsageError(f"TRASH {trash!r} is inside {name} {path!r}; put it beside REPLICA")
        if _is_within(path, trash):
            raise UsageError(f"{name} {path!r} is inside TRASH {trash!r}")
    try:
        os.makedirs(trash, exist_ok=True)
        same_device = os.stat(trash).st_dev == os.stat(replica).st_dev
    except OSError as err:
        raise UsageError(f"cannot create TRASH {trash!r}: {_reason(err)}") from None
    if not same_device:
        raise UsageError(f"TRASH {trash!r} is not on the file system of REPLICA {replica!r}; "
                         "old versions are moved there, so it must be")


def _parse_non_negative(text: str, convert, what: str):
    try:
        value = convert(text)
    except ValueError:
        value = -1
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {what} of zero or more, not {text!r}")
    return value


def parse_seconds(text: str) -> float:
    """A number of seconds, zero or more."""
    return _parse_non_negative(text, float, "a number of seconds")


def parse_count(text: str) -> int:
    """A whole number, zero or more."""
    return _parse_non_negative(text, int, "a whole number")


def parse_interval(text: str) -> float:
    """INTERVAL: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"INTERVAL must be a number of seconds, not {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"INTERVAL must be a positive number of seconds, not {text!r}")
    return value


# ---------------------------------------------------------------- the CLI --

_DONE = {
    "mkdir": "created directory {path}",
    "copy": "copied {path} ({size})",
    "update": "updated {path} ({size})",
    "link": "created link {path} -> {detail}",
    "relink": "updated link {path} -> {detail}",
    "chmod": "set permissions of {path} to {detail}",
    "remove": "removed {detail} {path}",
    "rmdir": "removed directory {path}",
    "temp": "removed leftover temporary file {path}",
    "move": "moved {detail} -> {path}",
    "trash": "kept old version of {path} in trash as {detail}",
    "prune": "pruned trash folder {path}",
    "vanished": "{path} vanished before it could be copied",
    "skip": "skipped {path}: {detail}",
    "changed": "{path} changed while it was being copied; the next pass copies it again",
    "overrun": "the pass took {detail} s, longer than INTERVAL; starting the next one now",
    "error": "{path}: {detail}",
}
_WOULD = {
    "mkdir": "would create directory {path}",
    "copy": "would copy {path} ({size})",
    "update": "would update {path} ({size})",
    "link": "would create link {path} -> {detail}",
    "relink": "would update link {path} -> {detail}",
    "chmod": "would set permissions of {path} to {detail}",
    "remove": "would remove {detail} {path}",
    "rmdir": "would remove directory {path}",
    "temp": "would remove leftover temporary file {path}",
    "move": "would move {detail} -> {path}",
    "trash": "would keep old version of {path} in trash",
    "prune": "would prune trash folder {path}",
}
_SUMMARY_WORDS = [
    ("copy", "copied"), ("update", "updated"), ("move", "moved"), ("mkdir", "directories created"),
    ("link", "links created"), ("relink", "links updated"), ("chmod", "permissions set"),
    ("remove", "removed"), ("rmdir", "directories removed"), ("trash", "kept in trash"),
    ("prune", "trash folders pruned"), ("temp", "temporary files removed"),
    ("skip", "skipped"), ("changed", "changed while copying"), ("vanished", "vanished"),
]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover


def _show(path: str) -> str:
    """A path as one printable log line: undecodable bytes and control
    characters are escaped (b'\\xff' -> \\xff, newline -> \\n)."""
    if not path:
        return "."
    if path.isprintable():
        return path
    raw = path.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_event(event: Event, dry_run: bool = False) -> str:
    template = (_WOULD if dry_run else _DONE).get(event.action) or _DONE[event.action]
    if event.action == "error" and not event.path:
        template = "{detail}"  # about a root, which the detail names
    size = _human(int(event.detail)) if event.detail.isdigit() else event.detail
    detail = _show(event.detail) if event.action in ("link", "relink", "move", "trash") else event.detail
    return template.format(path=_show(event.path), detail=detail, size=size)


def format_summary(result: PassResult, dry_run: bool = False) -> str:
    parts = [f"checked {result.checked}"]
    parts += [f"{words} {result.counts[action]}" for action, words in _SUMMARY_WORDS
              if result.counts[action]]
    parts.append(f"errors {result.errors}")
    head = "dry run finished" if dry_run else "pass finished"
    if result.interrupted:
        head += " early (stopped)"
    text = f"{head} in {result.duration:.2f} s: {', '.join(parts)}; {_human(result.bytes_copied)} copied"
    if dry_run:
        return text
    return text + ("; replica is an exact mirror" if result.exact else "; replica is NOT yet an exact mirror")


class _ReportOnce:
    """Mixin for handlers: a failure to write is reported once on stderr, not per
    line, and logging carries on (the sync matters more than its log)."""

    _failing = False

    def handleError(self, record):  # noqa: N802 - logging's name
        if self._failing:
            return
        self._failing = True
        err = sys.exc_info()[1]
        where = getattr(self, "baseFilename", "the console")
        try:
            sys.stderr.write(f"sync.py: cannot write to {where}: {_reason(err)}; "
                             "syncing goes on (reported once)\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass  # stderr itself is gone: there is nowhere left to say it


class _LogFile(_ReportOnce, logging.handlers.WatchedFileHandler):
    """Appends UTF-8; reopens the file when logrotate moves it away (checked
    before every line, so no line goes to a file that rotation has taken)."""

    def emit(self, record):
        try:
            if os.name == "posix":
                self.reopenIfNeeded()
            logging.FileHandler.emit(self, record)
        except Exception:  # an error in reopening escapes WatchedFileHandler
            self.handleError(record)


class _Console(_ReportOnce, logging.StreamHandler):
    progress = None  # a _Progress line to clear before each log line

    def emit(self, record):
        if self.progress is None or not self.progress.shown:
            super().emit(record)
            return
        self.progress.clear()  # the log line goes above the status line,
        super().emit(record)
        self.progress.redraw()  # which stays at the bottom


class _QuietFilter(logging.Filter):
    """With --quiet the console shows warnings, errors and pass summaries."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or getattr(record, "summary", False)


class _Formatter(logging.Formatter):
    """The standard format, with the date and time text made once a second."""

    _second, _text = None, ""

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, time.strftime(datefmt, self.converter(second))
        return self._text


_FORMAT = _Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")


def _setup_logging(log_file: str, quiet: bool, verbose: bool) -> logging.Logger:
    # The logging HOWTO's "Optimization" switches: this process never logs
    # which line, thread or process a record came from, and a pass may log
    # one line per file.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logger = logging.getLogger("sync")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = _LogFile(log_file, mode="a", encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(_FORMAT)
    logger.addHandler(handler)
    if sys.stderr is not None:
        try:
            sys.stderr.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass  # not a TextIOWrapper: leave it as it is
        console = _Console(sys.stderr)
        console.setFormatter(_FORMAT)
        if quiet:
            console.addFilter(_QuietFilter())
        logger.addHandler(console)
    return logger


ITEMIZE = {  # rsync-style change codes for --itemize (README lists them)
    "copy": ">f+++++++++", "update": ">f.st......", "chmod": ".f...p.....",
    "mkdir": "cd+++++++++", "link": "cL+++++++++", "relink": "cL.s.......",
    "move": "*moving    ", "remove": "*deleting  ", "rmdir": "*deleting  ",
    "temp": "*deleting  ", "trash": "*trashing  ",
}


def itemize(event: Event) -> str:
    path = _show(event.path) + ("/" if event.action in ("mkdir", "rmdir") else "")
    if event.action in ("link", "relink"):
        path += f" -> {_show(event.detail)}"
    elif event.action == "move":
        path = f"{_show(event.detail)} -> {path}"
    return f"{ITEMIZE[event.action]} {path}"


def _describe_options(parser, args) -> str:
    """The options in effect that differ from their defaults, as typed."""
    said = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version", "workers"):
            continue
        value = getattr(args, action.dest)
        if value == action.default or value in ([], None):
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            said.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                said.append(f"{flag} {_show(str(item))}")
    said.append(f"--workers {args.workers}")  # always: its default depends on the machine
    return " ".join(said)


class _Progress:
    """One status line on a terminal's stderr while a pass runs longer than
    DELAY seconds, redrawn at most every PERIOD seconds; never in the log.

    A pass streams through the tree (that keeps its memory flat) and does not
    know its total.  Once a pass has run DELAY seconds, a side thread counts
    the source entries by name (count_entries), and from then on the line
    says how far the pass is and about how long is left; short passes never
    pay for the count."""

    DELAY, PERIOD = 2.0, 0.25

    @staticmethod
    def wanted(stream, quiet: bool) -> bool:
        return not quiet and stream is not None and hasattr(stream, "isatty") and stream.isatty()

    def __init__(self, stream, clock=time.monotonic, count=None):
        self.stream, self.clock, self.count = stream, clock, count
        self.shown = False
        self.counter = None  # the thread counting the total, once started
        self.finish()

    def finish(self) -> None:
        """End of a pass: stop the count, clear the line, start afresh."""
        if self.counter is not None:
            self.stop_count.set()
            self.counter.join()
        self.clear()
        self.counter, self.stop_count, self.total = None, threading.Event(), None
        self.started = self.clock()
        self.drawn_at = float("-inf")
        self.files = self.bytes = self.checked = 0

    def event(self, event: Event) -> None:
        if event.action in ("copy", "update"):
            self.files += 1
            self.bytes += int(event.detail or 0)
        self.tick()

    def progress(self, checked: int) -> None:
        self.checked = checked
        self.tick()

    def tick(self) -> None:
        now = self.clock()
        if now - self.started < self.DELAY or now - self.drawn_at < self.PERIOD:
            return
        if self.counter is None and self.count is not None:
            self.counter = threading.Thread(target=self.run_count, name="sync-count", daemon=True)
            self.counter.start()
        self.drawn_at = now
        self.draw(now - self.started)

    def run_count(self) -> None:
        self.total = self.count(self.stop_count.is_set)

    def draw(self, elapsed: float) -> None:
        rate = _human(int(self.bytes / elapsed)) if elapsed else "0 bytes"
        done = f"{self.checked:,} entries checked"
        left = ""
        if self.total and self.checked and self.checked <= self.total:
            done = f"{self.checked:,} of {self.total:,} entries checked ({100 * self.checked // self.total}%)"
            left = f", about {_clock(elapsed * (self.total - self.checked) / self.checked)} left"
        text = (f"sync.py: {done}, {self.files:,} files copied ({_human(self.bytes)}, {rate}/s), "
                f"{_clock(elapsed)} elapsed{left}")
        self.text = text
        self.redraw()

    def redraw(self) -> None:
        self.stream.write("\r" + self.text + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="sync.py",
        description="Keep REPLICA an exact one-way mirror of SOURCE, re-syncing every "
                    "INTERVAL seconds and logging every action to the console and LOG_FILE.",
        epilog="Exit status: 0 the replica is an exact mirror (or the loop was stopped "
               "by Ctrl-C/SIGTERM); 1 an item could not be mirrored (with --once); "
               "2 bad arguments or a failed precondition, nothing changed.",
    )
    parser.add_argument("source", metavar="SOURCE", help="folder to copy from (only read)")
    parser.add_argument("replica", metavar="REPLICA",
                        help="folder to make identical to SOURCE (created if missing)")
    parser.add_argument("interval", metavar="INTERVAL", type=parse_interval,
                        help="seconds between the starts of two passes")
    parser.add_argument("log_file", metavar="LOG_FILE",
                        help="file to append the log to (not inside REPLICA)")
    parser.add_argument("--once", action="store_true",
                        help="run one pass and exit: 0 exact mirror, 1 some item failed")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="log what would be done, change nothing")
    parser.add_argument("-c", "--checksum", action="store_true",
                        help="also compare contents of files whose size and mtime match")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out paths matching PATTERN on both sides (repeatable): '*.tmp' "
                             "any name, '.git/' folders only, 'cache/**' below a path; see README")
    parser.add_argument("--exclude-from", action="append", default=[], metavar="FILE",
                        help="read exclude patterns from FILE, one a line (# starts a comment)")
    parser.add_argument("--delete-excluded", action="store_true",
                        help="remove excluded paths from REPLICA (by default they are left alone)")
    parser.add_argument("--trash", metavar="DIR",
                        help="instead of destroying what a pass deletes or overwrites, move it to "
                             "DIR/<pass time>/<path> (DIR on REPLICA's file system)")
    parser.add_argument("--trash-keep", type=parse_seconds, metavar="DAYS",
                        help="with --trash, remove trash folders of passes older than DAYS")
    parser.add_argument("--modify-window", type=parse_seconds, metavar="SECONDS", default=0.0,
                        help="count mtimes this close as equal (2 for FAT/exFAT, 1 for some SMB shares)")
    parser.add_argument("-i", "--itemize", action="store_true",
                        help="print a change code and path per change on stdout, for scripts")
    parser.add_argument("--allow-empty-source", action="store_true",
                        help="let an empty SOURCE empty a non-empty REPLICA (refused by default: "
                             "an unmounted drive looks empty)")
    parser.add_argument("--max-delete", type=parse_count, metavar="N",
                        help="refuse a pass that would delete more than N entries "
                             "(it changes nothing and fails)")
    parser.add_argument("--workers", type=parse_count, metavar="N", default=DEFAULT_WORKERS,
                        help="processes that mirror separate subtrees at once "
                             f"(default: the number of CPUs, at most 8; here {DEFAULT_WORKERS})")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="console shows only warnings, errors and pass summaries")
    parser.add_argument("-v", "--verbose", action="store_true", help="add debug detail")
    parser.add_argument("--version", action="version", version=f"sync.py {__version__}")
    return parser


def _raise_open_file_limit() -> None:
    """The walk holds two descriptors per directory level; let a deep tree have them."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows has no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # keep the lower limit: a too-deep tree then fails per item, logged


def _install_signal_handlers(stop: threading.Event, caught: list) -> None:
    """Ctrl-C and SIGTERM ask the loop to stop after the current file; a second
    one stops at once (the file being copied is left as a temporary file that
    the next pass removes)."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        caught.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        check_paths(args.source, args.replica, args.log_file)
        patterns = list(args.exclude)
        for path in args.exclude_from:
            try:
                patterns += read_exclude_file(path)
            except OSError as err:
                raise UsageError(f"cannot read --exclude-from {path!r}: {_reason(err)}") from None
        if args.trash_keep is not None and not args.trash:
            raise UsageError("--trash-keep needs --trash DIR")
        try:
            logger = _setup_logging(args.log_file, args.quiet, args.verbose)
        except OSError as err:
            raise UsageError(f"cannot open LOG_FILE {args.log_file!r}: {_reason(err)}") from None
        lock = None
        if not args.dry_run:  # a dry run changes nothing, so it may run beside a real one
            try:
                os.makedirs(args.replica, exist_ok=True)
            except OSError as err:
                raise UsageError(f"cannot create REPLICA {args.replica!r}: {_reason(err)}") from None
            if args.trash:
                check_trash(args.trash, args.source, args.replica)
            try:
                lock = lock_replica(args.replica)
            except OSError as err:
                logger.warning("cannot lock REPLICA (%s): make sure no other sync.py writes to it",
                               _reason(err))
    except UsageError as err:
        print(f"sync.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    options = Options(checksum=args.checksum, dry_run=args.dry_run,
                      allow_empty_source=args.allow_empty_source, max_delete=args.max_delete,
                      workers=max(1, args.workers), excludes=Excludes(patterns) or None,
                      delete_excluded=args.delete_excluded, trash=args.trash,
                      trash_keep_days=args.trash_keep,
                      modify_window_ns=int(args.modify_window * 1_000_000_000))
    _raise_open_file_limit()
    stop, caught = threading.Event(), []
    _install_signal_handlers(stop, caught)

    progress = None
    if _Progress.wanted(sys.stderr, args.quiet):
        progress = _Progress(sys.stderr, count=lambda stop: count_entries(args.source, options.excludes, stop))
        for handler in logger.handlers:
            if isinstance(handler, _Console):
                handler.progress = progress

    def report(event: Event) -> None:
        logger.log(ACTIONS[event.action], format_event(event, args.dry_run))
        if args.itemize and event.action in ITEMIZE:
            print(itemize(event), flush=True)
        if progress:
            progress.event(event)

    results = []

    def on_pass(result: PassResult) -> None:
        results.append(result)
        if progress:
            progress.finish()
        level = logging.WARNING if result.errors else logging.INFO
        logger.log(level, format_summary(result, args.dry_run), extra={"summary": True})

    mode = "once" if args.once else f"every {args.interval:g} s"
    logger.info("sync.py %s started: %s -> %s, %s, log %s; options: %s", __version__,
                _show(args.source), _show(args.replica), mode, _show(args.log_file),
                _describe_options(parser, args), extra={"summary": True})
    try:
        checked = progress.progress if progress else None
        if args.once:
            on_pass(run_pass(args.source, args.replica, options, report, stop.is_set, checked))
        else:
            run_periodically(args.source, args.replica, args.interval, options, report,
                             on_pass, stop, progress=checked)
    except KeyboardInterrupt:
        logger.warning("stopped at once by a second signal")
        return EXIT_FAILED
    except Exception:
        logger.critical("internal error: this is a bug in sync.py; please report it with "
                        "these lines", exc_info=True)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if lock is not None:
            os.close(lock)
    if caught:
        logger.info("stopped by %s", caught[0], extra={"summary": True})
    else:
        logger.info("finished", extra={"summary": True})
    if args.once:
        last = results[-1]
        return EXIT_OK if not (last.errors or last.interrupted) else EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
