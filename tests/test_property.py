"""Property: whatever sequence of creates, edits, deletes, renames and type
changes happens to SOURCE, after each pass REPLICA equals SOURCE and SOURCE
is untouched."""

import itertools
import os
import shutil
import tempfile
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sync
from trees import BASE_MTIME_NS, diff, same_file, snapshot

PATHS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
OPERATIONS = st.one_of(
    st.tuples(st.just("write"), PATHS, st.binary(max_size=40)),
    st.tuples(st.just("mkdir"), PATHS),
    st.tuples(st.just("symlink"), PATHS, st.sampled_from(["a", "../b", "/nonexistent", "c/a"])),
    st.tuples(st.just("delete"), PATHS),
    st.tuples(st.just("rename"), PATHS, PATHS),
    st.tuples(st.just("chmod"), PATHS, st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o444])),
    st.tuples(st.just("touch"), PATHS),  # a new mtime, older or newer, same bytes
    st.tuples(st.just("hardlink"), PATHS, PATHS),  # another name for a file
    st.tuples(st.just("xattr"), PATHS, st.sampled_from([b"", b"1", b"22"])),  # b"": removed
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

    def put(self, full, target, how):
        """how(full, target path): rename or link full to target, in place of what is there."""
        self.make_parents(target)
        if not os.path.lexists(full):  # make_parents replaced an ancestor of it
            return
        self.clear(target)
        how(full, self.path(target))

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
            self.put(full, target, os.rename)
        elif kind == "chmod":
            if os.path.lexists(full) and not os.path.islink(full):
                os.chmod(full, args[0] | (0o700 if os.path.isdir(full) else 0))
        elif kind == "touch":
            if os.path.isfile(full) and not os.path.islink(full):
                t = self.mtime()
                os.utime(full, ns=(t, t))
        elif kind == "hardlink":
            target = args[0]
            if (not os.path.isfile(full) or os.path.islink(full) or target == rel or rel.startswith(target + "/")
                    or target.startswith(rel + "/") or self.through_link(rel) or self.through_link(target)):
                return
            self.put(full, target, os.link)
        elif kind == "xattr":
            if os.path.lexists(full) and not os.path.islink(full):
                try:
                    if args[0]:
                        os.setxattr(full, "user.p", args[0])
                    else:
                        os.removexattr(full, "user.p")
                except OSError:
                    pass  # none to remove


EXAMPLES = int(os.environ.get("SYNCPY_PROPERTY_EXAMPLES", "75"))
BATCHES = st.lists(st.lists(OPERATIONS, min_size=1, max_size=5), min_size=1, max_size=6)
WINDOW = 2_000_000_000  # --modify-window 2, as for FAT
# Option sets, drawn together: excludes leave out every entry named "c";
# a window is only drawn with checksum (without it, a same-size rewrite
# within the window is, by design, not copied).
OPTIONS = st.fixed_dictionaries({
    "checksum": st.booleans(), "workers": st.sampled_from([1, 3]), "trash": st.booleans(),
    "exclude": st.booleans(), "window": st.booleans(), "delete_excluded": st.booleans(),
})


def make_options(scratch, drawn, **more):
    return sync.Options(checksum=drawn["checksum"] or drawn["window"], workers=drawn["workers"],
                        trash=os.path.join(scratch, "trash") if drawn["trash"] else None,
                        excludes=sync.Excludes(["c"]) if drawn["exclude"] else None,
                        delete_excluded=drawn["exclude"] and drawn.get("delete_excluded", False),
                        modify_window_ns=WINDOW if drawn["window"] else 0,
                        allow_empty_source=True, **more)  # sources may empty here


def fan_out_everything(workers):
    """With workers, even these tiny trees are split among worker processes,
    every folder that can be handed over between them is, every folder's
    files are cut into slices (each mirrored 2 names at a time), and every
    copy goes through the large-file threads."""
    split = mock.patch.object(sync, "SPLIT_MIN_TASKS", 0 if workers > 1 else sync.SPLIT_MIN_TASKS)
    threads = mock.patch.object(sync, "PARALLEL_MIN_SIZE", 0 if workers > 1 else sync.PARALLEL_MIN_SIZE)
    handover = mock.patch.object(sync._Donor, "wanted", (lambda self: True) if workers > 1 else sync._Donor.wanted)
    big = mock.patch.object(sync, "BIG_FOLDER", 1 if workers > 1 else sync.BIG_FOLDER)
    slices = mock.patch.object(sync, "SLICE_MIN", 1 if workers > 1 else sync.SLICE_MIN)
    chunks = mock.patch.object(sync, "SLICE_CHUNK", 2 if workers > 1 else sync.SLICE_CHUNK)
    return split, threads, handover, big, slices, chunks


