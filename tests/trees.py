"""Build trees from a declarative description; snapshot and compare them.

A description is a dict of name -> entry, where an entry is
  bytes or str         a regular file with that content (mode 0o644)
  dict                 a directory (mode 0o755)
  File(...), Dir(...)  the same with an explicit mode and mtime
  Link("target")       a symbolic link with that target text
  Fifo()               a named pipe
Names may be str or bytes (for names that are not valid UTF-8).
"""

from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field

BASE_MTIME_NS = 1_600_000_000_123_456_789  # fixed, with a nanosecond part


@dataclass
class File:
    data: bytes | str = b""
    mode: int = 0o644
    mtime_ns: int = BASE_MTIME_NS


_dir_times = itertools.count(BASE_MTIME_NS + 1_000_000_000, 1_000_003)


@dataclass
class Dir:
    entries: dict = field(default_factory=dict)
    mode: int = 0o755
    # Each folder its own mtime, as on a real disk (equal ones would look like renames).
    mtime_ns: int = field(default_factory=lambda: next(_dir_times))


@dataclass
class Link:
    target: str | bytes


@dataclass
class Fifo:
    pass


def _as_node(entry):
    if isinstance(entry, (bytes, str)):
        return File(entry)
    if isinstance(entry, dict):
        return Dir(entry)
    return entry


def make_tree(root, description: dict, root_mode: int | None = None) -> None:
    """Create description under root (which may exist).  Directory modes and
    times are applied after their contents, as a mirror must."""
    root = os.fsencode(root)
    os.makedirs(root, exist_ok=True)
    _fill(root, description)
    if root_mode is not None:
        os.chmod(root, root_mode)


def _fill(path: bytes, description: dict) -> None:
    for name, entry in description.items():
        full = os.path.join(path, os.fsencode(name))
        node = _as_node(entry)
        if isinstance(node, File):
            data = node.data.encode() if isinstance(node.data, str) else node.data
            with open(full, "wb") as f:
                f.write(data)
            os.chmod(full, node.mode)
            os.utime(full, ns=(node.mtime_ns, node.mtime_ns))
        elif isinstance(node, Dir):
            os.mkdir(full)
            _fill(full, node.entries)
            os.chmod(full, node.mode)
            os.utime(full, ns=(node.mtime_ns, node.mtime_ns))
        elif isinstance(node, Link):
            os.symlink(os.fsencode(node.target), full)
        elif isinstance(node, Fifo):
            os.mkfifo(full)
        else:
            raise TypeError(f"cannot build {entry!r}")


def _xattrs(path) -> tuple:
    try:
        return tuple(sorted((key, os.getxattr(path, key, follow_symlinks=False))
                            for key in os.listxattr(path, follow_symlinks=False)))
    except (OSError, AttributeError):  # none on this file system or platform
        return ()


def snapshot(root, skip_special: bool = True, hard_links: bool = True) -> dict:
    """Everything lstat and the bytes say about a tree, keyed by relative path
    (bytes): kind, bytes or link target, mode, owner and group, extended
    attributes (ACLs included), mtime; for a file with other names in the
    tree, the first of them.  Links are never followed.  Special files are
    left out unless skip_special is False (sync.py does not mirror them)."""
    root = os.fsencode(root)
    result, names = {}, {}
    pending = [b""]
    while pending:
        rel = pending.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        mode = stat.S_IMODE(st.st_mode)
        owner = (st.st_uid, st.st_gid)
        if stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", os.readlink(full), owner, st.st_mtime_ns)
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                result[rel] = ("file", f.read(), oct(mode), owner, _xattrs(full), st.st_mtime_ns)
            if st.st_nlink > 1 and hard_links:
                names.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", oct(mode), owner, _xattrs(full), st.st_mtime_ns)
            pending.extend(os.path.join(rel, name) if rel else name for name in os.listdir(full))
        elif not skip_special:
            result[rel] = ("special", oct(mode))
    for group in names.values():
        if len(group) > 1:
            for rel in group:
                result[rel] = (*result[rel][:-1], same_file(group), result[rel][-1])
    return result


def same_file(names) -> tuple:
    """How snapshot records the names in a tree that share one file."""
    return ("names of one file", tuple(sorted(names)))


def diff(a: dict, b: dict) -> list[str]:
    """Readable differences between two snapshots (empty when equal)."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key!r}: {_short(a.get(key))} != {_short(b.get(key))}")
    return lines


def _short(value):
    if value and value[0] == "file" and len(value[1]) > 40:
        return ("file", value[1][:40] + b"...", *value[2:])
    return value


def assert_mirror(source, replica, hard_links: bool = True) -> None:
    """hard_links=False: whether names share a file is not compared."""
    differences = diff(snapshot(source, hard_links=hard_links), snapshot(replica, hard_links=hard_links))
    assert not differences, "replica differs from source:\n" + "\n".join(differences[:20])


def leftover_temp_files(root) -> list[bytes]:
    """Paths of sync.py temporary files anywhere under root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        found += [os.path.join(dirpath, n) for n in filenames + dirnames if n.startswith(b".syncpy-")]
    return found
