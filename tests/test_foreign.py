"""Foreign file systems: a USB stick or external disk formatted exFAT, NTFS
or FAT32, mounted as a desktop mounts it, as REPLICA.

Each is a real file system on a small loop image: exFAT through
exfat-fuse, NTFS through ntfs-3g with default options and with
windows_names (how desktops mount it), and FAT32 through the kernel's vfat
driver, which this machine's kernel lacks: user-mode-linux boots a kernel
that has it, with the host's root as its file system, and runs the same
script there.  Each gets one tree with every name and kind of entry such
disks trip over, and five passes:

1. reports each problem once by name and exits 1 (0 on NTFS as Linux
   mounts it by default, which stores all of it but modes and owners);
2. over the unchanged source copies and sets nothing, and says the same;
3. after a small change (one file rewritten, a folder renamed in case
   only) does exactly that;
4. with the problem names excluded and --no-links, exits 0 and says what
   was not mirrored;
5. settles: does nothing.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

import sync
from conftest import SYNC_PY
from trees import assert_mirror, make_tree

MODULES = sorted(glob.glob("/usr/lib/uml/modules/*/kernel/fs"))
UML = shutil.which("linux.uml") or shutil.which("linux")

# Each tree entry's mtime has a sub-second part no such disk stores.
TREE = {
    "docs": {"README": "upper case\n", "readme": "lower case!\n", "guide.txt": "guide\n"},
    "video:1.mp4": "not really a video\n",
    "notes": "notes\n",
    "notes.": "notes with a trailing dot\n",
    "report.": "a report\n",
    "script.sh": "#!/bin/sh\necho hi\n",
    "private": "secret\n",
    "Photos": {"IMG_0001.jpg": "jpeg" * 1000, "\u00c9t\u00e9.txt": "summer\n"},
}
# What each file system cannot hold, as errors of pass 1 (by path).
PROBLEMS = {
    "exfat": {"docs/README", "docs/readme", "video:1.mp4", "lnk"},
    "ntfs": set(),
    "ntfs-windows": {"video:1.mp4", "notes.", "report."},
    "vfat": {"docs/README", "docs/readme", "video:1.mp4", "notes.", "report.", "lnk"},
}
CASE_INSENSITIVE = {"exfat", "vfat"}
LEAVE_OUT = ["--no-links", "--exclude", "video:1.mp4", "--exclude", "docs/readme",
             "--exclude", "notes.", "--exclude", "report."]
CHANGES = ("copied", "updated", "moved", "removed", "created", "set ", "linked", "kept old")


def make_source(src):
    make_tree(src, TREE)
    os.symlink("notes", src / "lnk")
    os.chmod(src / "script.sh", 0o755)
    os.chmod(src / "private", 0o600)
    ns = 1_700_000_000_123_456_789
    for dirpath, dirnames, filenames in sorted(os.walk(src), reverse=True):  # contents first
        for name in filenames + dirnames:
            ns += 1_000_000_001
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)


def script(disk: str, mount: str, src, out) -> str:
    """The passes, as one shell script that runs on the host or in user-mode-linux."""
    leave_out = " ".join(f"'{arg}'" for arg in LEAVE_OUT)
    return textwrap.dedent(f"""\
        #!/bin/sh
        export PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
        S='{src}'; R='{disk}/replica'; O='{out}'
        {mount}
        run() {{ n=$1; shift; '{sys.executable}' '{SYNC_PY}' "$S" "$R" 1 "$O/log$n" --once "$@" \\
                 >"$O/out$n" 2>&1; echo $? >"$O/rc$n"; }}
        run 1
        run 2
        printf 'notes, rewritten\\n' > "$S/notes"
        mv "$S/Photos" "$S/photos"
        run 3
        run 4 {leave_out}
        run 5 {leave_out}
        '{sys.executable}' -c 'import json, os, sys
        found = {{}}
        for d, dirs, files in os.walk(sys.argv[1]):
            for n in files:
                p = os.path.join(d, n)
                found[os.path.relpath(p, sys.argv[1])] = "-> " + os.readlink(p) if os.path.islink(p) else \\
                    open(p, "rb").read().decode("latin-1")
        json.dump(found, open(sys.argv[2], "w"))' "$R" "$O/replica.json"
        umount '{disk}'
        """)


def messages(log_path) -> list:
    """The log's messages, without time and level."""
    lines = open(log_path, encoding="utf-8", errors="replace").read().splitlines()
    return [line[24:].split(" ", 1)[1].lstrip() for line in lines]


