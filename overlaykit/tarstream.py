"""Layer blobs read as streams: where their bytes live, how they decompress, and a fast tar header scan.

An image can be many times larger than the memory of a Binder session, so a layer never lives in memory
whole: its blob is a ``Source`` (a region of an open file, or a small ``bytes``), decompressed chunk by
chunk, and parsed by ``scan`` in one pass that also hashes it (the diff_id); an uncompressed blob in a file
is parsed by ``scan_file``, which seeks past the data of large files rather than stream it through the
parser. Data of regular files is found again by offset (``pread`` on an uncompressed blob, small files
written from a 1 MiB window; one forward pass through a compressed blob).

``scan`` reads the tar formats layer tools write (ustar, PAX local and global headers, GNU long names;
v7 directories) with ``struct``-free slicing: the standard library's ``tarfile`` spends most of its time
building ``TarInfo`` objects (18 us an entry here, against about 3 us for ``scan``; libarchive through
libarchive-c took 11 us, most of it in ctypes property calls). It checks every header checksum and number
and raises ``LayerError`` for anything malformed; GNU sparse files are refused with a clear error.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import struct
import tempfile
import threading
import zlib
from zlib import adler32
from typing import Iterator

import zstandard

CHUNK = 1 << 20
IN_MEMORY_MAX = 32 << 20   # a blob made here (recompressed, or a decompressed copy) stays in memory up to this
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


def _layer_error(msg: str) -> Exception:
    from .images import LayerError
    return LayerError(msg)


# -------------------------------------------------------------------------------------------------- sources


class Source:
    """The bytes of a blob, read in chunks or at an offset; never all at once unless asked."""

    size: int

    def pread(self, n: int, offset: int) -> bytes:
        raise NotImplementedError

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        off = 0
        while off < self.size:
            data = self.pread(min(chunk, self.size - off), off)
            if not data:
                raise _layer_error(f"{self}: file shrank while reading (at byte {off} of {self.size})")
            off += len(data)
            yield data

    def read_all(self) -> bytes:
        return b"".join(self.chunks())

    def sha256(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return "sha256:" + h.hexdigest()


class MemorySource(Source):
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset:offset + n]

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        if self.size <= chunk:
            if self.size:
                yield self.data
            return
        mv = memoryview(self.data)
        for off in range(0, self.size, chunk):
            yield bytes(mv[off:off + chunk])

    def read_all(self) -> bytes:
        return self.data

    def __repr__(self):
        return f"<{self.size} bytes in memory>"


class _OpenFile:
    """An fd kept open for as long as a layer needs it: a renamed or deleted archive stays readable."""

    def __init__(self, path, keep=None):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.keep = keep  # e.g. the TemporaryFile a spooled blob lives in

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError, TypeError):
            pass


class FileSource(Source):
    """Bytes [offset, offset+size) of an open file."""

    def __init__(self, f: _OpenFile, offset: int, size: int):
        self.file, self.offset, self.size = f, offset, size

    @classmethod
    def open(cls, path) -> "FileSource":
        f = _OpenFile(path)
        return cls(f, 0, os.fstat(f.fd).st_size)

    @classmethod
    def spooled(cls, tmp) -> "FileSource":
        """A source over a (flushed) ``tempfile.TemporaryFile``, which it keeps alive."""
        f = _OpenFile(f"/proc/self/fd/{tmp.fileno()}", keep=tmp)
        return cls(f, 0, os.fstat(f.fd).st_size)

    def region(self, offset: int, size: int) -> "FileSource":
        return FileSource(self.file, self.offset + offset, size)

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.file.fd, n, self.offset + offset)

    def copy_to(self, fd: int, offset: int, size: int) -> None:
        """Write ``size`` bytes at ``offset`` to ``fd`` (in the kernel where it can)."""
        src_off = self.offset + offset
        if size <= 1 << 16:  # small files: pread + write beat copy_file_range's setup here
            data = os.pread(self.file.fd, size, src_off)
            if len(data) != size:
                raise _layer_error(f"{self.file.path}: file shrank while reading")
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
            return
        while size > 0:
            try:
                n = os.copy_file_range(self.file.fd, fd, size, src_off)
            except OSError:
                n = 0
            if n <= 0:  # not supported between these files: plain reads
                data = os.pread(self.file.fd, min(size, CHUNK), src_off)
                if not data:
                    raise _layer_error(f"{self.file.path}: file shrank while reading")
                os.write(fd, data)
                n = len(data)
            size -= n
            src_off += n

    def __repr__(self):
        return f"{self.file.path}[{self.offset}:{self.offset + self.size}]"


# -------------------------------------------------------------------------------------------------- compression


def detect(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def decompressed(chunks: Iterator[bytes], compression: str, *, max_size: int, what: str) -> Iterator[bytes]:
    """Decompress a chunk stream; every output chunk is bounded, the total at most ``max_size``."""
    total = 0
    if compression == "none":
        for c in chunks:
            total += len(c)
            if total > max_size:
                raise _layer_error(f"{what}: {total}+ bytes exceeds the limit of {max_size}")
            yield c
        return
    if compression == "gzip":
        def new():
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        errors: tuple = (zlib.error,)
    elif compression == "zstd":
        def new():
            return zstandard.ZstdDecompressor().decompressobj()
        errors = (zstandard.ZstdError,)
    else:
        raise ValueError(f"unknown compression {compression!r}")
    d = new()
    started = False
    try:
        for c in chunks:
            while c:
                if compression == "gzip":
                    out = d.decompress(c, CHUNK)
                    c = d.unconsumed_tail
                else:
                    out = d.decompress(c)
                    c = b""
                started = True
                total += len(out)
                if total > max_size:
                    raise _layer_error(f"{what}: decompressed size exceeds the limit of {max_size} bytes")
                if out:
                    yield out
                if d.eof:  # concatenated members/frames: the rest starts a new one
                    rest = d.unused_data + c
                    c = rest
                    d = new()
                    started = False
                    if not rest:
                        break
        if compression == "gzip":
            out = d.flush()
            if out:
                total += len(out)
                if total > max_size:
                    raise _layer_error(f"{what}: decompressed size exceeds the limit of {max_size} bytes")
                yield out
        if started and not d.eof:
            raise _layer_error(f"{what}: corrupt {compression} stream: truncated (no end of stream)")
    except errors as e:
        raise _layer_error(f"{what}: corrupt {compression} stream: {e}") from None


def compress_to(chunks: Iterator[bytes], compression: str, size: int) -> Source:
    """Deterministic compression of a tar stream of ``size`` bytes, spooled to a temporary file when large.

    Small tars use the one-shot calls the project always used (the same bytes give the same digest)."""
    from .images import compress
    if size <= IN_MEMORY_MAX:
        return MemorySource(compress(b"".join(chunks), compression))
    tmp = tempfile.TemporaryFile()
    if compression == "gzip":
        import gzip
        with gzip.GzipFile(filename="", mode="wb", fileobj=tmp, compresslevel=6, mtime=0) as g:
            for c in chunks:
                g.write(c)
    elif compression == "zstd":
        w = zstandard.ZstdCompressor(level=3, write_content_size=True).stream_writer(tmp, size=size,
                                                                                   closefd=False)
        for c in chunks:
            w.write(c)
        w.flush(zstandard.FLUSH_FRAME)
    else:
        raise ValueError(f"unknown compression {compression!r}")
    tmp.flush()
    return FileSource.spooled(tmp)


class ChunkReader(io.RawIOBase):
    """A read()-able file over a chunk iterator (for tarfile.addfile and shutil.copyfileobj)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._it, self._buf = iter(chunks), b""

    def readable(self):
        return True

    def read(self, n=-1):
        while (n < 0 or len(self._buf) < n):
            c = next(self._it, None)
            if c is None:
                break
            self._buf += c
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


