"""The walk split among worker processes: same result, same log order, and
a worker that dies costs only its own work."""

import os
import signal
import time
from collections import Counter

import pytest

import sync
from conftest import count_forks, sync_once
from trees import Link, assert_mirror, diff, leftover_temp_files, make_tree, snapshot

TREE = {f"dir{d:02}": {f"sub{s}": {f"f{f}.txt": f"{d}-{s}-{f}" for f in range(5)} for s in range(3)}
        for d in range(12)}
TREE["top.txt"] = "top"


@pytest.fixture(autouse=True)
def require_fork():
    if not sync._CAN_FORK:
        pytest.skip("this platform walks in one process")


def test_workers_give_the_same_events_in_the_same_order(tmp_path):
    results = {}
    for workers in (1, 3):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, TREE)
        first = sync_once(src, dst, workers=workers)
        assert first[0].exact
        assert_mirror(src, dst)
        (src / "dir03" / "sub1" / "f2.txt").write_text("changed")
        (src / "dir07" / "sub0" / "f0.txt").unlink()
        (src / "dir11" / "new.txt").write_text("new")
        second = sync_once(src, dst, workers=workers)
        assert_mirror(src, dst)
        results[workers] = [(r.counts, r.bytes_copied, r.errors, e) for r, e in (first, second)]
    assert results[3] == results[1]
    assert len(results[3][0][3]) == 12 * (1 + 3 * 6) + 1  # every action reported once


def test_the_order_holds_when_the_split_goes_below_the_top_level(tmp_path):
    # Two top folders hold too few subtrees for three workers: the main
    # process enters them (and the split goes one level down) while their
    # own events, and their finish, must still come where one process
    # walking depth first puts them.
    tree = {top: {"own.txt": top, **{f"sub{s:02}": {f"f{f}": f"{top}{s}{f}" for f in range(3)}
                                     for s in range(10)}} for top in ("a", "b")}
    results = {}
    for workers in (1, 3):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, tree)
        first = sync_once(src, dst, workers=workers)
        for top in ("a", "b"):
            (src / top / "own.txt").write_text("changed")
            (src / top / "sub05" / "f1").write_text("changed")
            os.chmod(src / top, 0o750)  # reported when the folder is finished
        second = sync_once(src, dst, workers=workers)
        assert second[0].exact
        assert_mirror(src, dst)
        results[workers] = [[(e.action, e.path, e.detail) for e in events] for _, events in (first, second)]
    assert results[3] == results[1]
    paths = [path for _, path, _ in results[3][1]]
    assert paths == ["a/own.txt", "a/sub05/f1", "a", "b/own.txt", "b/sub05/f1", "b"]


@pytest.mark.parametrize("depth", [3, sync.SPLIT_MAX_DEPTH + 3])
def test_the_order_holds_in_a_chain_that_cannot_be_split(tmp_path, depth):
    # Each folder holds one subfolder: the main process walks it all itself,
    # with no subtree left (3) or one left below the split depth.
    chain = leaf = {}
    for level in range(depth):
        leaf[f"file{level}"] = str(level)
        leaf = leaf.setdefault(f"level{level}", {})
    results = {}
    for workers in (1, 3):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, chain)
        result, events = sync_once(src, dst, workers=workers)
        assert result.exact
        assert_mirror(src, dst)
        results[workers] = [(e.action, e.path) for e in events]
    assert results[3] == results[1]


# One subtree holds nearly everything: its worker must hand folders over.
LOPSIDED = {"big": {f"s{s:02}": {**{f"f{f}": f"{s}-{f}" for f in range(3)}, "deeper": {"g": f"g{s}"}}
                    for s in range(20)}, "small": {"f": "x"}}


