"""What a simulated RUN sees: the container's overlay as a user, plus /dev, /proc, /sys and RUN --mounts.

A real RUN (Docker, buildah) runs as the image's USER, with a minimal /dev (null, zero, full, random,
urandom, tty, shm), /proc and /sys mounted over the root, and the ``--mount`` targets of the instruction;
none of those mounts is part of the container's upper directory, so none reaches the layer. The simulated
shell gets the same view from :class:`RunFS`, which wraps the overlay with

* permission checks as the RUN user (read, write and search bits of owner, group and others; the sticky
  bit; root bypasses them as in the kernel) and ownership of what that user creates;
* in-memory file systems at /dev, /proc and /sys that behave like the kernel's for what shell scripts do
  (``> /dev/null`` discards, ``/dev/zero`` reads zeros, ``/proc/self/status`` names the user);
* other file systems (a persistent cache, a read-only bind of the context, a tmpfs) at mount targets.

Reads of /dev/zero and /dev/urandom give a bounded 1 MiB: the simulated shell's pipes are byte strings.
"""
from __future__ import annotations

import errno
import os
import posixpath
import time

from .base import Stat

ENDLESS = 1 << 20  # bytes a read of /dev/zero or /dev/urandom gives


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _norm(p: str) -> str:
    return posixpath.normpath("/" + str(p).lstrip("/"))


class _Node:
    def __init__(self, kind: str, mode: int, uid: int = 0, gid: int = 0, data: bytes = b"", *,
                 read=None, write=None):
        self.kind, self.mode, self.uid, self.gid, self.data = kind, mode, uid, gid, data
        self.read, self.write = read, write  # device behaviour: read() -> bytes, write(data) (may raise)
        self.children: dict[str, _Node] = {}
        self.target: str | None = None
        self.mtime_ns = time.time_ns()


