"""The walk split among worker processes: same result, same log order, and
a worker that dies costs only its own work."""

import os
import signal
import time

import pytest

import sync
from conftest import count_forks, sync_once
from trees import assert_mirror, leftover_temp_files, make_tree

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
