"""The planner alone: decisions from two listings, with no tree on disk."""

import os

import sync
from sync import DIR, FILE, LINK, SPECIAL, Entry, Keep, Options, Times, _Listing, _sort_out, _steps

T = 1_600_000_000_123_456_789  # an mtime with a sub-second part


def st(size=1, mtime=T, mode=0o100644, uid=0, gid=0, nlink=1, ino=1):
    return os.stat_result((mode, ino, 1, nlink, uid, gid, size, 0, 0, 0, 0, 0, 0, mtime, mtime, mtime))


def f(size=1, mtime=T, mode=0o100644, **kw):
    return Entry(FILE, st(size, mtime, mode, **kw))


def d(mtime=T, mode=0o40755):
    return Entry(DIR, st(4096, mtime, mode))


def link(target, mtime=T, uid=0):
    return Entry(LINK, st(len(target), mtime, 0o120777, uid=uid), target)


def listing(src, dst, rel="", unreadable=(), dst_unreadable=()):
    return _Listing(rel, src, list(unreadable), dst, list(dst_unreadable))


def kinds(steps):
    return [(s.kind, s.name) for s in steps]


def test_what_is_wanted_what_goes_and_what_is_skipped():
    fifo = Entry(SPECIAL, st(mode=0o10644))
    plan = _sort_out(listing(
        {"a": f(), "b": d(), ".syncpy-0123456789abcdef.tmp": f(), "pipe": fifo, "kind": d()},
        {"a": f(), "old": f(5, T + 7), "kind": f(), ".syncpy-0000000000000000.tmp": f()}),
        Options(), is_root=False, replica_exists=True)
    assert sorted(plan.wanted) == ["a", "b", "kind"]
    assert plan.skipped == [("pipe", "FIFO")]
    assert plan.unwanted == [".syncpy-0000000000000000.tmp", "kind", "old"]
    assert plan.doomed == ["kind", "old"], "temporary files are not counted by the guards"
    assert plan.checked == 5 and plan.refusal == "" and not plan.empty


def test_unreadable_entries_are_reported_and_their_replica_entries_kept():
    err = PermissionError(13, "Permission denied")
    plan = _sort_out(listing({"ok": f()}, {"secret": f(), "gone": f()}, unreadable=[("secret", err)],
                             dst_unreadable=[("x", err)]), Options(), False, True)
    assert plan.failed == [("secret", "read", err), ("x", "examine replica entry", err)]
    assert plan.keep == {"secret", "x"} and plan.unwanted == ["gone"]


def test_excludes_leave_both_sides_alone_unless_delete_excluded():
    src = {"keep.txt": f(), "a.tmp": f(), "cache": d()}
    dst = {"a.tmp": f(2), "b.tmp": f(), "cache": d(), "stale": f()}
    excludes = sync.Excludes(["*.tmp", "cache/"])
    plan = _sort_out(listing(src, dst, rel="x"), Options(excludes=excludes), False, True)
    assert sorted(plan.wanted) == ["keep.txt"] and plan.unwanted == ["stale"] and plan.checked == 1
    plan = _sort_out(listing(src, dst), Options(excludes=excludes, delete_excluded=True), False, True)
    assert plan.unwanted == ["a.tmp", "b.tmp", "cache", "stale"]


def test_renames_are_matched_only_on_unique_signatures_with_subsecond_times():
    src = {"new": f(10, T + 1), "newdir": d(T + 2), "whole": f(10, 1_600_000_000 * 10**9), "twin1": f(3, T + 3),
           "twin2": f(3, T + 3)}
    dst = {"old": f(10, T + 1), "olddir": d(T + 2), "whole0": f(10, 1_600_000_000 * 10**9), "t": f(3, T + 3)}
    plan = _sort_out(listing(src, dst), Options(), False, True)
    assert plan.moves == [("old", "new"), ("olddir", "newdir")]
    assert plan.doomed == ["t", "whole0"]
    assert _sort_out(listing(src, dst), Options(), False, replica_exists=False).moves == []


