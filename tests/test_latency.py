"""A REPLICA slow to answer (a NAS): the probe tells it by the time a name
takes to look up, and then every file's copy runs in a pool of
threads so that the waits overlap, with the same result and the same log
order as one file at a time."""

import concurrent.futures
import os

import pytest

import sync
from conftest import count_forks
from trees import assert_mirror, make_tree


def test_the_probe_tells_a_slow_replica_from_a_local_disk(tmp_path):
    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        ticks = iter(range(100))
        assert sync._probe_latency(folder, clock=lambda: next(ticks) * 0.001) == 0.001  # 1 ms each
        ticks = iter(range(100))
        assert sync._probe_latency(folder, clock=lambda: next(ticks) * 0.00001) == 0.0  # 10 us each
        assert os.listdir(tmp_path) == [], "nothing left behind"
    finally:
        if sync._DIR_FD:
            os.close(folder)


def test_the_probe_tells_a_slow_source_by_reading_only(tmp_path):
    (tmp_path / "f").write_text("x")
    before = sorted(os.listdir(tmp_path)), os.stat(tmp_path).st_mtime_ns
    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        ticks = iter(range(100))
        assert sync._probe_source_latency(folder, clock=lambda: next(ticks) * 0.0005) == 0.0005
        ticks = iter(range(100))
        assert sync._probe_source_latency(folder, clock=lambda: next(ticks) * 0.00001) == 0.0
    finally:
        if sync._DIR_FD:
            os.close(folder)
    assert (sorted(os.listdir(tmp_path)), os.stat(tmp_path).st_mtime_ns) == before


def test_only_file_systems_that_may_wait_on_a_network_are_timed(tmp_path, monkeypatch):
    # A busy machine once made a local ext4 look slow: its type alone decides.
    monkeypatch.setattr(sync, "_probe_latency", lambda pd: 0.002)
    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        for kind in ("ext4", "xfs", "tmpfs", "vfat"):
            assert sync._probe_replica(folder, kind).latency == 0.0, kind
        for kind in ("nfs4", "cifs", "fuse.sshfs", "exfat (fuseblk)", "fuse", ""):
            assert sync._probe_replica(folder, kind).latency == 0.002, kind
    finally:
        if sync._DIR_FD:
            os.close(folder)
    assert os.listdir(tmp_path) == []


def test_a_slow_replica_is_named_in_the_probe_line():
    said = sync.Stores(kind="nfs4", latency=0.0029).describe()
    assert said == "nfs4, times 1 ns, slow requests (2.9 ms to look up a name: files are copied 16 at once)"
    said = sync.Stores(kind="nfs4", latency=0.0029).describe(workers=16)
    assert said.endswith("(2.9 ms to look up a name: 16 worker processes, files are copied 16 at once)")


def test_the_latency_probe_only_looks_names_up(tmp_path, monkeypatch):
    # It runs before the other probes, alone, so that nothing else queues
    # with it, and writes nothing: a folder's creations wait in line.
    (tmp_path / "f").write_text("x")
    before = sorted(os.listdir(tmp_path)), os.stat(tmp_path).st_mtime_ns
    looked_up = []
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        looked_up.append(os.path.basename(path))
        return real_stat(path, *args, **kwargs)

    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        monkeypatch.setattr(sync.os, "stat", stat)
        assert sync._probe_latency(folder) == 0.0  # a local disk: far below SLOW_REQUEST
    finally:
        monkeypatch.undo()
        if sync._DIR_FD:
            os.close(folder)
    assert len(looked_up) == len(set(looked_up)) == 3 and all(sync._TEMP_NAME.match(n) for n in looked_up)
    assert (sorted(os.listdir(tmp_path)), os.stat(tmp_path).st_mtime_ns) == before