def errors(log_path) -> list:
    return sorted(line.split(": ", 1)[0] for line in messages(log_path)
                  if line.startswith(tuple(p + ":" for p in sum(map(list, PROBLEMS.values()), []))))


def changes(log_path) -> list:
    return [m for m in messages(log_path) if m.startswith(CHANGES)]


@pytest.fixture
def foreign(request, tmp_path, mounts):
    """(kind, src, run): run() makes the disk, runs the passes and returns the
    folder holding each pass's log, output and exit status."""
    kind = request.param
    image, disk, out, src = (tmp_path / n for n in ("disk.img", "disk", "out", "src"))
    for folder in (disk, out):
        folder.mkdir()
    make_source(src)
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    loops = []

    def run():
        mount = _format(kind, image, disk, loops)
        path = tmp_path / "passes.sh"
        if kind == "vfat" and not _host_has_vfat():
            _run_in_uml(path, image, script(disk, mount.format(device="/dev/ubda"), src, out))
        else:
            path.write_text(script(disk, mount.format(device=f"-o loop '{image}'"), src, out))
            subprocess.run(["sh", str(path)], check=True, timeout=600)
        return out

    try:
        yield kind, src, run
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def _need(command, package):
    if shutil.which(command) is None:
        pytest.fail(f"{command} missing: apt-get install {package} (.ci/run does)")


def _format(kind, image, disk, loops) -> str:
    """Make a file system of this kind on image; returns the shell command
    that mounts it at disk as a desktop would ({device} left for vfat: the
    image on the host, /dev/ubda in user-mode-linux).  loops: gets the
    loop devices to free."""
    if kind == "exfat":
        _need("mount.exfat-fuse", "exfat-fuse")
        _need("mkfs.exfat", "exfatprogs")
        subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                              text=True).stdout.strip()
        loops.append(loop)
        return f"mount.exfat-fuse {loop} '{disk}'"
    if kind.startswith("ntfs"):
        _need("ntfs-3g", "ntfs-3g")
        subprocess.run(["mkntfs", "-q", "-F", str(image)], check=True, capture_output=True)
        return f"ntfs-3g {'-o windows_names ' if kind == 'ntfs-windows' else ''}'{image}' '{disk}'"
    _need("mkfs.vfat", "dosfstools")
    subprocess.run(["mkfs.vfat", "-F", "32", str(image)], check=True, capture_output=True)
    return f"mount -t vfat -o shortname=mixed,utf8=1,showexec,flush {{device}} '{disk}'"  # as udisks2 does


@pytest.fixture
def stick(tmp_path, mounts):
    """mount(kind): a small disk of that kind, mounted on the host; returns its folder."""
    image, disk, loops = tmp_path / "stick.img", tmp_path / "stick", []
    disk.mkdir()

    def mount(kind):
        subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
        subprocess.run(["sh", "-c", _format(kind, image, disk, loops).format(device=f"-o loop '{image}'")],
                       check=True, capture_output=True)
        mounts.made.append(str(disk))
        return disk

    yield mount
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    for loop in loops:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def _host_has_vfat() -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "vfat" for line in f if line.strip())


