"""metacopy=on, sim against kernel: a metadata change copies a lower file up without its data, the data
follows on the first open for write, and a renamed or linked metacopy file finds its data through
``overlay.redirect`` (fs/overlayfs/copy_up.c ovl_need_meta_copy_up, ovl_copy_up_meta_inode_data;
dir.c ovl_set_redirect; namei.c ovl_lookup).  metacopy needs trusted xattrs: root only; an unprivileged
(userxattr) mount refuses it with EINVAL on both backends.
"""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from differential import F, H, diff, layer_roots, prepare, run
from overlaykit import Overlay, capabilities

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
KERNEL = capabilities()["kernel"]
ROOT = os.geteuid() == 0
needs_root_kernel = pytest.mark.skipif(not (ROOT and KERNEL.available),
                                       reason="metacopy=on needs trusted xattrs: root and a kernel mount")
MC = "metacopy=on"
BIG = bytes(range(256)) * 400  # 100 KiB: data blocks worth seeing

LOWER = {"f": F(BIG), "small": F("hello\n"), "d/g": F("in d\n"), "d/e/deep": F("deep\n"), "x": F("xattr", 0o640),
         "h1": F("linked\n"), "h2": H("h1"), "empty": F("")}

#: name -> (operations, expected metacopy files in upper/ at the end)
SCENARIOS = {
    "chmod copies metadata only, reads give the lower data": (
        [("chmod", "f", 0o600), ("stat", "f"), ("read", "f"), ("chmod", "small", 0o600), ("read", "small")],
        {"f", "small"}),
    "chown, utime, setxattr and removexattr copy metadata only": (
        [("chown", "f", 7, 8), ("utime", "small", (5, 6)), ("xattr", "d/g", "v"), ("setxattr", "x", "user.k", b"1"),
         ("removexattr", "x", "user.k"), ("read", "d/g"), ("read", "x")],
        {"f", "small", "d/g", "x"}),
    "an empty file is metacopy too": ([("chmod", "empty", 0o600), ("read", "empty")], {"empty"}),
    "open for reading never copies up": ([("read", "f"), ("read", "d/g")], set()),
    "open for append copies the data in and drops metacopy": (
        [("chmod", "f", 0o600), ("append", "f", "+"), ("read", "f"), ("stat", "f")], set()),
    "write (O_TRUNC) of a metacopy file copies no data": (
        [("chmod", "f", 0o600), ("write", "f", "new"), ("read", "f")], set()),
    "truncate copies the data first": (
        [("chmod", "f", 0o600), ("truncate", "f", 10), ("read", "f"), ("chmod", "small", 0o600),
         ("truncate", "small", 100), ("read", "small")], set()),
    "rename in the same directory: relative redirect": (
        [("rename", "small", "small2"), ("read", "small2"), ("rename", "small2", "small3"), ("read", "small3")],
        {"small3"}),
    "rename across directories: absolute redirect": (
        [("rename", "d/g", "g2"), ("read", "g2"), ("mkdir", "n"), ("rename", "g2", "n/g3"), ("read", "n/g3"),
         ("rename", "d/e/deep", "n/deep"), ("read", "n/deep")],
        {"n/g3", "n/deep"}),
    "a renamed metacopy file gets its data later": (
        [("chmod", "f", 0o600), ("rename", "f", "d/f2"), ("append", "d/f2", "!"), ("read", "d/f2"),
         ("rename", "d/f2", "f3"), ("read", "f3")], set()),
    "link of a metacopy file: absolute redirect, one inode, data through either name": (
        [("chmod", "f", 0o600), ("link", "f", "d/f2"), ("stat", "f"), ("read", "d/f2"), ("append", "d/f2", "+"),
         ("read", "f"), ("stat", "f")], set()),
    "link leaves both names metacopy": ([("link", "small", "s2"), ("read", "s2"), ("stat", "small")], {"small", "s2"}),
    "a hard-linked lower file: no origin, redirect on rename": (
        [("chown", "h1", 3, 3), ("rename", "h1", "d/h9"), ("read", "d/h9"), ("read", "h2"), ("stat", "h2")],
        {"d/h9"}),
    "remove and recreate a metacopy file": (
        [("chmod", "small", 0o600), ("remove", "small"), ("write", "small", "again"), ("read", "small")], set()),
}


def _both(tmp_path, ops, lowers=None, **kw):
    lowers = lowers or [LOWER]
    sim = run("sim", str(tmp_path / "sim"), lowers, ops, options=MC, **kw)
    ker = run("kernel", str(tmp_path / "kernel"), lowers, ops, options=MC, **kw)
    return sim, ker


def _metacopy_files(result: dict) -> set:
    return {p for p, e in result["upper"].items() if e[0] == "file" and e[5]}


