"""The on-disk overlay format: how whiteouts and opaque directories are written, and how layers are read.

The kernel marks a deleted name with a character device 0/0 and an opaque directory with the xattr
``trusted.overlay.opaque=y`` (``user.overlay.opaque`` on ``userxattr`` mounts, which is what an
unprivileged user gets).  A process that cannot make those (no user xattrs on its filesystem, or an
overlay-backed home directory where a 0/0 device would itself be taken as a whiteout) uses the
*fallback* encoding, which borrows the OCI layer-tar names: an empty file ``.wh.<name>`` for a whiteout
and an empty file ``.wh..wh..opq`` inside an opaque directory.  `convert_tree` turns one into the other
losslessly, so a fallback upper can still be handed to the real kernel.
"""
from __future__ import annotations

import errno
import os
import stat as st
from dataclasses import dataclass

from . import nofollow

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

#: Sentinel stored in a directory index for a name that a layer whites out.
WHITEOUT = object()


@dataclass(frozen=True)
class Encoding:
    """How whiteouts and opaque directories are spelled in one layer tree.

    ``kind`` is ``"kernel"`` (char 0/0 + xattrs, mountable as is) or ``"fallback"`` (``.wh.`` files).
    ``xattr_ns`` is ``"trusted"`` (root mounts) or ``"user"`` (``userxattr`` mounts).
    """

    kind: str = "kernel"
    xattr_ns: str = "trusted"

    @property
    def opaque_xattr(self) -> str:
        return f"{self.xattr_ns}.overlay.opaque"

    @property
    def whiteout_xattr(self) -> str:
        return f"{self.xattr_ns}.overlay.whiteout"

    @property
    def private_prefix(self) -> str:
        """Xattrs with this prefix belong to overlayfs and are hidden from the merged view."""
        return f"{self.xattr_ns}.overlay."

    def describe(self) -> str:
        if self.kind == "kernel":
            return f"kernel format (whiteout = char device 0/0, opaque = {self.opaque_xattr}=y)"
        return f"fallback format (whiteout = empty file {WHITEOUT_PREFIX}<name>, opaque = {OPAQUE_MARKER})"

    # -- reading -------------------------------------------------------------------------------
    def is_whiteout(self, dir_path: str, name: str) -> bool:
        """Is ``name`` in ``dir_path`` a whiteout marker (in this encoding or the kernel's)?

        Like ovl_lookup (kernel 6.7+), a zero-size file with ``overlay.whiteout`` counts wherever it is:
        the parent's ``overlay.opaque="x"`` only tells readdir to filter it."""
        if self.kind == "fallback" and os.path.lexists(os.path.join(dir_path, WHITEOUT_PREFIX + name)):
            return True
        real = os.path.join(dir_path, name)
        try:
            s = os.lstat(real)
        except FileNotFoundError:
            return False
        return is_char_whiteout(s) or self.is_xattr_whiteout(real, s)

    def is_xattr_whiteout(self, real: str, s: os.stat_result) -> bool:
        """The kernel's other whiteout (6.7+): a zero-size regular file carrying ``overlay.whiteout``."""
        return st.S_ISREG(s.st_mode) and s.st_size == 0 and _xattr(real, self.whiteout_xattr) is not None

    def is_opaque(self, dir_path: str) -> bool:
        if self.kind == "fallback" and os.path.lexists(os.path.join(dir_path, OPAQUE_MARKER)):
            return True
        return _xattr(dir_path, self.opaque_xattr) == b"y"

    def is_marker_name(self, name: str) -> bool:
        """Names that are encoding markers rather than entries (only the fallback has such names)."""
        return self.kind == "fallback" and name.startswith(WHITEOUT_PREFIX)

    # -- writing -------------------------------------------------------------------------------
    def make_whiteout(self, dir_path: str, name: str) -> None:
        if self.kind == "kernel":
            os.mknod(os.path.join(dir_path, name), st.S_IFCHR | 0o000, 0)
        else:
            fd = os.open(os.path.join(dir_path, WHITEOUT_PREFIX + name), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            os.close(fd)

    def remove_whiteout(self, dir_path: str, name: str) -> None:
        if self.kind == "fallback":
            try:
                os.unlink(os.path.join(dir_path, WHITEOUT_PREFIX + name))
                return
            except FileNotFoundError:
                pass
        os.unlink(os.path.join(dir_path, name))

    def set_opaque(self, dir_path: str) -> None:
        if self.kind == "kernel":
            os.setxattr(dir_path, self.opaque_xattr, b"y", follow_symlinks=False)
        else:
            fd = os.open(os.path.join(dir_path, OPAQUE_MARKER), os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)


KERNEL_ROOT = Encoding("kernel", "trusted")
KERNEL_USER = Encoding("kernel", "user")
FALLBACK = Encoding("fallback", "user")


def default_xattr_ns() -> str:
    """Root mounts use ``trusted.overlay.*``; unprivileged (``userxattr``) mounts use ``user.overlay.*``."""
    return "trusted" if os.geteuid() == 0 else "user"


def is_char_whiteout(s: os.stat_result) -> bool:
    return st.S_ISCHR(s.st_mode) and s.st_rdev == 0


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _xattr_names(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def probe(workdir: str | os.PathLike, xattr_ns: str | None = None) -> Encoding:
    """Pick the kernel encoding if this process can write it in ``workdir``'s filesystem, else the fallback.

    The probe writes only inside ``workdir`` (the overlay's scratch directory) and cleans up.  A char 0/0
    made on an overlay-backed filesystem vanishes (that overlay reads it as a whiteout), so the probe
    checks that what it made is really there.
    """
    ns = xattr_ns or default_xattr_ns()
    base = os.path.join(os.fspath(workdir), f".overlaykit-probe-{os.getpid()}")
    os.mkdir(base)
    try:
        wh = os.path.join(base, "wh")
        try:
            os.mknod(wh, st.S_IFCHR | 0o000, 0)
            ok = is_char_whiteout(os.lstat(wh))
        except OSError:
            ok = False
        if ok:
            try:
                os.setxattr(base, f"{ns}.overlay.opaque", b"y")
                ok = os.getxattr(base, f"{ns}.overlay.opaque") == b"y"
            except OSError:
                ok = False
        return Encoding("kernel", ns) if ok else Encoding("fallback", ns)
    finally:
        for name in os.listdir(base):
            os.unlink(os.path.join(base, name))
        os.rmdir(base)


def convert_tree(root: str | os.PathLike, src: Encoding, dst: Encoding) -> None:
    """Rewrite every whiteout and opaque marker under ``root`` from ``src`` to ``dst`` encoding, in place."""
    root = os.fspath(root)
    if src == dst:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        names = sorted(set(dirnames) | set(filenames))
        opaque = src.is_opaque(dirpath)
        whiteouts = []
        for name in names:
            if src.is_marker_name(name):
                if name != OPAQUE_MARKER:
                    whiteouts.append(name[len(WHITEOUT_PREFIX):])
                os.unlink(os.path.join(dirpath, name))
            elif src.kind == "kernel" and src.is_whiteout(dirpath, name):
                whiteouts.append(name)
                os.unlink(os.path.join(dirpath, name))
        if src.kind == "kernel" and opaque:
            os.removexattr(dirpath, src.opaque_xattr, follow_symlinks=False)
        if opaque:
            dst.set_opaque(dirpath)
        for name in whiteouts:
            dst.make_whiteout(dirpath, name)
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))
                       and not os.path.islink(os.path.join(dirpath, d))]


