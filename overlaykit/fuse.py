"""``overlaykit-fuse``: the simulator as a real filesystem, with fuse-overlayfs's command line.

Every FUSE request becomes one call of the public `Overlay` API on the sim backend (never a direct look at
the layer directories), so what a shell, ``ls -la`` or a test suite sees through the mount is the
simulator itself, judged by the same tools as the kernel's overlay.  The kernel checks permissions
(``default_permissions``) against the attributes reported here, with the caller's uid, gid and groups.

Forms accepted (the second is what ``mount -t fuse.overlaykit-fuse overlaykit MNT -o ...`` runs)::

    overlaykit-fuse -o lowerdir=A:B,upperdir=U,workdir=W[,options] MOUNTPOINT
    overlaykit-fuse SOURCE MOUNTPOINT -o OPTIONS

It returns once the mount is up and serves in the background; ``-f`` stays in the foreground.
``fusermount3 -u MOUNTPOINT`` ends it.

Inode numbers, times in ns, blocks and rdev come from the engine's `Stat`; files are created with the
caller's uid/gid (a root daemon chowns them, as the kernel creates with the caller's fsuid).  The kernel
caches no attributes by default (``attr_timeout=0``): libfuse's path-based API gives each name of a hard
link its own kernel inode, so a cached link count would be stale; ``-o attr_timeout=1`` is ~70x faster
for ``stat`` and may show a link count a second late.  Known limit of that API: ``fstat`` on an open file
whose last name was removed fails with ESTALE (reads and writes through it work).
"""
from __future__ import annotations

import errno
import inspect
import itertools
import os
import shutil
import stat as st
import sys
import threading
import time
import zlib

FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

PROG = "overlaykit-fuse"

#: The kernel overlay's own options: their default values are what the engine implements today.
KERNEL_DEFAULTS = {"redirect_dir": "off", "index": "off", "metacopy": "off", "xino": "off",
                   "nfs_export": "off", "volatile": None}