def hand_over_once_asked(monkeypatch):
    """The worker walking big waits in big/s00 until the parent asks for a
    folder (the other worker is idle), so that a handover surely happens."""
    parent, real_enter = os.getpid(), sync._Walk.enter

    def enter(self, frame):
        if os.getpid() != parent and frame.rel == "big/s00":
            deadline = time.monotonic() + 60
            while not self.donor.wanted() and time.monotonic() < deadline:
                time.sleep(0.001)
        return real_enter(self, frame)

    monkeypatch.setattr(sync._Walk, "enter", enter)


def test_a_worker_hands_folders_over_to_an_idle_one_with_the_same_events_in_the_same_order(tmp_path, monkeypatch):
    hand_over_once_asked(monkeypatch)
    results, said = {}, []
    for workers in (1, 2):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, LOPSIDED)
        os.chmod(src / "big" / "s07", 0o750)
        runs = [sync_once(src, dst, workers=workers, explain=True)]
        for s in (0, 7, 19):
            (src / "big" / f"s{s:02}" / "f1").write_text("changed")
            (src / "big" / f"s{s:02}" / "deeper" / "g").unlink()
            os.chmod(src / "big" / f"s{s:02}", 0o700)  # reported when the folder is finished
        runs.append(sync_once(src, dst, workers=workers, explain=True))
        assert runs[1][0].exact
        assert_mirror(src, dst)
        said += [e.detail for _, events in runs for e in events if "handed over" in e.detail]
        results[workers] = [[(e.action, e.path, e.detail) for e in events if e.action != "debug"]
                            for _, events in runs]
    assert results[2] == results[1]
    assert len(said) == 2 and all(int(line.split()[4]) >= 1 for line in said), said


@pytest.mark.parametrize("replaced_by", ["link", "folder"])
def test_a_folder_handed_over_is_reached_again_only_if_it_is_still_the_same(tmp_path, monkeypatch, replaced_by):
    # Between the handover and the other worker's start, the replica folder
    # is replaced: by a link to a folder outside (writing through it would
    # write outside REPLICA), or by another folder.  Neither is entered.
    hand_over_once_asked(monkeypatch)
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    make_tree(src, LOPSIDED)
    outside.mkdir()
    real_hand_out, swapped = sync._FanOut.hand_out, []

    def hand_out(self, w):
        if self.handed >= self.forked and not swapped:  # the first handoff, before it goes
            folder = dst / self.tasks[self.handed].rel
            os.rename(folder, tmp_path / "moved-away")
            if replaced_by == "link":
                os.symlink(outside, folder)
            else:
                folder.mkdir()
            swapped.append(folder)
        real_hand_out(self, w)

    monkeypatch.setattr(sync._FanOut, "hand_out", hand_out)
    result, events = sync_once(src, dst, workers=2)
    assert swapped
    errors = [(e.path, e.detail) for e in events if e.action == "error"]
    assert len(errors) == 1 and errors[0][0] == str(swapped[0].relative_to(dst))
    assert "cannot reach the folder again" in errors[0][1]
    assert not result.exact
    assert os.listdir(outside) == []
    if replaced_by == "folder":
        assert os.listdir(swapped[0]) == []
    monkeypatch.undo()
    assert sync_once(src, dst, workers=2)[0].exact
    assert_mirror(src, dst)


# Many small subtrees: the parent hands them out in ranges of several.
MANY = {f"d{d:03}": {"f.txt": f"{d}", "sub": {"g.txt": f"g{d}"}} for d in range(240)}


def test_subtrees_handed_out_in_ranges_give_the_same_events_in_the_same_order(tmp_path, monkeypatch):
    sizes = []
    real_hand_out = sync._FanOut.hand_out

    def hand_out(self, w):
        before = self.handed
        real_hand_out(self, w)
        sizes.append(self.handed - before)

    monkeypatch.setattr(sync._FanOut, "hand_out", hand_out)
    results = {}
    for workers in (1, 2):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, MANY)
        first = sync_once(src, dst, workers=workers)
        for d in (0, 77, 161, 239):
            (src / f"d{d:03}" / "sub" / "g.txt").write_text("changed")
            (src / f"d{d:03}" / "f.txt").unlink()
        second = sync_once(src, dst, workers=workers)
        assert second[0].exact
        assert_mirror(src, dst)
        results[workers] = [[(e.action, e.path, e.detail) for e in events] for _, events in (first, second)]
    assert max(sizes) > 1  # ranges of several subtrees were handed out
    assert results[2] == results[1]
    assert len(results[2][0]) == 240 * 4


