"""Run one scenario (starting layers + operations) on a backend and describe everything observable.

Two backends agree on a scenario when `run()` returns equal results: every operation's outcome (value or
errno), the merged tree (kind, mode, size, nlink, content hash, symlink target), upper/ as stored on disk
(whiteouts and opaque markers decoded) and its classification.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat as st
from dataclasses import dataclass

from overlaykit import Overlay
from overlaykit.ondisk import Encoding, default_xattr_ns


FIXED_TIME = 1_000_000_000  # every entry of a built layer gets this mtime (ns)


# -- layer specs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class F:
    """A regular file."""
    content: bytes | str = b""
    mode: int = 0o644
    owner: int | None = None  # uid and gid (only root can build such a layer)


@dataclass(frozen=True)
class D:
    """A directory, optionally opaque (only meaningful in a layer that sits on others).

    ``xwhiteouts`` marks it ``overlay.opaque="x"``: readdir then filters the xattr whiteouts in it."""
    mode: int = 0o755
    opaque: bool = False
    xwhiteouts: bool = False
    owner: int | None = None


@dataclass(frozen=True)
class L:
    """A symlink."""
    target: str


@dataclass(frozen=True)
class W:
    """A whiteout: char 0/0, or with ``xattr="trusted"|"user"`` a zero-size file with ``<xattr>.overlay.whiteout``."""
    xattr: str | None = None


@dataclass(frozen=True)
class H:
    """A hardlink to another path of the same layer (listed earlier)."""
    other: str


def build_layer(root: str, spec: dict, encoding: Encoding) -> None:
    """Create ``root`` and the entries of ``spec`` (paths relative to root; parents made 0755)."""
    os.makedirs(root, exist_ok=True)
    for path in sorted(spec, key=lambda p: (isinstance(spec[p], H), p.count("/"), p)):  # links last
        item = spec[path]
        real = os.path.join(root, path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        if isinstance(item, F):
            data = item.content.encode() if isinstance(item.content, str) else item.content
            with open(real, "wb") as f:
                f.write(data)
            os.chmod(real, item.mode)
        elif isinstance(item, D):
            os.makedirs(real, exist_ok=True)
            os.chmod(real, item.mode)
            if item.opaque:
                encoding.set_opaque(real)
            if item.xwhiteouts:
                os.setxattr(real, encoding.opaque_xattr, b"x")
        elif isinstance(item, L):
            os.symlink(item.target, real)
        elif isinstance(item, W) and item.xattr:
            open(real, "wb").close()
            os.setxattr(real, f"{item.xattr}.overlay.whiteout", b"")
        elif isinstance(item, W):
            encoding.make_whiteout(os.path.dirname(real), os.path.basename(real))
        elif isinstance(item, H):
            os.link(os.path.join(root, item.other), real)
        else:
            raise TypeError(f"unknown layer item {item!r}")
        if getattr(item, "owner", None) is not None:
            os.chown(real, item.owner, item.owner, follow_symlinks=False)
            os.chmod(real, item.mode)  # chown clears set-id bits
    # fixed times so that nothing depends on when the test ran
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames + [""]:
            p = os.path.join(dirpath, name) if name else dirpath
            os.utime(p, ns=(FIXED_TIME, FIXED_TIME), follow_symlinks=False)


def layer_roots(tmp: str, n_lowers: int) -> tuple[list[str], str, str]:
    lowers = [os.path.join(tmp, f"lower{i}") for i in range(n_lowers)]
    return lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work")


# -- running -----------------------------------------------------------------------------------------
def outcome(fn):
    try:
        value = fn()
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))
    if isinstance(value, bytes):
        return ("ok", hashlib.sha256(value).hexdigest()[:12])
    if value is None or isinstance(value, (bool, int, str, list)):
        return ("ok", value)
    if hasattr(value, "kind"):  # Stat
        return ("ok", portable(value))
    return ("ok", repr(value))


def portable(s) -> tuple:
    return (s.kind, oct(s.mode), s.size if s.kind != "dir" else None, s.nlink, s.target, s.uid, s.gid)


def apply(ov: Overlay, op: tuple):
    name, *args = op
    if name == "write":
        return outcome(lambda: ov.write_bytes(args[0], args[1].encode() if isinstance(args[1], str) else args[1]))
    if name == "append":
        return outcome(lambda: ov.write_bytes(args[0], args[1].encode(), append=True))
    if name == "xattr":
        return outcome(lambda: ov.setxattr(args[0], "user.note", args[1].encode()))
    if name == "getxattr":
        return outcome(lambda: ov.getxattr(args[0], args[1]))
    if name == "rename2":  # renameat2 with flags (RENAME_NOREPLACE, RENAME_EXCHANGE)
        return outcome(lambda: ov.rename(args[0], args[1], flags=args[2]))
    if name == "lstat":
        return outcome(lambda: ov.stat(args[0], follow_symlinks=False))
    if name == "read":
        return outcome(lambda: ov.read_bytes(args[0]))
    return outcome(lambda: getattr(ov, name)(*args))


def snapshot_merged(ov: Overlay) -> dict:
    """Every path of the merged view with its portable stat (or the errno a lookup gives)."""
    out = {}
    todo = ["."]
    while todo:
        d = todo.pop()
        try:
            names = ov.listdir(d)
        except OSError as e:
            out[d + "/"] = ("listdir", errno.errorcode[e.errno])
            continue
        for name in names:
            p = name if d == "." else f"{d}/{name}"
            try:
                s = ov.stat(p, follow_symlinks=False)
            except OSError as e:  # ENOENT: a whiteout listed by a non-merged directory; EACCES ...
                out[p] = ("stat", errno.errorcode[e.errno])
                continue
            entry = portable(s)
            if s.kind == "file":
                entry += (outcome(lambda: ov.read_bytes(p)),)
            elif s.kind == "dir":
                todo.append(p)
            out[p] = entry
    return out


def snapshot_upper(ov: Overlay) -> dict:
    """upper/ as stored, with whiteouts and opaque markers decoded (so both encodings compare)."""
    if ov.upper is None:
        return {}
    enc = ov.encoding
    out = {}
    root = str(ov.upper)
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        for name in sorted(dirnames + filenames):
            p = f"{rel}/{name}" if rel else name
            real = os.path.join(dirpath, name)
            if enc.is_marker_name(name):
                if name == ".wh..wh..opq":
                    continue
                out[p[: -len(name)] + name[4:]] = ("whiteout",)
                continue
            try:
                s = os.lstat(real)
            except PermissionError:  # inside a directory this user may not search
                out[p] = ("unreadable",)
                continue
            if enc.is_whiteout(dirpath, name):
                out[p] = ("whiteout",)
            elif st.S_ISDIR(s.st_mode):  # plus: did it keep the fixed time of the layers (copy-up restores it)?
                out[p] = ("dir", oct(st.S_IMODE(s.st_mode)), enc.is_opaque(real), s.st_mtime_ns == FIXED_TIME) \
                    + redirect_of(real, enc)
            elif st.S_ISLNK(s.st_mode):
                out[p] = ("symlink", os.readlink(real))
            else:
                try:
                    with open(real, "rb") as f:
                        h = hashlib.sha256(f.read()).hexdigest()[:12]
                except PermissionError:  # a copied-up file of mode 000, say
                    h = "unreadable"
                out[p] = ("file", oct(st.S_IMODE(s.st_mode)), s.st_size, s.st_nlink, h) + file_marks(real, enc)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def snapshot_overlay_xattrs(ov: Overlay) -> dict:
    """What origin, nlink and index=on leave on disk, in a form both backends (and any inode numbers)
    share: per upper entry its ``origin`` ("handle" = a well-formed lower file handle, "empty" = the
    kernel's "origin unknown", "bad") and ``nlink`` xattr; per work/index entry (temps left out) its
    kind, link count, ``nlink`` xattr and whether it is named after its own origin."""
    from overlaykit.filehandle import Fh
    if ov.upper is None:
        return {}
    xns = ov.encoding.private_prefix

    def get(real, name):
        try:
            return os.getxattr(real, xns + name, follow_symlinks=False)
        except OSError:
            return None

    def origin(value):
        if value is None:
            return None
        if value == b"":
            return "empty"
        fh = Fh.decode(value)
        return "bad" if fh is None or fh.upper else "handle"

    out = {}
    root = str(ov.upper)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted([""] + dirnames + filenames if dirpath == root else dirnames + filenames):
            real = os.path.join(dirpath, name) if name else dirpath
            p = os.path.relpath(real, root)
            try:
                if os.path.islink(real) or not os.access(real, os.F_OK):
                    continue
                entry = (origin(get(real, "origin")), get(real, "nlink"))
            except OSError:
                continue
            if entry != (None, None):
                out[p] = entry
    u = get(root, "uuid")  # uuid=auto: a new overlay's persistent uuid (random: its size only)
    out["uuid"] = None if u is None else len(u)
    index_dir = os.path.join(str(ov.work), "index") if ov.work else None
    if index_dir and os.path.isdir(index_dir):
        entries = []
        for name in sorted(os.listdir(index_dir)):
            if name.startswith("#"):
                continue  # build temps and the kernel's shared whiteout: the work dir's scratch
            real = os.path.join(index_dir, name)
            s = os.lstat(real)
            o = get(real, "origin")
            entries.append((kind_name(s.st_mode), s.st_nlink, get(real, "nlink"),
                            o is not None and o.hex() == name))
        upper = get(index_dir, "upper")
        fh = Fh.decode(upper) if upper else None
        out["work/index"] = ("upper root handle" if fh is not None and fh.upper else origin(upper), sorted(entries))
    return out


def kind_name(mode: int) -> str:
    return "whiteout" if st.S_ISCHR(mode) else "dir" if st.S_ISDIR(mode) else "file" if st.S_ISREG(mode) else "other"


def file_marks(real: str, enc: Encoding) -> tuple:
    """What metacopy=on leaves on an upper file: ``overlay.metacopy`` present, the file's
    ``overlay.redirect`` (where its data is found after a rename or link) and whether it holds no data
    at all (SEEK_DATA finds none: portable, unlike st_blocks, which an xattr block can make non-zero)."""
    def xattr(name):
        try:
            return os.getxattr(real, f"{enc.xattr_ns}.overlay.{name}", follow_symlinks=False)
        except OSError:
            return None
    metacopy = xattr("metacopy") is not None
    redirect = xattr("redirect")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return (metacopy, redirect, "unreadable")
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
        no_data = False
    except OSError:  # ENXIO: nothing but a hole (or an empty file)
        no_data = True
    finally:
        os.close(fd)
    return (metacopy, redirect and redirect.decode(errors="replace"), no_data)


def redirect_of(real: str, enc: Encoding) -> tuple:
    """``("redirect", value)`` for a directory carrying ``overlay.redirect`` (redirect_dir=on), else ()."""
    try:
        return ("redirect", os.getxattr(real, enc.private_prefix + "redirect", follow_symlinks=False).decode())
    except OSError:
        return ()


def prepare(tmp: str, lowers_spec: list[dict], upper_spec: dict | None, *, read_only: bool = False,
            xattr_ns: str | None = None, user: tuple[int, int] | None = None) -> None:
    """Build the layers of a scenario under ``tmp``; as root, for ``user`` (uid, gid) to mount them later
    (upper/ and work/ then belong to that user, and markers use ``xattr_ns``)."""
    enc = Encoding("kernel", xattr_ns or default_xattr_ns())
    lowers, upper, work = layer_roots(tmp, len(lowers_spec))
    for root, spec in zip(lowers, lowers_spec):
        build_layer(root, spec, enc)
    if not read_only:
        build_layer(upper, upper_spec or {}, enc)
        os.makedirs(work)
        if user is not None:
            own = {os.path.join(upper, p) for p, item in (upper_spec or {}).items() if getattr(item, "owner", None) is not None}
            for dirpath, dirnames, filenames in os.walk(upper):
                for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                    if name not in own:
                        os.chown(name, *user, follow_symlinks=False)
            os.chown(work, *user)
    os.chmod(tmp, 0o755)


def run(backend: str, tmp: str, lowers_spec: list[dict], ops: list[tuple], *, upper_spec: dict | None = None,
        read_only: bool = False, encoding: str = "auto", prebuilt: bool = False, options=None) -> dict:
    """Build the layers under ``tmp`` (unless ``prebuilt``), mount on ``backend``, apply ``ops``; everything
    observable."""
    lowers, upper, work = layer_roots(tmp, len(lowers_spec))
    if not prebuilt:
        prepare(tmp, lowers_spec, upper_spec, read_only=read_only)
    ov = Overlay(lowers, None if read_only else upper, None if read_only else work, backend=backend,
                 encoding=encoding, options=options)
    with ov:
        results = [apply(ov, op) for op in ops]
        merged = snapshot_merged(ov)
        changes = [(c.path, c.kind, c.type) for c in ov.upper_changes()]
        upper_disk = snapshot_upper(ov)
        overlay_xattrs = snapshot_overlay_xattrs(ov)
        trace = [(e.op, e.kind, e.path) for e in ov.trace if e.kind != "lookup"]
    return {"results": results, "merged": merged, "upper": upper_disk, "changes": changes, "trace": trace,
            "xattrs": overlay_xattrs}


def diff(a: dict, b: dict) -> str:
    """A readable account of where two runs disagree ('' when they agree)."""
    lines = []
    for key in ("results", "merged", "upper", "changes", "trace", "xattrs"):
        if a[key] != b[key]:
            lines.append(f"--- {key} differ")
            if isinstance(a[key], dict):
                for p in sorted(set(a[key]) | set(b[key])):
                    if a[key].get(p) != b[key].get(p):
                        lines.append(f"  {p}: sim={a[key].get(p)} kernel={b[key].get(p)}")
            else:
                for i, (x, y) in enumerate(zip(a[key], b[key])):
                    if x != y:
                        lines.append(f"  [{i}] sim={x} kernel={y}")
                if len(a[key]) != len(b[key]):
                    lines.append(f"  lengths sim={len(a[key])} kernel={len(b[key])}")
    return "\n".join(lines)


def compare_prebuilt(cases: list[tuple[str, int, list]]) -> list[str]:
    """Run each (tmp, number of lowers, ops) on both backends, layers already built under tmp/sim and
    tmp/kernel (by root, for this user); the divergences, '' for each case where they agree."""
    out = []
    for tmp, n, ops in cases:
        sim = run("sim", os.path.join(tmp, "sim"), [None] * n, ops, prebuilt=True)
        ker = run("kernel", os.path.join(tmp, "kernel"), [None] * n, ops, prebuilt=True)
        out.append(diff(sim, ker))
    return out


if __name__ == "__main__":  # python differential.py CASES: what an unprivileged user's run prints back
    import ast
    import sys
    with open(sys.argv[1]) as f:
        print(repr(compare_prebuilt(ast.literal_eval(f.read()))))