def mirrored(tree: dict, drawn) -> dict:
    """What REPLICA must hold for a SOURCE snapshot: excluded paths left
    out; with a window, mtimes only as exact as the window."""
    view = {}
    for rel, value in tree.items():
        if drawn["exclude"] and b"c" in rel.split(b"/"):
            continue
        if value[0] == "file" and value[-2][:1] == same_file(())[:1]:  # names of one file, those mirrored
            names = [n for n in value[-2][1] if not (drawn["exclude"] and b"c" in n.split(b"/"))]
            value = (*value[:-2], *([same_file(names)] if len(names) > 1 else []), value[-1])
        if drawn["window"] and value[0] in ("file", "dir"):
            value = (*value[:-1], "within the window")
        view[rel] = value
    return view


def assert_within_window(src_tree, dst_tree):
    for rel, value in src_tree.items():
        if value[0] in ("file", "dir") and rel in dst_tree:
            assert abs(value[-1] - dst_tree[rel][-1]) <= WINDOW, rel


def source_changes(batches, drawn):
    """Apply each batch of operations to a fresh SOURCE; yield (scratch
    folder, SOURCE, REPLICA) after each, with the drawn fan-out in force."""
    split, threads, handover, big, slices, chunks = fan_out_everything(drawn["workers"])
    with split, threads, handover, big, slices, chunks, tempfile.TemporaryDirectory() as scratch:
        src, dst = os.path.join(scratch, "src"), os.path.join(scratch, "dst")
        os.mkdir(src)
        os.mkdir(dst)
        source = Source(src)
        for batch in batches:
            for op in batch:
                source.apply(op)
            yield scratch, src, dst


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=BATCHES, drawn=OPTIONS)
# A file that becomes a folder while a new file comes, the new one left to
# the folder's slices (found by hypothesis: the replica's file was not
# examined, and its folder could not be made).
@example(batches=[[("write", "a", b"")], [("write", "b", b""), ("write", "a/a", b"")]],
         drawn={"checksum": False, "workers": 3, "trash": False, "exclude": False, "window": False})
def test_replica_equals_source_after_every_pass(batches, drawn):
    for scratch, src, dst in source_changes(batches, drawn):
        before = snapshot(src)
        result = sync.run_pass(src, dst, make_options(scratch, drawn))
        assert result.errors == 0 and result.exact
        assert snapshot(src) == before, "SOURCE changed"
        after = snapshot(dst)
        differences = diff(mirrored(before, drawn), mirrored(after, drawn))
        assert not differences, differences
        if drawn["exclude"] and drawn.get("delete_excluded"):  # excluded entries go from REPLICA too
            assert not [rel for rel in after if b"c" in rel.split(b"/")]
        assert_within_window(before, after)
        assert not [n for n in os.listdir(dst) if n.startswith(".syncpy-")]


def comparable(events):
    """Events as a dry run and a real pass can both know them: the trash
    folder's name is the time of the pass."""
    return [e._replace(detail=e.detail.split("/", 1)[1]) if e.action == "trash" else
            e._replace(trash=e.trash and "trash") for e in events]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=BATCHES, drawn=OPTIONS)
# A file the walk replaces by a folder, in which a hard link then goes (found by hypothesis).
@example(batches=[[("write", "a", b""), ("write", "b", b"")], [("write", "a", b""), ("hardlink", "a", "b/a")]],
         drawn={"checksum": False, "workers": 1, "trash": False, "exclude": False, "window": False})
def test_a_dry_run_reports_exactly_what_the_next_pass_does(batches, drawn):
    for scratch, src, dst in source_changes(batches, drawn):
        replica = snapshot(dst)
        would, did = [], []
        dry = sync.run_pass(src, dst, make_options(scratch, drawn, dry_run=True), would.append)
        assert snapshot(dst) == replica, "the dry run changed REPLICA"
        real = sync.run_pass(src, dst, make_options(scratch, drawn), did.append)
        assert real.exact
        assert comparable(would) == comparable(did)
        assert (dry.counts, dry.checked, dry.errors) == (real.counts, real.checked, real.errors)
