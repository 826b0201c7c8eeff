"""Include and exclude rules mean what rsync means: proven against rsync.

The property test builds random trees and random rule lists (includes and
excludes, anchored and not, with classes, "**" and "/***"), mirrors the
same tree with sync.py and with ``rsync -a --delete`` into two replicas
that start with the same stale content, and asserts they end up holding
the same paths.  The unit tests pin each rule of the syntax.
"""

import os
import shutil
import subprocess
import tempfile
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sync
from conftest import sync_once
from trees import make_tree

RSYNC = shutil.which("rsync")
EXAMPLES = int(os.environ.get("SYNCPY_FILTER_EXAMPLES", "60"))


def excluded(rules, rel, is_dir=False):
    return sync.Filters(sync.parse_rules(rules)).match(rel, rel.rsplit("/", 1)[-1], is_dir)


@pytest.mark.parametrize("rules, path, is_dir, out", [
    # A pattern with an inner "/" matches at any depth unless anchored by a leading "/".
    ([("-", "build/*.o")], "build/a.o", False, True),
    ([("-", "build/*.o")], "src/build/a.o", False, True),
    ([("-", "/build/*.o")], "src/build/a.o", False, False),
    ([("-", "node_modules/.cache")], "web/node_modules/.cache", True, True),
    ([("-", "build/*.o")], "build/sub/a.o", False, False),  # "*" stays within a component
    # "**" crosses folders; a pattern that starts with it matches at any depth, the top included.
    ([("-", "**/foo")], "foo", True, True),
    ([("-", "**/foo")], "a/b/foo", False, True),
    ([("-", "/**/foo")], "foo", True, False),
    ([("-", "a/**/b")], "a/b", False, False),
    ([("-", "a/**/b")], "a/x/y/b", False, True),
    ([("-", "/cache/**")], "cache", True, False),  # what is in it, not the folder
    ([("-", "/cache/**")], "cache/x/y", False, True),
    # "dir/***" is the folder and all in it; a trailing "/" folders only.
    ([("-", "cache/***")], "cache", True, True),
    ([("-", "cache/***")], "cache", False, False),
    ([("-", "cache/***")], "deep/cache/f", False, True),
    ([("-", "tmp/")], "tmp", False, False),
    ([("-", "tmp/")], "a/tmp", True, True),
    # Backslash escapes where the pattern has wildcards; taken as it is where not.
    ([("-", "\\[draft\\]*")], "[draft] notes", False, True),
    ([("-", "a\\b")], "a\\b", False, True),
    # Character classes: POSIX ones, negation, never a "/".
    ([("-", "v[[:digit:]]*")], "v1.2", False, True),
    ([("-", "v[[:digit:]]*")], "va", False, False),
    ([("-", "[![:upper:]]*")], "Readme", False, False),
    ([("-", "a[!x]b")], "a/b", False, False),
    ([("-", "f[[:nonsense:]]")], "f1", False, False),
    # The first rule that matches decides.
    ([("+", "*.jpg"), ("-", "*")], "a.jpg", False, False),
    ([("+", "*.jpg"), ("-", "*")], "a.png", False, True),
    ([("-", "*"), ("+", "*.jpg")], "a.jpg", False, True),
    # "+ " and "- " say the kind whatever the option; "!" clears the rules before it.
    ([("-", "+ keep"), ("-", "*")], "keep", False, False),
    ([("+", "- secret/")], "secret", True, True),
    ([("-", "*"), ("-", "!")], "anything", False, False),
])
def test_each_rule_of_rsyncs_syntax(rules, path, is_dir, out):
    assert excluded(rules, path, is_dir) is out


def test_posix_classes_compile_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert excluded([("-", "[[:digit:][:space:]]x")], "1x") and excluded([("-", "[[:punct:]]")], "]")


def test_rule_files_read_as_rsync_reads_them(tmp_path):
    rules = tmp_path / "rules"
    rules.write_text("# a comment\n; another\n\n- secret/\n+ *.keep\n*.log\n")
    read = sync.read_rules_file(str(rules), "+")
    assert sync.parse_rules(read) == [(False, "secret/"), (True, "*.keep"), (True, "*.log")]


@pytest.mark.parametrize("text", ["-, foo", "+,s foo", "!foo"])
def test_filter_syntax_that_is_not_supported_is_refused_naming_it(text, tmp_path, cli, log):
    with pytest.raises(sync.UsageError, match="not supported"):
        sync.parse_rules([("-", text)])
    src = tmp_path / "src"
    src.mkdir()
    proc = cli(src, tmp_path / "dst", 1, log, "--once", "--exclude", text)
    assert proc.returncode == 2 and repr(text) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "dst").exists()