#: Options handed to libfuse / the kernel's FUSE mount as they are (mount.fuse3 adds some of them).
FUSE_PASSTHROUGH = {"rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                    "relatime", "norelatime", "strictatime", "nostrictatime", "sync", "async", "dirsync",
                    "lazytime", "nolazytime", "allow_other", "allow_root", "auto_unmount", "default_permissions",
                    "silent", "loud", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail"}
#: libfuse's own tuning options, passed on (e.g. attr_timeout=1 trades exact link counts for speed).
LIBFUSE_TUNING = {"attr_timeout", "entry_timeout", "negative_timeout", "ac_attr_timeout", "max_read",
                  "kernel_cache", "auto_cache", "noforget", "remember"}
#: Options the kernel's FUSE mount itself rejects or libfuse 3 does not know: dropped like mount(8) does.
DROPPED = {"defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "rw", "silent", "loud",
           "atime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime", "async", "sync",
           "dirsync", "relatime", "noatime"}


USAGE = (f"usage: {PROG} -o lowerdir=A:B,upperdir=U,workdir=W[,options] [-f] [-d] MOUNTPOINT\n"
         f"   or: {PROG} SOURCE MOUNTPOINT -o OPTIONS   (mount -t fuse.{PROG} SOURCE MOUNTPOINT -o ...)\n"
         "options: the kernel overlay's (redirect_dir=, index=, metacopy=, xino=, userxattr), FUSE mount options "
         "(allow_other, ro, nosuid, ...), attr_timeout=SECONDS; -f: stay in the foreground; -d: debug")


class UsageError(Exception):
    """A bad command line or option: printed as one sentence, exit status 1."""


def fuse_unavailable() -> str | None:
    """Why FUSE cannot be used here, in one sentence, or None when it can (used by ``doctor`` too)."""
    if not os.path.exists("/dev/fuse"):
        return "FUSE is not available here: there is no /dev/fuse (a container without it, e.g. Binder)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # fusermount3 opens the device with the caller's rights, so its setuid bit does not help
        mode = oct(st.S_IMODE(os.stat("/dev/fuse").st_mode))
        return (f"FUSE is not available to this user: /dev/fuse (mode {mode[2:]}) cannot be opened by uid "
                f"{os.geteuid()} (Debian's default is 0666)")
    if os.geteuid() != 0:
        helper = shutil.which("fusermount3") or shutil.which("fusermount3", path="/usr/bin:/bin")
        if not helper:
            return "FUSE is not available here: fusermount3 is missing (apt-get install fuse3)"
        if not os.stat(helper).st_mode & st.S_ISUID:
            return "FUSE is not available here: fusermount3 is not setuid root, so users cannot mount"
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        return "FUSE is not available here: the binding is missing (pip install 'overlaykit[fuse]')"
    except OSError as e:
        return f"FUSE is not available here: libfuse could not be loaded ({e}; apt-get install fuse3)"
    return None


# -- command line --------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> dict:
    """fuse-overlayfs's and mount.fuse3's command lines → {"mountpoint", "source", "foreground", "opts"}."""
    opts: list[str] = []
    positional: list[str] = []
    foreground = debug = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o":
            if i + 1 >= len(argv):
                raise UsageError("-o needs a list of options (lowerdir=A:B,upperdir=U,workdir=W)")
            opts.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif a == "-f":
            foreground = True
        elif a == "-d":
            foreground = debug = True
        elif a in ("-h", "--help"):
            raise UsageError(USAGE)
        elif a.startswith("-"):
            raise UsageError(f"unknown flag {a!r}: use -o OPTIONS, -f (foreground) or -d (debug)")
        else:
            positional.append(a)
        i += 1
    if len(positional) == 1:
        source, mountpoint = PROG, positional[0]
    elif len(positional) == 2:
        source, mountpoint = positional
    else:
        raise UsageError(USAGE)
    parsed: dict[str, str | None] = {}
    for group in opts:
        for item in _split_options(group):
            key, eq, value = item.partition("=")
            parsed[key] = value if eq else None
    return {"mountpoint": mountpoint, "source": source, "foreground": foreground, "debug": debug,
            "opts": parsed}


def _split_options(text: str) -> list[str]:
    """Split at commas; ``\\,`` keeps a comma in a path (as mount(8) and fuse-overlayfs allow)."""
    items, cur, esc = [], [], False
    for ch in text:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [x for x in items if x]


def overlay_config(opts: dict) -> dict:
    """The Overlay arguments from the -o options; refuses what the engine cannot honour, naming the option."""
    from .engine import Overlay
    lower = opts.pop("lowerdir", None)
    if not lower:
        raise UsageError("no lowerdir= given: -o lowerdir=A:B,upperdir=U,workdir=W")
    lowers = [x for x in lower.replace("::", ":").split(":") if x]  # data-only "::" layers: treat as lowers
    upper, work = opts.pop("upperdir", None), opts.pop("workdir", None)
    if (upper is None) != (work is None):
        raise UsageError("upperdir= and workdir= go together (or give neither for a read-only overlay)")
    userxattr = "userxattr" in opts
    opts.pop("userxattr", None)
    kernel_opts = {}
    for key in list(opts):
        if key in KERNEL_DEFAULTS:
            kernel_opts[key] = opts.pop(key)
    accepts_options = "options" in inspect.signature(Overlay).parameters
    config = {"lowers": lowers, "upper": upper, "work": work, "userxattr": userxattr}
    if accepts_options:
        from .options import Options
        try:
            Options.parse(kernel_opts)  # a bad value or an unknown name: one sentence now, not at mount
        except (OSError, ValueError) as e:
            raise UsageError(f"bad overlay option: {getattr(e, 'strerror', None) or e}") from None
        config["options"] = {k: v for k, v in kernel_opts.items()}
    else:
        for key, value in kernel_opts.items():
            if value != KERNEL_DEFAULTS[key] or value is None:
                raise UsageError(f"option {key}{'=' + value if value else ''} is not supported by the "
                                 f"simulator yet (only the kernel's default {key}="
                                 f"{KERNEL_DEFAULTS[key] or 'unset'})")
    unknown = [k for k in opts if k not in FUSE_PASSTHROUGH and k not in LIBFUSE_TUNING
               and k not in ("fsname", "subtype")]
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}: give lowerdir=, upperdir=, workdir=, the overlay "
                         f"options (redirect_dir=, index=, metacopy=, xino=, userxattr) or FUSE mount options")
    return config


def make_overlay(config: dict):
    from . import ondisk
    from .engine import Overlay
    kw = {}
    if config.get("options"):
        kw["options"] = config["options"]
    if config["userxattr"]:
        kw["encoding"] = ondisk.Encoding("kernel", "user")
    return Overlay(config["lowers"], config["upper"], config["work"], backend="sim", trace=False, **kw)


# -- the filesystem ------------------------------------------------------------------------------------
def _rel(path: str | None) -> str:
    if path is None:  # libfuse gives no path for a removed name reached without its handle
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
    return path.lstrip("/") or "."