# ----------------------------------------------------------------------------------------------
# Reading a stack of layers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """A non-directory, served by one layer."""

    path: str
    layer: int
    lstat: os.stat_result
    #: Where it is in its layer when that differs from ``path`` (a child of a redirected directory).
    lpath: str | None = None

    def where(self, index: int | None = None) -> str:
        """Its path inside its layer."""
        return self.path if self.lpath is None else self.lpath


@dataclass(frozen=True)
class MergedDir:
    """A directory; ``layers`` are the indexes of the layers whose directories merge, top first.

    With ``overlay.redirect`` (redirect_dir) a directory is found at different paths in different
    layers: ``lpaths`` then holds each layer's path, aligned with ``layers`` (empty: ``path`` in all)."""

    path: str
    layers: tuple[int, ...]
    opaque_stop: bool = False  # the merge stopped at an opaque directory
    lpaths: tuple[str, ...] = ()

    def where(self, index: int) -> str:
        """Its path inside layer ``index`` (one of ``layers``)."""
        return self.lpaths[self.layers.index(index)] if self.lpaths else self.path

    def only(self, layers: tuple[int, ...]) -> "MergedDir":
        """The same directory restricted to some of its layers (e.g. the lower ones)."""
        lpaths = tuple(self.where(i) for i in layers) if self.lpaths else ()
        return MergedDir(self.path, layers, self.opaque_stop, lpaths)


