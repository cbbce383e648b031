"""The one API over both backends: `Overlay`, with `Stat`, `Change` and `TraceEvent`.

Paths are relative to the merged root (``x``, ``/x`` and ``./x`` are the same; ``.`` is the root) and are
normalized lexically, so ``..`` can never climb out of the merged view.  Every failing operation raises
`OSError` with the kernel's errno and the caller's path.

The trace and the upper/ classification are *observed* from the layer directories on disk, before and
after each operation, by the same code for both backends: what the lesson shows is what happened on disk,
and the two backends can be compared on it.
"""
from __future__ import annotations

import errno
import operator
import os
import posixpath
import stat as st
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

from . import arguments, index, ondisk
from .ondisk import Layers, Leaf, MergedDir, errno_error, kind_of
# the shared vocabulary lives in base.py; re-exported here for code that imports it from engine
from .base import (_CHUNK, _KIND_BITS, BACKENDS, DOCKER_MAX_LOWERS, MAX_LOWERS,  # noqa: F401,I001
                   RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, Backend, BackendUnavailable, Stat,
                   backend_entry, mimebundle, normpath, show)
from .options import Options, same_filesystem


@dataclass(frozen=True)
class Change:
    """One entry of upper/, classified: new, copied-up, metadata-only, whiteout or opaque."""

    path: str
    kind: str
    type: str
    hides: str | None = None  # the lower layer whose entry at this path the upper one hides

    def __str__(self) -> str:
        text = f"{self.kind:<13} {self.path}{'/' if self.type == 'dir' else ''}"
        return text + (f"  (hides {self.hides}'s {self.path})" if self.hides and self.kind != "whiteout" else "")


@dataclass(frozen=True)
class TraceEvent:
    """One step the filesystem took while an operation ran."""

    op: str
    kind: str
    path: str
    detail: str = ""
    layers: tuple = ()
    nbytes: int = 0

    def __str__(self) -> str:
        return f"{self.op:<10} {self.kind:<9} {self.path or '.'}: {self.detail}"


#: How many recent events `Overlay.trace` keeps: a long-lived notebook kernel must not grow without bound.
TRACE_LIMIT = 2000


