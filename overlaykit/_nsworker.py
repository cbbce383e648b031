"""The helper process that holds a real overlay mount: run as ``python -m overlaykit._nsworker``.

A multi-threaded process (a Jupyter kernel) cannot unshare its mount or user namespace, so the mount and
every operation on it happen here, in a single-threaded child.  The child first enters a private mount
namespace (as root) or a new user + mount namespace (unprivileged, mounting with ``userxattr``), mounts
the overlay with the new mount API (``fsopen``/``fsconfig("lowerdir+")``, so 500 layers fit) or the
legacy mount(2) string, chroots into the merged root (so no symlink leads out of it) and then serves
operations over its stdin/stdout.  The mount exists only in this process's namespace: when the process
ends, for whatever reason, the namespace and the mount end with it.

Frames are a 12-byte header (big-endian body length and request id) and a pickle, both ways; a reply
carries the id of its request, so the parent can drop the late reply of a call it abandoned (Ctrl-C).
The parent sends the configuration (id 0), the worker answers ``("ok", info)`` or ``("err", errno,
message, path, stage)``; then each request ``(op, args)`` gets ``("ok", result)``, ``("err", errno)``
or, for a request it cannot serve, ``("exc", exception name, message)``.  EOF on stdin ends the worker.
"""
from __future__ import annotations

import ctypes
import errno
import os
import pickle
import signal
import stat as st
import struct
import sys

# Syscall numbers of the new mount API: the same on every architecture but alpha (uapi asm-generic).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 428, 429, 430, 431, 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_PDEATHSIG = 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, ns: tuple, follow: bool = True) -> None:
    """utimensat(2) with times in ns, where each may be "now" or "omit" (UTIME_NOW / UTIME_OMIT)."""
    ts = (_Timespec * 2)()
    for t, v in zip(ts, ns):
        if v == "now":
            t.tv_sec, t.tv_nsec = 0, UTIME_NOW
        elif v == "omit":
            t.tv_sec, t.tv_nsec = 0, UTIME_OMIT
        else:
            t.tv_sec, t.tv_nsec = divmod(int(v), 10**9)
    if _libc.utimensat(ctypes.c_int(AT_FDCWD), os.fsencode(path), ts,
                       ctypes.c_int(0 if follow else AT_SYMLINK_NOFOLLOW)) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def _utime(p: str, times, ns=None, follow: bool = True) -> None:
    if ns is not None and any(isinstance(v, str) for v in ns):
        utimensat(_abs(p), ns, follow)
    elif ns is not None:
        os.utime(_abs(p), ns=ns, follow_symlinks=follow)
    else:
        os.utime(_abs(p), times, follow_symlinks=follow)


def renameat2(src: str, dst: str, flags: int, src_dir_fd: int = AT_FDCWD, dst_dir_fd: int = AT_FDCWD) -> None:
    """rename(2) with flags (Python's os.rename has none); OSError with the kernel's errno."""
    if _libc.renameat2(ctypes.c_int(src_dir_fd), os.fsencode(src), ctypes.c_int(dst_dir_fd), os.fsencode(dst),
                       ctypes.c_uint(flags)) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class MountError(Exception):
    """A mount step failed: errno, the kernel's own words (from the fs context log) and the path concerned."""

    def __init__(self, code: int, message: str | None, path: str | None):
        super().__init__(code, message, path)
        self.code, self.message, self.path = code, message, path


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise MountError(code, f"{what}: {os.strerror(code)}", path)
    return ret


def _sys(nr: int, *args) -> int:
    return _libc.syscall(ctypes.c_long(nr), *args)


def _fs_log(fd: int) -> list[str]:
    """The messages the kernel left in the fs context ("e overlay: ..."), oldest first."""
    out = []
    while True:
        try:
            msg = os.read(fd, 1024)
        except OSError:
            break
        if not msg:
            break
        out.append(msg.decode(errors="replace").rstrip("\n"))
    return out


