"""The arguments of `Overlay` calls, checked as ``os`` checks them, once, before any backend sees them.

A learner's odd argument (``truncate(f, 2**63)``, ``chmod(f, 1 << 40)``, a NUL in an xattr name) must get
the exception the same call on a plain directory gives -- TypeError, ValueError, OverflowError, or the
kernel's EINVAL -- on both backends, and must never reach the kernel backend's helper as something it
cannot convert.  Where ``os`` converts an argument in C (integer ranges, the ``times`` tuple, xattr
names and values) we let ``os`` itself do it: the same function is called on a file descriptor that
cannot be open, so the conversion runs, and raises exactly what ``os`` raises, but the system call
fails (EBADF) without touching anything.
"""
from __future__ import annotations

import errno
import os

from .ondisk import errno_error

#: A file descriptor number no process has open (beyond any RLIMIT_NOFILE): calls on it fail with EBADF.
_NO_FD = 2**31 - 1
#: (uid_t)-1 and (gid_t)-1: "leave unchanged", as ``os.chown`` reads them.
_UNCHANGED = 2**32 - 1


def _convert_as_os(fn, *args) -> None:
    """Run ``os`` function ``fn`` on a descriptor that is never open: its argument conversion runs."""
    try:
        fn(_NO_FD, *args)
    except OSError:  # the arguments were converted and the system call made (and refused)
        pass


def size(path: str, length) -> int:
    """truncate's length: an integer that fits off_t, not negative (EINVAL, the kernel's first check)."""
    _convert_as_os(os.truncate, length)
    length = int(length)
    if length < 0:
        raise errno_error(errno.EINVAL, path)
    return length


def mode(value) -> int:
    """A mode for chmod or mkdir: a C int, as ``os.chmod`` and ``os.mkdir`` take it."""
    _convert_as_os(os.chmod, value)
    return int(value)


def owner(uid, gid) -> tuple[int, int]:
    """uid and gid for chown: each -1 (unchanged) or a uid_t; ``2**32 - 1`` is -1, as for ``os.chown``."""
    _convert_as_os(os.chown, uid, gid)
    uid, gid = int(uid), int(gid)
    return (-1 if uid == _UNCHANGED else uid), (-1 if gid == _UNCHANGED else gid)


def times(value):
    """utime's ``times``: None or a tuple of two numbers that fit time_t."""
    _convert_as_os(os.utime, value)
    return value


def xattr_name(name) -> str:
    """An extended attribute's name: str, bytes or path-like without NUL, as ``os.setxattr`` takes it."""
    _convert_as_os(os.getxattr, name)
    return os.fsdecode(name)


def xattr_value(value) -> bytes:
    """An extended attribute's value: bytes-like (a str is encoded as UTF-8, for convenience)."""
    if isinstance(value, str):
        return value.encode()
    _convert_as_os(os.setxattr, "user.overlaykit", value)
    return bytes(value)


def data(value) -> bytes:
    """File contents to write: bytes-like, as ``os.write`` wants them (``bytes(12)`` would be 12 NULs)."""
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(value).__name__}'") from None
    return view.tobytes()


def link_target(target) -> str:
    """A symlink's target: str, bytes or path-like, without NUL (ValueError, as ``os.symlink``)."""
    if not isinstance(target, (str, bytes, os.PathLike)):
        raise TypeError(f"symlink: src should be string, bytes or os.PathLike, not {type(target).__name__}")
    target = os.fsdecode(os.fspath(target))
    if "\0" in target:
        raise ValueError("embedded null byte")
    return target


def open_flags(value) -> int:
    """open(2) flags: a C int, as ``os.open`` takes it (O_CLOEXEC is the helpers' business: dropped)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"'{type(value).__name__}' object cannot be interpreted as an integer")
    if value < 0 or value > 0x7FFFFFFF:
        raise OverflowError("signed integer is greater than maximum")
    return value & ~os.O_CLOEXEC


def ns_times(value) -> None:
    """utime's ``ns``: a tuple of two integers, as ``os.utime`` takes it."""
    _convert_as_os(lambda fd, ns: os.utime(fd, ns=ns), value)
