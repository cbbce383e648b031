"""Which backends this machine allows, and for each one it does not, why (`capabilities`, `doctor`);
which mount options each backend supports (`BackendInfo.options`, `kernel_options`, `SIM_OPTIONS`)."""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache

CAP_SYS_ADMIN = 21


#: The mount options the simulator implements beyond their defaults (redirect_dir=off, index=off,
#: metacopy=off, xino=off, nfs_export=off, which it has always implemented).  FLIP an entry to True when
#: the branch implementing that option merges (redirect -> redirect_dir, metacopy, index -> index):
#: `doctor`, `BackendInfo.options` and README's "Mount options" read it.
SIM_OPTIONS = {
    "redirect_dir": True,
    "index": True,
    "metacopy": True,
    "xino": True,
    "nfs_export": False,
}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str

    @property
    def options(self) -> dict:
        """Option name -> `OptionSupport` (turned on): for the kernel, what a real mount here does with it
        (probed once by mounting, see `kernel_options`); for the sim, whether it is implemented."""
        if self.name == "sim":
            return sim_options()
        from .kernelopts import kernel_options
        return kernel_options()


def sim_options() -> dict:
    """What the simulator does with each option turned on, for this user: the kernel's rules first
    (`Options.resolve`: as non-root the sim, like the kernel, uses user.* xattrs, i.e. userxattr), then
    whether it implements the option (`SIM_OPTIONS`) or behaves as with the default."""
    from .kernelopts import PROBES, OptionSupport
    from .ondisk import default_xattr_ns
    from .options import Options
    userxattr = default_xattr_ns() == "user"
    out = {}
    for name, value in PROBES.items():
        try:
            got = Options.parse({name: value}).resolve(userxattr=userxattr, has_upper=True, same_fs=True).value(name)
        except OSError as e:
            out[name] = OptionSupport(name, value, False, False, e.strerror)
            continue
        if got != value:
            why = ("all layers on one filesystem: xino has nothing to do" if name == "xino" else
                   f"with userxattr the kernel falls back to {name}={got}")
            out[name] = OptionSupport(name, value, True, False, why)
        else:
            out[name] = OptionSupport(name, value, SIM_OPTIONS[name], SIM_OPTIONS[name], "" if SIM_OPTIONS[name]
                                      else f"not modelled by the simulator: its mount refuses {name}={value} "
                                           f"(EOPNOTSUPP); use the kernel backend")
    return out


def kernel_options() -> dict:
    """What a real overlay mount does here with each option turned on (`overlaykit.kernelopts`)."""
    from .kernelopts import kernel_options as probe_options
    return probe_options()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def overlay_in_kernel() -> bool:
    """Is ``overlay`` in /proc/filesystems?  (A module not loaded yet is missing there; root can modprobe it.)"""
    text = _read("/proc/filesystems")
    return bool(text) and any(line.split()[-1] == "overlay" for line in text.splitlines() if line.strip())


