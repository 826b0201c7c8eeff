"""sync.py: keep REPLICA an exact one-way mirror of SOURCE.

    python3 sync.py SOURCE REPLICA INTERVAL LOG_FILE [options]

What a pass guarantees
----------------------
After a pass that reports no errors, REPLICA holds exactly the relative paths
of SOURCE, and each path is the same kind of entry (regular file, directory,
symbolic link):

* files have the same bytes (holes of sparse files stay holes), permission
  bits and modification time (nanoseconds where the file system keeps them;
  times are compared as REPLICA's file system stores them, probed once per
  run); setuid and setgid only where the replica entry has the source's
  owner and group;
* directories have the same permission bits (read-only ones included, applied
  after their contents are written) and modification time; empty directories
  are mirrored;
* symbolic links are recreated with the same target text and time and are
  never followed, on either side;
* files, folders and links have the source's owner (when run as root) and
  group (where the process may give it), extended attributes (user.* unless
  root) and POSIX ACLs, unless Options turns them off (see Keep); names that
  share one file in SOURCE share one in REPLICA (Options.hard_links);
  metadata alone is changed in place;
* everything else under REPLICA is removed, except paths the include and
  exclude rules leave out (``excludes``, a Filters matched as rsync
  matches them), unless ``delete_excluded``.

What REPLICA's file system does not store (permission bits, owners, xattrs,
ACLs, hard links, symbolic links: probed once per run, see _probe_replica)
is reported once and named in the summary, as are the owners a process
without root could not give (PassResult.left_out).  Names it would refuse,
store under another name, or store as one entry (README and readme where
case does not count) are errors, found before anything is written: such
entries are never written, and a replica entry they would share is left as
it is (see _fit_names).

SOURCE is only ever read.  A pass that saw a file change or vanish while
copying it is not exact either (PassResult.exact).  A replica file is current when its size and mtime
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

SOURCE, REPLICA and TRASH stay apart: every pass opens them once and refuses
them (changing nothing) when one is, contains or lies inside another,
compared by identity and, on Linux, through the mount table, so bind mounts
and re-pointed links are caught; the walk never enters, moves or deletes a
folder that is one of them (or above one) seen through a mount.  A Mirror
remembers REPLICA's file system across the passes of a run: a REPLICA that
went missing or moved to another file system is refused, never created
again on the disk underneath, and only REPLICA itself is ever created.

Refusals that protect the replica: an empty SOURCE root beside a non-empty
REPLICA (an unmounted drive) changes nothing unless ``allow_empty_source``;
a folder whose deletions would remove more than 100 entries and either more
than half of REPLICA or all of a folder whose source is empty changes
nothing unless ``allow_mass_delete`` (or an explicit ``max_delete``); a pass
that would delete more than ``max_delete`` entries changes nothing.  A
folder whose source became more private is restricted before anything is
written into it.  With ``trash``, what a pass deletes or overwrites is moved (or hard-linked)
to TRASH/<pass time>/<path> instead of destroyed.  Entries the source renamed
within a folder are renamed in the replica rather than copied again (the
files in a renamed folder are then compared by their bytes).  Worker
processes walk separate subtrees at once; the events still come in the order
one process would give.  ``abort`` stops a pass within one chunk of a copy.

The core (everything above the CLI section) never prints and never exits: it
reports what it does through a callback, returns results and raises.  Only
``main()`` turns them into log lines, messages and exit codes.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import functools
import math
import os
import itertools
import re
import select
import signal
import stat
import struct
import sys
import threading
import time
from collections import Counter, deque
from typing import Callable, NamedTuple, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__version__ = "0.1.0"

# ---------------------------------------------------------------- constants --

# Exit statuses of the CLI (main), for monitoring: 0 and 2 as shells expect.
EXIT_OK = 0  # the replica is an exact mirror
EXIT_FAILED = 1  # not exact: an item could not be mirrored, or the pass was cut short
EXIT_USAGE = 2  # bad arguments or a failed precondition; nothing was changed
EXIT_REFUSED = 3  # a safety check refused the pass or a folder (empty SOURCE, mass deletion, ...)
EXIT_LOCKED = 4  # another sync.py holds REPLICA's lock (a cron overlap); nothing was done
EXIT_BUG = 5  # an internal error: a bug in sync.py, logged with its traceback

# Temporary files are named so that they can never collide with each other and
# are recognised by a later pass: ".syncpy-<16 hex digits>.tmp".  The name has a
# fixed length, so a 255-byte source name still gets a valid temporary name.
TEMP_PREFIX = ".syncpy-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.syncpy-[0-9a-f]{16}\.tmp\Z")
# A trash folder per pass: TRASH/2026-11-25_114530.123/<relative path>
_TRASH_STAMP = re.compile(r"(\d{4}-\d\d-\d\d_\d{6})\.\d{3}\Z")

COPY_CHUNK = 1 << 20  # bytes per read for the buffered copy
# Bytes per read when comparing two files: small enough that what was just
# read is still in the CPU cache when it is compared (a third faster than
# 1 MiB on tmpfs, measured).
COMPARE_CHUNK = 128 << 10
# The default guard against mass deletion: a folder whose deletions would
# remove more than this many entries, and more than half of REPLICA's, is
# left alone (see _MassDeletionGuard).
MASS_DELETE_FLOOR = 100
# Files that failed for lack of space while other copies were running are
# retried once at the end of the pass; at most this many are remembered.
RETRY_LIMIT = 1000
MAX_WAIT = 3600.0  # the loop sleeps in steps of at most this (a clock limit, not a policy)
# Worker processes walk separate subtrees at once.  Processes, not threads:
# a pass is mostly system calls of a microsecond each, and threads spend
# more handing the GIL around such calls than they win.
DEFAULT_WORKERS = max(1, min(os.cpu_count() or 1, 8))
# ...but where each request waits on a network (Stores.latency), processes
# overlap their waits, and many pay however few CPUs there are: on a replica
# adding 2 ms a request, a no-change pass over 20,000 files took 2.2 s with
# 2 workers, 0.88 s with 16 or 32, and 1.55 s with 64 (2 CPUs).
SLOW_WORKERS = 16
# The main process walks the top levels itself only until they hold this
# many subtrees (at most SPLIT_MAX_DEPTH levels): workers then hand folders
# over among themselves (see _FanOut), so more would only be a serial start.
# Splitting below the root at once instead of at 2 subtrees per worker: on a
# replica adding 0.5 ms a request, 16 workers copied 5,000 small files of a
# top-heavy tree in 3.2 s instead of 6.4 s; no change on tmpfs.
SPLIT_MIN_TASKS = 2
SPLIT_MAX_DEPTH = 6
_CAN_FORK = hasattr(os, "fork") and sys.platform != "darwin"  # fork is unsafe on macOS
# Threads do pay where one system call moves much data and releases the GIL
# for long: files from this size are copied and compared by a few threads.
PARALLEL_MIN_SIZE = 1 << 20
LARGE_FILE_THREADS = 4
# ...and where each request waits on a network: on a REPLICA where looking
# a name up takes this long (one round trip to a NAS; local disks and USB
# sticks through FUSE take about 20 us, measured), every file's copy goes to
# a pool of this many threads, so that their waits overlap (on a FUSE file
# system adding 0.5 ms a request, an initial copy of 5,000 small files took
# 16 s instead of 23 s).  Where a request adds 0.15 ms (a lookup then takes
# 0.19 ms), a no-change pass over 20,000 files took as long either way; at
# 0.25 ms, 0.52 s with 16 worker processes against 0.74 s with 2.
SLOW_REQUEST = 0.00015
LATENCY_THREADS = 16
# A SOURCE where opening a folder takes this long is as slow (a NAS): such
# an open is one round trip to the server (NFS asks for the folder's
# attributes, SMB opens a handle, FUSE sends OPENDIR), as looking a name
# up in REPLICA is (SLOW_REQUEST); FUSE on a USB stick takes about 20 us.
# Where a request adds 0.15 ms (an open then takes about 0.19 ms), a
# no-change pass over 20,000 files took 0.56 s with 16 worker processes
# against 0.63 s with 2.
SLOW_OPEN = 0.00015
# Kernel file systems on a local disk (or in memory) are never timed: their
# requests do not wait on a network, and on a busy machine the timing alone
# once judged a local ext4 slow.  FUSE, network and unknown types are timed.
LOCAL_KINDS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "nilfs2", "bcachefs",
    "zfs", "tmpfs", "ramfs", "overlay", "vfat", "msdos", "exfat", "ntfs3", "hfsplus", "udf"})
# File work queued in one folder before the walk waits for it (bounds the
# memory a folder of many files needs while its copies run in threads).
PENDING_LIMIT = 256
# Queued file work that is finished is reported at least this often (seconds),
# so that the progress line and the log's times follow the copying.  Not after
# each file: a copy's work and its line's, taken in turns, cost a fifth more
# CPU than each taken in runs (measured on 40,000 small files on tmpfs).
REPORT_EVERY = 0.05
# A folder with this many entries in the source is a big folder, where
# worker processes may be used and both file systems are local (see
# _Walk.use): the regular files both sides list are left out of the
# folder's plan and examined, decided and mirrored SLICE_CHUNK names at a
# time (see _Walk.mirror_slice), so that what is held of them stays small
# and in the processor's caches (a no-change pass over a folder of 100,000
# files: a quarter less CPU, 39 MiB less at the peak).  Not over a network: a stat
# after the listing, rather than during it, misses the attributes NFS and
# FUSE send with the listing (READDIRPLUS) and costs a round trip each
# (20,000 files at 2 ms: 40 s instead of 0.4 s).
BIG_FOLDER = 1024
SLICE_CHUNK = 256
# A big folder with this many entries has those files cut by name into
# slices, one per worker process, each mirrored by a process of its own: no
# tree shape, not even one folder, is left to one process.
SLICE_MIN = 8192

_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not block open()
_O_NOATIME = getattr(os, "O_NOATIME", 0)  # reading should not touch the source's atime
# A handle on a file that opens nothing (Linux): chmod through /proc/self/fd
# then works on a file of mode 000 and never follows a link.
_O_PATH = getattr(os, "O_PATH", 0) if os.path.isdir("/proc/self/fd") else 0
# Where Linux says what is mounted, and what should be.
MOUNTINFO = "/proc/self/mountinfo"
FSTAB = "/etc/fstab"

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

# Metadata the platform lets a process set (see Keep).  Extended attributes
# (and the POSIX ACLs Linux stores in them) are read by path: under a
# directory descriptor, by name from inside the folder, or through
# /proc/self/fd (see _list_xattrs).
_XATTRS = hasattr(os, "listxattr") and (not _DIR_FD or os.path.isdir("/proc/self/fd"))
_ACL_KEYS = ("system.posix_acl_access", "system.posix_acl_default")
# The namespaces mirrored besides ACLs (others, such as system.nfs4_acl, are not).
_ALL_NAMESPACES = frozenset({"user", "trusted", "security"})
_OWNERS = hasattr(os, "chown")
_HARD_LINKS = hasattr(os, "link") and os.link in os.supports_follow_symlinks  # (never following a link)
_LINK_TIMES = os.utime in os.supports_follow_symlinks
# Errors that say a file system (not this file) lacks a feature.
_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUPP", 524)}


_CAP_CHOWN, _CAP_SYS_ADMIN = 1 << 0, 1 << 21


def _umask() -> int:
    """This process's umask (Linux says it; elsewhere it is set and put back)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _capabilities() -> Optional[int]:
    """This process's effective capabilities (Linux), or None where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _is_root(capability: int = _CAP_CHOWN) -> bool:
    """Whether this process may give files to any owner (for _CAP_SYS_ADMIN:
    write trusted.* and security.* attributes): root, where Linux says so by
    the capability (root without capabilities may not)."""
    caps = _capabilities()
    if caps is not None:
        return bool(caps & capability)
    return hasattr(os, "geteuid") and os.geteuid() == 0


# Kinds of entry.
FILE = "file"
DIR = "directory"
LINK = "link"
SPECIAL = "special file"

# -------------------------------------------------- types and the action table --


class Entry(NamedTuple):
    """One directory entry as lstat saw it."""

    kind: str
    st: Optional[os.stat_result]
    target: Optional[str] = None  # link target text


class Action(NamedTuple):
    """How one kind of event is reported: the one place an action is defined.

    Every log line about an entry reads PHRASE PATH [REST]: a fixed phrase
    ("copied", "created directory", "would remove file"), the path as one
    token (see _token) and, after a space, "(...)", "-> target" or nothing.
    Errors and debug lines read PATH: MESSAGE (or only MESSAGE when they are
    about the whole pass, whose first word then never ends in ":").
    """

    severity: str  # "debug", "info", "warning" or "error"
    done: str  # what the log says once done: {path}, {detail}, {size} (detail as a size)
    would: str  # what a dry run says instead ("" : the same as done)
    summary: str = ""  # its count's label in the pass summary ("": not counted there)
    itemize: str = ""  # rsync-style change code for --itemize ("": not itemized)
    would_summary: str = ""  # the count's label in a dry run's summary ("": the same)


# Every action a pass reports, in the order the pass summary counts them.
ACTIONS = {
    "copy": Action("info", "copied {path} ({size})", "would copy {path} ({size})",
                   "copied", ">f+++++++++", "would copy"),
    "update": Action("info", "updated {path} ({size})", "would update {path} ({size})",
                     "updated", ">f.st......", "would update"),
    # detail: the old path
    "move": Action("info", "moved {path} (from {detail})", "would move {path} (from {detail})",
                   "moved", "*moving    ", "would move"),
    "mkdir": Action("info", "created directory {path}", "would create directory {path}",
                    "directories created", "cd+++++++++", "would create directories"),
    "link": Action("info", "created link {path} -> {detail}", "would create link {path} -> {detail}",
                   "links created", "cL+++++++++", "would create links"),
    # a symbolic link whose target changed
    "relink": Action("info", "updated link {path} -> {detail}", "would update link {path} -> {detail}",
                     "links updated", "cL.s.......", "would update links"),
    # a file with another name in SOURCE (detail: the name it was linked to)
    "hardlink": Action("info", "linked {path} (to {detail})", "would link {path} (to {detail})",
                       "hard links made", "hf+++++++++", "would make hard links"),
    # metadata of a current entry, set in place (detail: what, see _describe_attrs;
    # the itemize code comes with the event)
    "attrs": Action("info", "set attributes of {path} ({detail})", "would set attributes of {path} ({detail})",
                    "attributes set", "", "would set attributes"),
    # a file, link or special file (detail: its kind; Event.trash: where it
    # was moved instead, with Options.trash)
    "remove": Action("info", "removed {detail} {path}", "would remove {detail} {path}",
                     "removed", "*deleting  ", "would remove"),
    "rmdir": Action("info", "removed directory {path}", "would remove directory {path}",
                    "directories removed", "*deleting  ", "would remove directories"),
    # the old version of a file about to be overwritten, linked (or moved)
    # to the trash (detail: where)
    "trash": Action("info", "kept old version of {path} (in trash as {detail})",
                    "would keep old version of {path} (in trash)", "kept in trash", "*trashing  ",
                    "would keep in trash"),
    # a trash folder older than trash_keep_days (path: its name)
    "prune": Action("info", "pruned trash folder {path}", "would prune trash folder {path}",
                    "trash folders pruned", "", "would prune trash folders"),
    # a temporary file left by an interrupted pass
    "temp": Action("info", "removed leftover temporary file {path}",
                   "would remove leftover temporary file {path}", "temporary files removed", "*deleting  ",
                   "would remove temporary files"),
    # a source entry that is never mirrored (a special file; detail: its kind)
    "skip": Action("warning", "skipped {path} ({detail})", "", "skipped"),
    "changed": Action("warning", "changed while copying {path} (the next pass copies it again)",
                      "", "changed while copying"),
    "vanished": Action("info", "vanished before copying {path}", "", "vanished"),
    # REPLICA's file system cannot store this mtime (detail: what it keeps)
    "clamped": Action("warning", "kept another time for {path} ({detail})", ""),
    # what REPLICA's file system was found to store, where that is not all ext4 stores (once a run)
    "probe": Action("info", "replica file system: {detail}", ""),
    # SOURCE's file system answers slowly (detail: how slowly, and what a pass does about it; once a run)
    "slow source": Action("info", "source file system: {detail}", ""),
    # what the options ask for but REPLICA's file system does not store (once a
    # run; info: the summary says it again, and -q under cron must not mail it)
    "unstored": Action("info", "REPLICA's file system does not store {detail}: they are not mirrored", ""),
    # a pass took longer than the interval (detail: its seconds)
    "overrun": Action("warning", "the pass took {detail} s, longer than INTERVAL; starting the next one now", ""),
    "error": Action("error", "{path}: {detail}", ""),  # an item could not be mirrored
    # why the pass decided what it did (only with Options.explain)
    "debug": Action("debug", "{path}: {detail}", ""),
}

# Actions whose lines are about the run, not about an entry (no path).
_RUN_ACTIONS = frozenset({"probe", "slow source", "unstored", "overrun"})


# rsync's --itemize letters for metadata, by position in its 11-character
# code (".f...po...x": permissions, owner, xattrs changed), and their names.
_LETTERS = {"t": (4, "time"), "p": (5, "permissions"), "o": (6, "owner"), "g": (7, "group"),
            "a": (9, "ACL"), "x": (10, "extended attributes")}
_KIND_LETTERS = {FILE: "f", DIR: "d", LINK: "L"}


def _itemize_attrs(kind: str, letters: str) -> str:
    """The --itemize code of a metadata change: .f...p....., .L..t......"""
    code = ["."] * 11
    code[1] = _KIND_LETTERS.get(kind, "S")
    for letter in letters:
        code[_LETTERS[letter][0]] = letter
    return "".join(code)


def _and(parts: list) -> str:
    """a, b and c"""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _describe_letters(letters: str, default: str = "") -> str:
    """owner, permissions and ACL"""
    names = [_LETTERS[letter][1] for letter in "ogptax" if letter in letters]
    return _and(names) if names else default


def _describe_attrs(letters: str, uid: int, gid: int, mode: Optional[int]) -> str:
    """What an "attrs" event set: owner 1000, permissions 0o644 and ACL"""
    values = {"o": f"owner {uid}", "g": f"group {gid}", "p": f"permissions {mode:#o}" if mode is not None else ""}
    return _and([values.get(letter) or _LETTERS[letter][1] for letter in "ogptax" if letter in letters])


def _human(n: int) -> str:
    """A size for people: 512 bytes, 1.5 KiB, 3.0 GiB."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _show(path: str) -> str:
    """A path as one printable line: undecodable bytes and control
    characters are escaped (b'\\xff' -> \\xff, newline -> \\n)."""
    if not path:
        return "."
    if path.isprintable():
        return path
    raw = path.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _token(path: str) -> str:
    r"""A path as one token of a log line, so that every line can be split
    back into its parts: as it is when it is printable and holds no space,
    double quote or backslash ("." for the root); otherwise in double quotes,
    with \\ \" \n \t \r, \xHH for a byte that is not UTF-8 and \uXXXX for
    any other unprintable character."""
    if not path:
        return "."
    if path.isprintable() and " " not in path and '"' not in path and "\\" not in path:
        return path
    out = []
    for c in path:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c.isprintable() or c == " ":
            out.append(c)
        elif "\udc80" <= c <= "\udcff":  # a byte os.fsdecode could not decode
            out.append(f"\\x{ord(c) - 0xdc00:02x}")
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


# Events whose detail is a path or link target, written as a path token.
_PATH_DETAIL = frozenset({"link", "relink", "move", "trash", "hardlink"})


class Event(NamedTuple):
    """Something a pass did, would do (dry run), or failed to do.

    action is one of ACTIONS; path is relative to the mirror root, with "/"
    between components ("" is the root itself).
    """

    action: str
    path: str
    detail: str = ""
    # For a refusal: the Options field that lets the user proceed anyway
    # ("allow_empty_source", "allow_mass_delete", "max_delete"); the CLI
    # turns it into the flag to use.
    advice: str = ""
    code: str = ""  # the --itemize code, where the action's depends on the entry ("attrs")
    trash: str = ""  # remove, rmdir: where the entry was moved instead (Options.trash)

    def text(self, dry_run: bool = False) -> str:
        """One log line's message (see Action for its grammar)."""
        action = ACTIONS[self.action]
        template = dry_run and action.would or action.done
        if self.action in ("error", "debug") and not self.path:
            template = "{detail}"  # about the whole pass, which the detail says
        size = _human(int(self.detail)) if self.detail.isdigit() else self.detail
        detail = _token(self.detail) if self.action in _PATH_DETAIL else self.detail
        text = template.format(path=_token(self.path), detail=detail, size=size)
        if self.trash:
            text += " (would keep it in trash)" if dry_run else f" (kept in trash as {_token(self.trash)})"
        return text

    def itemized(self) -> str:
        """The --itemize line: change code and path ("" for actions without a code)."""
        code = self.code or ACTIONS[self.action].itemize
        if not code:
            return ""
        path = _show(self.path) + ("/" if self.action in ("mkdir", "rmdir") or self.code[1:2] == "d" else "")
        if self.action in ("link", "relink"):
            path += f" -> {_show(self.detail)}"
        elif self.action == "hardlink":
            path += f" => {_show(self.detail)}"
        elif self.action == "move":
            path = f"{_show(self.detail)} -> {path}"
        return f"{code} {path}"


class _Fresh(NamedTuple):
    """The default of a _Record field that is made afresh for each record."""

    make: Callable


class _Record:
    """A class whose annotated class attributes are its fields: made by
    keyword (or in order), compared field by field, shown with them, and
    copied with changes by replace().  dataclasses does the same, but
    importing it (inspect, ast, dis) took a tenth of sync.py's start-up."""

    _fields: tuple = ()

    def __init_subclass__(cls):
        super().__init_subclass__()
        cls._fields = tuple(cls.__dict__.get("__annotations__", ()))

    def __init__(self, *args, **values):
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} fields")
        values.update(zip(self._fields, args))
        for name in self._fields:
            if name in values:
                value = values.pop(name)
            else:
                value = getattr(type(self), name)
                if isinstance(value, _Fresh):
                    value = value.make()
            setattr(self, name, value)
        if values:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(values))!r}")

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # mutable

    def replace(self, **changes):
        return type(self)(**{**{n: getattr(self, n) for n in self._fields}, **changes})


class Options(_Record):
    """How a pass behaves."""

    checksum: bool = False  # also compare bytes when size and mtime are equal
    dry_run: bool = False  # report what would be done, change nothing
    allow_empty_source: bool = False  # let an empty SOURCE empty a non-empty REPLICA
    max_delete: Optional[int] = None  # refuse a pass that would delete more entries
    # Processes that walk subtrees at once, forked where the OS allows.  The
    # library's default is 1 (all in the caller: a threaded program must not
    # fork); the CLI's is the number of CPUs (DEFAULT_WORKERS).
    workers: int = 1
    # Processes instead of `workers` where SOURCE or REPLICA is slow to
    # answer (a NAS, see _Walk.slow); 0: `workers` everywhere.  The CLI's
    # default is SLOW_WORKERS unless --workers is given.
    slow_workers: int = 0
    excludes: Optional["Filters"] = None  # include and exclude rules: paths left out on both sides
    delete_excluded: bool = False  # remove excluded paths from REPLICA after all
    modify_window_ns: int = 0  # mtimes this close count as equal (an override: REPLICA's step is probed)
    trash: Optional[str] = None  # move what a pass deletes or overwrites here, not destroy it
    trash_keep_days: Optional[float] = None  # prune trash folders of older passes
    # Let one folder's deletions remove more than half of REPLICA (refused by
    # default; an explicit max_delete replaces this guard).
    allow_mass_delete: bool = False
    # Files that must never be inside REPLICA, by what to call them (the
    # CLI's {"LOG_FILE": path}); checked at the start of every pass, like the
    # separation of the trees.
    protect: dict = _Fresh(dict)
    # Metadata mirrored beside bytes and times, where REPLICA's file system
    # stores it (see Keep): permission bits, owners only when running as
    # root, groups the process may give, extended attributes (user.* only
    # unless root), POSIX ACLs, and names that share one file.
    perms: bool = True
    owner: bool = True
    group: bool = True
    xattrs: bool = True
    acls: bool = True
    hard_links: bool = True
    # Flush each copied file's data to the disk before it takes its name,
    # and each replica folder once entries in it changed (rsync's --fsync):
    # after a power cut every replica file is then its complete old or
    # complete new version, not only in the page cache.
    fsync: bool = False
    # Report why entries were judged as they were (Event "debug"): costs a
    # little per entry, so only when asked (the CLI's -v).
    explain: bool = False
    # Symbolic links.  False leaves them out of the mirror as excludes do
    # (a replica entry of the same name is left alone) and counts them
    # (PassResult.left_out); where REPLICA's file system cannot store links,
    # each one is an error unless this is False.
    links: bool = True


class PassResult(_Record):
    """What one pass did."""

    counts: Counter = _Fresh(Counter)  # action -> number of events
    checked: int = 0  # source entries examined
    bytes_copied: int = 0
    errors: int = 0
    duration: float = 0.0
    interrupted: bool = False  # stopped early on request
    refused: bool = False  # a safety check refused the pass or a folder: see the error events
    # What the options ask for but REPLICA's file system does not store
    # ("owners", "ACLs", ...); and in counts, besides the actions, "missed o"
    # and "missed g": entries whose owner (group) this process may not give,
    # and "links left out" (Options.links).
    unstored: list = _Fresh(list)

    @property
    def exact(self) -> bool:
        """True when the replica is now an exact mirror of the source."""
        unsettled = self.counts["changed"] + self.counts["vanished"]
        return not (self.errors or self.interrupted or unsettled)

    def summary(self, dry_run: bool = False) -> str:
        """The pass in one line: what it counted, and whether the mirror is exact."""
        parts = [f"checked {self.checked}"]
        parts += [f"{dry_run and action.would_summary or action.summary} {self.counts[name]}"
                  for name, action in ACTIONS.items() if action.summary and self.counts[name]]
        parts.append(f"errors {self.errors}")
        head = "dry run finished" if dry_run else "pass finished"
        if self.interrupted:
            head += " early (stopped)"
        copied = "would be copied" if dry_run else "copied"
        text = f"{head} in {self.duration:.2f} s: {', '.join(parts)}; {_human(self.bytes_copied)} {copied}"
        if dry_run:
            return text
        if not self.exact:
            return text + "; replica is NOT yet an exact mirror"
        left_out = self.left_out()
        return text + "; replica is an exact mirror" + (f" except for {left_out}" if left_out else "")

    def left_out(self) -> str:
        """The metadata an otherwise exact mirror lacks, and why ("": none)."""
        parts = []
        for letter, what, why in (("o", "owner", "only root may give them"),
                                  ("g", "group", "this user is not in them")):
            n = self.counts["missed " + letter]
            if n:
                parts.append(f"the {what}s of {n:,} entries ({why})" if n > 1 else
                             f"the {what} of 1 entry ({why.replace('them', 'it')})")
        if self.unstored:
            parts.append(f"{_and(self.unstored)} (REPLICA's file system does not store them)")
        links = self.counts["links left out"]
        if links:
            parts.append(f"{links:,} symbolic link{'s' * (links > 1)} (left out on request)")
        return "; ".join(parts)