def _explain(fd: int) -> str | None:
    """The kernel's last error words for this mount, where it logged them to the fs context (many checks
    only go to the kernel log, which an unprivileged process cannot read; then None)."""
    msgs = [m[2:] if m[:2] in ("e ", "w ", "i ") else m for m in _fs_log(fd)]
    errs = [m.removeprefix("overlay: ") for m in msgs if m]
    return errs[-1] if errs else None


# -- namespaces ------------------------------------------------------------------------------------

def enter_namespaces(userns: bool) -> None:
    """Private mount namespace (root), or user + mount namespace mapping our own uid/gid (unprivileged)."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | (CLONE_NEWUSER if userns else 0)
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
    if userns:
        # Identity map: files keep their real owners in stat(), ops run as the same user as the caller.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1\n")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / rprivate")


def drop_capabilities() -> None:
    """After the mount, serve operations with the caller's plain permissions (like the simulator)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    hdr = Header(LINUX_CAPABILITY_VERSION_3, 0)
    data = (Data * 2)()
    _check(_libc.capset(ctypes.byref(hdr), ctypes.byref(data)), "capset")


# -- mounting --------------------------------------------------------------------------------------

def mount_new_api(cfg: dict) -> int:
    """Mount with fsopen/fsconfig/fsmount; returns the detached mount's fd (or moves it onto ``merged``)."""
    fsfd = _sys(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    if fsfd < 0:
        code = ctypes.get_errno()
        raise MountError(code, f"fsopen: {os.strerror(code)}", None)
    try:
        def setstr(key: str, value: str) -> None:
            if _sys(SYS_FSCONFIG, fsfd, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0) < 0:
                code = ctypes.get_errno()
                err = MountError(code, _explain(fsfd), value)
                err.key = key
                raise err

        for lower in cfg["lowers"]:
            setstr("lowerdir+", lower)
        if cfg["upper"] is not None:
            setstr("upperdir", cfg["upper"])
        if cfg["work"] is not None:
            setstr("workdir", cfg["work"])
        for key, value in cfg["options"]:
            if value is not None:
                setstr(key, value)
            elif _sys(SYS_FSCONFIG, fsfd, FSCONFIG_SET_FLAG, key.encode(), None, 0) < 0:
                code = ctypes.get_errno()
                raise MountError(code, _explain(fsfd), None)
        if _sys(SYS_FSCONFIG, fsfd, FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            code = ctypes.get_errno()
            raise MountError(code, _explain(fsfd), None)
        mfd = _sys(SYS_FSMOUNT, fsfd, FSMOUNT_CLOEXEC, 0)
        if mfd < 0:
            code = ctypes.get_errno()
            raise MountError(code, _explain(fsfd), None)
    finally:
        os.close(fsfd)
    if cfg["merged"]:
        _check(_sys(SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, os.fsencode(cfg["merged"]), MOVE_MOUNT_F_EMPTY_PATH),
               "move_mount", cfg["merged"])
    return mfd


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def mount_legacy(cfg: dict, target: str) -> None:
    """mount(2) with one option string.  It is cut at one page, so long stacks use short relative names:
    like Docker's overlay2 ``l/`` links, a directory of one-character-ish symlinks we chdir into."""
    lowers = cfg["lowers"]
    linkdir = None

    def data_for(names: list[str]) -> bytes:
        opts = ["lowerdir=" + ":".join(_escape(x) for x in names)]
        if cfg["upper"] is not None:
            opts.append("upperdir=" + _escape(cfg["upper"]))
        if cfg["work"] is not None:
            opts.append("workdir=" + _escape(cfg["work"]))
        opts += [k if v is None else f"{k}={v}" for k, v in cfg["options"]]
        return ",".join(opts).encode()

    data = data_for(lowers)
    try:
        if len(data) >= os.sysconf("SC_PAGE_SIZE"):
            import tempfile
            linkdir = tempfile.mkdtemp(prefix="overlaykit-l-")
            for i, lower in enumerate(lowers):
                os.symlink(lower, os.path.join(linkdir, format(i, "x")))
            os.chdir(linkdir)
            data = data_for([format(i, "x") for i in range(len(lowers))])
        if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, data) < 0:
            code = ctypes.get_errno()
            raise MountError(code, None, None)
    finally:
        if linkdir:
            os.chdir("/")
            for name in os.listdir(linkdir):
                os.unlink(os.path.join(linkdir, name))
            os.rmdir(linkdir)


def mount_and_enter(cfg: dict) -> str:
    """Mount, then chroot into the merged root.  Returns which API mounted it."""
    api = "new"
    mfd = None
    if not cfg.get("legacy"):
        try:
            mfd = mount_new_api(cfg)
        except MountError as e:
            # No fsopen (before 5.2), or no "lowerdir+" (before 6.8): use mount(2).
            unknown_key = (e.code == errno.EINVAL and getattr(e, "key", None) == "lowerdir+"
                           and "too many" not in (e.message or ""))
            if e.code == errno.ENOSYS or unknown_key:
                api = "legacy"
            else:
                raise
    else:
        api = "legacy"
    if api == "legacy":
        target = cfg["merged"]
        if not target:  # a mount point is needed; it is an empty directory outside our namespace
            import tempfile
            target = cfg["scratch"] = tempfile.mkdtemp(prefix="overlaykit-merged-")
        try:
            mount_legacy(cfg, target)
        except MountError:
            if cfg.get("scratch"):
                os.rmdir(cfg["scratch"])
            raise
        os.chdir(target)
    elif cfg["merged"]:
        os.close(mfd)
        os.chdir(cfg["merged"])
    else:
        os.fchdir(mfd)
        os.close(mfd)
    os.chroot(".")
    os.chdir("/")
    return api


# -- serving ---------------------------------------------------------------------------------------

def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


_HEAD = struct.Struct(">IQ")  # body length, request id


def recv(fd: int):
    """The next frame as (request id, body bytes), or None at EOF."""
    head = _read_exact(fd, _HEAD.size)
    if head is None:
        return None
    n, rid = _HEAD.unpack(head)
    body = _read_exact(fd, n)
    return None if body is None else (rid, body)


def send(fd: int, rid: int, obj) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEAD.pack(len(body), rid) + body)
    while view:
        view = view[os.write(fd, view):]