class MemFS:
    """A small in-memory file system (a tmpfs, or the kernel's /dev, /proc, /sys as RUN sees them)."""

    def __init__(self, mode: int = 0o755, readonly_code: int | None = None):
        self.root = _Node("dir", mode)
        self.readonly_code = readonly_code  # errno for any change (EROFS for /sys, EACCES for /proc)

    # -- building
    def add(self, path: str, kind: str = "file", mode: int = 0o644, data: bytes = b"", **kw) -> _Node:
        parts = [x for x in path.split("/") if x]
        node = self.root
        for part in parts[:-1]:
            node = node.children.setdefault(part, _Node("dir", 0o555 if self.readonly_code else 0o755))
        new = _Node(kind, mode, data=data, **kw)
        node.children[parts[-1]] = new
        return new

    # -- lookup
    def _find(self, p: str, follow: bool = True, depth: int = 0) -> _Node:
        parts = [x for x in p.split("/") if x]
        node = self.root
        for i, part in enumerate(parts):
            if node.kind != "dir":
                raise _err(errno.ENOTDIR, p)
            if part not in node.children:
                raise _err(errno.ENOENT, p)
            node = node.children[part]
            if node.kind == "symlink" and (follow or i < len(parts) - 1):
                if depth > 8:
                    raise _err(errno.ELOOP, p)
                rest = "/".join(parts[i + 1:])
                return self._find(posixpath.join(posixpath.dirname("/" + "/".join(parts[:i + 1])), node.target,
                                                 rest), follow, depth + 1)
        return node

    def _parent(self, p: str) -> tuple[_Node, str]:
        parent = self._find(posixpath.dirname(_norm(p)))
        if parent.kind != "dir":
            raise _err(errno.ENOTDIR, p)
        return parent, posixpath.basename(_norm(p))

    def _change(self, p: str) -> None:
        if self.readonly_code:
            raise _err(self.readonly_code, p)

    # -- the Overlay methods the shell uses
    def stat(self, p, follow_symlinks: bool = True) -> Stat:
        n = self._find(_norm(p), follow_symlinks)
        size = len(n.data) if n.kind == "file" else (len(n.target) if n.kind == "symlink" else 0)
        return Stat(n.kind, n.mode, size, 2 if n.kind == "dir" else 1, n.uid, n.gid, n.mtime_ns, n.target)

    def exists(self, p) -> bool:
        try:
            self._find(_norm(p))
            return True
        except OSError:
            return False

    def read_bytes(self, p) -> bytes:
        n = self._find(_norm(p))
        if n.kind == "dir":
            raise _err(errno.EISDIR, p)
        return n.read() if n.read else n.data

    def write_bytes(self, p, data: bytes, append: bool = False) -> None:
        try:
            n = self._find(_norm(p))
        except FileNotFoundError:
            self._change(p)
            parent, name = self._parent(p)
            parent.children[name] = _Node("file", 0o644, data=bytes(data))
            return
        if n.kind == "dir":
            raise _err(errno.EISDIR, p)
        if n.write:
            n.write(bytes(data))
            return
        self._change(p)
        n.data = (n.data + bytes(data)) if append else bytes(data)
        n.mtime_ns = time.time_ns()

    def mkdir(self, p, mode: int = 0o777, *, parents: bool = False, exist_ok: bool = False) -> None:
        self._change(p)
        if parents:
            parts = [x for x in _norm(p).split("/") if x]
            for i in range(1, len(parts)):
                if not self.exists("/" + "/".join(parts[:i])):
                    self.mkdir("/" + "/".join(parts[:i]), mode)
        parent, name = self._parent(p)
        if name in parent.children:
            if parents or exist_ok:
                return
            raise _err(errno.EEXIST, p)
        parent.children[name] = _Node("dir", mode & 0o7777)

    def remove(self, p) -> None:
        self._change(p)
        parent, name = self._parent(p)
        if name not in parent.children:
            raise _err(errno.ENOENT, p)
        if parent.children[name].kind == "dir":
            raise _err(errno.EISDIR, p)
        del parent.children[name]

    unlink = remove

    def rmdir(self, p) -> None:
        self._change(p)
        parent, name = self._parent(p)
        n = parent.children.get(name)
        if n is None:
            raise _err(errno.ENOENT, p)
        if n.kind != "dir":
            raise _err(errno.ENOTDIR, p)
        if n.children:
            raise _err(errno.ENOTEMPTY, p)
        del parent.children[name]

    def rename(self, src, dst) -> None:
        self._change(src)
        sp, sn = self._parent(src)
        dp, dn = self._parent(dst)
        if sn not in sp.children:
            raise _err(errno.ENOENT, src)
        dp.children[dn] = sp.children.pop(sn)

    def chmod(self, p, mode: int) -> None:
        self._change(p)
        self._find(_norm(p)).mode = mode & 0o7777

    def chown(self, p, uid: int, gid: int) -> None:
        self._change(p)
        n = self._find(_norm(p))
        n.uid, n.gid = uid, gid

    def utime(self, p, times=None) -> None:
        self._change(p)
        self._find(_norm(p)).mtime_ns = time.time_ns() if times is None else int(times[1] * 1e9)

    def symlink(self, target: str, p) -> None:
        self._change(p)
        parent, name = self._parent(p)
        if name in parent.children:
            raise _err(errno.EEXIST, p)
        n = _Node("symlink", 0o777)
        n.target = target
        parent.children[name] = n

    def link(self, src, dst) -> None:
        self._change(dst)
        dp, dn = self._parent(dst)
        dp.children[dn] = self._find(_norm(src), False)

    def listdir(self, p=".") -> list[str]:
        n = self._find(_norm(p))
        if n.kind != "dir":
            raise _err(errno.ENOTDIR, p)
        return sorted(n.children)


def _discard(data: bytes) -> None:
    return None


def _full(data: bytes) -> None:
    raise _err(errno.ENOSPC, "/dev/full")


def _no_tty(*args) -> bytes:
    raise _err(errno.ENXIO, "/dev/tty")