class Trace:
    """`TraceEvent`s, one line each in ``str()``; a ring of the last ``limit`` (None: unbounded).

    Positions are absolute, as in a list that was never cut: ``len()`` counts every event recorded, and
    ``n = len(ov.trace)`` before an operation then ``ov.trace[n:]`` after it gives that operation's events
    however long the session.  Events older than the ring's reach are counted in ``dropped``: a slice
    leaves them out, an index raises IndexError, iteration yields the ``kept`` ones.
    """

    def __init__(self, events=(), *, limit: int | None = None):
        self._events: deque[TraceEvent] = deque(maxlen=limit)
        self.dropped = 0
        self.extend(events)

    @property
    def limit(self) -> int | None:
        return self._events.maxlen

    @property
    def kept(self) -> int:
        return len(self._events)

    def append(self, event: TraceEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)

    def extend(self, events) -> None:
        for e in events:
            self.append(e)

    def clear(self) -> None:
        self._events.clear()
        self.dropped = 0

    def __len__(self) -> int:
        return self.dropped + len(self._events)

    def __bool__(self) -> bool:
        return bool(self._events)

    def __iter__(self):
        return iter(list(self._events))  # a copy: operations may record while a caller iterates

    def __getitem__(self, key):
        if isinstance(key, slice):
            r = range(len(self))[key]
            if r.step == 1:
                lo, hi = max(r.start, self.dropped) - self.dropped, max(r.stop, self.dropped) - self.dropped
                return Trace(islice(self._events, lo, max(lo, hi)))
            return Trace(self._events[i - self.dropped] for i in r if i >= self.dropped)
        i = operator.index(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("trace index out of range")
        if i < self.dropped:
            raise IndexError(f"trace event {i} was dropped: the trace keeps the last {self.limit} events")
        return self._events[i - self.dropped]

    def __eq__(self, other) -> bool:
        if isinstance(other, (Trace, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __str__(self) -> str:
        lines = [str(e) for e in self._events]
        if self.dropped:
            lines.insert(0, f"({self.dropped} earlier events dropped: the trace keeps the last {self.limit}; "
                            f"use ov.last_events() or `with ov.recording() as steps:`)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Trace({list(self._events)!r}" + (f", dropped={self.dropped})" if self.dropped else ")")

    def _repr_pretty_(self, p, cycle):
        p.text(str(self) if self or self.dropped else "(no steps recorded)")


#: Why an operation copies a lower entry up, in the kernel documentation's words.
COPY_UP_REASON = {
    "write": "opened for write", "append": "opened for append", "open": "opened for write", "truncate": "truncate",
    "chmod": "chmod (metadata change)", "chown": "chown (metadata change)", "utime": "utimes (metadata change)",
    "touch": "utimes (metadata change)", "setxattr": "setxattr (metadata change)",
    "removexattr": "removexattr (metadata change)", "create": "opened for write", "link": "link(2) needs the inode in upper",
    "rename": "rename of a lower entry", "mkdir": "parent of a new entry", "symlink": "parent of a new entry",
    "remove": "parent of a whiteout", "rmdir": "parent of a whiteout",
}


def _choose_backend(backend: str) -> str:
    """An explicit ``"sim"`` or ``"kernel"`` is honoured; ``OVERLAYKIT_BACKEND`` decides what ``"auto"``
    means (so a whole process can be pinned to sim without overriding a cell that asks for the kernel)."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r}: choose 'sim', 'kernel' or 'auto'")
    if backend == "auto":
        env = os.environ.get("OVERLAYKIT_BACKEND") or "auto"
        if env not in BACKENDS + ("auto",):
            raise ValueError(f"OVERLAYKIT_BACKEND={env!r}: choose sim, kernel or auto")
        backend = env
        if backend == "auto":
            from .capabilities import capabilities
            return "kernel" if capabilities()["kernel"].available else "sim"
        how = f"OVERLAYKIT_BACKEND={env} (what backend='auto' means in this process)"
    else:
        how = f"backend={backend!r}"
    if backend == "kernel":
        from .capabilities import capabilities
        info = capabilities()["kernel"]
        if not info.available:
            raise BackendUnavailable(f"{how} asks for the kernel backend, which this machine cannot give: "
                                     f"{info.reason}")
    return backend


class Overlay:
    """An overlay of ``lowers`` (top first, as in ``lowerdir=a:b:c``) under an optional ``upper``.

    ``upper=None`` gives a read-only overlay (the kernel then needs at least two lowers).  The layer
    directories live on disk, so you can look at upper/ with ``ls`` or the file browser at any time.
    ``backend`` is ``"sim"`` (pure Python, no privileges), ``"kernel"`` (a real mount) or ``"auto"``
    (the default: the kernel where this machine allows it).  The environment variable
    ``OVERLAYKIT_BACKEND`` says what ``"auto"`` means for the whole process; an explicit choice is
    honoured, or fails with `BackendUnavailable` saying why this machine cannot give it.
    """

    def __init__(self, lowers, upper=None, work=None, *, backend: str = "auto", merged=None,
                 encoding: str | ondisk.Encoding = "auto", trace: bool = True, options=None):
        if isinstance(lowers, (str, os.PathLike)):
            lowers = [lowers]
        self.lowers = tuple(Path(os.path.abspath(x)) for x in lowers)
        self.upper = Path(os.path.abspath(upper)) if upper is not None else None
        self.work = Path(os.path.abspath(work)) if work is not None else None
        self.merged = Path(os.path.abspath(merged)) if merged is not None else None
        self.backend = _choose_backend(backend)
        #: The options asked for (see `overlaykit.options`); `options` is what the mount does with them.
        self.requested_options = Options.parse(options)
        self.options: Options = self.requested_options
        self._encoding_request = encoding
        self.encoding: ondisk.Encoding | None = None
        self.tracing = trace
        self.trace = Trace(limit=TRACE_LIMIT)  # the recent events; see last_events() and recording()
        self._last: list[TraceEvent] = []
        self._recorders: list[Trace] = []
        self._impl: Backend | None = None
        self._handles: dict[int, str] = {}  # open handle -> the path it was opened by
        self._truncating = False  # the running open truncates: its copy-up copies no data
        self._layers: Layers | None = None
        self._lower_layers: Layers | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def mounted(self) -> bool:
        """True while mounted; False after unmount, or once the kernel backend's helper has ended."""
        return self._impl is not None and getattr(self._impl, "alive", True)

    def mount(self) -> "Overlay":
        if self._impl is not None:
            return self
        entry = backend_entry(self.backend)
        entry.validate(self)  # the sim: the kernel's errno for a bad configuration, before touching anything
        self.encoding = self._pick_encoding()
        self.options = self.requested_options.resolve(
            userxattr=self.encoding.xattr_ns == "user", has_upper=self.upper is not None,
            same_fs=same_filesystem([x for x in (self.upper, self.work, *self.lowers) if x is not None]))
        roots = ([str(self.upper)] if self.upper else []) + [str(x) for x in self.lowers]
        self._layers = Layers(roots, self.encoding, self.upper is not None)
        self._lower_layers = Layers([str(x) for x in self.lowers], self.encoding, False)
        # ovl_lookup follows overlay.redirect unless the mount says nofollow (userxattr forces it)
        self._layers.redirect_follow = self._lower_layers.redirect_follow = self.options.follows_redirects
        impl: Backend = entry.create(self, self._layers)
        from .inuse import claim
        self._inuse = claim(self)  # EBUSY while another live overlay holds this upper/ or work/
        try:
            impl.mount()
        except BaseException:
            self._inuse.release()
            raise
        self._impl = impl
        return self

    def unmount(self) -> None:
        impl, self._impl = self._impl, None
        handles, self._handles = self._handles, {}
        if impl is not None:
            for h in handles:  # open files end with the mount (the kernel helper's close with its process)
                try:
                    impl.close(h)
                except Exception:
                    pass
            try:
                impl.unmount()
            finally:
                self._inuse.release()

    def how_to_look(self) -> str:
        """How to see merged/ from a terminal (a kernel mount lives in a helper's private namespace)."""
        impl = self._need()
        if hasattr(impl, "how_to_look"):
            return impl.how_to_look()
        return ("The simulated overlay has no mount: look at the layer folders (ls -la upper/) "
                "or print ov.tree() for the merged view.")

    def __enter__(self) -> "Overlay":
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.unmount()

    def __del__(self):
        try:
            self.unmount()
        except Exception:
            pass

    def _pick_encoding(self) -> ondisk.Encoding:
        req = self._encoding_request
        if isinstance(req, ondisk.Encoding):
            return req
        ns = ondisk.default_xattr_ns()
        if req == "kernel" or self.backend == "kernel":
            return ondisk.Encoding("kernel", ns)
        if req == "fallback":
            return ondisk.Encoding("fallback", ns)
        if req != "auto":
            raise ValueError(f"encoding={req!r}: choose 'auto', 'kernel' or 'fallback'")
        if self.work is None:
            return ondisk.Encoding("kernel", ns)
        return ondisk.probe(self.work, ns)

    def _need(self) -> Backend:
        if self._impl is None:
            raise RuntimeError("the overlay is not mounted: use `with Overlay(...) as ov:` or call ov.mount()")
        return self._impl

    def __repr__(self) -> str:
        lowers = ":".join(x.name for x in self.lowers)
        up = self.upper.name if self.upper else None
        return f"Overlay(lowers=[{lowers}], upper={up}, backend={self.backend!r}, mounted={self.mounted})"

    # -- open files --------------------------------------------------------------------------------
    def open(self, path, mode: str = "r", *, flags: int | None = None, perm: int = 0o666, buffering: int = -1,
             encoding: str | None = None, errors: str | None = None, newline: str | None = None):
        """Open a file of the merged view, like the built-in ``open()``: a binary or text file object.

        Copy-up happens here, before anything is written, when the open asks for write access (``w``,
        ``a``, ``x``, ``+``, or ``flags`` with O_WRONLY/O_RDWR/O_TRUNC), exactly as open(2) on the
        kernel's overlay decides it; a truncating open copies metadata only.  ``flags`` (os.O_*) replaces
        what ``mode`` says about access and creation; ``mode`` still says binary or text.  ``perm`` is
        the new file's mode (before the umask).  The file keeps working after its name is renamed or
        removed, as an open file does on the kernel.
        """
        from .openfile import OverlayRawFile, parse_mode, wrap
        mflags, binary = parse_mode(mode)
        if flags is None:
            flags = mflags
        if binary and encoding is not None:
            raise ValueError("binary mode doesn't take an encoding argument")
        h = self.os_open(path, flags, perm)
        try:
            raw = OverlayRawFile(self, h, os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path),
                                 flags)
            return wrap(raw, binary, buffering, encoding, errors, newline)
        except BaseException:
            self.close(h)
            raise

    def os_open(self, path, flags: int, perm: int = 0o666) -> int:
        """open(2) on the merged view: a handle for `pread`, `pwrite`, `fstat`, `ftruncate`, `close`."""
        p = normpath(path)
        flags, perm = arguments.open_flags(flags), arguments.mode(perm)
        writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        op = ("append" if flags & os.O_APPEND else "write") if writes else ("create" if flags & os.O_CREAT else "open")
        self._truncating = bool(flags & os.O_TRUNC)
        try:
            h = self._run(op, [p], lambda b: b.open(p, flags, perm))
        finally:
            self._truncating = False
        self._handles[h] = p
        return h

    def pread(self, handle: int, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` of an open handle (b"" at the end)."""
        self._handle(handle)
        if n < 0 or offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self._handles[handle])
        with self._named(handle):
            return self._need().pread(handle, n, offset)

    def pwrite(self, handle: int, data, offset: int) -> int:
        """Write ``data`` at ``offset`` (at the end for a handle opened with O_APPEND): bytes written."""
        self._handle(handle)
        data = arguments.data(data)
        if offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self._handles[handle])
        with self._named(handle):
            return self._need().pwrite(handle, data, offset)

    def fstat(self, handle: int) -> Stat:
        self._handle(handle)
        with self._named(handle):
            return self._need().fstat(handle)

    def ftruncate(self, handle: int, size: int) -> None:
        self._handle(handle)
        size = arguments.size(self._handles[handle], size)
        with self._named(handle):
            self._need().ftruncate(handle, size)

    def close(self, handle: int) -> None:
        """Close a handle (closing one twice is EBADF, as close(2))."""
        self._handle(handle)
        p = self._handles.pop(handle)
        try:
            self._need().close(handle)
        finally:
            self._invalidate(self._need())
            if self._layers is not None and self._need().keeps_cache_fresh:
                self._layers.refresh_upper(p)

    @contextmanager
    def _named(self, handle: int):
        """Errors of a handle call name the path the handle was opened by."""
        try:
            yield
        except OSError as e:
            if e.filename == self._handles.get(handle) or not e.errno or isinstance(e, ConnectionError):
                raise
            raise errno_error(e.errno, self._handles[handle]) from None

    def _handle(self, handle: int) -> None:
        if handle not in self._handles:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    # -- operations --------------------------------------------------------------------------------
    def read_bytes(self, path) -> bytes:
        p = normpath(path)
        return self._run("read", [p], lambda b: self._read_all(b, p))

    def _read_all(self, b: Backend, p: str) -> bytes:
        h = b.open(p, os.O_RDONLY, 0)
        try:
            chunks, offset = [], 0
            while chunk := b.pread(h, _CHUNK, offset):
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            b.close(h)

    def read_text(self, path, encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding)

    def write_bytes(self, path, data: bytes, *, append: bool = False) -> None:
        p = normpath(path)
        data = arguments.data(data)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._truncating = not append
        try:
            self._run("append" if append else "write", [p], lambda b: b.write_all(p, flags, data))
        finally:
            self._truncating = False

    def write_text(self, path, text: str, *, append: bool = False, encoding: str = "utf-8") -> None:
        self.write_bytes(path, text.encode(encoding), append=append)

    def touch(self, path) -> None:
        p = normpath(path)
        self._run("touch", [p], lambda b: b.touch(p))

    def remove(self, path) -> None:
        p = normpath(path)
        self._run("remove", [p], lambda b: b.remove(p))

    unlink = remove

    def mkdir(self, path, mode: int = 0o777, *, parents: bool = False, exist_ok: bool = False) -> None:
        p = normpath(path)
        mode = arguments.mode(mode)
        if parents:
            parts = p.split("/") if p else []
            for i in range(1, len(parts)):
                sub = "/".join(parts[:i])
                try:
                    self._run("mkdir", [sub], lambda b, s=sub: b.mkdir(s, mode))
                except FileExistsError:
                    pass
        try:
            self._run("mkdir", [p], lambda b: b.mkdir(p, mode))
        except FileExistsError:
            if not (exist_ok or parents) or not self.stat(p).kind == "dir":
                raise

    def rmdir(self, path) -> None:
        p = normpath(path)
        self._run("rmdir", [p], lambda b: b.rmdir(p))

    def rename(self, src, dst, *, flags: int = 0) -> None:
        """rename(2); ``flags`` as renameat2: RENAME_NOREPLACE (EEXIST if ``dst`` exists) and
        RENAME_EXCHANGE (swap two existing names).  The kernel's overlay refuses RENAME_WHITEOUT (EINVAL)."""
        s, d = normpath(src), normpath(dst)
        flags = arguments.open_flags(flags)
        if flags:
            self._run("rename", [s, d], lambda b: b.rename2(s, d, flags))
        else:
            self._run("rename", [s, d], lambda b: b.rename(s, d))

    def chmod(self, path, mode: int) -> None:
        p = normpath(path)
        mode = arguments.mode(mode)
        self._run("chmod", [p], lambda b: b.chmod(p, mode))

    def chown(self, path, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        p = normpath(path)
        uid, gid = arguments.owner(uid, gid)
        if follow_symlinks:
            self._run("chown", [p], lambda b: b.chown(p, uid, gid))
        else:
            self._run("chown", [p], lambda b: b.chown(p, uid, gid, False))

    def lchown(self, path, uid: int, gid: int) -> None:
        self.chown(path, uid, gid, follow_symlinks=False)

    def utime(self, path, times=None, *, ns=None, follow_symlinks: bool = True) -> None:
        """Like os.utime: ``times`` (seconds) or ``ns`` (nanoseconds) as (atime, mtime), or now.  In ``ns``
        either time may be ``"now"`` or ``"omit"`` (utimensat's UTIME_NOW / UTIME_OMIT)."""
        p = normpath(path)
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        if ns is not None:
            arguments.ns_times(tuple(0 if v in ("now", "omit") else v for v in ns))
            self._run("utime", [p], lambda b: b.utime(p, None, tuple(ns), follow_symlinks))
            return
        times = arguments.times(times)
        if follow_symlinks:
            self._run("utime", [p], lambda b: b.utime(p, times))
        else:
            self._run("utime", [p], lambda b: b.utime(p, times, None, False))

    def setxattr(self, path, name: str, value, flags: int = 0, *, follow_symlinks: bool = True) -> None:
        """Like os.setxattr; ``flags`` os.XATTR_CREATE (EEXIST if set) or os.XATTR_REPLACE (ENODATA if not)."""
        p = normpath(path)
        name, value = arguments.xattr_name(name), arguments.xattr_value(value)
        flags = arguments.open_flags(flags)
        if flags or not follow_symlinks:
            self._run("setxattr", [p], lambda b: b.setxattr(p, name, value, flags, follow_symlinks))
        else:
            self._run("setxattr", [p], lambda b: b.setxattr(p, name, value))

    def getxattr(self, path, name: str, *, follow_symlinks: bool = True) -> bytes:
        p = normpath(path)
        name = arguments.xattr_name(name)
        if follow_symlinks:
            return self._run("getxattr", [p], lambda b: b.getxattr(p, name))
        return self._run("getxattr", [p], lambda b: b.getxattr(p, name, False))

    def listxattr(self, path=".", *, follow_symlinks: bool = True) -> list[str]:
        """The xattr names of an entry, sorted (overlayfs's own markers are not listed)."""
        p = normpath(path)
        return sorted(self._run("listxattr", [p], lambda b: b.listxattr(p, follow_symlinks)))

    def removexattr(self, path, name: str, *, follow_symlinks: bool = True) -> None:
        p = normpath(path)
        name = arguments.xattr_name(name)
        self._run("removexattr", [p], lambda b: b.removexattr(p, name, follow_symlinks))

    def statfs(self, path=".") -> os.statvfs_result:
        """statvfs(2) of the overlay (the upper layer's filesystem figures, as the kernel reports them)."""
        p = normpath(path)
        return self._run("statfs", [p], lambda b: b.statfs(p))

    def mknod(self, path, mode: int = 0o600 | st.S_IFREG, device: int = 0) -> None:
        """Like os.mknod: a fifo (stat.S_IFIFO), socket, regular file, or a device where allowed (root)."""
        p = normpath(path)
        mode = arguments.mode(mode)
        if not isinstance(device, int):
            raise TypeError(f"'{type(device).__name__}' object cannot be interpreted as an integer")
        self._run("mknod", [p], lambda b: b.mknod(p, mode, device))

    def symlink(self, target: str, link_path) -> None:
        p = normpath(link_path)
        target = arguments.link_target(target)
        self._run("symlink", [p], lambda b: b.symlink(target, p))

    def link(self, existing, new) -> None:
        s, d = normpath(existing), normpath(new)
        self._run("link", [s, d], lambda b: b.link(s, d))

    def truncate(self, path, size: int) -> None:
        p = normpath(path)
        size = arguments.size(p, size)
        self._run("truncate", [p], lambda b: b.truncate(p, size))

    def listdir(self, path=".") -> list[str]:
        p = normpath(path)
        return sorted(self._run("listdir", [p], lambda b: b.listdir(p)))

    def stat(self, path, *, follow_symlinks: bool = True) -> Stat:
        p = normpath(path)
        return self._run("stat", [p], lambda b: b.stat(p, follow_symlinks))

    def lstat(self, path) -> Stat:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path) -> bool:
        try:
            self.stat(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENAMETOOLONG):
                return False
            raise

    def is_dir(self, path) -> bool:
        return self.exists(path) and self.stat(path).kind == "dir"

    def walk(self, path=".") -> Iterator[tuple[str, list[str], list[str]]]:
        """Top-down like os.walk, sorted, not following symlinks; paths are shown relative ('.' = root)."""
        top = normpath(path)
        with self._quiet():
            stack = [top]
            while stack:
                d = stack.pop()
                dirs, files = [], []
                for name in self._need().listdir(d):
                    child = f"{d}/{name}" if d else name
                    (dirs if self._kind(child) == "dir" else files).append(name)
                dirs.sort()
                files.sort()
                yield (d or "."), dirs, files
                stack.extend(f"{d}/{x}" if d else x for x in reversed(dirs))

    def _kind(self, p: str) -> str:
        """Like os.walk's d_type test: a listed name that cannot be looked up counts as a non-directory."""
        try:
            return self._need().stat(p, False).kind
        except FileNotFoundError:
            return "whiteout"

    def tree(self, path=".", *, limit: int = 200) -> str:
        """A text tree of the merged view, entries marked with the layer that serves them."""
        top = normpath(path)
        lines = [(top or ".") + "/"]
        count = 0
        with self._quiet():
            def visit(d: str, prefix: str) -> None:
                nonlocal count
                names = self._need().listdir(d)
                for i, name in enumerate(sorted(names)):
                    count += 1
                    if count > limit:
                        if count == limit + 1:
                            lines.append(prefix + "… (more entries not shown)")
                        return
                    child = f"{d}/{name}" if d else name
                    last = i == len(names) - 1
                    try:
                        s = self._need().stat(child, False)
                    except FileNotFoundError:
                        lines.append(f"{prefix}{'└── ' if last else '├── '}{name}  [whiteout, listed by a non-merged dir]")
                        continue
                    label = name + ("/" if s.kind == "dir" else "")
                    if s.kind == "symlink":
                        label += f" -> {s.target}"
                    lines.append(f"{prefix}{'└── ' if last else '├── '}{label}  [{self._layer_of(child)}]")
                    if s.kind == "dir":
                        visit(child, prefix + ("    " if last else "│   "))
            visit(top, "")
        return "\n".join(lines)

    # -- introspection -----------------------------------------------------------------------------
    def layer_of(self, path) -> str | None:
        """Which layer serves ``path`` (no symlinks followed): ``'upper'``, ``'lower[i]'`` or None."""
        return self._layer_of(normpath(path))

    def _layer_of(self, p: str) -> str | None:
        node = self._layers_now().lookup(p)
        if node is None:
            return None
        return self._layers.name(node.layer if isinstance(node, Leaf) else node.layers[0])

    def lookup_steps(self, path) -> list[tuple[str, str, str]]:
        """The lookup of ``path`` as (component path, layer, what that layer had), top first."""
        return self._lookup_steps(normpath(path))

    def _lookup_steps(self, p: str) -> list[tuple[str, str, str]]:
        layers = self._layers_now()
        steps: list[tuple[str, str, str]] = []
        node: Leaf | MergedDir | None = layers.root()
        for name in p.split("/") if p else []:
            if not isinstance(node, MergedDir):
                break
            visited: list = []
            node = layers.child(node, name, visited)
            sub = node.path if node is not None else ((steps[-1][0] + "/" if steps else "") + name)
            steps.extend((sub, layers.name(i), what) for i, what in visited)
        return steps

    def upper_changes(self) -> list[Change]:
        """Every entry in upper/, classified the way the lesson talks about them."""
        if self.upper is None:
            return []
        layers = self._layers_now()
        lowers = self._lower_layers
        out: list[Change] = []

        def visit(d: str) -> None:
            try:
                ents = layers.entries(0, d) or {}
            except PermissionError:  # a directory this user may not read: its entries stay unlisted
                return
            for name in sorted(ents):
                p = f"{d}/{name}" if d else name
                e = ents[name]
                try:
                    low = lowers.lookup(p) if lowers.roots else None
                except PermissionError:
                    low = None
                hides = None if low is None else lowers.name(low.layer if isinstance(low, Leaf) else low.layers[0])
                if e is ondisk.WHITEOUT:
                    out.append(Change(p, "whiteout", "whiteout", hides))
                    continue
                kind = kind_of(e.st_mode)
                if kind == "dir" and layers.is_opaque(0, p):
                    out.append(Change(p, "opaque", kind, hides))
                else:
                    try:
                        kind_of_change = self._classify(p, e, lowers)
                    except PermissionError:  # inside a directory this user may not search
                        kind_of_change = "copied-up"
                    out.append(Change(p, kind_of_change, kind, hides))
                if kind == "dir":
                    visit(p)
        visit("")
        return out

    def _classify(self, p: str, up: os.stat_result, lowers: Layers) -> str:
        """Copied-up entries carry the kernel's origin xattr; without it an upper entry is new, even when it
        hides a lower one (like the lesson's in_both.txt, put there by hand)."""
        origin = _has_xattr(self._layers.real(0, p), self.encoding.private_prefix + "origin")
        if st.S_ISREG(up.st_mode) and self._metacopy(p):
            return "metadata-only"  # metacopy=on: the data is still the lower file's, only metadata was copied
        low = lowers.lookup(p) if lowers.roots else None
        if origin is False or (origin is None and low is None):
            return "new"
        if low is None or isinstance(low, MergedDir) or st.S_ISDIR(up.st_mode):
            return "copied-up"
        ls = low.lstat
        if st.S_IFMT(ls.st_mode) != st.S_IFMT(up.st_mode):
            return "new"
        same_meta = (ls.st_mode, ls.st_uid, ls.st_gid) == (up.st_mode, up.st_uid, up.st_gid)
        same_data = _same_content(lowers.real(low.layer, p), ls, self._layers.real(0, p), up)
        if same_data and not same_meta:
            return "metadata-only"
        return "copied-up"

    def _layers_now(self) -> Layers:
        if self._layers is None:
            raise RuntimeError("the overlay is not mounted: use `with Overlay(...) as ov:` or call ov.mount()")
        return self._layers

    # -- tracing -----------------------------------------------------------------------------------
    class _QuietCtx:
        def __init__(self, ov): self.ov, self.saved = ov, ov.tracing
        def __enter__(self): self.ov.tracing = False
        def __exit__(self, *a): self.ov.tracing = self.saved

    def _quiet(self):
        return Overlay._QuietCtx(self)

    def last_events(self) -> Trace:
        """The events of the last traced operation (empty before the first)."""
        return Trace(self._last)

    @contextmanager
    def recording(self):
        """``with ov.recording() as steps:`` -- every event of the block, however many, in ``steps``
        (tracing is on inside the block, even for an overlay made with ``trace=False``)."""
        steps = Trace()
        saved = self.tracing
        self.tracing = True
        self._recorders.append(steps)
        try:
            yield steps
        finally:
            self._recorders.remove(steps)
            self.tracing = saved

    def _record(self, event: TraceEvent) -> None:
        self.trace.append(event)
        self._last.append(event)
        for steps in self._recorders:
            steps.append(event)

    def _run(self, op: str, paths: list[str], fn):
        impl = self._need()
        if not self.tracing:
            try:
                return fn(impl)
            finally:
                if op not in _READ_OPS:
                    self._invalidate(impl)
        layers = self._layers
        self._last = []
        before: dict[str, dict | None] = {}
        # The observer reads the layer directories with this process's rights; the kernel uses the
        # mounter's.  Whatever it cannot read shortens the trace, never changes the operation's outcome.
        moved = self._observe(op, paths[0], lambda: layers.lookup(paths[0])) if op == "rename" else None
        redirects = {p: self._upper_redirect(p) for p in paths} if op == "rename" else None
        for p in paths:
            self._observe(op, p, lambda: self._trace_lookup(op, p))
            if op not in _READ_OPS:
                before[p] = self._observe(op, p, lambda: self._upper_snapshot(p))
        try:
            result = fn(impl)
        except OSError as e:
            if op not in _READ_OPS:
                self._invalidate(impl)
            if e.errno == errno.EXDEV and self.options.creates_redirects:
                self._record(TraceEvent(op, "exdev", paths[0],
                                        "directory exists in a lower layer and its redirect would be longer than "
                                        "the overlay module's redirect_max (or upper/ keeps no xattrs): the kernel "
                                        "refuses to rename it (EXDEV) — tools like mv fall back to copy + delete"))
            elif e.errno == errno.EXDEV:
                self._record(TraceEvent(op, "exdev", paths[0],
                                        "directory exists in a lower layer; with redirect_dir=off the kernel "
                                        "refuses to rename it (EXDEV) — tools like mv fall back to copy + delete"))
            self._record(TraceEvent(op, "error", paths[-1], f"[Errno {e.errno}] {errno.errorcode.get(e.errno, '?')}: {e.strerror}"))
            raise
        except BaseException:  # e.g. KeyboardInterrupt after the kernel backend's helper made the change
            if op not in _READ_OPS:
                self._invalidate(impl)
            raise
        if op in _READ_OPS:
            return result
        self._invalidate(impl)
        if isinstance(moved, Leaf) and layers.name(moved.layer) != "upper" and \
                self.options.metacopy and st.S_ISREG(moved.lstat.st_mode):
            self._record(TraceEvent(op, "copy-up", paths[0], f"rename of a lower entry: copied metadata only "
                                    f"(metacopy=on): 0 bytes of data from {layers.name(moved.layer)}, "
                                    f"overlay.redirect written, then renamed to {show(paths[1])}"))
        elif isinstance(moved, Leaf) and layers.name(moved.layer) != "upper":
            self._record(TraceEvent(op, "copy-up", paths[0], f"rename of a lower entry: "
                                    f"{moved.lstat.st_size if st.S_ISREG(moved.lstat.st_mode) else 0} bytes "
                                    f"copied from {layers.name(moved.layer)}, then renamed to {show(paths[1])}",
                                    nbytes=moved.lstat.st_size if st.S_ISREG(moved.lstat.st_mode) else 0))
        for p in paths:
            if before[p] is not None:
                self._observe(op, p, lambda: self._trace_changes(op, p, before[p]))
        if redirects is not None:
            self._trace_redirects(op, paths, redirects)
        return result

    def _upper_redirect(self, p: str) -> str | None:
        """The ``overlay.redirect`` of upper entry ``p`` (redirect_dir), or None."""
        if self.upper is None or not p:
            return None
        try:
            value = os.getxattr(self._layers.real(0, p), self.encoding.private_prefix + "redirect",
                                follow_symlinks=False)
        except OSError:
            return None
        return os.fsdecode(value)

    def _trace_redirects(self, op: str, paths: list[str], before: dict) -> None:
        """A directory that moved with a new ``overlay.redirect`` (redirect_dir=on): say where its lower
        contents are now found (a rename moves ``paths[0]`` to ``paths[1]``; an exchange also back)."""
        for old, new in ((paths[0], paths[-1]), (paths[-1], paths[0])):
            value = self._upper_redirect(new)
            if value is not None and value != before.get(old) and old != new:
                where = f"{show(value.lstrip('/'))} of the lower layers" if value.startswith("/") else \
                    f"the name {value!r} in the same parent of the lower layers"
                self._record(TraceEvent(op, "redirect", new, f"redirect to {value} written (redirect_dir=on): only "
                                        f"the directory was copied up; its lower contents stay at {where}"))

    def _trace_lookup(self, op: str, p: str) -> None:
        steps = self._lookup_steps(p)
        where = self._layer_of(p)
        self._record(TraceEvent(op, "lookup", p, _lookup_detail(steps, where, p),
                                tuple((s[1], s[2]) for s in steps if s[0] == p)))

    def _observe(self, op: str, p: str, look):
        """``look()``, or None and a "trace incomplete" event when a layer cannot be read."""
        try:
            return look()
        except OSError as e:
            self._record(TraceEvent(op, "incomplete", p, f"trace incomplete: could not read "
                                    f"{self._layer_named(e.filename)}: {errno.errorcode.get(e.errno, e.errno)}"))
            return None

    def _layer_named(self, filename) -> str:
        """The layer (and path inside it) a host path belongs to, so no host path shows in the trace."""
        if isinstance(filename, (str, bytes)):
            real = os.fsdecode(filename)
            for i, root in enumerate(self._layers.roots):
                if real == root or real.startswith(root.rstrip("/") + "/"):
                    inside = real[len(root):].lstrip("/")
                    return f"layer {self._layers.name(i)}" + (f" at {show(inside)}" if inside else "")
        return "a layer"

    def _invalidate(self, impl: Backend) -> None:
        if not impl.keeps_cache_fresh:
            self._layers.invalidate_upper()

    def _upper_snapshot(self, p: str) -> dict:
        """State of upper/ along ``p``: for p and each ancestor, what upper holds there."""
        if self.upper is None:
            return {}
        parts = p.split("/") if p else []
        return {"/".join(parts[:i]): self._upper_state("/".join(parts[:i])) for i in range(len(parts) + 1)}

    def _upper_state(self, p: str):
        layers = self._layers
        if not p:
            return ("dir", False, None)
        parent, _, name = p.rpartition("/")
        ents = layers.entries(0, parent)
        e = ents.get(name) if ents else None
        if e is None:
            return None
        if e is ondisk.WHITEOUT:
            return ("whiteout",)
        kind = kind_of(e.st_mode)
        return (kind, kind == "dir" and layers.is_opaque(0, p), (e.st_ino, e.st_size, e.st_mtime_ns),
                kind == "file" and self._metacopy(p))

    def _metacopy(self, p: str) -> bool:
        """Does upper file ``p`` carry ``overlay.metacopy`` (copied up without its data, metacopy=on)?"""
        if not self.options.metacopy and "metacopy" not in self.requested_options.given:
            return False  # none are made, and a mount without metacopy=on refuses to look one up
        return _has_xattr(self._layers.real(0, p), self.encoding.private_prefix + "metacopy") is True

    def _trace_changes(self, op: str, p: str, before: dict) -> None:
        if self.upper is None:
            return
        lowers = self._lower_layers
        parents = []
        for q in sorted(before, key=len):
            old, new = before[q], self._upper_state(q)
            if q != p:
                if old is None and new is not None and new[0] == "dir" and lowers.lookup(q) is not None:
                    parents.append(q)
                continue
            if parents:
                self._record(TraceEvent(op, "copy-up", parents[-1],
                                             f"parent directories copied up first: {', '.join(show(x) for x in parents)}"))
            low = lowers.lookup(p)
            if new is not None and new[0] == "whiteout" and (old is None or old[0] != "whiteout"):
                self._record(TraceEvent(op, "whiteout", p, "whiteout created in upper/ to hide the lower entry"))
            elif new is not None and new[0] == "dir" and new[1] and not (old and old[0] == "dir" and old[1]):
                self._record(TraceEvent(op, "opaque", p, "opaque directory: lower contents at this path are hidden"))
            elif old is None and new is not None and low is not None:
                nbytes = low.lstat.st_size if isinstance(low, Leaf) and new[0] == "file" else 0
                reason = COPY_UP_REASON.get(op, op)
                copied = f"{nbytes} bytes copied"
                if self._truncating and new[0] == "file":  # ovl_copy_up_one: O_TRUNC copies no data
                    nbytes, copied = 0, "0 bytes copied (O_TRUNC: metadata only)"
                elif len(new) > 3 and new[3]:  # ovl_need_meta_copy_up: with metacopy=on, no data
                    nbytes, copied = 0, "copied metadata only (metacopy=on): 0 bytes of data"
                # Both backends build the copy in work/work and rename it into upper/ (ovl_copy_up_workdir).
                how = f"{copied} into work/, renamed into upper/"
                indexed = self.options.index and self.work and index.entry_of(
                    str(self.work), self._layers.real(0, p), self.encoding.xattr_ns)
                if indexed:  # index=on: a hard-linked lower file is copied once, into its index entry
                    first = indexed[1] == 2  # the entry and this name: the copy was made just now
                    nbytes = nbytes if first else 0
                    how = (f"{copied} into work/index/, renamed to the index entry, " if first else
                           "already in the index (0 bytes copied), ") + \
                        f"linked to the index entry work/index/{indexed[0]} as upper/{p} (index=on keeps hard links)"
                self._record(TraceEvent(op, "copy-up", p, f"{reason}: {how}, from "
                                             f"{lowers.name(low.layer if isinstance(low, Leaf) else low.layers[0])}",
                                             nbytes=nbytes))
            elif old is not None and new is not None and old[0] == new[0] == "file" and old[3] and not new[3]:
                # ovl_copy_up_meta_inode_data: the data follows into the same upper inode
                nbytes = 0 if self._truncating else old[2][1]
                self._record(TraceEvent(op, "copy-up", p, f"{COPY_UP_REASON.get(op, op)}: data copied up: "
                                        f"{nbytes} bytes{' (O_TRUNC)' if self._truncating else ''} into the "
                                        "metadata-only copy in upper/, overlay.metacopy removed", nbytes=nbytes))
            elif new is not None and (old is None or old[0] == "whiteout"):
                self._record(TraceEvent(op, "create", p, f"new {new[0]} in upper/"))
            elif new is None and old is not None:
                self._record(TraceEvent(op, "remove", p, "removed from upper/"))

    # -- display -----------------------------------------------------------------------------------
    def _repr_mimebundle_(self, include=None, exclude=None):
        return mimebundle("overlay", self, include, exclude)  # drawn by diagrams.py (base.display_hooks)


_READ_OPS = frozenset({"read", "getxattr", "listdir", "stat", "open", "listxattr", "statfs"})


def _lookup_detail(steps, where, p) -> str:
    final = [s for s in steps if s[0] == p]
    looked = ", ".join(f"{layer}: {what}" for _, layer, what in final) or "root"
    if where is None:
        return f"looked at {looked} -> not found"
    return f"looked at {looked} -> served by {where}"


def _has_xattr(path: str, name: str) -> bool | None:
    """True/False, or None where this filesystem keeps no xattrs at all (then nothing can be told)."""
    try:
        os.getxattr(path, name, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno == errno.ENODATA:
            return False
        return None


def _same_content(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    if st.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if not st.S_ISREG(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
