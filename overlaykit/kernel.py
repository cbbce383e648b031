"""The real kernel overlay, mounted and used through a helper process (`overlaykit._nsworker`).

The mount lives only in the helper's private mount namespace (as root) or in a user + mount namespace
of its own (unprivileged, with ``userxattr``).  Nothing is mounted where other processes could trip over
it, and when the helper ends -- unmount, an exception, the Python process killed -- the namespace and the
mount disappear with it.  The helper chroots into the merged root, so symlinks cannot lead out of it.
"""
from __future__ import annotations

import atexit
import errno
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from .base import Backend, Stat
from .ondisk import errno_error

#: The directory that holds the ``overlaykit`` package, put on the helper's PYTHONPATH.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
#: Options that make the kernel behave as the lesson (and the simulator) describes, whatever the
#: distribution's defaults: directory renames give EXDEV, copy-up breaks hard links, data is copied.
DEFAULT_OPTIONS = (("redirect_dir", "off"), ("index", "off"), ("metacopy", "off"))

_live: dict[int, "Worker"] = {}
_live_lock = threading.Lock()
_handlers_installed = False


class WorkerGone(ConnectionError):
    """The helper process ended (it was killed, or the overlay was unmounted): errno ENOTCONN, as a dead
    FUSE mount answers.  An OSError, so code that handles filesystem errors handles this one too."""

    def __init__(self, message: str = "the overlay's helper process has ended, and the mount with it: "
                                      "mount again"):
        super().__init__(errno.ENOTCONN, message)


#: Operations that change nothing: an interrupt abandons them at once (their late reply is discarded).
#: Every other operation, once sent, runs to its end in the helper and the interrupt is raised after
#: its reply, so that after Ctrl-C a change is either wholly made (it was sent) or not made at all.
#: A second interrupt stops waiting for that reply (the helper still completes the change).
_ABANDONABLE = frozenset({"read_bytes", "getxattr", "listdir", "stat", "pread", "fstat", "listxattr", "statfs"})
#: Frame header: body length and the request id the frame belongs to (0 for the start-up exchange).
_HEAD = struct.Struct(">IQ")
_CHUNK = 1 << 20

#: Fault injection for the tests: called with "send" (before a request goes out), "sent" (after) and
#: "reply" (after each chunk of a reply arrives).
_test_hook = None


class _Abandoned(Exception):
    """An interrupted call left the protocol at a point the reader can resume from."""


class _DeferInterrupt:
    """While a request and its reply cross the pipes, SIGINT only sets a flag; the caller turns it into
    KeyboardInterrupt at a point where the byte stream is in step.  (A KeyboardInterrupt raised between
    an ``os.read`` and storing its result would lose bytes and put every later reply out of step.)
    Only the main thread receives KeyboardInterrupt, so elsewhere this does nothing."""

    def __init__(self):
        self.hit = False
        self.hits = 0
        self.frame = None
        self.old = None
        self.active = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self.old = signal.signal(signal.SIGINT, self._flag)
                self.active = True
            except (ValueError, OSError):
                pass
        return self

    def _flag(self, signum, frame):
        self.hit, self.frame = True, frame
        self.hits += 1

    def __exit__(self, et, ev, tb):
        if self.active:
            signal.signal(signal.SIGINT, self.old if self.old is not None else signal.default_int_handler)
        if self.hit and et is None:
            self.replay()

    def replay(self):
        """Deliver the deferred SIGINT to whoever handled it before (usually: raise KeyboardInterrupt)."""
        self.hit, self.hits = False, 0
        old = self.old
        if callable(old):
            old(signal.SIGINT, self.frame)
        elif old != signal.SIG_IGN:
            raise KeyboardInterrupt