def assert_counted(result, events):
    """The pass's counts and bytes are those of the events it reported."""
    assert result.counts == Counter(e.action for e in events if e.action != "debug")
    assert result.errors == result.counts["error"]
    assert result.bytes_copied == sum(int(e.detail) for e in events if e.action in ("copy", "update"))


def test_a_worker_killed_in_a_range_costs_only_the_subtree_it_was_walking(src, dst, monkeypatch):
    make_tree(src, MANY)
    parent, real_enter = os.getpid(), sync._Walk.enter

    def enter(self, frame):
        if frame.rel == "d150" and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_enter(self, frame)

    monkeypatch.setattr(sync._Walk, "enter", enter)
    result, events = sync_once(src, dst, workers=2)
    errors = [e.detail for e in events if e.action == "error"]
    assert len(errors) == 1 and "ended unexpectedly" in errors[0]
    assert_counted(result, events)  # what it reported before it died included
    # The other subtrees of its ranges, those it had walked and not yet
    # reported included, are mirrored: walked here after it died.
    assert sorted(os.listdir(dst / "d150")) == []
    for d in range(240):
        if d != 150:
            assert_mirror(src / f"d{d:03}", dst / f"d{d:03}")
    assert leftover_temp_files(dst) == []
    monkeypatch.undo()
    assert sync_once(src, dst, workers=2)[0].exact
    assert_mirror(src, dst)


def test_a_worker_that_dies_costs_only_its_own_work(src, dst, monkeypatch):
    make_tree(src, TREE)
    real_serve = sync._FanOut.serve
    # Only the first child dies: later ones are forked after the parent noted its pid.
    first = count_forks(monkeypatch)

    def serve_or_die(self, *args):
        if not first:  # the first worker forked dies at once, as if killed
            os.kill(os.getpid(), signal.SIGKILL)
        return real_serve(self, *args)

    monkeypatch.setattr(sync._FanOut, "serve", serve_or_die)
    result, events = sync_once(src, dst, workers=2)
    errors = [e.detail for e in events if e.action == "error"]
    assert len(errors) == 1 and "ended unexpectedly" in errors[0]
    assert leftover_temp_files(dst) == []
    monkeypatch.undo()
    result, _ = sync_once(src, dst, workers=2)
    assert result.exact
    assert_mirror(src, dst)


def test_a_stop_request_reaches_the_workers(src, dst):
    make_tree(src, {f"d{i:02}": {f"f{j}": os.urandom(2000) for j in range(40)} for i in range(30)})
    seen = []
    result = sync.run_pass(src, dst, sync.Options(workers=2), seen.append, should_stop=lambda: bool(seen))
    assert result.interrupted and not result.exact
    copied = sum(len(files) for _, _, files in os.walk(dst))
    assert copied < 30 * 40
    for dirpath, _, files in os.walk(dst):  # what was copied is complete
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), dst)
            assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert sync_once(src, dst, workers=2)[0].exact
    assert_mirror(src, dst)


# One folder of 60 files beside a few others: with BIG_FOLDER and SLICE_MIN
# lowered (cut_small_folders), its files are cut into slices, one per worker
# process.
FLAT = {"flat": {**{f"f{i:03}": f"file {i}" for i in range(60)}, "link": Link("f001"), "sub": {"x": "x"},
                 "c": "excluded"},
        "other": {"y": "y"}}