def _abs(p: str) -> str:
    return "/" + p


def _write(p: str, data: bytes, append: bool) -> None:
    fd = os.open(_abs(p), os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _read(p: str) -> bytes:
    fd = os.open(_abs(p), os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _touch(p: str) -> None:
    try:
        os.utime(_abs(p))
    except FileNotFoundError:
        os.close(os.open(_abs(p), os.O_WRONLY | os.O_CREAT, 0o666))


_USERNS = False


def _chown(p: str, uid: int, gid: int, follow: bool = True) -> None:
    """In our user namespace only the caller's own uid/gid are mapped, and chown to any other id fails
    with EINVAL; outside, the same unprivileged call fails with EPERM, which is what the caller sees."""
    try:
        os.chown(_abs(p), uid, gid, follow_symlinks=follow)
    except OSError as e:
        if _USERNS and e.errno == errno.EINVAL:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM)) from None
        raise


def _stat(p: str, follow: bool):
    s = os.stat(_abs(p)) if follow else os.lstat(_abs(p))
    return s, (os.readlink(_abs(p)) if st.S_ISLNK(s.st_mode) else None)


_FDS: set[int] = set()  # the files the parent has open here (its handles are these fds)


def _open(p: str, flags: int, perm: int) -> int:
    fd = os.open(_abs(p), flags | os.O_CLOEXEC, perm)
    _FDS.add(fd)
    return fd


def _fd(h: int) -> int:
    if h not in _FDS:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return h


def _close(h: int) -> None:
    os.close(_fd(h))
    _FDS.discard(h)


#: The most one pread returns: a larger read is several requests, so no reply is ever a whole big file.
READ_CHUNK = 1 << 20

