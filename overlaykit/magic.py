"""``%%overlay``: type the seed's shell commands in a notebook cell, against a lesson's overlay.

Load it with ``%load_ext overlaykit``, then::

    %%overlay ov
    echo hi > merged/new.txt
    rm merged/in_lower.txt
    ls -la upper/

``ov`` names an `Overlay` (or an `images.Container`) in the notebook; without a name the cell uses the
overlay of the last workspace made by `overlaykit.course` (`course.lesson_overlay`, else a new overlay
over ``lower/ upper/ work/ merged/`` of the last `course.workspace`).  An overlay that is not mounted
is mounted for the cell and unmounted after it.

Paths are relative to the workspace folder: ``merged/`` is the overlay, ``upper/`` and ``lower/`` the
layer folders on disk (lower/ is read-only, as for the kernel).  On the **sim** backend the commands run
in the simulated shell (`overlaykit.workspace_shell`), so every ``merged/`` access goes through the
engine; on the **kernel** backend a real ``/bin/sh`` runs inside the helper's mount namespace (joined
with setns(2), as ``nsenter -t PID -m`` does), where ``merged/`` is the real overlay mount and lower/ is
bound read-only.  Either way the cell prints each command
(``$ cmd``) and what it printed, then what changed in upper/, then shows the stack diagram.

``ls -l`` prints a stable form on both backends (type and mode, size or device, name: no link count,
owner or date; on the kernel backend ``ls``, ``ov_whiteout`` and ``ov_opaque`` are small wrappers that
call this package), so the output of a cell is the same on both backends and nbval can compare it.
Error messages of failing commands may differ (the real coreutils word them themselves).

The same from plain Python::

    >>> from overlaykit import course, magic
    >>> ov = course.lesson_overlay(course.workspace("m", "/tmp/ok"), backend="sim")
    >>> print(magic.run_cell(ov, "rm merged/in_lower.txt\\nls -la upper/").text)
    $ rm merged/in_lower.txt
    $ ls -la upper/
    -rw-r--r--     29 in_both.txt
    c---------    0,0 in_lower.txt   (whiteout)
    -rw-r--r--     17 in_upper.txt
    <BLANKLINE>
    upper/ after the cell:
        whiteout      in_lower.txt
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from .workspace_shell import WorkspaceFS, WorkspaceShell


@dataclass
class CellResult:
    """What ``%%overlay`` shows: the transcript, the upper/ changes, and the overlay (for the diagram)."""

    transcript: str
    changes: list[str]
    status: int
    ov: object

    @property
    def text(self) -> str:
        body = "\n".join("    " + c for c in self.changes) if self.changes else "    (nothing changed)"
        upper = self.ov.upper.name if getattr(self.ov, "upper", None) is not None else "upper"
        return f"{self.transcript.rstrip()}\n\n{upper}/ after the cell:\n{body}"


def split_commands(cell: str) -> list[str]:
    """The cell's commands: one per line (a trailing backslash continues it); blank lines and # comments go."""
    out, cur = [], ""
    for line in cell.splitlines():
        if cur:
            cur += "\n" + line
        else:
            cur = line
        if cur.rstrip().endswith("\\"):
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def workspace_of(ov) -> Path:
    """The folder holding the overlay's upper/ (and usually lower/, work/, merged/)."""
    if ov.upper is not None:
        return ov.upper.parent
    return ov.lowers[0].parent


def _folders(ov) -> dict[str, Path]:
    """The names a cell may use, from the overlay's own folders (named as in the workspace)."""
    ws = workspace_of(ov)
    folders: dict[str, Path] = {}
    for p in [ov.upper, ov.work, *ov.lowers]:
        if p is not None and p.parent == ws:
            folders.setdefault(p.name, p)
    if ov.upper is not None:
        folders.setdefault("upper", ov.upper)
    if len(ov.lowers) == 1:
        folders.setdefault("lower", ov.lowers[0])
    return folders


def _changes(ov) -> dict[str, str]:
    return {c.path: str(c) for c in ov.upper_changes()}


