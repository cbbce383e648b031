"""``index=on``: the kernel's inode index in ``work/index`` (what the simulator writes and checks).

With ``index=on`` the kernel keeps hard links together across copy-up.  A lower file with several names
(nlink > 1) is copied up once, into ``work/index/<hex of its origin file handle>`` (filehandle.py), and
every name that is copied up afterwards is a hard link to that entry; a lower name not yet copied up is
served by the entry too, so a write through one name shows through all of them (ovl_lookup_index).
The entry and its names carry ``overlay.origin`` and ``overlay.nlink`` = ``"U%+d"``: the merged view's
link count minus the upper inode's (ovl_set_nlink_upper).  The index dir is also the mount's work dir
(copy-ups are built there under ``#<hex>`` names), and at mount the kernel ties the layers together:

* the upper root gets ``overlay.origin`` = the handle of the first lower root, and a later mount over
  another lower fails with ESTALE ("failed to verify upper root origin");
* ``work/index`` gets ``overlay.upper`` = the handle of the upper root (flag PATH_UPPER), ESTALE likewise;
* left-over temps and whiteouts, stale entries (origin gone) and orphans (no names left) are removed
  (ovl_indexdir_cleanup).

All verified on Linux 6.18 as root; an unprivileged (userxattr) mount falls back to index=off.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat as st

NAME = "index"
_NLINK = re.compile(rb"^([UL])([+-]\d+)$")


def make_dir(work: str) -> None:
    """``work/index`` as ovl_workdir_create makes it (mode 000), kept if it exists."""
    try:
        os.mkdir(os.path.join(work, NAME), 0)
    except FileExistsError:
        pass
    os.chmod(os.path.join(work, NAME), 0)


def _xattr(real: str, name: str) -> bytes | None:
    try:
        return os.getxattr(real, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def verify_or_set(real: str, name: str, value: bytes, what: str) -> None:
    """ovl_verify_set_fh: record ``value`` in xattr ``name`` of ``real`` if it has none; a different one
    means these directories were used with other layers: OSError ESTALE, with the kernel's message."""
    old = _xattr(real, name)
    if old is None:
        os.setxattr(real, name, value, follow_symlinks=False)
    elif old != value:
        raise OSError(errno.ESTALE, f"overlayfs: failed to verify {what} (this upper/ and work/ were used "
                                    "with other layers under index=on)")


def nlink_value(overlay_nlink: int, upper_nlink: int) -> bytes:
    """The ``overlay.nlink`` xattr: the merged link count relative to the upper inode's."""
    return b"U%+d" % (overlay_nlink - upper_nlink)


def overlay_nlink(real_stat: os.stat_result, value: bytes | None, lower_nlink: int | None = None) -> int:
    """ovl_get_nlink: the merged view's link count from the ``overlay.nlink`` xattr (the real count when
    it is missing or malformed)."""
    m = _NLINK.match(value or b"")
    if not m:
        return real_stat.st_nlink
    base = lower_nlink if m.group(1) == b"L" and lower_nlink is not None else real_stat.st_nlink
    return max(base + int(m.group(2)), 0)


def cleanup(index_real: str, xns: str, decodes) -> list[str]:
    """ovl_indexdir_cleanup at mount: remove temps (``#...``), whiteouts, entries whose origin no longer
    decodes or does not match their name (stale) and entries no name refers to any more (orphans).
    ``decodes(value) -> bool`` says whether an origin names a live lower inode.  Returns what it removed."""
    removed = []
    for name in sorted(os.listdir(index_real)):
        real = os.path.join(index_real, name)
        s = os.lstat(real)
        if name.startswith("#") or st.S_ISCHR(s.st_mode):
            stale = True
        elif st.S_ISDIR(s.st_mode):
            continue  # directory index entries (nfs_export) are not written by this simulator
        else:
            origin = _xattr(real, f"{xns}.overlay.origin")
            stale = origin is None or origin.hex() != name or not decodes(origin)
            if not stale and s.st_nlink == 1:
                stale = overlay_nlink(s, _xattr(real, f"{xns}.overlay.nlink")) == 0  # orphan
        if stale:
            if st.S_ISDIR(s.st_mode):  # a half-built directory copy-up
                shutil.rmtree(real)
            else:
                os.unlink(real)
            removed.append(name)
    return removed


def entry_of(work: str, upper_real: str, xns: str) -> tuple[str, int] | None:
    """The work/index entry an upper file is a name of (same inode) and its link count, for the trace."""
    try:
        s = os.lstat(upper_real)
        if not st.S_ISREG(s.st_mode) or s.st_nlink < 2:
            return None
        name = os.getxattr(upper_real, f"{xns}.overlay.origin", follow_symlinks=False).hex()
        e = os.lstat(os.path.join(work, NAME, name)) if name else None
    except OSError:
        return None
    return (name, e.st_nlink) if e is not None and e.st_ino == s.st_ino else None