class Layers:
    """Lookup over a stack of layer directories, index 0 on top, the way ovl_lookup does it.

    Directory listings are cached per layer.  Lower layers must not change while mounted (the kernel
    calls that undefined), so their cache is kept; the upper's cache is dropped after every change.
    """

    #: Bound on cached lookups (an image has well under this many paths; missing names could grow it).
    MAX_CACHED = 1_000_000

    def __init__(self, roots: list[str], encoding: Encoding, has_upper: bool):
        self.roots = [os.fspath(r) for r in roots]
        self.encoding = encoding
        self.has_upper = has_upper
        self._dirs: list[dict[str, dict | None]] = [{} for _ in self.roots]
        self._opaque: list[dict[str, bool]] = [{} for _ in self.roots]
        self._redirect: list[dict[str, str | None]] = [{} for _ in self.roots]
        # Names that are xattr whiteouts, per layer and directory: lookups treat them as whiteouts, but
        # readdir lists them unless the layer's directory is marked overlay.opaque="x" (see names()).
        self._xwh: list[dict[str, set[str]]] = [{} for _ in self.roots]
        self._xdir: list[dict[str, bool]] = [{} for _ in self.roots]
        #: Layers in which a lookup met an "x" directory: ovl_layer_set_xwhiteouts, sticky while mounted.
        self.xwhiteout_layers: set[int] = set()
        #: redirect_dir=follow (root's default) or nofollow (forced by userxattr): it decides which layer
        #: ovl_lookup takes as the last one, where it reads no overlay xattrs of a directory.
        self.redirect_follow = encoding.xattr_ns != "user"
        # The dentry cache: path -> the node a lookup from the root gives (None = negative entry), and
        # the merged listing of each looked-up directory.  Only lookups through these canonical nodes
        # are cached; like the per-layer listings, both are dropped whenever upper/ changes.
        self._root = MergedDir("", tuple(range(len(self.roots))))
        self._nodes: dict[str, Leaf | MergedDir | None] = {"": self._root}
        self._names: dict[str, list[str]] = {}
        #: Whatever a backend derives from lookups (resolved paths, stat results); dropped with the rest.
        self.memo: dict = {}
        self._root_fds: list[int | None] = [None] * len(self.roots)

    # -- reaching entries on disk, never through a host symlink (see nofollow.py) --------------------
    def _root_fd(self, index: int) -> int | None:
        fd = self._root_fds[index]
        if fd is None:
            try:
                fd = self._root_fds[index] = os.open(self.roots[index], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return None
        return fd

    def at(self, index: int, path: str):
        """``with layers.at(i, path) as real``: see `nofollow.at` (the layer root's fd is kept open)."""
        return nofollow.at(self.roots[index], path, self._root_fd(index))

    def at_dir(self, index: int, path: str):
        return nofollow.at_dir(self.roots[index], path, self._root_fd(index))

    def close(self) -> None:
        """Close the layer roots' fds (at unmount); they are opened again if the layers are read later."""
        fds, self._root_fds = getattr(self, "_root_fds", ()), [None] * len(self.roots)
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def name(self, index: int) -> str:
        if self.has_upper:
            return "upper" if index == 0 else f"lower[{index - 1}]"
        return f"lower[{index}]"

    def real(self, index: int, path: str) -> str:
        return os.path.join(self.roots[index], path) if path else self.roots[index]

    def invalidate_upper(self) -> None:
        if self.has_upper:
            self._dirs[0] = {}
            self._opaque[0] = {}
            self._redirect[0] = {}
            self._xwh[0] = {}
            self._drop_derived()

    def _drop_derived(self) -> None:
        """Forget cached lookups, merged listings and backend memos (lower listings stay: they never change).

        Any change in upper/ can change the lookup of a path below it, or through a symlink anywhere, so
        all of them go; the next lookups rebuild them from the per-layer listings, still cached.
        """
        self._root = MergedDir("", tuple(range(len(self.roots))))
        self._nodes = {"": self._root}
        self._names = {}
        self.memo = {}

    def refresh_upper(self, path: str, subtree: bool = False) -> None:
        """Bring the cached upper listing up to date for one changed entry (and, for a directory that
        appeared, vanished or moved, everything cached below it) instead of dropping the whole cache."""
        if not self.has_upper or not path:
            self.invalidate_upper()
            return
        self._drop_derived()
        dirs, opaque, xwh, redirect = self._dirs[0], self._opaque[0], self._xwh[0], self._redirect[0]
        if subtree:
            prefix = path + "/"
            for cache in (dirs, opaque, xwh, redirect):
                for key in [k for k in cache if k == path or k.startswith(prefix)]:
                    del cache[key]
        else:
            opaque.pop(path, None)
            redirect.pop(path, None)
        parent, _, name = path.rpartition("/")
        ents = dirs.get(parent, False)
        if ents is False:
            return
        if ents is None:  # the parent was not a directory in upper when cached
            del dirs[parent]
            return
        entry = None
        xwh.get(parent, set()).discard(name)
        try:
            with self.at_dir(0, parent) as real_parent:  # never through a host symlink
                real = os.path.join(real_parent, name)
                try:
                    s = os.lstat(real)
                    entry = WHITEOUT if is_char_whiteout(s) else s
                    if entry is s and self.encoding.is_xattr_whiteout(real, s):
                        entry = WHITEOUT
                        xwh.setdefault(parent, set()).add(name)
                except FileNotFoundError:
                    pass
                if entry is None and self.encoding.kind == "fallback" and \
                        os.path.lexists(os.path.join(real_parent, WHITEOUT_PREFIX + name)):
                    entry = WHITEOUT
        except (NotADirectoryError, FileNotFoundError):
            del dirs[parent]
            return
        if entry is None:
            ents.pop(name, None)
        else:
            ents[name] = entry

    def entries(self, index: int, path: str) -> dict | None:
        """``{name: lstat | WHITEOUT}`` of one layer's directory, or None if it is not a directory there."""
        cache = self._dirs[index]
        try:
            return cache[path]
        except KeyError:
            pass
        if path:  # reachable only through real directories of this layer, never through a symlink in it
            parent, _, name = path.rpartition("/")
            pents = self.entries(index, parent)
            e = pents.get(name) if pents else None
            if e is None or e is WHITEOUT or not st.S_ISDIR(e.st_mode):
                cache[path] = None
                return None
        enc = self.encoding
        result: dict | None = {}
        xwh: set[str] = set()
        try:
            with nofollow.read_dir(self.roots[index], path, self._root_fd(index)) as (real, fd), os.scandir(fd) as it:
                for de in it:
                    name = de.name
                    if enc.kind == "fallback" and name.startswith(WHITEOUT_PREFIX):
                        if name != OPAQUE_MARKER and len(name) > len(WHITEOUT_PREFIX):
                            result[name[len(WHITEOUT_PREFIX):]] = WHITEOUT
                        continue
                    try:
                        s = de.stat(follow_symlinks=False)
                    except PermissionError:  # readable but not searchable: readdir's d_type is all there is
                        if self.has_upper and index == 0 and os.geteuid() != 0:
                            raise  # an upper dir of ours: read it again with u+x lent (below)
                        s = _dtype_stat(de)
                    if st.S_ISCHR(s.st_mode) and s.st_rdev == 0:
                        result[name] = WHITEOUT
                    elif s.st_size == 0 and enc.is_xattr_whiteout(os.path.join(real, name), s):
                        result[name] = WHITEOUT
                        xwh.add(name)
                    elif result.get(name) is not WHITEOUT:
                        result[name] = s
        except (NotADirectoryError, FileNotFoundError):
            result = None
        except PermissionError:
            # The directory itself through an O_PATH fd (no permission on it needed, no symlink followed)
            fd = nofollow.open_dir(self.roots[index], path, root_fd=self._root_fd(index))
            try:
                link = f"/proc/self/fd/{fd}"
                s = os.stat(link)
                if self.has_upper and index == 0 and s.st_uid == os.geteuid() != 0 and s.st_mode & 0o500 != 0o500:
                    # upper/ is the mounter's own: the kernel reads it whatever its modes, and so may we
                    os.chmod(link, st.S_IMODE(s.st_mode) | 0o500)
                    try:
                        return self.entries(index, path)
                    finally:
                        os.chmod(link, st.S_IMODE(s.st_mode))
                if not os.access(link, os.X_OK):  # named by its host path, for messages (never opened by it)
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.real(index, path)) from None
            finally:
                os.close(fd)
            result = _SearchOnly(self, index, path, xwh)  # e.g. a root-owned 0711 dir: names can be looked up
        cache[path] = result
        self._xwh[index][path] = xwh
        return result

    def last_layer(self, parent: MergedDir) -> int:
        """The layer ovl_lookup calls last for a child of ``parent``: the bottom one with redirect_dir=follow,
        else the bottom one of the parent's own stack."""
        return len(self.roots) - 1 if self.redirect_follow or not parent.layers else parent.layers[-1]

    def is_xwhiteouts_dir(self, index: int, path: str, last: int) -> bool:
        """Does ovl_lookup take this layer's directory as holding xattr whiteouts?  Only for
        ``overlay.opaque="x"`` on a lower layer other than the ``last`` one (the kernel checks neither the
        upper layer nor the last layer for it)."""
        if (self.has_upper and index == 0) or index == last:
            return False
        cache = self._xdir[index]
        try:
            return cache[path]
        except KeyError:
            pass
        try:  # by name from the parent, never through a host symlink
            with self.at(index, path) as real:
                value = _xattr(real, self.encoding.opaque_xattr) == b"x"
        except OSError:
            value = False
        cache[path] = value
        return value

    def is_opaque(self, index: int, path: str) -> bool:
        cache = self._opaque[index]
        try:
            return cache[path]
        except KeyError:
            pass
        enc = self.encoding
        try:  # the xattr is read by name from the parent, so a dir without search permission still tells
            with self.at(index, path) as real:
                # one listxattr tells about opaque and redirect (most directories have neither)
                names = _xattr_names(real)
                value = enc.opaque_xattr in names and _xattr(real, enc.opaque_xattr) == b"y"
                redirect = enc.private_prefix + "redirect"
                if redirect not in names:
                    self._redirect[index][path] = None
            if not value and enc.kind == "fallback":
                with self.at_dir(index, path) as real:
                    value = os.path.lexists(os.path.join(real, OPAQUE_MARKER))
        except OSError:  # not searchable, or changed behind our back
            value = False
        cache[path] = value
        return value

    def root(self, layers: tuple[int, ...] | None = None) -> MergedDir:
        return self._root if layers is None else MergedDir("", layers)

    def child(self, parent: MergedDir, name: str, visited: list | None = None) -> Leaf | MergedDir | None:
        """Look ``name`` up in ``parent``; ``visited`` collects (layer, what was found) for the trace."""
        path = f"{parent.path}/{name}" if parent.path else name
        if visited is None:
            nodes = self._nodes
            if nodes.get(parent.path) is parent:  # a canonical parent: the answer can be cached
                try:
                    return nodes[path]
                except KeyError:
                    pass
                if len(nodes) > self.MAX_CACHED:  # many lookups of missing names: start afresh
                    nodes.clear()
                    nodes[""] = self._root
                    if parent.path:
                        return self._child(parent, name, path, None)
                node = nodes[path] = self._child(parent, name, path, None)
                return node
        return self._child(parent, name, path, visited)

    def _child(self, parent: MergedDir, name: str, path: str, visited: list | None) -> Leaf | MergedDir | None:
        """ovl_lookup: each layer of the parent's stack in turn, top first, looked up by ``name`` -- or, once
        a directory carries ``overlay.redirect``, by the name (relative) or the path from the layer roots
        (absolute, "/a/b") it gives; an opaque directory, a whiteout or a non-directory stops the merge."""
        d: _Lookup | None = None  # made at the first layer that has the name: most have not
        stack, bases = parent.layers, parent.lpaths or None
        ppath = parent.path
        found: list[int] = []
        where: list[str] = []
        nm = name
        i, n = 0, len(stack)
        while i < n:
            index = stack[i]
            base = ppath if bases is None else bases[i]
            i += 1
            if nm[0] != "/":
                ents = self.entries(index, base)
                e = ents.get(nm) if ents else None
                if e is None:
                    if visited is not None:
                        visited.append((index, "absent"))
                    continue
                if d is None and e is not WHITEOUT and not st.S_ISDIR(e.st_mode):  # a file, found first
                    lp = None if bases is None or base == ppath else f"{base}/{nm}" if base else nm
                    if visited is not None:
                        visited.append((index, _kind_name(e.st_mode) + (f" at /{lp}" if lp else "")))
                    return Leaf(path, index, e, lp)
                upper = index == 0 and self.has_upper
                last = (not upper and index == len(self.roots) - 1) if self.redirect_follow else i == n
                if e is not WHITEOUT and st.S_ISDIR(e.st_mode) and (d is None or d.redirect is None):
                    # the common case, inline: a directory that neither stops the merge nor redirects it
                    lp = f"{base}/{nm}" if base else nm
                    if not last and not upper and self.is_xwhiteouts_dir(index, lp, -1):
                        self.xwhiteout_layers.add(index)
                    if last or (not self.is_opaque(index, lp) and self._redirect[index].get(lp, "") is None):
                        if d is None:
                            d = _Lookup(nm)
                        d.is_dir = True
                        found.append(index)
                        where.append(lp)
                        if visited is not None:
                            visited.append((index, "dir" if lp == path else f"dir at /{lp}"))
                        continue
                if d is None:
                    d = _Lookup(nm)
                d.last = last
                hit = self._lookup_single(index, base, nm, d, 0, "", upper, e)
            else:
                upper = index == 0 and self.has_upper
                d.last = (not upper and index == len(self.roots) - 1) if self.redirect_follow else i == n
                hit = self._lookup_abs(index, d, upper)
            nm = d.name
            if visited is not None:  # where a redirect led, say where in the layer the entry was found
                visited.append((index, d.seen if hit is None or hit[0] == path else f"{d.seen} at /{hit[0]}"))
            if hit is None:
                if d.stop:
                    break
                continue
            lp, e = hit
            if not st.S_ISDIR(e.st_mode):
                return Leaf(path, index, e, None if lp == path else lp)
            found.append(index)
            where.append(lp)
            if not upper and d.redirect is not None and not self.redirect_follow:
                raise OSError(errno.EPERM, "overlayfs: refusing to follow redirect", self.real(index, lp))
            if d.stop:
                break
            if d.redirect is not None and d.redirect[0] == "/" and not d.from_root:
                # an absolute redirect: the layers below this one are looked up from their roots
                d.from_root = True
                stack, bases = tuple(range(index + 1, len(self.roots))), ("",) * (len(self.roots) - index - 1)
                i, n = 0, len(stack)
        if found:
            lpaths = () if where.count(path) == len(where) else tuple(where)
            return MergedDir(path, tuple(found), d.opaque_dir, lpaths)
        return None

    def _lookup_abs(self, index: int, d: "_Lookup", upper: bool):
        """ovl_lookup_layer for an absolute redirect: walk its components from the layer root (a component
        may redirect again: the rest of the walk in this layer goes on, the next layers use the new name)."""
        rem = len(d.name) - 1
        base = ""
        hit = None
        while True:
            name = d.name
            s = len(name) - rem
            nxt = name.find("/", s)
            if nxt < 0:
                nxt = len(name)
            comp = name[s:nxt]
            hit = self._lookup_single(index, base, comp, d, s, name[nxt:], upper)
            if hit is None or nxt == len(name):
                return hit
            if not st.S_ISDIR(hit[1].st_mode):
                return hit
            base = hit[0]
            rem -= len(comp) + 1

    def _lookup_single(self, index: int, base: str, name: str, d: "_Lookup", prelen: int, post: str,
                       upper: bool, e=None):
        """ovl_lookup_single: ``name`` in directory ``base`` of layer ``index`` (``e``: its entry, when the
        caller has it): (path in the layer, lstat) or None; whiteouts, non-directories, opaque directories
        and redirects update the lookup ``d``."""
        if e is None:
            ents = self.entries(index, base)
            e = ents.get(name) if ents else None
        if e is None:
            d.seen = "absent"
            return None
        if e is WHITEOUT:
            d.stop = d.opaque = True
            d.seen = "whiteout"
            return None
        lp = f"{base}/{name}" if base else name
        if not st.S_ISDIR(e.st_mode):
            d.stop = True
            if d.is_dir:
                d.seen = f"{_kind_name(e.st_mode)} (hidden)"
                return None
            d.seen = _kind_name(e.st_mode)
            return lp, e
        d.seen = "dir"
        last_element = not post
        if last_element:
            d.is_dir = True
        if d.last:
            return lp, e
        if last_element and not upper and self.is_xwhiteouts_dir(index, lp, -1):
            self.xwhiteout_layers.add(index)
        if self.is_opaque(index, lp):
            d.stop = True
            if last_element:
                d.opaque = d.opaque_dir = True
                d.seen = "opaque dir"
            return lp, e
        redirect = self._redirect[index].get(lp, "")  # known absent (None) after is_opaque's listxattr
        if redirect is not None:
            redirect = self.redirect(index, lp)
        if redirect is not None:
            if redirect[0] == "/":
                d.stop = False
                d.name = redirect + post
            else:
                d.name = d.name[:prelen] + redirect + post
            d.redirect = d.name
            d.seen = f"dir, redirect to {redirect}"
        return lp, e

    def redirect(self, index: int, path: str) -> str | None:
        """The ``overlay.redirect`` of directory ``path`` in layer ``index`` (None without one).  A value
        the kernel calls invalid (empty, "//" in an absolute one, "/" in a relative one) fails the
        lookup with EINVAL, as ovl_get_redirect_xattr does."""
        cache = self._redirect[index]
        try:
            value = cache[path]
        except KeyError:
            try:
                with self.at(index, path) as real:
                    raw = _xattr(real, self.encoding.private_prefix + "redirect")
            except OSError:
                raw = None
            value = cache[path] = None if raw is None else os.fsdecode(raw)
        if value is None:
            return None
        if not value or (value[0] == "/" and "" in value[1:].split("/")) or (value[0] != "/" and "/" in value):
            raise OSError(errno.EINVAL, f"overlayfs: invalid redirect ({value})", self.real(index, path))
        return value

    def names(self, d: MergedDir) -> list[str]:
        """Visible names of a merged directory: the topmost occurrence of each name decides.

        A directory served by one layer alone is not merged, and the kernel reads it straight from that
        layer (ovl_iterate on a "real" dir), whiteouts included: such a name is listed although looking
        it up fails with ENOENT.  Whiteouts only end up there in hand-made or imported layers.
        """
        canonical = self._nodes.get(d.path) is d
        if canonical:
            cached = self._names.get(d.path)
            if cached is not None:
                return list(cached)
        if len(d.layers) == 1 and d.path:
            names = sorted(self.entries(d.layers[0], d.where(d.layers[0])) or ())
        else:
            names = self.visible_names(d, readdir=True)
        if canonical:
            self._names[d.path] = names
            return list(names)
        return names

    def visible_names(self, d: MergedDir, readdir: bool = False) -> list[str]:
        """Names of a merged directory: what rmdir's emptiness check (ovl_check_empty_dir) counts.

        Xattr whiteouts count there as names [verified on 6.18: rmdir says ENOTEMPTY]; ``readdir=True``
        filters them where ovl_iterate does: in a lower layer whose directory is marked "x" (any layer of
        this merge, when that layer has had an "x" directory looked up), and in the upper layer when the
        directory is "impure" (ovl_iterate then looks every upper name up to fill in d_ino).
        """
        seen: dict[str, bool] = {}
        for index in d.layers:
            if isinstance(self.entries(index, d.where(index)), _SearchOnly):  # readdir needs read permission
                raise PermissionError(13, os.strerror(13), self.real(index, d.where(index)))
        marked = False
        if readdir and d.path:
            parent = self.lookup(d.path.rpartition("/")[0])
            last = self.last_layer(parent) if isinstance(parent, MergedDir) else len(self.roots) - 1
            marked = any(self.is_xwhiteouts_dir(i, d.where(i), last) for i in d.layers)
        for index in d.layers:
            lp = d.where(index)
            ents = self.entries(index, lp)
            if not ents:
                continue
            xwh = self._xwh[index].get(lp, ())
            if self.has_upper and index == 0:
                filtered = readdir and bool(xwh) and self.is_impure(d.path)
            else:
                filtered = marked and index in self.xwhiteout_layers
            for name, e in ents.items():
                if name not in seen:
                    seen[name] = e is not WHITEOUT or (name in xwh and not filtered)
        return sorted(n for n, visible in seen.items() if visible)

    def is_impure(self, path: str) -> bool:
        """Is upper directory ``path`` marked ``overlay.impure="y"`` (read by name from its parent)?"""
        try:
            with self.at(0, path) as real:
                return _xattr(real, self.encoding.private_prefix + "impure") == b"y"
        except OSError:
            return False

    def lookup(self, path: str) -> Leaf | MergedDir | None:
        """Plain lookup of a normalized path, no symlinks followed."""
        node: Leaf | MergedDir | None = self.root()
        if not path:
            return node
        for name in path.split("/"):
            if not isinstance(node, MergedDir):
                return None
            node = self.child(node, name)
        return node