def _run_in_uml(path, image, passes: str) -> None:
    """Boot user-mode-linux with the host's root as its root, load vfat,
    and run the passes there."""
    if UML is None or not MODULES:
        pytest.fail("no kernel with vfat: apt-get install user-mode-linux (.ci/run does)")
    fs = MODULES[-1]
    modules = [f"{fs}/fat/fat.ko", f"{fs}/fat/vfat.ko", f"{fs}/nls/nls_cp437.ko", f"{fs}/nls/nls_iso8859-1.ko",
               f"{fs}/nls/nls_utf8.ko"]
    load = ("import ctypes, os, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "for m in sys.argv[1:]:\n"
            "    fd = os.open(m, os.O_RDONLY)\n"
            "    libc.syscall(313, fd, b'', 0)  # finit_module: no kmod needed\n")
    boot = (f"#!/bin/sh\nmount -t proc proc /proc\n"
            f"'{sys.executable}' -c \"{load}\" {' '.join(modules)}\n"
            f"sh '{path}.passes' > '{path}.console' 2>&1\n"
            "echo o > /proc/sysrq-trigger\nsleep 10\n")
    path.write_text(boot)
    path.chmod(0o755)
    (path.parent / (path.name + ".passes")).write_text(passes)
    subprocess.run([UML, "mem=512M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                    f"ubd0={image}", f"init={path}", "con=null", "con0=null,fd:1", "quiet"],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=900)
    console = path.parent / (path.name + ".console")
    assert (path.parent / "out" / "rc5").exists(), "the passes did not run in user-mode-linux:\n" + (
        console.read_text(errors="replace") if console.exists() else "(no output)")


@pytest.mark.parametrize("foreign", ["exfat", "ntfs", "ntfs-windows", "vfat"], indirect=True)
def test_a_stick_settles_and_reports_each_name_it_cannot_hold(foreign):
    kind, src, run = foreign
    out = run()
    rc = [int((out / f"rc{n}").read_text()) for n in range(1, 6)]
    logs = [out / f"log{n}" for n in range(1, 6)]
    problems = PROBLEMS[kind]
    first = messages(logs[0])
    said = "\n".join(first)

    # Pass 1: each problem once, by name; the rest mirrored.
    assert errors(logs[0]) == sorted(problems), said
    assert rc[0] == (1 if problems else 0), said
    probe = [m for m in first if m.startswith("replica file system: ")]
    assert len(probe) == 1, said
    if kind in CASE_INSENSITIVE:
        assert "case-insensitive" in probe[0]
        assert "docs/README: clashes with docs/readme: the replica's file system does not tell their names " \
               "apart, so neither is mirrored; rename one (or exclude it)" in first
    if "lnk" in problems:
        assert "lnk: the replica's file system cannot store symbolic links. Use --no-links to leave links out." \
               in first
    if "video:1.mp4" in problems:
        assert "video:1.mp4: the replica's file system does not accept this name: it contains ':'; " \
               "exclude or rename it" in first
    assert not [m for m in first if m.startswith("set ")], "no permission bits set where none are stored"

    # Pass 2: nothing to do, the same problems said again.
    assert changes(logs[1]) == [], "\n".join(messages(logs[1]))
    assert errors(logs[1]) == sorted(problems)
    assert rc[1] == rc[0]

    # Pass 3: exactly the change.
    assert sorted(changes(logs[2])) == ["moved photos (from Photos)", "updated notes (17 bytes)"], \
        "\n".join(messages(logs[2]))

    # Passes 4 and 5: the problems left out knowingly, an exact mirror of the rest, settled.
    fourth = messages(logs[3])
    assert rc[3] == 0, "\n".join(fourth)
    summary = [m for m in fourth if m.startswith("pass finished")][0]
    assert "replica is an exact mirror except for " in summary and "(left out on request)" in summary
    assert changes(logs[4]) == [] and rc[4] == 0, "\n".join(messages(logs[4]))

    # What the replica holds: every file of the source under its own name
    # (case included) with its own bytes, but those it never could hold
    # (README once its twin was excluded); excluded names stay as they were.
    replica = json.loads((out / "replica.json").read_text())
    never = problems - {"docs/README"}
    wanted = {}
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, src)
            if rel not in never:
                wanted[rel] = "-> " + os.readlink(path) if os.path.islink(path) else \
                    open(path, "rb").read().decode("latin-1")
    assert replica == wanted


def test_trash_keeps_old_versions_where_the_replica_cannot_hard_link(tmp_path, stick):
    disk = stick("exfat")
    src, dst, trash = tmp_path / "src", disk / "replica", disk / "trash"
    make_tree(src, {"a.txt": "version 1\n", "d": {"b.txt": "b1\n"}})
    mirror = sync.Mirror(src, dst, sync.Options(trash=str(trash)))
    mirror.check(create=True)
    assert mirror.run_pass().exact
    (src / "a.txt").write_text("version 2, longer\n")
    (src / "d" / "b.txt").unlink()
    events = []
    result = mirror.run_pass(events.append)
    assert result.exact, [e.text() for e in events]
    assert (dst / "a.txt").read_text() == "version 2, longer\n"
    kept = sorted(os.path.relpath(os.path.join(d, n), trash) for d, _, files in os.walk(trash) for n in files)
    assert [k.split("/", 1)[1] for k in kept] == ["a.txt", "d/b.txt"]
    assert sorted(open(trash / k).read() for k in kept) == ["b1\n", "version 1\n"]


@pytest.mark.parametrize("kind", ["exfat", "ntfs"])
def test_a_stick_as_source_mirrors_to_a_linux_disk_and_settles(tmp_path, stick, kind):
    # Roles reversed: what the stick holds is mirrored exactly, its fixed
    # modes and coarse times included, and the next pass does nothing.
    src, dst = stick(kind) / "photos", tmp_path / "replica"
    make_tree(src, {"2026": {"IMG_0001.JPG": "jpeg" * 300, "\u00e9t\u00e9.txt": "summer\n"}, "notes.": "x"})
    first = sync_cli(src, dst, tmp_path / "log1")
    assert first.returncode == 0, first.stderr
    assert_mirror(src, dst, hard_links=False)
    second = sync_cli(src, dst, tmp_path / "log2")
    assert second.returncode == 0
    assert changes(tmp_path / "log2") == [], "\n".join(messages(tmp_path / "log2"))


def sync_cli(src, dst, log):
    return subprocess.run([sys.executable, SYNC_PY, str(src), str(dst), "1", str(log), "--once"],
                          capture_output=True, text=True, timeout=120)


def test_without_hard_links_a_copy_that_fails_leaves_the_old_version_in_place(tmp_path, stick, monkeypatch):
    disk = stick("exfat")
    src, dst, trash = tmp_path / "src", disk / "replica", disk / "trash"
    make_tree(src, {"a.txt": "version 1\n"})
    mirror = sync.Mirror(src, dst, sync.Options(trash=str(trash)))
    mirror.check(create=True)
    assert mirror.run_pass().exact
    (src / "a.txt").write_text("version 2, longer\n")

    def unreadable(d, name):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sync, "_open_source_file", unreadable)
    events = []
    assert mirror.run_pass(events.append).errors == 1
    assert [e.action for e in events] == ["error"], "no old version is said to be kept"
    assert (dst / "a.txt").read_text() == "version 1\n"
    assert [files for _, _, files in os.walk(trash) if files] == []