def run_cell(ov, cell: str) -> CellResult:
    """Run the cell's commands against ``ov`` (mounted for the cell if it is not) and collect what to show."""
    mounted_here = not ov.mounted
    if mounted_here:
        ov.mount()
    try:
        before = _changes(ov)
        commands = split_commands(cell)
        if ov.backend == "kernel":
            transcript, status = _run_real(ov, commands)
            ov._layers.invalidate_upper()  # the real shell changed upper/ behind the engine's back
        else:
            transcript, status = _run_sim(ov, commands)
        after = _changes(ov)
        changes = [after[p] for p in sorted(after) if before.get(p) != after[p]]
        changes += [f"{'gone':<13} {p}" for p in sorted(before) if p not in after]
        return CellResult(transcript, changes, status, ov)
    finally:
        if mounted_here:
            ov.unmount()


def _run_sim(ov, commands: list[str]) -> tuple[str, int]:
    folders = {k: v for k, v in _folders(ov).items()}
    fs = WorkspaceFS(ov, folders, writable=("merged", "upper", "work"))
    shell = WorkspaceShell(fs)
    out = []
    for cmd in commands:
        out.append(f"$ {cmd}\n")
        res = shell.run(cmd)
        out.append(res.output)
        ov._layers.invalidate_upper()  # the command may have written upper/ directly, past the engine
    return "".join(out), shell.status


# -- the kernel backend: a real shell in the helper's mount namespace ---------------------------------

_WRAPPER = """#!/bin/sh
exec {python} -m overlaykit.magic {name} "$@"
"""