class _Lookup:
    """The state ovl_lookup carries from layer to layer (struct ovl_lookup_data)."""

    __slots__ = ("name", "is_dir", "opaque", "opaque_dir", "stop", "last", "redirect", "from_root", "seen")

    def __init__(self, name: str):
        self.name = name
        self.is_dir = self.opaque = self.opaque_dir = self.stop = self.last = self.from_root = False
        self.redirect: str | None = None
        self.seen = "absent"


class _SearchOnly(dict):
    """The entries of a directory this process may search but not read: like ovl_lookup, which looks a
    name up without listing its directory, ``get`` finds a name by its own lstat.  Iterating gives only
    the names found so far; a merged listing refuses such a directory (readdir needs read permission)."""

    def __init__(self, layers: Layers, index: int, path: str, xwh: set):
        super().__init__()
        self.layers, self.index, self.path, self.xwh, self.absent = layers, index, path, xwh, set()

    def __bool__(self) -> bool:  # unknown, not empty: callers test ``if ents`` before looking names up
        return True

    def get(self, name, default=None):
        if name not in self and name not in self.absent:
            try:
                with self.layers.at(self.index, f"{self.path}/{name}" if self.path else name) as real:
                    s = os.lstat(real)
                    xattr_whiteout = not is_char_whiteout(s) and self.layers.encoding.is_xattr_whiteout(real, s)
            except (FileNotFoundError, NotADirectoryError):
                self.absent.add(name)
                return default
            if is_char_whiteout(s):
                self[name] = WHITEOUT
            elif xattr_whiteout:
                self[name] = WHITEOUT
                self.xwh.add(name)
            else:
                self[name] = s
        return super().get(name, default)


