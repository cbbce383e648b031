"""Paths inside a layer, resolved one directory at a time without following a host symlink.

A layer directory can be edited behind the simulator's back (a second notebook, a learner's ``ln -s``).
If a directory ``d`` in upper/ becomes a symlink to a host directory, ``open(upper + "/d/x")`` would write
*outside* the layers.  Here every directory below the layer root is opened with
``O_PATH|O_DIRECTORY|O_NOFOLLOW`` relative to its parent's fd, and the caller gets the short path
``/proc/self/fd/N/name``: the kernel resolves it from that already-checked directory, so only the last
component is looked up by name (calls use ``follow_symlinks=False`` / ``O_NOFOLLOW`` for it).  The path
stays short however deep the layer lies, so merged paths under PATH_MAX work even when the host path of
the layer plus the merged path would not.
"""
from __future__ import annotations

import ctypes
import errno
import os
from contextlib import contextmanager
from typing import Iterator

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: str, rel: str, flags: int = _DIR_FLAGS, root_fd: int | None = None) -> int:
    """An fd (O_PATH unless ``flags`` say otherwise) of directory ``root/rel``; a symlink or a
    non-directory on the way is ENOTDIR.  ``root_fd``, if given, is an O_PATH fd of ``root`` to start from."""
    if not rel:  # the layer root itself is the user's choice
        return os.open(root, (flags & ~os.O_NOFOLLOW) | os.O_DIRECTORY | os.O_CLOEXEC)
    if not _normal(rel):
        raise OSError(errno.EINVAL, "not a normalized path inside the layer", rel)
    if root_fd is not None:
        found = _openat2(root_fd, rel, flags)
        if found is not None:
            return found
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        found = _openat2(fd, rel, flags)
        if found is not None:
            return found
        parts = rel.split("/")
        for i, name in enumerate(parts):  # no openat2: one component at a time
            new = os.open(name, flags if i == len(parts) - 1 else _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = new
        found, fd = fd, -1
        return found
    finally:
        if fd >= 0:
            os.close(fd)


def _normal(rel: str) -> bool:
    return not (rel.startswith("/") or rel.endswith("/") or "//" in rel
                or any(x in (".", "..") for x in rel.split("/")))


_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine)
_RESOLVE_NO_SYMLINKS = 0x04
_openat2_works = _SYS_OPENAT2 is not None


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def _openat2(dirfd: int, rel: str, flags: int) -> int | None:
    """openat2(RESOLVE_NO_SYMLINKS): the whole walk in one system call (Linux 5.6+); None if unavailable."""
    global _openat2_works
    if not _openat2_works:
        return None
    how = _OpenHow(flags & ~os.O_NOFOLLOW, 0, _RESOLVE_NO_SYMLINKS)
    fd = _syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.addressof(how), _HOW_SIZE)
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EAGAIN):  # old kernel, seccomp: walk instead
        _openat2_works = code == errno.EAGAIN
        return None
    if code == errno.ELOOP:
        code = errno.ENOTDIR  # a symlink where a directory is needed, as the component walk reports it
    raise OSError(code, os.strerror(code), rel)


class at:
    """``with at(root, rel) as real``: a short path to ``root/rel`` whose directories were all opened
    without following symlinks.

    Only the last component is resolved by name; use it with ``follow_symlinks=False``, ``O_NOFOLLOW``
    or on something known not to be a symlink.  ``rel == ""`` gives the layer root's own path.
    """

    __slots__ = ("path", "fd")

    def __init__(self, root: str, rel: str, root_fd: int | None = None):
        self.fd = -1
        if not rel:
            self.path = root
            return
        parent, _, name = rel.rpartition("/")
        if not parent and root_fd is not None:
            self.path = f"/proc/self/fd/{root_fd}/{name}"
            return
        self.fd = open_dir(root, parent, _DIR_FLAGS, root_fd)
        self.path = f"/proc/self/fd/{self.fd}/{name}"

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class at_dir(at):
    """``with at_dir(root, rel) as d``: directory ``root/rel`` itself, every component opened without
    following a symlink.

    The path ends in ``/.``, so it names the directory with or without ``follow_symlinks``, and
    ``os.path.join(d, name)`` names an entry in it.
    """

    __slots__ = ()

    def __init__(self, root: str, rel: str, root_fd: int | None = None):
        self.fd = -1
        if not rel and root_fd is not None:
            self.path = f"/proc/self/fd/{root_fd}/."
            return
        self.fd = open_dir(root, rel, _DIR_FLAGS, root_fd)
        self.path = f"/proc/self/fd/{self.fd}/."


@contextmanager
def read_dir(root: str, rel: str, root_fd: int | None = None) -> Iterator[tuple[str, int]]:
    """``(path, fd)`` of directory ``root/rel``: the `at_dir` path and an fd open for reading it.

    The fd needs only read permission, as opendir(3) does (the ``/.`` path needs search permission too).
    """
    fd = open_dir(root, rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, root_fd)
    try:
        yield f"/proc/self/fd/{fd}/.", fd
    finally:
        os.close(fd)
