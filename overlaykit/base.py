"""The vocabulary every part of overlaykit shares: `Stat`, the `Backend` protocol, path normalisation,
`BackendUnavailable`, the limits and flags, the mount `Options`, and two small registries (which module
serves each backend, who draws an object in a notebook).

It imports nothing else of overlaykit but `options`, so the backends (sim.py, kernel.py), the fronts
(fuse.py, openfile.py) and the façade (engine.py) can all import it without a cycle: engine.py imports
the backends only through `backend_entry`, and the diagrams only through `display_hooks`.
"""
from __future__ import annotations

import importlib
import os
import stat as st
from dataclasses import dataclass, field
from typing import Callable

from .options import Options

__all__ = ["MAX_LOWERS", "DOCKER_MAX_LOWERS", "BACKENDS", "RENAME_NOREPLACE", "RENAME_EXCHANGE",
           "RENAME_WHITEOUT", "Stat", "Backend", "BackendUnavailable", "Options", "normpath", "show",
           "BackendEntry", "backend_entry", "display_hooks", "mimebundle"]

#: The kernel's limit on lower layers (OVL_MAX_STACK in fs/overlayfs/params.h).
MAX_LOWERS = 500
#: Docker's overlay2 driver stops at 128 so that its mount options fit in one page.
DOCKER_MAX_LOWERS = 128

BACKENDS = ("sim", "kernel")
#: renameat2 flags for `Overlay.rename` (linux/fs.h); os has no names for them.
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


#: How much one read or write request moves (the kernel backend's helper streams files in these).
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Stat:
    """The portable part of a stat result: what both backends report identically."""

    kind: str
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int
    target: str | None = None
    # The rest of stat(2).  Not compared by ``==`` (which keeps meaning "the same portable stat" on both
    # backends): inode numbers and times are the host's, and only their relations are portable.
    ino: int = field(default=0, compare=False)
    dev: int = field(default=0, compare=False)
    atime_ns: int = field(default=0, compare=False)
    ctime_ns: int = field(default=0, compare=False)
    blocks: int = field(default=0, compare=False)
    rdev: int = field(default=0, compare=False)

    # os.stat_result spellings, so code written for os.stat() reads a Stat too
    st_ino = property(lambda self: self.ino)
    st_dev = property(lambda self: self.dev)
    st_size = property(lambda self: self.size)
    st_nlink = property(lambda self: self.nlink)
    st_uid = property(lambda self: self.uid)
    st_gid = property(lambda self: self.gid)
    st_atime_ns = property(lambda self: self.atime_ns)
    st_mtime_ns = property(lambda self: self.mtime_ns)
    st_ctime_ns = property(lambda self: self.ctime_ns)
    st_blocks = property(lambda self: self.blocks)
    st_rdev = property(lambda self: self.rdev)
    st_mode = property(lambda self: _KIND_BITS.get(self.kind, 0) | self.mode)

    @classmethod
    def from_os(cls, s: os.stat_result, target: str | None = None, nlink: int | None = None, *,
                ino: int | None = None, dev: int | None = None) -> "Stat":
        return cls(_KIND_OF_FMT.get(st.S_IFMT(s.st_mode), "unknown"), st.S_IMODE(s.st_mode), s.st_size,
                   s.st_nlink if nlink is None else nlink, s.st_uid, s.st_gid, s.st_mtime_ns, target,
                   s.st_ino if ino is None else ino, s.st_dev if dev is None else dev,
                   s.st_atime_ns, s.st_ctime_ns, s.st_blocks, s.st_rdev)


_KIND_BITS = {"file": st.S_IFREG, "dir": st.S_IFDIR, "symlink": st.S_IFLNK, "fifo": st.S_IFIFO,
              "socket": st.S_IFSOCK, "char": st.S_IFCHR, "block": st.S_IFBLK}
_KIND_OF_FMT = {bits: kind for kind, bits in _KIND_BITS.items()}


def normpath(path: str | os.PathLike) -> str:
    """``'/a//b/../c'`` -> ``'a/c'``; the root is ``''``.  Raises ValueError for empty or escaping paths."""
    p = os.fspath(path)
    if not isinstance(p, str):
        p = os.fsdecode(p)
    q = f"/{p}/"
    if p and "//" not in q and "/./" not in q and "/../" not in q and "\0" not in p:
        return p  # already normal: the common case, checked in C
    if p == "":
        raise ValueError("empty path: name a file or directory inside the overlay ('.' is its root)")
    if "\0" in p:
        raise ValueError(f"path {p!r} contains a NUL byte")
    parts: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError(f"path {p!r} leaves the overlay's root")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def show(path: str) -> str:
    return "/" + path


