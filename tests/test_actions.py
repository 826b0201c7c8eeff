"""The action table: every action's wording (done and dry run), its
itemize code and its summary label, written out here in full so that a
changed word anywhere shows."""

import pytest

import sync
from sync import Event, PassResult

# action, detail, done, would (None: as done), itemize line ("" none)
CASES = [
    ("copy", "2048", "copied a/f (2.0 KiB)", "would copy a/f (2.0 KiB)", ">f+++++++++ a/f"),
    ("update", "5", "updated a/f (5 bytes)", "would update a/f (5 bytes)", ">f.st...... a/f"),
    ("move", "a/old", "moved a/f (from a/old)", "would move a/f (from a/old)", "*moving     a/old -> a/f"),
    ("mkdir", "", "created directory a/f", "would create directory a/f", "cd+++++++++ a/f/"),
    ("link", "../t", "created link a/f -> ../t", "would create link a/f -> ../t", "cL+++++++++ a/f -> ../t"),
    ("relink", "t2", "updated link a/f -> t2", "would update link a/f -> t2", "cL.s....... a/f -> t2"),
    ("hardlink", "b/g", "linked a/f (to b/g)", "would link a/f (to b/g)", "hf+++++++++ a/f => b/g"),
    ("attrs", "owner 1000, permissions 0o600 and ACL", "set attributes of a/f (owner 1000, permissions 0o600 and ACL)",
     "would set attributes of a/f (owner 1000, permissions 0o600 and ACL)", ".f...po..a. a/f"),
    ("remove", "file", "removed file a/f", "would remove file a/f", "*deleting   a/f"),
    ("rmdir", "", "removed directory a/f", "would remove directory a/f", "*deleting   a/f/"),
    ("trash", "2026-11-26_101500.123/a/f", "kept old version of a/f (in trash as 2026-11-26_101500.123/a/f)",
     "would keep old version of a/f (in trash)", "*trashing   a/f"),
    ("prune", "", "pruned trash folder a/f", "would prune trash folder a/f", ""),
    ("temp", "", "removed leftover temporary file a/f", "would remove leftover temporary file a/f",
     "*deleting   a/f"),
    ("skip", "FIFO", "skipped a/f (FIFO)", None, ""),
    ("changed", "", "changed while copying a/f (the next pass copies it again)", None, ""),
    ("vanished", "", "vanished before copying a/f", None, ""),
    ("clamped", "2302-01-01 00:00:05 UTC is kept as 2038-01-19 03:14:07 UTC",
     "kept another time for a/f (2302-01-01 00:00:05 UTC is kept as 2038-01-19 03:14:07 UTC)", None, ""),
    ("probe", "exfat (fuseblk), times 1 s, no links, case-insensitive",
     "replica file system: exfat (fuseblk), times 1 s, no links, case-insensitive", None, ""),
    ("slow source", "nfs4, slow requests (2.1 ms to open a folder: 16 worker processes, files are copied 16 at once)",
     "source file system: nfs4, slow requests (2.1 ms to open a folder: 16 worker processes, files are copied 16 "
     "at once)", None, ""),
    ("unstored", "owners and ACLs",
     "REPLICA's file system does not store owners and ACLs: they are not mirrored", None, ""),
    ("overrun", "12.5", "the pass took 12.5 s, longer than INTERVAL; starting the next one now", None, ""),
    ("error", "cannot copy file: No space left on device (ENOSPC)",
     "a/f: cannot copy file: No space left on device (ENOSPC)", None, ""),
    ("debug", "current: size 5 and mtime 2026-11-26 10:15:00.000000001 UTC equal",
     "a/f: current: size 5 and mtime 2026-11-26 10:15:00.000000001 UTC equal", None, ""),
]

SEVERITY = {"skip": "warning", "changed": "warning", "clamped": "warning", "overrun": "warning",
            "error": "error", "debug": "debug"}
# Actions whose itemize code depends on the entry come with their code.
CODES = {"attrs": sync._itemize_attrs(sync.FILE, "pao")}


def test_every_action_is_written_out_here():
    assert sorted(a for a, *_ in CASES) == sorted(sync.ACTIONS)


@pytest.mark.parametrize("action, detail, done, would, itemized", CASES, ids=[c[0] for c in CASES])
def test_wording_itemize_code_and_severity(action, detail, done, would, itemized):
    event = Event(action, "a/f", detail, code=CODES.get(action, ""))
    assert event.text() == done
    assert event.text(dry_run=True) == (would or done)
    assert event.itemized() == itemized
    assert sync.ACTIONS[action].severity == SEVERITY.get(action, "info")


