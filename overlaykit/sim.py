"""The simulated overlay: the kernel's overlayfs rules in pure Python, writing a real upper/ on disk.

Every rule here follows Documentation/filesystems/overlayfs.rst and fs/overlayfs (ovl_lookup,
ovl_copy_up, ovl_rename, ovl_remove_and_whiteout ...) with the default options: redirect_dir=off,
index=off, metacopy=off, xino=off.  Where this file and the kernel disagree, the kernel is right and
the differential tests (tests/test_differential.py) say where.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import stat as st
import subprocess

from .engine import MAX_LOWERS, Backend, Stat
from .ondisk import OPAQUE_MARKER, WHITEOUT, Layers, Leaf, MergedDir, errno_error

MAXSYMLINKS = 40  # the kernel's limit on symlinks followed in one lookup
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

    def __init__(self, path: str):
        self.parent = os.path.dirname(path)

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


def _lend(dir_path: str) -> _parent_times_kept:
    """The mounter's rights on an upper directory of ours while the kernel would write to it (an xattr,
    say), whatever its mode; its times are kept too."""
    return _parent_times_kept(os.path.join(dir_path, ""))


class SimBackend(Backend):
    """Overlay semantics computed in Python; upper/ receives exactly what the kernel would write."""

    name = "sim"
    keeps_cache_fresh = True  # every change refreshes the cached upper listings it touched

    def __init__(self, ov, layers: Layers):
        super().__init__([str(x) for x in ov.lowers], str(ov.upper) if ov.upper else None,
                         str(ov.work) if ov.work else None, ov.encoding)
        self.L = layers
        self.root_user = os.geteuid() == 0
        self._origins_seen: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    def mount(self) -> None:
        if self.work:  # the kernel keeps its scratch area in work/work (mode 000)
            wd = os.path.join(self.work, "work")
            if not os.path.isdir(wd):
                os.mkdir(wd, 0o000)
                os.chmod(wd, 0o000)

    def unmount(self) -> None:
        pass

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
            except PermissionError:
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
                self._note_origin(node.path)
            if isinstance(node, Leaf) and st.S_ISLNK(node.lstat.st_mode) and (follow or not last):
                hops += 1
                if hops > MAXSYMLINKS:
                    raise _err(errno.ELOOP, p)
                target = os.readlink(L.real(node.layer, node.path))
                if target.startswith("/"):
                    stack = [L.root()]
                parts = target.split("/")
                parts.reverse()
                todo.extend(parts)
                continue
            if last:
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
            real = self.L.real(index, node.path)
            s = os.lstat(real)
            if (s.st_uid, s.st_gid) != (os.geteuid(), os.getegid()) and not os.access(real, os.R_OK):
                raise _err(errno.EACCES, p)

    def _note_origin(self, path: str) -> None:
        """ovl_lookup records a missing origin on an upper dir that merges with a lower one (a "legacy"
        merge dir, e.g. made by hand), so that its inode number can stay constant."""
        if path in self._origins_seen:
            return
        self._origins_seen.add(path)
        real = self._upper_path(path)
        name = self.encoding.private_prefix + "origin"
        try:
            os.getxattr(real, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                try:
                    with _lend(real):
                        os.setxattr(real, name, b"", follow_symlinks=False)
                except OSError:
                    return
                self._set_impure(os.path.dirname(real))  # ovl_fix_origin marks the parent impure too


    def _writable(self, p: str) -> None:
        if self.upper is None:
            raise _err(errno.EROFS, p)

    def _may(self, node, mode: int, p: str) -> None:
        """The permission check the kernel makes before any copy-up (root passes it)."""
        if self.root_user or node is None:
            return
        layer = node.layer if isinstance(node, Leaf) else node.layers[0]
        real = self.L.real(layer, node.path)
        if not os.access(real, mode):
            raise _err(errno.EACCES, p)
        if mode & os.W_OK and not (layer == 0 and self.L.has_upper):
            # ovl_permission: to write a lower entry the mounter must be able to read it, for the copy-up
            s = self._node_stat(node)
            if not (st.S_ISCHR(s.st_mode) or st.S_ISBLK(s.st_mode) or st.S_ISFIFO(s.st_mode) or st.S_ISSOCK(s.st_mode)) \
                    and (s.st_uid, s.st_gid) != (os.geteuid(), os.getegid()) and not os.access(real, os.R_OK):
                raise _err(errno.EACCES, p)

    def _upper_path(self, path: str) -> str:
        return os.path.join(self.upper, path) if path else self.upper

    def _upper_dir(self, d: MergedDir) -> str:
        """Make sure directory ``d`` exists in upper/, copying it and its parents up; return its real path."""
        if d.layers and d.layers[0] == 0 or not d.path:
            return self._upper_path(d.path)
        parts = d.path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            real_up = self._upper_path(sub)
            ents = self.L.entries(0, "/".join(parts[:i - 1]))
            e = ents.get(parts[i - 1]) if ents else None
            if e is not None and e is not WHITEOUT and st.S_ISDIR(e.st_mode):
                continue
            node = self.L.lookup(sub)
            self._copy_dir_up(node, real_up)
        return self._upper_path(d.path)

    def _check_copyable(self, node: Leaf) -> None:
        """Refuse, before anything is written, a copy-up this process cannot do although the kernel can.

        The kernel reads the lower file with the mounter's rights, and an unprivileged mounter may read any
        file it owns whatever its mode (CAP_DAC_OVERRIDE in its user namespace).  This process may not, and
        must not chmod a lower layer to get in."""
        s = node.lstat
        if self.root_user or not st.S_ISREG(s.st_mode) or s.st_uid != os.geteuid():
            return
        real = self.L.real(node.layer, node.path)
        if not os.access(real, os.R_OK) and not _readable_as_owner(real):
            raise OSError(errno.EACCES, f"{os.strerror(errno.EACCES)}: the simulator cannot copy up a lower file "
                          f"it may not read (mode {st.S_IMODE(s.st_mode):04o}) where user namespaces are off; the "
                          "kernel can, as it copies up with the rights of the user who mounted, which include "
                          "reading any file that user owns",
                          node.path)

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
        """ovl_set_impure: a directory that received a copied-up entry is marked ``overlay.impure=y``
        (readdir then looks its upper names up, which hides xattr whiteouts there)."""
        try:
            with _lend(up_dir):
                os.setxattr(up_dir, self.encoding.private_prefix + "impure", b"y", follow_symlinks=False)
        except OSError:
            pass

    def _copy_dir_up(self, node: MergedDir, real_up: str) -> None:
        src = self.L.real(node.layers[0], node.path)
        s = os.lstat(src)
        self._check_mapped(s, node.path)
        self._set_impure(os.path.dirname(real_up))
        with _parent_times_kept(real_up):
            os.mkdir(real_up, 0o700)
            self._copy_meta(src, real_up, s)
        self.L.refresh_upper(node.path, subtree=True)

    def _has_origin(self, real: str) -> bool:
        try:
            os.getxattr(real, self.encoding.private_prefix + "origin", follow_symlinks=False)
            return True
        except OSError:
            return False

    def _copy_meta(self, src: str, dst: str, s: os.stat_result) -> None:
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
        # Like ovl_copy_up_one: mark the copy with an origin xattr.  An empty value is the kernel's own
        # spelling of "copied up, origin unknown" (ovl_get_fh), which it writes when it cannot encode a
        # file handle; the kernel reads it back without complaint.
        # With index=off the kernel records no origin for a hard-linked lower file (it could not keep the
        # links' inode numbers consistent anyway).
        if st.S_ISDIR(s.st_mode) or s.st_nlink == 1:
            try:
                os.setxattr(dst, self.encoding.private_prefix + "origin", b"", follow_symlinks=False)
            except OSError:
                pass  # no xattrs here (some fallback filesystems): upper_changes() then guesses
        if not st.S_ISLNK(s.st_mode):
            os.chmod(dst, st.S_IMODE(s.st_mode))
        os.utime(dst, ns=(s.st_atime_ns, s.st_mtime_ns), follow_symlinks=False)

    def _copy_up(self, node) -> str:
        """Copy a lower entry into upper/ (parents first), returning its upper path."""
        if isinstance(node, MergedDir):
            return self._upper_dir(node)
        if node.layer == 0 and self.L.has_upper:
            return self._upper_path(node.path)
        self._check_copyable(node)
        parent_path = node.path.rpartition("/")[0]
        self._upper_dir(self.L.lookup(parent_path))
        self._check_mapped(node.lstat, node.path)
        src = self.L.real(node.layer, node.path)
        dst = self._upper_path(node.path)
        s = node.lstat
        self._set_impure(os.path.dirname(dst))
        with _parent_times_kept(dst):
            self._copy_leaf(src, dst, s)
        self.L.refresh_upper(node.path)
        return dst

    def _copy_leaf(self, src: str, dst: str, s: os.stat_result) -> None:
        mode = s.st_mode
        if st.S_ISREG(mode):
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with _open_lower(src) as f:
                    while chunk := f.read(1 << 20):
                        os.write(fd, chunk)
            finally:
                os.close(fd)
        elif st.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif st.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            os.mknod(dst, st.S_IFMT(mode) | 0o600, s.st_rdev)
        self._copy_meta(src, dst, s)

    def _clear_whiteout(self, d: MergedDir, up_dir: str, name: str) -> bool:
        ents = self.L.entries(0, d.path)
        if ents and ents.get(name) is WHITEOUT:
            self.encoding.remove_whiteout(up_dir, name)
            self.L.refresh_upper(_join(d.path, name), subtree=True)
            return True
        return False

    def _lower_positive(self, parent: MergedDir, name: str) -> bool:
        """Does a lower layer still show ``name`` under ``parent``?  Then deleting it needs a whiteout."""
        lower = tuple(i for i in parent.layers if not (self.L.has_upper and i == 0))
        if self.L.has_upper and parent.layers and parent.layers[0] == 0 and parent.opaque_stop and len(parent.layers) == 1:
            return False
        return bool(lower) and self.L.child(MergedDir(parent.path, lower), name) is not None

    def _refresh(self, parent: MergedDir) -> MergedDir:
        node = self.L.lookup(parent.path)
        return node if isinstance(node, MergedDir) else parent

    def _whiteout(self, parent: MergedDir, name: str) -> None:
        up = self._upper_dir(parent)
        self.encoding.make_whiteout(up, name)
        self.L.refresh_upper(_join(parent.path, name), subtree=True)

    def _create_prep(self, parent: MergedDir, name: str, p: str) -> tuple[str, bool]:
        """Parent copied up, any whiteout at ``name`` removed: (upper dir, whether a whiteout was there)."""
        self._may(parent, os.W_OK | os.X_OK, p)
        up = self._upper_dir(parent)
        return up, self._clear_whiteout(self._refresh(parent), up, name)

    # -- operations --------------------------------------------------------------------------------
    def read_bytes(self, p: str) -> bytes:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, MergedDir):
            self._may(node, os.R_OK, p)  # open(O_RDONLY) checks read permission; read() then says EISDIR
            raise _err(errno.EISDIR, p)
        try:
            with open(self.L.real(node.layer, node.path), "rb") as f:
                return f.read()
        except OSError as e:
            raise _err(e.errno, p) from None

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
            target = os.readlink(self.L.real(node.layer, node.path))
            q = target.lstrip("/") if target.startswith("/") else _join(parent.path, target)
            if not q:
                return
        raise _err(errno.ELOOP, p)

    def write_bytes(self, p: str, data: bytes, append: bool) -> None:
        self._check_create_target(p)
        parent, name, node = self._resolve(p, True)
        if isinstance(node, MergedDir):
            raise _err(errno.EISDIR, p)
        self._writable(p)
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        if node is None:
            up, _ = self._create_prep(parent, name, p)
            real = os.path.join(up, name)
            rel = _join(parent.path, name)
            flags |= os.O_CREAT | os.O_EXCL
        else:
            self._may(node, os.W_OK, p)
            real = self._copy_up(node)
            rel = node.path
        fd = os.open(real, flags, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
            self.L.refresh_upper(rel)

    def touch(self, p: str) -> None:
        try:
            parent, name, node = self._resolve(p, True)
        except FileNotFoundError:
            self._check_create_target(p)  # the open(O_CREAT) after utime's ENOENT may say EISDIR instead
            raise
        if node is None:  # like touch(1): utime, and on ENOENT open(O_CREAT)
            self._check_create_target(p)
            self._writable(p)
            up, _ = self._create_prep(parent, name, p)
            os.close(os.open(os.path.join(up, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            self.L.refresh_upper(_join(parent.path, name))
            return
        self.utime(p, None)

    def utime(self, p: str, times) -> None:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        self._owner_or_writable(node, p, times is None)
        os.utime(self._copy_up(node), times)
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
        return os.lstat(self.L.real(node.layers[0], node.path))

    def remove(self, p: str) -> None:
        parent, name, node = self._resolve(p, False)
        self._writable(p)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, MergedDir):
            raise _err(errno.EISDIR, p)
        self._may(parent, os.W_OK | os.X_OK, p)
        self._check_sticky(parent, node, p)
        if node.layer == 0 and self.L.has_upper:
            os.unlink(self._upper_path(node.path))
            self.L.refresh_upper(node.path)
        if self._lower_positive(parent, name):
            self._whiteout(parent, name)

    def mkdir(self, p: str, mode: int) -> None:
        parent, name, node = self._resolve(p, False)
        if node is not None or parent is None:
            raise _err(errno.EEXIST, p)
        self._writable(p)
        up, was_whiteout = self._create_prep(parent, name, p)
        real = os.path.join(up, name)
        os.mkdir(real, mode)
        if was_whiteout:
            with _lend(real):
                self.encoding.set_opaque(real)
        self.L.refresh_upper(_join(parent.path, name), subtree=True)

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
            real = self._upper_path(node.path)
            if lower_positive:  # ovl_remove_and_whiteout clears the whiteouts inside first
                self._remove_upper_dir(node.path)
            else:  # ovl_remove_upper: a plain rmdir of the upper dir; leftover whiteouts make it ENOTEMPTY
                if self.encoding.kind == "fallback" and os.path.lexists(os.path.join(real, OPAQUE_MARKER)):
                    os.unlink(os.path.join(real, OPAQUE_MARKER))
                try:
                    os.rmdir(real)
                except OSError as e:
                    raise _err(e.errno, p) from None
                finally:
                    self.L.refresh_upper(node.path, subtree=True)
        if lower_positive:
            self._whiteout(parent, name)

    def _remove_upper_dir(self, path: str) -> None:
        """Remove an upper directory that looks empty in the merged view (it may hold whiteouts)."""
        real = self._upper_path(path)
        for entry in os.listdir(real):
            os.unlink(os.path.join(real, entry))
        os.rmdir(real)
        self.L.refresh_upper(path, subtree=True)

    def rename(self, src: str, dst: str) -> None:
        for q in (src, dst):  # renameat2 walks to both parents before it looks either name up
            head = q.rstrip("/").rpartition("/")[0]
            node = self._resolve(head, True)[2] if head else None
            if head and not isinstance(node, MergedDir):
                raise _err(errno.ENOENT if node is None else errno.ENOTDIR, src, dst)
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
        has_upper = self.L.has_upper
        if s_dir and not (has_upper and snode.layers == (0,)):
            raise _err(errno.EXDEV, src, dst)  # redirect_dir=off: a lower or merged directory cannot move
        d_merge_or_lower = isinstance(dnode, MergedDir) and not (has_upper and dnode.layers == (0,))
        if d_merge_or_lower and self.L.visible_names(dnode):
            raise _err(errno.ENOTEMPTY, src, dst)
        self._may(sparent, os.W_OK | os.X_OK, src)
        self._may(dparent, os.W_OK | os.X_OK, dst)
        self._check_sticky(sparent, snode, src)
        self._check_sticky(dparent, dnode, dst)
        old_opaque = s_dir and self.L.is_opaque(0, snode.path)
        src_real = self._copy_up(snode)
        lower_positive = self._lower_positive(sparent, sname)
        up_d = self._upper_dir(dparent)
        dparent = self._refresh(dparent)
        if s_dir and not old_opaque and any(i != 0 for i in dparent.layers):
            # ovl_rename marks the moved dir opaque *before* the real rename, so that a lower dir of the
            # same name at the destination cannot show through; the mark stays even if the rename fails.
            with _lend(src_real):
                self.encoding.set_opaque(src_real)
            self.L.refresh_upper(snode.path, subtree=True)
        self._clear_whiteout(dparent, up_d, dname)
        if sparent.path != dparent.path and self._has_origin(src_real):
            self._set_impure(up_d)  # ovl_rename: a moved entry with an origin makes its new parent impure
        dst_real = os.path.join(up_d, dname)
        dst_path = _join(dparent.path, dname)
        if d_merge_or_lower and dnode.layers[0] == 0:
            self._remove_upper_dir(dst_path)
        try:
            os.rename(src_real, dst_real)
        except OSError as e:
            raise _err(e.errno, src, dst) from None
        finally:
            self.L.refresh_upper(snode.path, subtree=True)
            self.L.refresh_upper(dst_path, subtree=True)
        if lower_positive:
            self._whiteout(self._refresh(sparent), sname)

    def chmod(self, p: str, mode: int) -> None:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        if not self.root_user and self._node_stat(node).st_uid != os.geteuid():
            raise _err(errno.EPERM, p)
        os.chmod(self._copy_up(node), mode)
        self.L.refresh_upper(node.path, subtree=isinstance(node, MergedDir))

    def chown(self, p: str, uid: int, gid: int) -> None:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        s = self._node_stat(node)
        if not self.root_user and not ((uid in (-1, s.st_uid)) and s.st_uid == os.geteuid()
                                       and (gid == -1 or gid in os.getgroups() or gid == os.getegid())):
            raise _err(errno.EPERM, p)
        try:
            os.chown(self._copy_up(node), uid, gid)
        except OSError as e:
            raise _err(e.errno, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def setxattr(self, p: str, name: str, value: bytes) -> None:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        self._writable(p)
        if name.startswith("trusted.") and not self.root_user:
            raise _err(errno.EPERM, p)
        if not self.root_user:
            self._may(node, os.W_OK, p)
            ns = self._node_stat(node)
            if name.startswith("user.") and st.S_ISDIR(ns.st_mode) and ns.st_mode & st.S_ISVTX and \
                    ns.st_uid != os.geteuid():
                raise _err(errno.EPERM, p)  # xattr_permission: user.* on a sticky dir is for its owner only
        try:
            os.setxattr(self._copy_up(node), self._escape(name), value, follow_symlinks=False)
        except OSError as e:
            raise _err(e.errno, p) from None
        finally:
            self.L.refresh_upper(node.path)

    def getxattr(self, p: str, name: str) -> bytes:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        real = self.L.real(node.layer if isinstance(node, Leaf) else node.layers[0], node.path)
        try:
            return os.getxattr(real, self._escape(name), follow_symlinks=False)
        except OSError as e:
            raise _err(e.errno, p) from None

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
        up, _ = self._create_prep(parent, name, p)
        os.symlink(target, os.path.join(up, name))
        self.L.refresh_upper(_join(parent.path, name))

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
        src_real = self._copy_up(snode)
        up, _ = self._create_prep(self._refresh(dparent), dname, dst)
        os.link(src_real, os.path.join(up, dname), follow_symlinks=False)
        self.L.refresh_upper(snode.path)
        self.L.refresh_upper(_join(dparent.path, dname))

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
                or not os.access(self.L.real(node.layer, node.path), os.R_OK | os.W_OK):
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
        os.truncate(self._copy_up(node), size)
        self.L.refresh_upper(node.path)

    def listdir(self, p: str) -> list[str]:
        _, _, node = self._resolve(p, True)
        if node is None:
            raise _err(errno.ENOENT, p)
        if isinstance(node, Leaf):
            raise _err(errno.ENOTDIR, p)
        self._may(node, os.R_OK, p)
        names = self.L.names(node)
        if not self.root_user and len(node.layers) > 1 and node.layers[0] == 0 and self.L.has_upper and \
                _has_impure(self._upper_path(node.path), self.encoding.private_prefix):
            # An impure merged dir: ovl_iterate looks every upper name up (for d_ino) and drops those whose
            # lookup fails, e.g. on a lower directory the unprivileged mounter may not read (see _resolve_walk)
            upper_names = self.L.entries(0, node.path) or {}
            names = [n for n in names if n not in upper_names or self._looks_up(_join(node.path, n))]
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
        if not self.root_user and (result.uid != os.geteuid() or result.gid != os.getegid()):
            # An unprivileged mount lives in a user namespace that maps only this user's own ids: any other
            # owner shows as the overflow ids, as through the kernel backend.
            result = dataclasses.replace(
                result, uid=result.uid if result.uid == os.geteuid() else OVERFLOW_UID,
                gid=result.gid if result.gid == os.getegid() else OVERFLOW_GID)
        if not (self.L.has_upper and (node.layer if isinstance(node, Leaf) else node.layers[0]) == 0):
            memo[key] = result  # lower layers do not change while mounted; upper entries may
        return result

    def _stat(self, node) -> Stat:
        if isinstance(node, Leaf):
            s = node.lstat
            if node.layer == 0 and self.L.has_upper:
                s = os.lstat(self._upper_path(node.path))  # upper entries change under us
            target = os.readlink(self.L.real(node.layer, node.path)) if st.S_ISLNK(s.st_mode) else None
            return Stat.from_os(s, target)
        s = os.lstat(self.L.real(node.layers[0], node.path))
        return Stat.from_os(s, nlink=1 if len(node.layers) > 1 else None)



def _has_impure(real: str, prefix: str) -> bool:
    try:
        return os.getxattr(real, prefix + "impure", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _readable_as_owner(real: str) -> bool:
    """Could this user read its own file ``real`` with the rights an unprivileged mounter has (root of a
    user namespace that maps this user)?  Only where user namespaces are allowed."""
    try:
        return subprocess.run(["unshare", "--map-root-user", "test", "-r", real], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class _open_lower:
    """Open a lower file for reading; one this user owns but may not read is read the way an unprivileged
    mounter reads it, from inside a user namespace (the lower file itself is never changed)."""

    def __init__(self, real: str):
        self.real, self.proc = real, None

    def __enter__(self):
        try:
            self.file = open(self.real, "rb")
        except PermissionError:
            self.proc = subprocess.Popen(["unshare", "--map-root-user", "cat", "--", self.real],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.file = self.proc.stdout
        return self.file

    def __exit__(self, *exc):
        self.file.close()
        if self.proc is not None:
            err = self.proc.stderr.read()
            self.proc.stderr.close()
            if self.proc.wait() != 0 and exc[0] is None:
                raise OSError(errno.EACCES, f"{os.strerror(errno.EACCES)}: {err.decode(errors='replace').strip()}",
                              self.real)


def _with_caller_paths(method, two_paths: bool, index: int):
    """Errors name the caller's path(s), as the kernel backend's do: never a host path under upper/ or a
    lower, and both names for rename and link."""

    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            return method(self, *args)
        except OSError as e:
            paths = (args[0], args[1]) if two_paths else (args[index],)
            if (e.filename, e.filename2) == (paths + (None,))[:2]:
                raise
            err = errno_error(e.errno, *paths)
            if e.strerror and e.strerror != os.strerror(e.errno):  # keep an explanatory sentence
                err.strerror = e.strerror
            raise err from None
    return wrapper


for _name in ("read_bytes", "write_bytes", "touch", "utime", "remove", "mkdir", "rmdir", "rename", "chmod", "chown",
              "setxattr", "getxattr", "symlink", "link", "truncate", "listdir", "stat"):
    setattr(SimBackend, _name, _with_caller_paths(getattr(SimBackend, _name), _name in ("rename", "link"),
                                                  1 if _name == "symlink" else 0))
