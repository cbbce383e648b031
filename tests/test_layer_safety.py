"""One live overlay per upper/, no escape through a host symlink, long host paths, reserved names.

Issue 10 items 3, 8 (PATH_MAX) and 9.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layer_helpers import full_snapshot
from overlaykit import Overlay, capabilities

KERNEL = capabilities()["kernel"]
REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["sim", pytest.param("kernel", marks=pytest.mark.skipif(not KERNEL.available, reason=KERNEL.reason))]


def layers(tmp_path: Path) -> dict[str, Path]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "work2", "upper2")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "d").mkdir()
    (d["lower"] / "d" / "f").write_text("lower f\n")
    (d["lower"] / "a.txt").write_text("a\n")
    return d


# -- 3a: upper/ and work/ in use ---------------------------------------------------------------------
@pytest.mark.parametrize("second", BACKENDS)
@pytest.mark.parametrize("first", BACKENDS)
def test_a_second_overlay_on_the_same_upper_is_ebusy(tmp_path, first, second):
    d = layers(tmp_path)
    with Overlay([d["lower"]], d["upper"], d["work"], backend=first):
        for upper, work in ((d["upper"], d["work"]), (d["upper"], d["work2"]), (d["upper2"], d["work"])):
            with pytest.raises(OSError) as info:
                Overlay([d["lower"]], upper, work, backend=second).mount()
            assert info.value.errno == errno.EBUSY
            assert f"pid {os.getpid()}" in str(info.value) and "in use" in str(info.value)
        with Overlay([d["lower"]], d["upper2"], d["work2"], backend=second) as other:  # other dirs: fine
            assert other.read_text("a.txt") == "a\n"
    with Overlay([d["lower"]], d["upper"], d["work"], backend=second) as ov:  # released at unmount
        assert ov.read_text("d/f") == "lower f\n"


def test_the_mark_is_held_across_processes_and_dies_with_the_holder(tmp_path):
    d = layers(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from overlaykit import Overlay
        ov = Overlay([{str(d["lower"])!r}], {str(d["upper"])!r}, {str(d["work"])!r}, backend="sim").mount()
        print("mounted", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "mounted"
        with pytest.raises(OSError) as info:
            Overlay([d["lower"]], d["upper"], d["work2"], backend="sim").mount()
        assert info.value.errno == errno.EBUSY and f"process {holder.pid}" in str(info.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:  # a crashed holder frees it
            assert ov.read_text("a.txt") == "a\n"
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_rerun_lesson_cell_replaces_its_previous_overlay(tmp_path):
    from overlaykit import course
    first = course.lesson_overlay(tmp_path / "ws", backend="sim").mount()
    second = course.lesson_overlay(tmp_path / "ws", backend="sim").mount()  # the same cell, run again
    assert second.mounted and not first.mounted
    second.unmount()


# -- 3b: never through a host symlink ----------------------------------------------------------------
def _attempts(ov):
    return {
        "write": lambda: ov.write_text("d/x", "escaped\n"),
        "append": lambda: ov.write_text("d/f", "escaped\n", append=True),
        "read": lambda: ov.read_text("d/f"),
        "listdir": lambda: ov.listdir("d"),
        "mkdir": lambda: ov.mkdir("d/newdir"),
        "chmod": lambda: ov.chmod("d/f", 0o777),
        "chown": lambda: ov.chown("d/f", os.getuid(), os.getgid()),
        "utime": lambda: ov.utime("d/f", (1, 1)),
        "truncate": lambda: ov.truncate("d/f", 0),
        "setxattr": lambda: ov.setxattr("d/f", "user.x", b"1"),
        "symlink": lambda: ov.symlink("/etc/passwd", "d/link"),
        "rename": lambda: ov.rename("a.txt", "d/a.txt"),
        "link": lambda: ov.link("a.txt", "d/hard"),
        "remove": lambda: ov.remove("d/f"),
        "stat": lambda: ov.stat("d/f"),
    }


@pytest.fixture(params=["openat2", "component walk"])
def resolver(request, monkeypatch):
    """Both ways nofollow resolves a path: one openat2(RESOLVE_NO_SYMLINKS), or one component at a time."""
    from overlaykit import nofollow
    if request.param == "component walk":
        monkeypatch.setattr(nofollow, "_openat2_works", False)
    return request.param


@pytest.mark.parametrize("op", list(_attempts(None)))
def test_a_directory_swapped_for_a_host_symlink_behind_the_sims_back_is_not_followed(tmp_path, op, resolver):
    d = layers(tmp_path)
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_text("host secret\n")
    before = full_snapshot(host)
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        ov.write_text("d/f", "upper f\n")  # d/ is now copied up, and cached as a directory
        assert ov.listdir("d") == ["f"]
        # another program (a second notebook, a shell) replaces upper/d by a symlink to a host directory
        os.rename(d["upper"] / "d", tmp_path / "old-d")
        os.symlink(host, d["upper"] / "d")
        try:
            result = _attempts(ov)[op]()
        except OSError as e:
            result = None
            assert e.filename in ("d/x", "d/f", "d/newdir", "d/link", "a.txt", "d"), e  # the caller's path
            assert e.filename2 in (None, "d/a.txt", "d/hard"), e
        assert result != "host secret\n" and "host" not in str(result)
        if op == "listdir":
            assert result is None or result == ["f"]
    assert full_snapshot(host) == before


def test_a_lower_directory_swapped_for_a_host_symlink_is_not_read(tmp_path, resolver):
    d = layers(tmp_path)
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_text("host secret\n")
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        assert ov.listdir("d") == ["f"]
        os.rename(d["lower"] / "d", tmp_path / "old-d")
        os.symlink(host, d["lower"] / "d")
        for attempt in (lambda: ov.read_text("d/f"), lambda: ov.write_text("d/f", "x", append=True)):
            try:
                assert "host" not in attempt()
            except OSError:
                pass
    assert (host / "f").read_text() == "host secret\n" and os.listdir(host) == ["f"]


# -- item 8: merged paths under PATH_MAX below a deep host path ----------------------------------------
def _deep_dir(base: Path, length: int) -> Path:
    """A directory whose absolute path is about ``length`` characters (made one level at a time)."""
    p = base
    while len(str(p)) < length - 200:
        p = p / ("d" * 190)
        p.mkdir()
    return p


def test_merged_paths_work_when_the_host_path_would_exceed_path_max(tmp_path, resolver):
    deep = _deep_dir(tmp_path, 2600)
    d = {n: deep / n for n in ("lower", "upper", "work")}
    for p in d.values():
        p.mkdir()
    merged = "/".join(["m" * 200] * 9)  # 1808 characters: the host paths below are over 4096
    assert len(str(d["upper"])) + len(merged) > 4096
    fd = os.open(d["lower"], os.O_RDONLY)
    try:
        for part in merged.split("/"):  # a deep lower file, made relative to an fd
            os.mkdir(part, dir_fd=fd)
            new = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        with open(os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("deep\n")
    finally:
        os.close(fd)
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        assert ov.read_text(f"{merged}/f.txt") == "deep\n"
        ov.write_text(f"{merged}/f.txt", "more\n", append=True)  # copy-up of every parent, then the file
        ov.mkdir(f"{merged}/new")
        ov.write_text(f"{merged}/new/g.txt", "g\n")
        ov.chmod(f"{merged}/new/g.txt", 0o600)
        ov.rename(f"{merged}/new/g.txt", f"{merged}/g.txt")
        ov.remove(f"{merged}/f.txt")
        assert ov.listdir(merged) == ["g.txt", "new"]
        assert ov.layer_of(f"{merged}/g.txt") == "upper" and ov.stat(f"{merged}/g.txt").mode == 0o600
        assert any(c.path == f"{merged}/f.txt" and c.kind == "whiteout" for c in ov.upper_changes())
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim") as ov:
        assert ov.read_text(f"{merged}/g.txt") == "g\n" and not ov.exists(f"{merged}/f.txt")


# -- item 9: the fallback encoding's reserved names --------------------------------------------------
def test_fallback_encoding_refuses_names_that_would_become_whiteouts(tmp_path):
    d = layers(tmp_path)
    (d["lower"] / "passwd").write_text("root:x:0:0\n")
    attempts = {
        ".wh.passwd (write)": lambda ov: ov.write_text(".wh.passwd", ""),
        ".wh.passwd (touch)": lambda ov: ov.touch(".wh.passwd"),
        "d/.wh..wh..opq (write)": lambda ov: ov.write_text("d/.wh..wh..opq", ""),
        "d/.wh..wh..opq (mkdir)": lambda ov: ov.mkdir("d/.wh..wh..opq"),
        ".wh.passwd (symlink)": lambda ov: ov.symlink("x", ".wh.passwd"),
        ".wh.passwd (link)": lambda ov: ov.link("a.txt", ".wh.passwd"),
        ".wh.passwd (rename)": lambda ov: ov.rename("a.txt", ".wh.passwd"),
        "d/.wh.f (rename)": lambda ov: ov.rename("a.txt", "d/.wh.f"),
    }
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim", encoding="fallback") as ov:
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                attempt(ov)
            assert info.value.errno == errno.EINVAL, what
            assert "reserved" in str(info.value) and "OCI" in str(info.value), what
        assert ov.read_text("passwd") == "root:x:0:0\n" and ov.listdir("d") == ["f"]
        ov.write_text("wh.not-reserved", "ok")  # only the ".wh." prefix is reserved
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim", encoding="fallback") as ov:
        assert ov.read_text("passwd") == "root:x:0:0\n"
        assert ov.listdir("d") == ["f"] and ov.read_text("a.txt") == "a\n"
        assert ov.listdir() == ["a.txt", "d", "passwd", "wh.not-reserved"]


def test_kernel_encoding_keeps_wh_names_as_ordinary_files(tmp_path):
    d = layers(tmp_path)
    with Overlay([d["lower"]], d["upper"], d["work"], backend="sim", encoding="kernel") as ov:
        ov.write_text(".wh.passwd", "just a file")
        assert ov.read_text(".wh.passwd") == "just a file"
