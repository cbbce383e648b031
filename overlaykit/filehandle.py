"""Overlayfs file handles: the ``overlay.origin`` / ``overlay.upper`` xattr values and the index names.

On copy-up the kernel records which lower inode an upper file came from (``ovl_set_origin``): an
``struct ovl_fb`` (fs/overlayfs/overlayfs.h) holding the lower filesystem's UUID and the inode's
export file handle, the same bytes ``name_to_handle_at(2)`` returns.  Later lookups decode it to keep
the file's inode number across renames and remounts, ``index=on`` names ``work/index/<hex>`` after it,
and verifies the upper root against the lower root with it.

Layout (little-endian flags = 0 on x86; verified byte for byte against 6.18)::

    u8 version (0) | u8 magic (0xfb) | u8 len | u8 flags | u8 type | u8 uuid[16] | fid[len - 21]

``flags``: OVL_FH_FLAG_BIG_ENDIAN 1, OVL_FH_FLAG_ANY_ENDIAN 2, OVL_FH_FLAG_PATH_UPPER 4.
``uuid`` is the filesystem's ``s_uuid`` (``FS_IOC_GETFSUUID``; all zero for an ext4 made without one),
or all zero with ``uuid=off``.  The kernel encodes handles only when it may decode them
(``ovl_can_decode_fh``: CAP_DAC_READ_SEARCH in the initial namespace, a filesystem with export
operations); otherwise it writes an empty ``origin`` ("copied up, origin unknown").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import sys
from dataclasses import dataclass

VERSION = 0
MAGIC = 0xFB
HEADER = 21  # version, magic, len, flags, type, uuid[16]
FLAG_BIG_ENDIAN = 1 << 0
FLAG_ANY_ENDIAN = 1 << 1
FLAG_PATH_UPPER = 1 << 2
CPU_ENDIAN = FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
MAX_HANDLE_SZ = 128
NULL_UUID = bytes(16)

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
# FS_IOC_GETFSUUID = _IOR(0x15, 0, struct fsuuid2 { __u8 len; __u8 uuid[16]; })  (Linux 6.5+)
_FS_IOC_GETFSUUID = (2 << 30) | (17 << 16) | (0x15 << 8) | 0


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]


@dataclass(frozen=True)
class Fh:
    """A decoded ``ovl_fb``."""

    type: int
    fid: bytes
    uuid: bytes = NULL_UUID
    flags: int = CPU_ENDIAN

    @property
    def upper(self) -> bool:
        return bool(self.flags & FLAG_PATH_UPPER)

    def encode(self) -> bytes:
        """The xattr value, exactly as ``ovl_encode_real_fh`` lays it out."""
        return bytes((VERSION, MAGIC, HEADER + len(self.fid), self.flags, self.type)) + self.uuid + self.fid

    def hex(self) -> str:
        """The index entry's name (``ovl_get_index_name_fh``: the whole ``ovl_fb`` in lower-case hex)."""
        return self.encode().hex()

    @classmethod
    def decode(cls, value: bytes) -> "Fh | None":
        """Parse an ``origin``/``upper`` value; None for the empty "origin unknown" value or anything
        ``ovl_check_fb_len``/``ovl_check_fh_len`` would reject."""
        if len(value) < HEADER or value[0] != VERSION or value[1] != MAGIC or value[2] != len(value):
            return None
        if value[3] & ~(FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN | FLAG_PATH_UPPER):
            return None
        return cls(type=value[4], fid=bytes(value[HEADER:]), uuid=bytes(value[5:HEADER]), flags=value[3])


def fs_uuid(directory: str) -> bytes:
    """The ``s_uuid`` (16 bytes) of the filesystem holding ``directory``, as the kernel copies it into a
    handle; all zero when the filesystem has none or the kernel is older than 6.5 (no FS_IOC_GETFSUUID)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return NULL_UUID
    try:
        buf = bytearray(17)
        try:
            fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
        except OSError:
            return NULL_UUID
        n = min(buf[0], 16)
        return bytes(buf[1:1 + n]).ljust(16, b"\0")
    finally:
        os.close(fd)


def name_to_handle(path: str, dir_fd: int | None = None) -> tuple[int, bytes]:
    """``name_to_handle_at(2)`` without following a final symlink: (handle type, fid bytes).
    ``path`` "" with ``dir_fd`` encodes the fd itself (AT_EMPTY_PATH)."""
    fh = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    flags = _AT_EMPTY_PATH if path == "" else 0
    rc = _libc.name_to_handle_at(_AT_FDCWD if dir_fd is None else dir_fd, os.fsencode(path),
                                 ctypes.byref(fh), ctypes.byref(mount_id), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


@functools.lru_cache(maxsize=None)
def can_decode() -> bool:
    """``ovl_can_decode_fh``'s capability test: CAP_DAC_READ_SEARCH in the initial user namespace
    (open_by_handle_at needs it too).  An unprivileged (userxattr) mount has not got it."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            first = f.read().split()
        if first[:3] != ["0", "0", "4294967295"]:
            return False  # root inside a user namespace
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 2))  # CAP_DAC_READ_SEARCH
    except (OSError, ValueError, IndexError):
        return False
    return False


def encode(path: str, uuid: bytes, *, upper: bool = False) -> bytes:
    """The ``origin`` value the kernel writes for the inode at ``path`` (a /proc/self/fd path is fine):
    its ``ovl_fb``, or b"" where it writes the null origin (no handles on this fs, or no privilege)."""
    if not can_decode():
        return b""
    try:
        handle_type, fid = name_to_handle(path)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EOVERFLOW):
            return b""
        raise
    if handle_type <= 0 or handle_type == 0xFF:  # FILEID_INVALID
        return b""
    return Fh(handle_type, fid, uuid, CPU_ENDIAN | (FLAG_PATH_UPPER if upper else 0)).encode()


def open_handle(mount_fd: int, fh: Fh) -> int:
    """``open_by_handle_at(2)`` (O_PATH): the inode a handle names, anywhere on ``mount_fd``'s
    filesystem.  OSError ESTALE when it is gone."""
    h = _FileHandle(handle_bytes=len(fh.fid), handle_type=fh.type)
    ctypes.memmove(h.f_handle, fh.fid, len(fh.fid))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(h), os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def decoded_stat(mount_fd: int, fh: Fh) -> os.stat_result | None:
    """lstat of the inode ``fh`` names on ``mount_fd``'s filesystem, or None if it does not decode."""
    try:
        fd = open_handle(mount_fd, fh)
    except OSError:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)