def _status_field(name: str) -> str | None:
    text = _read("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def cap_sys_admin() -> bool:
    """Does this process hold CAP_SYS_ADMIN (CapEff in /proc/self/status)?"""
    eff = _status_field("CapEff")
    return eff is not None and bool(int(eff, 16) >> CAP_SYS_ADMIN & 1)


def seccomp_mode() -> int:
    """0 = no seccomp, 1 = strict, 2 = a filter (as container runtimes install)."""
    value = _status_field("Seccomp")
    return int(value) if value and value.isdigit() else 0


def userns_status() -> tuple[bool, str]:
    """May an unprivileged process create a user namespace, as far as the sysctls say?"""
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")  # Debian/Ubuntu patch
    if clone == "0":
        return False, ("unprivileged user namespaces are disabled (/proc/sys/kernel/unprivileged_userns_clone "
                       "is 0; root can set it to 1)")
    maxns = _read("/proc/sys/user/max_user_namespaces")
    if maxns == "0":
        return False, "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0)"
    apparmor = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if apparmor == "1":
        return False, ("AppArmor restricts unprivileged user namespaces "
                       "(/proc/sys/kernel/apparmor_restrict_unprivileged_userns is 1)")
    if maxns is None and clone is None:
        return False, "this kernel has no user namespaces (no /proc/sys/user/max_user_namespaces)"
    return True, f"user namespaces allowed (max_user_namespaces={maxns})"


def userns_refusal(code: int) -> str:
    """Why ``unshare(CLONE_NEWUSER)`` failed with errno ``code``, in plain words (see unshare(2)).

    The sysctls that `userns_status` reads describe only this namespace's own limits: a container or a
    sandbox (bubblewrap --disable-userns, Binder-like hosts) can forbid nested user namespaces while they
    all look permissive, so the errno is the only reliable witness.
    """
    name = errno.errorcode.get(code, f"errno {code}")
    if code in (errno.ENOSPC, getattr(errno, "EUSERS", -1)):
        return (f"could not create a user namespace ({name}): the user-namespace limit is reached, "
                "user.max_user_namespaces is 0 or exhausted here or in a namespace above this one (a container "
                "or sandbox that disables nested user namespaces does this; on your own machine root can raise "
                "it with sysctl user.max_user_namespaces=15000)")
    if code in (errno.EPERM, errno.EACCES):
        seccomp = " (this process runs under a seccomp filter)" if seccomp_mode() == 2 else ""
        return (f"could not create a user namespace ({name}): unprivileged user namespaces are forbidden here, "
                "by AppArmor (kernel.apparmor_restrict_unprivileged_userns=1), a seccomp filter"
                f"{seccomp}, or kernel.unprivileged_userns_clone=0")
    if code == errno.EINVAL:
        return (f"could not create a user namespace ({name}): this kernel does not support them "
                "(built without CONFIG_USER_NS), or the process was multi-threaded")
    if code == errno.ENOMEM:
        return f"could not create a user namespace ({name}): out of memory, or the pid-namespace limit is reached"
    return f"could not create a user namespace ({name}): {os.strerror(code)}"


def unshare_user_errno() -> int:
    """0 if a fresh process may create a user namespace, else unshare(2)'s errno (from a child process:
    a multi-threaded process such as a Jupyter kernel cannot unshare its user namespace)."""
    import subprocess
    import sys
    code = ("import ctypes,os,sys; libc=ctypes.CDLL(None,use_errno=True); "
            "sys.exit(0 if libc.unshare(0x10000000)==0 else ctypes.get_errno() or 255)")
    try:
        return subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode
    except (OSError, subprocess.SubprocessError):
        return errno.ENOSYS


@lru_cache(maxsize=None)
def capabilities() -> dict[str, BackendInfo]:
    """``{"sim": BackendInfo, "kernel": BackendInfo}``; the kernel probe mounts nothing outside a private scratch."""
    sim = BackendInfo("sim", True, "pure Python: works everywhere, no privileges needed")
    try:
        from .kernel import probe
        ok, reason = probe()
    except ImportError as e:
        ok, reason = False, f"the kernel backend could not be loaded ({e})"
    return {"sim": sim, "kernel": BackendInfo("kernel", ok, reason)}


def fuse_line() -> str:
    """doctor's line for overlaykit-fuse: can this user mount the simulator as a real filesystem, or why not."""
    from .fuse import fuse_unavailable
    why = fuse_unavailable()
    if why:
        return f"  {'overlaykit-fuse':<16} NOT available: {why}"
    return f"  {'overlaykit-fuse':<16} available: the simulator can be mounted as a FUSE filesystem"


def dot_available() -> tuple[bool, str]:
    path = shutil.which("dot")
    if path:
        return True, f"graphviz 'dot' found at {os.path.basename(path)}"
    return False, "graphviz's 'dot' program is missing: diagrams fall back to text (apt-get install graphviz)"


def _userns_fact(ns_ok: bool, ns_why: str) -> str:
    if not ns_ok:
        return f"no: {ns_why}"
    code = unshare_user_errno() if os.geteuid() != 0 else 0
    return ns_why if code == 0 else f"no: {userns_refusal(code)}"


def doctor() -> str:
    """A text report: each backend available or why not, the facts behind it, and graphviz."""
    caps = capabilities()
    lines = ["overlaykit doctor", ""]
    for info in caps.values():
        lines.append(f"  {info.name:<7} {'available' if info.available else 'NOT available'}: {info.reason}")
    root = os.geteuid() == 0
    ns_ok, ns_why = userns_status()
    facts = [
        ("running as root", "yes" if root else "no (the kernel backend then needs a user namespace)"),
        ("overlay in /proc/filesystems", "yes" if overlay_in_kernel() else "no"),
        ("CAP_SYS_ADMIN (CapEff)", "yes" if cap_sys_admin() else
         ("no: a container without privileges?" if root else "no (normal for a non-root user)")),
        ("seccomp", {0: "none", 1: "strict", 2: "filter (a container runtime's?)"}.get(seccomp_mode(), "?")),
        ("unprivileged user namespaces", _userns_fact(ns_ok, ns_why)),
        ("kernel", os.uname().release),
    ]
    lines += ["", "facts:"] + [f"  {k:<30} {v}" for k, v in facts]
    ok, why = dot_available()
    lines += ["", "diagrams:", f"  {'dot' :<7} {'available' if ok else 'NOT available'}: {why}"]
    lines += ["", "filesystem front:", fuse_line()]
    lines += ["", "mount options (each turned on: what the backend does with it):"]
    for info in caps.values():
        for name, support in info.options.items():
            lines.append(f"  {info.name:<7} {support}")
    return "\n".join(lines)