@needs_root_kernel
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(tmp_path, name):
    ops, expected = SCENARIOS[name]
    sim, ker = _both(tmp_path, ops)
    assert sim == ker, f"{name}: sim and kernel disagree\n{diff(sim, ker)}"
    assert _metacopy_files(ker) == expected  # the scenario shows what its name says
    for p in expected:
        assert ker["upper"][p][7] is True  # no data in upper/
        assert {c[0]: c[1] for c in ker["changes"]}[p] == "metadata-only"


def _mount(tmp, backend, options=MC):
    lowers, upper, work = layer_roots(str(tmp), 1)
    return Overlay(lowers, upper, work, backend=backend, options=options)


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_metacopy_file_on_disk_and_in_the_merged_view(tmp_path, backend):
    """The upper file has the lower's size and no data; the merged view shows the lower data's st_blocks,
    the lower inode number (origin), and reads the lower bytes."""
    prepare(str(tmp_path), [LOWER], {})
    low = os.stat(tmp_path / "lower0" / "f")
    with _mount(tmp_path, backend) as ov:
        ov.chmod("f", 0o600)
        s = ov.stat("f")
        assert (s.size, s.blocks, s.ino, s.mode) == (low.st_size, low.st_blocks, low.st_ino, 0o600)
        assert ov.read_bytes("f") == BIG
        h = ov.os_open("f", os.O_RDONLY)
        try:
            fs = ov.fstat(h)
            assert (fs.mode, fs.size, fs.blocks) == (0o600, low.st_size, low.st_blocks)
            assert ov.pread(h, 10, 256) == BIG[256:266]
        finally:
            ov.close(h)
    real = tmp_path / "upper" / "f"
    up = os.lstat(real)
    assert up.st_size == low.st_size and up.st_blocks * 512 < low.st_size
    assert os.getxattr(real, "trusted.overlay.metacopy") == b""
    os.getxattr(real, "trusted.overlay.origin")  # present
    fd = os.open(real, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_data_copy_up_keeps_the_upper_inode(tmp_path, backend):
    """ovl_copy_up_meta_inode_data fills the existing upper inode: its number and hard links stay."""
    prepare(str(tmp_path), [LOWER], {})
    with _mount(tmp_path, backend) as ov:
        ov.link("f", "f2")
        before = os.lstat(tmp_path / "upper" / "f").st_ino
        ov.write_bytes("f2", b"more", append=True)
        assert ov.read_bytes("f") == BIG + b"more"
    after = os.lstat(tmp_path / "upper" / "f")
    assert (after.st_ino, after.st_nlink) == (before, 2)
    assert "trusted.overlay.metacopy" not in os.listxattr(tmp_path / "upper" / "f")


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_trace_says_metadata_then_data(tmp_path, backend):
    prepare(str(tmp_path), [LOWER], {})
    with _mount(tmp_path, backend) as ov:
        ov.chmod("f", 0o600)
        meta = [e for e in ov.last_events() if e.kind == "copy-up"]
        ov.write_bytes("f", b"!", append=True)
        data = [e for e in ov.last_events() if e.kind == "copy-up"]
        ov.rename("small", "small2")
        moved = [e for e in ov.last_events() if e.kind == "copy-up"]
        changes = {c.path: c.kind for c in ov.upper_changes()}
    assert [(e.path, e.nbytes) for e in meta] == [("f", 0)]
    assert "copied metadata only (metacopy=on): 0 bytes of data" in meta[0].detail
    assert [(e.path, e.nbytes) for e in data] == [("f", len(BIG))]
    assert f"data copied up: {len(BIG)} bytes" in data[0].detail
    assert "copied metadata only (metacopy=on): 0 bytes of data" in moved[0].detail
    assert changes["f"] == "copied-up" and changes["small2"] == "metadata-only"


SESSION = [("chmod", "f", 0o600), ("rename", "small", "d/s2"), ("link", "d/g", "g2"), ("chown", "d/e/deep", 1, 1),
           ("rename", "d/e/deep", "deep2"), ("chmod", "x", 0o600), ("append", "x", "+")]
READS = [("read", "f"), ("read", "d/s2"), ("read", "g2"), ("read", "d/g"), ("read", "deep2"), ("read", "x"),
         ("stat", "f"), ("stat", "deep2")]


@needs_root_kernel
@pytest.mark.parametrize("writer,reader", [("sim", "kernel"), ("kernel", "sim")])
def test_one_backend_mounts_what_the_other_wrote(tmp_path, writer, reader):
    """Metacopy files, their redirects and a filled one, written by one backend, read after a remount by
    the other: the same merged view as the writer's own remount."""
    first = run(writer, str(tmp_path), [LOWER], SESSION, options=MC)
    assert _metacopy_files(first) == {"f", "d/s2", "d/g", "g2", "deep2"}
    again = run(writer, str(tmp_path), [None], READS, options=MC, prebuilt=True)
    other = run(reader, str(tmp_path), [None], READS, options=MC, prebuilt=True)
    assert other == again, diff(other, again)
    assert first["merged"] == again["merged"]


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_without_metacopy_a_metacopy_file_is_refused(tmp_path, backend):
    """A mount without metacopy=on will not follow a metacopy file in upper/: EPERM ("refusing to follow
    metacopy origin"); other files are untouched."""
    run("sim", str(tmp_path), [LOWER], [("chmod", "f", 0o600)], options=MC)
    with _mount(tmp_path, backend, options=None) as ov:
        with pytest.raises(PermissionError) as e:
            ov.stat("f")
        assert e.value.filename == "f"
        assert ov.read_bytes("small") == b"hello\n"


@pytest.fixture
def request_cleanup():
    dirs: list = []
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_mounts_refuse_metacopy(tmp_path, request_cleanup):
    """userxattr mounts cannot use metacopy (it needs trusted xattrs): EINVAL on both backends, as learner."""
    if ROOT:
        learner = _learner()
        if learner is None or shutil.which("runuser") is None:
            pytest.skip("needs a user named learner and runuser")
        base = Path(tempfile.mkdtemp(prefix="overlaykit-metacopy-"))  # a path the learner may reach
        request_cleanup.append(base)
        repo = base / "repo"
        shutil.copytree(REPO / "overlaykit", repo / "overlaykit", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(__file__, repo / "check_refusal.py")
        shutil.copy(REPO / "tests" / "differential.py", repo)
        shutil.chown(base, learner.pw_uid, learner.pw_gid)
        for dirpath, dirnames, filenames in os.walk(base):
            for n in dirnames + filenames:
                os.chown(os.path.join(dirpath, n), learner.pw_uid, learner.pw_gid)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYKIT_", "PYTEST_"))}
        env.update(HOME=str(base), PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1")
        out = subprocess.run(["runuser", "-u", learner.pw_name, "--", sys.executable, str(repo / "check_refusal.py"),
                              str(base / "layers")], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip().endswith("refused"), out.stdout + out.stderr
        return
    _check_refusal(tmp_path)


def _check_refusal(tmp) -> None:
    backends = ["sim"] + (["kernel"] if capabilities()["kernel"].available else [])
    for backend in backends:
        lowers, upper, work = layer_roots(str(tmp / backend), 1)
        for d in (*lowers, upper, work):
            os.makedirs(d)
        with open(os.path.join(lowers[0], "f"), "w") as f:
            f.write("x")
        ov = Overlay(lowers, upper, work, backend=backend, options=MC)
        try:
            ov.mount()
        except OSError as e:
            assert e.errno == errno.EINVAL, (backend, e)
            assert "metacopy" in str(e)
        else:
            ov.unmount()
            raise AssertionError(f"{backend}: an unprivileged mount took metacopy=on")
        assert not os.listdir(upper)


def _learner():
    try:
        return pwd.getpwnam(os.environ.get("OVERLAYKIT_TEST_USER", "learner"))
    except KeyError:
        return None


if __name__ == "__main__":  # run by the learner from test_unprivileged_mounts_refuse_metacopy
    from pathlib import Path as _P
    _check_refusal(_P(sys.argv[1]))
    print("refused")


def _disk_usage(root) -> int:
    """Bytes of blocks under ``root`` (what du counts)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_chown_r_duplicates_the_layer_unless_metacopy(tmp_path, backend):
    """The lesson's point: ``RUN chown -R`` copies every file's data into the new layer; with metacopy=on
    only metadata (and a few xattr blocks) land in upper/."""
    lower = tmp_path / "lower"
    for i in range(8):
        (lower / f"lib/pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (lower / f"lib/pkg{i % 3}/lib{i}.so").write_bytes(os.urandom(512 << 10))
    data = 8 * (512 << 10)
    used = {}
    for opts in (None, MC):
        up, wk = tmp_path / f"upper-{opts}", tmp_path / f"work-{opts}"
        up.mkdir()
        wk.mkdir()
        with Overlay([lower], up, wk, backend=backend, options=opts) as ov:
            for dirpath, dirs, files in ov.walk("."):
                for n in dirs + files:
                    ov.chown(f"{dirpath}/{n}", 1000, 1000)
            assert ov.stat("lib/pkg1/lib4.so").uid == 1000
            assert ov.read_bytes("lib/pkg1/lib4.so") == (lower / "lib/pkg1/lib4.so").read_bytes()
        used[opts] = _disk_usage(up)
    assert used[None] >= data
    assert used[MC] < data // 20


@needs_root_kernel
def test_rename_exchange_of_metacopy_files(tmp_path):
    """RENAME_EXCHANGE copies both sides up metadata only and gives each the redirect to its data."""
    from differential import snapshot_merged, snapshot_upper
    seen = {}
    for backend in ("sim", "kernel"):
        t = str(tmp_path / backend)
        prepare(t, [{"a": F("aaa" * 100), "d/b": F("bbb"), "c": F("ccc")}], {})
        with _mount(t, backend) as ov:
            ov.rename("a", "d/b", flags=2)  # RENAME_EXCHANGE
            ov.chmod("c", 0o600)
            ov.rename("c", "d/b", flags=2)
            assert ov.read_bytes("c") == b"aaa" * 100 and ov.read_bytes("d/b") == b"ccc"
            seen[backend] = (snapshot_upper(ov), snapshot_merged(ov))
    assert seen["sim"] == seen["kernel"]
    assert {p: e[6] for p, e in seen["kernel"][0].items() if e[0] == "file"} == {"a": "/d/b", "c": "/a", "d/b": "/c"}


def _layered(t: Path) -> None:
    """lower0/b is a metacopy file (an earlier overlay's upper, committed as a layer): mode 0600, no data;
    its data is lower1/b.  lower0/r is one renamed there: redirect "/data/r0" to lower1/data/r0."""
    prepare(str(t), [{"keep": F("k")}, {"b": F(BIG), "data/r0": F("renamed data\n")}], {})
    top = t / "lower0"
    for name, size, redirect in (("b", len(BIG), None), ("r", 13, b"/data/r0")):
        with open(top / name, "wb") as f:
            f.truncate(size)
        os.chmod(top / name, 0o600)
        os.setxattr(top / name, "trusted.overlay.metacopy", b"")
        if redirect:
            os.setxattr(top / name, "trusted.overlay.redirect", redirect)


LAYERED_OPS = [("stat", "b"), ("read", "b"), ("read", "r"), ("chmod", "b", 0o640), ("read", "b"),
               ("append", "b", "+"), ("read", "b"), ("chown", "r", 1, 1), ("rename", "r", "r2"), ("read", "r2")]


@needs_root_kernel
def test_a_metacopy_file_in_a_lower_layer_finds_its_data_below(tmp_path):
    """A lower layer may hold metacopy files (a committed upper): the merged view shows their metadata with
    the data of the layer below (following their redirect), copy-up takes that data, not the holes."""
    seen = {}
    for backend in ("sim", "kernel"):
        t = tmp_path / backend
        _layered(t)
        seen[backend] = run(backend, str(t), [None, None], LAYERED_OPS, options=MC, prebuilt=True)
        with _mount2(t, backend) as ov:
            low = os.stat(t / "lower0" / "b")
            s = ov.stat("r2")
            assert (s.size, s.mode, s.uid) == (13, 0o600, 1)
            assert ov.read_bytes("r2") == b"renamed data\n"
            assert ov.stat("b").ino == low.st_ino
            assert ov.read_bytes("b") == BIG + b"+"
    assert seen["sim"] == seen["kernel"], diff(seen["sim"], seen["kernel"])
    assert seen["kernel"]["results"][1] == seen["kernel"]["results"][4]  # the data, not zeros


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_a_lower_metacopy_file_without_metacopy_is_refused(tmp_path, backend):
    _layered(tmp_path)
    with _mount2(tmp_path, backend, options=None) as ov:
        with pytest.raises(PermissionError):
            ov.read_bytes("b")
        assert ov.read_bytes("keep") == b"k"


def _mount2(t, backend, options=MC):
    lowers, upper, work = layer_roots(str(t), 2)
    return Overlay(lowers, upper, work, backend=backend, options=options)


@needs_root_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_moved_and_linked_files_keep_their_inode_number_after_remount(tmp_path, backend):
    """A metacopy file renamed or linked, even once its data followed, keeps its lower inode number (its
    origin's) after a remount: the sim finds that origin through the file's redirect."""
    prepare(str(tmp_path), [LOWER], {})
    ino = {n: os.stat(tmp_path / "lower0" / n).st_ino for n in ("f", "small", "d/g")}
    pairs = {"f2": "f", "g2": "d/g", "small": "small", "s2": "small"}
    with _mount(tmp_path, backend) as ov:
        ov.chmod("f", 0o600)
        ov.rename("f", "f2")
        ov.write_bytes("f2", b"+", append=True)
        ov.rename("d/g", "g2")
        ov.link("small", "s2")
        ov.write_bytes("s2", b"+", append=True)
        assert {p: ov.stat(p).ino for p in pairs} == {p: ino[q] for p, q in pairs.items()}
    with _mount(tmp_path, backend) as ov:
        assert {p: ov.stat(p).ino for p in pairs} == {p: ino[q] for p, q in pairs.items()}