class Worker:
    """One helper process holding one overlay mount; `call` runs an operation in it.

    Every request carries an id and every reply the id of its request.  A call interrupted by SIGINT
    (Ctrl-C, Jupyter's "interrupt kernel") leaves its reply to be read and discarded by the next call,
    even when it stopped in the middle of a large reply, so each call gets its own answer.  Should the
    stream ever be in an unknown state (an unexpected exception while a frame crossed), the next call
    restarts the helper on the same layers first: the mount keeps no state of its own beyond upper/.
    """

    def __init__(self, lowers: list[str], upper: str | None, work: str | None, merged: str | None = None, *,
                 userns: bool | None = None, legacy: bool = False, options=DEFAULT_OPTIONS):
        self.userns = os.geteuid() != 0 if userns is None else userns
        # userxattr implies redirect_dir=nofollow and refuses an explicit redirect_dir.
        opts = ([o for o in options if o[0] != "redirect_dir"] + [("userxattr", None)]) if self.userns \
            else list(options)
        self.cfg = {"lowers": [os.fspath(x) for x in lowers], "upper": upper and os.fspath(upper),
                    "work": work and os.fspath(work), "merged": merged and os.fspath(merged),
                    "options": opts, "userns": self.userns, "legacy": legacy, "parent": os.getpid(),
                    "pdeathsig": threading.current_thread() is threading.main_thread()}
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.api: str | None = None
        self.scratch: str | None = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._reset_stream()

    def _reset_stream(self) -> None:
        self._next_id = 1
        self._head = bytearray()     # a frame header read in part
        self._skip = 0               # bytes of an abandoned reply's body still to discard
        self._abandoned: set[int] = set()  # ids whose replies are discarded when they come
        self._desynced = False

    def start(self) -> "Worker":
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._reset_stream()
        self.proc = subprocess.Popen([sys.executable, "-m", "overlaykit._nsworker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        _widen_pipe(self.proc.stdout.fileno())
        try:
            self._send(0, self.cfg)
            reply = self._recv_plain()
        except BaseException:
            self.stop()
            raise
        if reply is None:
            self.stop()
            raise WorkerGone("the overlay helper process ended before mounting (see its message above)")
        if reply[0] == "err":
            self.stop()
            code, message, path, stage = reply[1:]
            if stage == "mount" and path is None:
                message, path = diagnose_mount_error(self.cfg, code, message)
            err = OSError(code, message or os.strerror(code), path)
            err.stage = stage  # which step failed: "namespace", "mount" or "capabilities"
            raise err
        info = reply[1]
        self.pid, self.api, self.scratch = info["pid"], info["api"], info["scratch"]
        with _live_lock:
            _live[id(self)] = self
        _install_handlers()
        return self

    @property
    def alive(self) -> bool:
        proc = self.proc
        return proc is not None and proc.poll() is None

    def call(self, op: str, *args):
        """Run ``op`` in the helper: ``("ok", result)``, ``("err", errno)`` or ``("exc", type, message)``."""
        with self._lock:
            if self.proc is None:
                raise WorkerGone("the overlay's helper process has ended (or the overlay was unmounted): "
                                 "mount again")
            if self._desynced:
                self.restart()
            body = pickle.dumps((op, args), protocol=pickle.HIGHEST_PROTOCOL)
            rid, self._next_id = self._next_id, self._next_id + 1
            try:
                with _DeferInterrupt() as guard:
                    _hook("send")
                    if guard.hit:  # interrupted before anything was sent: nothing happened
                        guard.replay()
                    self._send(rid, body, pickled=True)
                    _hook("sent")
                    reply = self._recv(rid, guard, 1 if op in _ABANDONABLE else 2)
            except _Abandoned:
                raise KeyboardInterrupt from None
            except (BrokenPipeError, ConnectionError, EOFError):
                self._reap()
                raise WorkerGone() from None
            except KeyboardInterrupt:
                raise
            except BaseException:
                self._desynced = True  # a frame was cut at an unknown point: restart before the next call
                raise
            return reply

    def restart(self) -> None:
        """Start a new helper on the same layers (the old one is stopped first)."""
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        with _live_lock:
            _live.pop(id(self), None)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    self._send_to(proc, 0, pickle.dumps(("exit",)))
                except OSError:
                    pass
            proc.stdin.close()
            # Unread replies (of interrupted calls) must not keep the helper blocked on a full pipe.
            proc.stdout.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if not proc.stdout.closed:
                proc.stdout.close()
            if self.scratch:  # the legacy mount's mount point: an empty directory out here
                try:
                    os.rmdir(self.scratch)
                except OSError:
                    pass

    def _reap(self) -> None:
        """The pipes broke: the helper is gone or going, and of no more use; collect it."""
        self.stop()

    # -- framing: 12-byte header (length, request id) + pickle -----------------------------------------
    def _send(self, rid: int, obj, pickled: bool = False) -> None:
        self._send_to(self.proc, rid, obj if pickled else pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    @staticmethod
    def _send_to(proc, rid: int, body: bytes) -> None:
        fd = proc.stdin.fileno()
        view = memoryview(_HEAD.pack(len(body), rid))
        while view:
            view = view[os.write(fd, view):]
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view[:_CHUNK]):]

    def _recv_plain(self):
        """The start-up reply (id 0), or None when the helper ended first."""
        try:
            return self._recv(0, None)
        except (ConnectionError, EOFError):
            return None

    def _recv(self, rid: int, guard: _DeferInterrupt | None, patience: int = 1):
        """The reply to request ``rid``; replies to abandoned requests are read and dropped on the way.
        With a ``guard``, the ``patience``-th SIGINT abandons the wait at a resumable point (raises
        `_Abandoned`)."""
        fd = self.proc.stdout.fileno()

        def wait() -> None:
            # Wake up now and then to see the interrupt flag: os.read itself is restarted after a signal.
            if guard is None:
                return
            while True:
                if guard.hits >= patience:
                    abandon()
                if not guard.active or select.select([fd], [], [], 0.05)[0]:
                    return

        def abandon() -> None:
            self._abandoned.add(rid)
            raise _Abandoned

        while True:
            while self._skip:
                wait()
                chunk = os.read(fd, min(self._skip, _CHUNK))
                if not chunk:
                    raise EOFError
                self._skip -= len(chunk)
            while len(self._head) < _HEAD.size:
                wait()
                chunk = os.read(fd, _HEAD.size - len(self._head))
                if not chunk:
                    raise EOFError
                self._head += chunk
            n, got_id = _HEAD.unpack(self._head)
            self._head = bytearray()
            if got_id in self._abandoned:
                self._abandoned.discard(got_id)
                self._skip = n
                continue
            if got_id != rid:
                raise ProtocolError(f"reply {got_id} to a request never made (waiting for {rid})")
            body = bytearray(n)
            view = memoryview(body)
            got = 0
            while got < n:
                if guard is not None and guard.hits >= patience:
                    self._skip = n - got  # our own reply, cut: the rest is dropped by the next call
                    raise _Abandoned
                wait_for_data = guard is not None and guard.active
                if wait_for_data and not select.select([fd], [], [], 0.05)[0]:
                    continue
                k = os.readv(fd, [view[got:got + _CHUNK]])
                if not k:
                    raise EOFError
                got += k
                _hook("reply")
            return pickle.loads(body)


class ProtocolError(Exception):
    """A reply that matches no request: the stream is out of step (the helper is restarted)."""


def _hook(stage: str) -> None:
    if _test_hook is not None:
        _test_hook(stage)


def _widen_pipe(fd: int) -> None:
    """Fewer, larger reads for big replies (1 MiB is the unprivileged maximum by default)."""
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _CHUNK)
    except OSError:
        pass


