"""What this kernel does with the overlay's mount options, learned by really mounting (`try_mount`,
`kernel_options`), and what a real mount's /proc/self/mountinfo line says it does (`effective`).

Each mount happens in a child process of its own, in a private mount namespace (as root) or a user +
mount namespace with ``userxattr`` (as anyone else, as the kernel backend does), on fresh layer
directories that are removed afterwards: nothing is ever mounted where another process could see it.
Independent of the kernel backend on purpose, so it can judge both the simulator and that backend.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

from .options import VALUES, redirect_always_follow

#: What `kernel_options` tries, one mount each: the value that turns each option on.
PROBES = {"redirect_dir": "on", "index": "on", "metacopy": "on", "xino": "on", "nfs_export": "on"}

# The child: unshare, (map ids), mount(2) with the legacy option string, report errno and the super
# options of its mountinfo line as JSON on stdout.
_CHILD = r"""
import ctypes, json, os, sys
a = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
def out(**kw):
    sys.stdout.write(json.dumps(kw)); sys.exit(0)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x00020000 | (0x10000000 if a["userns"] else 0)) != 0:
    out(stage="namespace", errno=ctypes.get_errno())
if a["userns"]:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE
    out(stage="namespace", errno=ctypes.get_errno())
target = a["target"]
if libc.mount(b"overlay", target.encode(), b"overlay", 0, a["data"].encode()) != 0:
    out(stage="mount", errno=ctypes.get_errno())
line = None
with open("/proc/self/mountinfo") as f:
    for x in f:
        left, _, right = x.partition(" - ")
        if left.split()[4] == target and right.split()[0] == "overlay":
            line = right.split()[2]
out(stage="mount", errno=0, super_options=line)
"""


@dataclass(frozen=True)
class MountResult:
    """One real mount: ``errno`` 0 if it mounted; ``super_options`` is its mountinfo's last field."""

    errno: int
    stage: str = "mount"
    super_options: str | None = None

    @property
    def ok(self) -> bool:
        return self.errno == 0

    def effective(self) -> dict:
        return effective(self.super_options or "")


def try_mount(lowers, upper=None, work=None, options: str = "", *, userns: bool | None = None,
              timeout: float = 30) -> MountResult:
    """Mount these layers with ``options`` (the kernel's spelling, passed as written) in a throw-away
    namespace and unmount at once; as non-root (or ``userns=True``) ``userxattr`` is added, as the
    kernel backend adds it.  The layer directories must exist; `MountResult` says what happened."""
    userns = os.geteuid() != 0 if userns is None else userns
    parts = ["lowerdir=" + ":".join(os.fspath(x) for x in lowers)]
    if upper is not None:
        parts += [f"upperdir={os.fspath(upper)}", f"workdir={os.fspath(work)}"]
    parts += [x for x in options.split(",") if x]
    if userns:
        parts.append("userxattr")
    with tempfile.TemporaryDirectory(prefix="overlaykit-mnt-") as target:
        args = json.dumps({"userns": userns, "target": target, "data": ",".join(parts)})
        proc = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"the mount probe's child failed: {proc.stderr.strip()[-300:]}")
    r = json.loads(proc.stdout)
    return MountResult(r["errno"], r["stage"], r.get("super_options"))


def _param(name: str) -> bool:
    try:
        with open(f"/sys/module/overlay/parameters/{name}") as f:
            return f.read().strip() in ("Y", "y", "1")
    except OSError:
        return False


def defaults() -> dict:
    """The mount's effective options where mountinfo shows none: the module's defaults
    (fs/overlayfs/params.c prints an option only where it differs from them)."""
    redirect = "on" if _param("redirect_dir") else ("follow" if redirect_always_follow() else "nofollow")
    return {"redirect_dir": redirect, "index": _param("index"), "metacopy": _param("metacopy"),
            "xino": "auto" if _param("xino_auto") else "off", "nfs_export": _param("nfs_export"),
            "userxattr": False}


def effective(super_options: str) -> dict:
    """``"rw,lowerdir=..,redirect_dir=on,index=on"`` -> every option's effective value (module defaults
    filled in); booleans for index/metacopy/nfs_export/userxattr."""
    out = defaults()
    for item in super_options.split(","):
        key, sep, value = item.partition("=")
        if key in ("index", "metacopy", "nfs_export"):
            out[key] = value == "on"
        elif key in ("redirect_dir", "xino"):
            out[key] = value
        elif key == "userxattr":
            out[key] = True
    return out


@dataclass(frozen=True)
class OptionSupport:
    """What this kernel does with ``name=value`` on a small overlay (one filesystem, with an upper)."""

    name: str
    value: str
    mounts: bool | None  # mount(2) accepts it (None: could not be tried here, see `note`)
    in_effect: bool  # ... and mountinfo shows it took effect (else the kernel fell back, see `note`)
    note: str

    def __str__(self) -> str:
        if self.mounts is None:
            return f"{self.name}={self.value}: unknown ({self.note})"
        if not self.mounts:
            return f"{self.name}={self.value}: refused by mount(2) ({self.note})"
        return f"{self.name}={self.value}: " + ("works" if self.in_effect else f"mounts, but {self.note}")


def _probe(name: str, value: str, userns: bool) -> OptionSupport:
    from .kernel import remove_tree
    tmp = tempfile.mkdtemp(prefix="overlaykit-optprobe-")
    try:
        dirs = [os.path.join(tmp, d) for d in ("lower", "upper", "work")]
        for d in dirs:
            os.mkdir(d)
        r = try_mount([dirs[0]], dirs[1], dirs[2], f"{name}={value}", userns=userns)
    finally:
        remove_tree(tmp)
    if not r.ok:
        return OptionSupport(name, value, False, False, f"{os.strerror(r.errno)}"
                             + (" with userxattr, as an unprivileged mount needs" if userns else ""))
    got = r.effective()[name]
    want = value == "on" if isinstance(got, bool) else value
    if got == want:
        return OptionSupport(name, value, True, True, "")
    if name == "xino":
        why = "all layers on one filesystem: xino has nothing to do (the kernel turns it off)"
    elif userns:
        why = f"with userxattr the kernel falls back to {name}={'on' if got is True else 'off' if got is False else got}"
    else:
        why = f"the kernel fell back to {name}={'on' if got is True else 'off' if got is False else got}"
    return OptionSupport(name, value, True, False, why)


@lru_cache(maxsize=None)
def kernel_options(userns: bool | None = None) -> dict[str, OptionSupport]:
    """For each option (turned on), does a real overlay mount accept it here, and does it take effect?
    Mounts a tiny overlay per option in a private namespace (root) or a user namespace (userxattr);
    cached for the process.  Raises nothing: an unusable kernel gives ``mounts=False`` with the reason."""
    from .capabilities import capabilities
    userns = os.geteuid() != 0 if userns is None else userns
    kernel = capabilities()["kernel"]
    if not kernel.available:
        return {n: OptionSupport(n, v, None, False, f"no kernel overlay here: {kernel.reason}")
                for n, v in PROBES.items()}
    out = {}
    for name, value in PROBES.items():
        try:
            out[name] = _probe(name, value, userns)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            out[name] = OptionSupport(name, value, None, False, f"the probe failed: {e}")
    return out


assert set(PROBES) == set(VALUES)
