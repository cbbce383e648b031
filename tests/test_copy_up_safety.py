"""Copy-up never leaves half a file in upper/ (issue 10, item 2).

The kernel builds a copy-up in work/work and renames the finished entry into upper/; the simulator must
do the same, so that a process killed (or a copy failing) part-way leaves upper/ with the old state or
the new one, which a fresh simulator *and* a fresh kernel mount then agree on.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat as st
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from overlaykit import Overlay, capabilities
from overlaykit import sim as sim_module

KERNEL = capabilities()["kernel"]
ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[1]
BIG = 128 << 20  # big enough that the copy takes a while on tmpfs
PATTERN = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def fast_tmp(tmp_path):
    """A directory on tmpfs when there is one (the copy is then limited by memory speed, not a disk)."""
    if os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="overlaykit-copyup-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, onerror=_force)
    else:
        yield tmp_path


def _force(func, p, exc):
    try:
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
            shutil.rmtree(p, onerror=_force)
        else:
            func(p)
    except OSError:
        pass


def big_layers(base: Path) -> dict[str, Path]:
    d = {n: base / n for n in ("lower", "upper", "work")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "data").mkdir()
    with open(d["lower"] / "data" / "big.bin", "wb") as f:
        for _ in range(BIG // len(PATTERN)):
            f.write(PATTERN)
    os.chmod(d["lower"] / "data" / "big.bin", 0o644)
    return d


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


OLD = hashlib.sha256(PATTERN * (BIG // len(PATTERN))).hexdigest()
EMPTY = hashlib.sha256(b"").hexdigest()
NEW = {"append": hashlib.sha256(PATTERN * (BIG // len(PATTERN)) + b"TAIL").hexdigest(),
       "write": digest(b"NEW"), "chmod": OLD}

CHILD = textwrap.dedent("""
    import sys, time
    from overlaykit import Overlay
    lower, upper, work, backend, op = sys.argv[1:]
    ov = Overlay([lower], upper, work, backend=backend, trace=False).mount()
    print("ready", flush=True)
    if op == "append":
        ov.write_bytes("data/big.bin", b"TAIL", append=True)
    elif op == "write":
        ov.write_bytes("data/big.bin", b"NEW")
    else:
        ov.chmod("data/big.bin", 0o600)
    print("done", flush=True)
    time.sleep(600)
""")


def _copy_in_progress(d: dict[str, Path], half: bool) -> bool:
    """Is a copy of big.bin under way: in work/work (a temp) or, without atomic copy-up, in upper/?"""
    candidates = [d["upper"] / "data" / "big.bin"]
    try:
        candidates += [d["work"] / "work" / n for n in os.listdir(d["work"] / "work")]
    except OSError:
        pass
    for c in candidates:
        try:
            s = os.lstat(c)  # once: the temp may be renamed into upper/ at any moment
        except OSError:
            continue
        if s.st_size >= (BIG // 2 if half else 0) and st.S_ISREG(s.st_mode):
            return True
    return False


def _finished(d: dict[str, Path], op: str) -> bool:
    """The operation is over (an O_TRUNC open lets the kernel skip copying the data)."""
    try:
        s = os.lstat(d["upper"] / "data" / "big.bin")
    except OSError:
        return False
    return {"append": s.st_size == BIG + 4, "write": s.st_size == 3, "chmod": st.S_IMODE(s.st_mode) == 0o600}[op]


def kill_child_at(script: str, d: dict[str, Path], backend: str, op: str, moment: str, reached) -> None:
    """Run ``script`` on the layers in a child, SIGKILL it once ``reached()`` is true (or it ended, or 10 s
    passed; with moment "done", after it said so)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", script, str(d["lower"]), str(d["upper"]), str(d["work"]),
                              backend, op], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        if moment == "done":
            assert child.stdout.readline().strip() == "done"
        else:
            deadline = time.monotonic() + 10
            while not reached() and child.poll() is None and time.monotonic() < deadline:
                pass
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    time.sleep(0.2)  # a kernel backend's helper notices its parent is gone and unmounts


def run_and_kill(d: dict[str, Path], backend: str, op: str, moment: str) -> None:
    kill_child_at(CHILD, d, backend, op, moment,
                  lambda: _copy_in_progress(d, half=moment == "half") or _finished(d, op))


def merged_state(d: dict[str, Path], backend: str) -> tuple[str, int]:
    with Overlay([d["lower"]], d["upper"], d["work"], backend=backend, trace=False) as ov:
        return digest(ov.read_bytes("data/big.bin")), ov.stat("data/big.bin").mode


BACKENDS = ["sim", pytest.param("kernel", marks=pytest.mark.skipif(not KERNEL.available, reason=KERNEL.reason))]


