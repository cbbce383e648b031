"""Open files on an overlay: Python's ``open()`` modes over the engine's os-level handle calls.

`Overlay.os_open` does what open(2) does on the merged view (copy-up included, decided by the flags
exactly as the kernel's ``ovl_open`` decides it); the objects here only add a file position, buffering
and text decoding on top of ``pread``/``pwrite``, so both backends share them unchanged.
"""
from __future__ import annotations

import io
import os

_BASE = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
         "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def parse_mode(mode: str) -> tuple[int, bool]:
    """Python's ``open()`` mode string -> (open(2) flags, binary?); ValueError as ``open()`` raises it."""
    if not isinstance(mode, str):
        raise TypeError(f"open() argument 'mode' must be str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwaxbt+"):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = chars & set("rwax")
    if len(kinds) != 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    if "b" in chars and "t" in chars:
        raise ValueError("can't have text and binary mode at once")
    flags = _BASE[kinds.pop()]
    if "+" in chars:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags, "b" in chars


class OverlayRawFile(io.RawIOBase):
    """An unbuffered file on an overlay handle: a position kept here, each read/write one pread/pwrite."""

    def __init__(self, ov, handle: int, path: str, flags: int):
        super().__init__()
        self._ov, self._h, self.name, self._flags = ov, handle, path, flags
        self._pos = 0
        acc = flags & os.O_ACCMODE
        self._readable = acc in (os.O_RDONLY, os.O_RDWR)
        self._writable = acc in (os.O_WRONLY, os.O_RDWR)
        self.mode = ("rb+" if acc == os.O_RDWR else "wb" if self._writable else "rb")

    @property
    def handle(self) -> int:
        return self._h

    def readable(self) -> bool:
        self._checkClosed()
        return self._readable

    def writable(self) -> bool:
        self._checkClosed()
        return self._writable

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self._checkClosed()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        view = memoryview(b).cast("B")
        data = self._ov.pread(self._h, len(view), self._pos)
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, b) -> int:
        self._checkClosed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        n = self._ov.pwrite(self._h, bytes(memoryview(b).cast("B")[:1 << 20]), self._pos)  # at most 1 MiB a request
        # O_APPEND writes land at the end whatever the offset (as pwrite(2) does on Linux).
        self._pos = self._ov.fstat(self._h).size if self._flags & os.O_APPEND else self._pos + n
        return n

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            new = pos
        elif whence == io.SEEK_CUR:
            new = self._pos + pos
        elif whence == io.SEEK_END:
            new = self._ov.fstat(self._h).size + pos
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if new < 0:
            raise OSError(22, "Invalid argument", self.name)
        self._pos = new
        return new

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self._checkClosed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        size = self._pos if size is None else size
        self._ov.ftruncate(self._h, size)
        return size

    def stat(self):
        """`Stat` of the open file (fstat): follows the file across renames and unlinks of its name."""
        return self._ov.fstat(self._h)

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()
            finally:
                if self._h in self._ov._handles:  # not when the overlay was unmounted (that closed it)
                    self._ov.close(self._h)

    def __repr__(self) -> str:
        return f"<OverlayRawFile name={self.name!r} mode={self.mode!r}{' closed' if self.closed else ''}>"


def wrap(raw: OverlayRawFile, binary: bool, buffering: int, encoding, errors, newline):
    """Buffer and decode ``raw`` the way ``open()`` does for the same arguments."""
    if buffering == 0:
        if not binary:
            raise ValueError("can't have unbuffered text I/O")
        return raw
    size = io.DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
    if raw._readable and raw._writable:
        buf = io.BufferedRandom(raw, size)
    elif raw._writable:
        buf = io.BufferedWriter(raw, size)
    else:
        buf = io.BufferedReader(raw, size)
    if binary:
        return buf
    text = io.TextIOWrapper(buf, encoding or "utf-8", errors, newline, line_buffering=buffering == 1)
    text.mode = raw.mode.replace("b", "")
    return text