def dev_fs() -> MemFS:
    """Docker's minimal /dev: a tmpfs with six character devices and shm."""
    fs = MemFS(0o755)
    fs.add("null", "char", 0o666, read=lambda: b"", write=_discard)
    fs.add("zero", "char", 0o666, read=lambda: bytes(ENDLESS), write=_discard)
    fs.add("full", "char", 0o666, read=lambda: bytes(ENDLESS), write=_full)
    fs.add("random", "char", 0o666, read=lambda: os.urandom(ENDLESS), write=_discard)
    fs.add("urandom", "char", 0o666, read=lambda: os.urandom(ENDLESS), write=_discard)
    fs.add("tty", "char", 0o666, read=_no_tty, write=_no_tty)
    fs.add("shm", "dir", 0o1777)
    fs.add("fd", "symlink").target = "/proc/self/fd"
    fs.add("stdin", "symlink").target = "/proc/self/fd/0"
    fs.add("stdout", "symlink").target = "/proc/self/fd/1"
    fs.add("stderr", "symlink").target = "/proc/self/fd/2"
    return fs


def proc_fs(uid: int, gid: int, cwd: str = "/") -> MemFS:
    """A minimal /proc: who the process is, the machine's CPUs and memory, the mounts RUN has."""
    fs = MemFS(0o555, readonly_code=errno.EACCES)
    status = (f"Name:\tsh\nUmask:\t0022\nState:\tR (running)\nPid:\t1\nPPid:\t0\n"
              f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\n").encode()
    mounts = (b"overlay / overlay rw 0 0\nproc /proc proc rw,nosuid,nodev,noexec 0 0\n"
              b"tmpfs /dev tmpfs rw,nosuid 0 0\nshm /dev/shm tmpfs rw,nosuid,nodev,noexec 0 0\n"
              b"sysfs /sys sysfs ro,nosuid,nodev,noexec 0 0\n")
    ncpu = os.cpu_count() or 1
    fs.add("self/status", data=status, mode=0o444)
    fs.add("self/cmdline", data=b"/bin/sh\0", mode=0o444)
    fs.add("self/mounts", data=mounts, mode=0o444)
    fs.add("self/fd", "dir", 0o500)
    fs.add("self/cwd", "symlink").target = cwd
    fs.add("mounts", "symlink").target = "self/mounts"
    fs.add("cpuinfo", mode=0o444, data="".join(f"processor\t: {i}\n\n" for i in range(ncpu)).encode())
    try:
        with open("/proc/meminfo", "rb") as f:
            meminfo = f.read()
    except OSError:
        meminfo = b"MemTotal:        2097152 kB\n"
    fs.add("meminfo", mode=0o444, data=meminfo)
    fs.add("version", mode=0o444, data=f"Linux version {os.uname().release}\n".encode())
    fs.add("sys/kernel/hostname", mode=0o444, data=b"buildkitsandbox\n")
    return fs


def sys_fs() -> MemFS:
    """A read-only /sys with the usual top directories (sysfs is mounted read-only in a container)."""
    fs = MemFS(0o555, readonly_code=errno.EROFS)
    for d in ("block", "bus", "class", "dev", "devices", "firmware", "fs/cgroup", "kernel", "module"):
        fs.add(d, "dir", 0o755)
    return fs


class ReadOnly:
    """A file system whose every change fails with EROFS (RUN --mount=type=bind without rw)."""

    def __init__(self, fs):
        self.fs = fs

    def __getattr__(self, name):
        attr = getattr(self.fs, name)
        if name in ("write_bytes", "mkdir", "remove", "unlink", "rmdir", "rename", "chmod", "chown", "utime",
                    "symlink", "link", "truncate", "touch", "setxattr"):
            def refuse(p, *args, **kw):
                raise _err(errno.EROFS, p if isinstance(p, str) else str(p))
            return refuse
        return attr


class RunFS:
    """The overlay as the RUN user sees it, with /dev, /proc, /sys and the --mount targets on top."""

    def __init__(self, fs, *, uid: int = 0, gid: int = 0, groups=(), mounts: dict | None = None,
                 lchown=None, cwd: str = "/", special: bool = True):
        self.fs, self.uid, self.gid = fs, uid, gid
        self.groups = set(groups) | {gid}
        self.lchown = lchown  # callback(path, uid, gid) for symlinks (the overlay's chown follows links)
        self.mounts: dict[str, object] = {}
        if special:
            self.mounts.update({"/dev": dev_fs(), "/proc": proc_fs(uid, gid, cwd), "/sys": sys_fs()})
        self.mounts.update({_norm(k): v for k, v in (mounts or {}).items()})
        self._ids = os.geteuid(), os.getegid()  # an unprivileged builder's files count as root's (as in layers)
        # what this RUN's user made but an unprivileged builder could not give it: the user's until the
        # RUN ends (the layer records the builder's own files as root's)
        self._given: set[str] = set()

    # -- routing
    def _route(self, p) -> tuple[object, str, bool]:
        """(file system, path in it, whether it is a mount) for an absolute path."""
        p = _norm(p)
        best = None
        for target in self.mounts:
            if p == target or p.startswith(target + "/"):
                if best is None or len(target) > len(best):
                    best = target
        if best is None:
            return self.fs, p, False
        return self.mounts[best], "/" + p[len(best):].lstrip("/"), True

    def _mount_names(self, directory: str) -> list[str]:
        d = _norm(directory)
        return [posixpath.basename(t) for t in self.mounts if posixpath.dirname(t) == d and t != "/"]

    # -- permissions (for a user other than root)
    def _owner(self, s: Stat, p: str | None = None) -> tuple[int, int]:
        if p is not None and _norm(p) in self._given:
            return self.uid, self.gid
        uid = 0 if (self._ids[0] != 0 and s.uid == self._ids[0]) else s.uid
        gid = 0 if (self._ids[0] != 0 and s.gid == self._ids[1]) else s.gid
        return uid, gid

    def _allowed(self, s: Stat, bits: int, p: str | None = None) -> bool:
        if self.uid == 0:
            return True
        uid, gid = self._owner(s, p)
        shift = 6 if uid == self.uid else 3 if gid in self.groups else 0
        return (s.mode >> shift) & bits == bits

    def _check(self, p: str, bits: int, follow: bool = True) -> Stat:
        fs, inner, _ = self._route(p)
        s = fs.stat(inner, follow_symlinks=follow)
        if not self._allowed(s, bits, p):
            raise _err(errno.EACCES, p)
        return s

    def _search(self, p: str) -> None:
        """Search (x) permission on every directory above `p`."""
        if self.uid == 0:
            return
        parts = [x for x in _norm(p).split("/") if x]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[:i])
            try:
                self._check(d, 1)
            except FileNotFoundError:
                return

    def _may_create(self, p: str) -> None:
        self._search(p)
        self._check(posixpath.dirname(_norm(p)), 3)

    def _may_delete(self, p: str) -> None:
        self._may_create(p)
        if self.uid == 0:
            return
        parent = self.stat(posixpath.dirname(_norm(p)))
        if parent.mode & 0o1000:
            s = self.stat(p, follow_symlinks=False)
            if self.uid not in (self._owner(s, p)[0], self._owner(parent, posixpath.dirname(_norm(p)))[0]):
                raise _err(errno.EPERM, p)

    def _own(self, p: str, symlink: bool = False) -> None:
        """What the RUN user creates is the RUN user's."""
        if (self.uid, self.gid) == (0, 0):
            return
        fs, inner, _ = self._route(p)
        if symlink:
            if self.lchown and fs is self.fs and self._ids[0] == 0:
                self.lchown(_norm(p), self.uid, self.gid)
            elif fs is self.fs:
                self._given.add(_norm(p))
            return
        try:
            fs.chown(inner, self.uid, self.gid)
        except PermissionError:  # an unprivileged builder cannot give files away
            self._given.add(_norm(p))

    # -- the Overlay methods the shell uses
    def stat(self, p, follow_symlinks: bool = True) -> Stat:
        self._search(p)
        fs, inner, mounted = self._route(p)
        if mounted and inner == "/" and not follow_symlinks:
            follow_symlinks = True
        return fs.stat(inner, follow_symlinks=follow_symlinks)

    def lstat(self, p) -> Stat:
        return self.stat(p, follow_symlinks=False)

    def exists(self, p) -> bool:
        try:
            self.stat(p)
            return True
        except OSError:
            return False

    def read_bytes(self, p) -> bytes:
        self._search(p)
        self._check(p, 4)
        fs, inner, _ = self._route(p)
        return fs.read_bytes(inner)

    def read_text(self, p, encoding: str = "utf-8") -> str:
        return self.read_bytes(p).decode(encoding)

    def write_bytes(self, p, data: bytes, append: bool = False) -> None:
        fs, inner, _ = self._route(p)
        if self.uid == 0 and self.gid == 0:  # root: no check, and what it creates is already root's
            fs.write_bytes(inner, data, append=append)
            return
        try:
            fs.stat(inner)
            existed = True
        except FileNotFoundError:
            existed = False
        if existed:
            self._search(p)
            self._check(p, 2)
        else:
            self._may_create(p)
        fs.write_bytes(inner, data, append=append)
        if not existed:
            self._own(p)

    def mkdir(self, p, mode: int = 0o777, *, parents: bool = False, exist_ok: bool = False) -> None:
        if parents:
            parts = [x for x in _norm(p).split("/") if x]
            for i in range(1, len(parts) + 1):
                q = "/" + "/".join(parts[:i])
                if not self.exists(q):
                    self.mkdir(q, mode)
            return
        self._may_create(p)
        fs, inner, _ = self._route(p)
        fs.mkdir(inner, mode=mode)
        self._own(p)

    def remove(self, p) -> None:
        self._may_delete(p)
        fs, inner, mounted = self._route(p)
        if mounted and inner == "/":
            raise _err(errno.EBUSY, p)
        fs.remove(inner)

    unlink = remove

    def rmdir(self, p) -> None:
        self._may_delete(p)
        fs, inner, mounted = self._route(p)
        if mounted and inner == "/":
            raise _err(errno.EBUSY, p)
        fs.rmdir(inner)

    def rename(self, src, dst) -> None:
        self._may_delete(src)
        self._may_create(dst)
        sfs, s, _ = self._route(src)
        dfs, d, _ = self._route(dst)
        if sfs is not dfs:
            raise _err(errno.EXDEV, src)
        sfs.rename(s, d)

    def chmod(self, p, mode: int) -> None:
        s = self.stat(p)
        if self.uid != 0 and self._owner(s, p)[0] != self.uid:
            raise _err(errno.EPERM, p)
        fs, inner, _ = self._route(p)
        fs.chmod(inner, mode)

    def chown(self, p, uid: int, gid: int) -> None:
        s = self.stat(p)
        if self.uid != 0 and (uid not in (-1, self._owner(s, p)[0]) or self._owner(s, p)[0] != self.uid
                              or gid not in (-1, *self.groups)):
            raise _err(errno.EPERM, p)
        fs, inner, _ = self._route(p)
        fs.chown(inner, uid, gid)

    def utime(self, p, times=None) -> None:
        s = self.stat(p)
        if self.uid != 0 and self._owner(s, p)[0] != self.uid and (times is not None or not self._allowed(s, 2, p)):
            raise _err(errno.EPERM if times is not None else errno.EACCES, p)
        fs, inner, _ = self._route(p)
        fs.utime(inner, times)

    def symlink(self, target: str, p) -> None:
        self._may_create(p)
        fs, inner, _ = self._route(p)
        fs.symlink(target, inner)
        self._own(p, symlink=True)

    def link(self, src, dst) -> None:
        self._may_create(dst)
        sfs, s, _ = self._route(src)
        dfs, d, _ = self._route(dst)
        if sfs is not dfs:
            raise _err(errno.EXDEV, src)
        sfs.link(s, d)

    def listdir(self, p=".") -> list[str]:
        self._search(p)
        self._check(p, 4)
        fs, inner, _ = self._route(p)
        names = set(fs.listdir(inner))
        return sorted(names | set(self._mount_names(p)))