def test_an_empty_source_root_beside_a_full_replica_is_refused_unless_allowed():
    temp = {".syncpy-0123456789abcdef.tmp": f()}
    plan = _sort_out(listing(temp, {"data": f()}), Options(), is_root=True, replica_exists=True)
    assert plan.refusal.startswith("SOURCE is empty but REPLICA is not") and plan.unwanted == []
    assert _sort_out(listing({}, {"data": f()}), Options(), is_root=False, replica_exists=True).refusal == ""
    allowed = _sort_out(listing({}, {"data": f()}), Options(allow_empty_source=True), True, True)
    assert allowed.refusal == "" and allowed.unwanted == ["data"] and allowed.doomed == []
    assert _sort_out(listing({}, temp), Options(), True, True).refusal == "", "temporary files are not data"


def test_steps_for_files():
    wanted = {"new": f(), "bigger": f(2), "newer": f(1, T + 1), "same": f(), "mode": f(mode=0o100600),
              "setuid": f(mode=0o104755, uid=1000), "kept": f(9)}
    dst = {"bigger": f(), "newer": f(), "same": f(), "mode": f(), "setuid": f(mode=0o100755), "kept": f()}
    steps = _steps(wanted, dst, {"kept"}, False, 0, Times())
    assert kinds(steps) == [("update", "bigger"), ("attrs", "mode"), ("copy", "new"), ("update", "newer")]
    assert steps[1].attrs.mode == 0o600 and steps[1].attrs.letters == "p"
    assert kinds(_steps(wanted, dst, set(), True, 0, Times())) == [
        ("update", "bigger"), ("update", "kept"), ("compare", "mode"), ("copy", "new"), ("update", "newer"),
        ("compare", "same"), ("compare", "setuid")]
    within = _steps(wanted, dst, {"kept"}, False, 1, Times())
    assert ("update", "newer") not in kinds(within), "a 1 ns difference inside the window"


def test_steps_compare_times_as_the_replica_stores_them():
    wanted = {"a": f(1, 1_600_000_001_999_999_999), "far": f(1, 253_402_300_799 * 10**9)}
    dst = {"a": f(1, 1_600_000_000_000_000_000), "far": f(1, 2**31 * 10**9 - 10**9)}
    fat = Times(2_000_000_000, "down", None, 2**31 * 10**9 - 10**9)
    assert kinds(_steps(wanted, dst, set(), False, 0, fat)) == []
    assert kinds(_steps(wanted, dst, set(), False, 0, Times())) == [("update", "a"), ("update", "far")]


def test_steps_for_links_and_folders():
    wanted = {"l1": link("t"), "l2": link("u"), "l3": link("v"), "d1": d(), "d2": d()}
    dst = {"l2": link("u"), "l3": link("old"), "d2": d(T + 5)}
    assert kinds(_steps(wanted, dst, set(), False, 0, Times())) == [
        ("mkdir", "d1"), ("enter", "d2"), ("link", "l1"), ("relink", "l3")]


ROOT = Keep(owner=True, group=True, xattrs=True, namespaces=sync._ALL_NAMESPACES, acls=True, hard_links=True,
            link_times=True, owner_asked=True, group_asked=True, uid=0, gid=0)
USER = ROOT._replace(owner=False, groups=frozenset({100, 1000}), namespaces=frozenset({"user"}), uid=1000, gid=1000)
ACL = b"\x02\x00\x00\x00"  # what a posix_acl xattr starts with; the planner only compares bytes


def test_metadata_changes_are_found_from_the_listings_with_rsyncs_letters():
    wanted = {"own": f(uid=5, gid=6), "mode": f(mode=0o100600), "x": f(), "acl": f(), "both": f(uid=5),
              "gone-x": f(), "same-x": f(), "dir": d(), "l": link("t", T + 1, uid=7)}
    dst = {"own": f(), "mode": f(), "x": f(), "acl": f(), "both": f(mode=0o100600), "gone-x": f(),
           "same-x": f(), "dir": d(), "l": link("t")}
    src_x = {"x": {"user.a": b"1"}, "acl": {"system.posix_acl_access": ACL}, "both": {"user.a": b"1"},
             "same-x": {"user.a": b"1"}}
    dst_x = {"x": {"user.a": b"2"}, "gone-x": {"user.old": b"1"}, "same-x": {"user.a": b"1"}}
    steps = {s.name: s for s in _steps(wanted, dst, set(), False, 0, Times(), ROOT, src_x, dst_x)}
    letters = {name: step.attrs.letters for name, step in steps.items() if step.kind == "attrs"}
    assert letters == {"own": "og", "mode": "p", "x": "x", "acl": "a", "both": "opx", "gone-x": "x", "l": "ot"}
    assert steps["own"].attrs[1:4] == (5, 6, 0o644)
    assert steps["gone-x"].attrs.xattrs == {} and steps["gone-x"].attrs.have_x == {"user.old": b"1"}
    assert steps["dir"].kind == "enter"
    # Turned off (or not stored): nothing to do, nothing counted.
    off = Keep()
    assert [s.kind for s in _steps(wanted, dst, set(), False, 0, Times(), off, src_x, dst_x)
            if s.kind == "attrs"] == ["attrs", "attrs"]  # mode and both: permission bits only