def _dtype_stat(de: os.DirEntry) -> os.stat_result:
    """A stand-in stat for an entry that cannot be lstat'ed: only its type (from d_type) is known."""
    fmt = st.S_IFDIR if de.is_dir(follow_symlinks=False) else st.S_IFLNK if de.is_symlink() else st.S_IFREG
    return os.stat_result((fmt, de.inode(), 0, 1, -1, -1, 0, 0, 0, 0))


def _kind_name(mode: int) -> str:
    return KIND_OF_FMT.get(st.S_IFMT(mode), "unknown")


KIND_OF_FMT = {
    st.S_IFREG: "file", st.S_IFDIR: "dir", st.S_IFLNK: "symlink", st.S_IFCHR: "char",
    st.S_IFBLK: "block", st.S_IFIFO: "fifo", st.S_IFSOCK: "socket",
}


def kind_of(mode: int) -> str:
    return _kind_name(mode)


def errno_error(code: int, path: str, path2: str | None = None) -> OSError:
    if path2 is None:
        return OSError(code, os.strerror(code), path)
    return OSError(code, os.strerror(code), path, None, path2)


__all__ = [
    "Encoding", "KERNEL_ROOT", "KERNEL_USER", "FALLBACK", "WHITEOUT", "WHITEOUT_PREFIX", "OPAQUE_MARKER",
    "probe", "convert_tree", "Layers", "Leaf", "MergedDir", "kind_of", "errno_error", "default_xattr_ns",
]