def test_a_slow_replicas_probes_at_once_find_what_they_find_one_at_a_time_on_a_posix_disk(tmp_path, monkeypatch):
    # Where every name tried is kept as it is (most shares), four files in
    # one folder tell so: the name probe makes no folder per name.
    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        one_at_a_time = sync._probe_replica(folder, "ext4")
        monkeypatch.setattr(sync, "_probe_latency", lambda dd: 0.002)
        folders, real_in_a_folder = [], sync._in_a_folder

        def in_a_folder(pd, probe, *args):
            folders.append(probe.__name__)
            return real_in_a_folder(pd, probe, *args)

        monkeypatch.setattr(sync, "_in_a_folder", in_a_folder)
        at_once = sync._probe_replica(folder, "fuse")
    finally:
        if sync._DIR_FD:
            os.close(folder)
    assert one_at_a_time.names == sync.Names()
    assert at_once == one_at_a_time._replace(kind="fuse", latency=0.002)
    assert sorted(folders) == ["_probe_names", "_probe_times"]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("found, fold", [({"PROBE-\u00c9-A "}, "unicode"), ({"PROBE-\u00e9-A "}, "ascii"),
                                         ({"PROBE-\u00c9-A ", "PROBE-\u00e9-A "}, "unicode"), (set(), "")])
def test_the_quick_name_probe_tells_how_a_share_folds_case(tmp_path, monkeypatch, found, fold):
    # No file system here folds case and keeps every name (a Samba share
    # of a case-insensitive folder would): its lookups are made up.
    real_exists_at = sync._exists_at
    monkeypatch.setattr(sync, "_exists_at", lambda fd, name: name in found or real_exists_at(fd, name))
    monkeypatch.setattr(sync.os.path, "lexists", lambda path: os.path.basename(path) in found)
    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        assert sync._fold_where_names_are_kept(folder, "a:b\udcff.") == fold
    finally:
        if sync._DIR_FD:
            os.close(folder)


def test_the_quick_name_probe_gives_up_where_a_name_is_refused_or_changed(tmp_path, monkeypatch):
    folder = os.open(tmp_path, os.O_RDONLY) if sync._DIR_FD else str(tmp_path)
    try:
        real_open = os.open

        def refusing(path, flags, *args, **kwargs):
            if os.path.basename(path) == "CON":
                raise OSError(22, "Invalid argument")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(sync.os, "open", refusing)
        assert sync._fold_where_names_are_kept(folder, "a:b.") is None
        monkeypatch.undo()
        for name in os.listdir(tmp_path):
            os.unlink(tmp_path / name)
        real_listdir = os.listdir
        monkeypatch.setattr(sync.os, "listdir", lambda d: [n.rstrip(".") for n in real_listdir(d)])  # trims
        assert sync._fold_where_names_are_kept(folder, "a:b.") is None
    finally:
        monkeypatch.undo()
        if sync._DIR_FD:
            os.close(folder)


@pytest.mark.skipif(not sync._CAN_FORK, reason="this platform walks in one process")
def test_a_slow_replica_is_walked_by_more_worker_processes(tmp_path, monkeypatch):
    tree = {f"d{d:02}": {f"s{s}": {"f": f"{d}{s}"} for s in range(3)} for d in range(12)}
    forks = count_forks(monkeypatch)
    results = {}
    for latency, slow_workers, processes in ((0.0, 0, 0), (0.0, 5, 2), (0.002, 0, 2), (0.002, 5, 5)):
        src, dst = tmp_path / "src", tmp_path / f"dst{latency}-{slow_workers}"
        if not src.exists():
            make_tree(src, tree)
        mirror = sync.Mirror(src, dst, sync.Options(workers=2 if processes else 1, slow_workers=slow_workers))
        mirror.check(create=True)
        mirror.stores = sync.Stores(latency=latency)  # as the probe would find it
        forks.clear()
        events = []
        assert mirror.run_pass(events.append).exact
        assert_mirror(src, dst)
        assert len(forks) == processes, (latency, slow_workers)
        results[latency, slow_workers] = events
    assert len({tuple(events) for events in results.values()}) == 1  # the same events in the same order