def _run_real(ov, commands: list[str]) -> tuple[str, int]:
    """One real ``/bin/sh`` in the helper's mount namespace, cwd the workspace; prints ``$ cmd`` first."""
    worker = getattr(ov._impl, "worker", None)
    if worker is None or worker.pid is None:
        raise RuntimeError("the kernel overlay has no helper process to enter")
    ws = workspace_of(ov)
    if ov.merged is None or ov.merged != ws / "merged":
        raise RuntimeError("%%overlay on the kernel backend needs the overlay mounted on <workspace>/merged "
                           "(course.lesson_overlay does that)")
    bindir = Path(tempfile.mkdtemp(prefix="overlaykit-magic-"))
    try:
        for name in ("ls", "ov_whiteout", "ov_opaque"):
            p = bindir / name
            p.write_text(_WRAPPER.format(python=shlex.quote(sys.executable), name=name))
            p.chmod(0o755)
        bindir.chmod(0o755)
        script = ["exec 2>&1", "status=0"]
        for cmd in commands:
            script.append(f"printf '%s\\n' {shlex.quote('$ ' + cmd)}")
            script.append(f"{cmd}\nstatus=$?")
        script.append("exit $status")
        lowers = [str(p) for n, p in _folders(ov).items() if n.startswith("lower")]
        enter = _enter(worker.pid, worker.userns, str(ws), lowers)
        env = dict(os.environ)
        env["PATH"] = f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        pkg_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["OVERLAYKIT_WORKSPACE"] = str(ws)
        env["OVERLAYKIT_XATTR_NS"] = ov.encoding.xattr_ns
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.run(["/bin/sh", "-c", "\n".join(script)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=120, preexec_fn=enter)
        except subprocess.SubprocessError as e:
            raise RuntimeError(f"could not enter the overlay helper's namespace: {e}") from None
        return proc.stdout.decode("utf-8", "replace"), proc.returncode
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


def _enter(pid: int, userns: bool, ws: str, lowers: list[str]):
    """The child's set-up before it runs /bin/sh (what ``nsenter -t PID [-U] -m`` does), as a preexec_fn.

    It joins the helper's user namespace (unprivileged case) and mount namespace, where ``merged/`` is
    the real overlay mount, and bind-mounts each lower folder on itself read-only there, once (the sim
    shell refuses writes to lower/ too; the bind lives in that private namespace and ends with the
    helper).  It runs before exec, while it still has the capabilities setns(2) gave it.
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newuser, clone_newns = 0x10000000, 0x00020000
    ms_rdonly, ms_remount, ms_bind = 1, 32, 4096

    def check(ret, what):
        if ret != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def setup():
        wanted = ([("user", clone_newuser)] if userns else []) + [("mnt", clone_newns)]
        fds = [(os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY), flag) for ns, flag in wanted]
        for fd, flag in fds:
            check(libc.setns(fd, flag), "setns")
            os.close(fd)
        os.chdir(ws)
        with open("/proc/self/mountinfo") as f:
            mounted = {line.split()[4] for line in f}
        for path in lowers:
            if path in mounted:
                continue
            # a remount in a user namespace must keep the mount's "locked" flags (mount_namespaces(7))
            flags = os.statvfs(path).f_flag
            keep = flags & (2 | 4 | 8 | 1024 | 2048) | ((1 << 21) if flags & 4096 else 0)
            target = path.encode()
            check(libc.mount(target, target, None, ms_bind, None), "bind mount")
            check(libc.mount(None, target, None, ms_bind | ms_remount | ms_rdonly | keep, None), "remount")
    return setup


def _wrapper_main(argv: list[str]) -> int:
    """``ls``/``ov_whiteout``/``ov_opaque`` inside the real shell: the workspace's folders, read from disk."""
    from .ondisk import Encoding
    ws = Path(os.environ.get("OVERLAYKIT_WORKSPACE") or os.getcwd())
    folders = {p.name: p for p in ws.iterdir() if p.is_dir()}
    enc = Encoding("kernel", os.environ.get("OVERLAYKIT_XATTR_NS") or "trusted")

    class _FS(WorkspaceFS):
        def encoding(self):
            return enc

    fs = _FS(None, folders, writable=tuple(n for n in folders if not n.startswith("lower")))
    rel = os.path.relpath(os.getcwd(), ws)
    shell = WorkspaceShell(fs, cwd="/" if rel == "." else "/" + rel)
    res = shell.run_argv(argv)
    sys.stdout.write(res.output)
    return res.status


# -- IPython ------------------------------------------------------------------------------------------

def _find_overlay(name: str, user_ns: dict):
    from .engine import Overlay
    if name:
        if name not in user_ns:
            raise NameError(f"%%overlay {name}: there is no {name} in this notebook yet (run the cell that makes it)")
        obj = user_ns[name]
        obj = getattr(obj, "overlay", obj)  # an images.Container
        if not isinstance(obj, Overlay):
            raise TypeError(f"%%overlay {name}: {name} is a {type(obj).__name__}, not an Overlay")
        return obj
    from . import course
    last = getattr(course, "_last", {})
    ref = last.get("overlay")
    ov = ref() if ref is not None else None
    ws = last.get("workspace")
    if ov is not None and (ws is None or workspace_of(ov) == Path(os.path.abspath(ws))):
        return ov
    if ws is None:
        raise LookupError("%%overlay: no lesson workspace yet: make one with overlaykit.course, or name an "
                          "overlay (%%overlay ov)")
    ws = Path(os.path.abspath(ws))
    d = {n: ws / n for n in ("lower", "upper", "work", "merged")}
    for n, p in d.items():
        if not p.is_dir():
            raise LookupError(f"%%overlay: the last workspace ({ws.name}) has no {n}/ folder")
    ov = Overlay([d["lower"]], d["upper"], d["work"], merged=d["merged"])
    user_ns["_overlay_of_last_workspace"] = ov  # the notebook keeps it (the course remembers it weakly)
    course._last["overlay"] = weakref.ref(ov)
    return ov


def overlay_magic(line: str, cell: str, user_ns: dict) -> CellResult | None:
    """The body of ``%%overlay``: run, print the transcript and changes, display the stack diagram."""
    from IPython.display import display
    from .diagrams import stack
    try:
        ov = _find_overlay(line.strip(), user_ns)
        res = run_cell(ov, cell)
    except Exception as e:  # noqa: BLE001 - a sentence, not a traceback
        print(f"%%overlay: {e}")
        return None
    print(res.text)
    mounted_here = not ov.mounted
    if mounted_here:
        ov.mount()
    try:
        display(stack(ov))
    finally:
        if mounted_here:
            ov.unmount()
    return None


def load_ipython_extension(ipython) -> None:
    """Register ``%%overlay`` (called by ``%load_ext overlaykit``)."""
    def overlay(line, cell):
        overlay_magic(line, cell, ipython.user_ns)

    overlay.__doc__ = __doc__
    ipython.register_magic_function(overlay, magic_kind="cell", magic_name="overlay")


__all__ = ["run_cell", "CellResult", "split_commands", "load_ipython_extension", "overlay_magic"]


if __name__ == "__main__":
    sys.exit(_wrapper_main(sys.argv[1:]))
