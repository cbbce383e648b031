"""Bad arguments: `Overlay` raises what ``os`` raises for the same call, on both backends (issue 10 item 4).

Each row runs the call on a plain directory with ``os`` and on an overlay (the file in a lower layer), and
compares the exception's type and errno.  On the kernel backend the helper must survive every row.
"""
from __future__ import annotations

import os

import pytest

from overlaykit import Overlay
from overlaykit.kernel import probe

OK, WHY = probe()
NAN = float("nan")

#: (label, call on a plain directory with os, the same call through an Overlay); the file is "f".
ROWS = [
    ("truncate 2**63", lambda d: os.truncate(f"{d}/f", 2**63), lambda ov: ov.truncate("f", 2**63)),
    ("truncate 2**62", lambda d: os.truncate(f"{d}/f", 2**62), lambda ov: ov.truncate("f", 2**62)),
    ("truncate -1", lambda d: os.truncate(f"{d}/f", -1), lambda ov: ov.truncate("f", -1)),
    ("truncate 1.5", lambda d: os.truncate(f"{d}/f", 1.5), lambda ov: ov.truncate("f", 1.5)),
    ("truncate '1'", lambda d: os.truncate(f"{d}/f", "1"), lambda ov: ov.truncate("f", "1")),
    ("chmod 1 << 40", lambda d: os.chmod(f"{d}/f", 1 << 40), lambda ov: ov.chmod("f", 1 << 40)),
    ("chmod 1 << 31", lambda d: os.chmod(f"{d}/f", 1 << 31), lambda ov: ov.chmod("f", 1 << 31)),
    ("chmod '644'", lambda d: os.chmod(f"{d}/f", "644"), lambda ov: ov.chmod("f", "644")),
    ("chmod 1.0", lambda d: os.chmod(f"{d}/f", 1.0), lambda ov: ov.chmod("f", 1.0)),
    ("chown -2 -1", lambda d: os.chown(f"{d}/f", -2, -1), lambda ov: ov.chown("f", -2, -1)),
    ("chown -1 2**40", lambda d: os.chown(f"{d}/f", -1, 2**40), lambda ov: ov.chown("f", -1, 2**40)),
    ("chown 2**64", lambda d: os.chown(f"{d}/f", 2**64, -1), lambda ov: ov.chown("f", 2**64, -1)),
    ("chown '0'", lambda d: os.chown(f"{d}/f", "0", -1), lambda ov: ov.chown("f", "0", -1)),
    ("utime (1,)", lambda d: os.utime(f"{d}/f", (1,)), lambda ov: ov.utime("f", (1,))),
    ("utime [1, 2]", lambda d: os.utime(f"{d}/f", [1, 2]), lambda ov: ov.utime("f", [1, 2])),
    ("utime 5", lambda d: os.utime(f"{d}/f", 5), lambda ov: ov.utime("f", 5)),
    ("utime ('a', 'b')", lambda d: os.utime(f"{d}/f", ("a", "b")), lambda ov: ov.utime("f", ("a", "b"))),
    ("utime (nan, 1)", lambda d: os.utime(f"{d}/f", (NAN, 1)), lambda ov: ov.utime("f", (NAN, 1))),
    ("utime (1e30, 1)", lambda d: os.utime(f"{d}/f", (1e30, 1)), lambda ov: ov.utime("f", (1e30, 1))),
    ("utime (2**70, 1)", lambda d: os.utime(f"{d}/f", (2**70, 1)), lambda ov: ov.utime("f", (2**70, 1))),
    ("setxattr NUL in name", lambda d: os.setxattr(f"{d}/f", "user.a\0b", b"v"),
     lambda ov: ov.setxattr("f", "user.a\0b", b"v")),
    ("setxattr int name", lambda d: os.setxattr(f"{d}/f", 5, b"v"), lambda ov: ov.setxattr("f", 5, b"v")),
    ("setxattr int value", lambda d: os.setxattr(f"{d}/f", "user.a", 12),
     lambda ov: ov.setxattr("f", "user.a", 12)),
    ("getxattr NUL in name", lambda d: os.getxattr(f"{d}/f", "user.a\0b"),
     lambda ov: ov.getxattr("f", "user.a\0b")),
    ("symlink NUL in target", lambda d: os.symlink("a\0b", f"{d}/l"), lambda ov: ov.symlink("a\0b", "l")),
    ("symlink int target", lambda d: os.symlink(5, f"{d}/l"), lambda ov: ov.symlink(5, "l")),
    ("stat NUL in path", lambda d: os.stat(f"{d}/f\0x"), lambda ov: ov.stat("f\0x")),
    ("stat float path", lambda d: os.stat(1.5), lambda ov: ov.stat(1.5)),
    ("mkdir mode 1 << 40", lambda d: os.mkdir(f"{d}/m", 1 << 40), lambda ov: ov.mkdir("m", 1 << 40)),
    ("write 12", lambda d: _os_write(f"{d}/f", 12), lambda ov: ov.write_bytes("f", 12)),
    ("write a str", lambda d: _os_write(f"{d}/f", "x"), lambda ov: ov.write_bytes("f", "x")),
]


def _os_write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def outcome(fn, arg):
    try:
        fn(arg)
    except Exception as e:
        return type(e).__name__, getattr(e, "errno", None)
    return "no error", None


BACKENDS = ["sim", pytest.param("kernel", marks=[pytest.mark.kernel,
                                                  pytest.mark.skipif(not OK, reason=f"kernel backend not allowed: {WHY}")])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_what_os_raises(tmp_path, backend):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_text("hello")
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_text("hello")
    expected = {label: outcome(os_call, str(plain)) for label, os_call, _ in ROWS}
    assert all(v[0] != "no error" for v in expected.values()), expected
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend=backend) as ov:
        got = {}
        for label, _, ov_call in ROWS:
            got[label] = outcome(ov_call, ov)
            # nothing changed, and the overlay (the kernel backend's helper) still answers
            assert ov.mounted, label
            assert ov.read_bytes("f") == b"hello", label
        assert got == expected
        assert ov.listdir(".") == ["f"]


def test_write_of_an_int_writes_nothing(tmp_path):
    """``bytes(12)`` is twelve NULs: the API must not turn a wrong type into data."""
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend="sim") as ov:
        with pytest.raises(TypeError):
            ov.write_bytes("new", 12)
        assert not ov.exists("new")


def test_good_arguments_still_pass(tmp_path):
    """The checks convert as os does: (uid_t)-1 means unchanged, bytes names and bytearray data work."""
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_text("hello")
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend="sim") as ov:
        uid = ov.stat("f").uid
        ov.chown("f", 2**32 - 1, -1)
        assert ov.stat("f").uid == uid
        ov.write_bytes("g", bytearray(b"abc"))
        ov.write_bytes("g", memoryview(b"de"), append=True)
        assert ov.read_bytes("g") == b"abcde"
        ov.utime("g", (1, 2.5))
        assert ov.stat("g").mtime_ns == 2_500_000_000
        ov.symlink(b"target", "l")
        assert ov.lstat("l").target == "target"
        ov.truncate("g", True)
        assert ov.read_bytes("g") == b"a"
