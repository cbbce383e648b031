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

import errno
import os
from contextlib import contextmanager
from typing import Iterator

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: str, rel: str) -> int:
    """An O_PATH fd of directory ``root/rel``; a symlink (or non-directory) on the way is ENOTDIR."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # the layer root itself is the user's choice
    try:
        for name in rel.split("/") if rel else ():
            if name in ("", ".", ".."):
                raise OSError(errno.EINVAL, "not a normalized path inside the layer", rel)
            new = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def at(root: str, rel: str) -> Iterator[str]:
    """A short path to ``root/rel`` whose directories were all opened without following symlinks.

    Only the last component is resolved by name; use it with ``follow_symlinks=False``, ``O_NOFOLLOW``
    or on something known not to be a symlink.  ``rel == ""`` gives the layer root's own path.
    """
    if not rel:
        yield root
        return
    parent, _, name = rel.rpartition("/")
    fd = open_dir(root, parent)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


@contextmanager
def at_dir(root: str, rel: str) -> Iterator[str]:
    """A path to directory ``root/rel`` itself, every component opened without following a symlink.

    It ends in ``/.``, so it names the directory with or without ``follow_symlinks`` and
    ``os.path.join(it, name)`` names an entry in it.
    """
    fd = open_dir(root, rel)
    try:
        yield f"/proc/self/fd/{fd}/."
    finally:
        os.close(fd)


@contextmanager
def read_dir(root: str, rel: str) -> Iterator[tuple[str, int]]:
    """``(path, fd)`` of directory ``root/rel``: the `at_dir` path and an fd open for reading it.

    The fd needs only read permission, as opendir(3) does (the ``/.`` path needs search permission too).
    """
    fd = open_dir(root, rel)
    try:
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}/.", rfd
        finally:
            os.close(rfd)
    finally:
        os.close(fd)