@pytest.mark.skipif(not sync._CAN_FORK, reason="this platform walks in one process")
def test_a_slow_source_is_said_once_and_walked_by_more_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "LOCAL_KINDS", frozenset())  # this disk, timed as if it were a share
    monkeypatch.setattr(sync, "_probe_latency", lambda pd: 0.0)  # the replica is fast
    monkeypatch.setattr(sync, "_probe_source_latency", lambda sd: 0.0021)  # the source is not
    forks = count_forks(monkeypatch)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {f"d{d:02}": {"f": f"{d}", "s": {"g": "g"}} for d in range(12)})
    mirror = sync.Mirror(src, dst, sync.Options(workers=2, slow_workers=5))
    mirror.check(create=True)
    said = []
    for change in ("first", "second"):
        forks.clear()
        events = []
        (src / "d03" / "f").write_text(change)
        assert mirror.run_pass(events.append).exact
        assert_mirror(src, dst)
        assert len(forks) == 5
        said.append([e.detail for e in events if e.action == "slow source"])
    assert len(said[0]) == 1  # "<its type>, slow requests ..."
    assert said[0][0].endswith(", slow requests (2.1 ms to open a folder: 5 worker processes, files are copied "
                               "16 at once)")
    assert said[1] == []  # once a run


def test_the_command_line_asks_for_more_processes_on_a_slow_replica_unless_told_how_many(tmp_path):
    args = [str(tmp_path / "s"), str(tmp_path / "r"), "5", str(tmp_path / "log")]
    (tmp_path / "s").mkdir()
    assert sync._Settings(args).options.slow_workers == sync.SLOW_WORKERS == 16
    assert sync._Settings(args).options.workers == sync.DEFAULT_WORKERS
    told = sync._Settings(args + ["--workers", "3"]).options
    assert (told.workers, told.slow_workers) == (3, 0)


def run(src, dst, trash, latency, monkeypatch):
    """Two passes (a first copy, then updates, removals and a rename) with
    REPLICA's probe answer preset; the events of each and the thread pools made."""
    pools = []
    real_pool = concurrent.futures.ThreadPoolExecutor

    def counting_pool(threads, **kwargs):
        pools.append(threads)
        return real_pool(threads, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", counting_pool)  # sync imports it late
    mirror = sync.Mirror(src, dst, sync.Options(trash=str(trash)))
    mirror.check(create=True)
    mirror.stores = sync.Stores(latency=latency)  # as the probe would find it
    passes = []
    for change in (None, "edit"):
        if change:
            for i in range(0, 300, 7):
                (src / "many" / f"f{i:03}").write_text(f"new {i}")
            (src / "many" / "f001").unlink()
            os.rename(src / "d", src / "d-renamed")
        events = []
        result = mirror.run_pass(events.append)
        assert result.exact, result.summary()
        # Without the trash folder's name, which is the time of the pass.
        passes.append([e._replace(trash=e.trash.split("/", 1)[-1],
                                  detail=e.detail.split("/", 1)[-1] if e.action == "trash" else e.detail)
                       for e in events])
    monkeypatch.undo()
    return passes, pools


def test_files_copied_in_threads_give_the_same_replica_and_the_same_events_in_order(tmp_path, monkeypatch):
    tree = {"many": {f"f{i:03}": f"content {i}" * (i % 5) for i in range(300)},  # more than PENDING_LIMIT
            "d": {"a": "a", "b": "b" * 5000}, "big.bin": os.urandom(2 << 20)}
    results = {}
    for latency in (0.0, 0.002):
        src, dst = tmp_path / f"src{latency}", tmp_path / f"dst{latency}"
        make_tree(src, tree)
        results[latency] = run(src, dst, tmp_path / f"trash{latency}", latency, monkeypatch)
        assert_mirror(src, dst)
    (one_at_a_time, pools_local), (overlapped, pools_slow) = results[0.0], results[0.002]
    assert overlapped == one_at_a_time
    assert pools_local == [sync.LARGE_FILE_THREADS], "locally only the large file (first pass) goes to threads"
    assert pools_slow == [sync.LATENCY_THREADS] * 2
    assert len([e for e in overlapped[0] if e.action == "copy"]) == 303
