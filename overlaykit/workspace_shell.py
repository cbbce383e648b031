"""The seed's shell commands (``echo hi > merged/new.txt``, ``ls -la upper/``) against a lesson workspace.

A lesson workspace holds ``lower/ upper/ work/ merged/``.  `run` executes a shell script whose paths
name those folders, the way the seed types them in a terminal:

* ``merged/...`` goes through the overlay (an `Overlay`): copy-up and whiteouts happen as on a real
  mount, and the engine's trace records them;
* ``upper/...`` and ``lower/...`` are the layer folders on disk, reached directly (that is how a learner
  builds a layer by hand, e.g. in the graded "write only to upper/" exercise);
* two extra commands write the overlay's markers by hand: ``ov_whiteout upper/x`` (a whiteout of ``x``)
  and ``ov_opaque upper/d`` (mark ``d`` opaque), in the encoding the overlay reads.

``ls -l`` prints a stable long form (type and mode, size or device numbers, name; no link counts,
owners or dates), so a stored notebook output is the same on every machine and on both backends.

Example::

    >>> from overlaykit import course, workspace_shell
    >>> ov = course.lesson_overlay(course.workspace("demo", "/tmp/ok"), backend="sim").mount()
    >>> print(workspace_shell.run(ov, "rm merged/in_lower.txt; ls -la upper/").output, end="")
    -rw-r--r--     29 in_both.txt
    c---------    0,0 in_lower.txt   (whiteout)
    -rw-r--r--     17 in_upper.txt

The same script runs in a real shell on the kernel backend (`overlaykit.magic`); this module is the
simulated side, built on `overlaykit.shell.Shell`.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat as st
from dataclasses import dataclass
from pathlib import Path

from .base import Stat
from .ondisk import Encoding, default_xattr_ns, kind_of
from .shell import Shell, _opts

#: The folder names a script may use, as the first component of a path.
FOLDERS = ("merged", "upper", "lower", "work")


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class HostDir:
    """A plain folder on disk with the `Overlay` methods the simulated shell calls (paths relative to it).

    Paths never leave the folder: ``..`` is folded away first and symlinks are not followed on the way.
    """

    def __init__(self, root: str | os.PathLike, *, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only

    def _p(self, p: str, write: bool = False) -> str:
        rel = posixpath.normpath("/" + str(p)).lstrip("/")
        if write and self.read_only:
            raise _err(errno.EROFS, p)
        return str(self.root / rel) if rel not in ("", ".") else str(self.root)

    def read_bytes(self, p):
        with open(self._p(p), "rb") as f:
            return f.read()

    def write_bytes(self, p, data: bytes, *, append: bool = False):
        with open(self._p(p, True), "ab" if append else "wb") as f:
            f.write(data)

    def touch(self, p):
        Path(self._p(p, True)).touch()

    def remove(self, p):
        os.unlink(self._p(p, True))

    def mkdir(self, p, mode: int = 0o777, *, parents: bool = False, exist_ok: bool = False):
        if parents:
            os.makedirs(self._p(p, True), mode, exist_ok=True)
        else:
            os.mkdir(self._p(p, True), mode)

    def rmdir(self, p):
        os.rmdir(self._p(p, True))

    def rename(self, src, dst):
        os.rename(self._p(src, True), self._p(dst, True))

    def chmod(self, p, mode: int):
        os.chmod(self._p(p, True), mode, follow_symlinks=True)

    def chown(self, p, uid: int, gid: int):
        os.chown(self._p(p, True), uid, gid, follow_symlinks=False)

    def utime(self, p, times=None):
        os.utime(self._p(p, True), times)

    def symlink(self, target: str, p):
        os.symlink(target, self._p(p, True))

    def link(self, src, dst):
        os.link(self._p(src, True), self._p(dst, True))

    def listdir(self, p="."):
        return sorted(os.listdir(self._p(p)))

    def stat(self, p, *, follow_symlinks: bool = True) -> Stat:
        path = self._p(p)
        s = os.stat(path, follow_symlinks=follow_symlinks)
        return Stat.from_os(s, os.readlink(path) if st.S_ISLNK(s.st_mode) else None)

    def lstat_raw(self, p) -> os.stat_result:
        return os.lstat(self._p(p))

    def exists(self, p) -> bool:
        return os.path.exists(self._p(p))


class WorkspaceFS:
    """One filesystem for the shell: ``/merged`` is the overlay, ``/upper``, ``/lower``, ``/work`` the folders.

    ``lower`` is read-only (EROFS), as a lower layer is for the overlay; ``writable`` names the folders a
    script may change (the graded "write only to upper/" exercise allows only ``upper``).
    """

    def __init__(self, ov=None, folders: dict[str, str | os.PathLike] | None = None, *,
                 writable=("merged", "upper", "work")):
        self.ov = ov
        self.parts: dict[str, object] = {}
        folders = dict(folders or {})
        if ov is not None:
            folders.setdefault("upper", ov.upper)
            folders.setdefault("work", ov.work)
            if len(ov.lowers) == 1:
                folders.setdefault("lower", ov.lowers[0])
            else:
                for k, low in enumerate(ov.lowers):
                    folders.setdefault(f"lower{k}", low)
            self.parts["merged"] = ov
        for name, path in folders.items():
            if path is not None:
                self.parts[name] = HostDir(path, read_only=name not in writable)
        if "merged" in self.parts and "merged" not in writable:
            self.parts["merged"] = _ReadOnly(ov)

    def _split(self, p) -> tuple[object | None, str]:
        norm = posixpath.normpath("/" + str(p)).lstrip("/")
        head, _, rest = norm.partition("/")
        if head in ("", "."):
            return None, ""
        if head not in self.parts:
            raise _err(errno.ENOENT, str(p))
        return self.parts[head], rest or "."

    def __getattr__(self, op):
        if op not in {"read_bytes", "write_bytes", "touch", "remove", "mkdir", "rmdir", "chmod", "chown",
                      "utime", "symlink", "link", "truncate", "exists"}:
            raise AttributeError(op)

        def call(*args, **kw):
            if op == "symlink":  # symlink(target, path): the target is text, not a path of ours
                part, rel = self._split(args[1])
                return part.symlink(args[0], rel)
            part, rel = self._split(args[0])
            if part is None:
                if op == "exists":
                    return True
                raise _err(errno.EACCES if op != "read_bytes" else errno.EISDIR, "/")
            return getattr(part, op)(rel, *args[1:], **kw)
        return call

    def rename(self, src, dst):
        a, ra = self._split(src)
        b, rb = self._split(dst)
        if a is not b or a is None:
            raise _err(errno.EXDEV, str(src))  # different folders: mv copies, as across filesystems
        a.rename(ra, rb)

    def link(self, src, dst):
        a, ra = self._split(src)
        b, rb = self._split(dst)
        if a is not b or a is None:
            raise _err(errno.EXDEV, str(src))
        a.link(ra, rb)

    def listdir(self, p="."):
        part, rel = self._split(p)
        return sorted(self.parts) if part is None else part.listdir(rel)

    def stat(self, p, *, follow_symlinks: bool = True) -> Stat:
        part, rel = self._split(p)
        if part is None:
            return Stat("dir", 0o755, 0, 2, 0, 0, 0)
        return part.stat(rel, follow_symlinks=follow_symlinks)

    # -- for ls -l and the marker commands ---------------------------------------------------------
    def host(self, p) -> tuple[HostDir | None, str]:
        part, rel = self._split(p)
        return (part, rel) if isinstance(part, HostDir) else (None, rel)

    def encoding(self) -> Encoding:
        if self.ov is not None and getattr(self.ov, "encoding", None) is not None:
            return self.ov.encoding
        return Encoding("kernel", default_xattr_ns())


class _ReadOnly:
    def __init__(self, ov):
        self.ov = ov

    def __getattr__(self, op):
        if op in ("read_bytes", "listdir", "stat", "exists"):
            return getattr(self.ov, op)

        def refuse(p, *a, **k):
            raise _err(errno.EROFS, str(p))
        return refuse


# --------------------------------------------------------------------------------------------------
# a stable ls -l

def ls_line(name: str, mode: int, size, *, kind: str | None = None, extra: str = "") -> str:
    """One line of the stable ``ls -l``: ``-rw-r--r--     17 in_upper.txt`` (a directory gets a ``/``)."""
    kind = kind or kind_of(mode)
    return f"{st.filemode(mode)} {size:>6} {name}{'/' if kind == 'dir' else ''}{extra}"


def long_listing(fs: WorkspaceFS, p: str, shown: str, *, all_names: bool, directory: bool = False) -> list[str]:
    """``ls -l[a]`` of one operand: its entries (or the operand itself with ``-d`` or for a non-directory)."""
    from .course import _ls_line
    host, rel = fs.host(p)

    def one(q: str, label: str) -> str:
        if host is not None:
            return _ls_line(Path(host._p(q)), label, os.lstat(host._p(q)))
        s = fs.stat(q, follow_symlinks=False)
        fmt = {"file": st.S_IFREG, "dir": st.S_IFDIR, "symlink": st.S_IFLNK, "char": st.S_IFCHR,
               "block": st.S_IFBLK, "fifo": st.S_IFIFO, "socket": st.S_IFSOCK}.get(s.kind, 0)
        size = "-" if s.kind == "dir" else str(s.size)
        return ls_line(label, fmt | s.mode, size, kind=s.kind,
                       extra=f" -> {s.target}" if s.kind == "symlink" else "")

    s = fs.stat(p, follow_symlinks=False)
    if directory or s.kind != "dir":
        return [one(rel if host is not None else p, shown)]
    names = fs.listdir(p)
    if not all_names:
        names = [n for n in names if not n.startswith(".")]
    lines = []
    for n in names:
        q = posixpath.join(rel if host is not None else p, n)
        lines.append(one(q, n))
    return lines


class WorkspaceShell(Shell):
    """`overlaykit.shell.Shell` over a `WorkspaceFS`, with a stable ``ls -l`` and ``ov_whiteout``/``ov_opaque``."""

    def __init__(self, fs: WorkspaceFS, **kw):
        kw.setdefault("require_programs", False)
        super().__init__(fs, **kw)

    def _p_ls(self, argv, stdin):
        opts, args = _opts(argv[1:], with_value="")
        if "l" not in opts:
            return super()._p_ls(argv, stdin)
        out, status = [], 0
        args = args or ["."]
        for a in args:
            p = self.path(a)
            if not self._lexists(p):
                self._err(f"ls: cannot access '{a}': No such file or directory")
                status = 2
                continue
            try:
                lines = long_listing(self.fs, p, a, all_names="a" in opts or "A" in opts, directory="d" in opts)
            except OSError as e:
                self._err(f"ls: cannot open '{a}': {e.strerror}")
                status = 2
                continue
            if len(args) > 1 and self._isdir(p) and "d" not in opts:
                lines = [f"{a.rstrip('/')}:"] + lines + [""]
            out += lines
        while out and out[-1] == "":
            out.pop()
        return status, ("\n".join(out) + "\n").encode() if out else b""

    def _marker(self, argv, what: str):
        status = 0
        for a in _opts(argv[1:])[1]:
            host, rel = self.fs.host(self.path(a))
            top = posixpath.normpath("/" + self.path(a)).lstrip("/").split("/")[0]
            try:
                if host is None or top == "merged":
                    raise _err(errno.EPERM, a)
                if host.read_only:
                    raise _err(errno.EROFS, a)
                enc = self.fs.encoding()
                full = host._p(rel)
                if what == "whiteout":
                    enc.make_whiteout(os.path.dirname(full), os.path.basename(full))
                else:
                    enc.set_opaque(full)
            except OSError as e:
                where = "only folders on disk (upper/) take markers" if e.errno == errno.EPERM else e.strerror
                self._err(f"ov_{what}: {a}: {where}")
                status = 1
        return status, b""

    def _p_ov_whiteout(self, argv, stdin):
        return self._marker(argv, "whiteout")

    def _p_ov_opaque(self, argv, stdin):
        return self._marker(argv, "opaque")


@dataclass(frozen=True)
class RunResult:
    """What a script printed (stdout and stderr, interleaved as a terminal shows them) and its exit status."""

    status: int
    output: str


def run(ov, script: str, *, folders: dict | None = None, writable=("merged", "upper", "work")) -> RunResult:
    """Run ``script`` with the simulated shell; ``merged/`` goes through the mounted ``ov``."""
    fs = WorkspaceFS(ov, folders, writable=writable)
    res = WorkspaceShell(fs).run(script)
    return RunResult(res.status, res.output)


__all__ = ["run", "RunResult", "WorkspaceFS", "WorkspaceShell", "HostDir", "ls_line", "long_listing", "FOLDERS"]