def cut_small_folders(monkeypatch, slices_from=10):
    """A folder of 10 entries is big (its files mirrored SLICE_CHUNK at a
    time); from slices_from, its files are cut into slices."""
    monkeypatch.setattr(sync, "BIG_FOLDER", 10)
    monkeypatch.setattr(sync, "SLICE_MIN", slices_from)


def note_slices(monkeypatch, path, unexamined_only=False):
    """Append a line to path for each slice mirrored, in whichever process:
    the folder and the names it takes (unexamined_only: of them, those the
    folder's planner had not examined)."""
    real = sync._Walk.mirror_slice

    def mirror_slice(self, frame, steps, unexamined, *args):
        with open(path, "a") as f:
            f.write(f"{frame.rel} {len(unexamined) if unexamined_only else len(steps) + len(unexamined)}\n")
        return real(self, frame, steps, unexamined, *args)

    monkeypatch.setattr(sync._Walk, "mirror_slice", mirror_slice)


def change_flat(src):
    flat = src / "flat"
    for i in (5, 25, 35, 45, 58):  # in every slice
        (flat / f"f{i:03}").write_text("changed")
    os.chmod(flat / "f010", 0o600)
    (flat / "f020").unlink()
    os.rename(flat / "f030", flat / "g030")  # a rename, matched by the main listing
    (flat / "f040").unlink()
    (flat / "f040").mkdir()  # a file that became a folder
    (flat / "f041").unlink()
    (flat / "f041").symlink_to("f001")
    os.link(flat / "f050", flat / "h050")  # a second name: left to the hard-link phase
    (flat / "new").write_text("new")
    for i in (12, 13, 14, 33, 34):  # new names among those on both sides: one at each place in a part
        (flat / f"f{i:03}a").write_text("new")
    (flat / "c").write_text("still excluded")
    try:
        os.setxattr(flat / "f055", "user.k", b"v")
    except OSError:
        pass  # a file system without them here


@pytest.mark.parametrize("parts", [3, 1])
@pytest.mark.parametrize("excluding", ["nothing", "c", "c, deleted"])
def test_a_big_folder_cut_into_slices_gives_the_same_events_in_the_same_order(tmp_path, monkeypatch, excluding,
                                                                              parts):
    # Without excludes the slices' files never reach the folder's planner;
    # with them the planner judges every name.  A temporary file on both
    # sides is the planner's in either case: skipped, and removed.
    cut_small_folders(monkeypatch, slices_from=10 if parts == 3 else 1000)
    monkeypatch.setattr(sync, "SLICE_CHUNK", 3)  # each slice mirrored 3 names at a time
    note_slices(monkeypatch, tmp_path / "slices")
    options = {"nothing": {}, "c": {"excludes": sync.Excludes(["c"])},
               "c, deleted": {"excludes": sync.Excludes(["c"]), "delete_excluded": True}}[excluding]
    temporary = ".syncpy-00000000000000ff.tmp"
    results = {}
    for workers in (1, 3):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, FLAT)
        runs = [sync_once(src, dst, workers=workers, **options)]
        change_flat(src)
        (dst / "flat" / "c").write_text("in the replica")
        for side in (src, dst):
            (side / "flat" / temporary).write_text("half written")
        runs.append(sync_once(src, dst, workers=workers, **options))
        runs.append(sync_once(src, dst, workers=workers, **options))
        for result, _ in runs:
            assert result.exact
        assert not (dst / "flat" / temporary).exists()
        mirrored = {rel: value for rel, value in snapshot(src).items() if rel != b"flat/" + temporary.encode()}
        got = snapshot(dst)
        if excluding != "nothing":
            del mirrored[b"flat/c"]
            if excluding == "c":
                assert (dst / "flat" / "c").read_text() == "in the replica"  # left alone
                del got[b"flat/c"]
        assert diff(mirrored, got) == []
        assert runs[2][1] == []
        results[workers] = [(r.counts, r.bytes_copied, r.errors, [(e.action, e.path, e.detail) for e in events])
                            for r, events in runs]
    assert results[3] == results[1]
    said = sync_once(src, dst, workers=3, explain=True, **options)[1]
    assert [(e.path, e.detail) for e in said if "slices" in e.detail] == [
        ("flat", "files in 3 slices of about 22 by name, each mirrored by a process of its own")][:parts - 1]
    # Each pass cut "flat" into three slices (the first pass for its 60
    # copies: nothing was on both sides yet), and so did the one with -v;
    # below SLICE_MIN, one slice each, in this process.
    slices = (tmp_path / "slices").read_text().split("\n")[:-1]
    assert len(slices) == 4 * parts and {line.split()[0] for line in slices} == {"flat"}, slices