def test_without_root_owners_are_counted_as_missed_and_groups_kept_where_a_member():
    wanted = {"theirs": f(uid=5, gid=1000), "group": f(uid=1000, gid=100), "alien": f(uid=1000, gid=7),
              "new": f(uid=5, gid=7)}
    dst = {"theirs": f(uid=1000, gid=1000), "group": f(uid=1000, gid=1000), "alien": f(uid=1000, gid=1000)}
    steps = {s.name: s for s in _steps(wanted, dst, set(), False, 0, Times(), USER)}
    assert {n: (s.attrs.letters, s.attrs.missed) for n, s in steps.items()} == {
        "theirs": ("", "o"), "group": ("g", ""), "alien": ("", "g"), "new": ("", "og")}
    assert steps["group"].attrs[1:3] == (-1, 100)


def test_setuid_stays_only_where_the_owner_is_kept():
    wanted = {"suid": f(mode=0o104755, uid=5)}
    dst = {"suid": f(mode=0o100755)}
    (step,) = _steps(wanted, dst, set(), False, 0, Times(), ROOT)
    assert step.attrs.letters == "op" and step.attrs.mode == 0o4755
    (step,) = _steps(wanted, dst, set(), False, 0, Times(), USER)
    assert step.attrs.letters == "" and step.attrs.missed == "o" and step.attrs.mode == 0o755


def test_files_with_other_names_are_left_to_the_hard_link_phase():
    wanted = {"a": f(nlink=2), "b": f(nlink=2), "c": f()}
    assert kinds(_steps(wanted, {}, set(), False, 0, Times(), ROOT)) == [
        ("hardlinked", "a"), ("hardlinked", "b"), ("copy", "c")]
    no_links = ROOT._replace(hard_links=False)
    assert kinds(_steps(wanted, {}, set(), False, 0, Times(), no_links)) == [("copy", "a"), ("copy", "b"), ("copy", "c")]


def test_a_file_with_other_names_is_no_rename_candidate():
    src = {"new": f(10, T + 1, nlink=2), "new-alone": f(11, T + 2)}
    dst = {"old": f(10, T + 1), "old-alone": f(11, T + 2)}
    plan = _sort_out(listing(src, dst), Options(), False, True)
    assert plan.moves == [("old-alone", "new-alone")]
    assert _sort_out(listing(src, dst), Options(hard_links=False), False, True).moves == [
        ("old", "new"), ("old-alone", "new-alone")]


def test_permission_bits_are_neither_compared_nor_set_where_the_replica_does_not_store_them():
    wanted, dst = {"f": f(mode=0o100600), "d": d(mode=0o40700)}, {"f": f(mode=0o100777), "d": d(mode=0o40777)}
    assert kinds(_steps(wanted, dst, set(), False, 0, Times(), Keep(modes=False))) == [("enter", "d")]
    (step,) = _steps({"new": f()}, {}, set(), False, 0, Times(), Keep(modes=False))
    assert step.kind == "copy" and step.attrs.mode is None


# -- names a replica's file system treats its own way (probed: see test_foreign)

EXFAT = sync.Names(fold="unicode", refuses='"*:<>?\\|' + "".join(map(chr, range(1, 32))), utf8=True)
FAT = EXFAT._replace(strips=".", refuses_trailing=" ")
WINDOWS = sync.Names(refuses=EXFAT.refuses, refuses_trailing=". ", reserved=True, utf8=True)


def test_names_fold_as_the_file_system_compares_them():
    assert EXFAT.key("Readme.TXT") == EXFAT.key("README.txt")
    assert EXFAT.key("\u00e9t\u00e9") == EXFAT.key("\u00c9T\u00c9"), "accented letters fold too"
    assert EXFAT.key("stra\u00dfe") != EXFAT.key("STRASSE"), "simple folding: one letter stays one"
    assert sync.Names(fold="ascii").key("\u00e9") != sync.Names(fold="ascii").key("\u00c9")
    assert sync.Names().key("README") != sync.Names().key("readme")


