"""Which backends this machine allows, and for each one it does not, why."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str


def _overlay_in_kernel() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


@lru_cache(maxsize=None)
def capabilities() -> dict[str, BackendInfo]:
    """``{"sim": BackendInfo, "kernel": BackendInfo}``; the kernel probe mounts nothing outside a private scratch."""
    sim = BackendInfo("sim", True, "pure Python: works everywhere, no privileges needed")
    if not _overlay_in_kernel():
        kernel = BackendInfo("kernel", False, "this kernel has no overlay filesystem (not in /proc/filesystems)")
    else:
        try:
            from .kernel import probe
            ok, reason = probe()
        except ImportError:
            ok, reason = False, "the kernel backend is not installed"
        kernel = BackendInfo("kernel", ok, reason)
    return {"sim": sim, "kernel": kernel}


def dot_available() -> tuple[bool, str]:
    path = shutil.which("dot")
    if path:
        return True, f"graphviz 'dot' found at {os.path.basename(path)}"
    return False, "graphviz's 'dot' program is missing: diagrams fall back to text (apt-get install graphviz)"