def build_operations(ov, *, as_root: bool):
    """An mfusepy `Operations` object whose every method is one or a few `Overlay` calls."""
    import mfusepy

    lock = threading.Lock()

    def engine(fn):
        """Serialise engine calls; the engine's OSError errno goes back to the kernel as is."""
        def wrapper(self, *args):
            with lock:
                return fn(self, *args)
        wrapper.__name__ = fn.__name__
        return wrapper

    def owner_of_caller(p: str) -> None:
        """What a caller creates is the caller's (the kernel creates with the caller's fsuid/fsgid)."""
        if as_root:
            uid, gid, _pid = mfusepy.fuse_get_context()
            if (uid, gid) != (os.geteuid(), os.getegid()):
                ov.chown(p, uid, gid, follow_symlinks=False)

    counter = itertools.count(1)
    dirs: dict[int, str] = {}  # open directory handle -> its path (libfuse passes no path with nullpath_ok)

    def attributes(p: str, s=None) -> dict:
        s = ov.lstat(p) if s is None else s
        return {"st_mode": s.st_mode, "st_ino": s.ino, "st_nlink": s.nlink, "st_uid": s.uid, "st_gid": s.gid,
                "st_size": s.size, "st_atime": s.atime_ns, "st_mtime": s.mtime_ns, "st_ctime": s.ctime_ns,
                "st_rdev": s.rdev, "st_blocks": s.blocks}

    class Ops(mfusepy.Operations):
        use_ns = True
        # an open file whose name was removed keeps working through its handle (path None, as fstat)
        flag_nopath = flag_nullpath_ok = True

        @engine
        def getattr(self, path, fh=None):
            if fh:  # an open file whose name may be gone (fstat)
                return attributes(path and _rel(path), ov.fstat(fh))
            return attributes(_rel(path))

        @engine
        def readlink(self, path):
            s = ov.lstat(_rel(path))
            if s.kind != "symlink":
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            return s.target

        @engine
        def opendir(self, path):
            d = _rel(path)
            if ov.lstat(d).kind != "dir":
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            h = next(counter)
            dirs[h] = d
            return h

        def releasedir(self, path, fh):
            dirs.pop(fh, None)
            return 0

        @engine
        def readdir(self, path, fh):
            # with use_ino, a name listed without its inode number would read as d_ino 0, which
            # readdir(3) skips: give each name its mode and number (a whited-out name is never listed)
            d = dirs[fh] if path is None else _rel(path)
            entries = [(".", attributes(d), 0), ("..", {"st_mode": st.S_IFDIR, "st_ino": 1}, 0)]
            for name in ov.listdir(d):
                try:
                    attrs = attributes(name if d == "." else f"{d}/{name}")
                except OSError:
                    # listed but not found (an xattr whiteout the kernel's readdir does not filter): the
                    # name stays listed, as on the kernel, with a made-up nonzero number (0 would hide it)
                    attrs = {"st_mode": st.S_IFREG, "st_ino": zlib.crc32(f"{d}/{name}".encode()) | 1 << 32}
                entries.append((name, attrs, 0))
            return entries

        @engine
        def mkdir(self, path, mode):
            p = _rel(path)
            ov.mkdir(p, st.S_IMODE(mode))
            owner_of_caller(p)

        @engine
        def rmdir(self, path):
            ov.rmdir(_rel(path))

        @engine
        def unlink(self, path):
            ov.remove(_rel(path))

        @engine
        def symlink(self, target, source):
            # mfusepy: symlink(name_of_the_link, what_it_points_to)
            p = _rel(target)
            ov.symlink(source, p)
            owner_of_caller(p)

        @engine
        def link(self, target, source):
            ov.link(_rel(source), _rel(target))

        @engine
        def rename(self, old, new, flags=0):
            ov.rename(_rel(old), _rel(new), flags=flags)

        @engine
        def chmod(self, path, mode):
            ov.chmod(_rel(path), st.S_IMODE(mode))

        @engine
        def chown(self, path, uid, gid):
            p = _rel(path)
            s = ov.lstat(p)
            ov.chown(p, s.uid if uid == -1 else uid, s.gid if gid == -1 else gid, follow_symlinks=False)

        @engine
        def utimens(self, path, times=None):
            """``times`` holds (sec, nsec) pairs as the kernel sent them, UTIME_NOW/UTIME_OMIT included."""
            p = _rel(path)
            if times is None or all(ns == UTIME_NOW for _, ns in times):
                ov.utime(p, None, follow_symlinks=False)
                return
            s = ov.lstat(p)
            current = (s.atime_ns, s.mtime_ns)
            now = time.time_ns()
            values = tuple(now if ns == UTIME_NOW else cur if ns == UTIME_OMIT else sec * 10**9 + ns
                           for (sec, ns), cur in zip(times, current))
            ov.utime(p, ns=values, follow_symlinks=False)

        @engine
        def truncate(self, path, length, fh=None):
            if fh:
                ov.ftruncate(fh, length)
            else:
                ov.truncate(_rel(path), length)

        @engine
        def create(self, path, mode, flags=0):
            p = _rel(path)
            h = ov.os_open(p, flags | os.O_CREAT, st.S_IMODE(mode))
            owner_of_caller(p)
            return h

        @engine
        def mknod(self, path, mode, dev):
            p = _rel(path)
            ov.mknod(p, mode, dev)
            owner_of_caller(p)

        @engine
        def open(self, path, flags):
            """Copy-up happens here when write access is asked for (O_TRUNC reaches us: atomic_o_trunc)."""
            p = _rel(path)
            return ov.os_open(p, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))

        @engine
        def read(self, path, size, offset, fh):
            return ov.pread(fh, size, offset)

        @engine
        def write(self, path, data, offset, fh):
            return ov.pwrite(fh, bytes(data), offset)

        def flush(self, path, fh):
            return 0

        @engine
        def release(self, path, fh):
            ov.close(fh)
            return 0

        def fsync(self, path, datasync, fh):
            return 0

        def init_with_config(self, conn, config):
            if conn is not None:  # O_TRUNC reaches open(): a truncating open copies metadata only
                conn.want |= FUSE_CAP_ATOMIC_O_TRUNC

        @engine
        def getxattr(self, path, name, position=0):
            try:
                return ov.getxattr(_rel(path), name, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    raise OSError(mfusepy.ENOATTR, os.strerror(mfusepy.ENOATTR), path) from None
                raise

        @engine
        def setxattr(self, path, name, value, options, position=0):
            ov.setxattr(_rel(path), name, value, options, follow_symlinks=False)

        @engine
        def listxattr(self, path):
            return ov.listxattr(_rel(path), follow_symlinks=False)

        @engine
        def removexattr(self, path, name):
            ov.removexattr(_rel(path), name, follow_symlinks=False)

        @engine
        def statfs(self, path):
            s = ov.statfs(_rel(path))
            return {k: getattr(s, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                               "f_files", "f_ffree", "f_favail", "f_namemax")}

        def destroy(self, path):
            with lock:
                ov.unmount()

    return Ops()


def _fuse_class():
    import mfusepy

    class FUSE(mfusepy.FUSE):
        """mfusepy drops renameat2's flags; pass them on so RENAME_NOREPLACE is never silently ignored."""

        def rename_fuse_3(self, old, new, flags):
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def utimens_fuse_3(self, path, buf, fip):
            times = None
            if buf:
                times = tuple((t.tv_sec, t.tv_nsec) for t in (buf.contents.actime, buf.contents.modtime))
            return self.operations.utimens(path.decode(self.encoding, self.errors), times)

    return FUSE


# -- entry point ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        opts = dict(args["opts"])
        config = overlay_config(opts)
    except UsageError as e:
        if any(a in ("-h", "--help") for a in argv):
            print(USAGE)
            return 0
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    why = fuse_unavailable()
    if why:
        print(f"{PROG}: {why}.", file=sys.stderr)
        return 1
    mountpoint = os.path.abspath(args["mountpoint"])
    if not os.path.isdir(mountpoint):
        print(f"{PROG}: the mount point {mountpoint} is not a directory.", file=sys.stderr)
        return 1
    os.umask(0)  # the kernel has applied the caller's umask to every mode it sends
    ov = make_overlay(config)
    try:
        ov.mount()
    except (OSError, ValueError, RuntimeError) as e:
        print(f"{PROG}: the overlay cannot be mounted: {e}", file=sys.stderr)
        return 1
    as_root = os.geteuid() == 0
    fuse_opts = {k: (v if v is not None else True) for k, v in opts.items() if k not in DROPPED}
    fuse_opts.pop("fsname", None)
    fuse_opts.pop("subtype", None)
    # no attribute cache by default: one operation can change another name's attributes (a hard link's
    # count, an inode number after copy-up), and the kernel must see what the engine says at once
    fuse_opts.setdefault("attr_timeout", 0)
    if as_root:
        fuse_opts.setdefault("allow_other", True)  # like a kernel mount: every user may look (permissions apply)
    ops = build_operations(ov, as_root=as_root)
    try:
        _fuse_class()(ops, mountpoint, foreground=args["foreground"], debug=args["debug"], nothreads=True,
                      fsname=args["source"], subtype=PROG, default_permissions=True, use_ino=True, hard_remove=True,
                      **fuse_opts)
    except RuntimeError as e:
        print(f"{PROG}: FUSE could not mount {mountpoint}: {e}", file=sys.stderr)
        return 1
    finally:
        ov.unmount()
    return 0


if __name__ == "__main__":
    sys.exit(main())