def test_names_a_file_system_refuses_are_told_apart_with_the_reason():
    assert EXFAT.problem("video:1.mp4") == "it contains ':'"
    assert EXFAT.problem("a?b*c") == "it contains '*' and '?'"
    assert FAT.problem("notes.") == "it ends with '.', which would be dropped (stored as 'notes')"
    assert FAT.problem("draft ") == "it ends with ' '"
    assert WINDOWS.problem("nul.txt") == WINDOWS.problem("CON") == "it is a reserved device name on Windows"
    assert WINDOWS.problem("console.txt") == ""
    assert EXFAT.problem("caf\udce9") == "it is not valid UTF-8"  # a Latin-1 name from an old archive
    assert sync.Names().problem("any:name. ") == ""


def test_names_that_would_land_on_one_entry_clash_and_their_replica_entry_is_left_alone():
    src = {"README": f(2), "readme": f(3), "video:1.mp4": f(), "notes.": f(), "ok": f()}
    dst = {"Readme": f(2), "notes": f()}
    plan = _sort_out(listing(src, dst), Options(), False, True, sync.Stores(names=FAT))
    assert plan.clashes == [["README", "readme"]]
    assert [name for name, _ in plan.refused] == ["notes.", "video:1.mp4"]
    assert set(plan.wanted) == {"ok"}
    assert "Readme" in plan.keep and "Readme" not in plan.unwanted, "what one of them overwrote stays"
    assert plan.unwanted == ["notes"], "a replica entry the source does not have still goes"


def test_a_replica_entry_that_differs_in_case_only_is_renamed_not_copied_again():
    src = {"Photos": d(), "notes.txt": f(), "Docs": d()}
    dst = {"photos": d(), "NOTES.TXT": f(), "docs": f()}
    plan = _sort_out(listing(src, dst), Options(), False, True, sync.Stores(names=EXFAT))
    assert plan.recased == [("NOTES.TXT", "notes.txt"), ("photos", "Photos")]
    assert plan.unwanted == ["docs"], "a file where a folder is wanted is replaced, not renamed"
    assert plan.moves == [] and plan.doomed == ["docs"]
    case_sensitive = _sort_out(listing(src, dst), Options(), False, True)
    assert case_sensitive.recased == [] and case_sensitive.unwanted == ["NOTES.TXT", "docs", "photos"]


def test_a_name_that_would_overwrite_an_excluded_replica_entry_is_refused():
    src = {"readme": f()}
    dst = {"README": f()}
    plan = _sort_out(listing(src, dst), Options(excludes=sync.Excludes(["README"])), False, True,
                     sync.Stores(names=EXFAT))
    assert plan.refused == [("readme", "it would be stored over the excluded replica entry 'README'")]
    assert plan.wanted == {} and plan.unwanted == []


def test_links_are_left_out_on_request_or_where_the_replica_cannot_store_them():
    src = {"l": link("t"), "f": f()}
    dst = {"l": f()}
    for options, stores in ((Options(links=False), sync.Stores()), (Options(), sync.Stores(links=False))):
        plan = _sort_out(listing(src, dst), options, False, True, stores)
        assert plan.unlinked == ["l"] and set(plan.wanted) == {"f"}
        assert "l" in plan.keep and plan.unwanted == [], "the replica entry of its name stays"
    plan = _sort_out(listing(src, dst), Options(links=False, delete_excluded=True), False, True)
    assert plan.unlinked == ["l"] and plan.unwanted == ["l"], "as an excluded one goes with delete_excluded"


def test_renames_are_recognised_on_a_replica_that_keeps_coarse_times_and_no_modes():
    exfat = sync.Stores(times=Times(1_000_000_000), modes=False)
    fitted = exfat.times.fit(T)
    gone = {"old": f(5, fitted, 0o100777), "olddir": d(fitted, 0o40777)}
    new = {"new": f(5), "newdir": d()}
    assert sync._match_moves(gone, new, exfat) == [("old", "new"), ("olddir", "newdir")]
    assert sync._match_moves(gone, new) == [], "as ext4 stores them, these times and modes differ"