class Times(NamedTuple):
    """How a file system stores modification times, as _probe_times found
    it: in steps of `step` nanoseconds, rounded down, to the nearest or up,
    and held within [lowest, highest] where it cannot store more (None: as
    far as the probe could tell, no limit)."""

    step: int = 1
    rounding: str = "down"
    lowest: Optional[int] = None
    highest: Optional[int] = None

    @property
    def exact(self) -> bool:
        return self.step == 1 and self.lowest is None and self.highest is None

    def fit(self, ns: int) -> int:
        """The time this file system keeps when it is asked to store ns."""
        step = self.step
        if step > 1:
            if self.rounding == "down":
                ns -= ns % step
            elif self.rounding == "up":
                ns += -ns % step
            else:
                ns = (ns + step // 2) // step * step
        if self.highest is not None and ns > self.highest:
            return self.highest
        if self.lowest is not None and ns < self.lowest:
            return self.lowest
        return ns

    def keeps(self, ns: int) -> bool:
        """ns lies within the range this file system can store."""
        return not (self.highest is not None and ns > self.highest
                    or self.lowest is not None and ns < self.lowest)


# Names Windows keeps for devices, with or without an extension (NTFS with
# windows_names refuses them).
_RESERVED_NAMES = frozenset(["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                             *(f"LPT{i}" for i in range(1, 10))])
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@functools.lru_cache(maxsize=None)
def _any_of(chars: str) -> "re.Pattern":
    return re.compile(f"[{re.escape(chars)}]")


class Names(NamedTuple):
    """How a file system treats names, as _probe_names found it.  The
    default, Names(), is a POSIX file system: any name but "/" and NUL,
    as it is, case-sensitive."""

    # "": case-sensitive; "ascii": a-z and A-Z are one letter (vfat without
    # utf8); "unicode": every letter's cases are one (exFAT, FAT with utf8).
    fold: str = ""
    strips: str = ""  # trailing characters it drops ("." on FAT: "notes." is stored as "notes")
    refuses: str = ""  # characters it refuses anywhere (":" on exFAT and NTFS with windows_names)
    refuses_trailing: str = ""  # characters it refuses at the end (" " on FAT)
    reserved: bool = False  # refuses DOS device names (CON, nul.txt, ...)
    utf8: bool = False  # refuses names that are not valid UTF-8

    def key(self, name: str) -> str:
        """The name as the file system compares it: names with one key are one entry.
        Unicode letters fold by their simple (one-letter) upper case, as
        exFAT's up-case table does; composed and decomposed accents stay apart."""
        if self.fold == "ascii":
            return name.translate(_ASCII_UPPER)
        if self.fold == "unicode":
            if name.isascii():
                return name.upper()
            return "".join(up if len(up := c.upper()) == 1 else c for c in name)
        return name

    def problem(self, name: str) -> str:
        """Why the file system would not hold name as it is ("": it would)."""
        if self.utf8:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                return "it is not valid UTF-8"
        if self.refuses and _any_of(self.refuses).search(name):
            return f"it contains {_and([repr(c) for c in sorted(set(name) & set(self.refuses))])}"
        end = name[-1:]
        if end and end in self.refuses_trailing:
            return f"it ends with {end!r}"
        if end and end in self.strips:
            return f"it ends with {end!r}, which would be dropped (stored as {name.rstrip(self.strips)!r})"
        if self.reserved and name.partition(".")[0].rstrip(" ").upper() in _RESERVED_NAMES:
            return "it is a reserved device name on Windows"
        return ""

    def describe(self) -> list:
        """What sets these names apart from a POSIX file system, in words."""
        parts = []
        if self.fold:
            parts.append("case-insensitive" + (" (ASCII letters only)" if self.fold == "ascii" else ""))
        if self.refuses:
            shown = [c for c in self.refuses if c.isprintable()]
            if len(shown) < len(self.refuses):
                shown.append("control characters")
            parts.append(f"no {' '.join(shown)} in names")
        for chars, how in ((self.strips, "drops"), (self.refuses_trailing, "refuses")):
            if chars:
                parts.append(f"{how} trailing {_and([repr(c) for c in chars])}")
        if self.reserved:
            parts.append("no device names (CON, NUL, ...)")
        return parts


class Stores(NamedTuple):
    """What REPLICA's file system stores, as _probe_replica found it."""

    kind: str = ""  # its type, as the mount table (or the disk's boot sector) names it
    times: Times = Times()
    modes: bool = True  # permission bits (exFAT and ntfs-3g without options show fixed ones)
    owners: bool = True
    xattrs: bool = True  # user.* attributes
    namespaces: frozenset = frozenset({"user", "trusted", "security"})  # those it stores
    acls: bool = True
    hard_links: bool = True
    links: bool = True  # symbolic links
    names: Names = Names()
    # Seconds to look a name up there, where that is at least
    # SLOW_REQUEST (a network share: small files are then copied in threads);
    # 0.0 where it is faster.
    latency: float = 0.0

    def describe(self, workers: int = 1) -> str:
        """What was found, in a few words: "exfat (fuseblk), times 10 ms,
        no permission bits, no links, case-insensitive, ..." (workers: the
        worker processes a pass there uses)."""
        step, rounding = self.times.step, self.times.rounding
        value, unit = next((step // size, unit) for size, unit in
                           ((1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us"), (1, "ns")) if step % size == 0)
        parts = [self.kind or "type unknown",
                 f"times {value} {unit}" + (f" (rounded {rounding})" if rounding != "down" else "")]
        parts += [f"no {what}" for what, stored in (
            ("permission bits", self.modes), ("owners", self.owners), ("extended attributes", self.xattrs),
            ("ACLs", self.acls), ("hard links", self.hard_links), ("links", self.links)) if not stored]
        if self.latency:
            processes = f"{workers} worker processes, " if workers > 1 else ""
            parts.append(f"slow requests ({self.latency * 1000:.1f} ms to look up a name: "
                         f"{processes}files are copied {LATENCY_THREADS} at once)")
        return ", ".join(parts + self.names.describe())


class Keep(NamedTuple):
    """What a pass mirrors beyond bytes, permission bits and times: the
    options, narrowed once per run to what this process may set and
    REPLICA's file system stores (Keep.decide)."""

    modes: bool = True  # permission bits (all but a file system that does not store them)
    owner: bool = False
    group: bool = False
    groups: Optional[frozenset] = None  # the group ids this process may give (None: any, as root)
    # Owners (groups) asked for and stored, so that one this process cannot
    # give is counted as not mirrored (PassResult.missed).
    owner_asked: bool = False
    group_asked: bool = False
    uid: int = -1  # the owner and group a file this process creates gets
    gid: int = -1
    xattrs: bool = False
    # The namespaces of extended attributes mirrored: "user", and as root
    # "trusted" and "security", as far as REPLICA's file system stores them.
    namespaces: frozenset = frozenset()
    acls: bool = False
    hard_links: bool = False
    link_times: bool = False  # times of symbolic links (set without following them)
    # Permission bits not mirrored (Options.perms) on a file system that
    # stores them: new entries get the source's bits less this umask, as
    # with rsync --no-perms (None: modes mirrored, or not stored at all).
    umask: Optional[int] = None

    @classmethod
    def decide(cls, options: "Options", stores: Stores) -> tuple["Keep", list]:
        """(what to keep, what the options ask for that REPLICA's file
        system does not store)."""
        root = _is_root()
        unstored = [what for what, asked, stored in (
            ("permission bits", options.perms, stores.modes),
            ("owners", (options.owner and root or options.group) and _OWNERS, stores.owners),
            ("extended attributes", options.xattrs and _XATTRS, stores.xattrs),
            ("ACLs", options.acls and _XATTRS, stores.acls),
            ("hard links", options.hard_links and _HARD_LINKS, stores.hard_links)) if asked and not stored]
        if options.xattrs and _XATTRS and stores.xattrs and _is_root(_CAP_SYS_ADMIN):
            unstored += [f"{space}.* attributes" for space in sorted(_ALL_NAMESPACES - stores.namespaces)]
        groups = None
        if not root and hasattr(os, "getgroups"):
            groups = frozenset([*os.getgroups(), os.getegid()])
        keep = cls(modes=options.perms and stores.modes, owner=options.owner and root and stores.owners,
                   group=options.group and stores.owners and _OWNERS, groups=groups,
                   owner_asked=options.owner and stores.owners and _OWNERS,
                   group_asked=options.group and stores.owners and _OWNERS,
                   uid=os.geteuid() if _OWNERS else -1, gid=os.getegid() if _OWNERS else -1,
                   xattrs=options.xattrs and _XATTRS and stores.xattrs,
                   namespaces=stores.namespaces & (_ALL_NAMESPACES if _is_root(_CAP_SYS_ADMIN) else {"user"}),
                   acls=options.acls and _XATTRS and stores.acls,
                   hard_links=options.hard_links and _HARD_LINKS and stores.hard_links,
                   link_times=_LINK_TIMES, umask=None if options.perms or not stores.modes else _umask())
        return keep, unstored

    def new_mode(self, st: os.stat_result) -> Optional[int]:
        """The permission bits a new replica entry gets for source stat st
        where they are not mirrored (None: mirrored, or not stored)."""
        return None if self.umask is None else stat.S_IMODE(st.st_mode) & 0o777 & ~self.umask

    @property
    def any_xattrs(self) -> bool:
        return self.xattrs or self.acls

    def wants(self, key: str) -> bool:
        """Whether the extended attribute key is mirrored (ACLs are stored as system.posix_acl_*)."""
        if key.startswith("system.posix_acl_"):
            return self.acls
        return self.xattrs and key.partition(".")[0] in self.namespaces


class UsageError(Exception):
    """Bad arguments or a failed precondition: nothing has been changed."""


class Refused(UsageError):
    """A pass cannot start safely (the trees overlap, REPLICA's drive is gone,
    ...): nothing has been changed.  At start-up the CLI exits 2 with it;
    later, the pass fails with it as an error."""


class Locked(Refused):
    """Another sync.py holds REPLICA's lock: an overlap of scheduled runs,
    told apart from other refusals so that the CLI can say so by its status."""


class _Aborted(Exception):
    """A copy or comparison abandoned at once on request (a second signal)."""


class _Vanished(Exception):
    """The source file disappeared between listing and copying."""


class _NotRegular(Exception):
    """The source name no longer refers to a regular file."""


def _ignore(event: Event) -> None:
    pass


# ------------------------------------------------------------------ filters --


class Filters:
    """Include and exclude rules, matched as rsync matches them.

    rules: (include, pattern) pairs in order; the first rule that matches
    an entry decides, and an entry no rule matches is included.  An
    excluded folder is not looked into, so nothing below it is included.
    A pattern is matched against the entry's path relative to the mirror
    root (see _rule_regex): anchored there by a leading "/", otherwise
    against its last components (as many as the pattern has; one that
    starts with "**", anywhere); a trailing "/" limits it to folders and a
    trailing "/***" means a folder and all it holds.  "*" and "?" match
    within one component, "**" across them, [...] one character of a set
    (ranges, [!...] and [^...], POSIX classes such as [[:digit:]], never
    "/"), and a backslash escapes the next character when the pattern has
    any of "*?[".
    """

    def __init__(self, rules):
        self.rules = [(include, pattern) for include, pattern in rules if pattern.strip("/")]
        self._any_include = any(include for include, _ in self.rules)
        # Two regexes, each the rules' alternatives in order (the first
        # that matches is the one Python's re reports, as lastindex): rules
        # that look at the name alone, and rules that look at the path.
        # Where there are only excludes, order does not matter, and the
        # commonest ones, a name ("Thumbs.db") or an ending ("*.tmp"), are
        # told by a set and str.endswith, ten times faster than a regex.
        names, paths = ([], []), ([], [])
        # (names, endings) of files and folders, and of folders only
        self._plain = (set(), []), (set(), [])
        for index, (_, pattern) in enumerate(self.rules):
            plain = None if self._any_include else _plain_name(pattern)
            if plain is not None:
                literal, ending, dir_only = plain
                literals, endings = self._plain[dir_only]
                if ending is None:
                    literals.add(literal)
                else:
                    endings.append(ending)
                continue
            regex, by_name = _rule_regex(pattern)
            indexes, regexes = names if by_name else paths
            indexes.append(index)
            regexes.append(f"({regex})")
        self._plain = tuple((literals, tuple(endings)) for literals, endings in self._plain)
        self._name_rules, self._names = names[0], _alternatives(names[1])
        self._path_rules, self._paths = paths[0], _alternatives(paths[1])

    def __bool__(self):
        return bool(self.rules)

    def excluded(self, rel: str, entries: dict) -> set:
        """The names of entries (a folder's listing, at rel) that are excluded."""
        prefix = "/" + rel + "/" if rel else "/"
        if self._any_include:  # the first rule that matches decides: one by one
            match = self.match
            return {name for name, entry in entries.items() if match(prefix[1:] + name, name, entry.kind == DIR)}
        # Only excludes: any rule that matches will do; the cheap tests first.
        (literals, endings), (dir_literals, dir_endings) = self._plain
        names, paths = self._names, self._paths
        out = set()
        for name, entry in entries.items():
            is_dir = entry.kind == DIR
            if name in literals or name.endswith(endings) or is_dir and (
                    name in dir_literals or name.endswith(dir_endings)):
                out.add(name)
            elif names is not None or paths is not None:
                key = name + "\0" if is_dir else name
                if names is not None and names.fullmatch(key) or paths is not None and paths.fullmatch(prefix + key):
                    out.add(name)
        return out

    def match(self, rel: str, name: str, is_dir: bool) -> bool:
        """Whether the entry at rel (named name; a folder if is_dir) is excluded."""
        # (Inline and short: it runs for every entry of every pass.)
        (literals, endings), (dir_literals, dir_endings) = self._plain
        if name in literals or name.endswith(endings) or is_dir and (
                name in dir_literals or name.endswith(dir_endings)):
            return True  # (only ever filled without includes)
        if is_dir:
            name += "\0"
            rel += "\0"
        first = None
        if self._names is not None and (found := self._names.fullmatch(name)) is not None:
            if not self._any_include:
                return True
            first = self._name_rules[found.lastindex - 1]
        if self._paths is not None and (found := self._paths.fullmatch("/" + rel)) is not None:
            index = self._path_rules[found.lastindex - 1]
            first = index if first is None or index < first else first
        return first is not None and not self.rules[first][0]


class Excludes(Filters):
    """Exclude patterns, each read as --exclude reads it (see parse_rules)."""

    def __init__(self, patterns):
        super().__init__(parse_rules([("-", pattern) for pattern in patterns]))


def _plain_name(pattern: str) -> Optional[tuple]:
    """(name, None, folders only) for a pattern that is a plain name,
    (None, ending, folders only) for "*" and a plain ending; else None."""
    dir_only = pattern.endswith("/") and not pattern.endswith("/***")
    body = pattern[:-1] if dir_only else pattern
    if not body or body.startswith("/") or "/" in body or "\\" in body:
        return None
    if not any(c in body for c in "*?["):
        return body, None, dir_only
    if body[0] == "*" and not any(c in body[1:] for c in "*?[") and len(body) > 1:
        return None, body[1:], dir_only
    return None


def _alternatives(regexes: list):
    return re.compile("|".join(regexes), re.DOTALL) if regexes else None


def parse_rules(given: list) -> list:
    """(include, pattern) rules from (option, text) pairs in the order given:
    option "-" for --exclude, "+" for --include.  As rsync reads them, a
    text starting "- " or "+ " says its own kind and "!" clears the rules
    before it; rsync's other filter syntax (modifiers after "-," or "+,")
    is refused with UsageError, never taken literally."""
    rules = []
    for option, text in given:
        if text == "!":
            rules.clear()
            continue
        if text.startswith(("- ", "+ ")):
            option, text = text[0], text[2:]
        elif text.startswith(("-,", "+,", "!")):
            raise UsageError(f"filter rule {text!r}: rsync's rule modifiers and list clearing with "
                             "more than '!' are not supported")
        rules.append((option == "+", text))
    return rules


def read_rules_file(path: str, option: str) -> list:
    """(option, text) pairs from a file of patterns (option: "-" for
    --exclude-from, "+" for --include-from): one a line; blank lines and
    lines starting with "#" or ";" are left out, as rsync does."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return [(option, line) for line in lines if line.strip() and not line.startswith(("#", ";"))]


def _rule_regex(pattern: str) -> tuple[str, bool]:
    """A regex for rsync's pattern, and whether it is matched against the
    entry's name (True) or "/" and its path relative to the root (False),
    with a NUL appended for a folder (no wildcard matches it)."""
    dir_only = pattern.endswith("/")
    body = pattern.rstrip("/")
    anchored = body.startswith("/")
    body = body.lstrip("/") if anchored else body
    all_below = body.endswith("/***")
    if all_below:
        body = body[:-4]
    regex = _wild_regex(body) if any(c in body for c in "*?[") else re.escape(body)
    suffix = "(?:\0|/.*)" if all_below else "\0" if dir_only else "\0?"
    if not (anchored or all_below or "/" in body or "**" in body):
        return regex + suffix, True  # one component: the name
    # Anchored at the root; otherwise at any component ("**" first: anywhere).
    prefix = "/" if anchored else "" if body.startswith("**") else ".*/"
    return prefix + regex + suffix, False


# rsync's character classes, in the C locale it matches them in.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "blank": " \t", "cntrl": "\x00-\x1f\x7f",
    "digit": "0-9", "graph": "\x21-\x7e", "lower": "a-z", "print": "\x20-\x7e",
    "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"), "space": " \t\n\r\x0b\x0c",
    "upper": "A-Z", "xdigit": "0-9A-Fa-f",
}
_NEVER = "(?!)"


def _wild_regex(glob: str) -> str:
    """The regex of a pattern with wildcards, as rsync's wildmatch reads it
    (a bracket expression that is not closed makes it match nothing)."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append("[^\0]*")
            i += 2
            continue
        if c == "*":
            out.append("[^/\0]*")
        elif c == "?":
            out.append("[^/\0]")
        elif c == "[":
            found = _glob_class(glob, i)
            if found is None:
                return _NEVER
            regex, i = found
            out.append(regex)
        elif c == "\\" and i + 1 < len(glob):
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_class(glob: str, start: int):
    """The regex of the bracket expression that opens at glob[start], and the
    index of its closing "]"; None when it is not closed.  A "]" first in
    the set is a member, "!" or "^" first negates, a backslash escapes,
    [:name:] is a POSIX class, and a reversed range (z-a) matches nothing."""
    j = start + 1
    negate = glob[j:j + 1] in ("!", "^")
    j += negate
    members = []  # regex pieces: a character, a range, or a POSIX class's set
    first = True
    while j < len(glob):
        c = glob[j]
        if c == "]" and not first:
            break
        first = False
        if c == "[" and glob[j + 1:j + 2] == ":":
            end = glob.find(":]", j + 2)
            if end < 0:
                return None
            name = glob[j + 2:end]
            if name not in _POSIX_CLASSES:
                return None  # rsync then matches nothing
            members.append(_POSIX_CLASSES[name])
            j = end + 2
            continue
        if c == "\\" and j + 1 < len(glob):
            j += 1
            c = glob[j]
        low = c
        if glob[j + 1:j + 2] == "-" and j + 2 < len(glob) and glob[j + 2] != "]":
            j += 2
            high = glob[j]
            if high == "\\" and j + 1 < len(glob):
                j += 1
                high = glob[j]
            if low <= high:
                members.append(f"{re.escape(low)}-{re.escape(high)}")
        else:
            members.append(re.escape(low))
        j += 1
    else:
        return None
    body = "".join(members)
    if negate:
        return f"[^/\0{body}]", j  # never across a "/"
    return (f"(?![/\0])[{body}]" if body else _NEVER), j


# ------------------------------------- descriptor primitives: listing, comparing --
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
    with os.scandir(d) as listing:
        return _examine(d, listing)


def _examine(d, listed) -> tuple[dict, list]:
    """{name: Entry} and [(name, OSError)] for listed, os.DirEntry objects
    of directory d (see _scan)."""
    # This loop runs once per entry on both sides: it is kept lean on purpose
    # (tuple.__new__ skips the NamedTuple's Python-level constructor).
    entries, failed = {}, []
    make, kinds, ifmt = tuple.__new__, _KINDS, 0o170000
    for item in listed:
        name = item.name
        try:
            st = item.stat(follow_symlinks=False)
            kind = kinds.get(st.st_mode & ifmt, SPECIAL)
            if kind == LINK:
                path, fd = _at(d, name)
                entries[name] = make(Entry, (LINK, st, os.readlink(path, dir_fd=fd)))
            else:
                entries[name] = make(Entry, (kind, st, None))
        except FileNotFoundError:
            continue
        except OSError as err:
            failed.append((name, err))
    return entries, failed


def _listed_files(listed: list) -> dict:
    """{name: item} of the regular files among listed (os.DirEntry objects),
    as the listing's file types tell them (without a stat where they do)."""
    try:
        return {item.name: item for item in listed if item.is_file(follow_symlinks=False)}
    except OSError:  # a type the listing did not give, and a stat that failed
        files = {}
        for item in listed:
            try:
                if item.is_file(follow_symlinks=False):
                    files[item.name] = item
            except OSError:
                pass  # not a plain file to this test: examined as any other entry
        return files


def _xattr_path(d, name):
    """A path that reaches entry NAME of directory handle d for the *xattr
    calls, which take no dir_fd (used with follow_symlinks=False)."""
    return f"/proc/self/fd/{d}/{name}" if _DIR_FD else os.path.join(d, name)


_NO_XATTRS: dict = {}


def _read_xattrs(target, keep: "Keep", follow: bool = False) -> dict:
    """The extended attributes of target (a path, or a descriptor) that
    keep mirrors, as {key: value}.  A file system without them has none."""
    try:
        keys = os.listxattr(target, follow_symlinks=follow)
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            return _NO_XATTRS
        raise
    return _get_xattrs(target, keys, keep, follow) if keys else _NO_XATTRS


def _get_xattrs(target, keys: list, keep: "Keep", follow: bool = False) -> dict:
    found = {}
    for key in keys:
        if keep.wants(key):
            try:
                found[key] = os.getxattr(target, key, follow_symlinks=follow)
            except OSError as err:
                if err.errno != errno.ENODATA:  # removed since it was listed
                    raise
    return found


def _cwd_is_ours() -> bool:
    """Whether the working directory may be changed for a moment: no thread
    runs but this one and the copy threads (which use descriptors only)."""
    return threading.active_count() == 1 or all(
        t is threading.main_thread() or t.name.startswith("sync_") for t in threading.enumerate())


def _list_xattrs(d, entries: dict, keep: "Keep", failed: list, only=None) -> dict:
    """{name: xattrs} for the files and folders among entries (of folder d;
    only: those whose names are in it) that have any; an entry whose
    attributes cannot be read goes to failed.

    This runs for every entry on both sides, and the *xattr calls take no
    dir_fd: by name from inside the folder (fchdir there and back) they
    cost less than half of a path through /proc/self/fd, so that is how,
    where no other thread could be using the working directory."""
    found, home, prefix = {}, None, ""
    if _DIR_FD:
        if _cwd_is_ours():
            try:
                home = os.open(".", _O_PATH or os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
                os.fchdir(d)
            except OSError:
                if home is not None:
                    os.close(home)
                home = None
        if home is None:
            prefix = f"/proc/self/fd/{d}/"
    else:
        prefix = os.path.join(d, "")
    try:
        listxattr, file, folder = os.listxattr, FILE, DIR
        for name, entry in entries.items():
            if entry.kind is not file and entry.kind is not folder or only is not None and name not in only:
                continue
            path = prefix + name
            try:
                keys = listxattr(path, follow_symlinks=False)
                if keys:
                    xattrs = _get_xattrs(path, keys, keep)
                    if xattrs:
                        found[name] = xattrs
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno not in _UNSUPPORTED:  # a file system without them: none
                    failed.append((name, err))
    finally:
        if home is not None:
            os.fchdir(home)
            os.close(home)
    return found


def _same_signature(src: os.stat_result, dst: os.stat_result, window_ns: int = 0,
                    times: Optional["Times"] = None) -> bool:
    """Size equal and mtime equal (within window_ns, and as the replica's
    file system stores the source's time): the cheap test, as filecmp._sig
    does."""
    mtime = times.fit(src.st_mtime_ns) if times is not None else src.st_mtime_ns
    return src.st_size == dst.st_size and abs(mtime - dst.st_mtime_ns) <= window_ns


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


def _same_contents(sd, dd, name, dst_name=None, abort=None) -> bool:
    """Compare the bytes of NAME in sd with those of DST_NAME (or NAME) in dd.
    Raises _Aborted when abort() turns true."""
    fa = _open_source_file(sd, name)
    try:
        fb = _open_source_file(dd, dst_name or name)
        try:
            while True:
                if abort is not None and abort():
                    raise _Aborted()
                a = os.read(fa, COMPARE_CHUNK)
                b = os.read(fb, COMPARE_CHUNK)
                if a != b:
                    return False
                if not a:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


# Times with and without sub-second parts, odd and even seconds: enough to
# tell steps of 1 ns, 100 ns (NTFS), 1 us, 1 ms, 10 ms (exFAT), 1 s (ext4
# with 128-byte inodes) and 2 s (FAT) apart, and how they round.
_PROBE_TIMES = (1_600_000_001_999_999_999, 1_600_000_002_000_000_001,
                1_600_000_003_500_000_000, 1_600_000_004_123_456_789)
_PROBE_STEPS = (1, 100, 1_000, 1_000_000, 10_000_000, 1_000_000_000, 2_000_000_000)
_PROBE_FAR = (253_402_300_799 * 10**9, -5_364_662_400 * 10**9)  # 9999-12-31, 1800-01-01


def _probe_times(dd) -> Times:
    """Learn how the file system of directory dd stores modification times:
    set times on a temporary file there and read them back.  A file system
    that keeps every time as set (or a probe that cannot write) gives the
    exact Times()."""
    try:
        folder = os.stat(dd)
        path, fd, out = _create_temp(dd, _create_temp_file)
    except OSError:
        return Times()
    try:
        def stored(ns):
            if _DIR_FD:
                os.utime(out, ns=(ns, ns))
                return os.fstat(out).st_mtime_ns
            os.utime(path, ns=(ns, ns))
            return os.stat(path).st_mtime_ns

        seen = [(ns, stored(ns)) for ns in _PROBE_TIMES]
        found = next((Times(step, rounding) for step in _PROBE_STEPS
                      for rounding in ("down", "nearest", "up")
                      if all(Times(step, rounding).fit(ns) == got for ns, got in seen)), Times())
        limits = {}
        for far, limit in zip(_PROBE_FAR, ("highest", "lowest")):
            try:
                got = stored(far)
            except (OSError, OverflowError, ValueError):
                continue  # refused outright: such a time fails its copy, reported as an error
            if got != found.fit(far):
                limits[limit] = got
        return found._replace(**limits)
    except OSError:
        return Times()
    finally:
        os.close(out)
        _discard_temp(path, fd)
        try:  # the probe leaves no trace, not even in the folder's mtime
            os.utime(dd, ns=(folder.st_atime_ns, folder.st_mtime_ns))
        except OSError:
            pass  # the walk sets it anyway when the pass goes on


def _probe_latency(dd, clock=time.perf_counter) -> float:
    """Seconds to look up a name that folder dd does not hold (the fastest
    of three tries, each a new name, so that no cache can answer), where
    that is at least SLOW_REQUEST; else 0.0.  Nothing is written."""
    fastest = float("inf")
    for _ in range(3):
        path, fd = _at(dd, _temp_name())
        started = clock()
        try:
            os.stat(path, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        fastest = min(fastest, clock() - started)
    return fastest if fastest >= SLOW_REQUEST else 0.0


def _probe_source_latency(sd, clock=time.perf_counter) -> float:
    """Seconds to open and close folder sd (the fastest of three tries),
    where that is at least SLOW_OPEN; else 0.0.  Only reads: SOURCE is
    never written."""
    fastest = float("inf")
    for _ in range(3):
        started = clock()
        _close_dir(_open_dir(sd, "."))
        fastest = min(fastest, clock() - started)
    return fastest if fastest >= SLOW_OPEN else 0.0


def _probe_replica(dd, kind: str = "") -> Stores:
    """Learn what the file system of directory dd (of type kind) stores:
    names (see _probe_names), symbolic links, times (see _probe_times),
    permission bits, owners, extended attributes, ACLs and hard links, and
    (unless kind is in LOCAL_KINDS) how slow a request is (_probe_latency),
    tried in a temporary folder made there and removed (dd keeps its
    times).  What the probe cannot try counts as stored: a real failure
    is then reported where it happens."""
    try:
        folder = os.stat(dd)
        path, fd, _ = _create_temp(dd, lambda path, dir_fd: os.mkdir(path, 0o700, dir_fd=dir_fd))
    except OSError:
        return Stores(kind)
    found = {"kind": kind}
    pd = None
    try:
        if kind not in LOCAL_KINDS:
            found["latency"] = _probe_latency(dd)
        pd = _open_dir(dd, os.path.basename(path))
        if not found.get("latency"):
            found["names"] = _probe_names(pd)
            found["links"] = _probe_symlinks(pd)
            found["times"] = _probe_times(pd)
            _probe_metadata(pd, found)
        else:  # each request waits on a server
            _probe_at_once(pd, found)
    except OSError:
        pass  # what was found so far stands; the rest counts as stored
    finally:
        if pd is not None:
            _empty_probe_folder(pd)
            _close_dir(pd)
        try:
            os.rmdir(path, dir_fd=fd)
            os.utime(dd, ns=(folder.st_atime_ns, folder.st_mtime_ns))
        except OSError:
            pass  # a leftover probe folder is removed by the next pass
    return Stores(**found)


def _probe_at_once(pd, found: dict) -> None:
    """_probe_replica's probes where each request waits on a server, all
    at once, those that make several files each in a folder of its own: a
    folder's entries are made and removed one at a time (the kernel locks
    the folder for each, round trips included), so probes sharing one
    folder would wait in line."""
    import concurrent.futures  # here: only a slow REPLICA's probe needs it
    with concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="sync_probe") as pool:
        parts = {"names": pool.submit(_in_a_folder, pd, _probe_names, True),
                 "links": pool.submit(_probe_symlinks, pd), "times": pool.submit(_in_a_folder, pd, _probe_times)}
        try:
            _probe_metadata(pd, found)
        finally:
            for key, part in parts.items():
                try:
                    found[key] = part.result()
                except OSError:
                    pass  # counts as stored, as in _probe_replica


def _in_a_folder(pd, probe, *args):
    """probe(folder, *args) in a new temporary folder made in pd, removed after."""
    path, fd, _ = _create_temp(pd, lambda path, dir_fd: os.mkdir(path, 0o700, dir_fd=dir_fd))
    try:
        d = _open_dir(pd, os.path.basename(path))
        try:
            return probe(d, *args)
        finally:
            _empty_probe_folder(d)
            _close_dir(d)
    finally:
        os.rmdir(path, dir_fd=fd)


def _probe_metadata(pd, found: dict) -> None:
    """Learn, with a file made in the empty folder pd, whether its file
    system stores permission bits, owners, extended attributes (and in which
    namespaces), ACLs and hard links; each goes into found once known.
    Removes what it made (on a NAS, beside the other probes)."""
    probe, probe_fd, out = _create_temp(pd, _create_temp_file)
    second, second_fd = _at(pd, "second")
    try:
        target = out if _DIR_FD else probe
        found["modes"] = _stores_modes(target)
        found["owners"] = _stores_owners(target)
        if _XATTRS:
            # Set, then read back: some file systems (ntfs-3g by default)
            # accept attributes and ACLs without storing them.
            found["namespaces"] = frozenset(
                space for space in _ALL_NAMESPACES if (space == "user" or _is_root(_CAP_SYS_ADMIN))
                and _stores(target, f"{space}.syncpy-probe", b"1"))
            found["xattrs"] = "user" in found["namespaces"]
            found["acls"] = _stores(target, _ACL_KEYS[0], _PROBE_ACL)
        if _HARD_LINKS:
            try:
                os.link(probe, second, src_dir_fd=probe_fd, dst_dir_fd=second_fd, follow_symlinks=False)
            except OSError as err:
                found["hard_links"] = err.errno not in (errno.EPERM, errno.EMLINK, *_UNSUPPORTED)
            else:
                _discard_temp(second, second_fd)
    finally:
        os.close(out)
        _discard_temp(probe, probe_fd)


def _empty_probe_folder(pd) -> None:
    """Remove what the probes left in their folder."""
    try:
        for entry in os.scandir(pd):
            path, fd = _at(pd, entry.name)
            try:
                os.unlink(path, dir_fd=fd)
            except OSError:
                pass  # then rmdir fails and the next pass removes the folder
    except OSError:
        pass


def _probe_symlinks(pd) -> bool:
    """Whether symbolic links can be made (FAT and exFAT cannot)."""
    path, fd = _at(pd, "link")
    try:
        os.symlink("target", path, dir_fd=fd)
    except OSError as err:
        return err.errno not in (errno.EPERM, *_UNSUPPORTED)
    _discard_temp(path, fd)
    return True


# Every ASCII character a POSIX name may hold but letters and digits: those
# some file systems refuse (FAT, exFAT and Windows: " * / : < > ? \ | and
# control characters).
_PROBE_CHARS = "".join(chr(c) for c in range(1, 128) if not chr(c).isalnum() and chr(c) != "/")


def _probe_names(pd, apart: bool = False) -> Names:
    """Learn how the file system of the empty folder pd treats names: make
    files under names that tell case-insensitive, refusing and trimming
    file systems apart, and see what it keeps.  apart (on a NAS, where
    each file made costs round trips to the server): four names at once
    first (see _fold_where_names_are_kept), and where that does not tell,
    each name in a folder of its own, all at once."""
    def kept(d, name: str) -> Optional[str]:
        """The name the file system lists for a file created as name (None: refused)."""
        try:
            _make_empty_file(d, name)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT) \
                    or os.stat(d).st_nlink == 0:  # (removed under the probe: raises where by path)
                raise  # not about the name: the probe cannot tell
            return None
        listed = os.listdir(d)
        for other in listed:
            other_path, other_fd = _at(d, other)
            os.unlink(other_path, dir_fd=other_fd)
        return listed[0] if len(listed) == 1 else name

    def same(d, name: str, other: str) -> bool:
        """Whether a file created as name is found as other."""
        _make_empty_file(d, name)
        path, fd = _at(d, name)
        try:
            return _found(d, other)
        finally:
            os.unlink(path, dir_fd=fd)

    def each(function, arguments: list) -> list:
        """function(folder, *args) for each args, in pd one after another,
        or (apart) each in a new folder of its own, at once."""
        if not apart:
            return [function(pd, *args) for args in arguments]
        import concurrent.futures  # here: only a slow REPLICA's probe needs it
        with concurrent.futures.ThreadPoolExecutor(len(arguments), thread_name_prefix="sync_probe") as pool:
            return list(pool.map(lambda args: _in_a_folder(pd, function, *args), arguments))

    inner = "".join(c for c in _PROBE_CHARS if c not in ". ")
    if apart:
        fold = _fold_where_names_are_kept(pd, f"a{inner}\udcffb.")
        if fold is not None:
            return Names(fold)
    (folds_unicode, folds_ascii, together, dot, space, con, nul, not_utf8) = each(
        lambda d, test, *args: test(d, *args),
        [(same, "probe-\u00e9", "PROBE-\u00c9"), (same, "probe-a", "PROBE-A"),
         # One name with all the characters first: each file made costs a round trip on a NAS.
         (kept, f"a{inner}b"), (kept, "a."), (kept, "a "), (kept, "CON"), (kept, "nul.txt"), (kept, "a\udcffb")])
    fold = "unicode" if folds_unicode else "ascii" if folds_ascii else ""
    refuses = ""
    if together is None:
        refuses = "".join(c for c, got in zip(inner, each(kept, [(f"a{c}b",) for c in inner])) if got is None)
    strips = "".join(c for c, got in ((".", dot), (" ", space)) if got == "a")
    refused_end = "".join(c for c, got in ((".", dot), (" ", space)) if got is None)
    return Names(fold, strips, refuses, refused_end, con is None or nul is None, not_utf8 is None)


def _fold_where_names_are_kept(d, unusual: str) -> Optional[str]:
    """How the file system of the empty folder d folds case ("", "ascii" or
    "unicode"), where it keeps every name _probe_names tries as it is (most
    network shares do), told with four files made in d (the name probe
    makes eight, then more); None where it refuses or changes one of them.
    unusual holds every character tried, a byte that is not UTF-8, and
    ends with a dot; the fold is told by a name ending with a space."""
    folding = "probe-\u00e9-a "
    names = (unusual, folding, "CON", "nul.txt")
    for name in names:
        try:
            _make_empty_file(d, name)
        except OSError:
            return None  # refused: _probe_names tells which and why
    if set(os.listdir(d)) != set(names):
        return None  # some name was stored as another
    if _found(d, folding.upper()):
        return "unicode"
    return "ascii" if _found(d, "PROBE-\u00e9-A ") else ""


def _make_empty_file(d, name: str) -> None:
    """Create the empty file NAME in folder d (FileExistsError if it is there)."""
    path, fd = _at(d, name)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=fd))


def _found(d, name: str) -> bool:
    """Whether folder d holds an entry that name reaches (its file system may fold case)."""
    path, fd = _at(d, name)
    return os.path.lexists(path) if fd is None else _exists_at(fd, name)


def _exists_at(dir_fd, name) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# A POSIX ACL as Linux stores it: version 2, then (tag, permissions, id)
# for the owner (rw), user 1 (r), the group (none), the mask (r), others
# (none).  Not one that only restates the mode: that is kept as the mode.
_PROBE_ACL = struct.pack("<I" + "HHI" * 5, 2, 0x01, 6, 0xFFFFFFFF, 0x02, 4, 1, 0x04, 0, 0xFFFFFFFF,
                         0x10, 4, 0xFFFFFFFF, 0x20, 0, 0xFFFFFFFF)


def _stores(target, key: str, value: bytes) -> bool:
    """Whether the file system of target stores the extended attribute key:
    set it, then read it back and find it listed (ntfs-3g reads back what
    it does not list: it would look missing on every pass)."""
    try:
        os.setxattr(target, key, value)
        return os.getxattr(target, key) == value and key in os.listxattr(target)
    except OSError as err:
        if err.errno in (*_UNSUPPORTED, errno.EPERM, errno.ENODATA):
            return False
        return True  # some other trouble: a real failure is reported where it happens


def _stores_modes(target) -> bool:
    """Whether permission bits are kept as set (two unlike modes read back)."""
    try:
        for mode in (0o640, 0o604):
            os.chmod(target, mode)
            if stat.S_IMODE(os.stat(target).st_mode) != mode:
                return False
    except OSError as err:
        return err.errno not in (errno.EPERM, *_UNSUPPORTED)
    return True


def _stores_owners(target) -> bool:
    """Whether a file's owner and group can be given and are kept: as root,
    tried with another owner; otherwise, with another group of ours."""
    if not _OWNERS:
        return False
    st = os.stat(target)
    if _is_root():
        uid, gid = (st.st_uid + 1) % 65534, (st.st_gid + 1) % 65534
    else:
        others = [g for g in os.getgroups() if g != st.st_gid]
        if not others:
            return True  # nothing to tell it by: trust it
        uid, gid = -1, others[0]
    try:
        os.chown(target, uid, gid)
    except OSError as err:
        if err.errno in (errno.EPERM, errno.EINVAL, *_UNSUPPORTED):
            return False
        return True
    now = os.stat(target)
    return now.st_gid == gid and (uid == -1 or now.st_uid == uid)


def _utc_ns(ns: int) -> str:
    """A time to the nanosecond, for -v: 2026-11-26 10:51:18.228301556 UTC"""
    return _utc(ns).replace(" UTC", f".{ns % 1_000_000_000:09d} UTC", 1)


def _utc(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns after 1970"


# ------------------------------------------------ descriptor primitives: writing --


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


def _copy_bytes(fin: int, fout: int, size_hint: int, abort=None) -> int:
    """Copy from fin's position until size_hint bytes are copied or EOF;
    return the number of bytes copied.  (A file that grew meanwhile is
    caught by _copy_file, which compares fstat before and after.)

    Tries the kernel's fast paths first (copy_file_range can clone blocks on
    btrfs/XFS/NFS 4.2; sendfile avoids user-space buffers) and falls back to a
    buffered copy when a fast path is refused before it copied anything.
    abort() is asked before every chunk: when true, _Aborted is raised, so
    that no copy outlives a request to stop at once by more than one chunk.
    """
    total = 0
    for fast in (getattr(os, "copy_file_range", None), getattr(os, "sendfile", None)):
        if fast is None or sys.platform == "win32":
            continue
        try:
            while True:
                if abort is not None and abort():
                    raise _Aborted()
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
        if abort is not None and abort():
            raise _Aborted()
        chunk = os.read(fin, COPY_CHUNK)
        if not chunk:
            return total
        view = memoryview(chunk)
        while view:
            written = os.write(fout, view)
            view = view[written:]
        total += len(chunk)


def _is_sparse(st: os.stat_result) -> bool:
    """The file holds fewer blocks than its size needs: it has holes (or is
    compressed, which costs the hole search a few calls)."""
    blocks = getattr(st, "st_blocks", None)
    return blocks is not None and st.st_size > COPY_CHUNK and blocks * 512 < st.st_size


def _copy_range(fin: int, fout: int, start: int, end: int, abort=None) -> None:
    """Copy bytes [start, end) of fin to the same place in fout."""
    fast = getattr(os, "copy_file_range", None)
    while start < end:
        if abort is not None and abort():
            raise _Aborted()
        count = min(end - start, COPY_CHUNK * 8)
        n = 0
        if fast is not None:
            try:
                n = fast(fin, fout, count, start, start)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EINVAL, errno.EBADF, errno.EPERM, *_UNSUPPORTED):
                    raise
                fast = None
        if not n:  # refused, or a file system that answers 0: the plain way
            chunk = os.pread(fin, min(count, COPY_CHUNK), start)
            if not chunk:
                return  # shrunk meanwhile: the caller's fstat tells
            n = os.pwrite(fout, chunk, start)
        start += n


def _copy_sparse(fin: int, fout: int, size: int, abort=None) -> int:
    """Copy a sparse file's data and leave its holes unwritten, so that the
    copy takes no more space than the source; return its size.  Data is
    found with SEEK_DATA/SEEK_HOLE where the platform and file system have
    them; elsewhere, blocks of zeros are skipped."""
    if hasattr(os, "SEEK_DATA"):
        try:
            start = os.lseek(fin, 0, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data at all: one hole
                os.ftruncate(fout, size)
                return size
            if err.errno not in (errno.EINVAL, *_UNSUPPORTED):
                raise
        else:
            while start < size:
                end = min(os.lseek(fin, start, os.SEEK_HOLE), size)
                _copy_range(fin, fout, start, end, abort)
                try:
                    start = os.lseek(fin, end, os.SEEK_DATA)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        raise
                    break
            os.ftruncate(fout, size)
            return size
    os.lseek(fin, 0, os.SEEK_SET)
    zeros, position = bytes(COPY_CHUNK), 0
    while True:
        if abort is not None and abort():
            raise _Aborted()
        chunk = os.read(fin, COPY_CHUNK)
        if not chunk:
            break
        if chunk == zeros[:len(chunk)]:
            os.lseek(fout, len(chunk), os.SEEK_CUR)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fout, view):]
        position += len(chunk)
    os.ftruncate(fout, position)
    return position


def _mirrored_mode(src: os.stat_result, uid: int, gid: int) -> int:
    """The permission bits a replica entry owned by uid:gid gets: the
    source's, except that setuid (setgid) is dropped where that owner
    (group) is not the source's, as cp does: a user's setuid program must
    not become a root-owned one."""
    mode = stat.S_IMODE(src.st_mode)
    if mode & stat.S_ISUID and src.st_uid != uid:
        mode &= ~stat.S_ISUID
    if mode & stat.S_ISGID and src.st_gid != gid:
        mode &= ~stat.S_ISGID
    return mode


_SET_ID = stat.S_ISUID | stat.S_ISGID


def _set_file_stat(fout: int, path, dir_fd, st: os.stat_result, attrs: Optional["_Attrs"],
                   keep: Optional["Keep"]) -> None:
    """Give a freshly written file the source's owner and extended
    attributes (as attrs says), permission bits and times."""
    mode = stat.S_IMODE(st.st_mode)
    times = (st.st_atime_ns, st.st_mtime_ns)
    if attrs is not None:
        _give_attrs(fout if _DIR_FD else path, attrs, keep)
    modes = keep is None or keep.modes  # (not on a file system that does not store them)
    if not modes and keep.umask is not None:  # not mirrored, but stored: as a new file gets them
        mode, modes = keep.new_mode(st), True
    if _DIR_FD:
        if mode & _SET_ID:
            now = os.fstat(fout)
            mode = _mirrored_mode(st, now.st_uid, now.st_gid)
        if modes:
            os.chmod(fout, mode)
        os.utime(fout, ns=times)
    else:  # by path (Windows, and SYNCPY_NO_DIR_FD), after the data is flushed
        if mode & _SET_ID:
            now = os.stat(path)
            mode = _mirrored_mode(st, now.st_uid, now.st_gid)
        os.utime(path, ns=times)
        if modes:
            os.chmod(path, mode)


def _set_xattrs(target, want: dict, have: dict, follow: bool = True) -> None:
    """Make target's mirrored extended attributes exactly want (have: what
    it has now, as _read_xattrs read it)."""
    for key in have:
        if key not in want:
            try:
                os.removexattr(target, key, follow_symlinks=follow)
            except OSError as err:
                if err.errno != errno.ENODATA:
                    raise
    for key, value in want.items():
        if have.get(key) != value:
            os.setxattr(target, key, value, follow_symlinks=follow)


def _give_attrs(target, attrs: "_Attrs", keep: "Keep", follow: bool = True, dir_fd=None) -> None:
    """Give a replica entry (a path, or a descriptor) the owner, extended
    attributes and permission bits attrs holds, in that order: a chown
    clears setuid bits and file capabilities (security.capability), and an
    ACL sets the group bits."""
    if attrs.uid != -1 or attrs.gid != -1:
        os.chown(target, attrs.uid, attrs.gid, dir_fd=dir_fd, follow_symlinks=follow)
    if attrs.xattrs is not None:
        have = attrs.have_x if attrs.have_x is not None else _read_xattrs(target, keep, follow)
        _set_xattrs(target, attrs.xattrs, have, follow)
    if attrs.mode is not None:  # never for a link (Linux has no lchmod)
        os.chmod(target, attrs.mode)


def _copy_file(sd, dd, name, abort=None, attrs=None, keep=None, before_replace=None,
               durable: bool = False) -> tuple[int, bool]:
    """Copy NAME from directory sd to directory dd atomically, holes of a
    sparse file left as holes; attrs (and keep): the owner and extended
    attributes it gets besides permission bits and times; before_replace:
    called once the copy is complete, just before it takes the name;
    durable: its data and attributes are flushed to the disk before that.

    Returns (bytes copied, stable) where stable is False when the source's size
    or mtime changed during the copy.  The replica then carries the pre-copy
    mtime, so the next pass copies it again.  Raises _Aborted (the temporary
    file removed) when abort() turns true.
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
                if _is_sparse(before):
                    copied = _copy_sparse(fin, fout, before.st_size, abort)
                else:
                    copied = _copy_bytes(fin, fout, before.st_size, abort)
                if _DIR_FD:
                    _set_file_stat(fout, tmp_path, tmp_fd, before, attrs, keep)
                if durable:
                    os.fsync(fout)
            finally:
                os.close(fout)
            if not _DIR_FD:  # by path, once the data is written and the file closed
                _set_file_stat(fout, tmp_path, tmp_fd, before, attrs, keep)
            after = os.fstat(fin)
            final_path, final_fd = _at(dd, name)
            if before_replace is not None:
                before_replace()
            _put_in_place(tmp_path, final_path, tmp_fd, final_fd)
        except BaseException:
            _discard_temp(tmp_path, tmp_fd)
            raise
    finally:
        os.close(fin)
    return copied, _same_signature(before, after)


# What a file system answers to a name it will not store (exFAT's ENOENT
# for ":" is found by the probe instead: it also means a folder gone).
_NAME_ERRORS = (errno.EINVAL, errno.EILSEQ, errno.ENAMETOOLONG)


def _about_name(err: OSError) -> OSError:
    """err, or where it is a refused name, an error that says so."""
    if err.errno in _NAME_ERRORS:
        return OSError(err.errno, "the replica's file system does not accept this name")
    return err


def _put_in_place(path, final_path, dir_fd, final_fd) -> None:
    """os.replace a finished temporary file (or link) over its final name."""
    try:
        os.replace(path, final_path, src_dir_fd=dir_fd, dst_dir_fd=final_fd)
    except OSError as err:
        raise _about_name(err) from None


def _discard_temp(path, dir_fd) -> None:
    """Remove a temporary file after a failure."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass  # already gone, or its folder is unusable: the next pass removes it


def _make_link(dd, name, target: str, attrs: Optional["_Attrs"] = None,
               st: Optional[os.stat_result] = None) -> None:
    """Create or replace the link NAME -> target, atomically; with the
    owner attrs gives and the time of st."""
    tmp_path, fd, _ = _create_temp(dd, lambda path, dir_fd: os.symlink(target, path, dir_fd=dir_fd))
    try:
        if st is not None:
            _set_link_attrs(dd, os.path.basename(tmp_path), attrs or _NO_ATTRS, st)
        final_path, _ = _at(dd, name)
        _put_in_place(tmp_path, final_path, fd, fd)
    except BaseException:
        _discard_temp(tmp_path, fd)
        raise


def _set_file_attrs(dd, name, attrs: "_Attrs", keep: "Keep", expected: os.stat_result) -> None:
    """Give a replica file its owner, extended attributes and permission
    bits in place, never via a link, and only while it is the file listed.

    On Linux the file is opened with O_PATH, which needs no permission on
    the file itself, so a replica file of mode 000 can be given its new mode
    by its owner; the changes go through /proc/self/fd to that very inode.
    """
    path, fd = _at(dd, name)
    if not _DIR_FD:  # by path: a link swapped in between is the stated window
        if not os.path.samestat(os.lstat(path), expected):
            raise OSError(errno.ESTALE, "replaced while being updated")
        _give_attrs(path, attrs, keep)
        return
    access = _O_PATH or os.O_RDONLY | _O_NONBLOCK
    handle = os.open(path, access | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=fd)
    try:
        st = os.fstat(handle)
        if not (stat.S_ISREG(st.st_mode) and os.path.samestat(st, expected)):
            raise OSError(errno.ESTALE, "replaced while being updated")
        _give_attrs(f"/proc/self/fd/{handle}" if _O_PATH else handle, attrs, keep)
    finally:
        os.close(handle)


def _set_link_attrs(dd, name, attrs: "_Attrs", st: os.stat_result,
                    expected: Optional[os.stat_result] = None) -> None:
    """Give a replica link its owner and group (attrs) and the time of st,
    without following it; expected: the link as listed, which it must
    still be (a hard link to a file outside the mirror swapped in under its
    name is not changed: the window is that of a check just before)."""
    path, fd = _at(dd, name)
    if expected is not None:
        now = os.stat(path, dir_fd=fd, follow_symlinks=False)
        if not (stat.S_ISLNK(now.st_mode) and os.path.samestat(now, expected)):
            raise OSError(errno.ESTALE, "replaced while being updated")
    if attrs.uid != -1 or attrs.gid != -1:
        os.chown(path, attrs.uid, attrs.gid, dir_fd=fd, follow_symlinks=False)
    if _LINK_TIMES:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=fd, follow_symlinks=False)


def _make_writable(d, mode: int) -> int:
    """Let us add and remove entries in directory d; return its new mode."""
    wanted = mode | stat.S_IRWXU
    if wanted != mode:
        os.chmod(d, wanted)
    return wanted


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        code = errno.errorcode.get(err.errno)
        return f"{err.strerror} ({code})" if code else err.strerror
    return str(err) or type(err).__name__


def _dup(handle):
    """A second handle on the same directory, to be closed on its own."""
    return os.dup(handle) if _DIR_FD else handle


def _descend(d, name: str, identity: tuple):
    """The handle of folder name inside d (which is closed), if it is still
    the folder of that identity (st_dev, st_ino); else OSError."""
    try:
        inner = _open_dir(d, name)
    finally:
        _close_dir(d)
    if _identity(os.stat(inner)) != identity:
        _close_dir(inner)
        raise OSError(errno.ESTALE, "it was replaced by another folder during the pass")
    return inner


def _count_inside(d, cap: int) -> int:
    """How many entries lie below directory handle d, counted by name only
    (no stat; links are not followed) and at most cap.  What cannot be
    listed counts as empty: the count is for a guard, never for a decision
    to delete."""
    total = 0
    stack = [(d, False, None)]  # (handle, opened here, names of subfolders left to visit)
    try:
        while stack and total < cap:
            handle, owned, pending = stack[-1]
            if pending is None:
                pending = []
                try:
                    with os.scandir(handle) as listing:
                        for item in listing:
                            total += 1
                            if item.is_dir(follow_symlinks=False):
                                pending.append(item.name)
                except OSError:
                    pass
                stack[-1] = (handle, owned, pending)
            if pending:
                try:
                    stack.append((_open_dir(handle, pending.pop()), True, None))
                except OSError:
                    pass
                continue
            stack.pop()
            if owned:
                _close_dir(handle)
    finally:
        for handle, owned, _ in stack:
            if owned:
                _close_dir(handle)
    return min(total, cap)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _rename_read_only_dir(dd, name, folder) -> None:
    """Move a read-only directory NAME of dd into folder.  Moving a directory
    to another parent rewrites its ".." entry, which needs write permission
    on the directory itself even for its owner: it gets u+w for the move and
    its own mode back afterwards (as Go's module cache and other 0555 trees
    need)."""
    handle = _open_dir(dd, name)
    try:
        mode = stat.S_IMODE(os.stat(handle).st_mode)
        os.chmod(handle, mode | stat.S_IWUSR)
        try:
            path, fd = _at(dd, name)
            target, tfd = _at(folder, name)
            os.rename(path, target, src_dir_fd=fd, dst_dir_fd=tfd)
        finally:
            os.chmod(handle, mode)  # wherever it now is: the handle follows it
    finally:
        _close_dir(handle)


def _has_room(dd, st: os.stat_result) -> bool:
    """Whether the file system of directory dd has room for a file like st,
    as far as statvfs tells (where it cannot tell: yes)."""
    try:
        room = os.statvfs(dd)
    except (OSError, AttributeError):
        return True
    root = hasattr(os, "geteuid") and os.geteuid() == 0  # may use the reserved blocks
    free = room.f_frsize * (room.f_bfree if root else room.f_bavail)
    allocated = getattr(st, "st_blocks", 0) * 512 or st.st_size  # a sparse file needs less
    return free >= min(st.st_size, allocated)


def _holds_newer(d, name, limit: float) -> bool:
    """Whether anything but a folder below d/NAME has an mtime from limit on."""
    stack = [_open_dir(d, name)]
    try:
        while stack:
            handle = stack.pop()
            try:
                entries = _scan(handle)[0]
                for child, entry in entries.items():
                    if entry.kind == DIR:
                        stack.append(_open_dir(handle, child))
                    elif entry.st is not None and entry.st.st_mtime >= limit:
                        return True
            finally:
                _close_dir(handle)
    finally:
        for handle in stack:
            _close_dir(handle)
    return False


def _is_temp(name: str, entry: Entry) -> bool:
    """A temporary file, or a probe's temporary folder (see _probe_replica)."""
    return entry.kind in (FILE, DIR) and bool(_TEMP_NAME.match(name))


def _real(entries: dict) -> bool:
    """Whether a listing holds anything but temporary files."""
    return any(not _is_temp(name, entry) for name, entry in entries.items())


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


# -------------------------------------------------------------- the planner --
#
# What one folder pair needs is decided from its two listings alone, with
# no I/O: _sort_out() says what is wanted, what must go and what looks
# renamed; once the walk has moved and removed, _steps() says what each
# wanted entry needs.  The walk carries the plans out.


# A regular file listed on both sides, examined later by its folder's
# slice, as _sort_out sees it where excludes must judge it (see
# _Listing.unexamined).
_UNEXAMINED = Entry(FILE, None)


class _Listing(NamedTuple):
    """Both sides of one directory pair, as _list_pair found them."""

    rel: str  # the pair's path below the roots

    src: Optional[dict] = None
    unreadable: Optional[list] = None
    dst: Optional[dict] = None  # the walk updates it as it renames and removes
    dst_unreadable: Optional[list] = None
    failure: Optional[tuple] = None  # (what could not be done, OSError)
    src_x: dict = _NO_XATTRS  # name -> extended attributes, for source entries that have any
    dst_x: dict = _NO_XATTRS  # the same for the replica entries of those names
    # Names of regular files listed on both sides (or fresh, below), not
    # examined yet and not in src or dst: left to the folder's slices (see
    # BIG_FOLDER).  Never temporary names (those are examined here, to be
    # skipped and removed).
    unexamined: set = frozenset()
    # Among them, those of regular files only the source lists: left to the
    # slices too where the replica lists no name the source lacks (so no
    # replica entry could be a new file's old name, see _match_moves).
    fresh: set = frozenset()


class _Plan(NamedTuple):
    """What _sort_out decided for one folder pair."""

    checked: int  # source entries examined (excludes left out)
    refusal: str  # why nothing here may change ("" : it may); only ever for the root
    failed: list  # (name, what could not be done, OSError): reported; their replica entries stay
    skipped: list  # (name, kind of special file): reported, never mirrored
    wanted: dict  # name -> source Entry the replica must hold
    dst: dict  # name -> replica Entry (excludes left out); the walk updates it as it goes
    keep: set  # replica names that must not be touched this pass
    unwanted: list  # replica names the source no longer has (or has as another kind), sorted
    moves: list  # (old, new): replica entries the source seems to have renamed (see _match_moves)
    doomed: list  # unwanted names that would really be deleted (not moved, not temporary): for the guards
    empty: bool  # the source folder holds nothing real (only temporary files, or nothing)
    # Names REPLICA's file system cannot hold as they are (see _fit_names):
    refused: list = []  # (name, why): never written
    clashes: list = []  # sorted groups of names it would store as one entry: none is written
    recased: list = []  # (old, new): replica entries whose name differs from the source's in case only
    unlinked: list = []  # symbolic links not mirrored (Options.links, or REPLICA cannot store them)
    later: list = []  # files not examined (_Listing.unexamined, fresh ones included) the slices mirror


def _sort_out(listing: _Listing, options: Options, is_root: bool, replica_exists: bool,
              stores: Stores = Stores()) -> _Plan:
    """Decide what one folder pair needs from its listings (see _Plan);
    stores: what REPLICA's file system stores (names, links, times)."""
    names = stores.names
    src, dst = listing.src, listing.dst
    patterns = options.excludes
    # Files left to the slices are wanted as they are, unless excludes say
    # otherwise: then they are judged here as any entry, as regular files
    # not examined yet (and those still wanted go to the slices after all).
    later = listing.unexamined
    if later and patterns:
        src = {**src, **dict.fromkeys(later, _UNEXAMINED)}
        dst = {**dst, **dict.fromkeys(later - listing.fresh, _UNEXAMINED)}
        later = ()
    all_dst = dst
    if patterns:
        rel = listing.rel
        # Each side's entry is judged as what it is (a rule for folders
        # spares no file of that name), as rsync does: an excluded replica
        # entry is left alone unless the source has that name to put there.
        excluded = patterns.excluded(rel, src)
        if excluded:
            src = {n: e for n, e in src.items() if n not in excluded}
        if not options.delete_excluded:
            spared = patterns.excluded(rel, {n: e for n, e in dst.items() if n not in src})
            if spared:
                dst = {n: e for n, e in dst.items() if n not in spared}
    checked = len(src) + len(later)
    empty = not later and not _real(src)
    if is_root and not options.allow_empty_source and empty and _real(dst):
        return _Plan(checked, "SOURCE is empty but REPLICA is not: refusing to delete everything in "
                               "REPLICA (an unmounted drive looks like this); nothing was changed.",
                     [], [], {}, dst, set(), [], [], [], empty)
    failed = [(name, "read", err) for name, err in listing.unreadable]
    failed += [(name, "examine replica entry", err) for name, err in listing.dst_unreadable]
    keep = {name for name, _, _ in failed}  # names whose replica entry must not be touched
    wanted, skipped, unlinked = {}, [], []
    for name, entry in src.items():
        if _TEMP_NAME.match(name):
            continue  # another sync.py's half-written file, not user data
        if entry.kind == SPECIAL:
            skipped.append((name, _special_kind(entry.st.st_mode)))
            continue
        if entry.kind == LINK and not (options.links and stores.links):
            unlinked.append(name)
            if not (options.delete_excluded and not options.links):
                keep.add(name)  # a replica entry of its name stays, as an excluded one does
            continue
        wanted[name] = entry
    refused, clashes, recased = [], [], []
    if names != _POSIX_NAMES and wanted:
        wanted, refused, clashes, recased, untouchable = _fit_names(wanted, dst, all_dst, names)
        keep |= untouchable
    recasing = {old: new for old, new in recased}
    unwanted = sorted(n for n, have in dst.items() if n not in keep and n not in recasing
                      and ((want := wanted.get(n)) is None or want.kind != have.kind))
    moves = []
    if unwanted and replica_exists:
        gone = {n: dst[n] for n in unwanted if n not in wanted and not _is_temp(n, dst[n])}
        # (A file with other names goes to the hard-link phase, which
        # compares it against its own name only.)
        recasing_to = set(recasing.values())
        # (Nor a file left to the slices, not examined: the replica then
        # lists no name the source lacks, so a gone entry is one the
        # source's of its name replaces, excluded or not mirrored, and new
        # files are copied rather than matched to it.)
        new = {n: e for n, e in wanted.items() if n not in dst and n not in keep and n not in recasing_to
               and e is not _UNEXAMINED and not (options.hard_links and e.kind == FILE and e.st.st_nlink > 1)}
        moves = _match_moves(gone, new, stores)
    # An empty SOURCE allowed to be empty may empty REPLICA: that is what it asks for.
    doomed = []
    if unwanted and not (is_root and options.allow_empty_source and empty):
        moving = {old for old, _ in moves}
        doomed = [n for n in unwanted if n not in moving and not _is_temp(n, dst[n])]
    if listing.unexamined and not later:  # judged above: those still wanted go to the slices
        later = [n for n in listing.unexamined if n in wanted and n not in keep]
        wanted = {n: e for n, e in wanted.items() if e is not _UNEXAMINED}
    return _Plan(checked, "", failed, skipped, wanted, dict(dst), keep, unwanted, moves, doomed, empty,
                 refused, clashes, recased, unlinked, list(later))


_POSIX_NAMES = Names()


def _fit_names(wanted: dict, dst: dict, all_dst: dict, names: Names) -> tuple:
    """Fit the source names of one folder to a replica file system that
    refuses, trims or folds some (names), before anything is written:

    * a name it would refuse or store as another name is refused;
    * names it would store as one entry (README and readme where case does
      not count) clash: none of them is written, and the replica entry
      they share is left as it is (an overwrite would lose one silently);
    * a replica entry that differs from its source name in case only is
      renamed (recased), not deleted and copied again.

    dst: the replica entries the pass may change; all_dst: with those
    excludes protect.  Returns (wanted, refused, clashes, recased, replica
    names to leave alone)."""
    key, problem = names.key, names.problem
    dst_keys = {key(name): name for name in all_dst}  # one per key on such a file system
    refused, by_key, keys = [], {}, {}
    for name in wanted:
        why = problem(name)
        if not why:
            keys[name] = k = key(name)
            if name not in dst and (other := dst_keys.get(k)) is not None and other not in dst:
                why = f"it would be stored over the excluded replica entry {other!r}"
        if why:
            refused.append((name, why))
        else:
            by_key.setdefault(k, []).append(name)
    refused.sort()
    clashes = sorted(sorted(group) for group in by_key.values() if len(group) > 1)
    untouchable = set()
    if refused or clashes:
        left_out = {name for name, _ in refused}.union(*clashes)
        wanted = {name: entry for name, entry in wanted.items() if name not in left_out}
        clashing = {keys[group[0]] for group in clashes}
        untouchable = {name for name in dst if key(name) in clashing}
    recased = []
    if names.fold:
        for name, entry in wanted.items():
            if name not in dst:
                old = dst_keys.get(keys[name])
                if old is not None and old in dst and old not in wanted and old not in untouchable \
                        and dst[old].kind == entry.kind:
                    recased.append((old, name))
        recased.sort()
    return wanted, refused, clashes, recased, untouchable


def _match_moves(gone: dict, new: dict, stores: Stores = Stores()):
    """Pairs (old name, new name) of one directory's entries that were renamed.

    Candidates need an mtime with a sub-second part (a real write, not a time
    set in whole seconds by an archiver) and a signature that is unique on
    both sides.  Directories match on (mtime, mode): renaming a folder does
    not change its own mtime, and the walk then checks its contents file by
    file as usual.  Files match on (size, mtime) and the caller compares
    their bytes before moving.  Source times are compared as REPLICA's file
    system stores them (stores), and modes only where it stores them; on
    one that keeps whole seconds, any mtime is a candidate.
    """
    fit = stores.times.fit
    coarse = stores.times.step % 1_000_000_000 == 0

    def key(entry, replica):
        st = entry.st
        if st is None or not (coarse or st.st_mtime_ns % 1_000_000_000):  # links have no st
            return None
        mtime = st.st_mtime_ns if replica else fit(st.st_mtime_ns)
        if entry.kind == DIR:
            return (DIR, mtime, stat.S_IMODE(st.st_mode) if stores.modes else None)
        if entry.kind == FILE and st.st_size:
            return (FILE, st.st_size, mtime)
        return None

    def unique(entries, replica):
        found = {}
        for name, entry in entries.items():
            k = key(entry, replica)
            if k is not None:
                found[k] = None if k in found else name
        return {k: name for k, name in found.items() if name is not None}

    if not gone or not new:
        return []
    olds = unique(gone, True)
    return sorted((olds[k], name) for k, name in unique(new, False).items() if k in olds)


class _Attrs(NamedTuple):
    """Metadata a replica entry gets besides its bytes (see _attrs)."""

    # What differs from the source, in rsync's --itemize letters: o owner,
    # g group, p permission bits, t time (of a link), a ACL, x other xattrs.
    letters: str = ""
    uid: int = -1  # the owner it gets (-1: left as it is)
    gid: int = -1  # the group it gets (-1: left as it is)
    mode: Optional[int] = None  # the permission bits it gets (None: left; links have none)
    xattrs: Optional[dict] = None  # all the extended attributes it gets (None: left as they are)
    have_x: Optional[dict] = None  # those it has now (None: not known, read them first)
    # What differs but cannot be mirrored by this process: "o" (an owner
    # needs root), "g" (a group the process is not a member of).
    missed: str = ""


_NO_ATTRS = _Attrs()


def _attrs(want: Entry, have: Optional[os.stat_result], keep: Keep, wx: dict = _NO_XATTRS,
           hx: dict = _NO_XATTRS, fit=None) -> _Attrs:
    """What a replica entry with stat have (None: one about to be created
    by this process) needs to match the source entry want in owner, group,
    permission bits, extended attributes and ACLs (wx, hx: each side's, as
    listed), and, for a link, its time (fit: how the replica stores it)."""
    ws = want.st
    letters = missed = ""
    uid, gid = (have.st_uid, have.st_gid) if have is not None else (keep.uid, keep.gid)
    new_uid = new_gid = -1
    if ws.st_uid != uid and keep.owner_asked:
        if keep.owner:
            letters, new_uid, uid = "o", ws.st_uid, ws.st_uid
        else:
            missed = "o"
    if ws.st_gid != gid and keep.group_asked:
        if keep.group and (keep.groups is None or ws.st_gid in keep.groups):
            letters, new_gid, gid = letters + "g", ws.st_gid, ws.st_gid
        else:
            missed += "g"
    mode = None  # a new file gets its mode from _set_file_stat, once its owner is set
    if want.kind != LINK:
        if have is not None and keep.modes:
            mode = _mirrored_mode(ws, uid, gid)
            if mode != stat.S_IMODE(have.st_mode):
                letters += "p"
    elif have is not None and keep.link_times:
        if (fit(ws.st_mtime_ns) if fit else ws.st_mtime_ns) != have.st_mtime_ns:
            letters += "t"
    xattrs = None
    if keep.any_xattrs and want.kind != LINK:
        xattrs = wx
        if have is None:
            have_x = None  # a new file may inherit a default ACL: read it then
        else:
            have_x = hx
            if wx != hx:
                acl = any(wx.get(key) != hx.get(key) for key in _ACL_KEYS)
                rest = _without_acls(wx) != _without_acls(hx)
                letters += "a" * acl + "x" * rest
        return _Attrs(letters, new_uid, new_gid, mode, xattrs, have_x, missed)
    return _Attrs(letters, new_uid, new_gid, mode, None, None, missed)


def _without_acls(xattrs: dict) -> dict:
    return {key: value for key, value in xattrs.items() if key not in _ACL_KEYS}


class _Step(NamedTuple):
    """One thing a wanted entry needs, as _steps decided it."""

    # "copy", "update", "compare", "attrs", "link", "relink", "mkdir",
    # "enter" or "hardlinked" (left to the hard-link phase, _Walk.link_groups)
    kind: str
    name: str
    want: Entry  # the source entry
    have: Optional[Entry]  # the replica entry, if any
    attrs: _Attrs = _NO_ATTRS  # the metadata the replica entry gets (see _attrs)


def _steps(wanted: dict, dst: dict, keep: set, checksum: bool, window: int, times: Times,
           meta: Keep = Keep(), src_x: dict = _NO_XATTRS, dst_x: dict = _NO_XATTRS) -> list:
    """What each wanted entry needs, in name order, once the walk has
    carried out the moves and removals (dst as they left it).  A file is
    current when its size and mtime equal the replica's (as REPLICA's file
    system stores times, within window); checksum: then also compared by
    its bytes ("compare").  meta: the metadata mirrored (src_x, dst_x: the
    extended attributes as listed), set in place on a current entry
    ("attrs").  A file with other names (hard links) is left to the
    hard-link phase when meta keeps them."""
    steps = []
    fit = None if times.exact else times.fit
    none = _NO_XATTRS
    any_x = bool(src_x or dst_x)
    # Whether modes, owners or groups are compared at all (not on exFAT,
    # which shows the same made-up ones for every file).
    ids = meta.modes or meta.owner_asked or meta.group_asked
    for name in sorted(wanted):
        want, have = wanted[name], dst.get(name)
        if name in keep:
            continue
        kind = want.kind
        ws = want.st
        if kind == FILE:
            if meta.hard_links and ws.st_nlink > 1:
                steps.append(_Step("hardlinked", name, want, have))
                continue
            if have is None:
                steps.append(_Step("copy", name, want, None, _attrs(want, None, meta, src_x.get(name, none))))
                continue
            # The no-change test, inline: it runs for nearly every file of most passes.
            hs = have.st
            if not (ws.st_size == hs.st_size
                    and abs((fit(ws.st_mtime_ns) if fit else ws.st_mtime_ns) - hs.st_mtime_ns) <= window):
                steps.append(_Step("update", name, want, have, _attrs(want, None, meta, src_x.get(name, none))))
                continue
            attrs = _NO_ATTRS
            if (ids and (ws.st_mode != hs.st_mode or ws.st_uid != hs.st_uid or ws.st_gid != hs.st_gid)
                    or any_x and (name in src_x or name in dst_x)):
                attrs = _attrs(want, hs, meta, src_x.get(name, none), dst_x.get(name, none))
            if checksum:
                steps.append(_Step("compare", name, want, have, attrs))
            elif attrs.letters or attrs.missed:
                steps.append(_Step("attrs", name, want, have, attrs))
        elif kind == LINK:
            if have is None:
                steps.append(_Step("link", name, want, None, _attrs(want, None, meta)))
            elif have.target != want.target:
                steps.append(_Step("relink", name, want, have, _attrs(want, None, meta)))
            elif (ws.st_uid != have.st.st_uid or ws.st_gid != have.st.st_gid
                  or meta.link_times and ws.st_mtime_ns != have.st.st_mtime_ns):
                attrs = _attrs(want, have.st, meta, fit=fit)
                if attrs.letters or attrs.missed:
                    steps.append(_Step("attrs", name, want, have, attrs))
        else:
            steps.append(_Step("mkdir" if have is None else "enter", name, want, have))
    return steps


def _why(want: Entry, have: Optional[Entry], step: Optional[_Step], times: Times, window: int) -> str:
    """Why _steps decided what it did for one file or link, for -v."""
    kind = step.kind if step else "current"
    if want.kind == LINK:
        if kind == "link":
            return "not in the replica"
        if kind == "relink":
            return f"link target differs: replica has {_token(have.target)}"
        return "current: same link target" if kind == "current" else "link target equal; attributes differ"
    if want.kind != FILE:
        return ""
    if kind == "hardlinked":
        return f"a file with {want.st.st_nlink} names: handled with its other names"
    if kind == "copy":
        return "not in the replica"
    ws, hs = want.st, have.st
    size = f"size {ws.st_size:,}"
    mtime = times.fit(ws.st_mtime_ns)
    stored = "" if mtime == ws.st_mtime_ns else f" (stored as {_utc_ns(mtime)})"
    if kind == "update":
        if ws.st_size != hs.st_size:
            return f"changed: size {ws.st_size:,} in the source, {hs.st_size:,} in the replica"
        return (f"changed: mtime {_utc_ns(ws.st_mtime_ns)} in the source{stored}, "
                f"{_utc_ns(hs.st_mtime_ns)} in the replica")
    same = f"{size} and mtime {_utc_ns(ws.st_mtime_ns)}{stored} equal"
    if kind == "compare":
        return f"{same}; its bytes are compared (--checksum, or a renamed folder)"
    if kind == "attrs":
        return f"{same}; {_describe_letters(step.attrs.letters + step.attrs.missed, 'attributes')} differ"
    return f"current: {same}"


# ---------------------------------------------------------------- executors --
#
# The walk decides and reports; an executor carries out its changes on
# REPLICA and says how they went, by what it returns or the OSError it
# raises, never by reporting.  _Changes is the real one.  _DryRun changes
# nothing and says that every change went well, so a dry run reports
# exactly what the real pass would (what only reads, such as the
# comparisons of checksum and of moved files, happens in both).  The trash
# is a policy of the executor: with one, what a pass deletes or overwrites
# is moved (take_to_trash) or hard-linked (keep_in_trash) there instead.


class _Outcome(NamedTuple):
    """What the slow part of a file step did (see _Changes.file_work)."""

    result: str  # "same", "copied", "planned" (dry run), "vanished", "not regular", "stopped", "failed"
    copied: int = 0  # bytes copied ("planned": that a copy would write)
    stable: bool = True  # the source kept its size and mtime while it was copied
    trash: str = ""  # where the old version was kept in the trash first ("": it was not)
    what: str = ""  # "failed": what could not be done
    error: Optional[OSError] = None  # "failed": why


_STOPPED = _Outcome("stopped")
_SAME = _Outcome("same")


class _Done:
    """A result that is already there, answering like a Future (a real Future
    per small file costs more than copying it on tmpfs)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def done(self) -> bool:
        return True


class _Changes:
    """The real executor: changes REPLICA (and TRASH) as the walk asks."""

    def __init__(self, options: Options, trash, trash_stamp: str, should_stop, abort, keep: Keep = Keep(),
                 overlap: bool = False):
        self.keep = keep  # the metadata mirrored
        self.overlap = overlap  # REPLICA is slow to answer: every file's work goes to threads
        self.durable = options.fsync  # flush files and changed folders to the disk
        self.trash = trash if options.trash else None  # TRASH's handle, with the trash policy
        self.trash_stamp = trash_stamp  # this pass's folder in TRASH
        self.should_stop, self.abort = should_stop, abort
        self.pool = None  # threads for large files, once one comes

    # -- folders

    def restrict(self, dd, mode: int) -> None:
        os.chmod(dd, mode)

    def make_writable(self, dd, mode: int) -> int:
        """Let us add and remove entries in dd; returns its mode now."""
        return _make_writable(dd, mode)

    def mkdir(self, dd, name) -> None:
        path, fd = _at(dd, name)
        try:
            os.mkdir(path, 0o700, dir_fd=fd)
        except OSError as err:
            raise _about_name(err) from None

    def child_replica(self, dd, name, have: Optional[Entry], moved_from: Optional[str]) -> tuple:
        """(whether the replica folder of subfolder NAME exists now, the name to open it by)."""
        return dd is not None, name

    def finish_dir(self, dd, src: os.stat_result, mode_now: int, set_times: bool, attrs: _Attrs) -> None:
        """Give a replica folder the source folder's owner and extended
        attributes (attrs), its mode and, set_times, its times."""
        if attrs.letters:
            _give_attrs(dd, attrs._replace(mode=None), self.keep)
        if attrs.mode is not None and (mode_now != attrs.mode or attrs.letters and attrs.mode & _SET_ID):
            os.chmod(dd, attrs.mode)
        if set_times:
            os.utime(dd, ns=(src.st_atime_ns, src.st_mtime_ns))

    def flush_dir(self, dd) -> None:
        """--fsync: write a folder whose entries changed to the disk, so that
        its new names (renames, creations, removals) survive a power cut."""
        if not self.durable:
            return
        if _DIR_FD:
            os.fsync(dd)
            return
        fd = os.open(dd, os.O_RDONLY | _O_DIRECTORY)  # pragma: no cover - by path (Windows cannot)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open_doomed(self, d, name):
        """Open a replica folder about to be emptied, and make it writable."""
        handle = _open_dir(d, name)
        try:
            _make_writable(handle, stat.S_IMODE(os.stat(handle).st_mode))
        except BaseException:
            _close_dir(handle)
            raise
        return handle

    def rmdir(self, d, name) -> None:
        path, fd = _at(d, name)
        os.rmdir(path, dir_fd=fd)

    # -- entries

    def rename(self, dd, old, new) -> None:
        old_path, fd = _at(dd, old)
        new_path, _ = _at(dd, new)
        os.rename(old_path, new_path, src_dir_fd=fd, dst_dir_fd=fd)

    def recase(self, dd, old, new) -> None:
        """Rename a replica entry to a name that differs in case only, by
        way of a temporary name: FAT keeps the old spelling on a direct rename."""
        temp = _temp_name()
        self.rename(dd, old, temp)
        try:
            self.rename(dd, temp, new)
        except OSError:
            with contextlib.suppress(OSError):
                self.rename(dd, temp, old)
            raise

    def make_link(self, dd, name, want: Entry, attrs: _Attrs) -> None:
        _make_link(dd, name, want.target, attrs, want.st)

    def set_attrs(self, sd, dd, name, want: Entry, have: Entry, attrs: _Attrs, links: int = 1) -> Optional[tuple]:
        """Give a current replica entry new metadata in place; returns (what
        could not be done, OSError) on failure.  links: the names the
        replica file may have (a hard-link group's)."""
        try:
            if have.kind == LINK:
                _set_link_attrs(dd, name, attrs, want.st, have.st)
                return None
            if have.st.st_nlink > links:
                # Another hard link could reach outside the replica: replace the file instead.
                outcome = self.copy(sd, dd, name, attrs=self.for_copy(want, attrs))
                return (outcome.what, outcome.error) if outcome.result == "failed" else None
            _set_file_attrs(dd, name, attrs, self.keep, have.st)
        except OSError as err:
            return ("set " + _describe_letters(attrs.letters, "attributes"), err)
        return None

    def for_copy(self, want: Entry, attrs: _Attrs) -> _Attrs:
        """The metadata a new copy gets, from those planned for setting in place."""
        return _attrs(want, None, self.keep, attrs.xattrs or _NO_XATTRS)

    def hard_link(self, leader_dd, leader, dd, name) -> None:
        """Make NAME in dd another name of the file leader in leader_dd, atomically."""
        source, sfd = _at(leader_dd, leader)
        tmp_path, fd, _ = _create_temp(dd, lambda path, dir_fd: os.link(
            source, path, src_dir_fd=sfd, dst_dir_fd=dir_fd, follow_symlinks=False))
        try:
            final_path, _ = _at(dd, name)
            os.replace(tmp_path, final_path, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            _discard_temp(tmp_path, fd)
            raise

    def unlink(self, d, name) -> None:
        path, fd = _at(d, name)
        try:
            os.unlink(path, dir_fd=fd)
        except FileNotFoundError:
            pass  # already gone: that is what we wanted

    # -- the trash policy

    def take_to_trash(self, dd, name, rel: str, have: Entry) -> str:
        """Move replica entry NAME to TRASH/<pass stamp>/<rel>; returns that place."""
        folder = self.trash_folder(rel)
        try:
            if have.kind == DIR and not have.st.st_mode & stat.S_IWUSR:
                _rename_read_only_dir(dd, name, folder)
            else:
                path, fd = _at(dd, name)
                target, tfd = _at(folder, name)
                os.rename(path, target, src_dir_fd=fd, dst_dir_fd=tfd)
        finally:
            _close_dir(folder)
        return f"{self.trash_stamp}/{rel}"

    def keep_in_trash(self, dd, name, rel: str) -> str:
        """Hard-link replica file NAME, about to be replaced, into the trash."""
        folder = self.trash_folder(rel)
        try:
            path, fd = _at(dd, name)
            target, tfd = _at(folder, name)
            os.link(path, target, src_dir_fd=fd, dst_dir_fd=tfd, follow_symlinks=False)
        finally:
            _close_dir(folder)
        return f"{self.trash_stamp}/{rel}"

    def trash_folder(self, rel: str):
        """Open (creating) the folder of TRASH/<pass stamp> that rel goes into."""
        d = None
        try:
            for part in [self.trash_stamp, *rel.split("/")[:-1]]:
                parent = self.trash if d is None else d
                path, fd = _at(parent, part)
                try:
                    os.mkdir(path, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass  # made by an earlier item (or another worker) of this pass
                inner = _open_dir(parent, part)
                if d is not None:
                    _close_dir(d)
                d = inner
        except BaseException:
            if d is not None:
                _close_dir(d)
            raise
        return d

    def remove_trash_folder(self, remove_tree, name) -> bool:
        """Prune one pass folder of the trash (remove_tree: the walk's)."""
        return remove_tree(self.trash, name, name, accounting=False)

    # -- files

    def file_work(self, sd, dd, name, step: "_Step", rel: str) -> _Outcome:
        """The slow part of a file step; runs in a worker thread for large
        files.  "compare" compares first and copies only other bytes; with
        the trash, a file about to be replaced is linked there first."""
        if self.should_stop():
            return _STOPPED
        if step.kind == "compare":
            try:
                if _same_contents(sd, dd, name, abort=self.abort):
                    return _Outcome("same")
            except _Aborted:
                return _STOPPED
            except OSError as err:
                return _Outcome("failed", what="compare contents", error=err)
        trash, moved, move_old = "", [], None
        if self.trash is not None and step.have is not None:
            try:
                trash = self.keep_in_trash(dd, name, rel)
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EMLINK, *_UNSUPPORTED):
                    return _Outcome("failed", what="move the old version to the trash", error=err)
                # No hard links here (FAT, exFAT): the old version moves to
                # the trash once the new one is written, which takes its
                # name right after (for a moment, the name holds neither).
                def take_old():
                    moved.append(self.take_to_trash(dd, name, rel, step.have))
                move_old = take_old
        attrs = step.attrs
        if step.kind == "compare":  # the attributes for a new copy
            attrs = self.for_copy(step.want, attrs)
        outcome = self.copy(sd, dd, name, step.want.st.st_size, trash, attrs, move_old)
        return outcome._replace(trash=moved[0]) if moved else outcome

    def copy(self, sd, dd, name, size: int = 0, trash: str = "", attrs: _Attrs = _NO_ATTRS,
             move_old=None) -> _Outcome:
        """Copy NAME from sd to dd atomically (see _copy_file).  size: the
        source's size as listed, which a dry run reports; trash: where the
        old version was (or move_old, called once the copy is written,
        puts it), passed on in the outcome; attrs: the owner and extended
        attributes the copy gets."""
        try:
            copied, stable = _copy_file(sd, dd, name, self.abort, attrs, self.keep, move_old,
                                        self.durable)
        except _Aborted:
            return _STOPPED._replace(trash=trash)
        except _Vanished:
            return _Outcome("vanished", trash=trash)
        except _NotRegular:
            return _Outcome("not regular", trash=trash)
        except OSError as err:
            return _Outcome("failed", trash=trash, what="copy file", error=err)
        return _Outcome("copied", copied, stable, trash)

    def copy_into(self, sd, dd, name, attrs: _Attrs = _NO_ATTRS) -> _Outcome:
        """copy() into a replica folder outside the walk (see into())."""
        with self.into(sd, dd):
            return self.copy(sd, dd, name, attrs=attrs)

    @contextlib.contextmanager
    def into(self, sd, dd):
        """Change a replica folder outside the walk: made writable meanwhile,
        then given back its mode and the source folder's mtime."""
        mode = stat.S_IMODE(os.stat(dd).st_mode)
        writable = _make_writable(dd, mode)
        try:
            yield
        finally:
            if writable != mode:
                os.chmod(dd, mode)
            src_dir = os.stat(sd)
            os.utime(dd, ns=(src_dir.st_atime_ns, src_dir.st_mtime_ns))

    def submit(self, large: bool, fn, *args):
        """Run fn in a thread when the work is large or REPLICA is slow to
        answer, else here and now."""
        if large or self.overlap:
            if self.pool is None:
                threads = LATENCY_THREADS if self.overlap else LARGE_FILE_THREADS
                from concurrent.futures import ThreadPoolExecutor  # here: 10 ms a start, for few passes
                self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sync")
            return self.pool.submit(fn, *args)
        return _Done(fn(*args))

    def stop_threads(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class _DryRun(_Changes):
    """The dry-run executor: reads as the real one does, changes nothing,
    and answers as if every change had been made."""

    def __init__(self, options: Options, trash, *args, **kwargs):
        super().__init__(options, trash, *args, **kwargs)
        if options.trash and self.trash is None:
            self.trash = options.trash  # TRASH the real pass would make: its policy all the same

    def restrict(self, dd, mode):
        pass

    def flush_dir(self, dd):
        pass

    def make_writable(self, dd, mode):
        return mode

    def mkdir(self, dd, name):
        pass

    def child_replica(self, dd, name, have, moved_from):
        # A folder "created" has nothing to list; one "moved" is still under its old name.
        return dd is not None and have is not None, moved_from or name

    def finish_dir(self, dd, src, mode_now, set_times, attrs):
        pass

    def open_doomed(self, d, name):
        return _open_dir(d, name)

    def rmdir(self, d, name):
        pass

    def rename(self, dd, old, new):
        pass

    def recase(self, dd, old, new):
        pass

    def make_link(self, dd, name, want, attrs):
        pass

    def set_attrs(self, sd, dd, name, want, have, attrs, links=1):
        return None

    def hard_link(self, leader_dd, leader, dd, name):
        pass

    @contextlib.contextmanager
    def into(self, sd, dd):
        yield

    def unlink(self, d, name):
        pass

    def take_to_trash(self, dd, name, rel, have):
        return f"{self.trash_stamp}/{rel}"

    def keep_in_trash(self, dd, name, rel):
        return f"{self.trash_stamp}/{rel}"

    def remove_trash_folder(self, remove_tree, name):
        return True

    def copy(self, sd, dd, name, size=0, trash="", attrs=_NO_ATTRS, move_old=None):
        return _Outcome("planned", size, trash=trash)


# ----------------------------------------------------------------- the walk --


class _Frame:
    """A directory pair on the walk's stack."""

    __slots__ = ("parent", "name", "dst_name", "rel", "src_st", "dst_st", "dst_exists", "dst_mode",
                 "dst_mtime", "sd", "dd", "changed", "writable", "verify", "attrs", "above")

    def __init__(self, parent, name, rel, src_st, dst_st, dst_exists):
        self.parent = parent  # the _Frame of the folder that holds it (None: the root)
        self.name = name  # its name in the source folder
        self.dst_name = name  # its name in the replica folder (a dry run's "moved" folder: the old one)
        self.rel = rel  # its path below the roots, for reports
        self.src_st = src_st  # the source folder's lstat, as listed
        self.dst_st = dst_st  # the replica folder's, as listed (None: created by this pass, or none)
        self.dst_exists = dst_exists  # there is a replica folder to open
        self.dst_mode = stat.S_IMODE(dst_st.st_mode) if dst_st else None  # the replica folder's mode now
        self.dst_mtime = dst_st.st_mtime_ns if dst_st else None  # its mtime as listed
        self.sd = None  # the source folder's handle, while it is open
        self.dd = None  # the replica folder's handle, while it is open (None: there is none)
        self.changed = False  # entries added or removed: the mtime must be reset
        self.writable = False  # made writable (or restricted) this pass: finish() sets the mode
        # Inside a folder matched as a rename this pass: equal size and mtime
        # prove nothing there (a copy made with cp -a looks the same), so
        # files are compared by their bytes.
        self.verify = False
        # The owner and extended attributes it gets (see _attrs), as its
        # parent's listing found them; finish() sets them.
        self.attrs = _NO_ATTRS
        # Only in a stand-in for the parent of a folder handed over by
        # another process (see _Handoff), which has no parent frame: the
        # path from the roots to it, as _Handoff.path.
        self.above = ()


class _Handoff(NamedTuple):
    """A folder a worker process hands back, not yet entered, for any
    process to walk: where it is, checked again on the way down, and what
    its parent's listing said of it (the fields of its _Frame)."""

    # (name, replica name, source identity, replica identity or None) of
    # each folder from the roots down to its parent; identities are
    # (st_dev, st_ino), and each folder reopened must still have its own.
    path: tuple
    name: str
    dst_name: str
    rel: str
    src_st: os.stat_result
    dst_st: Optional[os.stat_result]
    dst_exists: bool
    dst_id: Optional[tuple]  # its replica folder's identity (None: there is none)
    verify: bool
    attrs: "_Attrs"


class _Later(NamedTuple):
    """In a worker's events: here come the events of the folder it handed
    over as its number-th (see _Order)."""

    slot: int  # the worker's
    number: int


class _Doomed:
    """One folder on remove_tree's stack."""

    __slots__ = ("parent", "name", "rel", "handle", "remaining", "emptied")

    def __init__(self, parent, name: str, rel: str, handle, remaining: list, emptied: bool):
        self.parent = parent  # handle of the folder that holds it
        self.name = name  # its name there
        self.rel = rel  # its path below the root, for reports
        self.handle = handle  # its own handle, open while it is on the stack
        self.remaining = remaining  # (name, Entry) still to remove, last first
        self.emptied = emptied  # False once something inside must stay (then so does the folder)




def _list_pair(frame, keep: Keep, slice_min: int = 0) -> _Listing:
    """Open (below the root) and list both sides of a directory pair, with
    the extended attributes keep mirrors.  Where the source holds slice_min
    entries or more (0: never), regular files listed on both sides are not
    examined (see _Listing.unexamined).

    Reports nothing: it returns what it found, failures included, and the
    walk reports them.
    """
    if frame.sd is None:  # else opened by reopen()
        try:
            frame.sd = _open_dir(frame.parent.sd, frame.name)
        except OSError as err:
            return _Listing(frame.rel, failure=("list directory", err))
        if frame.dst_exists:
            try:
                frame.dd = _open_dir(frame.parent.dd, frame.dst_name)
                if frame.dst_mode is None:  # created by this pass
                    frame.dst_mode = stat.S_IMODE(os.stat(frame.dd).st_mode)
            except OSError as err:
                return _Listing(frame.rel, failure=("list replica directory", err))
    if slice_min and frame.dd is not None:
        return _list_pair_for_slices(frame, keep, slice_min)
    try:
        src, unreadable = _scan(frame.sd)
    except OSError as err:
        return _Listing(frame.rel, failure=("list directory", err))
    src_x = _list_xattrs(frame.sd, src, keep, unreadable) if keep.any_xattrs else _NO_XATTRS
    if frame.dd is None:
        return _Listing(frame.rel, src, unreadable, {}, [], src_x=src_x)
    try:
        dst, dst_unreadable = _scan(frame.dd)
    except OSError as err:
        return _Listing(frame.rel, failure=("list replica directory", err))
    dst_x = _list_xattrs(frame.dd, dst, keep, dst_unreadable, src) if keep.any_xattrs else _NO_XATTRS
    return _Listing(frame.rel, src, unreadable, dst, dst_unreadable, src_x=src_x, dst_x=dst_x)


def _list_pair_for_slices(frame, keep: Keep, slice_min: int) -> _Listing:
    """_list_pair where a big folder's files may be left to its slices:
    both sides are listed first (file types only), and only what the
    slices do not take is examined here (see _Listing.unexamined)."""
    listed = {}
    for side, d, what in (("src", frame.sd, "list directory"), ("dst", frame.dd, "list replica directory")):
        try:
            with os.scandir(d) as listing:
                listed[side] = list(listing)
        except OSError as err:
            return _Listing(frame.rel, failure=(what, err))
    unexamined, fresh = set(), set()
    if len(listed["src"]) >= slice_min:
        files = {side: _listed_files(items) for side, items in listed.items()}
        unexamined = files["src"].keys() & files["dst"].keys()
        src_names = {item.name for item in listed["src"]}
        if all(item.name in src_names for item in listed["dst"]):  # a first copy, or files added
            fresh = files["src"].keys() - {item.name for item in listed["dst"]}
            unexamined |= fresh
        unexamined -= {name for name in unexamined if name.startswith(TEMP_PREFIX)}  # skipped, removed: here
        fresh &= unexamined
        for side, items in listed.items():  # the rest, in the order listed
            rest = [] if len(files[side]) == len(items) else [item for item in items if item.name not in files[side]]
            # (Of the replica's files, the fresh names are none.)
            if len(files[side]) > len(unexamined) - (len(fresh) if side == "dst" else 0):
                rest += [files[side][name] for name in files[side].keys() - unexamined]
            listed[side] = rest
    src, unreadable = _examine(frame.sd, listed["src"])
    dst, dst_unreadable = _examine(frame.dd, listed["dst"])
    src_x = dst_x = _NO_XATTRS
    if keep.any_xattrs:
        src_x = _list_xattrs(frame.sd, src, keep, unreadable)
        dst_x = _list_xattrs(frame.dd, dst, keep, dst_unreadable, src)
    return _Listing(frame.rel, src, unreadable, dst, dst_unreadable, src_x=src_x, dst_x=dst_x,
                    unexamined=unexamined, fresh=fresh)


class _MassDeletionGuard:
    """The default guard against mass deletion (Options.allow_mass_delete):
    a folder whose deletions would remove more than MASS_DELETE_FLOOR
    entries, and either empty a folder whose source is empty (below the
    root: a drive that is not mounted) or remove more than half of all
    REPLICA's entries (a wrong REPLICA, an unmounted drive), changes
    nothing.  Counted by name, only as far as needed."""

    def __init__(self, replica):
        self.replica = replica  # REPLICA's handle
        self.total = None  # entries in REPLICA, counted when first needed

    def refusal(self, dd, below_root: bool, empty: bool, dst: dict, doomed: list) -> Optional[str]:
        """Why the deletions of doomed (names in dst, the listing of replica
        folder dd) must not happen, if they must not."""
        floor = MASS_DELETE_FLOOR
        if self.count(dd, dst, doomed, floor + 1) <= floor:
            return None
        count = self.count(dd, dst, doomed, 1 << 62)
        if below_root and empty:
            return (f"the source folder is empty, but the replica folder holds {count:,} entries: "
                    "a drive that is not mounted looks like this, so nothing in it was changed.")
        if self.total is None:
            self.total = _count_inside(self.replica, 1 << 62)
        if count * 2 <= self.total:
            return None
        return (f"mirroring this folder would delete {count:,} of the {self.total:,} entries "
                "in REPLICA, more than half: a wrong REPLICA or a drive that is not mounted looks "
                "like this, so nothing in this folder was changed.")

    @staticmethod
    def count(dd, dst: dict, doomed: list, cap: int) -> int:
        """Entries that deleting doomed would remove, at most about cap."""
        count = 0
        for name in doomed:
            count += 1
            if dst[name].kind == DIR:
                try:
                    d = _open_dir(dd, name)
                except OSError:
                    continue
                try:
                    count += _count_inside(d, cap - count)
                finally:
                    _close_dir(d)
            if count >= cap:
                break
        return count


class _Walk:
    """One pass over the tree: the stack of folder pairs, the result, stop
    requests and the deletion budget.  Each folder pair is planned
    (_sort_out, _steps), the plan carried out through the executor
    (self.do), and every outcome reported as an Event.  See Mirror.run_pass."""

    def __init__(self, options: Options, report, should_stop, progress=None, abort=lambda: False):
        self.options = options
        self.report = report
        self.should_stop = should_stop  # true also once abort() is
        self.abort = abort  # a request to stop at once: copies are abandoned mid-file
        self.progress = progress  # called with the number of entries checked so far
        self.result = PassResult()
        self.deleted = 0  # entries removed (or, in a dry run, that would be), temporary files aside
        self.do = None  # the executor, while run() runs
        self.roots = None  # the _Roots, while run() runs
        self.protected = frozenset()  # identities no folder inside the trees may have
        self.stores = Stores()  # what REPLICA's file system stores: times, names, ... (Mirror probes it)
        self.keep = Keep()  # the metadata mirrored (Mirror decides it)
        self.links = []  # (device, inode, folder, name) of source files with other names: link_groups()
        self.guard = None  # the _MassDeletionGuard, while run() runs, unless turned off
        self.retries = []  # (folder, name, new, OSError): copies that failed for lack of space
        self.retry_later = True  # False once retry_copies runs: failures are then final
        self.source_latency = 0.0  # seconds SOURCE takes to open a folder, where slow (Mirror probes it)
        self.donor = None  # in a worker process: its _Donor, asked after each folder whether to hand one over
        self.slice_min = 0  # the entries that make a folder big (BIG_FOLDER; 0: none is)
        self.between_parts = None  # while this process mirrors a slice others mirror too: see sync_slices
        self.report_by = 0.0  # time.monotonic() by which finished file work is reported (REPORT_EVERY)
        now = time.time()  # names this pass's trash folder; workers inherit it
        self.trash_stamp = time.strftime("%Y-%m-%d_%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"

    @property
    def times(self) -> Times:
        return self.stores.times

    @property
    def slow(self) -> bool:
        """Whether SOURCE or REPLICA is slow to answer (a NAS): requests are
        then made many at once (see workers, and _Changes's threads)."""
        return self.stores.latency > 0 or self.source_latency > 0

    @property
    def workers(self) -> int:
        """The worker processes this pass splits the walk among (1: none)."""
        options = self.options
        if not _CAN_FORK or options.max_delete is not None:  # the budget is counted in one process
            return 1
        if self.slow and options.slow_workers:
            return options.slow_workers
        return options.workers

    # -- reporting

    def emit(self, action: str, rel: str, detail: str = "", trash: str = "") -> None:
        """Count and report one action (trash: where the entry went instead
        of being destroyed, counted as kept in trash too)."""
        self.result.counts[action] += 1
        if trash:
            self.result.counts["trash"] += 1
        self.report(Event(action, rel, detail, trash=trash))

    def fail(self, rel: str, what: str, err: BaseException) -> None:
        self.error(rel, f"cannot {what}: {_reason(err)}")

    def error(self, rel: str, message: str, advice: str = "") -> None:
        """An item that could not be mirrored (advice: the Options field
        that would leave it out knowingly)."""
        self.result.errors += 1
        self.result.counts["error"] += 1
        self.report(Event("error", rel, message, advice))

    def explain(self, rel: str, detail: str) -> None:
        """Why the pass decided something (Options.explain): a debug line."""
        if self.options.explain:
            self.report(Event("debug", rel, detail))

    @contextlib.contextmanager
    def phase(self, what: str):
        """Time a phase of the pass, for -v."""
        started = time.monotonic()
        try:
            yield
        finally:
            if self.options.explain:
                self.explain("", f"phase {what} took {time.monotonic() - started:.3f} s")

    def refuse(self, rel: str, message: str, advice: str = "") -> None:
        """A safety check refused the pass ("") or one folder: nothing there
        changes.  advice: the Options field that would let it proceed."""
        self.result.refused = True
        self.result.errors += 1
        self.result.counts["error"] += 1
        self.report(Event("error", rel, message, advice))

    def may_delete(self, rel: str) -> bool:
        """The max_delete safety net, for a source that changed after the
        pass counted its deletions (see Mirror.run_pass)."""
        limit = self.options.max_delete
        if limit is None or self.deleted < limit:
            return True
        self.error(rel, f"not removed: the limit of {limit} deletions is reached")
        return False

    def stopping(self) -> bool:
        if not self.result.interrupted and self.should_stop():
            self.result.interrupted = True
        return self.result.interrupted

    def reached_again(self, rel: str, entry: Entry) -> bool:
        """A folder inside a tree that is one of the roots, or a folder above
        one, seen again through a (bind) mount: entering, moving or deleting
        it would work on SOURCE (or REPLICA, TRASH) itself.  Reported, and
        never touched."""
        if entry.kind != DIR or (entry.st.st_dev, entry.st.st_ino) not in self.protected:
            return False
        self.refuse(rel, "this folder is SOURCE, REPLICA or TRASH (or a folder above one of them) "
                         "seen again through a mount; it was left alone")
        return True

    # -- the stack

    def use(self, roots: "_Roots") -> None:
        """Work in these roots, through the executor the options call for."""
        self.roots, self.protected = roots, roots.protected
        options = self.options
        executor = _DryRun if options.dry_run else _Changes
        self.do = executor(options, roots.trash, self.trash_stamp, self.stopping, self.abort, self.keep,
                           self.slow)
        # Big folders (see BIG_FOLDER) where worker processes may take
        # slices of one, both file systems are local, and REPLICA keeps names
        # as they are (a name that folds or is refused is planned with the
        # whole folder's names in view).
        local = all(roots.trees[what].kind in LOCAL_KINDS for what in ("SOURCE", "REPLICA"))
        if self.workers > 1 and local and not self.slow and self.stores.names == _POSIX_NAMES:
            self.slice_min = BIG_FOLDER
        # The default guard, unless an explicit max_delete replaces it or it is turned off.
        if self.guard is None and options.max_delete is None and not options.allow_mass_delete:
            self.guard = _MassDeletionGuard(roots.replica)

    def run(self, roots: "_Roots") -> None:
        self.use(roots)
        if self.options.trash and self.options.trash_keep_days is not None and roots.trash is not None:
            with self.phase("trash pruning"):
                self.prune_trash()
        sd = _dup(roots.source)
        dd = _dup(roots.replica) if roots.replica is not None else None
        root = _Frame(None, None, "", os.stat(sd), os.stat(dd) if dd is not None else None, dd is not None)
        if roots.replica_created:
            root.dst_st = None  # as for a folder the walk makes: its attributes are not news
        if dd is not None and self.keep.any_xattrs:
            try:
                root.attrs = _Attrs(xattrs=_read_xattrs(sd, self.keep, True),
                                    have_x=None if roots.replica_created else _read_xattrs(dd, self.keep, True))
            except OSError as err:  # left as they are; the rest of the pass goes on
                self.fail("", "read the extended attributes of the roots", err)
        root.sd, root.dd = sd, dd
        try:
            with self.phase("walk"):
                if self.workers > 1:
                    self.walk_split(root)
                else:
                    self.walk(root)
        finally:
            self.do.stop_threads()
        self.retry_later = False  # a leader's copy must land before its group is linked to it
        with self.phase("hard links"):
            self.link_groups()
        self.retry_copies()

    def walk(self, root: _Frame) -> None:
        # Depth first with an explicit stack: (frame, entered).  A directory's
        # permission bits and mtime are set when it is popped the second time,
        # after everything inside it is written.  Only the directories on the
        # current path are open: two descriptors per level.
        # In a worker, a folder not yet entered may be handed over (see
        # offer()): a _Later takes its place, reported where its events go.
        stack = [(root, False)]
        try:
            while stack:
                frame, entered = stack.pop()
                if entered:
                    self.finish(frame)
                    continue
                if type(frame) is _Later:
                    self.report(frame)
                    continue
                children = self.try_enter(frame)
                if children is None:
                    continue
                stack.append((frame, True))
                stack.extend((child, False) for child in reversed(children))
                if self.donor is not None and self.donor.wanted():
                    self.offer(stack)
        finally:
            if stack:  # left by an exception: no copy thread may still use these folders
                self.do.stop_threads()
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
            self.do.stop_threads()
            self.close(frame)
            raise

    def walk_split(self, root: _Frame) -> None:
        """Walk the top levels here, breadth first, until they hold a few
        subtrees (SPLIT_MIN_TASKS); hand those to worker processes
        (_FanOut), which hand folders over among themselves.  The top
        levels' own events are held, and each folder among them is finished
        once the subtrees below it are done, so that the log reads as one
        process walking depth first (see _Order)."""
        entered, level, tasks = [], [root], []
        held, below = {}, {}  # frame -> its own events; frame -> the subfolders it returned
        report, completed = self.report, False
        try:
            for _ in range(SPLIT_MAX_DEPTH):
                tasks = []
                for frame in level:
                    held[frame] = []
                    if frame is not root:  # the root's events come first: they go out at once
                        self.report = held[frame].append
                    try:
                        children = self.try_enter(frame)
                    finally:
                        self.report = report
                    below[frame] = children
                    if children is not None:
                        entered.append(frame)
                        tasks.extend(children)
                if len(tasks) >= SPLIT_MIN_TASKS or not tasks:
                    break
                level = tasks
            order = _Order(self, _Order.sequence(root, held, below, tasks))
            if len(tasks) > 1 and not self.stopping():
                self.explain("", f"worker split: {len(tasks):,} folders at depth {tasks[0].rel.count('/') + 1} "
                                 f"handed to {self.workers} worker processes "
                                 f"after {len(entered):,} folders walked here")
                self.do.stop_threads()  # no threads may be running across a fork
                fan_out = _FanOut(self, tasks, order)
                fan_out.run()
                self.explain("", f"worker processes handed over {len(tasks) - fan_out.forked:,} folders "
                                 "between them")
            for index, task in enumerate(tasks):  # handoffs included (_FanOut adds them)
                if index not in order.done:  # walked here: no worker took it, or there are none
                    self.walk_in_order(task, order, index)
            order.flush()  # the rest: where there were no tasks at all, everything
            completed = True
        finally:
            self.report = report
            if not completed:
                self.do.stop_threads()
                for frame in reversed(entered):
                    self.close(frame)

    def walk_in_order(self, task, order: "_Order", index: int) -> None:
        """walk_task() task index here, its events reported through order."""
        report = self.report
        self.report = lambda event: order.add(index, [event], False)
        try:
            self.walk_task(task)
        finally:
            self.report = report
        order.add(index, [], True)

    def walk_task(self, task) -> None:
        """Walk a subtree given as a _Frame (its parent open in this
        process) or as a _Handoff (reopened from the roots)."""
        if type(task) is _Handoff:
            try:
                task = self.reopen(task)
            except OSError as err:
                self.fail(task.rel, "reach the folder again (another process had listed it)", err)
                return
        self.walk(task)

    # -- handing folders over between processes

    def offer(self, stack: list) -> None:
        """Hand over the folder not yet entered nearest the bottom of the
        stack (the largest subtree left), when another is left to walk
        here.  Not one whose parents may lose their owner's search
        permission when finished (which happens before the folder is
        walked elsewhere): it could not be reached again."""
        waiting = [i for i, (frame, entered) in enumerate(stack) if not entered and type(frame) is _Frame]
        if len(waiting) < 2:
            return
        frame = stack[waiting[0]][0]
        above = frame.parent
        while above is not None:
            if above.src_st is not None and not above.src_st.st_mode & stat.S_IXUSR:
                return
            above = above.parent
        try:
            handoff = self.handoff(frame)
        except OSError:
            return  # walked here, as if not offered
        stack[waiting[0]] = (self.donor.give(handoff), False)

    @staticmethod
    def handoff(frame: _Frame) -> _Handoff:
        """frame, not entered, as another process can find it again."""
        path, above = [], frame.parent
        while above.parent is not None:
            path.append((above.name, above.dst_name, _identity(os.stat(above.sd)),
                         _identity(os.stat(above.dd)) if above.dd is not None else None))
            above = above.parent
        dst_id = None
        if frame.dst_exists:
            st = frame.dst_st
            if st is None:  # made by this pass
                name, fd = _at(frame.parent.dd, frame.dst_name)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            dst_id = _identity(st)
        return _Handoff(above.above + tuple(reversed(path)), frame.name, frame.dst_name, frame.rel,
                        frame.src_st, frame.dst_st, frame.dst_exists, dst_id, frame.verify, frame.attrs)

    def reopen(self, task: _Handoff) -> _Frame:
        """The frame of a folder handed over, opened from the roots down one
        name at a time, never through a link, each folder checked to be the
        one listed (OSError if one is not)."""
        sd = _dup(self.roots.source)
        dd = _dup(self.roots.replica) if self.roots.replica is not None else None
        try:
            for name, dst_name, src_id, dst_id in (*task.path, (task.name, task.dst_name,
                                                                _identity(task.src_st), task.dst_id)):
                sd = _descend(sd, name, src_id)
                if dd is not None and dst_id is None:
                    _close_dir(dd)
                    dd = None
                elif dd is not None:
                    dd = _descend(dd, dst_name, dst_id)
        except BaseException:
            for d in (sd, dd):
                if d is not None:
                    _close_dir(d)
            raise
        parent = _Frame(None, None, task.rel.rpartition("/")[0], None, None, dd is not None)
        parent.above = task.path
        frame = _Frame(parent, task.name, task.rel, task.src_st, task.dst_st, task.dst_exists)
        frame.dst_name, frame.verify, frame.attrs = task.dst_name, task.verify, task.attrs
        frame.sd, frame.dd = sd, dd
        if dd is not None and frame.dst_mode is None:  # made by this pass
            frame.dst_mode = stat.S_IMODE(os.stat(dd).st_mode)
        return frame

    def worker_pass(self, report, should_stop, abort) -> "_Walk":
        """A fresh walk for a worker process: its own results and callbacks,
        this pass's roots, trash folder and knowledge of REPLICA."""
        work = _Walk(self.options, report, should_stop, None, abort)
        work.stores, work.keep, work.source_latency = self.stores, self.keep, self.source_latency
        work.trash_stamp, work.guard = self.trash_stamp, self.guard
        work.use(self.roots)
        return work

    def share(self) -> "_Share":
        """This (worker's) pass's share of the whole pass's result."""
        r = self.result
        return _Share(dict(r.counts), r.bytes_copied, r.errors, r.interrupted, r.refused, self.deleted,
                      self.retries, self.links)

    def add(self, share: "_Share") -> None:
        """Count a worker's share of the pass in this pass's result."""
        self.result.counts.update(share.counts)
        self.result.bytes_copied += share.bytes_copied
        self.result.errors += share.errors
        self.result.interrupted |= share.interrupted
        self.result.refused |= share.refused
        self.deleted += share.deleted
        self.retries += share.retries
        self.links += share.links

    def close(self, frame: _Frame) -> None:
        for d in (frame.sd, frame.dd):
            if d is not None:
                _close_dir(d)
        frame.sd = frame.dd = None

    # -- one folder pair

    def enter(self, frame: _Frame):
        """Mirror one directory's entries; return the subdirectories to walk.

        Returns None (and leaves the replica side untouched) when either side
        cannot be opened or listed, or a safety check refuses the folder.
        """
        rel, options = frame.rel, self.options
        listing = _list_pair(frame, self.keep, self.slice_min)
        if listing.failure:
            # An unlistable source directory must not look empty: touch nothing.
            self.close(frame)
            self.fail(rel, *listing.failure)
            return None
        plan = _sort_out(listing, options, frame.parent is None, frame.dd is not None, self.stores)
        self.result.checked += plan.checked
        if self.progress is not None:
            self.progress(self.result.checked)
        if plan.refusal:
            self.close(frame)
            self.refuse("", plan.refusal, "allow_empty_source")
            return None
        for name, what, err in plan.failed:
            self.fail(_join(rel, name), what, err)
        for name, kind in plan.skipped:
            self.emit("skip", _join(rel, name), kind)
        self.report_names(rel, plan)
        dst, keep = plan.dst, plan.keep
        if plan.doomed and self.guard is not None:
            refusal = self.guard.refusal(frame.dd, frame.parent is not None, plan.empty, dst, plan.doomed)
            if refusal:
                self.close(frame)
                self.refuse(rel, refusal, "allow_mass_delete")
                return None
        if not self.restrict(frame):  # the first change to this folder: before any other
            self.close(frame)
            return None
        recased = self.recase(frame, plan.recased, dst)
        moved = self.sync_moves(frame, plan.moves, plan.wanted, dst)
        for name in plan.unwanted:
            if name not in dst:
                continue  # moved to its new name
            if self.stopping():
                return []
            errors = self.result.errors
            if self.remove(frame, name, dst[name]):
                del dst[name]
                continue
            keep.add(name)
            if name in plan.wanted and self.result.errors == errors:  # it stays for what it holds
                self.error(_join(rel, name), f"the replica {dst[name].kind} cannot be replaced by the "
                                             f"source's {plan.wanted[name].kind}: it holds excluded entries, "
                                             "which are left alone (--delete-excluded removes them)")

        children = []
        checksum = options.checksum or frame.verify
        wanted, later = plan.wanted, plan.later
        steps = _steps(wanted, dst, keep, checksum, options.modify_window_ns, self.times,
                       self.keep, listing.src_x, listing.dst_x)
        if options.explain:
            self.explain_steps(rel, wanted, dst, keep, steps)
        # Links and subfolders first, then files (README: Order): each
        # group's lines in name order, whatever waits on a copy thread.
        for step in steps:
            if step.want.kind == FILE:
                continue
            if self.stopping():
                return children
            if step.attrs.missed:
                self.missed(step.attrs.missed)
            if step.kind == "attrs":  # a link's owner or time (or only an owner this process may not give)
                if step.attrs.letters:
                    self.sync_attrs(frame, step.name, _join(rel, step.name), step.want, step.have, step.attrs)
            elif step.kind in ("link", "relink"):
                self.sync_link(frame, step)
            else:
                child = self.sync_dir(frame, step, moved.get(step.name) or recased.get(step.name),
                                      step.name in moved)
                if child is not None:
                    child.attrs = _Attrs(xattrs=listing.src_x.get(step.name, _NO_XATTRS),
                                         have_x=listing.dst_x.get(step.name, _NO_XATTRS) if step.have else None)
                    children.append(child)
        files = [step for step in steps if step.want.kind == FILE]
        if later or self.slice_min and len(files) >= self.slice_min:  # (many copies: a first pass)
            self.sync_slices(frame, files, later, moved, checksum)
        else:
            self.sync_files(frame, files, moved)
        return children

    def sync_files(self, frame, steps: list, moved: dict) -> None:
        """Carry out a folder's file steps (in name order; moved: see
        sync_moves), and report them in that order."""
        pending = []
        for step in steps:
            if self.stopping():
                break
            if step.attrs.missed:
                self.missed(step.attrs.missed)
            if step.kind == "compare" and step.name in moved:
                step = step._replace(kind="attrs")  # compared by sync_moves already
            if step.kind == "hardlinked":
                st = step.want.st
                self.links.append((st.st_dev, st.st_ino, frame.rel, step.name))
            else:
                self.sync_file(frame, step, pending)
        self.settle(frame, pending)

    def sync_slices(self, frame, steps: list, unexamined: list, moved: dict, checksum: bool) -> None:
        """A big folder's file steps (see sync_files), with the files listed
        and not examined yet (unexamined, in any order: see _Listing).  Below
        SLICE_MIN names this process mirrors them all, part by part; from
        SLICE_MIN, they are cut by name into one slice per worker process:
        forked processes examine and mirror every slice but the first, which
        this process does; their lines, sent as they come, are reported
        after its own, slice by slice, as one process would have.  Each
        slice only reads the folder's listing and writes files: renames,
        removals and subfolders are done before."""
        if self.stopping():
            return
        unexamined.sort()
        if len(steps) + len(unexamined) < SLICE_MIN:
            self.mirror_slice(frame, steps, unexamined, moved, checksum)
            return
        decided = [step.name for step in steps]  # (in name order, as _steps makes them)
        names = sorted(unexamined + decided)
        size = -(-len(names) // self.workers)
        firsts = names[size::size]  # the first name of each slice after the first

        def cut(items: list, keys: list) -> list:
            """items (sorted as their keys) in one run per slice."""
            ends = [bisect.bisect_left(keys, first) for first in firsts]
            return [items[start:end] for start, end in zip([0, *ends], [*ends, len(items)])]

        parts = list(zip(cut(steps, decided), cut(unexamined, unexamined)))
        self.explain(frame.rel, f"files in {len(parts)} slices of about {size:,} by name, each mirrored by a "
                                "process of its own")
        needed = frame.dst_mode is not None and frame.dst_mode | stat.S_IRWXU != frame.dst_mode
        if needed and not frame.writable and not self.prepare(frame):
            return  # reported: nothing can be written here
        self.do.stop_threads()  # no thread may hold a lock at the fork
        from multiprocessing import connection  # here: only passes that fan out need it
        import mmap
        stop = mmap.mmap(-1, 1)  # shared: 1 asks the slices to stop, 2 at once
        owner, forked = os.getpid(), []
        held, ended = {}, {}  # see take_in()
        try:
            for part_steps, part_names in parts[1:]:
                reader, writer = connection.Pipe(duplex=False)
                pid = os.fork()
                if pid == 0:  # a slice: never returns
                    code = 70
                    try:
                        reader.close()
                        for _, other in forked:
                            other.close()
                        code = self.serve_slice(writer, owner, stop, frame, part_steps, part_names, moved, checksum)
                    finally:
                        os._exit(code)
                writer.close()
                forked.append((pid, reader))
            # What the slices send is taken in between this process's own
            # parts, so that none waits long on a full pipe, and what a
            # slice that dies had done is still reported.
            self.between_parts = lambda: self.take_in(forked, held, ended)
            try:
                self.mirror_slice(frame, *parts[0], moved, checksum)
            finally:
                self.between_parts = None
            for pid, reader in forked:
                while reader not in ended:
                    if self.stopping():
                        stop[0] = 2 if self.abort() else max(stop[0], 1)
                    self.take_in([(pid, reader)], held, ended, timeout=0.2)
                events = held.pop(reader, [])
                for event in events:
                    self.report(event)
                message = ended[reader]
                if message is None:
                    errors, copied = _tally(events, self.result.counts)  # what it reported is what it did
                    self.result.errors += errors
                    self.result.bytes_copied += copied
                    frame.changed = True  # not known
                    self.error(frame.rel, f"worker process {pid} ended unexpectedly while it mirrored files of "
                                          "this folder; the next pass retries what it had not done")
                    continue
                self.add(message[2])
                frame.changed |= message[3]
        finally:
            stop[0] = max(stop[0], 1)
            for pid, reader in forked:
                reader.close()
                os.waitpid(pid, 0)

    def serve_slice(self, writer, owner: int, stop, frame, steps: list, unexamined: list, moved: dict,
                    checksum: bool) -> int:
        """A forked slice's life (see sync_slices): mirror it, sending its
        events as they come (("events", [Event]), at least every
        REPORT_EVERY while there are any, at most _FanOut.BATCH at once),
        and last ("end", [Event], _Share, whether the folder changed)."""
        events, sent = [], [time.monotonic()]

        def report(event):
            events.append(event)
            if len(events) >= _FanOut.BATCH or time.monotonic() - sent[0] >= REPORT_EVERY:
                writer.send(("events", events[:]))
                events.clear()
                sent[0] = time.monotonic()

        # Asked to stop by the owner only (it passes on its own requests):
        # the owner's own test would take this process for an orphan.
        work = self.worker_pass(report, should_stop=lambda: stop[0] != 0 or os.getppid() != owner,
                                abort=lambda: stop[0] == 2)
        work.mirror_slice(frame, steps, unexamined, moved, checksum)
        work.do.stop_threads()
        writer.send(("end", events, work.share(), frame.changed))
        return 0

    @staticmethod
    def take_in(forked: list, held: dict, ended: dict, timeout: float = 0.0) -> None:
        """Take in what the slices' processes (forked: (pid, reader)) have
        sent, waiting up to timeout for a first message: their events go to
        held (reader -> [Event] not reported yet), and ended gets each
        reader's last message, or None where its process died."""
        for _, reader in forked:
            try:
                while reader not in ended and reader.poll(timeout):
                    message = reader.recv()
                    held.setdefault(reader, []).extend(message[1])
                    if message[0] == "end":
                        ended[reader] = message
                    timeout = 0.0
            except (EOFError, OSError):  # it died
                ended[reader] = None

    def mirror_slice(self, frame, steps: list, unexamined: list, moved: dict, checksum: bool) -> None:
        """One slice of a big folder (see sync_slices): its files listed and
        not examined (unexamined, sorted) and its steps decided already (in
        name order), mirrored SLICE_CHUNK names at a time, in name order."""
        if not unexamined:
            self.mirror_names(frame, steps, [], moved, checksum)
            return
        decided, start = [step.name for step in steps], 0
        for first in range(0, len(unexamined), SLICE_CHUNK):
            if self.stopping():
                return
            if self.between_parts is not None:
                self.between_parts()
            after = first + SLICE_CHUNK  # the next part's first name; the last part takes every step left
            end = len(steps) if after >= len(unexamined) else bisect.bisect_left(decided, unexamined[after])
            self.mirror_names(frame, steps[start:end], unexamined[first:after], moved, checksum)
            start = end

    def mirror_names(self, frame, steps: list, unexamined: list, moved: dict, checksum: bool) -> None:
        """Part of a slice (see mirror_slice): examine its files listed and
        not examined yet, decide what they need, and carry that out together
        with its steps decided already, in name order."""
        src, dst, failed, dst_failed = {}, {}, [], []
        # Once per file, as _examine: kept lean.
        lstat, at, sd, dd, regular, make = os.lstat, _at, frame.sd, frame.dd, stat.S_ISREG, tuple.__new__
        for name in unexamined:
            try:
                path, fd = at(sd, name)
                st = lstat(path, dir_fd=fd)
            except FileNotFoundError:
                self.emit("vanished", _join(frame.rel, name))  # the next pass removes its copy
                continue
            except OSError as err:
                self.fail(_join(frame.rel, name), "read", err)
                continue
            if not regular(st.st_mode):
                self.emit("changed", _join(frame.rel, name), "no longer a regular file")
                continue
            try:
                path, fd = at(dd, name)
                have = lstat(path, dir_fd=fd)
            except FileNotFoundError:
                have = None  # copied (a fresh file; or one gone since it was listed)
            except OSError as err:
                self.fail(_join(frame.rel, name), "examine replica entry", err)
                continue
            if have is not None and not regular(have.st_mode):
                self.error(_join(frame.rel, name), "the replica file was replaced by another kind of entry "
                                                   "during the pass; the next pass mirrors it")
                continue
            src[name] = make(Entry, (FILE, st, None))
            if have is not None:
                dst[name] = make(Entry, (FILE, have, None))
        src_x = dst_x = _NO_XATTRS
        if self.keep.any_xattrs and unexamined:  # (none where there is no replica folder yet)
            src_x = _list_xattrs(frame.sd, src, self.keep, failed)
            dst_x = _list_xattrs(frame.dd, dst, self.keep, dst_failed, src)
        for name, err in failed:
            self.fail(_join(frame.rel, name), "read", err)
        for name, err in dst_failed:
            self.fail(_join(frame.rel, name), "examine replica entry", err)
        keep = {name for name, _ in failed + dst_failed}
        made = _steps(src, dst, keep, checksum, self.options.modify_window_ns, self.times, self.keep, src_x, dst_x)
        if self.options.explain:
            self.explain_steps(frame.rel, src, dst, keep, made)
        self.sync_files(frame, sorted(steps + made, key=lambda step: step.name), moved)

    def report_names(self, rel: str, plan: _Plan) -> None:
        """Report the source entries REPLICA's file system cannot hold."""
        for name, why in plan.refused:
            self.error(_join(rel, name), f"the replica's file system does not accept this name: {why}; "
                                         "exclude or rename it")
        for group in plan.clashes:
            for name in group:
                others = _and([_show(_join(rel, other)) for other in group if other != name])
                self.error(_join(rel, name), f"clashes with {others}: the replica's file system does not tell "
                                             "their names apart, so neither is mirrored; rename one (or exclude it)")
        if not self.options.links:
            self.result.counts["links left out"] += len(plan.unlinked)
        else:
            for name in plan.unlinked:
                self.error(_join(rel, name), "the replica's file system cannot store symbolic links.", "links")

    def restrict(self, frame: _Frame) -> bool:
        """A replica folder whose source became more private (0755 -> 0700)
        gets the more restrictive of both modes before anything is written
        into it or below it, so that nothing new is readable through it even
        for a moment (or after a kill); finish() sets its final mode.  False
        (reported) when that is impossible: the folder is then not entered."""
        if frame.dd is None or frame.dst_mode is None or not self.keep.modes:
            return True
        opened = frame.dst_mode & ~stat.S_IMODE(frame.src_st.st_mode) & 0o077
        if not opened:
            return True
        mode = frame.dst_mode & ~opened | stat.S_IRWXU
        try:
            self.do.restrict(frame.dd, mode)
        except OSError as err:
            self.fail(frame.rel, "restrict the permissions of the replica directory", err)
            return False
        frame.dst_mode, frame.writable = mode, True
        return True

    def finish(self, frame: _Frame) -> None:
        """Give a replica directory the source's owner, extended attributes,
        permission bits and mtime; report what changed in a folder that
        existed, its time aside (it changes with the folder's contents)."""
        try:
            if frame.dd is None:
                return
            src = frame.src_st
            set_times = frame.changed or frame.dst_mtime is None or \
                abs(frame.dst_mtime - self.times.fit(src.st_mtime_ns)) > self.options.modify_window_ns
            keep, have = self.keep, frame.dst_st
            wx, hx = frame.attrs.xattrs or _NO_XATTRS, frame.attrs.have_x
            try:
                if have is None and (keep.owner or keep.group or keep.any_xattrs or src.st_mode & _SET_ID):
                    have = os.stat(frame.dd)  # made by this pass
                    if keep.any_xattrs:
                        hx = _read_xattrs(frame.dd, keep, True)
                if have is not None:
                    attrs = _attrs(Entry(DIR, src), have, keep, wx, hx or _NO_XATTRS)
                else:
                    attrs = _Attrs(mode=stat.S_IMODE(src.st_mode) if keep.modes else None)
                if frame.dst_st is None and keep.umask is not None:  # made by this pass
                    attrs = attrs._replace(mode=keep.new_mode(src))
                self.do.finish_dir(frame.dd, src, frame.dst_mode, set_times, attrs)
            except OSError as err:
                self.fail(frame.rel, "set directory attributes and times", err)
                return
            if frame.changed or frame.dst_st is None:
                try:
                    self.do.flush_dir(frame.dd)
                except OSError as err:
                    self.fail(frame.rel, "flush the replica directory to the disk", err)
            if attrs.missed:
                self.missed(attrs.missed)
            if frame.dst_st is not None and attrs.letters:
                self.emit_attrs(frame.rel, DIR, attrs.letters, attrs)
            if set_times:
                self.note_time(frame.rel, src.st_mtime_ns)
        finally:
            self.close(frame)

    def missed(self, letters: str) -> None:
        """Count metadata that differs but this process may not set."""
        for letter in letters:
            self.result.counts["missed " + letter] += 1

    def emit_attrs(self, rel: str, kind: str, letters: str, attrs: _Attrs) -> None:
        uid, gid = attrs.uid, attrs.gid
        detail = _describe_attrs(letters, uid, gid, attrs.mode)
        self.result.counts["attrs"] += 1
        self.report(Event("attrs", rel, detail, "", _itemize_attrs(kind, letters)))

    def note_time(self, rel: str, mtime_ns: int) -> None:
        """Report a modification time the replica's file system cannot store
        (ext4 with 128-byte inodes stops in 2038): once, when it is set; the
        entry is then compared with what the replica keeps, not copied again."""
        if not self.times.keeps(mtime_ns):
            self.emit("clamped", rel, f"{_utc(mtime_ns)} is kept as {_utc(self.times.fit(mtime_ns))}")

    def prepare(self, frame: _Frame) -> bool:
        """Note that frame's replica directory is about to change; make it writable.

        Returns False (after reporting) when that is impossible.
        """
        frame.changed = True
        if frame.writable or frame.dd is None:
            return True
        try:
            frame.dst_mode = self.do.make_writable(frame.dd, frame.dst_mode)
        except OSError as err:
            self.fail(frame.rel, "make replica directory writable", err)
            return False
        frame.writable = True
        return True

    def recase(self, frame, pairs: list, dst: dict) -> dict:
        """Give replica entries the case of their source names (see
        _fit_names); returns {new name: old name} of those renamed, and
        updates dst to match."""
        done = {}
        for old, name in pairs:
            if not self.prepare(frame):
                break
            try:
                self.do.recase(frame.dd, old, name)
            except OSError as err:
                self.fail(_join(frame.rel, name), f"rename {_show(old)} to match the source's case", err)
                continue
            done[name] = old
            dst[name] = dst.pop(old)
            self.emit("move", _join(frame.rel, name), _join(frame.rel, old))
        return done

    def explain_steps(self, rel: str, wanted: dict, dst: dict, keep: set, steps: list) -> None:
        """-v: for each file and link, why it is copied, compared or left as it is."""
        decided = {step.name: step for step in steps}
        window = self.options.modify_window_ns
        for name in sorted(wanted):
            want, have, step = wanted[name], dst.get(name), decided.get(name)
            if want.kind == DIR or name in keep:
                continue
            why = _why(want, have, step, self.times, window)
            if why:
                self.explain(_join(rel, name), why)

    def sync_moves(self, frame, moves: list, wanted: dict, dst: dict) -> dict:
        """Rename replica entries that the source renamed within this directory,
        instead of copying them again and deleting the old names.

        Updates dst to match; returns {new name: old name} of what was
        moved: a directory (a dry run must still read it under its old name,
        and every run must compare the files inside it by their bytes) or a
        file (its bytes were compared just now).
        """
        moved = {}
        for old, name in moves:
            rel = _join(frame.rel, name)
            if dst[old].kind == DIR and (dst[old].st.st_dev, dst[old].st.st_ino) in self.protected:
                continue  # a root seen through a mount: remove() reports it and leaves it
            self.explain(rel, f"renamed from {_token(_join(frame.rel, old))}? the only entries of "
                              f"this folder with its {'size and ' * (wanted[name].kind == FILE)}mtime")
            if wanted[name].kind == FILE:
                # Equal size and mtime across two names is no proof: compare the
                # bytes (two reads still spare the write of a new copy).
                try:
                    if not _same_contents(frame.sd, frame.dd, name, old, self.abort):
                        self.explain(rel, "not a rename: the bytes differ; copied as a new file")
                        continue
                except (OSError, _Aborted) as err:
                    self.explain(rel, f"not a rename: cannot compare the bytes ({_reason(err)})")
                    continue  # not proven equal: copy it as a new file instead
            if not self.prepare(frame):
                return moved
            try:
                self.do.rename(frame.dd, old, name)
            except OSError:
                continue  # e.g. a mount point in between: copy and delete instead
            moved[name] = old
            dst[name] = dst.pop(old)
            self.emit("move", rel, _join(frame.rel, old))
        return moved

    def sync_file(self, frame, step: _Step, pending: list) -> None:
        """Queue one file step on pending: a copy or compare (in a thread
        when the file is large), or a change of metadata, done by settle()."""
        rel = _join(frame.rel, step.name)
        if step.kind == "attrs":  # set when its turn comes in settle(), in name order
            job = _Done(_SAME)
        elif not self.prepare(frame):
            return
        else:
            job = self.do.submit(step.want.st.st_size >= PARALLEL_MIN_SIZE, self.do.file_work,
                                 frame.sd, frame.dd, step.name, step, rel)
        pending.append((step, rel, job))
        if len(pending) >= PENDING_LIMIT:
            self.settle(frame, pending)
            pending.clear()
        elif time.monotonic() >= self.report_by:
            self.settle_finished(frame, pending)

    def settle_finished(self, frame, pending: list) -> None:
        """Report the queued file work that is finished, up to the first that
        is not; the rest stays queued."""
        finished = 0
        for _, _, job in pending:
            if not job.done():
                break
            finished += 1
        self.settle(frame, pending[:finished])
        del pending[:finished]
        if self.between_parts is not None:  # (a part may be all copies: take in here too)
            self.between_parts()
        self.report_by = time.monotonic() + REPORT_EVERY

    def settle(self, frame, pending: list) -> None:
        """Wait for this directory's queued file work, reporting it in name order."""
        for step, rel, job in pending:
            outcome = job.result()
            if outcome.result == "same":
                if step.attrs.letters:
                    self.sync_attrs(frame, step.name, rel, step.want, step.have, step.attrs)
                continue
            self.report_copy(frame.rel, step.name, step.want.st.st_mtime_ns, step.have is None, outcome)

    def report_copy(self, folder: str, name: str, mtime_ns: int, new: bool, outcome: _Outcome) -> None:
        """Report what the executor did to a file that needed copying."""
        rel = _join(folder, name)
        if outcome.trash:
            self.emit("trash", rel, outcome.trash)
        result = outcome.result
        if result == "copied":
            self.result.bytes_copied += outcome.copied
            self.emit("copy" if new else "update", rel, str(outcome.copied))
            if not outcome.stable:
                self.emit("changed", rel)
            self.note_time(rel, mtime_ns)
        elif result == "planned":  # a dry run's copy
            self.emit("copy" if new else "update", rel, str(outcome.copied))
        elif result == "vanished":
            self.emit("vanished", rel)
        elif result == "not regular":
            if new:  # nothing there in the replica: as a later pass would leave it
                self.emit("skip", rel, "no longer a regular file")
            else:  # the replica still holds the old file: the next pass settles it
                self.emit("changed", rel, "no longer a regular file")
        elif result == "failed":
            err = outcome.error
            if (outcome.what == "copy file" and err.errno in _NO_SPACE and self.retry_later
                    and len(self.retries) < RETRY_LIMIT):
                # Perhaps full only while other copies ran: try once more
                # at the end of the pass, when none does (retry_copies).
                self.retries.append((folder, name, new, err))
                return
            self.fail(rel, outcome.what, err)
        # "stopped": the pass is ending; the next one does it

    # -- hard links

    def link_groups(self) -> None:
        """The hard-link phase: each group of source names that share one
        file (found by the walk, in whichever process) gets one replica
        file.  The group's first name (by folder, then name: the same one every
        pass) is brought up to date like any file; the others are made
        links to it.  It runs after the walk, in the main process, so a
        group may span the subtrees of several workers; a folder changed
        here gets its mode and mtime back.  Memory: one record per name of
        a file with several, nothing per other file."""
        groups = {}
        for dev, ino, folder, name in self.links:
            groups.setdefault((dev, ino), []).append((folder, name))
        self.links = []
        for key, members in sorted(groups.items(), key=lambda item: min(item[1])):
            if self.stopping():
                return
            members.sort()
            folder, name = members[0]
            try:
                sd, dd = self.open_pair(folder, self.options.dry_run)
            except OSError as err:
                self.fail(_join(folder, name), "open its folder", err)
                continue
            try:
                leader = self.settle_leader(sd, dd, folder, name, key, len(members))
                if leader is not None:
                    for member in members[1:]:
                        if self.stopping():
                            break
                        self.link_member(dd, name, _join(folder, name), leader, key, *member)
            finally:
                _close_dir(sd)
                if dd is not None:
                    _close_dir(dd)

    def settle_leader(self, sd, dd, folder, name, key, size):
        """Bring a group's first name up to date in the replica, as the
        walk would a lone file; returns (the replica file's identity before,
        after): None for one not made, None overall when it failed."""
        rel = _join(folder, name)
        st = self.still_in_group(sd, name, rel, key)
        if st is None:
            return None
        keep = self.keep
        want = Entry(FILE, st)
        wx = _read_xattrs(_xattr_path(sd, name), keep) if keep.any_xattrs else _NO_XATTRS
        have = hx = None
        if dd is not None:  # (None: a folder a dry run would make)
            replica_path, replica_fd = _at(dd, name)
            try:
                have_st = os.stat(replica_path, dir_fd=replica_fd, follow_symlinks=False)
                have = Entry(_KINDS.get(stat.S_IFMT(have_st.st_mode), SPECIAL), have_st)
                hx = _read_xattrs(_xattr_path(dd, name), keep) if keep.any_xattrs and have.kind == FILE else None
            except FileNotFoundError:
                pass
        if have is not None and have.kind != FILE:
            if not self.options.dry_run:
                return None  # the walk could not remove it, and said so
            have = None  # the walk would have removed it
        before = (have.st.st_dev, have.st.st_ino) if have is not None else None
        steps = _steps({name: want}, {name: have} if have is not None else {}, set(),
                       self.options.checksum, self.options.modify_window_ns, self.times,
                       keep._replace(hard_links=False), {name: wx}, {name: hx or _NO_XATTRS})
        for step in steps:
            if step.attrs.missed:
                self.missed(step.attrs.missed)
            if step.kind == "attrs":
                if not step.attrs.letters:
                    continue
                with self.do.into(sd, dd):
                    failure = self.do.set_attrs(sd, dd, name, want, have, step.attrs, size)
                if failure is not None:
                    self.fail(rel, *failure)
                    return None
                self.emit_attrs(rel, FILE, step.attrs.letters, step.attrs)
                continue
            with self.do.into(sd, dd):
                outcome = self.do.file_work(sd, dd, name, step, rel)
                if outcome.result == "same" and step.attrs.letters:
                    failure = self.do.set_attrs(sd, dd, name, want, have, step.attrs, size)
                    if failure is not None:
                        self.fail(rel, *failure)
                        return None
                    self.emit_attrs(rel, FILE, step.attrs.letters, step.attrs)
            if outcome.result != "same":
                self.report_copy(folder, name, st.st_mtime_ns, have is None, outcome)
            if outcome.result == "planned":  # a dry run: the real pass makes a new file
                return before, None
            if outcome.result not in ("same", "copied"):
                return None
        try:
            now = os.stat(replica_path, dir_fd=replica_fd, follow_symlinks=False)
        except FileNotFoundError:
            self.error(rel, "the replica file vanished before its other names could be linked to it")
            return None
        return before, (now.st_dev, now.st_ino)

    def still_in_group(self, sd, name, rel, key) -> Optional[os.stat_result]:
        """The source file NAME's stat, while it is still a name of the
        group's file (key); else reported, and None (the next pass settles it)."""
        path, fd = _at(sd, name)
        try:
            st = os.stat(path, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            self.emit("vanished", rel)
            return None
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != key:
            self.emit("changed", rel, "linked differently")
            return None
        return st

    def link_member(self, leader_dd, leader_name, leader_rel, leader, key, folder, name) -> None:
        """Make one more name of a group a link to the group's replica file."""
        rel = _join(folder, name)
        before, after = leader
        try:
            sd, dd = self.open_pair(folder, self.options.dry_run)
        except OSError as err:
            self.fail(rel, "open its folder", err)
            return
        try:
            if self.still_in_group(sd, name, rel, key) is None:
                return
            have = None
            if dd is not None:  # (None: a folder a dry run would make)
                path, fd = _at(dd, name)
                try:
                    have = os.stat(path, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
            if have is not None and self.options.dry_run and not stat.S_ISREG(have.st_mode):
                have = None  # the walk would have removed it
            if have is not None and after is not None and (have.st_dev, have.st_ino) == after:
                return  # already a name of that file
            with self.do.into(sd, dd):
                if have is not None and self.do.trash is not None and (have.st_dev, have.st_ino) != before:
                    try:
                        where = self.do.keep_in_trash(dd, name, rel)
                    except OSError as err:
                        self.fail(rel, "move the old version to the trash", err)
                        return
                    self.emit("trash", rel, where)
                try:
                    self.do.hard_link(leader_dd, leader_name, dd, name)
                except OSError as err:
                    self.fail(rel, "create hard link", err)
                    return
            self.emit("hardlink", rel, leader_rel)
        except OSError as err:
            self.fail(rel, "create hard link", err)
        finally:
            _close_dir(sd)
            if dd is not None:
                _close_dir(dd)

    def retry_copies(self) -> None:
        """Copy once more, one at a time, the files that failed for lack of
        space while other copies (threads, worker processes) were writing:
        every file that fits on its own lands in this pass.  A file for which
        the replica has too little room now is not tried again."""
        self.retry_later = False
        for folder, name, new, err in self.retries:
            rel = _join(folder, name)
            if self.stopping():
                self.fail(rel, "copy file", err)
                continue
            try:
                sd, dd = self.open_pair(folder)
            except OSError:
                self.fail(rel, "copy file", err)
                continue
            try:
                path, fd = _at(sd, name)
                try:
                    st = os.stat(path, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:  # gone since: as if it had vanished before its copy
                    self.emit("vanished", rel)
                    continue
                if not _has_room(dd, st):
                    self.fail(rel, "copy file", err)
                    continue
                attrs = _attrs(Entry(FILE, st), None, self.keep, _read_xattrs(_xattr_path(sd, name), self.keep)
                               if self.keep.any_xattrs else _NO_XATTRS)
                self.report_copy(folder, name, st.st_mtime_ns, new, self.do.copy_into(sd, dd, name, attrs))
            except OSError as again:
                self.fail(rel, "copy file", again)
            finally:
                _close_dir(sd)
                _close_dir(dd)
        self.retries = []

    def open_pair(self, folder: str, planned: bool = False) -> tuple:
        """Open a directory pair below the roots by its relative path, one
        component at a time, never following a link.  planned: a dry run's
        replica folder that is still to be made (missing, or a file or link
        the walk would replace) is None."""
        handles = []
        try:
            for root in (self.roots.source, self.roots.replica):
                if root is None and planned:
                    handles.append(None)
                    continue
                d = _dup(root)
                handles.append(d)
                for part in folder.split("/") if folder else []:
                    try:
                        inner = _open_dir(d, part)
                    except OSError as err:
                        # A dry run's folder still to be made: missing, or
                        # a file or link the walk would replace.
                        if not planned or root is self.roots.source or \
                                err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            raise
                        inner = None
                    _close_dir(handles.pop())
                    d = inner
                    handles.append(d)
                    if d is None:
                        break
        except BaseException:
            for d in handles:
                if d is not None:
                    _close_dir(d)
            raise
        return tuple(handles)

    def sync_attrs(self, frame, name, rel, want: Entry, have: Entry, attrs: _Attrs, links: int = 1) -> None:
        """Contents are current: give the replica entry this metadata in place."""
        if have.kind == FILE and have.st.st_nlink > links and not self.prepare(frame):
            return  # replaced rather than changed (see _Changes.set_attrs): needs the folder writable
        failure = self.do.set_attrs(frame.sd, frame.dd, name, want, have, attrs, links)
        if failure is not None:
            self.fail(rel, *failure)
            return
        self.emit_attrs(rel, have.kind, attrs.letters, attrs)

    def sync_link(self, frame, step: _Step) -> None:
        name, want, have = step.name, step.want, step.have
        rel = _join(frame.rel, name)
        if not self.prepare(frame):
            return
        if have is not None and self.do.trash is not None and not self.trash(frame, name, rel, have, keep=True):
            return
        try:
            self.do.make_link(frame.dd, name, want, step.attrs)
        except OSError as err:
            self.fail(rel, "create link", err)
            return
        self.emit("link" if have is None else "relink", rel, want.target)

    def sync_dir(self, frame, step: _Step, moved_from: Optional[str], renamed: bool = False):
        """Create or enter a replica folder; return its frame (None: not
        walked).  moved_from: its name before this pass renamed it;
        renamed: a rename matched by signature, so its files are compared
        by their bytes."""
        name, want, have = step.name, step.want, step.have
        rel = _join(frame.rel, name)
        if self.reached_again(rel, want) or have is not None and self.reached_again(rel, have):
            return None
        if have is None:
            if not self.prepare(frame):
                return None
            try:
                self.do.mkdir(frame.dd, name)
            except OSError as err:
                self.fail(rel, "create directory", err)
                return None
            self.emit("mkdir", rel)
        exists, dst_name = self.do.child_replica(frame.dd, name, have, moved_from)
        child = _Frame(frame, name, rel, want.st, have.st if have else None, exists)
        child.dst_name = dst_name
        child.verify = renamed or frame.verify
        return child

    def remove(self, frame, name, have: Entry) -> bool:
        """Remove one replica entry (a directory with all it holds), or move
        it to the trash."""
        rel = _join(frame.rel, name)
        if self.reached_again(rel, have):
            return False
        if not self.prepare(frame):
            return False
        temp = _is_temp(name, have)
        if self.do.trash is not None and not temp:
            if not self.may_delete(rel) or not self.trash(frame, name, rel, have, keep=False):
                return False
            self.deleted += 1
            return True
        if have.kind == DIR:
            return self.remove_tree(frame.dd, name, rel)
        if not temp and not self.may_delete(rel):
            return False
        try:
            self.do.unlink(frame.dd, name)
        except OSError as err:
            self.fail(rel, "remove", err)
            return False
        self.emit_removed(name, rel, have)
        return True

    def trash(self, frame, name, rel, have: Entry, keep: bool) -> bool:
        """Move replica entry NAME to the trash, reported as its removal
        (keep: link it instead, for a link about to be replaced)."""
        try:
            if keep:
                where = self.do.keep_in_trash(frame.dd, name, rel)
            else:
                where = self.do.take_to_trash(frame.dd, name, rel, have)
        except OSError as err:
            self.fail(rel, "move the old version to the trash", err)
            return False
        if keep:
            self.emit("trash", rel, where)
        elif have.kind == DIR:
            self.emit("rmdir", rel, trash=where)
        else:
            self.emit("remove", rel, have.kind, trash=where)
        return True

    def prune_trash(self) -> None:
        """Remove the trash folders of passes older than trash_keep_days.

        A folder is old when the time in its name, its own mtime and the
        mtimes of the files in it all are: a pass made while the clock was
        wrong (a machine without a real-time clock, before NTP) names its
        folder in the past, but keeps files written later.  The newest pass
        folder is never pruned."""
        limit = time.time() - self.options.trash_keep_days * 86400
        d = self.roots.trash
        try:
            entries = _scan(d)[0]
        except OSError as err:
            self.fail("", f"list TRASH {self.options.trash!r}", err)
            return
        stamps = {}
        for name, entry in entries.items():
            match = _TRASH_STAMP.match(name)
            if match is None or entry.kind != DIR:
                continue  # not a pass folder: never touched
            try:
                named = time.mktime(time.strptime(match[1], "%Y-%m-%d_%H%M%S"))
            except (ValueError, OverflowError):
                continue  # an impossible date (2026-02-30): not ours
            stamps[name] = max(named, entry.st.st_mtime)
        newest = max(stamps, key=lambda name: (stamps[name], name), default=None)
        for name in sorted(stamps):
            if name == newest or stamps[name] >= limit or self.stopping():
                continue
            try:
                if _holds_newer(d, name, limit):
                    continue
            except OSError as err:
                self.fail(name, "list trash folder", err)
                continue
            if self.do.remove_trash_folder(self.remove_tree, name):
                self.emit("prune", name)

    def emit_removed(self, name, rel, entry: Entry) -> None:
        if _is_temp(name, entry):
            self.emit("temp", rel)
        else:
            self.deleted += 1
            self.emit("remove", rel, entry.kind)

    def excluded_here(self, rel: str, name: str, entry: Entry) -> bool:
        """A replica entry inside a folder being removed that the rules
        exclude: it stays (unless delete_excluded), and so does its folder."""
        rules = self.options.excludes
        return bool(rules) and not self.options.delete_excluded and rules.match(rel, name, entry.kind == DIR)

    def remove_tree(self, parent, name, rel, accounting=True) -> bool:
        """Remove a replica directory and everything in it, deepest first.

        Iterative and descriptor-based like shutil.rmtree's safe variant: every
        directory is opened with O_NOFOLLOW relative to its parent, so a link
        swapped in cannot send the deletion elsewhere, and a folder that is a
        root seen again through a mount is never entered.  accounting=False
        (pruning the trash) neither reports nor counts what goes.
        """
        stack = []  # _Doomed folders, outermost first; each open

        def descend(p, n, r) -> bool:
            try:
                d = self.do.open_doomed(p, n)
            except OSError as err:
                self.fail(r, "list replica directory", err)
                return False
            try:
                entries, failed = _scan(d)
            except OSError as err:
                _close_dir(d)
                self.fail(r, "list replica directory", err)
                return False
            for bad, err in failed:
                self.fail(_join(r, bad), "examine replica entry", err)
            stack.append(_Doomed(p, n, r, d, sorted(entries.items(), reverse=True), not failed))
            return True

        if not descend(parent, name, rel):
            return False
        try:
            while stack:
                level = stack[-1]
                if level.remaining and not self.stopping():
                    child, entry = level.remaining.pop()
                    child_rel = _join(level.rel, child)
                    if accounting and self.excluded_here(child_rel, child, entry):
                        level.emptied = False  # left alone, as excluded entries are: so is its folder
                        continue
                    if entry.kind == DIR:
                        if self.reached_again(child_rel, entry) or not descend(level.handle, child, child_rel):
                            level.emptied = False
                        continue
                    if accounting and not _is_temp(child, entry) and not self.may_delete(child_rel):
                        level.emptied = False
                        continue
                    try:
                        self.do.unlink(level.handle, child)
                    except OSError as err:
                        self.fail(child_rel, "remove", err)
                        level.emptied = False
                        continue
                    if accounting:
                        self.emit_removed(child, child_rel, entry)
                    continue
                stack.pop()
                _close_dir(level.handle)
                ok = level.emptied and not level.remaining and (not accounting or self.may_delete(level.rel))
                if ok:
                    try:
                        self.do.rmdir(level.parent, level.name)
                    except OSError as err:
                        self.fail(level.rel, "remove directory", err)
                        ok = False
                if ok and accounting:
                    self.deleted += 1
                    self.emit("rmdir", level.rel)
                if not ok and stack:
                    stack[-1].emptied = False  # a folder that stays keeps its parent
                if not stack:
                    return ok
        finally:
            for level in stack:
                _close_dir(level.handle)
        return False


# ------------------------------------------------------------------ fan-out --


class _Share(NamedTuple):
    """What one worker process adds to the pass's result."""

    counts: dict
    bytes_copied: int
    errors: int
    interrupted: bool
    refused: bool
    deleted: int
    retries: list
    links: list


def _tally(events: list, counts: Counter) -> tuple[int, int]:
    """Count events in counts as emit() and error() counted them in the
    process that sent them; returns (errors, bytes copied) among them.  For
    a process that died, whose share of the pass never came."""
    errors = copied = 0
    for event in events:
        if type(event) is not Event:
            continue  # a _Later: where a folder handed over goes
        action = event.action
        if action == "debug":
            continue  # (explain() reports without counting)
        counts[action] += 1
        if event.trash:
            counts["trash"] += 1
        if action == "error":
            errors += 1
        elif action in ("copy", "update") and event.detail.isdigit():
            copied += int(event.detail)
    return errors, copied


class _Worker:
    """The parent's view of one worker process."""

    def __init__(self, pid: int, conn, slot: int):
        self.pid, self.conn = pid, conn
        self.slot = slot  # its place in _FanOut.walking
        self.tasks = deque()  # task indexes handed and not finished, in the order it walks them
        self.ranges = deque()  # the last index of each range handed and not finished
        self.told_done = False  # it was told there are no more
        self.finished = False  # its share has arrived
        self.checked = 0  # source entries it has examined
        # Its events so far, counted (see _tally), for the pass's result if
        # it dies before its share comes: counts, errors, bytes copied.
        self.counts, self.errors, self.bytes_copied = Counter(), 0, 0


class _Order:
    """The events of a split walk, reported in the order one process walking
    depth first gives.  Each task (and the main process, as task MAIN) has a
    stream of items, reported in turn: an Event; ("task", index), where
    that task's whole stream goes (the main process's, for the subtrees it
    handed out); a _Later, where the stream of the folder a worker handed
    over goes; ("finish", frame), a folder the main process entered,
    finished once everything before it in its stream is reported.  Items of
    a task not done wait until it is."""

    MAIN = -1

    def __init__(self, walk: _Walk, sequence: list):
        self.walk = walk
        self.report = walk.report  # the walk's own (a task walked here reports through add())
        self.held = {self.MAIN: deque(sequence)}  # task index -> its items not reported yet
        self.done = {self.MAIN}  # tasks whose stream is complete
        self.reporting = [self.MAIN]  # the streams being reported, each inside the one before
        self.later = {}  # _Later -> the task index of the folder handed over

    @staticmethod
    def sequence(root: _Frame, held: dict, below: dict, tasks: list) -> list:
        """The main process's stream: its folders' held events, the tasks
        (subtrees) below them, and their finish, depth first."""
        index = {id(task): i for i, task in enumerate(tasks)}
        sequence, stack = [], [root]
        while stack:  # depth first: a folder, what is below it, its finish
            frame = stack.pop()
            if isinstance(frame, tuple):
                sequence.append(frame)
                continue
            sequence.extend(held.pop(frame))
            if below[frame] is not None:  # entered: finished after what is below it
                stack.append(("finish", frame))
            stack.extend(("task", index[id(child)]) if id(child) in index else child
                         for child in reversed(below[frame] or ()))
        return sequence

    def add(self, task: int, items: list, finished: bool) -> None:
        """Items of a task; finished: its stream is complete."""
        self.held.setdefault(task, deque()).extend(items)
        if finished:
            self.done.add(task)
        self.advance()

    def advance(self) -> None:
        """Report what can be reported: up to the first task not done."""
        walk, report, reporting = self.walk, self.report, self.reporting
        while reporting:
            task = reporting[-1]
            items = self.held.get(task)
            while items:
                item = items.popleft()  # first: a report that raises must not repeat it
                kind = type(item)
                if kind is Event:
                    report(item)
                elif kind is _Later:
                    reporting.append(self.later.pop(item))
                    break
                elif item[0] == "task":
                    reporting.append(item[1])
                    break
                else:
                    reported, walk.report = walk.report, report
                    try:
                        walk.finish(item[1])
                    finally:
                        walk.report = reported
            else:
                if task not in self.done:
                    return
                reporting.pop()
                self.held.pop(task, None)

    def flush(self) -> None:
        """The end of the walk: every task is done.  A stream whose place
        was never reached (its folder was handed over by a worker that
        then died) comes last."""
        self.done.update(self.held)
        self.advance()
        for task in sorted(self.held):
            self.reporting.append(task)
            self.advance()


class _Donor:
    """A worker's side of handing folders over: the parent says, through a
    shared number (_FanOut.hungry), that a worker is idle (a new number for
    each time it asks again, 0 for not); the walk then offers one folder
    (see _Walk.offer) once per request, sent to the parent at once and
    replaced in the walk's stack by the _Later that marks where its events
    go."""

    def __init__(self, conn, hungry, slot: int):
        self.conn, self.hungry, self.slot = conn, hungry, slot
        self.answered = 0  # the request last answered
        self.given = 0  # folders handed over so far

    def wanted(self) -> bool:
        asked = struct.unpack_from("I", self.hungry)[0]
        return asked != 0 and asked != self.answered

    def give(self, handoff: _Handoff) -> _Later:
        self.answered = struct.unpack_from("I", self.hungry)[0]
        later = _Later(self.slot, self.given)
        self.given += 1
        self.conn.send(("give", later, handoff))
        return later


class _FanOut:
    """Subtrees (frames whose parents the main process holds open) walked by
    forked worker processes, handed out in ranges of consecutive indexes.
    Each worker walks with a fresh pass of its own and streams its events
    back over a multiprocessing Pipe; the parent reports them through an
    _Order, as one process would have, and adds up the workers' shares.
    While a worker is idle and nothing is left to hand out, the others hand
    over folders they have listed but not entered (_Donor), which become
    tasks too, so that no tree shape leaves one worker walking alone.

    Messages, worker to parent: ("batch", [(task, [Event])], task, [Event],
    checked): the tasks finished since the last message with their events
    not sent yet, then the task being walked (-1: none) with its events so
    far; ("give", _Later, _Handoff): a folder handed over; and last
    ("share", _Share).  Parent to worker: a range (start, stop, handoffs)
    of task indexes, with the _Handoff of each task made after the fork, or
    None for "no more".
    """

    BATCH = 256  # events per message, at most
    FLUSH = 0.05  # seconds a worker keeps finished tasks before it says so
    # Ranges a worker holds at once: the next waits in its pipe, so it never
    # idles for the parent's answer (on a tree of 2,000 top folders of 10
    # files each, holding two tasks instead of one took a fifth off the
    # initial copy's time).
    AHEAD = 2
    # A range is a quarter of a worker's fair share of what is left, so
    # ranges shrink as the end nears and the workers finish together; at most
    # RANGE tasks, so a worker that dies takes little with it.  Ranges, not
    # single tasks: on a tree of 10,000 top folders of 10 files, a message
    # each way per task took a third of the workers' time in pipe writes and
    # the parent's wake-ups.
    RANGE = 64

    def __init__(self, main: _Walk, tasks: list, order: _Order):
        self.main, self.tasks, self.order = main, tasks, order
        self.forked = len(tasks)  # tasks the workers know from the fork (the rest are handoffs)
        # Shared with the workers: 1 asks them to stop after the current
        # item, 2 to stop at once (abandoning a copy mid-file).
        import mmap  # here: only passes that fan out need it
        self.stop_flag = mmap.mmap(-1, 1)
        # Also shared: the task each worker is walking, in a slot of 8 bytes
        # per worker, so that the parent knows which one a worker that dies
        # was walking without a message per task.
        self.walking = mmap.mmap(-1, 8 * main.workers)
        self.walking.write(b"\xff" * len(self.walking))  # -1: none yet
        # And the request for a folder to hand over (see _Donor): 0 none.
        self.hungry = mmap.mmap(-1, 4)
        self.asked = 0  # the number of the last request made
        self.asking = 0  # the request in force (0: none)
        self.given = False  # a folder was handed over since it was made
        self.connection = None  # the multiprocessing.connection module, once run() imports it
        self.workers = []
        self.handed = 0  # tasks handed out so far

    def run(self) -> None:
        # Imported here: it takes 25 ms, a tenth of the start-up of a small
        # pass, and only passes that fan out need it.
        from multiprocessing import connection
        self.connection = connection
        try:
            for _ in range(self.main.workers):  # all: those with no task yet get handoffs
                self.start_worker()
            self.collect()
        finally:
            self.stop_flag[0] = max(self.stop_flag[0], 1)
            for w in self.workers:
                w.conn.close()
                os.waitpid(w.pid, 0)

    def start_worker(self) -> None:
        parent_end, child_end = self.connection.Pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = 70
            try:
                for w in self.workers:
                    w.conn.close()
                parent_end.close()
                code = self.serve(child_end, parent, len(self.workers))
            finally:
                os._exit(code)
        child_end.close()
        self.workers.append(_Worker(pid, parent_end, len(self.workers)))

    def serve(self, conn, parent: int, slot: int) -> int:
        """A worker's life: walk each range of tasks the parent sends, stream
        the events back, and end with this worker's share of the pass."""
        main, flag = self.main, self.stop_flag
        finished, events = [], []  # see the class's docstring
        held, sent = [0], [time.monotonic()]  # events not sent; when the last message went

        def send(task):
            conn.send(("batch", finished[:], task, events[:], work.result.checked))
            finished.clear()
            events.clear()
            held[0], sent[0] = 0, time.monotonic()

        def report(event):
            events.append(event)
            held[0] += 1
            if held[0] >= self.BATCH:
                send(current)

        work = main.worker_pass(
            report,
            should_stop=lambda: flag[0] != 0 or os.getppid() != parent or main.should_stop(),
            abort=lambda: flag[0] == 2 or main.abort())
        work.donor = _Donor(conn, self.hungry, slot)
        while True:
            try:
                handed = conn.recv()
            except EOFError:  # the parent has gone
                break
            if handed is None:
                break
            start, stop, handoffs = handed
            for current in range(start, stop):
                struct.pack_into("q", self.walking, 8 * slot, current)
                work.walk_task(self.tasks[current] if current < self.forked else handoffs[current])
                finished.append((current, events[:]))
                events.clear()
                if held[0] >= self.BATCH or time.monotonic() - sent[0] >= self.FLUSH:
                    send(-1)
            send(-1)
        conn.send(("share", work.share()))
        return 0

    def hand_out(self, w: _Worker) -> None:
        """Give w the next range of tasks (there are some left).  A folder
        handed over goes alone, in a range of its own: its _Handoff travels
        with it, and the message stays small."""
        left = len(self.tasks) - self.handed
        size = max(1, min(self.RANGE, left // (4 * len(self.workers))))
        start = self.handed
        stop = min(start + size, self.forked) if start < self.forked else start + 1
        handoffs = {i: self.tasks[i] for i in range(max(start, self.forked), stop)}
        try:
            w.conn.send((start, stop, handoffs))
        except OSError:  # it has just died: its end of the pipe says so
            return
        w.tasks.extend(range(start, stop))
        w.ranges.append(stop - 1)
        self.handed = stop

    def feed(self, alive: dict) -> None:
        """Hand out what is left; where a worker is then idle, ask the others
        for folders to hand over; once all are idle, tell them to end."""
        # A range to each before a second to any.  A folder handed over goes
        # only to a worker with no range left, which is waiting for one: a
        # message the worker is not reading could fill the pipe while it
        # writes to this process, which then would not be reading either.
        for ahead in range(1, self.AHEAD + 1):
            for w in alive.values():
                if not w.told_done and len(w.ranges) < ahead and self.handed < len(self.tasks) \
                        and (self.handed < self.forked or not w.ranges):
                    self.hand_out(w)
        idle = [w for w in alive.values() if not w.tasks and not w.told_done]
        if not idle:
            self.ask(0)
        elif not any(w.tasks for w in alive.values()):  # nothing is walked anywhere: the end
            self.ask(0)
            for w in idle:
                try:
                    w.conn.send(None)
                except OSError:
                    pass  # it has just died
                w.told_done = True
        elif self.given or not self.asking:  # ask (again)
            self.ask(self.asked + 1)

    def ask(self, number: int) -> None:
        """Set the request for a folder to hand over (0: none)."""
        if number:
            self.asked = number
        self.asking, self.given = number, False
        struct.pack_into("I", self.hungry, 0, number)

    @staticmethod
    def count(w: _Worker, events: list) -> None:
        errors, copied = _tally(events, w.counts)
        w.errors += errors
        w.bytes_copied += copied

    def collect(self) -> None:
        """The parent's side: hand out tasks, merge what comes back."""
        main, order = self.main, self.order
        alive = {w.conn: w for w in self.workers}
        self.feed(alive)
        while alive:
            for conn in self.connection.wait(list(alive), timeout=0.2):
                w = alive[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the worker has ended
                    del alive[conn]
                    if not w.finished:
                        main.result.counts.update(w.counts)  # what it reported is what it did
                        main.result.errors += w.errors
                        main.result.bytes_copied += w.bytes_copied
                        main.error("", f"worker process {w.pid} ended unexpectedly; "
                                       "the next pass retries what it had not done")
                        # Lost: the task it was walking (it may be what killed
                        # it).  Those it had not reported are walked here.
                        walking = struct.unpack_from("q", self.walking, 8 * w.slot)[0]
                        if walking in w.tasks:
                            order.add(walking, [], True)
                        w.tasks.clear()
                    continue
                kind = message[0]
                if kind == "share":
                    main.add(message[1])
                    w.finished = True
                    continue
                if kind == "give":
                    order.later[message[1]] = len(self.tasks)
                    self.tasks.append(message[2])
                    self.given = True
                    continue
                _, finished, task, events, w.checked = message
                for index, held in finished:
                    self.count(w, held)
                    order.add(index, held, True)
                    w.tasks.popleft()  # it walks its tasks in the order handed
                    if index == w.ranges[0]:
                        w.ranges.popleft()
                if events:
                    self.count(w, events)
                    order.add(task, events, False)
                if main.progress is not None:
                    main.progress(main.result.checked + sum(x.checked for x in self.workers))
            if main.stopping():
                self.stop_flag[0] = 2 if main.abort() else max(self.stop_flag[0], 1)
            self.feed(alive)
        main.result.checked += sum(w.checked for w in self.workers)


# ------------------------------------------------------------ run_pass, the loop --


def run_pass(source: str, replica: str, options: Options = None,
             report: Callable[[Event], None] = _ignore,
             should_stop: Callable[[], bool] = lambda: False,
             progress: Optional[Callable[[int], None]] = None,
             abort: Callable[[], bool] = lambda: False) -> PassResult:
    """Make REPLICA an exact mirror of SOURCE, once.

    Every action is passed to ``report`` as an Event the moment it is done.
    ``should_stop`` is polled between items; when it returns True the pass
    ends after the current item and the result says it was interrupted.
    ``abort`` is polled during copies too: when it returns True the file
    being copied is abandoned (its temporary file removed) and the pass ends
    at once.  ``progress``, if given, is called now and then with the number
    of source entries checked so far (see count_entries for the total).  Item
    failures and refusals are counted in the result, never raised.  Passes
    of one run should share a Mirror (run_periodically does): it remembers
    what a REPLICA that went away looked like.
    """
    return Mirror(source, replica, options).run_pass(report, should_stop, progress, abort)


def _count_deletions(roots: "_Roots", options: Options, should_stop, work: "_Walk") -> Optional[int]:
    """With max_delete, how many entries the pass would delete: counted by a
    dry run first (knowing REPLICA as work does), so that a pass over the
    limit changes nothing at all."""
    if options.max_delete is None or options.dry_run:
        return None
    with work.phase("count of deletions (--max-delete)"):
        probe = _Walk(options.replace(dry_run=True, max_delete=None, allow_mass_delete=True,
                                          explain=False),
                      _ignore, should_stop)
        probe.stores = work.stores
        probe.run(roots)
    return probe.deleted


def count_entries(source: str, excludes: Optional[Excludes] = None,
                  should_stop: Callable[[], bool] = lambda: False) -> Optional[int]:
    """How many source entries a pass will check, for a progress total.

    os.walk by name only (no stat: d_type tells folders; links not
    followed), so it costs a fraction of a pass.  An estimate: it skips
    what it cannot list, and the source may change meanwhile.  None when
    asked to stop first.
    """
    total = 0
    for folder, dirs, files in os.walk(source):
        if should_stop():
            return None
        rel = os.path.relpath(folder, source).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        if excludes:
            dirs[:] = [n for n in dirs if not excludes.match(_join(rel, n), n, True)]
            files = [n for n in files if not excludes.match(_join(rel, n), n, False)]
        total += len(dirs) + len(files)
    return total


def run_periodically(source: str, replica: str, interval: float, options: Options = None,
                     report: Callable[[Event], None] = _ignore,
                     on_pass: Callable[[PassResult], None] = lambda result: None,
                     stop=None,
                     clock: Callable[[], float] = time.monotonic,
                     progress: Optional[Callable[[int], None]] = None,
                     abort: Callable[[], bool] = lambda: False,
                     mirror: Optional["Mirror"] = None) -> None:
    """Run passes every ``interval`` seconds, start to start, until ``stop`` is set.

    ``stop`` is anything with is_set() and wait(seconds), a threading.Event
    for instance.  The first pass starts at once.  A pass that takes longer
    than the interval is followed at once by the next, and reported with an
    "overrun" event.  The passes share one Mirror (``mirror``, or a new one).
    """
    stop = stop or threading.Event()
    mirror = mirror or Mirror(source, replica, options)
    while not stop.is_set():
        started = clock()
        on_pass(mirror.run_pass(report, stop.is_set, progress, abort))
        if stop.is_set():
            return
        elapsed = clock() - started
        if elapsed >= interval:
            report(Event("overrun", "", f"{elapsed:.1f}"))
            continue
        deadline = started + interval
        while not stop.is_set():
            left = deadline - clock()
            if left <= 0:
                break
            # In steps (a wait has a largest timeout), until the clock says
            # so: a wait may also end early (a nap, a signal).
            stop.wait(min(left, MAX_WAIT))


# -------------------------------------------- preconditions, at every pass --
#
# SOURCE, REPLICA and TRASH must stay apart whatever links and mounts join
# them, and REPLICA must still be the folder the run has been writing to.
# Paths cannot tell: a bind mount shows one folder under two unrelated
# paths.  So folders are compared by identity (device, inode), up the ".."
# chain of the very directories a pass then works in, and, on Linux, by
# where they really live according to /proc/self/mountinfo.  Mirror opens
# its roots through these checks at the start of every pass; the CLI runs
# the same checks once before it starts.


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino)


def _chain(handle, path: str) -> list:
    """Identities of an open directory and of every folder above it, up to
    the root: by ".." from the handle (what the kernel sees) and by the
    resolved path's parents (what the user named)."""
    ids = [_identity(os.stat(handle))]
    if _DIR_FD:
        fd = handle
        try:
            while True:
                up = os.open("..", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, dir_fd=fd)
                if fd != handle:
                    os.close(fd)
                fd = up
                here = _identity(os.fstat(up))
                if here == ids[-1]:  # the root is its own parent
                    break
                ids.append(here)
        except OSError:
            pass  # a folder above that may not be searched: the path's parents still count
        finally:
            if fd != handle:
                os.close(fd)
    here = os.path.realpath(path)
    while True:
        try:
            ids.append(_identity(os.stat(here)))
        except OSError:
            pass
        up = os.path.dirname(here)
        if up == here:
            return ids
        here = up


class _Mount(NamedTuple):
    """One line of /proc/self/mountinfo."""

    device: str  # the file system, as "major:minor"
    root: str  # the folder of that file system shown here ("/" for all of it)
    point: str  # where it is shown
    kind: str = ""  # its type ("ext4", "vfat", "fuseblk", ...)
    source: str = ""  # what is mounted ("/dev/sdb1", "server:/export", ...)


def _read_mounts() -> Optional[list]:
    """The mount table, in mount order; None where the system does not say."""
    try:
        with open(MOUNTINFO, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mounts = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            after = fields[fields.index(b"-") + 1:] if b"-" in fields else []
            kind, source = (os.fsdecode(after[0]), _unescape(after[1])) if len(after) > 1 else ("", "")
            mounts.append(_Mount(fields[2].decode("ascii", "replace"),
                                 _unescape(fields[3]), _unescape(fields[4]), kind, source))
    return mounts


def _unescape(field: bytes) -> str:
    """A path from mountinfo or fstab, where space, tab, newline and
    backslash are written as octal escapes (\\040)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def _under(path: str, folder: str) -> bool:
    """path is folder or lies below it (both absolute and resolved)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _mount_of(mounts: list, path: str) -> Optional[_Mount]:
    """The mount a resolved path lives on."""
    best = None
    for mount in mounts:  # the longest mount point wins; of equal ones, the last mounted
        if _under(path, mount.point) and (best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best


def _place(mounts: list, path: str) -> Optional[tuple]:
    """(file system, folder inside it) where a resolved path really lives."""
    best = _mount_of(mounts, path)
    if best is None:
        return None
    inside = best.root.rstrip("/") + path[len(best.point.rstrip("/")):]
    return best.device, inside or "/"


def _file_system_kind(mounts: Optional[list], path: str) -> str:
    """The type of the file system a resolved path lives on ("" : not known).
    A FUSE file system is named by its disk's boot sector where that can
    be read (ntfs-3g and exfat-fuse mount as "fuse" and "fuseblk")."""
    best = _mount_of(mounts or [], path)
    if best is None:
        return ""
    if best.kind in ("fuse", "fuseblk") and best.source.startswith("/"):
        try:
            with open(best.source, "rb") as disk:
                boot = disk.read(90)
        except OSError:
            return best.kind
        for offset, signature, name in ((3, b"NTFS    ", "ntfs"), (3, b"EXFAT   ", "exfat"),
                                        (82, b"FAT32   ", "vfat"), (54, b"FAT1", "vfat")):
            if boot[offset:offset + len(signature)] == signature:
                return f"{name} ({best.kind})"
    return best.kind


def _reach(mounts: list, path: str) -> list:
    """Every (file system, folder) a walk of path sees: where path lives, and
    the folders mounted anywhere below it."""
    visible = {mount.point: mount for mount in mounts}  # a later mount hides an earlier one
    places = [(m.device, m.root) for point, m in visible.items() if point != path and _under(point, path)]
    here = _place(mounts, path)
    return places + [here] if here else places


def _real_path(handle, path: str) -> str:
    """The resolved path of an open directory, as the kernel knows it."""
    if _DIR_FD and _O_PATH:  # Linux: the descriptor's own path, not the name looked up again
        try:
            real = os.readlink(f"/proc/self/fd/{handle}")
            if real.startswith("/") and not real.endswith(" (deleted)"):
                return real
        except OSError:
            pass
    return os.path.realpath(path)


class _Tree:
    """A root folder of a pass (SOURCE, REPLICA, TRASH, LOG_FILE's folder),
    open, with what the separation checks need to know of it.

    A folder that does not exist yet (exists is False) is represented by its
    nearest existing ancestor: nothing can be inside it yet, and it is inside
    whatever that ancestor is in or is.  It can be created only where its
    parent exists (orphan names the missing parent otherwise)."""

    def __init__(self, what: str, path: str, mounts: Optional[list], may_be_missing: bool = True):
        self.what, self.path, self.mounts = what, path, mounts
        self.exists, self.orphan, self.handle = True, None, None
        self.created = False  # made by create(), this pass
        here = path
        while self.handle is None:
            try:
                self.handle = _open_root(here)
            except FileNotFoundError as err:
                if not may_be_missing:
                    raise Refused(f"cannot open {what} {path!r}: {_reason(err)}; "
                                  "nothing was changed") from None
                up = os.path.dirname(os.path.abspath(here))
                if up == here:
                    raise  # pragma: no cover - "/" is missing
                if not self.exists and self.orphan is None:
                    self.orphan = here  # the folder that would hold it is missing too
                self.exists, here = False, up
            except NotADirectoryError:
                raise Refused(f"{what} {here!r} exists and is not a directory") from None
            except OSError as err:
                raise Refused(f"cannot open {what} {here!r}: {_reason(err)}") from None
        try:
            self.measure(mounts, here)
        except BaseException:
            self.close()
            raise

    def measure(self, mounts, path: str) -> None:
        self.st = os.stat(self.handle)
        self.chain = _chain(self.handle, path)
        real = _real_path(self.handle, path)
        self.place = _place(mounts, real) if mounts else None
        self.kind = _file_system_kind(mounts, real) if mounts else ""
        self.reach = _reach(mounts, real) if mounts else []

    def inside(self, outer: "_Tree") -> Optional[str]:
        """How this folder is outer or lies inside it: "" (not at all),
        "link" (by identity, links resolved) or "mount" (through a mount)."""
        if not outer.exists:  # nothing is there yet, but its path may be one's parent
            return "link" if _under(os.path.realpath(self.path), os.path.realpath(outer.path)) else ""
        if _identity(outer.st) in self.chain:
            return "link"
        if self.place and any(device == self.place[0] and _under(self.place[1], folder)
                              for device, folder in outer.reach):
            return "mount"
        return ""

    def same(self, other: "_Tree") -> bool:
        return self.exists and other.exists and os.path.samestat(self.st, other.st)

    def create(self) -> None:
        """Make the missing folder (one level: its parent exists) and open it."""
        name = os.path.basename(os.path.abspath(self.path))
        path, fd = _at(self.handle, name)
        try:
            os.mkdir(path, 0o700, dir_fd=fd)
        except FileExistsError:
            pass  # made meanwhile by someone else: it is checked like any other
        parent = self.handle
        try:
            self.handle = _open_dir(parent, name)
        finally:
            _close_dir(parent)
        self.exists = self.created = True
        self.measure(self.mounts, self.path)

    def close(self) -> None:
        if self.handle is not None:
            _close_dir(self.handle)
            self.handle = None


def _file_system(handle) -> tuple:
    """(device, file system id) of an open directory: the device number may
    change when a drive is mounted again, its file system id (from the
    file system's UUID, on most) does not."""
    st = os.stat(handle)
    try:
        fsid = os.fstatvfs(handle).f_fsid if _DIR_FD else os.statvfs(handle).f_fsid
    except (OSError, AttributeError):
        fsid = 0
    return st.st_dev, fsid


def _same_file_system(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or bool(a[1]) and a[1] == b[1]


def _unmounted_mount_points(mounts: Optional[list]) -> list:
    """Mount points listed in /etc/fstab where nothing is mounted now."""
    if mounts is None:
        return []
    try:
        with open(FSTAB, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounted = {mount.point for mount in mounts}
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith(b"#") or fields[2] == b"swap":
            continue
        point = os.path.normpath(_unescape(fields[1]))
        if point.startswith("/") and point != "/" and point not in mounted:
            points.append(point)
    return points


def _separate(trees: dict, options: "Options") -> None:
    """Refuse trees that overlap, however they are joined."""
    source, replica, trash = trees["SOURCE"], trees["REPLICA"], trees.get("TRASH")

    def via(how: str) -> str:
        return " (through a mount)" if how == "mount" else ""

    how = replica.inside(source)  # a REPLICA not made yet: its folder inside, or SOURCE itself
    if how:
        what = "the same folder as" if replica.same(source) else "inside"
        raise Refused(f"REPLICA {replica.path!r} is {what} SOURCE {source.path!r}{via(how)}; "
                      "a mirror must be outside the tree it copies")
    how = source.inside(replica)
    if how:
        raise Refused(f"SOURCE {source.path!r} is inside REPLICA {replica.path!r}{via(how)}; "
                      "mirroring would delete it")
    if trash is not None:
        for tree in (source, replica):
            how = trash.inside(tree)
            if how:
                raise Refused(f"TRASH {trash.path!r} is inside {tree.what} {tree.path!r}{via(how)}; "
                              "put it beside REPLICA")
            how = tree.inside(trash)
            if how:
                raise Refused(f"{tree.what} {tree.path!r} is inside TRASH {trash.path!r}{via(how)}")
        if replica.exists and trash.st.st_dev != replica.st.st_dev:
            raise Refused(f"TRASH {trash.path!r} is not on the file system of REPLICA "
                          f"{replica.path!r}; old versions are moved there, so it must be")
    for what, folder_tree in trees.items():
        if what in ("SOURCE", "REPLICA", "TRASH"):
            continue
        how = folder_tree.inside(replica)
        if how:
            path = options.protect[what]
            raise Refused(f"{what} {path!r} is inside REPLICA {replica.path!r}{via(how)}, "
                          "where the mirror would delete it; put it elsewhere")


class _Roots:
    """The folders one pass works in, opened once and found apart.

    source, replica and trash are directory handles (replica is None in a
    dry run into a REPLICA that does not exist yet, trash None without one);
    protected holds the identities of these roots and of every folder above
    them: no folder met inside the trees may be one of them, or the walk would
    be working on a root (or above one) through a mount.
    """

    def __init__(self, trees: dict):
        self.trees = trees
        have = {what: tree for what, tree in trees.items() if tree.exists}
        self.source = trees["SOURCE"].handle
        self.replica = have["REPLICA"].handle if "REPLICA" in have else None
        self.trash = have["TRASH"].handle if "TRASH" in have else None
        self.replica_created = trees["REPLICA"].created  # by this pass (Mirror: or by this run)
        self.protected = frozenset(itertools.chain.from_iterable(
            trees[what].chain for what in ("SOURCE", "REPLICA", "TRASH") if what in have))

    def close(self) -> None:
        for tree in self.trees.values():
            tree.close()


def _open_trees(source: str, replica: str, options: "Options") -> dict:
    """Open SOURCE, REPLICA (or its parent), TRASH (or its parent) and the
    folders of the protected files, and check that they are apart.  Raises
    Refused (everything closed again) when they are not."""
    mounts = _read_mounts()
    named = [("SOURCE", source), ("REPLICA", replica)]
    if options.trash:
        named.append(("TRASH", options.trash))
    for what, path in named:
        real = os.path.realpath(path)
        for point in _unmounted_mount_points(mounts):
            if _under(real, point):
                raise Refused(f"{what} {path!r} is on {point}, which {FSTAB} lists as a mount point, "
                              "but nothing is mounted there: the drive may be unmounted; "
                              "nothing was changed")
    trees = {}
    try:
        for what, path in named:
            trees[what] = _Tree(what, path, mounts, may_be_missing=what != "SOURCE")
        for what, path in options.protect.items():
            if path is None:
                continue
            try:
                trees[what] = _Tree(what, os.path.dirname(os.path.abspath(path)), mounts,
                                    may_be_missing=False)
            except Refused:
                continue  # its folder is gone: then it is not inside REPLICA either
        _separate(trees, options)
        for tree in trees.values():
            if tree.orphan is not None:
                raise Refused(f"{tree.what} {tree.path!r} cannot be created: its folder "
                              f"{tree.orphan!r} does not exist (is the drive mounted?); "
                              "nothing was changed")
    except BaseException:
        for tree in trees.values():
            tree.close()
        raise
    return trees


class Mirror:
    """SOURCE mirrored to REPLICA over a run of passes.

    Besides the options, a run remembers what a single pass cannot know:
    the file system REPLICA lives on (a REPLICA that is missing, or on
    another file system, on a later pass is a drive that went away: that pass
    is refused and creates nothing), and how that file system stores
    modification times (probed once, so that times are compared as stored).
    """

    def __init__(self, source, replica, options: Optional["Options"] = None):
        self.source, self.replica = os.fspath(source), os.fspath(replica)
        self.options = options or Options()
        self.replica_fs = None  # (device, file system id) of REPLICA, once a pass has seen it
        self.stores = None  # what REPLICA's file system stores (times, owners, ...), once probed
        self.source_latency = None  # seconds SOURCE takes to open a folder where slow, else 0.0, once probed
        self.lock = None  # descriptor holding the lock on REPLICA, once check(lock=True) took it
        self.created = False  # REPLICA was made by this run and no pass has run in it yet

    def check(self, create: bool = False, lock: bool = False) -> Optional[OSError]:
        """Run every check a pass starts with; raises Refused with the reason
        when a pass could not start.  create: then make a missing REPLICA
        (and TRASH); lock: then take REPLICA's lock.  Returns the error of a
        file system that cannot lock, if any."""
        roots = self.open_roots(create)
        try:
            return self.take_lock(roots) if lock and roots.replica is not None else None
        finally:
            roots.close()

    def open_roots(self, create: bool) -> _Roots:
        """Open and check the roots of a pass.  create: make a missing
        REPLICA (and TRASH), one level deep, unless the run has seen REPLICA
        already (then its drive has gone)."""
        trees = _open_trees(self.source, self.replica, self.options)
        try:
            replica = trees["REPLICA"]
            if not replica.exists and self.replica_fs is not None:
                raise Refused(f"REPLICA {self.replica!r} is missing: the drive it is on may be "
                              "unmounted; nothing was created, and the next pass tries again")
            if replica.exists:
                fs = _file_system(replica.handle)
                if self.replica_fs is not None and not _same_file_system(fs, self.replica_fs):
                    raise Refused(f"REPLICA {self.replica!r} is now on another file system "
                                  f"(device {_device_name(fs[0])}, was {_device_name(self.replica_fs[0])}): "
                                  "the drive may be unmounted, or another one mounted there; nothing "
                                  "was changed. Start sync.py again if the new place is intended.")
            missing = [trees[what] for what in ("REPLICA", "TRASH")
                       if create and what in trees and not trees[what].exists]
            for tree in missing:
                try:
                    tree.create()
                except OSError as err:
                    raise Refused(f"cannot create {tree.what} {tree.path!r}: {_reason(err)}") from None
            if missing:
                _separate(trees, self.options)  # what was made just now, on its real device
                fs = _file_system(replica.handle)
                self.created |= replica.created
            roots = _Roots(trees)
        except BaseException:
            for tree in trees.values():
                tree.close()
            raise
        if replica.exists:  # also in a dry run: a loop of dry runs must not plan into a lost drive
            self.replica_fs = fs
        return roots

    def take_lock(self, roots: _Roots) -> Optional[OSError]:
        """Hold the lock on the REPLICA this pass writes to (again, when the
        drive came back as a new folder).  Raises Refused when another
        process has it; returns the error of a file system that cannot lock."""
        if self.lock is not None:
            if os.path.samestat(os.fstat(self.lock), os.stat(roots.replica)):
                return None
            os.close(self.lock)
            self.lock = None
        try:
            self.lock = lock_replica(self.replica, roots.replica)
        except OSError as err:
            return err
        return None

    def unlock(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def run_pass(self, report: Callable[[Event], None] = _ignore,
                 should_stop: Callable[[], bool] = lambda: False,
                 progress: Optional[Callable[[int], None]] = None,
                 abort: Callable[[], bool] = lambda: False) -> PassResult:
        """One pass; see run_pass().  Once check() has taken REPLICA's lock,
        every pass makes sure it holds the lock of the REPLICA it writes to."""
        started = time.monotonic()
        options = self.options
        work = _Walk(options, report, lambda: should_stop() or abort(), progress, abort)
        try:
            roots = self.open_roots(create=not options.dry_run)
            if self.lock is not None and roots.replica is not None:
                try:
                    self.take_lock(roots)
                except BaseException:
                    roots.close()
                    raise
        except Refused as err:
            work.refuse("", str(err))
        else:
            roots.replica_created |= self.created and not options.dry_run
            self.created = False
            try:
                probed = self.stores is None and roots.replica is not None
                if probed:
                    with work.phase("probe of REPLICA's file system"):
                        self.stores = _probe_replica(roots.replica, roots.trees["REPLICA"].kind)
                stores = self.stores or Stores()
                work.stores = stores
                work.keep, work.result.unstored = Keep.decide(options, stores)
                source_probed = self.source_latency is None
                kind = roots.trees["SOURCE"].kind
                if source_probed:
                    with work.phase("probe of SOURCE's file system"):
                        self.source_latency = 0.0 if kind in LOCAL_KINDS else _probe_source_latency(roots.source)
                work.source_latency = self.source_latency
                if source_probed and self.source_latency:  # said once a run, like the replica's
                    processes = f"{work.workers} worker processes, " if work.workers > 1 else ""
                    work.emit("slow source", "", f"{kind or 'type unknown'}, slow requests "
                                                 f"({self.source_latency * 1000:.1f} ms to open a folder: "
                                                 f"{processes}files are copied {LATENCY_THREADS} at once)")
                if probed:  # once a run
                    # Said where it stores less than ext4 (time limits are reported as met).
                    if stores._replace(kind="", times=stores.times._replace(lowest=None, highest=None)) != Stores():
                        work.emit("probe", "", stores.describe(work.workers))
                    if work.result.unstored:
                        work.emit("unstored", "", _and(work.result.unstored))
                would_delete = _count_deletions(roots, options, work.should_stop, work)
                if would_delete is not None and would_delete > options.max_delete:
                    work.refuse("", f"this pass would delete {would_delete} entries, more than the "
                                    f"limit of {options.max_delete}; nothing was changed.", "max_delete")
                else:
                    work.run(roots)
            finally:
                roots.close()
        work.result.duration = time.monotonic() - started
        return work.result


def _device_name(dev: int) -> str:
    try:
        return f"{os.major(dev)}:{os.minor(dev)}"
    except (AttributeError, ValueError):  # pragma: no cover - Windows
        return str(dev)


def lock_replica(replica: str, handle=None) -> Optional[int]:
    """Take an exclusive lock on the REPLICA folder itself (or on the open
    directory handle, when given); it is held while the returned descriptor
    stays open.

    No lock file is created, inside the mirror or anywhere else, so there is
    nothing stale to clean up by hand: the OS drops the lock when the process
    ends, however it ends.  Raises Refused when another process holds it,
    OSError when the file system cannot lock, and returns None where the
    platform has no flock.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return _lock_replica_windows(replica)
    if handle is not None and _DIR_FD:
        fd = os.dup(handle)
    else:
        fd = os.open(replica, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(os.fstat(fd))
        os.close(fd)
        who = f"another sync.py (process {holder})" if holder else "another sync.py"
        raise Locked(f"REPLICA {replica!r} is locked by {who}; only one may write "
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
        raise Refused(f"REPLICA {replica!r} is locked by another sync.py; only one may write "
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


def check_arguments(source: str, replica: str, log_file: Optional[str]) -> None:
    """Refuse, before anything changes, arguments that cannot work at all
    (the checks that need the folders themselves are Mirror.check's)."""
    for what, path in (("SOURCE", source), ("REPLICA", replica), ("LOG_FILE", log_file)):
        if path is not None and not path.strip():
            raise UsageError(f"{what} is empty: give a path")
    if not os.path.exists(source):
        raise UsageError(f"SOURCE {source!r} does not exist")
    if not os.path.isdir(source):
        raise UsageError(f"SOURCE {source!r} is not a directory")
    if os.path.lexists(replica) and not os.path.isdir(replica):
        raise UsageError(f"REPLICA {replica!r} exists and is not a directory")
    if log_file is not None:
        _check_output_file("LOG_FILE", log_file)


def _check_output_file(what: str, path: str) -> None:
    """A file sync.py writes besides the mirror: its folder must exist."""
    if not path.strip():
        raise UsageError(f"{what} is empty: give a path")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{what} {path!r}: folder {folder!r} does not exist")


# ---------------------------------------------------------------- the CLI --


# Log levels, numbered as the logging module numbers them.
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_LEVEL_NAMES = {DEBUG: "DEBUG  ", INFO: "INFO   ", WARNING: "WARNING", ERROR: "ERROR  ", CRITICAL: "CRITICAL"}


class _Output:
    """A stream log lines go to.  A failure to write is reported once on
    stderr, not per line, and logging carries on (the sync matters more
    than its log)."""

    where = "the console"  # what the report calls it
    _failing = False

    def failed(self, err: BaseException) -> None:
        if self._failing:
            return
        self._failing = True
        try:
            sys.stderr.write(f"sync.py: cannot write to {self.where}: {_reason(err)}; "
                             "syncing goes on (reported once)\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass  # stderr itself is gone: there is nowhere left to say it


class _LogFile(_Output):
    """LOG_FILE: lines appended in UTF-8; reopened when logrotate moves it
    away (checked before every line, so no line goes to a file that
    rotation has taken).  Opening it raises OSError; writing never does."""

    def __init__(self, path: str):
        self.where = os.path.abspath(path)
        self.stream = None
        self.identity = None  # (device, inode) of the file the stream writes to
        self.open()

    def open(self) -> None:
        self.stream = open(self.where, "a", encoding="utf-8", errors="backslashreplace")
        st = os.fstat(self.stream.fileno())
        self.identity = st.st_dev, st.st_ino

    def moved(self) -> bool:
        try:
            st = os.stat(self.where)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.identity

    def write(self, line: str) -> None:
        try:
            if self.stream is not None and os.name == "posix" and self.moved():
                self.close()
            if self.stream is None:
                self.open()
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError) as err:
            self.failed(err)

    def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # what it held could not be written: said already, or lost with the file


class _Console(_Output):
    """Log lines on stderr, above the progress line while one is shown.
    quiet (--quiet): warnings and errors only, at most LIMIT of them a
    pass; the rest are counted (held_back) and left to LOG_FILE.  Lines
    marked "always" (a pass summary that reports a problem, the count of
    what was held back) show regardless."""

    LIMIT = 20

    def __init__(self, stream, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self.progress = None  # a _Progress line to clear before each log line
        self.shown = self.held_back = 0

    def wanted(self, level: int, always: bool) -> bool:
        if always or not self.quiet:
            return True
        if level < WARNING:
            return False
        if self.shown >= self.LIMIT and level < CRITICAL:
            self.held_back += 1
            return False
        self.shown += 1
        return True

    def write(self, line: str) -> None:
        shown = self.progress is not None and self.progress.shown
        try:
            if shown:
                self.progress.clear()  # the log line goes above the status line,
            self.stream.write(line)
            self.stream.flush()
            if shown:
                self.progress.redraw()  # which stays at the bottom
        except (OSError, ValueError) as err:
            self.failed(err)

    def next_pass(self) -> int:
        """Start counting afresh; returns how many lines were held back."""
        held, self.shown, self.held_back = self.held_back, 0, 0
        return held


class _Log:
    """The run's log: each line stamped with the local time to the
    millisecond and its level, in LOG_FILE and (unless stderr is gone) on
    the console.  Written here rather than through the logging module: a
    pass may log a line per file, and a line cost four times as much that
    way (a record object, two handlers' locks and filters); importing it
    took 6 ms of the start-up."""

    def __init__(self, log_file: str, quiet: bool, verbose: bool):
        self.level = DEBUG if verbose else INFO
        self.file = _LogFile(log_file)  # OSError: the caller's to report
        self.console = None
        if sys.stderr is not None:
            try:
                sys.stderr.reconfigure(errors="backslashreplace")
            except (AttributeError, ValueError):
                pass  # not a TextIOWrapper: leave it as it is
            self.console = _Console(sys.stderr, quiet)
        self.second, self.stamp = None, ""  # the date and time text, made once a second

    def format(self, level: int, message: str) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second, self.stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self.stamp}.{int((now - second) * 1000):03d} {_LEVEL_NAMES[level]} {message}\n"

    def line(self, level: int, message: str, always: bool = False) -> None:
        """One log line.  always: shown on the console even with --quiet."""
        if level < self.level:
            return
        text = self.format(level, message)
        self.file.write(text)
        if self.console is not None and self.console.wanted(level, always):
            self.console.write(text)

    def to_console(self, level: int, message: str) -> None:
        """A line for the console only (LOG_FILE has what it is about)."""
        if self.console is not None:
            self.console.write(self.format(level, message))

    def close(self) -> None:
        self.file.close()


def _describe_options(parser: "_ArgumentParser", args, workers: int) -> str:
    """The options in effect that differ from their defaults, with the
    values in effect (workers: the worker processes a pass really uses)."""
    said, filters_said = [], False
    for action in parser.options:
        if isinstance(action, _FilterOption):
            if not filters_said:  # all of them here, in the order given: it decides the first match
                flags = {a.const: max(a.option_strings, key=len) for a in parser.options
                         if isinstance(a, _FilterOption)}
                said += [f"{flags[kind]} {_show(value)}" for kind, value in getattr(args, "filters", [])]
                filters_said = True
            continue
        if action.dest in ("help", "version", "workers"):
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
    said.append(f"--workers {workers}")  # always: its default depends on the machine
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
        self.shown = self.resize_pending = False
        self.text, self.elapsed = "", 0.0
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
        self.elapsed, self.resize_pending = elapsed, False
        self.text = self.fit(elapsed, self.width())
        self.redraw()

    def width(self) -> int:
        """The terminal's width now (it may have been resized), in columns."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def fit(self, elapsed: float, columns: int) -> str:
        """The longest wording that fits in columns - 1 (a line that reaches
        the last column wraps on some terminals), down to the essentials."""
        checked, files = f"{self.checked:,}", f"{self.files:,}"
        share = left = ""
        if self.total and self.checked and self.checked <= self.total:
            share = f"{100 * self.checked // self.total}%"
            left = _clock(elapsed * (self.total - self.checked) / self.checked)
        rate = _human(int(self.bytes / elapsed)) if elapsed else "0 bytes"
        of = f" of {self.total:,}" if share else ""
        wordings = [
            f"sync.py: {checked}{of} entries checked{f' ({share})' if share else ''}, {files} files copied "
            f"({_human(self.bytes)}, {rate}/s), {_clock(elapsed)} elapsed{f', about {left} left' if left else ''}",
            f"{checked}{of} checked{f' ({share})' if share else ''}, {files} copied ({_human(self.bytes)}), "
            f"{_clock(elapsed)}{f', {left} left' if left else ''}",
            f"{share + ' ' if share else ''}{checked}{of.replace(' of ', '/')} checked, "
            f"{files} copied{f', {left} left' if left else ''}",
            f"{share + ' ' if share else ''}{checked}{of.replace(' of ', '/')}{f' {left} left' if left else ''}",
        ]
        room = max(columns - 1, 1)
        for text in wordings:
            if len(text) <= room:
                return text
        return wordings[-1][:room]

    def redraw(self) -> None:
        if self.resize_pending:  # fitted to the old width: fit it again first
            self.resize_pending = False
            self.text = self.fit(self.elapsed, self.width())
        self.stream.write("\r" + self.text + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def resized(self, signum=None, frame=None) -> None:
        """The window changed size (SIGWINCH): fit the line again before it
        is next drawn, and draw it at the next tick (not here: a signal
        handler must not write)."""
        self.resize_pending = True
        self.drawn_at = float("-inf")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


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


def parse_days(text: str) -> float:
    """--trash-keep: a number of days, zero or more."""
    return _parse_non_negative(text, float, "a number of days")


def parse_window(text: str) -> float:
    """--modify-window: seconds, zero or more, at most a billion (as nanoseconds it must fit)."""
    value = parse_seconds(text)
    if value > 1e9:
        raise argparse.ArgumentTypeError(f"expected at most 1e9 seconds, not {text!r}")
    return value


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


class _Exit(Exception):
    """--help or --version has been answered: main() returns this status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _NoArguments(UsageError):
    """No arguments at all: the usage line and where to read more."""


def _program() -> str:
    """The name the command was run by (sync.py, or the installed command)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("-c", "__main__.py") else "sync.py"


class _ArgumentParser(argparse.ArgumentParser):
    """Errors and early exits come back to main() instead of ending the
    process; the options it was given are kept in .options for the start line."""

    def __init__(self, *args, **kwargs):
        self.options = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.options.append(action)
        return action

    def error(self, message):
        raise UsageError(message)

    def exit(self, status=0, message=None):
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)


_FROM_FLAGS = {"-from": "--exclude-from", "+from": "--include-from"}  # (see _FilterOption)


class _FilterOption(argparse.Action):
    """--exclude, --include, --exclude-from and --include-from: each flag
    keeps its values, and all four keep the order they were given in
    (filters), which decides which rule matches first."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, default=[], **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), values])
        namespace.filters = [*getattr(namespace, "filters", []), (self.const, values)]


_DESCRIPTION = ("Keep REPLICA an exact one-way mirror of SOURCE, re-syncing every INTERVAL\n"
                "seconds and logging every action to the console and LOG_FILE.")
_EXIT_TABLE = f"""exit status (of the last pass: --once, or a loop stopped by a signal):
  {EXIT_OK}  REPLICA is an exact mirror of SOURCE
  {EXIT_FAILED}  not exact: some items could not be mirrored (see the log), or the pass
     was cut short
  {EXIT_USAGE}  bad arguments or a failed precondition; nothing was changed
  {EXIT_REFUSED}  a safety check refused the pass or a folder (empty SOURCE, mass
     deletion, --max-delete, REPLICA's drive gone); nothing there was changed
  {EXIT_LOCKED}  another sync.py is writing to REPLICA (a scheduled run overlapping);
     nothing was done
  {EXIT_BUG}  internal error (a bug: please report the log lines)"""


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=_program(),
        usage="%(prog)s SOURCE REPLICA INTERVAL LOG_FILE [options]",
        allow_abbrev=False,  # --delete must not quietly mean --delete-excluded
        description=_DESCRIPTION,
        epilog=_EXIT_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="folder to copy from (only read)")
    parser.add_argument("replica", metavar="REPLICA",
                        help="folder to make identical to SOURCE (created if missing; its parent "
                             "folder must exist)")
    parser.add_argument("interval", metavar="INTERVAL", type=parse_interval,
                        help="seconds between the starts of two passes")
    parser.add_argument("log_file", metavar="LOG_FILE",
                        help="file to append the log to (not inside REPLICA)")
    parser.add_argument("--once", action="store_true",
                        help="run one pass and exit with its status (below)")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="log what would be done, change nothing")
    parser.add_argument("-c", "--checksum", action="store_true",
                        help="also compare contents of files whose size and mtime match")
    parser.add_argument("--exclude", action=_FilterOption, const="-", metavar="PATTERN",
                        help="leave out paths matching PATTERN on both sides, as rsync does "
                             "(repeatable): '*.tmp' any name, '.git/' folders only, '/cache/***' a "
                             "top folder and all in it; see README")
    parser.add_argument("--include", action=_FilterOption, const="+", metavar="PATTERN",
                        help="keep paths matching PATTERN in: the first --include or --exclude "
                             "that matches decides, as in rsync")
    parser.add_argument("--exclude-from", action=_FilterOption, const="-from", metavar="FILE",
                        help="read exclude patterns from FILE, one a line (# or ; starts a comment; "
                             "'+ ' and '- ' say the kind)")
    parser.add_argument("--include-from", action=_FilterOption, const="+from", metavar="FILE",
                        help="read include patterns from FILE, the same way")
    parser.add_argument("--delete-excluded", action="store_true",
                        help="remove excluded paths from REPLICA (by default they are left alone)")
    parser.add_argument("--trash", metavar="DIR",
                        help="instead of destroying what a pass deletes or overwrites, move it to "
                             "DIR/<pass time>/<path> (DIR on REPLICA's file system)")
    parser.add_argument("--trash-keep", type=parse_days, metavar="DAYS",
                        help="with --trash, remove trash folders of passes older than DAYS")
    parser.add_argument("--modify-window", type=parse_window, metavar="SECONDS", default=0.0,
                        help="count mtimes this close as equal (not needed for FAT, exFAT or NTFS: "
                             "REPLICA's time resolution is probed; an override for shares that change it)")
    parser.add_argument("--no-perms", dest="perms", action="store_false",
                        help="do not mirror permission bits (new replica entries get the source's "
                             "less the umask; existing ones keep theirs)")
    parser.add_argument("--no-links", dest="links", action="store_false",
                        help="leave symbolic links out of the mirror (for USB sticks that cannot "
                             "store them); replica entries of their names are left alone")
    parser.add_argument("--no-owner", dest="owner", action="store_false",
                        help="do not give replica entries the source's owner (kept by default when "
                             "run as root)")
    parser.add_argument("--no-group", dest="group", action="store_false",
                        help="do not give replica entries the source's group (kept by default where "
                             "allowed: any as root, a user's own groups otherwise)")
    parser.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                        help="do not mirror extended attributes (user.* by default; all as root)")
    parser.add_argument("--no-acls", dest="acls", action="store_false",
                        help="do not mirror POSIX ACLs")
    parser.add_argument("--no-hard-links", dest="hard_links", action="store_false",
                        help="copy each name of a file with several names as a file of its own")
    parser.add_argument("-i", "--itemize", action="store_true",
                        help="print a change code and path per change on stdout, for scripts")
    parser.add_argument("--allow-empty-source", action="store_true",
                        help="let an empty SOURCE empty a non-empty REPLICA (refused by default: "
                             "an unmounted drive looks empty)")
    parser.add_argument("--max-delete", type=parse_count, metavar="N",
                        help="refuse a pass that would delete more than N entries "
                             "(it changes nothing and fails); replaces the default guard below")
    parser.add_argument("--allow-mass-delete", action="store_true",
                        help="let a folder's deletions remove more than half of REPLICA, or empty a "
                             "replica folder of more than 100 entries (refused by default: a wrong "
                             "REPLICA or an unmounted drive looks like this)")
    parser.add_argument("--workers", type=parse_count, metavar="N",
                        help="processes that mirror separate subtrees at once (default: the number of "
                             f"CPUs, at most 8, here {DEFAULT_WORKERS}; {SLOW_WORKERS} where SOURCE or REPLICA "
                             "is slow to answer, such as a NAS)")
    parser.add_argument("--status-file", metavar="PATH",
                        help="after every pass, replace PATH with the pass's outcome as JSON "
                             "(or, for a name ending in .prom, as Prometheus metrics); see README")
    parser.add_argument("--fsync", action="store_true",
                        help="flush each copied file, and each changed folder, to the disk before "
                             "going on, so that a power cut leaves every replica file whole (slower)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="console shows nothing when all is well: only warnings and errors, "
                             f"at most {_Console.LIMIT} a pass, and the summary of a pass that "
                             "failed (LOG_FILE gets every line)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log why each entry was judged current or not, moves considered, "
                             "the worker split and the time of each phase")
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


@contextlib.contextmanager
def _collecting_garbage_less_often():
    """A pass makes an object or two per entry, nearly all freed as soon as
    their folder is done, and the collector's sweeps for cycles among them
    cost a pass over one folder of 100,000 files 7% of its time: a sweep
    waits for 50,000 new objects instead of 700.  The only cycles a pass
    makes are caught exceptions, still collected as it goes."""
    import gc
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


class _StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP, as the loop sees them: the first
    asks the pass, or the sleep, to end after the current item; a second one
    to end at once (a file being copied is abandoned, its temporary file
    removed).

    The handlers only note the signal.  They run between two bytecodes of
    the main thread, which may be inside the lock a threading.Event takes,
    so they must not take locks.  A sleep is woken through
    signal.set_wakeup_fd, which the C-level handler writes to whatever
    Python is doing.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self, on_first: Callable[[], None] = lambda: None):
        self.caught = []  # names of the signals received, in order
        self.on_first = on_first  # told of the first signal (it takes no locks either)
        self.reader = self.writer = None
        self.previous_fd = None
        if os.name == "posix":
            self.reader, self.writer = os.pipe()
            os.set_blocking(self.reader, False)
            os.set_blocking(self.writer, False)
            self.previous_fd = signal.set_wakeup_fd(self.writer, warn_on_full_buffer=False)
        self.previous = {}
        for name in self.NAMES:
            signum = getattr(signal, name, None)
            if signum is not None:
                self.previous[signum] = signal.signal(signum, self.note)

    def note(self, signum, frame) -> None:
        self.caught.append(signal.Signals(signum).name)
        if len(self.caught) == 1:
            self.on_first()

    def is_set(self) -> bool:
        return bool(self.caught)

    def aborted(self) -> bool:
        return len(self.caught) > 1

    def wait(self, seconds: float) -> None:
        """Sleep up to seconds, or until a signal comes."""
        if self.reader is None:  # pragma: no cover - Windows: no wakeup pipe, short naps
            if not self.caught:
                time.sleep(min(seconds, 0.25))
            return
        if not self.caught:
            select.select([self.reader], [], [], seconds)
        try:
            while os.read(self.reader, 512):
                pass
        except OSError:
            pass  # drained

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.reader is not None:
            signal.set_wakeup_fd(self.previous_fd if self.previous_fd is not None else -1)
            os.close(self.reader)
            os.close(self.writer)


class _Settings:
    """The command line, parsed and checked: the one place where flags
    become Options.  Raises UsageError (one sentence) or _Exit."""

    def __init__(self, argv=None):
        parser = _build_parser()
        if not (sys.argv[1:] if argv is None else argv):
            raise _NoArguments(f"usage: {parser.prog} SOURCE REPLICA INTERVAL LOG_FILE [options]\n"
                               f"{_DESCRIPTION}\nTry '{parser.prog} --help' for the options and exit statuses.")
        args = self.args = parser.parse_args(argv)
        check_arguments(args.source, args.replica, args.log_file)
        if args.status_file is not None:
            _check_output_file("--status-file", args.status_file)
        given = getattr(args, "filters", [])
        for flag, path in [("--trash", args.trash), *((_FROM_FLAGS[kind], p) for kind, p in given
                                                       if kind in _FROM_FLAGS)]:
            if path is not None and not path.strip():
                raise UsageError(f"{flag} is empty: give a path")
        texts = []
        for kind, value in given:
            if kind not in _FROM_FLAGS:
                texts.append((kind, value))
                continue
            try:
                texts += read_rules_file(value, kind[0])
            except OSError as err:
                raise UsageError(f"cannot read {_FROM_FLAGS[kind]} {value!r}: {_reason(err)}") from None
        filters = Filters(parse_rules(texts))
        if args.trash_keep is not None and not args.trash:
            raise UsageError("--trash-keep needs --trash DIR")
        workers = DEFAULT_WORKERS if args.workers is None else max(1, args.workers)
        self.described = _describe_options(parser, args, workers if _CAN_FORK else 1)
        self.options = Options(
            checksum=args.checksum, dry_run=args.dry_run, allow_empty_source=args.allow_empty_source,
            max_delete=args.max_delete, workers=workers,
            slow_workers=SLOW_WORKERS if args.workers is None else 0,
            excludes=filters or None, delete_excluded=args.delete_excluded,
            trash=args.trash, trash_keep_days=args.trash_keep,
            modify_window_ns=int(args.modify_window * 1_000_000_000),
            allow_mass_delete=args.allow_mass_delete,
            protect={"LOG_FILE": args.log_file, "--status-file": args.status_file},
            fsync=args.fsync, explain=args.verbose,
            perms=args.perms, owner=args.owner, group=args.group, xattrs=args.xattrs, acls=args.acls,
            hard_links=args.hard_links, links=args.links)


def _exit_status(result: Optional[PassResult]) -> int:
    """The exit status a pass's result stands for (None: no pass finished)."""
    if result is None:
        return EXIT_FAILED
    if result.refused:
        return EXIT_REFUSED
    return EXIT_OK if result.exact else EXIT_FAILED


def _iso(t: Optional[float]) -> Optional[str]:
    """A wall-clock time in ISO 8601 with the local zone: 2026-11-26T10:51:18.228+01:00"""
    if t is None:
        return None
    import datetime  # here: only --status-file needs it
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


STATUS_SCHEMA = 1  # the version of --status-file's layout; raised when a field changes meaning


class _StatusFile:
    """--status-file: after every pass, what the pass did, as JSON (or, for
    a name ending in .prom, in the Prometheus text format that
    node_exporter's textfile collector reads).  Written to a temporary file
    beside it and renamed over it, so a reader never sees half of one."""

    def __init__(self, path: str):
        self.path = path

    def write(self, fields: dict) -> Optional[str]:
        """Replace the file; returns why it could not be written, if not."""
        import json  # here: only --status-file needs them
        import tempfile
        text = _prometheus(fields) if self.path.endswith(".prom") else json.dumps(fields, indent=2) + "\n"
        folder, name = os.path.split(os.path.abspath(self.path))
        temp = None
        try:
            # A new file of a random name (O_EXCL): a link planted in a shared
            # folder cannot make root write elsewhere.  No .prom at the end:
            # node_exporter's collector skips it.
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            with open(fd, "w", encoding="utf-8") as out:
                os.fchmod(fd, 0o666 & ~_umask())  # readable as a file made by open() would be
                out.write(text)
            os.replace(temp, self.path)
        except OSError as err:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            return _reason(err)
        return None


def _prometheus(fields: dict) -> str:
    """The status fields as Prometheus metrics, labelled with the replica."""
    def label(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    where = f'replica="{label(fields["replica"])}"'
    metrics = [
        ("syncpy_last_pass_exact", "1 if the last pass left REPLICA an exact mirror of SOURCE",
         [(where, int(fields["exact"]))]),
        ("syncpy_last_pass_status", "the exit status the last pass stands for (see --help)",
         [(where, fields["status"])]),
        ("syncpy_last_pass_end_timestamp_seconds", "when the last pass ended (Unix time)",
         [(where, fields["finished_unix"])]),
        ("syncpy_last_pass_duration_seconds", "how long the last pass took", [(where, fields["duration_seconds"])]),
        ("syncpy_last_pass_errors", "items the last pass could not mirror", [(where, fields["errors"])]),
        ("syncpy_last_pass_bytes_copied", "bytes the last pass copied", [(where, fields["bytes_copied"])]),
        ("syncpy_last_pass_actions", "what the last pass did, by action",
         [(f'{where},action="{action}"', n) for action, n in sorted(fields["counts"].items())]),
    ]
    if fields["next_pass_unix"] is not None:
        metrics.append(("syncpy_next_pass_timestamp_seconds", "when the next pass starts (Unix time)",
                        [(where, fields["next_pass_unix"])]))
    lines = []
    for name, meaning, samples in metrics:
        lines += [f"# HELP {name} {meaning}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{labels}}} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"


class _Notifier:
    """systemd's notification protocol (see sd_notify(3)) where systemd
    asks for it (NOTIFY_SOCKET, Type=notify): READY=1, STATUS=..., STOPPING=1
    and, with WatchdogSec= (WATCHDOG_USEC), WATCHDOG=1 every half period
    while the run is alive (see _Heartbeat).  Silent everywhere else."""

    def __init__(self, environ=os.environ):
        self.sock = None
        self.watchdog = None  # seconds systemd waits for a ping, when it watches
        address = environ.get("NOTIFY_SOCKET", "")
        if not address or os.name != "posix":  # systemd's socket is a Unix one
            return
        import socket  # here: only a run under systemd needs it
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0))
        except (OSError, AttributeError):
            return
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            return
        self.sock = sock
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6

    def send(self, *lines: str) -> None:
        if self.sock is not None:
            try:
                self.sock.send("\n".join(lines).encode("utf-8", "backslashreplace"))
            except OSError:
                pass  # systemd has gone (or never listened): nothing to tell

    def start_watchdog(self, alive: Callable[[float], bool]) -> None:
        """Ping every half period while alive(period) says the run still
        moves; a run stuck longer than the period is then restarted."""
        if self.watchdog is None:
            return
        period = self.watchdog

        def ping():
            while True:
                time.sleep(period / 2)
                if alive(period):
                    self.send("WATCHDOG=1")

        threading.Thread(target=ping, name="sync-watchdog", daemon=True).start()


class _Heartbeat:
    """The stop signals as the core polls them, each poll noted: a pass polls
    between items and, while it copies, every chunk; workers' progress is
    collected in between; the loop sleeps in wait().  alive(within) says
    whether the run has moved in the last `within` seconds, for the watchdog."""

    def __init__(self, signals: "_StopSignals"):
        self.signals = signals
        self.last = time.monotonic()
        self.sleeping = False

    def is_set(self) -> bool:
        self.last = time.monotonic()
        return self.signals.is_set()

    def aborted(self) -> bool:
        self.last = time.monotonic()
        return self.signals.aborted()

    def wait(self, seconds: float) -> None:
        self.sleeping = True
        try:
            self.signals.wait(seconds)
        finally:
            self.sleeping = False
            self.last = time.monotonic()

    def alive(self, within: float) -> bool:
        return self.sleeping or time.monotonic() - self.last < within


# What the CLI adds to a refusal: the flag that lets the user proceed (by
# the Options field the core names in Event.advice).
_ADVICE = {
    "allow_empty_source": "Use --allow-empty-source if SOURCE is meant to be empty.",
    "allow_mass_delete": "If that is intended, run once with --allow-mass-delete (or with "
                         "--max-delete at least the number of deletions you expect).",
    "max_delete": "If that many deletions are intended, run once with a higher --max-delete.",
    "links": "Use --no-links to leave links out.",
}


class _Reporter:
    """Everything a user sees of a run: log lines (LOG_FILE and console),
    --itemize lines on stdout, the progress line, the pass summaries, the
    status file and systemd's notifications."""

    def __init__(self, settings: _Settings):
        args = self.args = settings.args
        self.settings = settings
        try:
            self.output = _Log(args.log_file, args.quiet, args.verbose)
        except OSError as err:
            raise UsageError(f"cannot open LOG_FILE {args.log_file!r}: {_reason(err)}") from None
        self.log = self.output.line  # log(level, message, always=False): one log line
        self.console = self.output.console
        self.progress = None
        if _Progress.wanted(sys.stderr, args.quiet):
            excludes = settings.options.excludes
            self.progress = _Progress(sys.stderr, count=lambda stop: count_entries(args.source, excludes, stop))
            self.console.progress = self.progress
            if hasattr(signal, "SIGWINCH"):
                with contextlib.suppress(ValueError):  # not the main thread: no resizes then
                    signal.signal(signal.SIGWINCH, self.progress.resized)
        self.checked = self.progress.progress if self.progress else None
        self.last = None  # the PassResult of the latest pass
        self.passes = 0
        self.warned = set()  # warnings of earlier passes: said again at info level
        self.warned_now = set()  # warnings of this pass
        self.errors = []  # this pass's last few error lines, for the status file
        self.status = _StatusFile(args.status_file) if args.status_file else None
        self.status_failed = False
        self.notifier = _Notifier()

    def event(self, event: Event) -> None:
        text = event.text(self.args.dry_run)
        if event.advice:
            text += " " + _ADVICE[event.advice]
        level = _LEVELS[ACTIONS[event.action].severity]
        if level == WARNING:  # a cause that has not changed since an earlier pass: said once
            key = event[:3]
            if key in self.warned:
                level = INFO
            self.warned_now.add(key)
        elif level == ERROR:
            self.errors = [*self.errors[-(self.KEEP_ERRORS - 1):], text]
        self.log(level, text)
        if self.args.itemize:
            line = event.itemized()
            if line:
                print(line, flush=True)
        if self.progress:
            self.progress.event(event)

    KEEP_ERRORS = 5  # error lines of a pass the status file repeats

    def started(self) -> None:
        args = self.args
        mode = "once" if args.once else f"every {args.interval:g} s"
        self.log(INFO, f"sync.py {__version__} started: {_show(args.source)} -> "
                       f"{_show(args.replica)}, {mode}, log {_show(args.log_file)}; "
                       f"options: {self.settings.described}")
        self.notifier.send("READY=1", f"STATUS=first pass running: {_show(args.source)} -> {_show(args.replica)}")

    def cannot_lock(self, err: OSError) -> None:
        self.log(WARNING, f"cannot lock REPLICA ({_reason(err)}): make sure no other "
                          "sync.py writes to it")

    def pass_done(self, result: PassResult) -> None:
        self.last = result
        self.passes += 1
        if self.progress:
            self.progress.finish()
        held = self.console.next_pass() if self.console else 0
        if held:  # on the console only: LOG_FILE has them all
            self.output.to_console(WARNING, f"{held:,} more warnings and errors of this pass are in LOG_FILE "
                                            f"{_show(self.args.log_file)}")
        summary = result.summary(self.args.dry_run)
        # A pass that ends not exact (but for a stop asked for) is a problem
        # even without errors (a file changed or vanished while copied): its
        # summary shows even with --quiet, so cron's mail says why it failed.
        failed = result.errors or not (result.exact or result.interrupted or self.args.dry_run)
        self.log(WARNING if failed else INFO, summary, always=bool(failed))
        self.warned |= self.warned_now
        self.warned_now = set()
        self.notifier.send(f"STATUS={summary}")
        if self.status is not None:
            self.write_status(result)
        self.errors = []

    def write_status(self, result: PassResult) -> None:
        args = self.args
        now = time.time()
        next_at = None
        if not args.once:  # the loop starts the next pass INTERVAL after this one started
            next_at = now + max(0.0, args.interval - result.duration)
        fields = {
            "schema": STATUS_SCHEMA, "program": "sync.py", "version": __version__, "pid": os.getpid(),
            "source": _show(os.path.abspath(args.source)), "replica": _show(os.path.abspath(args.replica)),
            "mode": "once" if args.once else "loop", "interval_seconds": args.interval,
            "dry_run": args.dry_run, "pass": self.passes,
            "started": _iso(now - result.duration), "finished": _iso(now), "finished_unix": round(now, 3),
            "duration_seconds": round(result.duration, 3),
            "exact": result.exact and not args.dry_run, "status": _exit_status(result),
            "refused": result.refused, "interrupted": result.interrupted,
            "checked": result.checked, "counts": {name: result.counts[name] for name in ACTIONS
                                                  if result.counts[name]},
            "bytes_copied": result.bytes_copied, "errors": result.errors, "last_errors": self.errors,
            "left_out": result.left_out(),
            "next_pass": _iso(next_at), "next_pass_unix": None if next_at is None else round(next_at, 3),
        }
        failure = self.status.write(fields)
        if failure and not self.status_failed:
            self.log(WARNING, f"cannot write --status-file {_show(args.status_file)}: {failure}; "
                              "syncing goes on (said once)")
        self.status_failed = bool(failure)

    def crashed(self) -> None:
        import traceback  # here: only a crash needs it
        self.log(CRITICAL, "internal error: this is a bug in sync.py; please report it with these lines\n"
                           + traceback.format_exc().rstrip("\n"))

    def stopping(self) -> None:
        """The first stop signal has come (called from the signal handler)."""
        self.notifier.send("STOPPING=1")

    def stopped(self, signals: "_StopSignals") -> None:
        if signals.aborted():
            self.log(WARNING, f"stopped at once by a second signal ({signals.caught[1]})", always=True)
        elif signals.caught:
            self.log(INFO, f"stopped by {signals.caught[0]}")
        else:
            self.log(INFO, "finished")


def main(argv=None) -> int:
    """Command-line entry point: parse, check, lock, loop; returns the exit status."""
    try:
        settings = _Settings(argv)
        args = settings.args
        mirror = Mirror(args.source, args.replica, settings.options)
        mirror.check()  # every check a pass starts with, before anything is made
        reporter = _Reporter(settings)
        # A dry run changes nothing, so it may run beside a real one: no lock.
        cannot_lock = None if args.dry_run else mirror.check(create=True, lock=True)
    except Locked as err:
        print(f"{_program()}: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except _NoArguments as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as err:
        print(f"{_program()}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except _Exit as done:
        return done.status
    if cannot_lock is not None:
        reporter.cannot_lock(cannot_lock)
    _raise_open_file_limit()
    signals = _StopSignals(on_first=reporter.stopping)
    heart = signals  # polled by the pass and the loop; noted only for systemd's watchdog
    if reporter.notifier.watchdog is not None:
        heart = _Heartbeat(signals)
        reporter.notifier.start_watchdog(heart.alive)
    try:
        with _collecting_garbage_less_often():
            reporter.started()
            if args.once:
                reporter.pass_done(mirror.run_pass(reporter.event, heart.is_set, reporter.checked, heart.aborted))
            else:
                run_periodically(args.source, args.replica, args.interval, settings.options, reporter.event,
                                 reporter.pass_done, heart, progress=reporter.checked,
                                 abort=heart.aborted, mirror=mirror)
    except Exception:
        reporter.crashed()
        reporter.output.close()
        return EXIT_BUG
    finally:
        signals.close()
        mirror.unlock()
    reporter.stopped(signals)
    reporter.output.close()
    if signals.aborted():
        return EXIT_FAILED
    return _exit_status(reporter.last)


if __name__ == "__main__":
    sys.exit(main())