@pytest.mark.parametrize("parts", [3, 1])
def test_new_files_of_a_big_folder_go_to_its_slices_unless_a_replica_name_could_be_their_old_one(
        tmp_path, monkeypatch, parts):
    # A first copy, and files added with none removed: the folder's planner
    # examines none of the new files, the slices do.  Once the replica holds
    # a name the source lacks, a new file may be it renamed: the planner
    # examines the new files then, and matches the rename.
    cut_small_folders(monkeypatch, slices_from=10 if parts == 3 else 1000)
    monkeypatch.setattr(sync, "SLICE_CHUNK", 3)
    note_slices(monkeypatch, tmp_path / "slices", unexamined_only=True)
    results = {}
    for workers in (1, 3):
        src, dst = tmp_path / f"src{workers}", tmp_path / f"dst{workers}"
        make_tree(src, FLAT)
        runs, examined = [], []
        for change in ("first copy", "added", "renamed"):
            if change == "added":
                for i in range(60, 70):
                    (src / "flat" / f"f{i:03}").write_text(f"new {i}")
            elif change == "renamed":
                os.rename(src / "flat" / "f065", src / "flat" / "g065")
            (tmp_path / "slices").write_text("")
            runs.append(sync_once(src, dst, workers=workers))
            assert runs[-1][0].exact
            assert_mirror(src, dst)
            examined.append(sum(int(line.split()[1]) for line in (tmp_path / "slices").read_text().splitlines()))
        results[workers] = [(r.counts, r.bytes_copied, [(e.action, e.path, e.detail) for e in events])
                            for r, events in runs]
        # One process has no slices.  With them: the 61 files copied (60
        # and "c"), then those and the 10 added; then the 70 on both sides
        # (g065, new, is the planner's, which finds it is f065 renamed).
        assert examined == ([0, 0, 0] if workers == 1 else [61, 71, 70])
    assert results[3] == results[1]
    assert ("move", "flat/g065", "flat/f065") in results[1][2][2]


@pytest.mark.parametrize("parts", [3, 1])
@pytest.mark.parametrize("became", ["a folder", "a link", "a FIFO"])
def test_a_replica_file_whose_name_is_now_another_kind_goes_while_new_files_come(tmp_path, monkeypatch, became,
                                                                                  parts):
    # The new files go to the slices unexamined (the replica lists no name
    # the source lacks); the replica's f05 must still be examined, and go.
    cut_small_folders(monkeypatch, slices_from=10 if parts == 3 else 1000)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {f"f{i:02}": str(i) for i in range(30)})
    sync_once(src, dst, workers=3)
    (src / "f05").unlink()
    if became == "a folder":
        (src / "f05").mkdir()
        (src / "f05" / "inside").write_text("inside")
    elif became == "a link":
        (src / "f05").symlink_to("f06")
    else:
        os.mkfifo(src / "f05")
    for i in range(10):
        (src / f"n{i:02}").write_text(f"new {i}")
    result, events = sync_once(src, dst, workers=3)
    assert [e for e in events if e.action == "error"] == []
    assert result.exact
    assert_mirror(src, dst)  # (a FIFO is never mirrored: its name is gone from the replica)
    assert not (became == "a FIFO" and os.path.lexists(dst / "f05"))