def test_paths_and_path_details_are_one_token_each_on_one_line():
    assert Event("move", "new\nname", "old\udcff").text() == 'moved "new\\nname" (from "old\\xff")'
    assert Event("copy", 'a "b" c\\d', "1").text() == 'copied "a \\"b\\" c\\\\d" (1 byte)'.replace("1 byte", "1 bytes")
    assert Event("copy", "caf\u00e9/\u00a0x", "1").text() == 'copied "caf\u00e9/\\u00a0x" (1 bytes)'
    assert Event("link", "l", "t\tx").itemized() == "cL+++++++++ l -> t\\tx"
    assert Event("error", "", "REPLICA is missing").text() == "REPLICA is missing"
    assert Event("mkdir", "").text() == "created directory ."
    trashed = Event("remove", "a b", "file", trash="2026-11-26_101500.123/a b")
    assert trashed.text() == 'removed file "a b" (kept in trash as "2026-11-26_101500.123/a b")'
    assert trashed.text(dry_run=True) == 'would remove file "a b" (would keep it in trash)'
    assert trashed.itemized() == "*deleting   a b"


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KiB"),
                                     (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"),
                                     (1 << 40, "1.0 TiB"), (1 << 50, "1024.0 TiB")])
def test_sizes_read_as_people_write_them(n, text):
    assert sync._human(n) == text
    assert Event("copy", "f", str(n)).text() == f"copied f ({text})"


def test_the_summary_counts_each_action_under_its_label_in_table_order():
    result = PassResult(checked=7, bytes_copied=3 << 20, errors=0, duration=1.234)
    for action in sync.ACTIONS:
        result.counts[action] = 1
    result.counts["copy"] = 4
    labels = ("copied 4, updated 1, moved 1, directories created 1, links created 1, links updated 1, "
              "hard links made 1, attributes set 1, removed 1, directories removed 1, kept in trash 1, "
              "trash folders pruned 1, temporary files removed 1, skipped 1, changed while copying 1, "
              "vanished 1")
    would = ("would copy 4, would update 1, would move 1, would create directories 1, would create links 1, "
             "would update links 1, would make hard links 1, would set attributes 1, would remove 1, "
             "would remove directories 1, would keep in trash 1, would prune trash folders 1, "
             "would remove temporary files 1, skipped 1, changed while copying 1, vanished 1")
    assert result.summary(dry_run=True) == (f"dry run finished in 1.23 s: checked 7, {would}, errors 0; "
                                            "3.0 MiB would be copied")
    assert result.summary() == (f"pass finished in 1.23 s: checked 7, {labels}, errors 0; 3.0 MiB copied; "
                                "replica is NOT yet an exact mirror")
    clean = PassResult(checked=2, duration=0.5)
    assert clean.summary() == "pass finished in 0.50 s: checked 2, errors 0; 0 bytes copied; replica is an exact mirror"
    for missed, unstored, text in [
            ({"missed o": 3}, [], "the owners of 3 entries (only root may give them)"),
            ({"missed o": 1, "missed g": 1}, [], "the owner of 1 entry (only root may give it); "
                                                 "the group of 1 entry (this user is not in it)"),
            ({"missed g": 1200}, ["ACLs"], "the groups of 1,200 entries (this user is not in them); "
                                           "ACLs (REPLICA's file system does not store them)"),
            ({}, ["owners", "hard links"], "owners and hard links (REPLICA's file system does not store them)")]:
        left = PassResult(checked=2, duration=0.5, unstored=unstored)
        left.counts.update(missed)
        assert left.summary().endswith(f"replica is an exact mirror except for {text}")
    clean.interrupted = True
    assert clean.summary().startswith("pass finished early (stopped) in 0.50 s")
    assert clean.summary().endswith("replica is NOT yet an exact mirror")


def test_itemize_codes_of_metadata_put_each_letter_in_rsyncs_place():
    assert sync._itemize_attrs(sync.FILE, "p") == ".f...p....."
    assert sync._itemize_attrs(sync.DIR, "ogtax") == ".d..t.og.ax"
    assert sync._itemize_attrs(sync.LINK, "t") == ".L..t......"
    assert Event("attrs", "d", "time", code=".d..t......").itemized() == ".d..t...... d/"
    assert sync._describe_attrs("xpgo", 5, 6, 0o4755) == "owner 5, group 6, permissions 0o4755 and extended attributes"


def test_options_and_results_are_records():
    # Plain records, not dataclasses (whose import cost a tenth of the start-up).
    a, b = sync.Options(workers=2), sync.Options(workers=2)
    assert a == b and a != sync.Options(workers=3)
    a.protect["LOG_FILE"] = "/x"
    assert b.protect == {}, "a mutable default is made afresh for each record"
    changed = a.replace(dry_run=True)
    assert changed.dry_run and changed.workers == 2 and not a.dry_run
    assert "workers=2" in repr(a)
    with pytest.raises(TypeError):
        sync.Options(no_such_field=1)
    result = sync.PassResult(checked=3)
    assert result.counts == {} and result.counts is not sync.PassResult().counts
