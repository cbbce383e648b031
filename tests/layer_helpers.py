"""Small helpers shared by the image tests: hand-built layer tars and tree snapshots."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path


def make_tar(*members, fmt=tarfile.PAX_FORMAT) -> bytes:
    """members: (name, kind, payload) with kind file/dir/symlink/hardlink/char/fifo; payload is data or target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            name, kind = m[0], m[1]
            payload = m[2] if len(m) > 2 else None
            extra = m[3] if len(m) > 3 else {}
            ti = tarfile.TarInfo(name)
            ti.mtime = extra.get("mtime", 1_600_000_000)
            ti.mode = extra.get("mode", 0o755 if kind == "dir" else 0o644)
            if "pax" in extra:
                ti.pax_headers = extra["pax"]
            if kind == "file":
                data = payload if isinstance(payload, bytes) else (payload or "").encode()
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                       "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                ti.linkname = payload
            tf.addfile(ti)
    return buf.getvalue()


def snapshot(root, *, skip=None, root_attrs=False) -> dict:
    """{relpath: (type, mode, content-hash or link target)} for every entry below root (root itself excluded)."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if skip is not None and (rel == skip or rel.startswith(skip + "/")):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = p.lstat()
            m = st.st_mode
            if stat.S_ISLNK(m):
                out[rel] = ("symlink", None, os.readlink(p))
            elif stat.S_ISDIR(m):
                out[rel] = ("dir", stat.S_IMODE(m), None)
            elif stat.S_ISREG(m):
                out[rel] = ("file", stat.S_IMODE(m), hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (stat.filemode(m)[0], stat.S_IMODE(m), st.st_rdev)
    return out


def full_snapshot(root) -> dict:
    """Like snapshot, plus owner and mtime: to prove a directory was not touched at all."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size,
                                                   os.readlink(p) if stat.S_ISLNK(st.st_mode) else data)
    st = root.lstat()
    out["."] = (st.st_mode, st.st_mtime_ns)
    return out