OPS = {
    "open": _open,
    "pread": lambda h, n, offset: os.pread(_fd(h), min(n, READ_CHUNK), offset),
    "pwrite": lambda h, data, offset: os.pwrite(_fd(h), data, offset),
    "fstat": lambda h: os.fstat(_fd(h)),
    "ftruncate": lambda h, size: os.ftruncate(_fd(h), size),
    "close": _close,
    "read_bytes": _read,
    "write_bytes": _write,
    "touch": _touch,
    "remove": lambda p: os.unlink(_abs(p)),
    "mkdir": lambda p, mode: os.mkdir(_abs(p), mode),
    "rmdir": lambda p: os.rmdir(_abs(p)),
    "rename": lambda s, d: os.rename(_abs(s), _abs(d)),
    "chmod": lambda p, mode: os.chmod(_abs(p), mode),
    "chown": _chown,
    "utime": _utime,
    "setxattr": lambda p, name, value, flags=0, follow=True: os.setxattr(_abs(p), name, value, flags,
                                                                          follow_symlinks=follow),
    "getxattr": lambda p, name, follow=True: os.getxattr(_abs(p), name, follow_symlinks=follow),
    "listxattr": lambda p, follow=True: sorted(os.listxattr(_abs(p), follow_symlinks=follow)),
    "removexattr": lambda p, name, follow=True: os.removexattr(_abs(p), name, follow_symlinks=follow),
    "statfs": lambda p: os.statvfs(_abs(p)),
    "mknod": lambda p, mode, device: os.mknod(_abs(p), mode, device),
    "rename2": lambda s, d, flags: renameat2(_abs(s), _abs(d), flags),
    "symlink": lambda target, p: os.symlink(target, _abs(p)),
    "link": lambda s, d: os.link(_abs(s), _abs(d), follow_symlinks=False),
    "truncate": lambda p, size: os.truncate(_abs(p), size),
    "listdir": lambda p: sorted(os.listdir(_abs(p))),
    "stat": _stat,
}


def answer(msg):
    """The reply to one request.  Never raises: a request this helper cannot serve (unknown operation,
    wrong arguments, a malformed message) gets an error reply, and the helper keeps serving."""
    try:
        if not (isinstance(msg, tuple) and len(msg) == 2 and isinstance(msg[0], str)
                and isinstance(msg[1], tuple)):
            raise ValueError(f"malformed request {msg!r:.80}")
        op, args = msg
        fn = OPS.get(op)
        if fn is None:
            raise ValueError(f"unknown operation {op!r}")
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", e.errno or errno.EIO)
    except Exception as e:
        return ("exc", type(e).__name__, str(e))


def serve(rfd: int, wfd: int) -> None:
    while True:
        frame = recv(rfd)
        if frame is None:
            return
        rid, body = frame
        try:
            msg = pickle.loads(body)
        except Exception as e:
            msg = None
            reply = ("exc", "ValueError", f"a request that could not be read: {e}")
        else:
            if isinstance(msg, tuple) and msg[:1] == ("exit",):
                return
            reply = answer(msg)
        try:
            send(wfd, rid, reply)
        except BrokenPipeError:
            return  # the parent closed its end: it is gone or stopping us
        except Exception as e:  # a result that cannot be pickled
            send(wfd, rid, ("exc", "ValueError", f"the reply could not be sent: {e}"))


def main() -> None:
    # The parent's interrupt (Ctrl-C in a terminal, "interrupt kernel" in Jupyter, which signals the
    # whole process group) must not take the learner's mount away; EOF on stdin ends us instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol on private fds; anything printed goes to stderr.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    frame = recv(rfd)
    if frame is None:
        return
    cfg = pickle.loads(frame[1])
    if cfg.get("pdeathsig"):
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != cfg["parent"]:  # the parent died before prctl took effect
            return
    stage = "namespace"
    try:
        enter_namespaces(cfg["userns"])
        stage = "mount"
        api = mount_and_enter(cfg)
        stage = "capabilities"
        if cfg["userns"]:
            drop_capabilities()
            global _USERNS
            _USERNS = True
    except MountError as e:
        send(wfd, 0, ("err", e.code, e.message, e.path, stage))
        return
    except OSError as e:
        send(wfd, 0, ("err", e.errno, f"{stage}: {e.strerror}", e.filename, stage))
        return
    send(wfd, 0, ("ok", {"pid": os.getpid(), "api": api, "scratch": cfg.get("scratch")}))
    serve(rfd, wfd)


if __name__ == "__main__":
    main()