class Backend:
    """What a backend implements: one method per operation, on normalized paths (``''`` is the root).

    Each raises OSError(errno, strerror, path) exactly as the kernel's system call would.
    """

    name = "?"
    keeps_cache_fresh = False  # True when the backend refreshes the shared Layers cache itself

    def __init__(self, lowers: list[str], upper: str | None, work: str | None, encoding):
        # encoding: an ondisk.Encoding (not imported: base stays free of the on-disk code)
        self.lowers, self.upper, self.work, self.encoding = lowers, upper, work, encoding

    def mount(self) -> None: raise NotImplementedError
    def unmount(self) -> None: raise NotImplementedError
    def touch(self, p: str) -> None: raise NotImplementedError
    def remove(self, p: str) -> None: raise NotImplementedError
    def mkdir(self, p: str, mode: int) -> None: raise NotImplementedError
    def rmdir(self, p: str) -> None: raise NotImplementedError
    def rename(self, src: str, dst: str) -> None: raise NotImplementedError
    def chmod(self, p: str, mode: int) -> None: raise NotImplementedError
    def chown(self, p: str, uid: int, gid: int) -> None: raise NotImplementedError
    def utime(self, p: str, times) -> None: raise NotImplementedError
    def setxattr(self, p: str, name: str, value: bytes) -> None: raise NotImplementedError
    def getxattr(self, p: str, name: str) -> bytes: raise NotImplementedError
    def symlink(self, target: str, p: str) -> None: raise NotImplementedError
    def link(self, src: str, dst: str) -> None: raise NotImplementedError
    def truncate(self, p: str, size: int) -> None: raise NotImplementedError
    def listdir(self, p: str) -> list[str]: raise NotImplementedError
    def stat(self, p: str, follow: bool) -> Stat: raise NotImplementedError
    # Open files: ``open`` does open(2) on the merged view (copy-up included) and returns a handle
    # number; the others act on that handle, whatever has happened to its name since.
    def open(self, p: str, flags: int, perm: int) -> int: raise NotImplementedError
    def pread(self, h: int, n: int, offset: int) -> bytes: raise NotImplementedError
    def pwrite(self, h: int, data: bytes, offset: int) -> int: raise NotImplementedError
    def fstat(self, h: int) -> Stat: raise NotImplementedError
    def ftruncate(self, h: int, size: int) -> None: raise NotImplementedError
    def close(self, h: int) -> None: raise NotImplementedError

    def write_all(self, p: str, flags: int, data: bytes) -> None:
        """open, write everything, close (a backend may do it as one step, e.g. to stay whole under Ctrl-C)."""
        h = self.open(p, flags, 0o666)
        try:
            view, offset = memoryview(data), 0
            while offset < len(view):
                offset += self.pwrite(h, view[offset:offset + _CHUNK].tobytes(), offset)
        finally:
            self.close(h)


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend that this machine cannot give; the message says why (capabilities())."""


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives, named as data so that the façade imports it only when an overlay mounts."""

    module: str
    cls: str
    #: A module-level function ``check(ov)`` that refuses a bad configuration with mount(2)'s errno
    #: before anything is touched (the kernel backend leaves that to the kernel).
    check: str | None = None
    #: The backend's constructor takes the overlay's shared `Layers` cache after the overlay.
    takes_layers: bool = False

    def _attr(self, name: str):
        return getattr(importlib.import_module(self.module, __package__), name)

    def validate(self, ov) -> None:
        if self.check is not None:
            self._attr(self.check)(ov)

    def create(self, ov, layers) -> "Backend":
        cls = self._attr(self.cls)
        return cls(ov, layers) if self.takes_layers else cls(ov)


#: name -> where it lives; `BACKENDS` are the names a user may ask for.
BACKEND_REGISTRY: dict[str, BackendEntry] = {
    "sim": BackendEntry(".sim", "SimBackend", check="validate_config", takes_layers=True),
    "kernel": BackendEntry(".kernel", "KernelBackend"),
}


def backend_entry(name: str) -> BackendEntry:
    return BACKEND_REGISTRY[name]


#: How a notebook shows overlaykit's objects: kind (``"overlay"``) -> ``f(obj, include, exclude)``
#: returning a mimebundle.  The drawing module (diagrams.py) fills it when imported; the package's
#: ``__init__`` puts a stand-in there that imports it on first display, so graphviz loads only then.
display_hooks: dict[str, Callable] = {}


def mimebundle(kind: str, obj, include=None, exclude=None) -> dict:
    """The notebook display of ``obj``, or its repr where nothing can draw it (no hook, no graphviz)."""
    hook = display_hooks.get(kind)
    if hook is not None:
        try:
            return hook(obj, include, exclude)
        except ImportError:
            pass
    return {"text/plain": repr(obj)}
