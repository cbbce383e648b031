"""The simulated overlay: the kernel's overlayfs rules in pure Python, writing a real upper/ on disk.

Every rule here follows Documentation/filesystems/overlayfs.rst and fs/overlayfs (ovl_lookup,
ovl_copy_up, ovl_rename, ovl_remove_and_whiteout ...) with the default options: redirect_dir=off,
index=off, metacopy=off, xino=off; and, with the options, redirect_dir=on (ovl_set_redirect: a lower
directory that moves), metacopy=on (metadata-only copy-up, see the "metacopy" section) and index=on (hard
links kept together through work/index, see index.py).  Where this file and the kernel disagree, the
kernel is right and the differential tests (tests/test_differential.py, tests/test_redirect.py,
tests/test_metacopy.py, tests/test_index.py) say where.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
import os
import shutil
import stat as st
import subprocess
import uuid

from . import filehandle, nofollow, xino
from . import index as inode_index
from .base import MAX_LOWERS, Backend, Stat
from .ondisk import OPAQUE_MARKER, WHITEOUT, WHITEOUT_PREFIX, Layers, Leaf, MergedDir, errno_error

MAXSYMLINKS = 40  # the kernel's limit on symlinks followed in one lookup
_temp_names = itertools.count(1)
NAME_MAX = 255  # bytes in one name (overlayfs takes the smallest of its layers', 255 on ext4, xfs, tmpfs)
PATH_MAX = 4096  # bytes in a path given to a system call, with its final NUL


def _sysctl(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


#: The ids a user namespace shows for owners it does not map (kernel.overflowuid / overflowgid).
OVERFLOW_UID = _sysctl("/proc/sys/kernel/overflowuid", 65534)
OVERFLOW_GID = _sysctl("/proc/sys/kernel/overflowgid", 65534)
#: The longest absolute overlay.redirect the kernel writes (module parameter redirect_max, 256 by default)
REDIRECT_MAX = _sysctl("/sys/module/overlay/parameters/redirect_max", 256)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _err(code: int, path: str, path2: str | None = None) -> OSError:
    return errno_error(code, path, path2)


def validate_config(ov) -> None:
    """Refuse a configuration exactly as mount(2) would, with the same errno."""
    lowers = [os.fspath(x) for x in ov.lowers]
    upper = os.fspath(ov.upper) if ov.upper else None
    work = os.fspath(ov.work) if ov.work else None
    if not lowers:
        raise OSError(errno.EINVAL, "missing 'lowerdir'")
    if len(lowers) > MAX_LOWERS:
        raise OSError(errno.EINVAL, f"too many lower directories, limit is {MAX_LOWERS}", lowers[MAX_LOWERS])
    if upper is None and len(lowers) < 2:
        raise OSError(errno.EINVAL, "at least 2 lowerdir are needed while upperdir nonexistent", lowers[0])
    if upper is not None and work is None:
        raise OSError(errno.EINVAL, "missing 'workdir'", upper)

    def isdir(path: str) -> None:
        s = os.stat(path)  # raises ENOENT / ENOTDIR with the path
        if not st.S_ISDIR(s.st_mode):
            raise OSError(errno.EINVAL, "not a directory", path)

    if upper is not None:
        isdir(upper)
        isdir(work)
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise OSError(errno.EINVAL, "workdir and upperdir must reside under the same mount", work)
        ru, rw = os.path.realpath(upper), os.path.realpath(work)
        if ru == rw or rw.startswith(ru + "/") or ru.startswith(rw + "/"):
            raise OSError(errno.EINVAL, "workdir and upperdir must be separate subtrees", work)
    # The kernel sets a trap on every layer root, then refuses a layer that is one of the others or
    # lies inside one of them (an upper inside a lower is allowed: the upper is checked first).
    traps = [os.path.realpath(x) for x in (upper, work) if x is not None]
    for lower in lowers:
        isdir(lower)
        real = os.path.realpath(lower)
        if real in traps:
            raise OSError(errno.ELOOP, "conflicting lowerdir path", lower)
        traps.append(real)
    for lower in lowers:
        child = os.path.realpath(lower)
        while (parent := os.path.dirname(child)) != child:  # every ancestor, up to and including /
            if parent in traps:
                raise OSError(errno.ELOOP, "overlapping lowerdir path", lower)
            child = parent


class _parent_times_kept:
    """ovl_copy_up_one restores the upper parent's timestamps after a copy-up ("best effort"): making
    room for a copied-up child does not count as a change of the directory."""

    def __init__(self, parent: str):
        # An `at_dir` path (/proc/self/fd/N/.) is used as /proc/self/fd/N: the directory itself through its
        # fd, which needs no search permission on it (the lending below may be what gives it).
        self.parent = parent[:-2] if parent.startswith("/proc/self/fd/") and parent.endswith("/.") else parent

    def __enter__(self):
        self.before = os.stat(self.parent)
        # The kernel copies up with the mounter's rights: in its user namespace an unprivileged mounter may
        # write into an upper dir it owns whatever its mode (copied from a 0555 lower dir, say).  This process
        # owns upper/ too, so it lends itself u+wx on the parent for the copy and takes it back after.
        mode = st.S_IMODE(self.before.st_mode)
        self.lent = os.geteuid() != 0 and self.before.st_uid == os.geteuid() and mode & 0o300 != 0o300
        if self.lent:
            os.chmod(self.parent, mode | 0o300)

    def __exit__(self, *exc):
        if self.lent:
            os.chmod(self.parent, st.S_IMODE(self.before.st_mode))
        try:
            os.utime(self.parent, ns=(self.before.st_atime_ns, self.before.st_mtime_ns))
        except OSError:
            pass


class SimBackend(Backend):
    """Overlay semantics computed in Python; upper/ receives exactly what the kernel would write."""

    name = "sim"
    keeps_cache_fresh = True  # every change refreshes the cached upper listings it touched

    def __init__(self, ov, layers: Layers):
        super().__init__([str(x) for x in ov.lowers], str(ov.upper) if ov.upper else None,
                         str(ov.work) if ov.work else None, ov.encoding)
        self.L = layers
        self.ov = ov  # its resolved options (ov.options) are set by mount() before ours runs
        self.ov_options = getattr(ov, "options", None)  # resolved at mount (see overlaykit.options)
        self.root_user = os.geteuid() == 0
        self._origins_seen: set[str] = set()
        self.handles: dict[int, _Handle] = {}
        self._copied_here: set[str] = set()  # non-directories this mount copied up (see _ino)
        self._lower_metacopy: dict = {}  # lower files found to be metacopy (or not): see _is_metacopy
        self._origin_ino: dict[int, int] = {}  # upper inode -> its origin's number, for this mount's copy-ups
        self._ino_dev: dict[int, int] = {}  # a lower inode number reported for an overlay entry -> its st_dev
        # One st_dev for the whole merged tree, as the kernel's overlay reports with all layers on one
        # filesystem and xino=off (its own anonymous device); ours is the top layer's device.
        self.dev = os.stat(self.upper or self.lowers[0]).st_dev
        self.options = ov.options  # resolved at mount: metacopy, redirect_dir ...
        self._workdir_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def mount(self) -> None:
        from .capabilities import SIM_OPTIONS
        o = self.ov_options
        for name, done in SIM_OPTIONS.items():  # never a silent wrong answer: refuse what is not modelled
            if o is not None and not done and o.value(name) not in ("off", "nofollow"):
                raise OSError(errno.EOPNOTSUPP, f"the simulator does not model {name}={o.value(name)}; "
                                                f"the kernel backend does (backend='kernel')")
        if self.work:  # the kernel keeps its scratch area in work/work (mode 000)
            _reset_workdir(os.path.join(self.work, "work"), 0o000 if self.root_user else 0o700)
            try:  # where copy-ups are built; held open like the layer roots
                self._workdir_fd = nofollow.open_dir(self.work, "work")
            except OSError:
                self._workdir_fd = None  # copy-ups will say why
            self._init_uuid()
            if self._index_on:
                self._mount_index()

    def unmount(self) -> None:
        for h in list(self.handles):
            self.close(h)
        self.L.close()
        fd, self._workdir_fd = self._workdir_fd, None
        if fd is not None:
            os.close(fd)
        for fd in self.__dict__.pop("_mount_fds", {}).values():
            os.close(fd)

    def _temp(self):
        """``with self._temp() as temp``: a fresh ``#<hex>`` name in work/work, as the kernel names its temps."""
        name = f"#{os.getpid():x}.{next(_temp_names):x}"
        if self._workdir_fd is None:
            return nofollow.at(self.work, "work/" + name)
        return nofollow.at("", name, self._workdir_fd)

    # -- path resolution ---------------------------------------------------------------------------
    def _resolve(self, p: str, follow: bool):
        """Walk ``p`` through the merged view: (parent MergedDir, name, node or None).

        Symlinks are resolved inside the merged root (an absolute target starts at the merged root and
        ``..`` stops there), as a process chrooted into merged/ would see them.  Results (and errnos) are
        memoized in ``Layers.memo``, which is dropped whenever upper/ changes.
        """
        if len(os.fsencode(p)) >= PATH_MAX:
            raise _err(errno.ENAMETOOLONG, p)
        memo = self.L.memo
        key = (p, follow)
        hit = memo.get(key)
        if hit is not None:
            if type(hit) is int:
                raise _err(hit, p)
            return hit
        if len(memo) > self.L.MAX_CACHED:
            memo.clear()
        try:
            hit = memo[key] = self._resolve_walk(p, follow)
        except OSError as e:
            memo[key] = e.errno
            raise
        return hit

    def _resolve_walk(self, p: str, follow: bool):
        L = self.L
        stack = [L.root()]
        todo = p.split("/") if p else []
        todo.reverse()
        hops = 0
        last_name = ""
        while todo:
            name = todo.pop()
            last = not todo
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            parent = stack[-1]
            if len(os.fsencode(name)) > NAME_MAX:
                raise _err(errno.ENAMETOOLONG, p)
            if not self.root_user:
                self._may(parent, os.X_OK, p)  # search permission on every directory walked through
            try:
                node = L.child(parent, name)
            except PermissionError as e:
                if e.errno == errno.EPERM:  # ovl_lookup: "refusing to follow redirect" (redirect_dir=nofollow)
                    raise _err(errno.EPERM, p) from None
                if self.root_user:
                    raise _err(errno.EACCES, p) from None
                raise OSError(errno.EACCES, f"{os.strerror(errno.EACCES)}: the simulator may not search a layer's "
                              "directory on this path; the kernel looks names up with the rights of the user who "
                              "mounted, which include searching any directory that user owns", p) from None
            if node is None:
                if last:
                    return parent, name, None
                raise _err(errno.ENOENT, p)
            if isinstance(node, MergedDir) and not self.root_user:
                self._check_dir_xattrs_readable(parent, node, p)
            if isinstance(node, MergedDir) and len(node.layers) > 1 and node.layers[0] == 0 and self.L.has_upper:
                self._note_origin(node.path, node.layers[1], node.where(node.layers[1]))
            if isinstance(node, Leaf) and st.S_ISLNK(node.lstat.st_mode) and (follow or not last):
                hops += 1
                if hops > MAXSYMLINKS:
                    raise _err(errno.ELOOP, p)
                with L.at(node.layer, node.where()) as real:
                    target = os.readlink(real)
                if target.startswith("/"):
                    stack = [L.root()]
                parts = target.split("/")
                parts.reverse()
                todo.extend(parts)
                continue
            if last:
                self._check_metacopy_allowed(node, p)
                return parent, name, node
            if isinstance(node, Leaf):
                raise _err(errno.ENOTDIR, p)
            stack.append(node)
            last_name = name
        node = stack[-1]
        parent = stack[-2] if len(stack) > 1 else None
        return parent, node.path.rpartition("/")[2] if node.path else last_name, node

    # -- helpers -----------------------------------------------------------------------------------
    def _check_dir_xattrs_readable(self, parent: MergedDir, node: MergedDir, p: str) -> None:
        """ovl_lookup reads overlay.opaque and overlay.redirect of each directory it meets, except in the
        last layer it looks in; user.* xattrs (userxattr mounts) need read permission, which the mounter has
        on what anyone may read and on what it owns (its user namespace maps only its own ids): EACCES."""
        last = self.L.last_layer(parent)
        for index in node.layers:
            if index == last or (index == 0 and self.L.has_upper):
                continue
            s = self._lower_lstat(index, node.where(index))
            if (s.st_uid, s.st_gid) != (os.geteuid(), os.getegid()) and not self._access(index, node.where(index), os.R_OK):
                raise _err(errno.EACCES, p)

    def _note_origin(self, path: str, lower: int | None = None, lpath: str | None = None) -> None:
        """ovl_lookup records a missing origin on an upper dir that merges with a lower one (a "legacy"
        merge dir, e.g. made by hand), so that its inode number can stay constant."""
        if path in self._origins_seen:
            return
        self._origins_seen.add(path)
        name = self.encoding.private_prefix + "origin"
        try:
            with self._up(path) as real:
                try:
                    os.getxattr(real, name, follow_symlinks=False)
                    return
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        return
            value = self._origin_value(lower, path if lpath is None else lpath) if lower is not None else b""
            with self._lend(path), self._up(path) as real:
                os.setxattr(real, name, value, follow_symlinks=False)
        except OSError:
            return
        self._set_impure(path.rpartition("/")[0])  # ovl_fix_origin marks the parent impure too


    def _writable(self, p: str) -> None:
        if self.upper is None:
            raise _err(errno.EROFS, p)

    def _may(self, node, mode: int, p: str) -> None:
        """The permission check the kernel makes before any copy-up (root passes it)."""
        if self.root_user or node is None:
            return
        layer = node.layer if isinstance(node, Leaf) else node.layers[0]
        if not self._access(layer, node.where(layer), mode):
            raise _err(errno.EACCES, p)
        if mode & os.W_OK and not (layer == 0 and self.L.has_upper):
            # ovl_permission: to write a lower entry the mounter must be able to read it, for the copy-up
            s = self._node_stat(node)
            if not (st.S_ISCHR(s.st_mode) or st.S_ISBLK(s.st_mode) or st.S_ISFIFO(s.st_mode) or st.S_ISSOCK(s.st_mode)) \
                    and (s.st_uid, s.st_gid) != (os.geteuid(), os.getegid()) and not self._access(layer, node.where(layer), os.R_OK):
                raise _err(errno.EACCES, p)

    def _access(self, layer: int, path: str, mode: int) -> bool:
        """os.access of a layer entry, reached without following a host symlink (False if unreachable)."""
        try:
            with self.L.at(layer, path) as real:
                return os.access(real, mode, follow_symlinks=False)
        except OSError:
            return False

    def _lend(self, path: str):
        """``with self._lend(path)``: the mounter's rights (u+wx) on upper directory ``path``, one of ours,
        while the kernel would write to it (an xattr, say) whatever its mode; its times are kept too."""
        return _lent(self._updir(path))

    def _up(self, path: str):
        """``with self._up(path) as real``: ``path`` in upper/, reached without following a host symlink
        (the last component too, with ``follow_symlinks=False`` or ``O_NOFOLLOW``)."""
        return self.L.at(0, path)

    def _updir(self, path: str):
        """``with self._updir(path) as d``: directory ``path`` of upper/ itself, opened without following."""
        return self.L.at_dir(0, path)

    def _upper_dir(self, d: MergedDir) -> str:
        """Make sure directory ``d`` exists in upper/, copying it and its parents up (one at a time,
        each atomically); return its path (relative to upper/)."""
        if d.layers and d.layers[0] == 0 or not d.path:
            return d.path
        parts = d.path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            ents = self.L.entries(0, "/".join(parts[:i - 1]))
            e = ents.get(parts[i - 1]) if ents else None
            if e is not None and e is not WHITEOUT and st.S_ISDIR(e.st_mode):
                continue
            node = self.L.lookup(sub)
            if not isinstance(node, MergedDir):  # upper/ was changed behind our back
                raise _err(errno.ENOENT, sub)
            src = node.where(node.layers[0])
            s = self._lower_lstat(node.layers[0], src)
            self._check_mapped(s, node.path)
            self._install(node.path, node.layers[0], s, lpath=src)
        return d.path

    def _lower_lstat(self, layer: int, path: str) -> os.stat_result:
        with self.L.at(layer, path) as real:
            return os.lstat(real)

    def _check_copyable(self, node: Leaf) -> None:
        """Refuse, before anything is written, a copy-up this process cannot do although the kernel can.

        The kernel reads the lower file with the mounter's rights, and an unprivileged mounter may read any
        file it owns whatever its mode (CAP_DAC_OVERRIDE in its user namespace).  This process may not, and
        must not chmod a lower layer to get in."""
        s = node.lstat
        if self.root_user or not st.S_ISREG(s.st_mode) or s.st_uid != os.geteuid():
            return
        if not self._access(node.layer, node.where(), os.R_OK) and not self._owner_may_read(node):
            raise OSError(errno.EACCES, f"{os.strerror(errno.EACCES)}: the simulator cannot copy up a lower file "
                          f"it may not read (mode {st.S_IMODE(s.st_mode):04o}) where user namespaces are off; the "
                          "kernel can, as it copies up with the rights of the user who mounted, which include "
                          "reading any file that user owns",
                          node.path)

    def _owner_may_read(self, node: Leaf) -> bool:
        try:
            with self.L.at(node.layer, node.where()) as real:
                return _readable_as_owner(real)
        except OSError:
            return False

    def _check_sticky(self, parent: MergedDir, node, p: str) -> None:
        """may_delete: in a sticky directory only the owner of the entry or of the directory may remove it."""
        if self.root_user or node is None:
            return
        ds = self._node_stat(parent)
        if ds.st_mode & st.S_ISVTX and os.geteuid() not in (ds.st_uid, self._node_stat(node).st_uid):
            raise _err(errno.EPERM, p)

    def _check_mapped(self, s: os.stat_result, path: str) -> None:
        """An unprivileged (user-namespace) mount maps only the caller's own uid and gid; the kernel
        refuses to copy up anything owned by another id (ovl_copy_up_one: EOVERFLOW)."""
        if not self.root_user and (s.st_uid != os.geteuid() or s.st_gid != os.getegid()):
            raise _err(errno.EOVERFLOW, path)

    def _set_impure(self, up_dir: str) -> None:
        """ovl_set_impure: upper directory ``up_dir`` that received a copied-up entry is marked
        ``overlay.impure=y`` (readdir then looks its upper names up, which hides xattr whiteouts there)."""
        try:
            with self._lend(up_dir), self._up(up_dir) as real:
                os.setxattr(real, self.encoding.private_prefix + "impure", b"y", follow_symlinks=False)
        except OSError:
            pass

    def _install(self, path: str, layer: int, s: os.stat_result, data: bool = True, meta: bool = False,
                 data_from: tuple | None = None, lpath: str | None = None) -> None:
        """Copy ``path`` of layer ``layer`` into upper/ the way ovl_copy_up_workdir does: build the copy
        (data, owner, xattrs, mode, times) under a temporary ``#<hex>`` name in work/work, then rename
        the finished entry into upper/.  A kill or an error part-way leaves nothing in upper/ (and
        work/work is emptied at the next mount), so upper/ only ever holds whole copies."""
        parent, _, name = path.rpartition("/")
        self._set_impure(parent)
        is_dir = st.S_ISDIR(s.st_mode)
        # vfs_rename needs write permission on a directory that changes parent (its ".."); the unprivileged
        # mounter has it on a dir it owns whatever the mode, so this process lends itself u+w for the rename
        lend_w = is_dir and not self.root_user and not s.st_mode & 0o200
        # ``lpath``: where the entry is in its layer, when a redirect put it elsewhere than ``path``
        with self.L.at(layer, path if lpath is None else lpath) as src, self._temp() as temp:
            try:
                if is_dir:
                    os.mkdir(temp, 0o700)
                else:
                    if data_from is not None and data and not meta:
                        with self.L.at(*data_from) as data_src:
                            self._copy_leaf(data_src, temp, s, data, meta)
                    else:
                        self._copy_leaf(src, temp, s, data, meta)
                if meta:  # ovl_copy_up_metadata: the copy holds no data yet (empty value, as the kernel's)
                    os.setxattr(temp, self.encoding.private_prefix + "metacopy", b"", follow_symlinks=False)
                self._copy_meta(src, temp, s, self._origin_value(layer, path if lpath is None else lpath))
                if lend_w:
                    _chmod_nofollow(temp, st.S_IMODE(s.st_mode) | 0o200)
                with self._updir(parent) as up_parent, _parent_times_kept(up_parent):
                    os.rename(temp, os.path.join(up_parent, name))
                    if lend_w:  # the mode only: a chmod leaves the times as copied
                        _chmod_nofollow(os.path.join(up_parent, name), st.S_IMODE(s.st_mode))
            except BaseException:
                _discard(temp)
                raise
        self.L.refresh_upper(path, subtree=is_dir)
        if not is_dir:
            self._copied_here.add(path)
            if s.st_nlink == 1:  # the in-memory inode keeps its origin's number, whatever its name becomes
                try:
                    with self._up(path) as real:
                        self._origin_ino[os.lstat(real).st_ino] = s.st_ino
                        self._ino_dev[s.st_ino] = s.st_dev
                except OSError:
                    pass
        if self.handles and not meta:  # a metacopy upper holds no data: readers go on reading the lower file
            self._redirect_readers(*(data_from or (layer, path if lpath is None else lpath)), path)

    def _has_origin(self, path: str) -> bool:
        return self._upper_xattr(path, "origin") is not None

    def _copy_meta(self, src: str, dst: str, s: os.stat_result, origin: bytes = b"") -> None:
        """Owner, xattrs, mode and times, in the kernel's order (times last)."""
        private = self.encoding.private_prefix
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            names = []
        for name in names:
            if name.startswith(private) and not name.startswith(private + "overlay."):
                continue  # overlayfs's own xattrs stay behind; escaped ones (a nested overlay's) travel
            try:
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
            except OSError:
                pass
        if self.root_user:
            os.chown(dst, s.st_uid, s.st_gid, follow_symlinks=False)
        # Like ovl_copy_up_one: mark the copy with an origin xattr: the lower inode's file handle
        # (filehandle.py), or empty, the kernel's own spelling of "copied up, origin unknown", which it
        # writes when it cannot encode one (an unprivileged mount); it reads either back without complaint.
        # With index=off the kernel records no origin for a hard-linked lower file (it could not keep the
        # links' inode numbers consistent anyway).
        if st.S_ISDIR(s.st_mode) or s.st_nlink == 1 or self._index_on:
            try:
                os.setxattr(dst, self.encoding.private_prefix + "origin", origin, follow_symlinks=False)
            except OSError:
                pass  # no xattrs here (some fallback filesystems): upper_changes() then guesses
        if not st.S_ISLNK(s.st_mode):
            os.chmod(dst, st.S_IMODE(s.st_mode))
        os.utime(dst, ns=(s.st_atime_ns, s.st_mtime_ns), follow_symlinks=False)

    def _copy_up(self, node, data: bool = True, meta: bool = False) -> str:
        """Copy a lower entry into upper/ (parents first), returning its path (relative to upper/).

        ``data=False``: a truncating open, no data copied.  ``meta=True``: the caller changes metadata only
        (chmod, chown, utimes, xattrs, link, rename): with metacopy=on a regular file is copied up without
        its data (ovl_need_meta_copy_up).  A metacopy file that needs its data gets it here."""
        if isinstance(node, MergedDir):
            return self._upper_dir(node)
        if node.layer == 0 and self.L.has_upper:
            if not meta and self._is_metacopy(node):
                self._metacopy_fill(node, data)
            return node.path
        self._check_copyable(node)
        parent_path = node.path.rpartition("/")[0]
        parent = self.L.lookup(parent_path)
        if not isinstance(parent, MergedDir):  # a layer was changed behind our back
            raise _err(errno.ENOENT, node.path)
        self._upper_dir(parent)
        self._check_mapped(node.lstat, node.path)
        try:
            name = self._index_name(node)
            if name:  # index=on: a hard-linked lower file goes through its index entry
                metacopy = meta and self.options.metacopy and st.S_ISREG(node.lstat.st_mode)
                self._copy_up_indexed(node, name, data, metacopy)
                if not meta:  # the entry may be a metacopy one, made by a chmod through another name
                    up = self.L.lookup(node.path)
                    if isinstance(up, Leaf) and up.layer == 0 and self._is_metacopy(up):
                        self._metacopy_fill(up, data)
                return node.path
            data_from = None
            if self._is_metacopy(node):  # a metacopy file in a lower layer: its data is further down
                lower = self._metacopy_data(node)
                if lower is None:
                    raise _err(errno.EIO, node.path)
                data_from = (lower.layer, _in_layer(lower))
            self._install(node.path, node.layer, node.lstat, data,
                          meta and self.options.metacopy and st.S_ISREG(node.lstat.st_mode), data_from,
                          lpath=node.where())
        except OSError as e:
            raise _err_from(e, node.path) from None
        return node.path

    def _copy_leaf(self, src: str, dst: str, s: os.stat_result, data: bool = True, meta: bool = False) -> None:
        mode = s.st_mode
        if st.S_ISREG(mode) and not data:  # O_TRUNC: ovl_copy_up_one copies size 0
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        elif st.S_ISREG(mode) and meta:  # metacopy: the lower's size, no data blocks (ovl_set_size)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, s.st_size)
            finally:
                os.close(fd)
        elif st.S_ISREG(mode):
            with _open_lower(src) as fd_in:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    _copy_data(fd_in, fd)
                finally:
                    os.close(fd)
        elif st.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif st.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            os.mknod(dst, st.S_IFMT(mode) | 0o600, s.st_rdev)

    # -- metacopy=on: metadata-only copy-up, data found below ------------------------------------------
    def _upper_xattr(self, path: str, name: str) -> bytes | None:
        """``overlay.<name>`` of upper entry ``path`` (None if absent), read by name from its parent."""
        try:
            with self._up(path) as real:
                return os.getxattr(real, self.encoding.private_prefix + name, follow_symlinks=False)
        except OSError:
            return None

    def _is_metacopy(self, node) -> bool:
        """Is ``node`` a regular file without its data (``overlay.metacopy`` set): one copied up with
        metacopy=on, or one in a lower layer that was such an upper (an earlier overlay's, a committed layer)?
        Without metacopy=on none is: lookup refused them (see `_check_metacopy_allowed`)."""
        return self.options.metacopy and self._has_metacopy_mark(node)

    def _has_metacopy_mark(self, node) -> bool:
        if not (isinstance(node, Leaf) and st.S_ISREG(node.lstat.st_mode)):
            return False
        upper = node.layer == 0 and self.L.has_upper
        memo = self.L.memo if upper else self._lower_metacopy  # lower layers do not change while mounted
        key = ("metacopy", node.layer, node.path)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = self._layer_xattr(node.layer, _in_layer(node), "metacopy") is not None
        return hit

    def _metacopy_data(self, node) -> Leaf | None:
        """The lower file that holds a metacopy file's data: ovl_lookup goes on below the upper file, at
        the path its ``overlay.redirect`` names (absolute from the root, or a name in the same parent) or
        else at the same path, to the first regular file that is not itself metacopy."""
        key = ("metacopy-data", node.layer, node.path)
        if key in self.L.memo:
            return self.L.memo[key]
        found, current = None, node
        path, layer = node.path, node.layer
        for _ in range(len(self.L.roots)):
            raw = self._layer_xattr(layer, _in_layer(current), "redirect")
            redirect = os.fsdecode(raw) if raw else None
            parent, _, name = path.rpartition("/")
            if redirect and redirect.startswith("/"):  # from the root of the layers below
                path = redirect.strip("/")
                found = self._lookup_below(path, layer)
            else:  # in the parent's own lower stack, by the redirect's name or its own
                path = _join(parent, redirect or name)
                found = self._child_below(parent, redirect or name, layer)
            if found is None or not st.S_ISREG(found.lstat.st_mode):
                found = None
                break
            if not self._is_metacopy(found):
                break
            current, layer = found, found.layer  # a metacopy file in a lower layer too (a committed upper)
        self.L.memo[key] = found
        return found

    def _layer_xattr(self, layer: int, path: str, name: str) -> bytes | None:
        try:
            with self.L.at(layer, path) as real:
                return os.getxattr(real, self.encoding.private_prefix + name, follow_symlinks=False)
        except OSError:
            return None

    def _child_below(self, parent_path: str, name: str, layer: int) -> Leaf | None:
        """``name`` in the merged directory ``parent_path``, looked up only in its layers below ``layer``."""
        parent = self.L.lookup(parent_path)
        below = tuple(i for i in parent.layers if i > layer) if isinstance(parent, MergedDir) else ()
        if not below:
            return None
        node = self.L.child(parent.only(below), name)
        return node if isinstance(node, Leaf) else None

    def _lookup_below(self, path: str, layer: int) -> Leaf | None:
        """``path`` looked up in the layers below ``layer`` only (whiteouts and opaque dirs there count)."""
        node = self.L.root(tuple(range(layer + 1, len(self.L.roots))))
        for name in path.split("/"):
            if not isinstance(node, MergedDir) or not node.layers:
                return None
            node = self.L.child(node, name)
        return node if isinstance(node, Leaf) else None

    def _metacopy_fill(self, node: Leaf, data: bool = True) -> None:
        """ovl_copy_up_meta_inode_data: copy the data into the metacopy file's own upper inode (its hard
        links and its inode number stay), then remove ``overlay.metacopy``.  That removal is the commit:
        until it, the file is still metacopy and its data is read from below, so a kill part-way leaves
        a file the kernel reads right (the next write-open copies again, from the start).  ``data=False``
        (O_TRUNC): nothing to copy, the file is emptied first."""
        lower = self._metacopy_data(node)
        if lower is None and data:
            raise _err(errno.EIO, node.path)
        if not data and self._metacopy_empty(node):
            if self.handles and lower is not None:
                self._redirect_readers(lower.layer, _in_layer(lower), node.path)
            return
        with self._up(node.path) as real:
            caps = None
            try:
                caps = os.getxattr(real, "security.capability", follow_symlinks=False)
            except OSError:
                pass
            fd = os.open(real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if not data:
                    os.ftruncate(fd, 0)
                elif lower.lstat.st_size:
                    with self.L.at(lower.layer, _in_layer(lower)) as src, _open_lower(src) as fd_in:
                        _copy_data(fd_in, fd)
            finally:
                os.close(fd)
            if caps is not None:  # writing cleared it; the kernel puts it back
                os.setxattr(real, "security.capability", caps, follow_symlinks=False)
            os.removexattr(real, self.encoding.private_prefix + "metacopy", follow_symlinks=False)
        self.L.refresh_upper(node.path)
        if self.handles and lower is not None:
            self._redirect_readers(lower.layer, _in_layer(lower), node.path)

    def _metacopy_empty(self, node: Leaf) -> bool:
        """O_TRUNC of a metacopy file with one link: an empty copy of it (owner, xattrs but overlay.metacopy,
        mode, times) is built in work/work and renamed over it, so no kill can leave the states between
        emptying it and dropping the mark (a metacopy file of size 0 that still reads the lower data, or a
        full-size file of zeros).  With more links it is done in place (False), as the kernel does."""
        parent, _, name = node.path.rpartition("/")
        private = self.encoding.private_prefix
        with self._up(node.path) as real:
            s = os.lstat(real)
            if s.st_nlink != 1:
                return False
            with self._temp() as temp:
                try:
                    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
                    os.chown(temp, s.st_uid, s.st_gid, follow_symlinks=False)
                    for xname in os.listxattr(real, follow_symlinks=False):
                        if xname != private + "metacopy":
                            os.setxattr(temp, xname, os.getxattr(real, xname, follow_symlinks=False),
                                        follow_symlinks=False)
                    os.chmod(temp, st.S_IMODE(s.st_mode))
                    os.utime(temp, ns=(s.st_atime_ns, s.st_mtime_ns), follow_symlinks=False)
                    with self._updir(parent) as up_parent, _parent_times_kept(up_parent):
                        os.rename(temp, os.path.join(up_parent, name))
                except BaseException:
                    _discard(temp)
                    raise
            new_ino = os.lstat(real).st_ino
        if s.st_ino in self._origin_ino:  # the overlay inode keeps its number
            self._origin_ino[new_ino] = self._origin_ino[s.st_ino]
        self.L.refresh_upper(node.path)
        return True

    def _set_file_redirect(self, rel: str, old_parent: str, old_name: str, samedir: bool) -> None:
        """ovl_set_redirect for a metacopy file about to be renamed or linked, so its data is still found:
        the old name within the same directory, else the absolute old path; a redirect already there is
        kept when it still holds (same directory, or absolute), else made absolute."""
        node = self.L.lookup(rel)
        if not self._is_metacopy(node):
            return
        raw = self._upper_xattr(rel, "redirect")
        old = os.fsdecode(raw) if raw else None
        if old and (samedir or old.startswith("/")):
            return
        value = old_name if samedir else "/" + _join(old_parent, old or old_name)
        with self._up(rel) as real:
            os.setxattr(real, self.encoding.private_prefix + "redirect", os.fsencode(value), follow_symlinks=False)
        self.L.refresh_upper(rel)

    def _check_metacopy_allowed(self, node, p: str) -> None:
        """Without metacopy=on the kernel refuses to follow a metacopy file found in upper/ (EPERM,
        "refusing to follow metacopy origin")."""
        if not self.options.metacopy and self._has_metacopy_mark(node):
            raise _err(errno.EPERM, p)

    def _clear_whiteout(self, d: MergedDir, name: str) -> bool:
        ents = self.L.entries(0, d.path)
        if ents and ents.get(name) is WHITEOUT:
            with self._updir(d.path) as up_dir:
                self.encoding.remove_whiteout(up_dir, name)
            self.L.refresh_upper(_join(d.path, name), subtree=True)
            return True
        return False

    def _lower_positive(self, parent: MergedDir, name: str) -> bool:
        """Does a lower layer still show ``name`` under ``parent``?  Then deleting it needs a whiteout."""
        lower = tuple(i for i in parent.layers if not (self.L.has_upper and i == 0))
        if self.L.has_upper and parent.layers and parent.layers[0] == 0 and parent.opaque_stop and len(parent.layers) == 1:
            return False
        return bool(lower) and self.L.child(parent.only(lower), name) is not None

    def _refresh(self, parent: MergedDir) -> MergedDir:
        node = self.L.lookup(parent.path)
        return node if isinstance(node, MergedDir) else parent

    def _whiteout(self, parent: MergedDir, name: str) -> None:
        with self._updir(self._upper_dir(parent)) as up:
            self.encoding.make_whiteout(up, name)
        self.L.refresh_upper(_join(parent.path, name), subtree=True)

    def _set_opaque(self, rel: str) -> None:
        with self._lend(rel):  # the mounter may write to its own dir whatever its mode
            if self.encoding.kind == "kernel":  # the xattr, set by name from the parent (no search permission needed)
                with self._up(rel) as real:
                    os.setxattr(real, self.encoding.opaque_xattr, b"y", follow_symlinks=False)
            else:
                with self._updir(rel) as real:
                    self.encoding.set_opaque(real)

    def _create_prep(self, parent: MergedDir, name: str, p: str) -> bool:
        """Parent copied up, any whiteout at ``name`` removed: whether a whiteout was there."""
        self._reserved_name(name, p)
        self._may(parent, os.W_OK | os.X_OK, p)
        self._upper_dir(parent)
        return self._clear_whiteout(self._refresh(parent), name)

    def _reserved_name(self, name: str, p: str) -> None:
        """Under the fallback encoding a ``.wh.`` name *is* a whiteout: refuse to create one."""
        if self.encoding.kind == "fallback" and name.startswith(WHITEOUT_PREFIX):
            raise OSError(errno.EINVAL, f"names starting with {WHITEOUT_PREFIX!r} are reserved for whiteouts by "
                          "the OCI image spec, and this upper/ uses that (fallback) encoding: the file would "
                          "delete or hide a name after the next mount", p)

    # -- operations --------------------------------------------------------------------------------
    def _check_create_target(self, p: str) -> None:
        """open(O_CREAT) refuses a final name with a trailing slash (EISDIR), also one that comes from a
        followed symlink (``a -> a/``), before looking that name up."""
        q = p
        for _ in range(MAXSYMLINKS + 1):
            parent, name, node = self._resolve(q.rstrip("/") or q, False)
            if q.endswith("/") and q.strip("/"):
                raise _err(errno.EISDIR, p)
            if not (isinstance(node, Leaf) and st.S_ISLNK(node.lstat.st_mode)):
                return
            with self.L.at(node.layer, node.where()) as real:
                target = os.readlink(real)
            q = target.lstrip("/") if target.startswith("/") else _join(parent.path, target)
            if not q:
                return
        raise _err(errno.ELOOP, p)

    # -- open files ------------------------------------------------------------------------------
    def open(self, p: str, flags: int, perm: int) -> int:
        """open(2) as ovl_open does it: look up, create in upper/ (O_CREAT), or copy up first when the
        open asks for write access (a truncating open copies metadata only), then open the real file."""
        if flags & os.O_CREAT:
            self._check_create_target(p)  # a trailing slash, also through a symlink (a -> a/): EISDIR
        parent, name, node = self._resolve(p, not flags & os.O_NOFOLLOW)
        writes = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        real_flags = (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_NOFOLLOW | os.O_CLOEXEC
        if node is None:
            if not flags & os.O_CREAT or parent is None:
                raise _err(errno.ENOENT, p)
            if flags & os.O_DIRECTORY:
                raise _err(errno.EINVAL, p)  # O_CREAT|O_DIRECTORY creates nothing (Linux 6.4+)
            self._writable(p)
            self._create_prep(parent, name, p)
            rel = _join(parent.path, name)
            try:
                with self._up(rel) as real:
                    fd = os.open(real, real_flags | os.O_CREAT | os.O_EXCL, perm)
            except OSError as e:
                raise _err_from(e, p) from None
            finally:
                self.L.refresh_upper(rel)
            return self._keep(_Handle(fd, 0, rel, flags, os.fstat(fd).st_ino))
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise _err(errno.EEXIST, p)
        if isinstance(node, Leaf) and st.S_ISLNK(node.lstat.st_mode):
            raise _err(errno.ELOOP, p)  # only reached with O_NOFOLLOW
        if isinstance(node, MergedDir):
            if writes or flags & os.O_CREAT:
                raise _err(errno.EISDIR, p)
            if not self.root_user:
                self._may(node, os.R_OK, p)  # open(O_RDONLY) checks read permission; read() then says EISDIR
            layer, rel = node.layers[0], node.path
        else:
            if flags & os.O_DIRECTORY:
                raise _err(errno.ENOTDIR, p)
            layer, rel = node.layer, node.path
            if writes:
                self._writable(p)
                self._may(node, os.W_OK, p)
                if layer != 0 or not self.L.has_upper or self._is_metacopy(node):
                    self._copy_up(node, data=not flags & os.O_TRUNC)
                    layer = 0
            elif not self.root_user:
                self._may(node, os.R_OK, p)
        entry = self._index_name(node) if not writes and isinstance(node, Leaf) and layer != 0 else None
        if entry and (self._index_lstat(entry) is None or self._index_is_metacopy(entry)):
            entry = None  # not copied up, or copied up without data: the lower alias holds the same data
        meta = None
        if entry is None and not writes and self._is_metacopy(node):  # no data in upper yet: ovl_open opens the lower data
            lower = self._metacopy_data(node)
            if lower is None:
                raise _err(errno.EIO, p)
            meta, layer, rel = (layer, rel), lower.layer, _in_layer(lower)
        if not (layer == 0 and self.L.has_upper or meta):
            rel = node.where(layer)  # under a redirected directory the file sits elsewhere in its layer
        try:  # index=on: a lower alias whose inode was copied up reads its index entry (ovl_lookup_index)
            with self._index_at(entry) if entry else self.L.at(layer, rel) as real:
                fd = os.open(real, real_flags)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            if writes:
                self.L.refresh_upper(rel)
        try:
            ino = self._stat(self.L.lookup(meta[1] if meta else rel)).ino
        except (OSError, AttributeError):
            ino = None
        return self._keep(_Handle(fd, layer, rel, flags, ino, meta))

    def _keep(self, h: "_Handle") -> int:
        self._next_handle = getattr(self, "_next_handle", 0) + 1
        self.handles[self._next_handle] = h
        return self._next_handle

    def _h(self, h: int) -> "_Handle":
        try:
            return self.handles[h]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def _redirect_readers(self, layer: int, path: str, upper_path: str | None = None) -> None:
        """After ``path`` of ``layer`` was copied up: handles opened read-only on the lower file read the
        upper copy from now on (ovl_real_fdget_meta reopens the real file when the inode was copied up,
        so on Linux 4.19+ an fd opened before a copy-up sees what is written after it)."""
        for h in self.handles.values():
            if (h.layer, h.path) == (layer, path):
                target = upper_path or path
                try:
                    with self._up(target) as real:
                        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                os.close(h.fd)
                h.fd, h.layer, h.path, h.meta = fd, 0, target, None

    def pread(self, h: int, n: int, offset: int) -> bytes:
        try:
            return os.pread(self._h(h).fd, min(n, 1 << 20), offset)  # at most 1 MiB, as the kernel helper
        except OSError as e:
            raise _err(e.errno, self._h(h).path) from None

    def pwrite(self, h: int, data: bytes, offset: int) -> int:
        hd = self._h(h)
        try:
            return os.pwrite(hd.fd, data, offset)
        except OSError as e:
            raise _err(e.errno, hd.path) from None

    def fstat(self, h: int) -> Stat:
        hd = self._h(h)
        s = os.fstat(hd.fd)
        ino, dev = hd.ino if hd.ino is not None else s.st_ino, self.dev
        if not self._inode_map.same_fs:
            dev, ino = self._inode_map.map(self._ino_dev.get(ino, s.st_dev), ino, st.S_ISDIR(s.st_mode))
        if hd.meta is not None:  # the overlay inode's attributes are the upper file's, its blocks the data's
            try:
                with self.L.at(*hd.meta) as real:
                    blocks, s = s.st_blocks, os.lstat(real)
                return dataclasses.replace(Stat.from_os(s, ino=ino, dev=dev), blocks=blocks)
            except OSError:
                pass
        return Stat.from_os(s, ino=ino, dev=dev)

    def ftruncate(self, h: int, size: int) -> None:
        hd = self._h(h)
        try:
            os.ftruncate(hd.fd, size)
        except OSError as e:
            raise _err(e.errno, hd.path) from None

    def close(self, h: int) -> None:
        os.close(self.handles.pop(h).fd) if h in self.handles else self._h(h)

    def touch(self, p: str) -> None:
        try:
            parent, name, node = self._resolve(p, True)
        except FileNotFoundError:
            self._check_create_target(p)  # the open(O_CREAT) after utime's ENOENT may say EISDIR instead
            raise
        if node is None:  # like touch(1): utime, and on ENOENT open(O_CREAT)
            self._check_create_target(p)
            self._writable(p)
            self._create_prep(parent, name, p)
            rel = _join(parent.path, name)
            try:
                with self._up(rel) as real:
                    os.close(os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
            except OSError as e:
                raise _err_from(e, p) from None
            finally:
                self.L.refresh_upper(rel)
            return
        self.utime(p, None)

    def utime(self, p: str, times, ns=None, follow: bool = True) -> None:
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        # Setting both times to "now" needs only write access; anything else needs the owner (utimensat(2)).
        self._owner_or_writable(node, p, times is None and (ns is None or tuple(ns) == ("now", "now")))
        try:
            with self._up(self._copy_up(node, meta=True)) as real:
                if ns is not None and any(isinstance(v, str) for v in ns):
                    from ._nsworker import utimensat
                    utimensat(real, ns, False)
                elif ns is not None:
                    os.utime(real, ns=ns, follow_symlinks=False)
                else:
                    os.utime(real, times, follow_symlinks=False)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def _owner_or_writable(self, node, p: str, now: bool) -> None:
        if self.root_user:
            return
        s = self._node_stat(node)
        if s.st_uid == os.geteuid():
            return
        if now:
            self._may(node, os.W_OK, p)
            return
        raise _err(errno.EPERM, p)

    def _node_stat(self, node) -> os.stat_result:
        if isinstance(node, Leaf):
            return node.lstat
        return self._lower_lstat(node.layers[0], node.where(node.layers[0]))

    def remove(self, p: str) -> None:
        parent, name, node = self._resolve(p, False)
        self._writable(p)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, MergedDir):
            raise _err(errno.EISDIR, p)
        self._may(parent, os.W_OK | os.X_OK, p)
        self._check_sticky(parent, node, p)
        indexed = self._index_name(node) or self._upper_index_name(node) if self._index_on else None
        if indexed:
            self._unlink_indexed(node, indexed)
        if node.layer == 0 and self.L.has_upper:
            try:
                with self._up(node.path) as real:
                    os.unlink(real)
            except OSError as e:
                raise _err_from(e, p) from None
            finally:
                self.L.refresh_upper(node.path)
        if self._lower_positive(parent, name):
            self._whiteout(parent, name)

    def mkdir(self, p: str, mode: int) -> None:
        parent, name, node = self._resolve(p, False)
        if node is not None or parent is None:
            raise _err(errno.EEXIST, p)
        self._writable(p)
        was_whiteout = self._create_prep(parent, name, p)
        rel = _join(parent.path, name)
        try:
            with self._up(rel) as real:
                os.mkdir(real, mode)
            if was_whiteout or self._opaque_new_dirs(parent):
                self._set_opaque(rel)
            elif not self._offline_changes_allowed() and any(i != 0 for i in parent.layers):
                # ovl_create_upper: with redirect_dir=on (or index, metacopy, nfs_export) a new dir in a
                # merged one is made opaque ("just an optimization": a failure is ignored)
                try:
                    self._set_opaque(rel)
                except OSError:
                    pass
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(rel, subtree=True)

    def rmdir(self, p: str) -> None:
        if not p:
            raise _err(errno.EBUSY, p)
        parent, name, node = self._resolve(p, False)
        self._writable(p)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, Leaf):
            raise _err(errno.ENOTDIR, p)
        if self.L.visible_names(node):
            raise _err(errno.ENOTEMPTY, p)
        self._may(parent, os.W_OK | os.X_OK, p)
        self._check_sticky(parent, node, p)
        lower_positive = self._lower_positive(parent, name)
        if node.layers[0] == 0 and self.L.has_upper:
            # ovl_remove_and_whiteout clears the whiteouts inside first; so does ovl_remove_upper for a
            # redirected merge dir ("Redirect dir can be !ovl_lower_positive && OVL_TYPE_MERGE")
            if lower_positive or (len(node.layers) > 1 and self._upper_redirect(node.path) is not None):
                self._remove_upper_dir(node.path)
            else:  # ovl_remove_upper: a plain rmdir of the upper dir; leftover whiteouts make it ENOTEMPTY
                try:
                    if self.encoding.kind == "fallback":
                        with self._updir(node.path) as d:
                            if os.path.lexists(os.path.join(d, OPAQUE_MARKER)):
                                os.unlink(os.path.join(d, OPAQUE_MARKER))
                    with self._up(node.path) as real:
                        os.rmdir(real)
                except OSError as e:
                    raise _err_from(e, p) from None
                finally:
                    self.L.refresh_upper(node.path, subtree=True)
        if lower_positive:
            self._whiteout(parent, name)

    def _remove_upper_dir(self, path: str) -> None:
        """Remove an upper directory that looks empty in the merged view (it may hold whiteouts)."""
        with self._updir(path) as d:
            for entry in os.listdir(d):
                os.unlink(os.path.join(d, entry))
        with self._up(path) as real:
            os.rmdir(real)
        self.L.refresh_upper(path, subtree=True)

    # -- redirect_dir ------------------------------------------------------------------------------
    def _creates_redirects(self) -> bool:
        return self.ov_options is not None and self.ov_options.creates_redirects

    def _offline_changes_allowed(self) -> bool:
        """ovl_allow_offline_changes: no index, metacopy, redirect_dir=on or nfs_export on this mount."""
        o = self.ov_options
        return o is None or not (o.index or o.metacopy or o.redirect_dir == "on" or o.nfs_export)

    def _upper_redirect(self, path: str) -> str | None:
        """The ``overlay.redirect`` of upper directory ``path`` (ovl_dentry_get_redirect), or None."""
        try:
            with self._up(path) as real:
                return os.fsdecode(os.getxattr(real, self.encoding.private_prefix + "redirect",
                                               follow_symlinks=False))
        except OSError:
            return None

    def _redirect_value(self, path: str, samedir: bool) -> str | None:
        """What ovl_set_redirect writes for directory ``path`` (still at its old place) before it moves:
        nothing when it keeps its redirect (same parent, or already absolute); its old name when it stays
        in its parent; else the absolute path of its lower part, built from its own and its ancestors'
        redirects (ovl_get_redirect), EXDEV when longer than the module's redirect_max."""
        current = self._upper_redirect(path)
        if current is not None and (samedir or current.startswith("/")):
            return None
        if samedir:
            return path.rpartition("/")[2]
        room = REDIRECT_MAX
        parts: list[str] = []
        d = path
        while d:
            name = self._upper_redirect(d) if d != path else current
            if name is None:
                name = d.rpartition("/")[2]
            if len(name.encode()) + (name[0] != "/") > room:
                return ""
            room -= len(name.encode())
            parts.append(name)
            if name.startswith("/"):
                break
            room -= 1
            parts.append("/")
            d = d.rpartition("/")[0]
        return "".join(reversed(parts))

    def _set_redirect(self, rel: str, samedir: bool, src: str, dst: str) -> None:
        value = self._redirect_value(rel, samedir)
        if value is None:
            return
        if not value:
            raise _err(errno.EXDEV, src, dst)  # "If path is too long, fall back to userspace move"
        try:
            with self._lend(rel), self._up(rel) as real:
                os.setxattr(real, self.encoding.private_prefix + "redirect", os.fsencode(value),
                            follow_symlinks=False)
        except OSError:
            raise _err(errno.EXDEV, src, dst) from None  # no xattrs here: mv copies instead
        finally:
            self.L.refresh_upper(rel)

    def _rename_parents(self, src: str, dst: str) -> None:
        for q in (src, dst):  # renameat2 walks to both parents before it looks either name up
            head = q.rstrip("/").rpartition("/")[0]
            node = self._resolve(head, True)[2] if head else None
            if head and not isinstance(node, MergedDir):
                raise _err(errno.ENOENT if node is None else errno.ENOTDIR, src, dst)

    def rename(self, src: str, dst: str) -> None:
        self._rename_parents(src, dst)
        sparent, sname, snode = self._resolve(src, False)
        dparent, dname, dnode = self._resolve(dst, False)
        if not src or not dst:
            raise _err(errno.EBUSY, src, dst)
        self._writable(src)
        if snode is None:
            raise _err(errno.ENOENT, src, dst)
        s_dir = isinstance(snode, MergedDir)
        if dnode is not None and dnode.path.startswith(snode.path + "/"):
            raise _err(errno.EINVAL, src, dst)  # vfs: the source may not be an ancestor of the target
        if snode.path.startswith(dparent.path + "/" + dname + "/" if dparent.path else dname + "/"):
            raise _err(errno.ENOTEMPTY, src, dst)  # ... nor the target an ancestor of the source
        if dparent.path == snode.path or dparent.path.startswith(snode.path + "/"):
            raise _err(errno.EINVAL, src, dst)
        if dnode is not None:
            d_dir = isinstance(dnode, MergedDir)
            if s_dir and not d_dir:
                raise _err(errno.ENOTDIR, src, dst)
            if d_dir and not s_dir:
                raise _err(errno.EISDIR, src, dst)
        if snode.path == getattr(dnode, "path", None):
            return
        if self._index_on and isinstance(snode, Leaf) and isinstance(dnode, Leaf) and \
                self._stat(snode).ino == self._stat(dnode).ino:
            return  # two names of one indexed inode: vfs_rename does nothing (source and target are one inode)
        has_upper = self.L.has_upper
        s_redirect = s_dir and not (has_upper and snode.layers == (0,))  # ovl_type_merge_or_lower
        if s_redirect and not self._creates_redirects():
            raise _err(errno.EXDEV, src, dst)  # redirect_dir=off: a lower or merged directory cannot move
        d_merge_or_lower = isinstance(dnode, MergedDir) and not (has_upper and dnode.layers == (0,))
        if d_merge_or_lower and self.L.visible_names(dnode):
            raise _err(errno.ENOTEMPTY, src, dst)
        self._may(sparent, os.W_OK | os.X_OK, src)
        self._may(dparent, os.W_OK | os.X_OK, dst)
        self._check_sticky(sparent, snode, src)
        self._check_sticky(dparent, dnode, dst)
        self._reserved_name(dname, dst)
        replaced = self._index_name(dnode) or self._upper_index_name(dnode) if self._index_on else None
        if replaced:  # a name of an indexed inode goes: its merged link count drops (ovl_nlink_start)
            self._unlink_indexed(dnode, replaced)
        old_opaque = s_dir and self.L.is_opaque(0, snode.path)
        src_rel = self._copy_up(snode, meta=True)
        if not s_dir:
            self._set_file_redirect(src_rel, sparent.path, sname, sparent.path == dparent.path)
        lower_positive = self._lower_positive(sparent, sname)
        self._upper_dir(dparent)
        dparent = self._refresh(dparent)
        samedir = sparent.path == dparent.path
        if not samedir and self._has_origin(src_rel):
            self._set_impure(dparent.path)  # ovl_rename: a moved entry with an origin makes its new parent impure
        if s_redirect:
            # redirect_dir=on: the directory alone was copied up; overlay.redirect tells lookup where its
            # lower part now is (ovl_set_redirect, before the real rename)
            self._set_redirect(src_rel, samedir, src, dst)
        elif s_dir and not old_opaque and any(i != 0 for i in dparent.layers):
            # ovl_rename marks the moved dir opaque *before* the real rename, so that a lower dir of the
            # same name at the destination cannot show through; the mark stays even if the rename fails.
            self._set_opaque(src_rel)
            self.L.refresh_upper(snode.path, subtree=True)
        over_whiteout = self._clear_whiteout(dparent, dname)
        dst_path = _join(dparent.path, dname)
        if d_merge_or_lower and dnode.layers[0] == 0:
            self._remove_upper_dir(dst_path)
        # A moved lower directory leaves its whiteout the kernel's way, in the same rename(RENAME_WHITEOUT):
        # even a rename that fails (ENOTEMPTY) then touches the old parent, as on the kernel's upper fs.
        whiteout_in_rename = s_redirect and lower_positive and not over_whiteout and self.root_user \
            and self.encoding.kind == "kernel"
        try:
            with self._up(src_rel) as src_real, self._up(dst_path) as dst_real:
                if whiteout_in_rename:
                    from ._nsworker import RENAME_WHITEOUT, renameat2
                    renameat2(src_real, dst_real, RENAME_WHITEOUT)
                else:
                    os.rename(src_real, dst_real)
        except OSError as e:
            raise _err_from(e, src, dst) from None
        finally:
            self.L.refresh_upper(snode.path, subtree=True)
            self.L.refresh_upper(dst_path, subtree=True)
        if lower_positive and not whiteout_in_rename:
            self._whiteout(self._refresh(sparent), sname)

    def chmod(self, p: str, mode: int) -> None:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        if not self.root_user and self._node_stat(node).st_uid != os.geteuid():
            raise _err(errno.EPERM, p)
        try:
            with self._up(self._copy_up(node, meta=True)) as real:
                _chmod_nofollow(real, mode)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(node.path, subtree=isinstance(node, MergedDir))

    def chown(self, p: str, uid: int, gid: int, follow: bool = True) -> None:
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        s = self._node_stat(node)
        if not self.root_user and not ((uid in (-1, s.st_uid)) and s.st_uid == os.geteuid()
                                       and (gid == -1 or gid in os.getgroups() or gid == os.getegid())):
            raise _err(errno.EPERM, p)
        try:
            with self._up(self._copy_up(node, meta=True)) as real:
                os.chown(real, uid, gid, follow_symlinks=False)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def setxattr(self, p: str, name: str, value: bytes, flags: int = 0, follow: bool = True) -> None:
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._may_write_xattr(node, name, p)
        try:
            with self._up(self._copy_up(node, meta=True)) as real:
                os.setxattr(real, self._escape(name), value, flags, follow_symlinks=False)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def _may_write_xattr(self, node, name: str, p: str) -> None:
        """xattr_permission for setxattr and removexattr: trusted.* needs privilege, the caller needs write
        permission, and user.* on a sticky directory is for its owner only."""
        self._writable(p)
        if self.root_user:
            return
        if name.startswith("trusted."):
            raise _err(errno.EPERM, p)
        self._may(node, os.W_OK, p)
        ns = self._node_stat(node)
        if name.startswith("user.") and st.S_ISDIR(ns.st_mode) and ns.st_mode & st.S_ISVTX and \
                ns.st_uid != os.geteuid():
            raise _err(errno.EPERM, p)

    def getxattr(self, p: str, name: str, follow: bool = True) -> bytes:
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        try:
            layer = node.layer if isinstance(node, Leaf) else node.layers[0]
            with self.L.at(layer, node.where(layer)) as real:
                return os.getxattr(real, self._escape(name), follow_symlinks=False)
        except OSError as e:
            raise _err_from(e, p) from None

    def listxattr(self, p: str, follow: bool = True) -> list[str]:
        """The entry's xattrs as ovl_listxattr shows them: overlayfs's own markers hidden, escaped
        ones (a nested overlay's) shown under their own names."""
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        try:
            layer = node.layer if isinstance(node, Leaf) else node.layers[0]
            with self.L.at(layer, node.where(layer)) as real:
                names = os.listxattr(real, follow_symlinks=False)
        except OSError as e:
            raise _err(e.errno, p) from None
        private = self.encoding.private_prefix
        escaped = private + "overlay."
        out = [private + n[len(escaped):] if n.startswith(escaped) else n
               for n in names if not n.startswith(private) or n.startswith(escaped)]
        return sorted(out)

    def removexattr(self, p: str, name: str, follow: bool = True) -> None:
        """ovl_xattr_set with no value: a lower entry without that xattr is ENODATA and stays where it
        is; otherwise it is copied up and the xattr removed there."""
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._may_write_xattr(node, name, p)
        try:
            layer = node.layer if isinstance(node, Leaf) else node.layers[0]
            if not (self.L.has_upper and layer == 0):
                with self.L.at(layer, node.where(layer)) as real:
                    os.getxattr(real, self._escape(name), follow_symlinks=False)
            with self._up(self._copy_up(node, meta=True)) as real:
                os.removexattr(real, self._escape(name), follow_symlinks=False)
        except OSError as e:
            raise _err(e.errno, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def statfs(self, p: str):
        """ovl_statfs: the upper filesystem's figures (the top lower's on a read-only overlay)."""
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        return os.statvfs(self.upper or self.lowers[0])

    def mknod(self, p: str, mode: int, device: int) -> None:
        parent, name, node = self._resolve(p, False)
        if node is not None or parent is None:
            raise _err(errno.EEXIST, p)
        self._writable(p)
        kind = st.S_IFMT(mode) or st.S_IFREG
        if kind not in (st.S_IFREG, st.S_IFIFO, st.S_IFSOCK, st.S_IFCHR, st.S_IFBLK):
            raise _err(errno.EINVAL, p)
        if kind in (st.S_IFCHR, st.S_IFBLK) and not self.root_user:
            raise _err(errno.EPERM, p)
        self._create_prep(parent, name, p)
        rel = _join(parent.path, name)
        try:
            with self._up(rel) as real:
                os.mknod(real, mode, device)
        except OSError as e:
            raise _err(e.errno, p) from None
        finally:
            self.L.refresh_upper(rel)

    def rename2(self, src: str, dst: str, flags: int) -> None:
        """renameat2 as ovl_rename takes it: RENAME_NOREPLACE and RENAME_EXCHANGE, nothing else (EINVAL)."""
        from ._nsworker import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
        if flags & ~(RENAME_EXCHANGE | RENAME_NOREPLACE) or flags == RENAME_EXCHANGE | RENAME_NOREPLACE:
            raise _err(errno.EINVAL, src, dst)
        self._rename_parents(src, dst)
        if flags == RENAME_NOREPLACE:
            _, _, dnode = self._resolve(dst, False)
            _, _, snode = self._resolve(src, False)
            if snode is None:
                raise _err(errno.ENOENT, src, dst)
            if dnode is not None:
                raise _err(errno.EEXIST, src, dst)
            return self.rename(src, dst)
        if not flags:
            return self.rename(src, dst)
        sparent, sname, snode = self._resolve(src, False)
        dparent, dname, dnode = self._resolve(dst, False)
        if snode is None or dnode is None:
            raise _err(errno.ENOENT, src, dst)
        self._writable(src)
        if snode.path == dnode.path:
            return
        if snode.path.startswith(dnode.path + "/") or dnode.path.startswith(snode.path + "/"):
            raise _err(errno.EINVAL, src, dst)
        moves_lower = [isinstance(node, MergedDir) and not (self.L.has_upper and node.layers == (0,))
                       for node in (snode, dnode)]
        if any(moves_lower) and not self._creates_redirects():
            raise _err(errno.EXDEV, src, dst)  # redirect_dir=off: a lower or merged directory cannot move
        self._may(sparent, os.W_OK | os.X_OK, src)
        self._may(dparent, os.W_OK | os.X_OK, dst)
        opaque = [isinstance(node, MergedDir) and self.L.is_opaque(0, node.path) for node in (snode, dnode)]
        s_rel, d_rel = self._copy_up(snode, meta=True), self._copy_up(dnode, meta=True)
        sparent, dparent = self._refresh(sparent), self._refresh(dparent)
        samedir = sparent.path == dparent.path
        if not isinstance(snode, MergedDir):  # metacopy=on: a moved metacopy file keeps finding its data
            self._set_file_redirect(s_rel, sparent.path, sname, samedir)
        if not isinstance(dnode, MergedDir):
            self._set_file_redirect(d_rel, dparent.path, dname, samedir)
        if not samedir:  # ovl_rename: an entry with an origin makes its new parent impure
            if self._has_origin(s_rel):
                self._set_impure(dparent.path)
            if self._has_origin(d_rel):
                self._set_impure(sparent.path)
        for node, rel, lower, was_opaque, new_parent in ((snode, s_rel, moves_lower[0], opaque[0], dparent),
                                                         (dnode, d_rel, moves_lower[1], opaque[1], sparent)):
            if lower:
                self._set_redirect(rel, samedir, src, dst)
            elif isinstance(node, MergedDir) and not was_opaque and any(i != 0 for i in new_parent.layers):
                self._set_opaque(rel)
                self.L.refresh_upper(rel, subtree=True)
        try:
            with self._up(s_rel) as s_real, self._up(d_rel) as d_real:
                renameat2(s_real, d_real, RENAME_EXCHANGE)
        except OSError as e:
            raise _err(e.errno, src, dst) from None
        finally:
            self.L.refresh_upper(s_rel, subtree=True)
            self.L.refresh_upper(d_rel, subtree=True)

    def _escape(self, name: str) -> str:
        """Xattrs in overlayfs's own namespace are stored escaped (kernel 6.7+), so a nested overlay's
        markers never act on this one: ``trusted.overlay.X`` is kept as ``trusted.overlay.overlay.X``."""
        private = self.encoding.private_prefix
        return private + "overlay." + name[len(private):] if name.startswith(private) else name

    def symlink(self, target: str, p: str) -> None:
        if not target:  # symlinkat: an empty target is ENOENT, before the new name is even looked up
            raise _err(errno.ENOENT, p)
        parent, name, node = self._resolve(p, False)
        if node is not None or parent is None:
            raise _err(errno.EEXIST, p)
        self._writable(p)
        self._create_prep(parent, name, p)
        rel = _join(parent.path, name)
        try:
            with self._up(rel) as real:
                os.symlink(target, real)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(rel)

    def link(self, src: str, dst: str) -> None:
        _, _, snode = self._resolve(src, False)
        if snode is None:
            raise _err(errno.ENOENT, src, dst)
        dparent, dname, dnode = self._resolve(dst, False)
        if dnode is not None or dparent is None:
            raise _err(errno.EEXIST, src, dst)
        self._writable(src)
        self._check_hardlink_source(snode, src, dst)  # may_linkat, then vfs_link: may_create, then EPERM for a dir
        self._may(dparent, os.W_OK | os.X_OK, dst)
        if isinstance(snode, MergedDir):
            raise _err(errno.EPERM, src, dst)
        self._reserved_name(dname, dst)
        src_rel = self._copy_up(snode, meta=True)
        sparent_path, _, sname = snode.path.rpartition("/")
        self._set_file_redirect(src_rel, sparent_path, sname, False)  # ovl_set_link_redirect: absolute
        self._create_prep(self._refresh(dparent), dname, dst)
        dst_rel = _join(dparent.path, dname)
        try:
            with self._up(src_rel) as src_real, self._up(dst_rel) as dst_real:
                os.link(src_real, dst_real, follow_symlinks=False)
        except OSError as e:
            raise _err_from(e, src, dst) from None
        finally:
            self.L.refresh_upper(snode.path)
            self.L.refresh_upper(dst_rel)

    def _check_hardlink_source(self, node, src: str, dst: str) -> None:
        """fs.protected_hardlinks (may_linkat): without CAP_FOWNER, link only to a file you own, or to a
        regular, non-set-id file you may read and write."""
        if self.root_user or _sysctl("/proc/sys/fs/protected_hardlinks", 0) != 1:
            return
        s = self._node_stat(node)
        if s.st_uid == os.geteuid():
            return
        mode = s.st_mode
        if not st.S_ISREG(mode) or mode & st.S_ISUID or (mode & (st.S_ISGID | st.S_IXGRP)) == (st.S_ISGID | st.S_IXGRP) \
                or not self._access(node.layer, node.where(), os.R_OK | os.W_OK):
            raise _err(errno.EPERM, src, dst)

    def truncate(self, p: str, size: int) -> None:
        if size < 0:
            raise _err(errno.EINVAL, p)
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, MergedDir):
            raise _err(errno.EISDIR, p)
        self._writable(p)
        self._may(node, os.W_OK, p)
        try:
            with self._up(self._copy_up(node)) as real:
                fd = os.open(real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            raise _err_from(e, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def listdir(self, p: str) -> list[str]:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, Leaf):
            raise _err(errno.ENOTDIR, p)
        self._may(node, os.R_OK, p)
        names = self.L.names(node)
        if len(node.layers) > 1 and node.layers[0] == 0 and self.L.has_upper and self.L.is_impure(node.path):
            # An impure merged dir: ovl_iterate looks every upper name up (for d_ino) and drops those whose
            # lookup fails, e.g. on a lower directory the unprivileged mounter may not read (see _resolve_walk),
            # or (root too) on a directory whose redirect is refused (nofollow: EPERM) or invalid (EINVAL)
            upper_names = self.L.entries(0, node.path) or {}
            names = [n for n in names if n not in upper_names or
                     (self.root_user and not st.S_ISDIR(getattr(upper_names[n], "st_mode", 0)))
                     or self._looks_up(_join(node.path, n))]
        return names

    def _looks_up(self, path: str) -> bool:
        try:
            self._resolve(path, False)
            return True
        except OSError:
            return False

    def stat(self, p: str, follow: bool) -> Stat:
        memo = self.L.memo
        key = ("stat", p, follow)
        cached = memo.get(key)
        if cached is not None:
            return cached
        _, _, node = self._resolve(p, follow)
        if node is None:
            raise _err(errno.ENOENT, p)
        result = self._stat(node)
        if not self._inode_map.same_fs:
            result = self._cross_fs(node, result)
        if not self.root_user and (result.uid != os.geteuid() or result.gid != os.getegid()):
            # An unprivileged mount lives in a user namespace that maps only this user's own ids: any other
            # owner shows as the overflow ids, as through the kernel backend.
            result = dataclasses.replace(
                result, uid=result.uid if result.uid == os.geteuid() else OVERFLOW_UID,
                gid=result.gid if result.gid == os.getegid() else OVERFLOW_GID)
        if not (self.L.has_upper and (node.layer if isinstance(node, Leaf) else node.layers[0]) == 0) \
                and not self._index_on:  # index=on: a lower alias shows its index entry, which changes
            memo[key] = result  # lower layers do not change while mounted; upper entries may
        return result

    def _stat(self, node) -> Stat:
        if isinstance(node, Leaf) and self._index_on:
            got = self._index_stat(node)
            if got is not None:
                return got
        if isinstance(node, Leaf):
            s = node.lstat
            upper = node.layer == 0 and self.L.has_upper
            if not (upper or st.S_ISLNK(s.st_mode)):
                result = Stat.from_os(s, dev=self.dev)
                if self._is_metacopy(node) and (lower := self._metacopy_data(node)) is not None:
                    result = dataclasses.replace(result, blocks=lower.lstat.st_blocks)
                return result
            with self.L.at(node.layer, node.where()) as real:
                if upper:
                    s = os.lstat(real)  # upper entries change under us
                target = os.readlink(real) if st.S_ISLNK(s.st_mode) else None
            result = Stat.from_os(s, target, ino=self._ino(node, s), dev=self.dev)
            if self._is_metacopy(node):  # ovl_getattr: st_blocks of the lower data, the upper has none
                lower = self._metacopy_data(node)
                if lower is not None:
                    result = dataclasses.replace(result, blocks=lower.lstat.st_blocks)
            return result
        layer = node.layers[0]
        s = None
        where = node.where(layer)
        if node.path and not (layer == 0 and self.L.has_upper):  # a lower dir: its parent's listing has it
            parent, _, name = where.rpartition("/")
            s = (self.L.entries(layer, parent) or {}).get(name)
            if s is WHITEOUT or s is None or s.st_uid == -1:  # -1: only readdir's d_type was known
                s = None
        if s is None:
            s = self._lower_lstat(layer, where)
        return Stat.from_os(s, nlink=1 if len(node.layers) > 1 else None, ino=self._ino(node, s), dev=self.dev)

    def _ino(self, node, s: os.stat_result) -> int:
        """The inode number the kernel reports (overlayfs.rst "Inode properties", all layers on one
        filesystem, xino=off): the real inode's, except that a copied-up entry keeps its origin's
        number (the lower inode it was copied from, found by its ``origin`` xattr) -- so the number
        survives copy-up and remount (as root); a hard-linked lower file gets no origin (index=off) and so a new
        number when copied up, which breaks the link as the kernel does."""
        if isinstance(node, MergedDir):
            lower = [i for i in node.layers if not (self.L.has_upper and i == 0)]
            if lower and lower[0] != node.layers[0] and node.path:  # ovl_get_root: the root is the top's
                try:
                    low = self._lower_lstat(lower[0], node.where(lower[0]))
                    self._ino_dev[low.st_ino] = low.st_dev
                    return low.st_ino
                except OSError:
                    pass
            return s.st_ino
        if not (self.L.has_upper and node.layer == 0) or not node.path:
            return s.st_ino
        if s.st_ino in self._origin_ino:
            return self._origin_ino[s.st_ino]
        if not self.root_user and node.path not in self._copied_here:
            # Measured (6.x): an unprivileged (userxattr) mount does not follow a non-directory's origin
            # at lookup, so after a remount its copied-up files show their upper inode's number.
            return s.st_ino
        with self._up(node.path) as real:
            try:
                origin = os.getxattr(real, self.encoding.private_prefix + "origin", follow_symlinks=False)
            except OSError:
                return s.st_ino
        if origin:  # ovl_check_origin: the lower inode is found by its handle, whatever its name now
            low = self._decode_origin(origin, s)
            return low.st_ino if low is not None and low.st_nlink == 1 else s.st_ino
        if (self._is_metacopy(node) or self._upper_xattr(node.path, "redirect") is not None) \
                and (lower := self._metacopy_data(node)) is not None:
            return lower.lstat.st_ino  # moved or linked with metacopy=on: its redirect names the origin
        parent_path, _, name = node.path.rpartition("/")
        parent = self.L.lookup(parent_path)
        if isinstance(parent, MergedDir):
            low = self.L.child(parent.only(tuple(i for i in parent.layers if i != 0)), name) \
                if any(i != 0 for i in parent.layers) else None
            if isinstance(low, Leaf):
                return low.lstat.st_ino
        return s.st_ino

    # -- file handles (filehandle.py) ---------------------------------------------------------------
    def _layer_uuid(self, layer: int) -> bytes:
        uuids = self.__dict__.setdefault("_uuids", {})
        if layer not in uuids:
            uuids[layer] = filehandle.fs_uuid(self.L.roots[layer])
        return uuids[layer]

    def _origin_value(self, layer: int, path: str) -> bytes:
        """The ``origin`` xattr the kernel writes for ``path`` of lower layer ``layer`` (ovl_set_origin)."""
        try:
            with self.L.at(layer, path) as real:
                return filehandle.encode(real, self._layer_uuid(layer))
        except OSError:
            return b""

    def _decode_origin(self, value: bytes, upper: os.stat_result | None = None) -> os.stat_result | None:
        """ovl_check_origin_fh: the lower inode an ``origin`` handle names, in the first lower layer whose
        filesystem UUID it carries; None when it names nothing there (or an inode of another type)."""
        memo = self.__dict__.setdefault("_decoded", {})  # lower layers do not change while mounted
        if value in memo:
            low = memo[value]
            return low if low is None or upper is None or st.S_IFMT(low.st_mode) == st.S_IFMT(upper.st_mode) \
                else None
        fh = filehandle.Fh.decode(value)
        if fh is None or fh.upper or not filehandle.can_decode():
            return None
        fds = self.__dict__.setdefault("_mount_fds", {})
        for layer in range(1 if self.L.has_upper else 0, len(self.L.roots)):
            if self._layer_uuid(layer) != fh.uuid:
                continue
            if layer not in fds:
                try:  # open_by_handle_at takes any fd on the filesystem, but not an O_PATH one
                    fds[layer] = os.open(self.L.roots[layer], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue
            low = filehandle.decoded_stat(fds[layer], fh)
            memo[value] = low
            if low is not None:
                self._ino_dev[low.st_ino] = low.st_dev
                return low if upper is None or st.S_IFMT(low.st_mode) == st.S_IFMT(upper.st_mode) else None
        return None

    @functools.cached_property
    def _inode_map(self) -> "xino.InodeMap":
        """st_dev/st_ino across filesystems (xino.py); a no-op with every layer on one filesystem."""
        devs = [os.stat(r).st_dev for r in self.L.roots]
        upper = devs[0] if self.L.has_upper else None
        mode = getattr(self.ov.options, "xino", "off")
        if mode == "auto" and upper is not None and not filehandle.can_decode():
            mode = "off"  # "fs on ... does not support file handles, falling back to xino=off" (no privilege)
        return xino.InodeMap(upper, devs[1:] if self.L.has_upper else devs, mode, self.dev)

    def _cross_fs(self, node, result: Stat) -> Stat:
        """What the kernel reports for ``result`` when the layers span filesystems (xino=off/on/auto)."""
        if isinstance(node, MergedDir):
            real_dev = self._inode_map_layer_dev(node.layers[0])
        else:
            real_dev = node.lstat.st_dev
        real_dev = self._ino_dev.get(result.ino, real_dev)  # a number taken from a lower inode: its fs
        dev, ino = self._inode_map.map(real_dev, result.ino, isinstance(node, MergedDir))
        return dataclasses.replace(result, dev=dev, ino=ino)

    def _inode_map_layer_dev(self, layer: int) -> int:
        return os.stat(self.L.roots[layer]).st_dev

    def _opaque_new_dirs(self, parent: MergedDir) -> bool:
        """ovl_create_upper: a new directory in a merged one is marked opaque at once when lower layers may
        not be changed offline (``!ovl_allow_offline_changes``: index, nfs_export, metacopy or
        redirect_dir=on), so that it never merges with a lower directory added later."""
        o = self.ov.options
        if not (o.index or o.nfs_export or o.metacopy or o.redirect_dir == "on"):
            return False
        return self.L.has_upper and any(i != 0 for i in parent.layers)  # merged once copied up

    def _init_uuid(self) -> None:
        """ovl_init_uuid_xattr (uuid=auto, the default, shown as uuid=on): the first mount of a new overlay
        (upper root not yet impure) stores a random persistent uuid in ``overlay.uuid`` on the upper root;
        an existing overlay without one stays uuid=null."""
        for name in ("uuid", "impure"):
            try:
                os.getxattr(self.upper, self.encoding.private_prefix + name, follow_symlinks=False)
                return
            except OSError as e:
                if e.errno != errno.ENODATA:
                    return
        try:
            os.setxattr(self.upper, self.encoding.private_prefix + "uuid", uuid.uuid4().bytes, follow_symlinks=False)
        except OSError:
            pass

    # -- index=on (index.py) -------------------------------------------------------------------------
    @property
    def _index_on(self) -> bool:
        return bool(self.upper and self.work and self.L.has_upper and getattr(self.ov.options, "index", False))

    def _mount_index(self) -> None:
        """ovl_get_indexdir: work/index, the upper root tied to the first lower root and the index dir to
        the upper root (ESTALE when they were used with other layers), stale entries cleaned; copy-ups
        are then built in work/index, the kernel's work dir under index=on."""
        xns = self.encoding.private_prefix
        inode_index.make_dir(self.work)
        index_real = os.path.join(self.work, inode_index.NAME)
        inode_index.verify_or_set(self.upper, xns + "origin",
                            filehandle.encode(self.lowers[0], self._layer_uuid(1)), "upper root origin")
        inode_index.verify_or_set(index_real, xns + "upper",
                            filehandle.encode(self.upper, filehandle.fs_uuid(self.upper), upper=True),
                            "index dir 'upper' xattr")
        inode_index.cleanup(index_real, self.encoding.xattr_ns, lambda v: self._decode_origin(v) is not None)
        fd = nofollow.open_dir(self.work, inode_index.NAME)
        if self._workdir_fd is not None:
            os.close(self._workdir_fd)
        self._workdir_fd = fd

    def _index_at(self, name: str):
        if self._workdir_fd is None:
            return nofollow.at(self.work, inode_index.NAME + "/" + name)
        return nofollow.at("", name, self._workdir_fd)  # the work dir fd is work/index's under index=on

    def _index_lstat(self, name: str) -> os.stat_result | None:
        try:
            with self._index_at(name) as real:
                return os.lstat(real)
        except FileNotFoundError:
            return None

    def _index_name(self, node) -> str | None:
        """ovl_need_index: the index entry name of a hard-linked lower non-directory (None: not indexed)."""
        if not self._index_on or not isinstance(node, Leaf) or node.layer == 0 or node.lstat.st_nlink < 2:
            return None
        value = self._origin_value(node.layer, node.where())
        return value.hex() if value else None

    def _upper_index_name(self, node) -> str | None:
        """The index entry an upper non-directory is a name of (same inode), or None."""
        if not isinstance(node, Leaf) or node.layer != 0:
            return None
        try:
            with self._up(node.path) as real:
                s = os.lstat(real)
                if s.st_nlink < 2:
                    return None
                origin = os.getxattr(real, self.encoding.private_prefix + "origin", follow_symlinks=False)
        except OSError:
            return None
        entry = self._index_lstat(origin.hex()) if origin else None
        return origin.hex() if entry is not None and entry.st_ino == s.st_ino else None

    def _index_nlink(self, name: str) -> tuple[os.stat_result, int] | None:
        """The index entry's stat and the merged link count its ``overlay.nlink`` records."""
        try:
            with self._index_at(name) as real:
                s = os.lstat(real)
                try:
                    value = os.getxattr(real, self.encoding.private_prefix + "nlink", follow_symlinks=False)
                except OSError:
                    value = None
        except FileNotFoundError:
            return None
        return s, inode_index.overlay_nlink(s, value)

    def _set_index_nlink(self, name: str, merged: int) -> None:
        with self._index_at(name) as real:
            os.setxattr(real, self.encoding.private_prefix + "nlink",
                        inode_index.nlink_value(merged, os.lstat(real).st_nlink), follow_symlinks=False)

    def _index_stat(self, node: Leaf) -> Stat | None:
        """stat of an indexed inode (overlayfs.rst "Inode properties", index=on): the origin's number and
        the merged link count, for a lower alias (served by the entry) and an upper one alike."""
        name = self._index_name(node) or self._upper_index_name(node)
        got = self._index_nlink(name) if name else None
        if got is None:
            return None
        s, merged = got
        if node.layer != 0:
            ino = node.lstat.st_ino
        else:
            low = self._decode_origin(bytes.fromhex(name), s)
            ino = self._origin_ino.get(s.st_ino, low.st_ino if low is not None else s.st_ino)
        return Stat.from_os(s, nlink=merged, ino=ino, dev=self.dev)

    def _copy_up_indexed(self, node: Leaf, name: str, data: bool, meta: bool = False) -> None:
        """ovl_copy_up_one with index=on: the first name copied up builds the index entry (in work/index,
        renamed into place); every name, the first included, is then a hard link to it (ovl_link_up)."""
        path, s = node.path, node.lstat
        parent, _, leaf = path.rpartition("/")
        self._set_impure(parent)
        if self._index_lstat(name) is None:
            self._make_index_entry(node, name, data, meta)
        _, merged = self._index_nlink(name)
        with self._index_at(name) as entry, self._updir(parent) as up_parent, _parent_times_kept(up_parent):
            os.link(entry, os.path.join(up_parent, leaf), follow_symlinks=False)
        self._set_index_nlink(name, merged)  # one more upper name, the same merged count
        self.L.refresh_upper(path)
        self._copied_here.add(path)
        try:
            with self._up(path) as real:
                self._origin_ino[os.lstat(real).st_ino] = s.st_ino
                self._ino_dev[s.st_ino] = s.st_dev
        except OSError:
            pass
        if self.handles:
            self._redirect_readers(node.layer, path)

    def _make_index_entry(self, node: Leaf, name: str, data: bool, meta: bool = False) -> None:
        """Copy lower ``node`` into work/index/``name`` (built under a temporary name, renamed into place),
        with its origin and a merged link count of the lower's; ``meta``: no data yet (metacopy=on)."""
        s = node.lstat
        with self.L.at(node.layer, node.where()) as src, self._temp() as temp:
            try:
                self._copy_leaf(src, temp, s, data, meta)
                if meta:  # metacopy=on with index=on: the index entry itself holds no data yet
                    os.setxattr(temp, self.encoding.private_prefix + "metacopy", b"", follow_symlinks=False)
                self._copy_meta(src, temp, s, bytes.fromhex(name))
                os.setxattr(temp, self.encoding.private_prefix + "nlink", inode_index.nlink_value(s.st_nlink, 1),
                            follow_symlinks=False)
                with self._index_at(name) as dst:
                    os.rename(temp, dst)
            except BaseException:
                _discard(temp)
                raise

    def _index_is_metacopy(self, name: str) -> bool:
        try:
            with self._index_at(name) as real:
                os.getxattr(real, self.encoding.private_prefix + "metacopy", follow_symlinks=False)
            return True
        except OSError:
            return False

    def _unlink_indexed(self, node: Leaf, name: str) -> None:
        """Unlinking a name of an indexed inode: the merged count drops by one (a lower alias is first
        copied into the index, so the count has a home); at zero the entry goes (ovl_cleanup_index)."""
        if self._index_lstat(name) is None:  # a lower alias of an inode not copied up yet
            self._make_index_entry(node, name, True)
        entry, merged = self._index_nlink(name)
        upper_names = entry.st_nlink - 1 - (1 if node.layer == 0 else 0)  # left after this unlink
        if merged - 1 <= 0:
            with self._index_at(name) as real:
                os.unlink(real)
            return
        with self._index_at(name) as real:  # the count relative to what the upper inode will have
            os.setxattr(real, self.encoding.private_prefix + "nlink",
                        inode_index.nlink_value(merged - 1, upper_names + 1), follow_symlinks=False)


class _Handle:
    """An open file of the sim: the real fd (in upper/ or a lower layer) and where it was opened."""

    __slots__ = ("fd", "layer", "path", "flags", "ino", "meta")

    def __init__(self, fd: int, layer: int, path: str, flags: int, ino: int | None = None, meta: tuple | None = None):
        self.fd, self.layer, self.path, self.flags, self.ino = fd, layer, path, flags, ino
        self.meta = meta  # a metacopy file read from its data below: (layer, path) of the file with its metadata


def _in_layer(leaf: Leaf) -> str:
    """Where a file is inside its own layer (its merged path; under a redirected directory, that layer's)."""
    return leaf.where()


def _copy_data(fd_in: int, fd_out: int) -> None:
    """Copy a whole file between fds inside the kernel (copy_file_range, as ovl_copy_up_data does),
    with a read/write loop where the filesystems cannot."""
    try:
        while os.copy_file_range(fd_in, fd_out, 1 << 24):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while chunk := os.read(fd_in, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd_out, view):]


def _chmod_nofollow(real: str, mode: int) -> None:
    """chmod of ``real`` itself, never of what a symlink there points to."""
    fd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if st.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _discard(path: str) -> None:
    """Remove a half-built copy-up from work/work (best effort: the next mount empties work/work)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _reset_workdir(wd: str, mode: int) -> None:
    """Like ovl_workdir_create at mount: throw away what a killed copy-up left in work/work (it never
    reached upper/), then make work/work afresh."""
    def writable(func, p, exc):  # a directory left with mode 000 (work/work itself, a half-copied dir)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=writable)
            else:
                func(p)
        except OSError:
            pass
    try:
        s = os.lstat(wd)
    except FileNotFoundError:
        s = None
    if s is not None and st.S_ISDIR(s.st_mode):
        shutil.rmtree(wd, onerror=writable)
    elif s is not None:
        os.unlink(wd)
    try:
        os.mkdir(wd, mode)
    except FileExistsError:  # it could not be removed (another user's): use it as it is
        return
    os.chmod(wd, mode)


class _lent:
    """``with _lent(self._updir(path))``: u+wx lent on an upper directory of ours, and its times kept
    (see _parent_times_kept); the directory is reached through an fd opened without following."""

    def __init__(self, at_dir):
        self.at_dir, self.kept = at_dir, None

    def __enter__(self):
        d = self.at_dir.__enter__()
        try:
            self.kept = _parent_times_kept(d)
            self.kept.__enter__()
        except BaseException:
            self.at_dir.__exit__(None, None, None)
            raise
        return d

    def __exit__(self, *exc):
        try:
            self.kept.__exit__(*exc)
        finally:
            self.at_dir.__exit__(*exc)


def _fds_in(path: str) -> tuple[int, ...]:
    """The fd of a `nofollow.at` path (/proc/self/fd/N/name), for a child process to inherit."""
    if path.startswith("/proc/self/fd/"):
        return (int(path.split("/")[4]),)
    return ()


def _readable_as_owner(real: str) -> bool:
    """Could this user read its own file ``real`` with the rights an unprivileged mounter has (root of a
    user namespace that maps this user)?  Only where user namespaces are allowed."""
    try:
        return subprocess.run(["unshare", "--map-root-user", "test", "-r", real], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30, pass_fds=_fds_in(real)).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class _open_lower:
    """``with _open_lower(real) as fd``: a lower file open for reading, never through a symlink; one this
    user owns but may not read is read the way an unprivileged mounter reads it, from inside a user
    namespace (``dd iflag=nofollow`` through a pipe; the lower file itself is never changed)."""

    def __init__(self, real: str):
        self.real, self.proc, self.fd = real, None, -1

    def __enter__(self) -> int:
        try:
            self.fd = os.open(self.real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            return self.fd
        except PermissionError:
            pass
        self.proc = subprocess.Popen(["unshare", "--map-root-user", "dd", f"if={self.real}", "iflag=nofollow",
                                      "bs=1M", "status=none"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, pass_fds=_fds_in(self.real))
        return self.proc.stdout.fileno()

    def __exit__(self, *exc):
        if self.proc is None:
            os.close(self.fd)
            return
        self.proc.stdout.close()
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        if self.proc.wait() != 0 and exc[0] is None:
            raise OSError(errno.EACCES, f"{os.strerror(errno.EACCES)}: {err.decode(errors='replace').strip()}",
                          self.real)


def _err_from(e: OSError, path: str, path2: str | None = None) -> OSError:
    """``e``'s errno with the caller's path(s); an explanatory sentence in ``e`` is kept."""
    err = errno_error(e.errno, path, path2)
    if e.strerror and e.strerror != os.strerror(e.errno):
        err.strerror = e.strerror
    return err


def _caller_paths(method, which: tuple[int, ...]):
    """Errors name the caller's path(s), as the kernel backend's do: never a host path under upper/ or a
    lower (nor a /proc/self/fd one from nofollow), and both names for rename and link; an explanatory
    sentence is kept."""

    @functools.wraps(method)
    def op(self, *args):
        try:
            return method(self, *args)
        except OSError as e:
            paths = tuple(args[i] for i in which)
            if (e.filename, e.filename2) == (paths + (None,))[:2]:
                raise
            raise _err_from(e, *paths) from None
    return op


for _name, _which in {"open": (0,), "listxattr": (0,), "removexattr": (0,), "statfs": (0,), "mknod": (0,),
                      "rename2": (0, 1), "touch": (0,), "remove": (0,), "mkdir": (0,),
                      "rmdir": (0,), "rename": (0, 1), "chmod": (0,), "chown": (0,), "utime": (0,),
                      "setxattr": (0,), "getxattr": (0,), "symlink": (1,), "link": (0, 1), "truncate": (0,),
                      "listdir": (0,), "stat": (0,)}.items():
    setattr(SimBackend, _name, _caller_paths(getattr(SimBackend, _name), _which))
del _name, _which