@pytest.mark.parametrize("dies", ["at its start", "midway"])
def test_a_slice_whose_process_dies_costs_only_that_slice(tmp_path, src, dst, monkeypatch, dies):
    # Slices of about 21 names: "c" and f000-f019, f020-f040, f041-f059.
    # The second one's process dies before its first file, or as it is
    # about to copy f030: the copies it had done are still reported
    # (REPORT_EVERY 0: each sent at once).
    cut_small_folders(monkeypatch)
    make_tree(src, FLAT)
    sync_once(src, dst, workers=3)
    for i in range(60):
        (src / "flat" / f"f{i:03}").write_text(f"changed {i}")
    owner = os.getpid()
    if dies == "at its start":
        real = sync._Walk.mirror_slice

        def mirror_slice(self, frame, steps, unexamined, *args):
            if os.getpid() != owner and "f025" in unexamined:  # the second slice's process
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, frame, steps, unexamined, *args)

        monkeypatch.setattr(sync._Walk, "mirror_slice", mirror_slice)
    else:
        real_copy = sync._copy_file

        def copy_file(sd, dd, name, *args, **kwargs):
            if os.getpid() != owner and name == "f030":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_copy(sd, dd, name, *args, **kwargs)

        monkeypatch.setattr(sync, "_copy_file", copy_file)
        monkeypatch.setattr(sync, "REPORT_EVERY", 0)
    result, events = sync_once(src, dst, workers=3)
    errors = [(e.path, e.detail) for e in events if e.action == "error"]
    assert len(errors) == 1 and errors[0][0] == "flat" and "ended unexpectedly" in errors[0][1]
    assert not result.exact
    updated = [e.path for e in events if e.action == "update"]
    done = range(60) if dies == "at its start" else [*range(30), *range(41, 60)]
    expected = [f"flat/f{i:03}" for i in done if not 20 <= i <= 40 or dies == "midway" and i < 30]
    assert updated == expected
    assert_counted(result, events)
    said = [(e.action, e.path) for e in events if e.action in ("update", "error")]
    error = said.index(("error", "flat"))  # after the lines of the slice that died
    assert said[error - 1:error + 2:2] == [("update", "flat/f029" if dies == "midway" else "flat/f019"),
                                         ("update", "flat/f041")]
    assert (dst / "flat" / "f030").read_text() == "file 30"  # the old version, whole
    assert leftover_temp_files(dst) == []
    monkeypatch.undo()
    assert sync_once(src, dst, workers=3)[0].exact
    assert_mirror(src, dst)


@pytest.mark.parametrize("fresh", [False, True], ids=["on both sides", "new"])
@pytest.mark.parametrize("change", ["vanished", "became a folder", "replica became a folder",
                                    "replica became a link"])
