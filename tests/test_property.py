"""Property: whatever sequence of creates, edits, deletes, renames and type
changes happens to SOURCE, after each pass REPLICA equals SOURCE and SOURCE
is untouched."""

import itertools
import os
import shutil
import tempfile
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sync
from trees import BASE_MTIME_NS, diff, snapshot

PATHS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
OPERATIONS = st.one_of(
    st.tuples(st.just("write"), PATHS, st.binary(max_size=40)),
    st.tuples(st.just("mkdir"), PATHS),
    st.tuples(st.just("symlink"), PATHS, st.sampled_from(["a", "../b", "/nonexistent", "c/a"])),
    st.tuples(st.just("delete"), PATHS),
    st.tuples(st.just("rename"), PATHS, PATHS),
    st.tuples(st.just("chmod"), PATHS, st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o444])),
    st.tuples(st.just("touch"), PATHS),  # a new mtime, older or newer, same bytes
)


class Source:
    """Applies operations to a source tree; every change gets its own mtime
    (a real editor's writes are separated in time; see README on mtimes)."""

    def __init__(self, root):
        self.root = root
        self.clock = itertools.count(1)

    def path(self, rel):
        return os.path.join(self.root, rel)

    def mtime(self):
        # Alternately older and newer than the base: "newer than" logic would fail.
        n = next(self.clock)
        return BASE_MTIME_NS + (n if n % 2 else -n) * 1_000_003

    def clear(self, rel):
        full = self.path(rel)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)

    def through_link(self, rel):
        parts = rel.split("/")[:-1]
        return any(os.path.islink(self.path("/".join(parts[:i]))) for i in range(1, len(parts) + 1))

    def make_parents(self, rel):
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            here = "/".join(parts[:i])
            if not (os.path.isdir(self.path(here)) and not os.path.islink(self.path(here))):
                self.clear(here)
                os.mkdir(self.path(here))

    def apply(self, op):
        kind, rel, *args = op
        full = self.path(rel)
        if kind == "write":
            self.make_parents(rel)
            if os.path.isdir(full) or os.path.islink(full):
                self.clear(rel)
            with open(full, "wb") as f:
                f.write(args[0])
            t = self.mtime()
            os.utime(full, ns=(t, t))
        elif kind == "mkdir":
            self.make_parents(rel)
            if not os.path.isdir(full) or os.path.islink(full):
                self.clear(rel)
                os.mkdir(full)
        elif kind == "symlink":
            self.make_parents(rel)
            self.clear(rel)
            os.symlink(args[0], full)
        elif kind == "delete":
            self.clear(rel)
        elif kind == "rename":
            target = args[0]
            if not os.path.lexists(full) or target == rel or target.startswith(rel + "/"):
                return
            if self.through_link(rel) or self.through_link(target):
                return  # a path through a link names something else: not a rename
            if rel.startswith(target + "/"):
                return
            self.make_parents(target)
            if not os.path.lexists(full):  # make_parents replaced an ancestor of it
                return
            self.clear(target)
            os.rename(full, self.path(target))
        elif kind == "chmod":
            if os.path.lexists(full) and not os.path.islink(full):
                os.chmod(full, args[0] | (0o700 if os.path.isdir(full) else 0))
        elif kind == "touch":
            if os.path.isfile(full) and not os.path.islink(full):
                t = self.mtime()
                os.utime(full, ns=(t, t))


@settings(max_examples=int(os.environ.get("SYNCPY_PROPERTY_EXAMPLES", "75")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(OPERATIONS, min_size=1, max_size=5), min_size=1, max_size=6),
       checksum=st.booleans(), workers=st.sampled_from([1, 3]))
def test_replica_equals_source_after_every_pass(batches, checksum, workers):
    # With workers, even these tiny trees are split among worker processes
    # and every copy goes through the large-file threads.
    split = mock.patch.object(sync, "SPLIT_MIN_TASKS", 0 if workers > 1 else sync.SPLIT_MIN_TASKS)
    threads = mock.patch.object(sync, "PARALLEL_MIN_SIZE", 0 if workers > 1 else sync.PARALLEL_MIN_SIZE)
    with split, threads, tempfile.TemporaryDirectory() as scratch:
        src, dst = os.path.join(scratch, "src"), os.path.join(scratch, "dst")
        os.mkdir(src)
        source = Source(src)
        for batch in batches:
            for op in batch:
                source.apply(op)
            before = snapshot(src)
            options = sync.Options(checksum=checksum, workers=workers,
                                   allow_empty_source=True)  # sources may empty here
            result = sync.run_pass(src, dst, options)
            assert result.errors == 0 and result.exact
            assert snapshot(src) == before, "SOURCE changed"
            differences = diff(before, snapshot(dst))
            assert not differences, differences
            assert not [n for n in os.listdir(dst) if n.startswith(".syncpy-")]