def test_only_these_and_everything_except_from_the_command_line(tmp_path, cli, log):
    src = tmp_path / "src"
    make_tree(src, {"a.jpg": "1", "b.txt": "2", "trip": {"c.jpg": "3", "d.txt": "4"}, "secret": {"k": "5"}})
    only = tmp_path / "only"
    proc = cli(src, only, 1, log, "--once", "--include", "*/", "--include", "*.jpg", "--exclude", "*")
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(only)) for p in only.rglob("*")) == [
        "a.jpg", "secret", "trip", "trip/c.jpg"]
    rules = tmp_path / "rules"
    rules.write_text("- secret/\n- *.txt\n")
    but = tmp_path / "but"
    proc = cli(src, but, 1, log, "--once", "--include", "trip/d.txt", "--exclude-from", rules)
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(but)) for p in but.rglob("*")) == ["a.jpg", "trip", "trip/c.jpg", "trip/d.txt"]
    assert "options: --once --include trip/d.txt --exclude-from " in log.read_text()
    keep = tmp_path / "keep"
    keep.write_text("# what to keep\n*/\n*.txt\n- *\n")
    texts = tmp_path / "texts"
    proc = cli(src, texts, 1, log, "--once", "--include-from", keep)
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(texts)) for p in texts.rglob("*")) == [
        "b.txt", "secret", "trip", "trip/d.txt"]


# -- proof by difference with rsync

NAMES = ["a", "b", "foo", "x.o", "Foo", "c1", "[x]", "a b", "cache"]
PIECES = ["foo", "*.o", "a", "?", "*", "**", "[ab]", "[[:digit:]]", "c[[:digit:]]", "[!a]*", "\\[x\\]",
          "x.o", "cache", "F*", "*o*"]

_name = st.sampled_from(NAMES)
_deepest = st.dictionaries(_name, st.just("file") | st.just({}), max_size=3)
_deeper = st.dictionaries(_name, st.just("file") | _deepest, max_size=3)
trees = st.dictionaries(_name, st.just("file") | _deeper, max_size=4)  # three levels of folders
patterns = st.builds(
    lambda anchor, pieces, end: anchor + "/".join(pieces) + end,
    st.sampled_from(["", "", "/"]),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=3),
    st.sampled_from(["", "", "/", "/***"]),
)
rule_lists = st.lists(st.tuples(st.sampled_from(["+", "-"]), patterns), min_size=1, max_size=5)


def build(root, tree, content):
    os.makedirs(root, exist_ok=True)
    for name, node in tree.items():
        path = os.path.join(root, name)
        if node == "file":
            with open(path, "w") as f:
                f.write(content + name)
        else:
            build(path, node, content)


def listing(root):
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


@pytest.mark.skipif(RSYNC is None, reason="rsync is not installed (.ci/run installs it)")
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=trees, stale=trees, rules=rule_lists, delete_excluded=st.booleans())
@example(source={"foo": {"a": "file"}, "b": {"foo": "file"}}, stale={}, rules=[("-", "**/foo")],
         delete_excluded=False)
@example(source={}, stale={"a": "file", "x": {"a": "file"}}, rules=[("-", "/**/a")], delete_excluded=False)
@example(source={"cache": {"x.o": "file"}, "a": "file"}, stale={"cache": {"old": "file"}, "x.o": "file"},
         rules=[("+", "*/"), ("+", "*.o"), ("-", "*")], delete_excluded=False)
@example(source={"a": "file"}, stale={"a": {"a": "file", "cache": "file"}}, rules=[("-", "cache")],
         delete_excluded=False)
@example(source={"a": "file", "foo": {}}, stale={"a": {"a": "file"}, "foo": "file"}, rules=[("-", "a/"), ("-", "foo/")],
         delete_excluded=False)
def test_the_same_rules_leave_the_same_paths_as_rsync(source, stale, rules, delete_excluded):
    with tempfile.TemporaryDirectory() as tmp:
        src, ours, theirs = (os.path.join(tmp, n) for n in ("src", "ours", "theirs"))
        build(src, source, "new ")
        for replica in (ours, theirs):
            build(replica, stale, "old ")
        sync_once(src, ours, excludes=sync.Filters(sync.parse_rules(rules)) or None,
                  delete_excluded=delete_excluded, allow_mass_delete=True, allow_empty_source=True)
        args = [f"--{'include' if kind == '+' else 'exclude'}={pattern}" for kind, pattern in rules]
        done = subprocess.run([RSYNC, "-a", "--delete", *(["--delete-excluded"] * delete_excluded), *args,
                               src + "/", theirs + "/"], capture_output=True)
        # 23: a folder that holds excluded entries stays, and a file of its name cannot be copied.
        assert done.returncode in (0, 23), done.stderr
        assert listing(ours) == listing(theirs), (rules, delete_excluded)
