"""upper/ and work/ "in use": one live overlay at a time on them, as the kernel marks them (EBUSY).

Two live overlays on one upper/ each cache what they saw there; a change made through one is a change
behind the other's back (the kernel calls that undefined).  So, like ovl_inuse_trylock, a second
`Overlay.mount()` on an upper or work directory that a live overlay holds fails with EBUSY and names the
holder.  The mark is an ``flock`` on the directory itself: nothing is written into the layers, it works
between processes, and it vanishes with the process that holds it (a crashed notebook kernel included).
"""
from __future__ import annotations

import errno
import fcntl
import os

#: (st_dev, st_ino) of a held directory -> what holds it, for overlays of this process.
_HOLDERS: dict[tuple[int, int], str] = {}


class InUse:
    """The marks one mounted overlay holds; `release` (at unmount) drops them."""

    def __init__(self) -> None:
        self._held: list[tuple[int, tuple[int, int]]] = []

    def release(self) -> None:
        held, self._held = self._held, []
        for fd, key in held:
            _HOLDERS.pop(key, None)
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # also if a forked child still shares the fd
            finally:
                os.close(fd)


def claim(ov) -> InUse:
    """Mark ``ov.upper`` and ``ov.work`` in use, or raise OSError(EBUSY) naming who holds them."""
    marks = InUse()
    try:
        for role, path in (("upper", ov.upper), ("work", ov.work)):
            if path is None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue  # missing or unreadable: the mount itself reports that, with the kernel's errno
            s = os.fstat(fd)
            key = (s.st_dev, s.st_ino)
            if any(key == k for _, k in marks._held):  # upper == work: mount(2) refuses that (EINVAL)
                os.close(fd)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # a filesystem without flock: no mark, as before
                raise OSError(errno.EBUSY, f"{role}dir {path} is in use by another live overlay "
                              f"({_holder(key)}); unmount that one first (ov.unmount(), or restart the "
                              "notebook kernel that holds it) — two overlays on one upper/ would each "
                              "change it behind the other's back", str(path)) from None
            marks._held.append((fd, key))
            _HOLDERS[key] = (f"a {ov.backend} Overlay of this process (pid {os.getpid()}) over "
                             f"{', '.join(str(x) for x in ov.lowers)}"
                             + (f", merged at {ov.merged}" if ov.merged else ""))
    except BaseException:
        marks.release()
        raise
    return marks


def _holder(key: tuple[int, int]) -> str:
    """Who holds the flock on directory ``key``: this process's overlay, or a pid from /proc/locks."""
    if key in _HOLDERS:
        return _HOLDERS[key]
    dev, ino = key
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == want:
                    pid = fields[4]
                    return f"process {pid}{_cmdline(pid)}"
    except OSError:
        pass
    return "another process"


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return ""
    text = " ".join(" ".join(a.decode(errors="replace") for a in args if a).split())
    return f": {text[:120]}" if text else ""