@pytest.mark.parametrize("op", ["append", "write", "chmod"])
@pytest.mark.parametrize("moment", ["start", "half", "done"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kill_during_copy_up_leaves_the_old_or_the_new_state(fast_tmp, backend, op, moment):
    d = big_layers(fast_tmp)
    run_and_kill(d, backend, op, moment)
    new_mode = 0o600 if op == "chmod" else 0o644
    seen = []
    for judge in ["sim"] + (["kernel"] if KERNEL.available else []):
        h, mode = merged_state(d, judge)
        seen.append((judge, h, oct(mode)))
        allowed = {(OLD, 0o644), (NEW[op], new_mode)}
        if op == "write":  # open(O_TRUNC) copies up metadata only, then writes (both backends, as the
            allowed.add((EMPTY, 0o644))  # kernel): a kill between the two leaves the file empty, never half
        assert (h, mode) in allowed, f"{judge} after a kill ({moment}): {seen}"
        if moment == "done":
            assert (h, mode) == (NEW[op], new_mode)
    # nothing half-made stays in upper/: the file there (if any) is whole, and work/work is emptied at mount
    up = d["upper"] / "data" / "big.bin"
    whole = (BIG, BIG + 4, 3) + ((0,) if op == "write" else ())  # empty: the O_TRUNC open's copy, as above
    if up.exists():
        assert up.stat().st_size in whole
    if backend == "sim" and moment != "done":
        with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
            assert os.listdir(d["work"] / "work") == []
            ov.write_bytes("data/big.bin", b"TAIL", append=True)  # the path is usable again, no EEXIST
            assert len(ov.read_bytes("data/big.bin")) in tuple(n + 4 for n in whole if n != BIG + 4)


# -- copy-ups that fail part-way ----------------------------------------------------------------------
def small_layers(tmp_path: Path) -> dict[str, Path]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "a" / "b").mkdir(parents=True)
    (d["lower"] / "a" / "b" / "f.txt").write_bytes(b"x" * 300_000)
    (d["lower"] / "top.txt").write_text("top\n")
    return d


def _upper_files(d) -> list[str]:
    return sorted(str(p.relative_to(d["upper"])) for p in d["upper"].rglob("*"))


@pytest.mark.parametrize("op", ["append", "truncate", "chmod", "setxattr"])
def test_enospc_part_way_through_the_data_leaves_nothing_in_upper(tmp_path, monkeypatch, op):
    d = small_layers(tmp_path)
    real_copy = sim_module._copy_data

    def half_then_full(fd_in, fd_out):
        os.write(fd_out, os.read(fd_in, 1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    actions = {"append": lambda ov: ov.write_bytes("a/b/f.txt", b"+", append=True),
               "truncate": lambda ov: ov.truncate("a/b/f.txt", 10),
               "chmod": lambda ov: ov.chmod("a/b/f.txt", 0o600),
               "setxattr": lambda ov: ov.setxattr("a/b/f.txt", "user.note", b"v")}
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        before = ov.read_bytes("a/b/f.txt")
        monkeypatch.setattr(sim_module, "_copy_data", half_then_full)
        with pytest.raises(OSError) as info:
            actions[op](ov)
        assert (info.value.errno, info.value.filename) == (errno.ENOSPC, "a/b/f.txt")
        # the parents were copied up whole; the file was not copied at all
        assert _upper_files(d) == ["a", "a/b"]
        assert os.listdir(d["work"] / "work") == []
        assert ov.read_bytes("a/b/f.txt") == before and ov.stat("a/b/f.txt").mode == 0o644
        assert ov.layer_of("a/b/f.txt") == "lower[0]"
        monkeypatch.setattr(sim_module, "_copy_data", real_copy)
        actions[op](ov)  # as if the failed call never happened: no EEXIST
        assert ov.layer_of("a/b/f.txt") == "upper"
        after = (ov.read_bytes("a/b/f.txt"), ov.stat("a/b/f.txt").mode)
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        assert (ov.read_bytes("a/b/f.txt"), ov.stat("a/b/f.txt").mode) == after


def test_eacces_while_copying_a_parent_directory_leaves_no_half_directory(tmp_path, monkeypatch):
    d = small_layers(tmp_path)
    real_meta = sim_module.SimBackend._copy_meta

    def refuse_b(self, src, dst, s, *more):
        real_meta(self, src, dst, s, *more)
        if st.S_ISDIR(s.st_mode) and os.path.realpath(src).endswith("/lower/a/b"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        monkeypatch.setattr(sim_module.SimBackend, "_copy_meta", refuse_b)
        with pytest.raises(OSError) as info:
            ov.write_text("a/b/new.txt", "n")
        assert info.value.errno == errno.EACCES
        assert _upper_files(d) == ["a"]  # a/ was copied whole; a/b/ never reached upper/
        assert os.listdir(d["work"] / "work") == []
        assert ov.listdir("a/b") == ["f.txt"] and not ov.exists("a/b/new.txt")
        monkeypatch.setattr(sim_module.SimBackend, "_copy_meta", real_meta)
        ov.write_text("a/b/new.txt", "n")
        assert ov.listdir("a/b") == ["f.txt", "new.txt"]


@pytest.mark.skipif(not ROOT or shutil.which("unshare") is None, reason="needs root (a small tmpfs in a private mount namespace)")
def test_a_full_upper_filesystem_gives_enospc_and_keeps_the_lower_file(tmp_path):
    """A real ENOSPC: upper/ and work/ on a 1 MiB tmpfs, a 4 MiB lower file appended to."""
    script = textwrap.dedent(f"""
        import errno, os, subprocess, sys
        from overlaykit import Overlay
        small = {str(tmp_path / 'small')!r}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], check=True)
        for n in ("upper", "work"):
            os.mkdir(os.path.join(small, n))
        ov = Overlay([{str(tmp_path / 'lower')!r}], small + "/upper", small + "/work", backend="sim").mount()
        try:
            ov.write_bytes("big.bin", b"+", append=True)
            print("no error")
        except OSError as e:
            print(errno.errorcode[e.errno], e.filename)
        print(sorted(os.listdir(small + "/upper")), sorted(os.listdir(small + "/work/work")))
        print(len(ov.read_bytes("big.bin")))
        ov.write_bytes("small.txt", b"fits")
        print(ov.read_bytes("small.txt"))
    """)
    (tmp_path / "lower").mkdir()
    (tmp_path / "small").mkdir()
    (tmp_path / "lower" / "big.bin").write_bytes(b"L" * (4 << 20))
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ENOSPC big.bin", "[] []", str(4 << 20), "b'fits'"]


# -- the lesson can show work/ doing its job -------------------------------------------------------
def test_the_trace_says_the_copy_was_built_in_work(tmp_path):
    d = small_layers(tmp_path)
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        ov.write_text("top.txt", "more\n", append=True)
        [ev] = [e for e in ov.trace if e.kind == "copy-up"]
        assert "copied into work/, renamed into upper/" in ev.detail and ev.detail.endswith("from lower[0]")


def test_leftovers_in_work_do_not_reach_the_merged_view(tmp_path):
    d = small_layers(tmp_path)
    (d["work"] / "work").mkdir()
    (d["work"] / "work" / "#1f").write_text("half a copy")
    (d["work"] / "work" / "#20").mkdir()
    os.chmod(d["work"] / "work" / "#20", 0)
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        assert os.listdir(d["work"] / "work") == []
        assert ov.listdir() == ["a", "top.txt"]
        ov.write_text("top.txt", "x", append=True)
        assert ov.read_text("top.txt") == "top\nx"


# -- metacopy=on: the data of a metacopy file follows into the same upper inode --------------------
CHILD_METACOPY = textwrap.dedent("""
    import sys, time
    from overlaykit import Overlay
    lower, upper, work, backend, op = sys.argv[1:]
    ov = Overlay([lower], upper, work, backend=backend, trace=False, options="metacopy=on").mount()
    print("ready", flush=True)
    if op == "append":
        ov.write_bytes("data/big.bin", b"TAIL", append=True)
    else:
        ov.write_bytes("data/big.bin", b"NEW")
    print("done", flush=True)
    time.sleep(600)
""")


def _metacopy_data_half_in(up: Path) -> bool:
    try:
        return os.lstat(up).st_blocks * 512 >= BIG // 2
    except OSError:
        return False


@pytest.mark.skipif(not (ROOT and KERNEL.available), reason="metacopy=on needs root (trusted xattrs)")
@pytest.mark.parametrize("op", ["append", "write"])
@pytest.mark.parametrize("moment", ["start", "half", "done"])
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_a_kill_while_a_metacopy_file_gets_its_data_leaves_a_file_read_right(fast_tmp, backend, moment, op):
    """ovl_copy_up_meta_inode_data copies into the metacopy file's own upper inode and removes
    ``overlay.metacopy`` last: killed before that, the file is still metacopy, its upper bytes unused, and
    both judges read the lower data (with the chmod'ed mode); after it, the whole new data.  A truncating
    write (the sim replaces the file by an empty copy built in work/work) leaves old, empty or new."""
    d = big_layers(fast_tmp)
    with Overlay([d["lower"]], d["upper"], d["work"], backend=backend, trace=False, options="metacopy=on") as ov:
        ov.chmod("data/big.bin", 0o600)
    up = d["upper"] / "data" / "big.bin"
    assert os.getxattr(up, "trusted.overlay.metacopy") == b"" and os.lstat(up).st_blocks * 512 < BIG // 2
    kill_child_at(CHILD_METACOPY, d, backend, op, moment, lambda: moment != "half" or _metacopy_data_half_in(up))
    for judge in ("sim", "kernel"):
        with Overlay([d["lower"]], d["upper"], d["work"], backend=judge, trace=False, options="metacopy=on") as ov:
            h, s = digest(ov.read_bytes("data/big.bin")), ov.stat("data/big.bin")
        sizes = {OLD: BIG, NEW[op]: len(b"NEW") if op == "write" else BIG + 4, EMPTY: 0}
        assert h in ({OLD, NEW[op], EMPTY} if op == "write" else {OLD, NEW[op]}) and s.mode == 0o600, (judge, moment)
        assert s.size == sizes[h], (judge, moment)  # size and data agree
        if moment == "done":
            assert h == NEW[op]