def test_a_file_that_changes_between_the_listing_and_its_slice_waits_for_the_next_pass(tmp_path, src, dst,
                                                                                       monkeypatch, change, fresh):
    # fresh: f20-f29 are new, left to the slices unexamined as well.  A
    # link put in the replica in its place is never written through.
    cut_small_folders(monkeypatch)
    make_tree(src, {f"f{i:02}": str(i) for i in range(20 if fresh else 30)})
    sync_once(src, dst, workers=2)
    for i in range(20, 30 if fresh else 20):
        (src / f"f{i}").write_text(str(i))
    outside = tmp_path / "outside"
    outside.write_text("not the replica's")
    real = sync._list_pair_for_slices

    def list_then_change(frame, keep, slice_min):
        listing = real(frame, keep, slice_min)
        assert ("f20" in listing.fresh) == fresh and "f20" in listing.unexamined
        if change == "vanished":
            (src / "f20").unlink()
        elif change == "became a folder":
            (src / "f20").unlink()
            (src / "f20").mkdir()
        else:
            if not fresh:
                (dst / "f20").unlink()
            if change == "replica became a folder":
                (dst / "f20").mkdir()
            else:
                (dst / "f20").symlink_to(outside)
        return listing

    monkeypatch.setattr(sync, "_list_pair_for_slices", list_then_change)
    result, events = sync_once(src, dst, workers=2)
    said = [(e.action, e.path, e.detail) for e in events if e.path == "f20"]
    replaced = ("error", "f20", "the replica file was replaced by another kind of entry during the pass; "
                                "the next pass mirrors it")
    assert said == {"vanished": [("vanished", "f20", "")],
                    "became a folder": [("changed", "f20", "no longer a regular file")],
                    "replica became a folder": [replaced], "replica became a link": [replaced]}[change]
    copied = {e.path for e in events if e.action in ("copy", "update")}
    assert copied == ({f"f{i}" for i in range(21, 30)} if fresh else set())
    assert outside.read_text() == "not the replica's"
    assert not result.exact
    monkeypatch.undo()
    assert sync_once(src, dst, workers=2)[0].exact
    assert_mirror(src, dst)
    assert outside.read_text() == "not the replica's"


def test_a_stop_request_reaches_the_slices(src, dst, monkeypatch):
    cut_small_folders(monkeypatch)
    make_tree(src, {f"f{i:03}": "x" for i in range(300)})
    sync_once(src, dst, workers=2)
    for i in range(300):
        (src / f"f{i:03}").write_text(f"changed {i}")
    real, owner = sync._Walk.mirror_slice, os.getpid()

    def mirror_slice(self, frame, *args):
        if os.getpid() != owner:  # the second slice waits for the request (polling, at most 60 s)
            deadline = time.monotonic() + 60
            while not self.should_stop() and time.monotonic() < deadline:
                time.sleep(0.001)
        return real(self, frame, *args)

    monkeypatch.setattr(sync._Walk, "mirror_slice", mirror_slice)
    seen = []
    # Asked to stop once the first slice has updated f010.
    result = sync.run_pass(src, dst, sync.Options(workers=2), seen.append,
                           should_stop=lambda: (dst / "f010").read_text() != "x")
    assert result.interrupted and not result.exact
    updated = [e.path for e in seen if e.action == "update"]
    assert "f010" in updated and len(updated) < 150  # none of the second slice
    assert leftover_temp_files(dst) == []
    monkeypatch.undo()
    assert sync_once(src, dst, workers=2)[0].exact
    assert_mirror(src, dst)


@pytest.mark.parametrize("why", ["not a local file system", "names that fold"])
def test_no_slices_over_a_network_or_onto_names_that_fold(tmp_path, src, dst, monkeypatch, why):
    # Over NFS or FUSE a stat after the listing costs a round trip each; a
    # name that folds is planned with the whole folder's names in view.
    cut_small_folders(monkeypatch)
    note_slices(monkeypatch, tmp_path / "slices")
    if why == "not a local file system":
        monkeypatch.setattr(sync, "LOCAL_KINDS", frozenset())
        monkeypatch.setattr(sync, "_probe_latency", lambda pd: 0.0)  # and not slow either
    else:
        monkeypatch.setattr(sync, "_probe_names", lambda pd, apart=False: sync.Names(fold="ascii"))
    make_tree(src, {f"f{i:02}": str(i) for i in range(30)})
    sync_once(src, dst, workers=2)
    for i in range(30):
        (src / f"f{i:02}").write_text("changed")
    result, events = sync_once(src, dst, workers=2)
    assert result.exact and [e.action for e in events].count("update") == 30
    assert not (tmp_path / "slices").exists()
    monkeypatch.undo()
    note_slices(monkeypatch, tmp_path / "slices")
    cut_small_folders(monkeypatch)
    (src / "f00").write_text("again")
    assert sync_once(src, dst, workers=2)[0].exact
    assert (tmp_path / "slices").exists()  # the same folder, once these hold
