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
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from .engine import Backend, Stat
from .ondisk import errno_error

#: The directory that holds the ``overlaykit`` package, put on the helper's PYTHONPATH.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
#: Options that make the kernel behave as the lesson (and the simulator) describes, whatever the
#: distribution's defaults: directory renames give EXDEV, copy-up breaks hard links, data is copied.
DEFAULT_OPTIONS = (("redirect_dir", "off"), ("index", "off"), ("metacopy", "off"))

_live: dict[int, "Worker"] = {}
_live_lock = threading.Lock()
_handlers_installed = False


class WorkerGone(RuntimeError):
    """The helper process ended (it was killed, or the overlay was unmounted)."""


class Worker:
    """One helper process holding one overlay mount; `call` runs an operation in it."""

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
        self._lock = threading.Lock()

    def start(self) -> "Worker":
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "overlaykit._nsworker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        try:
            self._send(self.cfg)
            reply = self._recv()
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

    def call(self, op: str, *args):
        """Run ``op`` in the helper: its result, or ``("err", errno)`` for the caller to turn into OSError."""
        with self._lock:
            if self.proc is None:
                raise WorkerGone("the overlay is not mounted any more")
            try:
                self._send((op, args))
                reply = self._recv()
            except (BrokenPipeError, OSError):
                reply = None
            if reply is None:
                self._reap()
                raise WorkerGone("the overlay's helper process has ended, and the mount with it: mount again")
            return reply

    def stop(self) -> None:
        with _live_lock:
            _live.pop(id(self), None)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    self._send_to(proc, ("exit",))
                except OSError:
                    pass
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            proc.stdout.close()
            if self.scratch:  # the legacy mount's mount point: an empty directory out here
                try:
                    os.rmdir(self.scratch)
                except OSError:
                    pass

    def _reap(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            self.stop()

    # -- framing: 4-byte big-endian length + pickle ---------------------------------------------------
    def _send(self, obj) -> None:
        self._send_to(self.proc, obj)

    @staticmethod
    def _send_to(proc, obj) -> None:
        body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.write(struct.pack(">I", len(body)) + body)
        proc.stdin.flush()

    def _recv(self):
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        body = self.proc.stdout.read(n)
        if len(body) < n:
            return None
        return pickle.loads(body)


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


class KernelBackend(Backend):
    """`Backend` on a real overlay mount held by a helper process."""

    name = "kernel"
    #: Use the legacy mount(2) option string even where the new mount API exists (for tests).
    legacy_mount = False

    def __init__(self, ov):
        super().__init__([str(x) for x in ov.lowers], str(ov.upper) if ov.upper else None,
                         str(ov.work) if ov.work else None, ov.encoding)
        self.merged = str(ov.merged) if getattr(ov, "merged", None) else None
        self.worker: Worker | None = None

    def mount(self) -> None:
        if self.worker is None:
            self.worker = Worker(self.lowers, self.upper, self.work, self.merged, legacy=self.legacy_mount).start()

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
            raise WorkerGone("the overlay is not mounted")
        reply = self.worker.call(op, *args)
        if reply[0] == "err":
            raise errno_error(reply[1], *paths)
        return reply[1]

    def read_bytes(self, p): return self._do("read_bytes", (p,), p)
    def write_bytes(self, p, data, append): self._do("write_bytes", (p,), p, data, append)
    def touch(self, p): self._do("touch", (p,), p)
    def remove(self, p): self._do("remove", (p,), p)
    def mkdir(self, p, mode): self._do("mkdir", (p,), p, mode)
    def rmdir(self, p): self._do("rmdir", (p,), p)
    def rename(self, src, dst): self._do("rename", (src, dst), src, dst)
    def chmod(self, p, mode): self._do("chmod", (p,), p, mode)
    def chown(self, p, uid, gid): self._do("chown", (p,), p, uid, gid)
    def utime(self, p, times): self._do("utime", (p,), p, times)
    def setxattr(self, p, name, value): self._do("setxattr", (p,), p, name, value)
    def getxattr(self, p, name): return self._do("getxattr", (p,), p, name)
    def symlink(self, target, p): self._do("symlink", (p,), target, p)
    def link(self, src, dst): self._do("link", (src, dst), src, dst)
    def truncate(self, p, size): self._do("truncate", (p,), p, size)
    def listdir(self, p): return self._do("listdir", (p,), p)

    def stat(self, p, follow):
        s, target = self._do("stat", (p,), p, follow)
        return Stat.from_os(s, target)


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