@pytest.mark.parametrize("kind", ["exfat", "ntfs-windows"])
def test_a_slow_replicas_probes_run_at_once_and_find_what_they_find_one_at_a_time(stick, monkeypatch, kind):
    # On a NAS each probe request waits on the server, so the probes (and
    # each name the name probe tries, in a folder of its own) run at once;
    # what they find must be what they find one after another, here on file
    # systems that fold case and refuse names.
    disk = stick(kind)
    folder = os.open(disk, os.O_RDONLY)
    try:
        one_at_a_time = sync._probe_replica(folder, "ext4")  # a local kind: not timed
        monkeypatch.setattr(sync, "_probe_latency", lambda pd: 0.002)
        calls, real_probe_names = [], sync._probe_names

        def probe_names(pd, apart=False):
            calls.append((apart, threading.current_thread().name))
            return real_probe_names(pd, apart)

        monkeypatch.setattr(sync, "_probe_names", probe_names)
        at_once = sync._probe_replica(folder, "fuse")
    finally:
        os.close(folder)
    assert len(calls) == 1 and calls[0][0] and calls[0][1].startswith("sync_probe")
    assert one_at_a_time.names != sync.Names()  # the probe found something to tell
    assert at_once == one_at_a_time._replace(kind="fuse", latency=0.002)
    assert os.listdir(disk) == []
