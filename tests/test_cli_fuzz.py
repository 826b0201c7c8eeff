"""Property: whatever argument list and exclude patterns the CLI is given,
it answers with status 0, 1 or 2 and never a traceback."""

import contextlib
import io
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sync
from trees import make_tree

NUMBERS = st.sampled_from(["0", "1", "2.5", "-1", "1e10", "1e300", "nan", "inf", "-inf", "", " ", "x",
                           "99999999999999999999"])
PATTERNS = st.one_of(  # hard cases seen before, and anything else made of glob characters
    st.sampled_from(["[z-a]", "[!]", "[^]", "[]", "a[b-", "[[:digit:]]", "\\[", "**/x", "***", "- x/"]),
    st.text(alphabet="[]!^*?/\\-az.:#+ ", max_size=8))
PATHS = st.sampled_from(["{tmp}/trash", "{tmp}/rules", "{tmp}/none/x", "", "{src}", "{dst}", "{dst}/in",
                         "{tmp}", "{src}/f"])
OPTIONS = st.one_of(
    st.sampled_from([["-n"], ["--dry-run"], ["-c"], ["--delete-excluded"], ["-i"], ["-q"], ["-v"],
                     ["--allow-empty-source"], ["--allow-mass-delete"], ["--delete"], ["--allow"],
                     ["--once"], ["--unknown"]]),
    st.tuples(st.just("--exclude"), PATTERNS).map(list),
    st.tuples(st.just("--exclude"), PATTERNS).map(list),
    st.tuples(st.sampled_from(["--trash", "--exclude-from"]), PATHS).map(list),
    st.tuples(st.sampled_from(["--trash-keep", "--modify-window", "--max-delete", "--workers"]),
              NUMBERS).map(list),
)
def mostly(good, *bad):
    """good most of the time, else one of bad: an argument list that fails
    its first check tells nothing about the rest of it."""
    return st.sampled_from([good] * 3 * len(bad) + list(bad))


POSITIONALS = st.tuples(
    mostly("{src}", "", "{tmp}/missing", "{src}/f", "{dst}"),
    mostly("{dst}", "", "{src}", "{src}/sub", "{tmp}/a/b", "{tmp}/rules"),
    st.one_of(st.just("1"), NUMBERS),
    mostly("{log}", "", "{dst}/sync.log", "{tmp}", "{tmp}/none/log"),
).map(list)


@settings(max_examples=int(os.environ.get("SYNCPY_CLI_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(positionals=POSITIONALS, options=st.lists(OPTIONS, max_size=5))
def test_no_argument_list_gives_a_traceback(positionals, options):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst, log = f"{tmp}/src", f"{tmp}/dst", f"{tmp}/sync.log"
        make_tree(src, {"f": "x", "sub": {"g": "y"}, "[z-a]": "z"})
        with open(f"{tmp}/rules", "w") as rules:
            rules.write("*.tmp\n- secret/\n[!]\n")
        names = dict(tmp=tmp, src=src, dst=dst, log=log)
        argv = [a.format(**names) for a in positionals]
        argv += [a.format(**names) for option in options for a in option] + ["--once"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = sync.main(argv)
        assert status in (0, 1, 2), (argv, err.getvalue())
        assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue(), argv
        if status == 2:
            assert err.getvalue().count("\n") == 1, (argv, err.getvalue())
        if os.path.isfile(log):
            with open(log, encoding="utf-8", errors="replace") as f:
                assert "Traceback" not in f.read(), argv