def stop_all() -> None:
    """Stop every helper (and so every mount) this process holds."""
    with _live_lock:
        workers = list(_live.values())
    for w in workers:
        try:
            w.stop()
        except Exception:
            pass


def _on_sigterm(signum, frame):
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """atexit always; SIGTERM only where nobody handles it (in a Jupyter kernel the kernel's own
    handlers stay).  SIGINT is left alone: Python turns it into KeyboardInterrupt and then runs atexit.
    Whatever happens, the helpers also end on EOF of their stdin, i.e. when this process is gone."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):
            pass


#: Exceptions the helper may report that mean the same here (what ``os`` raises for a bad argument).
_PASSED_ON = {"TypeError": TypeError, "ValueError": ValueError, "OverflowError": OverflowError}


class KernelBackend(Backend):
    """`Backend` on a real overlay mount held by a helper process."""

    name = "kernel"
    #: Use the legacy mount(2) option string even where the new mount API exists (for tests).
    legacy_mount = False

    def __init__(self, ov):
        super().__init__([str(x) for x in ov.lowers], str(ov.upper) if ov.upper else None,
                         str(ov.work) if ov.work else None, ov.encoding)
        self.merged = str(ov.merged) if getattr(ov, "merged", None) else None
        self.options = getattr(ov, "requested_options", None)
        self.worker: Worker | None = None

    def mount(self) -> None:
        if self.worker is None:
            self.worker = Worker(self.lowers, self.upper, self.work, self.merged, legacy=self.legacy_mount,
                                 options=self.options.kernel_pairs() if self.options else DEFAULT_OPTIONS).start()

    def unmount(self) -> None:
        w, self.worker = self.worker, None
        if w is not None:
            w.stop()

    @property
    def pid(self) -> int | None:
        return self.worker.pid if self.worker else None

    def how_to_look(self) -> str:
        """How to look into merged/ from a terminal, though the mount is private to the helper process."""
        if self.worker is None:
            return "The overlay is not mounted."
        pid = self.worker.pid
        who = "as root" if os.geteuid() == 0 else "as the same user that runs this notebook"
        look = f"`ls -la /proc/{pid}/root/`"  # the helper's root directory is the merged root
        if not self.merged:
            return (f"The overlay is mounted only inside helper process {pid} (its own mount namespace), which "
                    f"sees it as its root directory. From a terminal, {who}: {look}")
        enter = (f"nsenter -t {pid} -U -m --preserve-credentials" if self.worker.userns
                 else f"nsenter -t {pid} -m")
        return (f"The overlay is mounted on {self.merged} only inside helper process {pid} (its own mount "
                f"namespace); elsewhere that directory looks empty. From a terminal, {who}: "
                f"{look} or `{enter} ls -la {self.merged}`")

    # -- operations ---------------------------------------------------------------------------------
    def _do(self, op: str, paths: tuple, *args):
        if self.worker is None:
            raise WorkerGone("the overlay is not mounted (its helper process was stopped)")
        reply = self.worker.call(op, *args)
        if reply[0] == "err":
            raise errno_error(reply[1], *paths)
        if reply[0] == "exc":  # the helper could not serve the request (and kept running)
            kind, message = reply[1], reply[2]
            if kind in _PASSED_ON:
                raise _PASSED_ON[kind](message)
            raise OSError(errno.EINVAL, f"the overlay helper could not run {op}: {kind}: {message}", *paths[:1])
        return reply[1]

    @property
    def alive(self) -> bool:
        return self.worker is not None and self.worker.alive

    def touch(self, p): self._do("touch", (p,), p)
    def remove(self, p): self._do("remove", (p,), p)
    def mkdir(self, p, mode): self._do("mkdir", (p,), p, mode)
    def rmdir(self, p): self._do("rmdir", (p,), p)
    def rename(self, src, dst): self._do("rename", (src, dst), src, dst)
    def chmod(self, p, mode): self._do("chmod", (p,), p, mode)
    def chown(self, p, uid, gid, follow=True): self._do("chown", (p,), p, uid, gid, follow)
    def utime(self, p, times, ns=None, follow=True): self._do("utime", (p,), p, times, ns, follow)
    def setxattr(self, p, name, value, flags=0, follow=True): self._do("setxattr", (p,), p, name, value, flags, follow)
    def getxattr(self, p, name, follow=True): return self._do("getxattr", (p,), p, name, follow)
    def listxattr(self, p, follow=True): return self._do("listxattr", (p,), p, follow)
    def removexattr(self, p, name, follow=True): self._do("removexattr", (p,), p, name, follow)
    def statfs(self, p): return self._do("statfs", (p,), p)
    def mknod(self, p, mode, device): self._do("mknod", (p,), p, mode, device)
    def rename2(self, src, dst, flags): self._do("rename2", (src, dst), src, dst, flags)
    def symlink(self, target, p): self._do("symlink", (p,), target, p)
    def link(self, src, dst): self._do("link", (src, dst), src, dst)
    def truncate(self, p, size): self._do("truncate", (p,), p, size)
    def listdir(self, p): return self._do("listdir", (p,), p)

    def stat(self, p, follow):
        s, target = self._do("stat", (p,), p, follow)
        return Stat.from_os(s, target)

    # Open files live in the helper (a handle is its fd there); data crosses in chunks of at most 1 MiB.
    def open(self, p, flags, perm): return self._do("open", (p,), p, flags, perm)
    def pread(self, h, n, offset): return self._do("pread", (None,), h, n, offset)
    def pwrite(self, h, data, offset): return self._do("pwrite", (None,), h, data, offset)
    def fstat(self, h): return Stat.from_os(self._do("fstat", (None,), h))
    def ftruncate(self, h, size): self._do("ftruncate", (None,), h, size)
    def close(self, h): self._do("close", (None,), h)

    def write_all(self, p, flags, data):
        """One request (open, write, close in the helper): after Ctrl-C the write is whole or not made."""
        self._do("write_bytes", (p,), p, data, bool(flags & os.O_APPEND))


def diagnose_mount_error(cfg: dict, code: int, message: str | None) -> tuple[str | None, str | None]:
    """Name the path a failed mount is about, and say why, in the kernel's own words.

    The kernel logs most configuration errors only to its log (dmesg), not to the caller; the errno is
    always the kernel's, and this re-derives the message and path with the checks of fs/overlayfs
    (ovl_setup_trap, ovl_check_layer, ovl_get_workdir) in the kernel's order.
    """
    lowers, upper, work = cfg["lowers"], cfg["upper"], cfg["work"]

    def ident(path):
        try:
            s = os.stat(path)
            return (s.st_dev, s.st_ino)
        except OSError:
            return None

    if code == errno.ELOOP:
        traps = [ident(x) for x in (upper, work) if x is not None]
        for lower in lowers:  # a layer root that is already a layer root: "conflicting"
            i = ident(lower)
            if i in traps:
                return "conflicting lowerdir path", lower
            traps.append(i)
        for lower in lowers:  # an ancestor of a lower layer is a layer root: "overlapping"
            real = os.path.realpath(lower)
            while real != "/":
                real = os.path.dirname(real)
                if ident(real) in traps:
                    return "overlapping lowerdir path", lower
        return message, None
    if code == errno.EINVAL:
        if message:
            return message, None
        if upper is not None and work is None:
            return "missing 'workdir'", upper
        if not lowers:
            return "missing 'lowerdir'", None
        for x in lowers + [y for y in (upper, work) if y is not None]:
            if not os.path.isdir(x):
                return "not a directory", x
        if upper is None and len(lowers) < 2:
            return "at least 2 lowerdir are needed while upperdir nonexistent", lowers[0] if lowers else None
        if upper is not None:
            iu, iw = ident(upper), ident(work)
            if iu and iw and iu[0] != iw[0]:
                return "workdir and upperdir must reside under the same mount", work
            ru, rw = os.path.realpath(upper), os.path.realpath(work)
            if ru == rw or rw.startswith(ru.rstrip("/") + "/") or ru.startswith(rw.rstrip("/") + "/"):
                return "workdir and upperdir must be separate subtrees", work
    return message, None


# -- can this machine mount? ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def probe() -> tuple[bool, str]:
    """Really mount a tiny overlay (in a helper, in a temporary directory removed afterwards): (ok, why)."""
    if not sys.platform.startswith("linux"):
        return False, f"overlayfs is a Linux filesystem; this is {sys.platform}"
    from .capabilities import overlay_in_kernel
    if not overlay_in_kernel():
        return False, "this kernel has no overlay filesystem (not in /proc/filesystems)"
    root = os.geteuid() == 0
    tmp = tempfile.mkdtemp(prefix="overlaykit-probe-")
    try:
        for d in ("lower", "upper", "work"):
            os.mkdir(os.path.join(tmp, d))
        with open(os.path.join(tmp, "lower", "f"), "w") as f:
            f.write("x")
        w = Worker([os.path.join(tmp, "lower")], os.path.join(tmp, "upper"), os.path.join(tmp, "work"))
        try:
            w.start()
        except OSError as e:
            return False, explain_failure(e, root)
        try:
            reply = w.call("read_bytes", "f")
        finally:
            w.stop()
        if reply != ("ok", b"x"):
            return False, "an overlay mounted but did not show its lower layer's file"
        if root:
            return True, "running as root: mount(2) in a private mount namespace"
        return True, "unprivileged: an overlay mount (userxattr) in a user namespace of a helper process"
    except WorkerGone as e:
        return False, f"the helper process failed: {e}"
    finally:
        remove_tree(tmp)


def remove_tree(path: str) -> None:
    """rm -rf that also gets through the kernel's mode-000 ``work/work`` directories."""
    def retry(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=retry)
            else:
                func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry)


def explain_failure(e: OSError, root: bool) -> str:
    """Plain words for why the probe's helper could not mount."""
    from .capabilities import cap_sys_admin, seccomp_mode, userns_refusal, userns_status
    stage = getattr(e, "stage", "mount")
    code = errno.errorcode.get(e.errno, str(e.errno))
    if stage == "namespace":
        if not root:
            ok, why = userns_status()
            if not ok:
                return why
            return userns_refusal(e.errno)
        if not cap_sys_admin():
            return "running as root but without CAP_SYS_ADMIN (a container without privileges?)"
        if seccomp_mode():
            return f"unshare(CLONE_NEWNS) was refused ({code}): a seccomp filter (container runtime) forbids it"
        return f"could not create a private mount namespace ({code}): {e.strerror}"
    if stage == "mount":
        if e.errno == errno.EPERM and not root:
            return ("this kernel does not allow overlay mounts in a user namespace (Linux 5.11 or later is "
                    f"needed; this is {os.uname().release})")
        if e.errno == errno.EPERM:
            return "mount(2) was refused (EPERM): no CAP_SYS_ADMIN, or a security module forbids it"
        return f"the overlay mount failed ({code}): {e.strerror}"
    return f"{stage} failed ({code}): {e.strerror}"