# -------------------------------------------------------------------------------------------------- tar scan


class _NoHash:
    def update(self, data) -> None:
        pass


class _ThreadedHash:
    """sha256 on a second thread: hashlib releases the GIL on large updates, so hashing a layer overlaps
    with reading it and parsing its headers (a queue of at most 8 chunks bounds the memory)."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._t = threading.Thread(target=self._run, name="overlaykit-sha256", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (c := self._q.get()) is not None:
            self._h.update(c)

    def update(self, data: bytes) -> None:
        self._q.put(data)

    def close(self) -> None:
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()


class _Reader:
    """Sequential reads over a chunk stream, hashing (if asked) and counting every byte."""

    __slots__ = ("_it", "_buf", "_pos", "_base", "hash", "eof")

    def __init__(self, chunks: Iterator[bytes], *, hashed: bool = True):
        self._it = iter(chunks)
        self._buf = b""
        self._pos = 0        # position in _buf
        self._base = 0       # stream offset of _buf[0]
        self.hash = _ThreadedHash() if hashed else _NoHash()
        self.eof = False

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self, n: int) -> None:
        """Make at least n bytes available at _pos (fewer only at the end of the stream)."""
        have = len(self._buf) - self._pos
        parts = [self._buf[self._pos:]] if have else []
        while have < n:
            c = next(self._it, None)
            if c is None:
                self.eof = True
                break
            self.hash.update(c)
            parts.append(c)
            have += len(c)
        self._base += self._pos
        self._buf = b"".join(parts)
        self._pos = 0

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            self._fill(n)
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def skip(self, n: int) -> int:
        """Skip n bytes; returns how many were there."""
        have = len(self._buf) - self._pos
        if have >= n:
            self._pos += n
            return n
        skipped = have
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while skipped < n:
            c = next(self._it, None)
            if c is None:
                self.eof = True
                return skipped
            self.hash.update(c)
            if skipped + len(c) > n:
                used = n - skipped
                self._buf, self._pos = c, used
                return n
            skipped += len(c)
            self._base += len(c)
        return skipped

    def drain(self) -> int:
        """Read (and hash) the rest of the stream; returns the total stream size."""
        for c in self._it:
            self.hash.update(c)
            self._base += len(c)
        self.eof = True
        return self._base + len(self._buf)


def _nti(b: bytes, what: str, offset: int) -> int:
    if b and b[0] & 0x80:  # GNU base-256
        n = int.from_bytes(b[1:], "big")
        if b[0] == 0xff:
            n -= 1 << (8 * (len(b) - 1))
        elif b[0] != 0x80:
            raise _layer_error(f"malformed tar header at offset {offset}: bad {what} field")
        return n
    s = b.split(b"\0", 1)[0].strip()
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise _layer_error(f"malformed tar header at offset {offset}: bad {what} field {s[:20]!r}") from None


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict:
    out = {}
    pos, n = 0, len(data)
    while pos < n and data[pos] != 0:
        sp = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        if length < 5 or pos + length > n or data[pos + length - 1] != 0x0A:
            raise _layer_error(f"malformed tar header at offset {offset}: bad PAX record")
        rec = data[sp + 1:pos + length - 1]
        key, eq, value = rec.partition(b"=")
        if not eq:
            raise _layer_error(f"malformed tar header at offset {offset}: bad PAX record")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


_HDR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_EXT_TYPES = (b"x", b"g", b"L", b"K")
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")


def _num(b: bytes, what: str, offset: int) -> int:
    if b[0] & 0x80:
        return _nti(b, what, offset)
    try:
        return int(b.split(b"\0", 1)[0] or b"0", 8)
    except ValueError:
        return _nti(b, what, offset)


class _FileReader:
    """``_Reader`` over an uncompressed tar in a file: it reads ahead in chunks and hashes each chunk as
    it reads it, but seeks past the data of large files, whose bytes it then hashes in big reads.

    No thread: a hashing thread overlaps with parsing on an idle core, but on a busy machine every
    hand-over of the GIL to it stalls the parser for a scheduler wake-up, and a second copy of every
    byte is more work in all."""

    __slots__ = ("_fd", "_start", "_size", "_buf", "_pos", "_base", "_hashed", "_h", "hash", "eof", "_what")

    def __init__(self, src: "FileSource"):
        self._fd, self._start, self._size = src.file.fd, src.offset, src.size
        self._buf = b""
        self._pos = 0
        self._base = 0
        self._hashed = 0  # the sha256 covers bytes [0, _hashed)
        self._h = hashlib.sha256()
        self.hash = self
        self.eof = False
        self._what = repr(src)

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _shrank(self, at: int):
        return _layer_error(f"{self._what}: file shrank while reading (at byte {at} of {self._size})")

    def _hash_to(self, end: int) -> None:
        """Hash the bytes skipped so far, up to ``end``, in large reads."""
        pos = self._hashed
        if pos >= end:
            return
        buf = bytearray(min(end - pos, _GAP_CHUNK))
        mv = memoryview(buf)
        while pos < end:
            n = os.preadv(self._fd, [mv[:min(end - pos, len(buf))]], self._start + pos)
            if n <= 0:
                raise self._shrank(pos)
            self._h.update(mv[:n])
            pos += n
        self._hashed = pos

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            base = self._base + self._pos
            want = min(max(n, _READ_AHEAD), self._size - base)
            self._hash_to(base)  # data skipped before base
            data = os.pread(self._fd, want, self._start + base) if want > 0 else b""
            if len(data) < want:
                raise self._shrank(base + len(data))
            done = self._hashed - base  # the start of data may be the old buffer's tail, hashed already
            if done < len(data):
                self._h.update(memoryview(data)[done:] if done else data)
                self._hashed = base + len(data)
            if len(data) < n:
                self.eof = True
            self._buf, self._pos, self._base = data, 0, base
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def skip(self, n: int) -> int:
        have = len(self._buf) - self._pos
        if have >= n:
            self._pos += n
            return n
        here = self._base + self._pos
        n = min(n, self._size - here)
        self._buf, self._pos, self._base = b"", 0, here + n
        if self._base >= self._size:
            self.eof = True
        return n

    def drain(self) -> int:
        self._hash_to(self._size)
        self.eof = True
        return self._size

    # the reader is its own ``hash``
    def hexdigest(self) -> str:
        self._hash_to(self._size)
        return self._h.hexdigest()

    def close(self) -> None:
        pass


_READ_AHEAD = 1 << 18
_GAP_CHUNK = 4 << 20


def scan_file(src: "FileSource", *, what: str = "layer") -> tuple[list[tuple], int, str]:
    """``scan`` of an uncompressed tar that is a region of a file: the same members, size and sha256,
    without copying the data of large files through Python twice (it is seeked past, then hashed in
    large reads)."""
    return _scan(_FileReader(src))


def scan(chunks: Iterator[bytes], *, what: str = "layer") -> tuple[list[tuple], int, str]:
    """Every member of an uncompressed tar stream; also its total size and sha256 (the diff_id).

    Members are tuples ``(name, type, size, mode, uid, gid, mtime, linkname, devmajor, devminor,
    offset_data, xattrs)`` with ``type`` the typeflag as a one-byte ``bytes``. Stops at the first zero
    block, as tar does, but requires the block after it to be zeros too (a garbage header after valid
    ones is an error, not a quiet end)."""
    r = _Reader(chunks)
    try:
        return _scan(r)
    finally:
        r.hash.close()


def _scan(r: "_Reader") -> tuple[list[tuple], int, str]:
    out: list[tuple] = []
    glob: dict = {}
    first = True
    unpack = _HDR.unpack
    append = out.append
    while True:
        pax = None
        longname = longlink = None
        while True:  # extension headers, then the member's own
            # r.offset and r.read(BLOCK) inline while the header is in the reader's buffer (the common case)
            pos = r._pos
            off = r._base + pos
            if pos + BLOCK <= len(r._buf):
                hdr = r._buf[pos:pos + BLOCK]
                r._pos = pos + BLOCK
            else:
                hdr = r.read(BLOCK)
            if len(hdr) < BLOCK:
                if not hdr and first:
                    raise _layer_error("layer tar is empty (not even an end-of-archive marker)")
                if not hdr and pax is None and longname is None and longlink is None:
                    # no end-of-archive marker: tarfile and Go's archive/tar accept this too
                    return out, r.drain(), "sha256:" + r.hash.hexdigest()
                raise _layer_error(f"truncated tar header at offset {off}")
            (name_b, mode_b, uid_b, gid_b, size_b, mtime_b, chk_b, t, link_b, magic, _v, _u, _g,
             major_b, minor_b, prefix_b) = unpack(hdr)
            try:
                chk = int(chk_b.split(b"\0", 1)[0], 8)
            except ValueError:
                chk = -1
            # the byte sum with the checksum field counted as spaces; adler32's low half is 1 + the byte
            # sum (exact for 256 bytes), ten times faster than sum() on a 512-byte block
            unsigned = (adler32(hdr[:256]) & 0xFFFF) + (adler32(hdr[256:]) & 0xFFFF) - 2 - sum(chk_b) + 256
            if chk != unsigned and not _checksum_ok(hdr):
                if hdr == _ZERO_BLOCK:
                    if pax is not None or longname is not None or longlink is not None:
                        raise _layer_error(f"malformed tar header at offset {off}: extension header without a member")
                    nxt = r.read(BLOCK)
                    if nxt.count(0) != len(nxt):
                        raise _layer_error(f"malformed tar header at offset {off + BLOCK}")
                    return out, r.drain(), "sha256:" + r.hash.hexdigest()
                if first:
                    raise _layer_error("not a tar archive: bad header checksum")
                raise _layer_error(f"malformed tar header at offset {off}: bad checksum")
            first = False
            try:
                size = int(size_b[:-1], 8)  # the usual zero-padded octal with one NUL
            except ValueError:
                size = _num(size_b, "size", off)
            if size < 0:
                raise _layer_error(f"malformed tar header at offset {off}: negative size")
            if t in _EXT_TYPES:
                if size > 16 << 20:
                    raise _layer_error(f"malformed tar header at offset {off}: {size}-byte extension header")
                data = r.read(size)
                if len(data) < size:
                    raise _layer_error(f"truncated archive: extension header at offset {off}")
                r.skip(-size % BLOCK)
                if t == b"x":
                    pax = {**(pax or {}), **_pax_records(data, off)}
                elif t == b"g":
                    glob.update(_pax_records(data, off))
                elif t == b"L":
                    longname = _nts(data)
                else:
                    longlink = _nts(data)
                continue
            break
        if longname is not None:
            name = longname
        else:
            name = name_b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if magic == b"ustar\x00" and prefix_b[0]:  # POSIX ustar prefix
                name = _nts(prefix_b) + "/" + name
        linkname = longlink if longlink is not None else (
            link_b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") if link_b[0] else "")
        try:
            mode, uid, gid = int(mode_b[:-1], 8), int(uid_b[:-1], 8), int(gid_b[:-1], 8)
            mtime: float = int(mtime_b[:-1], 8)
        except ValueError:
            mode, uid, gid = _num(mode_b, "mode", off), _num(uid_b, "uid", off), _num(gid_b, "gid", off)
            mtime = _num(mtime_b, "mtime", off)
        devmajor = devminor = 0
        if t == b"3" or t == b"4":
            devmajor = _num(major_b, "devmajor", off)
            devminor = _num(minor_b, "devminor", off)
        xattrs = None
        if glob:
            pax = {**glob, **(pax or {})}
        if pax is not None:
            if t == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
                t = b"S"
            try:
                if "path" in pax:
                    name = pax["path"]
                if "linkpath" in pax:
                    linkname = pax["linkpath"]
                if "size" in pax:
                    size = int(pax["size"])
                if "uid" in pax:
                    uid = int(pax["uid"])
                if "gid" in pax:
                    gid = int(pax["gid"])
                if "mtime" in pax:
                    mtime = float(pax["mtime"])
            except ValueError as e:
                raise _layer_error(f"malformed tar header at offset {off}: bad PAX value: {e}") from None
            if size < 0:
                raise _layer_error(f"malformed tar header at offset {off}: negative size")
            xattrs = {k: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")} or None
        if t == b"S":
            raise _layer_error(f"entry {name!r}: GNU sparse files are not supported in layers")
        if t == b"0" or t == b"\0" or t == b"7":
            if name.endswith("/") and t == b"\0":
                t = b"5"  # a v7 directory
        data_off = r._base + r._pos
        if size and t not in _NO_DATA_TYPES:
            pad = size + (-size % BLOCK)
            if r._pos + pad <= len(r._buf):  # r.skip(pad) inline, within the buffer
                r._pos += pad
                got = pad
            else:
                got = r.skip(pad)
            if got < size:
                raise _layer_error(f"entry {name!r}: truncated archive (declares {size} bytes, {got} present)")
        append((name, t, size, mode, uid, gid, mtime, linkname, devmajor, devminor, data_off, xattrs))


def _checksum_ok(hdr: bytes) -> bool:
    field = hdr[148:156].split(b"\0", 1)[0].strip()
    try:
        chk = int(field, 8)
    except ValueError:
        return False
    unsigned = sum(hdr) - sum(hdr[148:156]) + 256
    if chk == unsigned:
        return True
    high = sum(1 for b in hdr[:148] + hdr[156:] if b > 127)  # old tars summed signed chars
    return chk == unsigned - 256 * high


# -------------------------------------------------------------------------------------------------- data


_WINDOW = 1 << 20
_WINDOW_FILE_MAX = 1 << 16


class DataReader:
    """File data of one layer, asked for in increasing offsets (tar order), written to an fd."""

    def __init__(self, tar_source: Source | None, chunks: Iterator[bytes] | None):
        self.src = tar_source
        self._r = _Reader(chunks, hashed=False) if chunks is not None else None
        self._buf = memoryview(b"")  # a window of a FileSource: small files are written from it, one
        self._buf_off = 0            # pread for many files instead of one each

    def copy_to(self, fd: int, offset: int, size: int) -> None:
        if isinstance(self.src, FileSource):
            if size > _WINDOW_FILE_MAX:
                self.src.copy_to(fd, offset, size)
                return
            lo = offset - self._buf_off
            if lo < 0 or lo + size > len(self._buf):
                want = max(size, min(_WINDOW, self.src.size - offset))
                data = self.src.pread(want, offset)
                if len(data) < size:
                    raise _layer_error(f"{self.src.file.path}: file shrank while reading")
                self._buf, self._buf_off, lo = memoryview(data), offset, 0
            mv = self._buf[lo:lo + size]
            n = os.write(fd, mv)
            while n < len(mv):  # a short write: the rest
                mv = mv[n:]
                n = os.write(fd, mv)
            return
        if self.src is not None:
            data = self.src.pread(size, offset)
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
            return
        r = self._r
        if offset < r.offset:
            raise ValueError("DataReader: offsets must increase")
        r.skip(offset - r.offset)
        while size > 0:
            data = r.read(min(size, CHUNK))
            if not data:
                raise _layer_error("layer data ended early")
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
            size -= len(data)
