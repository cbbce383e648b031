"""Container images as OCI changesets: layers, images, a sharing store, containers, flatten, inspect.

A layer tar is untrusted input. Every tar is parsed and validated once, in ``Layer.from_tar``; applying it
(``flatten``, ``Layer.unpack``) resolves every parent path inside the destination, so nothing is ever
written outside the directory the caller named. Where the image-spec describes a safe behaviour (absolute
names are relative to the root, AUFS metadata is skipped) we follow it; everything else is a ``LayerError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import zstandard

from . import tarstream

WH_PREFIX = ".wh."
WH_META_PREFIX = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"

MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TAR_GZIP = MEDIA_TAR + "+gzip"
MEDIA_TAR_ZSTD = MEDIA_TAR + "+zstd"
MEDIA_BY_COMPRESSION = {"none": MEDIA_TAR, "gzip": MEDIA_TAR_GZIP, "zstd": MEDIA_TAR_ZSTD}

#: Largest uncompressed layer accepted (decompression bombs stop here).
MAX_LAYER_BYTES = 8 << 30
_PATH_MAX = 4096
_NAME_MAX = 255
_MAX_SYMLINKS = 40
_ID_MAX = 2**32 - 2  # 2**32-1 is (uid_t)-1, "leave unchanged" to chown(2)
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_XATTR_PAX = "SCHILY.xattr."


class LayerError(ValueError):
    """A layer tar (or image archive) is malformed or hostile."""


class ApplyError(LayerError):
    """A layer could not be applied on top of the layers below it (``flatten``/``export-rootfs``).

    The message names the layer (index and diff_id) and the entry; ``errno`` is the filesystem's
    errno when one caused it (ENOTDIR, ELOOP, ...), else None.
    """

    def __init__(self, message: str, *, layer_index: int | None = None, diff_id: str = "",
                 entry: str = "", errno: int | None = None):
        super().__init__(message)
        self.layer_index, self.diff_id, self.entry, self.errno = layer_index, diff_id, entry, errno

    @classmethod
    def wrap(cls, err: Exception, index: int, layer: "Layer", entry: "LayerEntry | None") -> "ApplyError":
        name = entry.tar_name if entry is not None else ""
        if isinstance(err, OSError):
            why = err.strerror or str(err)
            if err.filename not in (None, "", name, entry.path if entry else None):
                why = f"{why}: {err.filename!r}"
            if err.errno == errno.ENOTDIR:
                why += " (a lower layer has a non-directory there)"
        else:
            why = str(err)
        where = f"layer {index} ({layer.diff_id})"
        return cls(f"{where}: entry {name!r}: {why}" if entry is not None else f"{where}: {why}",
                   layer_index=index, diff_id=layer.diff_id, entry=name,
                   errno=err.errno if isinstance(err, OSError) else None)


# --------------------------------------------------------------------------------------------------
# compression


def detect_compression(blob: bytes) -> str:
    return tarstream.detect(blob)


def compress(data: bytes, compression: str) -> bytes:
    """Deterministic compression: the same tar always gives the same blob digest."""
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    raise ValueError(f"unknown compression {compression!r} (expected none, gzip or zstd)")


def decompress(blob: bytes, compression: str | None = None, *, max_size: int = MAX_LAYER_BYTES,
               what: str = "layer") -> bytes:
    """Decompress in bounded chunks so a small bomb cannot allocate ``max_size`` + 1 bytes."""
    return b"".join(tarstream.decompressed(iter([blob]), compression or detect_compression(blob),
                                           max_size=max_size, what=what))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# layer entries


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One change in a layer (slots: an image holds hundreds of thousands of them).

    ``path`` is the path the change is about, relative to the root with no leading ``/`` or ``./``
    ("." is the root): for a whiteout it is the removed path (``etc/.wh.motd`` -> ``etc/motd``), for an
    opaque marker the directory (``etc/.wh..wh..opq`` -> ``etc``). ``tar_name`` gives the name in the tar.
    type: file, dir, symlink, hardlink, char, block, fifo, whiteout, opaque.
    """

    path: str
    type: str
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    linkname: str = ""
    xattrs: dict = field(default_factory=dict, compare=False, hash=False)
    devmajor: int = 0
    devminor: int = 0

    @property
    def tar_name(self) -> str:
        if self.type == "whiteout":
            parent, _, base = self.path.rpartition("/")
            return (parent + "/" if parent else "") + WH_PREFIX + base
        if self.type == "opaque":
            return WH_OPAQUE if self.path == "." else self.path + "/" + WH_OPAQUE
        return self.path

    @property
    def is_removal(self) -> bool:
        return self.type in ("whiteout", "opaque")


def normalize_path(name: str, *, what: str = "entry") -> str:
    """Clean a tar name into a root-relative path; reject anything that could leave the root.

    Leading ``/`` is dropped, as containerd and moby do (names are relative to the layer root);
    ``..`` components are rejected outright rather than cleaned.
    """
    if (len(name) <= _NAME_MAX and name.isascii() and ".." not in name and "//" not in name
            and "/./" not in name and "\x00" not in name and name[:1] not in ("/", ".", "")
            and name[-1] != "/" and not name.endswith("/.")):
        return name  # the common case, already clean (an ASCII name: bytes == characters)
    if "\x00" in name:
        raise LayerError(f"{what} {name!r}: NUL in name")
    if len(name.encode("utf-8", "surrogateescape")) > _PATH_MAX:
        raise LayerError(f"{what} {name[:60]!r}...: name longer than {_PATH_MAX} bytes")
    parts = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise LayerError(f"{what} {name!r}: '..' component would escape the root")
        if len(comp.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            raise LayerError(f"{what} {name!r}: component longer than {_NAME_MAX} bytes")
        parts.append(comp)
    return "/".join(parts) or "."


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while a layer is parsed: the parse makes no cycles, but its hundreds
    of thousands of new objects (entries, member tuples) would set off collections that walk them all
    again and again, a fifth of an import's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parent(path: str) -> str:
    return path.rpartition("/")[0] or "."


def _parse_tar(chunks, *, what: str = "layer", scanned=None
               ) -> tuple[list[LayerEntry], dict[str, tuple[int, int]], int, str]:
    """Parse and validate an uncompressed layer tar stream in one pass (``tarstream.scan``, or the
    result of ``tarstream.scan_file`` given as ``scanned``).

    Returns the entries in tar order; for regular files, (offset, size) of their data in the tar; the
    tar's size and its sha256 (the diff_id).
    """
    members, size, diff_id = scanned if scanned is not None else tarstream.scan(chunks, what=what)
    entries: list[LayerEntry] = []
    offsets: dict[str, tuple[int, int]] = {}
    added: dict[str, str] = {}                    # path -> type, for additions
    removed: set[tuple[str, str]] = set()         # (path, whiteout|opaque)
    append = entries.append
    fast_types = _FAST_TYPES
    new = _new_entry
    for m in members:
        # the common case inline (a clean name, no .wh., no xattrs, ids in range, a file, directory or
        # symlink): the same entry _entry_from_member would make, built without its checks' overhead
        name, t, tsize, tmode, uid, gid, mtime, tlink, _maj, _min, off, pax_xattrs = m
        kind = fast_types.get(t)
        if kind == "dir" and name[-1:] == "/":  # tar writes directories as "name/"
            name = name[:-1]
        if (kind is not None and pax_xattrs is None and 0 <= uid <= _ID_MAX and 0 <= gid <= _ID_MAX
                and len(name) <= _NAME_MAX and name.isascii() and ".." not in name and "//" not in name
                and "/./" not in name and "\x00" not in name and name[:1] not in ("/", ".", "")
                and name[-1] != "/" and not name.endswith("/.") and WH_PREFIX not in name
                and (kind != "symlink" or "\x00" not in tlink and len(tlink) <= _PATH_MAX)):
            prev = added.get(name)
            if prev is not None and not (prev == "dir" and kind == "dir"):
                raise LayerError(f"duplicate path {name!r} in layer (image-spec: MUST NOT)")
            added[name] = kind
            if kind == "file":
                offsets[name] = (off, tsize)
                append(new(name, kind, tsize, tmode & 0o7777, uid, gid, mtime, ""))
            else:
                append(new(name, kind, 0, tmode & 0o7777, uid, gid, mtime, tlink if kind == "symlink" else ""))
            continue
        entry = _entry_from_member(m)
        if entry is None:
            continue
        path, kind = entry.path, entry.type
        if kind == "whiteout" or kind == "opaque":
            if (path, kind) in removed:
                raise LayerError(f"duplicate path {entry.tar_name!r} in layer (image-spec: MUST NOT)")
            removed.add((path, kind))
        else:
            prev = added.get(path)
            if prev is not None and not (prev == "dir" and kind == "dir"):
                raise LayerError(f"duplicate path {entry.tar_name!r} in layer (image-spec: MUST NOT)")
            added[path] = kind
            if kind == "file":
                offsets[path] = (m[10], m[2])
        append(entry)
    _check_links(entries, added)
    return entries, offsets, size, diff_id


_MEMBER_TYPES = {b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"2": "symlink", b"1": "hardlink",
                 b"3": "char", b"4": "block", b"6": "fifo"}


_FAST_TYPES = {b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"2": "symlink"}


def _new_entry(path, kind, size, mode, uid, gid, mtime, linkname, _new=object.__new__, _cls=LayerEntry,
               _s=[LayerEntry.__dict__[f.name].__set__ for f in dataclasses.fields(LayerEntry)]) -> LayerEntry:
    """``LayerEntry(path, kind, size, mode, uid, gid, mtime, linkname)`` (no xattrs, no device numbers),
    twice as fast: the frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``."""
    e = _new(_cls)
    s = _s
    s[0](e, path)
    s[1](e, kind)
    s[2](e, size)
    s[3](e, mode)
    s[4](e, uid)
    s[5](e, gid)
    s[6](e, mtime)
    s[7](e, linkname)
    s[8](e, {})
    s[9](e, 0)
    s[10](e, 0)
    return e


def _entry_from_member(m: tuple) -> LayerEntry | None:
    name, t, tsize, tmode, uid, gid, mtime, tlink, devmajor, devminor, _off, pax_xattrs = m
    kind = _MEMBER_TYPES.get(t)
    if kind is None:
        raise LayerError(f"entry {name!r}: unsupported tar entry type {t.decode('latin-1')!r}")
    path = normalize_path(name)
    if not (0 <= uid <= _ID_MAX and 0 <= gid <= _ID_MAX):
        what, v = ("uid", uid) if not 0 <= uid <= _ID_MAX else ("gid", gid)
        raise LayerError(f"entry {name!r}: absurd {what} {v}")
    xattrs = {}
    if pax_xattrs:
        for k, v in pax_xattrs.items():
            xattrs[k[len(_XATTR_PAX):]] = v.encode("utf-8", "surrogateescape")
    base = ""
    if WH_PREFIX in path:  # rare: only then look at each component
        comps = path.split("/") if path != "." else []
        for comp in comps[:-1]:
            if comp.startswith(WH_PREFIX):
                raise LayerError(f"entry {name!r}: '.wh.' names cannot be directories")
        base = comps[-1] if comps else ""
    if base.startswith(WH_PREFIX):
        common = dict(mode=tmode & 0o7777, uid=uid, gid=gid, mtime=mtime)
        if kind not in ("file", "hardlink"):
            raise LayerError(f"entry {name!r}: whiteout must be a regular file, not a {kind}")
        if base == WH_OPAQUE:
            return LayerEntry(_parent(path), "opaque", **common)
        if base.startswith(WH_META_PREFIX):
            return None  # AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): skipped, as moby does
        target = base[len(WH_PREFIX):]
        if target in ("", ".", ".."):
            raise LayerError(f"entry {name!r}: invalid whiteout (nothing or {target!r} to remove)")
        parent = _parent(path)
        return LayerEntry(target if parent == "." else parent + "/" + target, "whiteout", **common)
    if path == "." and kind != "dir":
        raise LayerError(f"entry {name!r}: the root can only be a directory")
    linkname = ""
    if kind == "symlink":
        linkname = tlink
        if "\x00" in linkname or len(linkname) > _PATH_MAX:
            raise LayerError(f"entry {name!r}: bad symlink target")
    elif kind == "hardlink":
        linkname = normalize_path(tlink, what=f"hardlink {name!r} ->")
        if linkname == ".":
            raise LayerError(f"entry {name!r}: hardlink to the root")
        if linkname == path:
            raise LayerError(f"entry {name!r}: hardlink to itself")
        if any(c.startswith(WH_PREFIX) for c in linkname.split("/")):
            raise LayerError(f"entry {name!r}: hardlink to a whiteout name")
    return LayerEntry(path, kind, tsize if kind == "file" else 0, tmode & 0o7777, uid, gid, mtime, linkname,
                      xattrs, devmajor, devminor)


def _check_links(entries: list[LayerEntry], kinds: dict[str, str] | None = None) -> None:
    """Within one layer, no entry may sit below a non-directory of the same layer (``kinds``: path ->
    type of every addition, when the caller has it)."""
    if kinds is None:
        kinds = {e.path: e.type for e in entries if not e.is_removal}
    parents: set[str] = set()
    for e in entries:  # every directory some entry needs (amortized: stop at one already seen)
        p = e.path if e.type == "opaque" else e.path.rpartition("/")[0]
        while p and p != "." and p not in parents:
            parents.add(p)
            p = p.rpartition("/")[0]
    if all(kinds.get(p, "dir") in ("dir", "symlink") for p in parents):
        return
    for e in entries:  # find the first offending entry, for the message
        if e.path == ".":
            continue
        p = _parent(e.path) if e.type != "opaque" else e.path
        while p != ".":
            k = kinds.get(p)
            if k is not None and k not in ("dir", "symlink"):
                raise LayerError(f"entry {e.tar_name!r}: parent {p!r} is a {k} in the same layer")
            p = _parent(p)


# --------------------------------------------------------------------------------------------------
# Layer


class Layer:
    """An immutable OCI changeset, content addressed by the sha256 of its uncompressed tar (diff_id).

    The layer's bytes are never held whole: the blob is a ``tarstream.Source`` (a region of the archive
    or store file it came from, or small ``bytes``), parsed once when the layer is made; file data is
    read back by offset, or in one forward pass through a compressed blob.
    """

    __slots__ = ("_blob_src", "_tar_src", "_compression", "_entries", "_offsets", "_size", "_diff_id",
                 "_digest", "_max_size", "__weakref__")

    def __init__(self, tar: bytes, *, blob: bytes | None = None, compression: str = "none", _parsed=None):
        if compression not in MEDIA_BY_COMPRESSION:
            raise ValueError(f"unknown compression {compression!r}")
        tar_src = tarstream.MemorySource(tar)
        entries, offsets, size, diff_id = _parsed if _parsed is not None else _parse_tar(tar_src.chunks())
        blob_src = tar_src if compression == "none" else (
            tarstream.MemorySource(blob) if blob is not None else None)
        self._init(blob_src, tar_src, compression, entries, offsets, size, diff_id)

    def _init(self, blob_src, tar_src, compression, entries, offsets, size, diff_id, digest=None):
        self._blob_src, self._tar_src, self._compression = blob_src, tar_src, compression
        self._entries, self._offsets, self._size, self._diff_id = entries, offsets, size, diff_id
        self._digest = digest
        self._max_size = MAX_LAYER_BYTES

    @classmethod
    def _make(cls, blob_src, tar_src, compression, parsed, digest=None) -> "Layer":
        layer = cls.__new__(cls)
        layer._init(blob_src, tar_src, compression, *parsed, digest=digest)
        return layer

    # -- construction
    @classmethod
    def from_tar(cls, data: bytes | str | os.PathLike, *, compression: str | None = None,
                 max_size: int = MAX_LAYER_BYTES) -> "Layer":
        """Validate a (possibly compressed) layer tar, given as bytes or as a file path (streamed,
        never read whole). ``compression`` None means detect from the bytes.

        The blob keeps its original bytes, so ``digest`` matches the manifest that named it.
        """
        if isinstance(data, (str, os.PathLike)):
            src: tarstream.Source = tarstream.FileSource.open(data)
        else:
            src = tarstream.MemorySource(data)
        return cls.from_source(src, compression=compression, max_size=max_size)

    @classmethod
    def from_source(cls, src: "tarstream.Source", *, compression: str | None = None,
                    max_size: int = MAX_LAYER_BYTES, what: str = "layer", digest: str | None = None) -> "Layer":
        """A layer whose blob is ``src`` (parsed here in one streaming pass; an uncompressed blob in a
        file with ``tarstream.scan_file``, which seeks past the data of large files)."""
        detected = tarstream.detect(src.pread(4, 0))
        if compression is None:
            compression = detected
        elif compression != detected:
            raise LayerError(f"layer declared {compression} but its bytes look like {detected}")
        with _gc_paused():
            if compression == "none" and isinstance(src, tarstream.FileSource):
                if src.size > max_size:
                    raise LayerError(f"{what}: {src.size}+ bytes exceeds the limit of {max_size}")
                parsed = _parse_tar(None, what=what, scanned=tarstream.scan_file(src, what=what))
            else:
                chunks = tarstream.decompressed(src.chunks(), compression, max_size=max_size, what=what)
                parsed = _parse_tar(chunks, what=what)
        layer = cls._make(src, src if compression == "none" else None, compression, parsed,
                          digest=digest if compression != "none" else None)
        layer._max_size = max_size
        return layer

    @classmethod
    def from_entries(cls, items: Iterable[tuple[LayerEntry, bytes | None]], *, sort: bool = True) -> "Layer":
        """Write a deterministic tar from entries (and file contents); whiteouts come before siblings."""
        items = list(items)
        if sort:
            items.sort(key=lambda it: _sort_key(it[0]))
        return cls(_write_tar(items))

    @classmethod
    def from_dir(cls, upper_dir, encoding, *, mtime: float | None = None) -> "Layer":
        """Turn an overlay upper dir into an OCI changeset, exactly as moby/containerd convert it.

        A whiteout (char 0/0, or a ``.wh.`` marker under the fallback encoding) becomes a regular
        ``.wh.<name>`` with mode 0600 keeping its owner and mtime; an opaque directory gets an extra
        ``<dir>/.wh..wh..opq`` (mode of the dir, mtime 0) and loses its overlay xattr. ``mtime``
        clamps every time for reproducible builds.
        """
        return cls.from_entries(_entries_from_upper(Path(upper_dir), encoding, mtime))

    def with_compression(self, compression: str) -> "Layer":
        """The same layer with its blob compressed another way (compressed lazily, when first needed)."""
        if compression not in MEDIA_BY_COMPRESSION:
            raise ValueError(f"unknown compression {compression!r} (expected none, gzip or zstd)")
        if compression == self._compression:
            return self
        parsed = (self._entries, self._offsets, self._size, self._diff_id)
        if compression == "none":
            tar_src = self._tar_src
            if tar_src is None and self._size <= tarstream.IN_MEMORY_MAX:
                tar_src = tarstream.MemorySource(self.tar_bytes())
            layer = Layer._make(tar_src if tar_src is not None else _SpooledTar(self), tar_src, "none", parsed)
            layer._max_size = self._max_size
            return layer
        layer = Layer._make(_LazyBlob(self, compression), self._tar_src, compression, parsed)
        layer._max_size = self._max_size
        return layer

    # -- identity
    @property
    def diff_id(self) -> str:
        return self._diff_id

    @property
    def digest(self) -> str:
        if self._compression == "none":
            return self._diff_id
        if self._digest is None:
            self._digest = self._blob().sha256()
        return self._digest

    @property
    def size(self) -> int:
        """Bytes of the uncompressed tar."""
        return self._size

    @property
    def blob_size(self) -> int:
        return self._blob().size

    @property
    def compression(self) -> str:
        return self._compression

    @property
    def media_type(self) -> str:
        return MEDIA_BY_COMPRESSION[self._compression]

    @property
    def content_size(self) -> int:
        """Bytes of regular-file data the layer adds (what ``du`` would roughly see)."""
        return sum(e.size for e in self._entries if e.type == "file")

    def _blob(self) -> "tarstream.Source":
        b = self._blob_src
        if isinstance(b, (_LazyBlob, _SpooledTar)):
            b = self._blob_src = b.source()
            if self._compression == "none":
                self._tar_src = b
        return b

    def blob(self) -> bytes:
        """The blob's bytes (whole, in memory: for small layers; exports stream ``blob_chunks``)."""
        return self._blob().read_all()

    def blob_chunks(self):
        return self._blob().chunks()

    def _repr_mimebundle_(self, include=None, exclude=None):
        """A notebook shows the layer as its diagram (text where graphviz is missing)."""
        from .diagrams import layer_mimebundle
        return layer_mimebundle(self)

    def __eq__(self, other):
        return isinstance(other, Layer) and other._diff_id == self._diff_id

    def __hash__(self):
        return hash(self._diff_id)

    def __repr__(self):
        return f"Layer({self._diff_id[:19]}, {len(self._entries)} entries, {self.size} bytes)"

    # -- content
    def entries(self) -> list[LayerEntry]:
        return list(self._entries)

    def tar_chunks(self):
        """The uncompressed tar, chunk by chunk."""
        if self._tar_src is None and self._compression == "none":
            self._blob()
        if self._tar_src is not None:
            return self._tar_src.chunks()
        return tarstream.decompressed(self._blob().chunks(), self._compression, max_size=self._max_size,
                                      what=f"layer {self._diff_id}")

    def tar_bytes(self) -> bytes:
        """The uncompressed tar (whole, in memory: for small layers)."""
        return b"".join(self.tar_chunks())

    def write_tar(self, f) -> None:
        for c in self.tar_chunks():
            f.write(c)

    def data_reader(self) -> "tarstream.DataReader":
        """File data in tar order (``copy_to(fd, offset, size)``), without reading the layer whole."""
        if self._tar_src is None and self._compression == "none":
            self._blob()
        if self._tar_src is not None:
            return tarstream.DataReader(self._tar_src, None)
        return tarstream.DataReader(None, self.tar_chunks())

    def read(self, path: str) -> bytes:
        """Data of a regular file entry."""
        off, size = self._offsets[normalize_path(path)]
        if self._tar_src is None and self._compression == "none":
            self._blob()
        if self._tar_src is not None:
            return self._tar_src.pread(size, off)
        out = bytearray()  # one forward pass through the compressed blob
        pos = 0
        for c in self.tar_chunks():
            if pos + len(c) > off + len(out):
                lo = off + len(out) - pos
                out += c[lo:lo + size - len(out)]
                if len(out) >= size:
                    break
            pos += len(c)
        return bytes(out)

    def unpack(self, dest, encoding, *, parents: Sequence[os.PathLike] = (), devices: str = "skip") -> list[str]:
        """Unpack into an overlay lowerdir ``dest`` (empty or missing).

        Whiteouts become ``encoding.make_whiteout``, opaque markers ``encoding.set_opaque``.
        A hardlink to a file of an earlier layer cannot cross lowerdirs: the file is copied from the
        first of ``parents`` (lowerdirs, top first) that has it. Returns warnings (skipped devices/xattrs).
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        ap = _Applier(dest, devices=devices)
        ap.reader = self.data_reader()
        for e in self._entries:
            if e.type == "opaque":
                d = ap.ensure_dir(e.path)
                encoding.set_opaque(str(d))
        for e in self._entries:
            if e.type == "whiteout":
                parent = ap.ensure_dir(_parent(e.path))
                name = e.path.rpartition("/")[2]
                target = os.path.join(parent, name)
                if not os.path.lexists(target):  # the layer itself may re-add the path; keep that
                    encoding.make_whiteout(str(parent), name)
        for e in self._entries:
            if not e.is_removal:
                if e.type == "hardlink" and ap.lookup(e.linkname) is None:
                    ap.copy_in_from(e.linkname, parents, encoding)
                ap.add(e, self)
        ap.finish()
        return ap.warnings


class _LazyBlob:
    """The compressed blob of ``with_compression``: made on first use (spooled to disk when large)."""

    def __init__(self, layer: Layer, compression: str):
        self.layer, self.compression = layer, compression

    def source(self) -> "tarstream.Source":
        return tarstream.compress_to(self.layer.tar_chunks(), self.compression, self.layer.size)


class _SpooledTar:
    """The uncompressed tar of a compressed layer, written to a temporary file on first use."""

    def __init__(self, layer: Layer):
        self.layer = layer

    def source(self) -> "tarstream.Source":
        tmp = tempfile.TemporaryFile()
        self.layer.write_tar(tmp)
        tmp.flush()
        return tarstream.FileSource.spooled(tmp)


def _sort_key(e: LayerEntry):
    # whiteouts before their siblings (image-spec SHOULD); "." first; then by path components
    comps = () if e.path == "." else tuple(e.path.split("/"))
    if e.type == "opaque":
        return comps + ("",)
    if e.type == "whiteout":
        return comps[:-1] + ("\x00" + comps[-1],)
    return comps


def _write_tar(items: list[tuple[LayerEntry, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e, data in items:
            name = e.tar_name
            ti = tarfile.TarInfo("./" if name == "." else name + ("/" if e.type == "dir" else ""))
            ti.mode, ti.uid, ti.gid = e.mode & 0o7777, e.uid, e.gid
            ti.mtime = int(e.mtime) if float(e.mtime).is_integer() else e.mtime
            ti.uname = ti.gname = ""
            if e.xattrs:
                ti.pax_headers = {_XATTR_PAX + k: v.decode("utf-8", "surrogateescape")
                                  for k, v in sorted(e.xattrs.items())}
            t = e.type
            if t in ("file", "whiteout", "opaque"):
                ti.type = tarfile.REGTYPE
                data = data or b""
                if t == "file" and e.size not in (0, len(data)):
                    raise ValueError(f"{e.path}: size {e.size} but {len(data)} bytes of data")
                ti.size = len(data) if t == "file" else 0
                tf.addfile(ti, io.BytesIO(data) if t == "file" else None)
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                       "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[t]
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            tf.addfile(ti)
    return buf.getvalue()


def default_store_root() -> str:
    """Where the CLI keeps images between commands: $OVERLAYKIT_STORE or ~/.cache/overlaykit/store."""
    root = os.environ.get("OVERLAYKIT_STORE") or os.path.join(os.path.expanduser("~"), ".cache", "overlaykit", "store")
    os.makedirs(root, exist_ok=True)
    return root


def _owner_uid(st) -> int:
    """Files of an unprivileged builder belong to root in the layer, as rootless engines map them
    (podman/buildah: the invoking user is uid 0 inside): the same build gives the same layer for anyone."""
    euid = os.geteuid()
    return 0 if euid != 0 and st.st_uid == euid else st.st_uid


def _owner_gid(st) -> int:
    return 0 if os.geteuid() != 0 and st.st_gid == os.getegid() else st.st_gid


def _entries_from_upper(upper: Path, encoding, mtime) -> list[tuple[LayerEntry, bytes | None]]:
    items: list[tuple[LayerEntry, bytes | None]] = []
    first_path: dict[tuple[int, int], str] = {}

    def t(st_mtime):
        return int(st_mtime) if mtime is None else min(int(st_mtime), int(mtime))

    def xattrs_of(p: Path) -> dict:
        out = {}
        try:
            names = os.listxattr(p, follow_symlinks=False)
        except OSError:
            return out
        for n in names:
            if n.startswith(_OVERLAY_XATTR_PREFIXES):
                continue
            try:
                out[n] = os.getxattr(p, n, follow_symlinks=False)
            except OSError:
                pass
        return out

    for dirpath, dirnames, filenames in os.walk(upper):
        dirnames.sort()
        d = Path(dirpath)
        rel_dir = d.relative_to(upper).as_posix()
        if rel_dir != "." and encoding.is_opaque(str(d)):
            st = d.stat()
            items.append((LayerEntry(rel_dir, "opaque", mode=st.st_mode & 0o777,
                                     uid=_owner_uid(st), gid=_owner_gid(st), mtime=0), None))
        for name in sorted(dirnames + filenames):
            p = d / name
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if name == WH_OPAQUE:
                continue  # fallback-encoded opaque marker: emitted with its directory above
            st = p.lstat()
            if encoding.is_whiteout(str(d), name):
                target = name[len(WH_PREFIX):] if name.startswith(WH_PREFIX) else name
                path = target if rel_dir == "." else f"{rel_dir}/{target}"
                items.append((LayerEntry(path, "whiteout", mode=0o600, uid=_owner_uid(st), gid=_owner_gid(st),
                                         mtime=t(st.st_mtime)), None))
                continue
            common = dict(mode=stat.S_IMODE(st.st_mode), uid=_owner_uid(st), gid=_owner_gid(st),
                          mtime=t(st.st_mtime), xattrs=xattrs_of(p))
            m = st.st_mode
            if stat.S_ISDIR(m):
                items.append((LayerEntry(rel, "dir", **common), None))
            elif stat.S_ISLNK(m):
                items.append((LayerEntry(rel, "symlink", linkname=os.readlink(p), **common), None))
            elif stat.S_ISREG(m):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in first_path:
                    items.append((LayerEntry(rel, "hardlink", linkname=first_path[key], **common), None))
                    continue
                first_path[key] = rel
                data = p.read_bytes()
                items.append((LayerEntry(rel, "file", size=len(data), **common), data))
            elif stat.S_ISFIFO(m):
                items.append((LayerEntry(rel, "fifo", **common), None))
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                kind = "char" if stat.S_ISCHR(m) else "block"
                items.append((LayerEntry(rel, kind, devmajor=os.major(st.st_rdev),
                                         devminor=os.minor(st.st_rdev), **common), None))
            # sockets are not representable in a tar: skipped, as tar(1) does
    return items


# --------------------------------------------------------------------------------------------------
# applying changesets to a directory


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Applier:
    """Writes entries below ``root`` and nowhere else.

    Parent paths are resolved like securejoin/containerd's RootPath: a symlink on the way is followed
    but clamped to ``root`` (absolute targets and ``..`` are relative to ``root``), and the last
    component is never followed. Resolved directories are cached (as strings: ``pathlib`` cost more
    than the system calls) until something that could be on a cached path is removed or replaced.
    """

    def __init__(self, root, *, devices: str = "skip"):
        if devices not in ("skip", "error", "create"):
            raise ValueError("devices must be skip, error or create")
        self.root = os.path.realpath(root)
        self.devices = devices
        self.dir_times: dict[str, tuple[float, float]] = {}
        self.warnings: list[str] = []
        self.as_root = os.geteuid() == 0
        self.reader: tarstream.DataReader | None = None
        self._dirs: dict[str, str] = {".": self.root}
        self._via_link = False  # some cached resolution went through a symlink
        self._prunes = 1 << 20  # cache items partial forgets may still look at (then: whole forgets)
        # A regular file is created with its final mode when open(2) gives exactly that mode (no umask
        # bit and no set-id/sticky bit in it, no default ACL in the tree), and owned by us without a
        # chown when it should be and its directory's group is ours: two system calls fewer a file.
        umask = os.umask(0o077)
        os.umask(umask)
        self._masked = umask | 0o7000
        self._ids = (os.geteuid(), os.getegid())
        self._dir_gid: dict[str, int] = {}  # real directory -> its group (from stat, or set by us)
        self._dir_attrs: dict[str, tuple] = {}  # real directory -> (uid, gid, mode) we gave it
        try:
            if any(n.startswith("system.posix_acl_default") for n in os.listxattr(self.root)):
                self._masked = 0o7777
        except OSError:
            self._masked = 0o7777

    def _forget(self, p: str | None = None) -> None:
        """The directory or symlink ``p`` went away (None: anything may have): drop what may be stale.

        While no cached resolution went through a symlink, every cached path is its own real path, so
        only those at or below ``p`` are stale. Partial forgets keep the cache of a big tree (a whole
        forget costs a mkdir and an lstat per directory later); their cost is bounded by ``_prunes``,
        then removals forget the whole cache, as they always did."""
        if p is not None and not self._via_link and self._prunes > 0:
            self._prunes -= len(self._dirs) + len(self._dir_gid) + len(self._dir_attrs)
            pre = p + "/"
            self._dirs = {k: v for k, v in self._dirs.items() if v != p and not v.startswith(pre)}
            self._dir_gid = {k: v for k, v in self._dir_gid.items() if k != p and not k.startswith(pre)}
            self._dir_attrs = {k: v for k, v in self._dir_attrs.items() if k != p and not k.startswith(pre)}
            return
        self._dirs = {".": self.root}
        self._dir_gid = {}
        self._dir_attrs = {}
        self._via_link = False

    def _needs_chown(self, e: LayerEntry, parent: str) -> bool:
        """Would a new file in ``parent`` be owned by someone other than ``e.uid:e.gid`` (as root)?"""
        if (e.uid, e.gid) != self._ids:
            return True
        gid = self._dir_gid.get(parent)
        if gid is None:
            gid = self._dir_gid[parent] = os.stat(parent, follow_symlinks=False).st_gid
        return gid != e.gid  # a set-group-ID directory (or a grpid mount) gives its own group

    def resolve(self, rel: str, *, create: bool = False) -> str | None:
        """Real directory for ``rel`` inside root (None if missing and not ``create``)."""
        hit = self._dirs.get(rel)
        if hit is not None:
            return hit
        parent_rel, _, comp = rel.rpartition("/")
        parent = self.resolve(parent_rel or ".", create=create)
        if parent is None:
            return None
        cur = parent + "/" + comp
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(cur, 0o755)
            self._dir_attrs.pop(cur, None)
            self._dirs[rel] = cur
            return cur
        if stat.S_ISLNK(st.st_mode):
            self._via_link = True
            stack = [c for c in parent[len(self.root):].split("/") if c]
            real = self._walk(stack, [comp], create, rel)
            if real is not None:
                self._dirs[rel] = real
            return real
        if not stat.S_ISDIR(st.st_mode):
            if not create:
                return None
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
        self._dirs[rel] = cur
        return cur

    def _walk(self, stack: list[str], todo: list[str], create: bool, rel: str) -> str | None:
        """Resolve ``todo`` from the real directory ``stack``, following (and clamping) symlinks."""
        todo = list(reversed(todo))
        links = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if stack:
                    stack.pop()
                continue
            cur = "/".join([self.root, *stack, comp])
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(cur, 0o755)
                self._dir_attrs.pop(cur, None)
                stack.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(cur)
                if target.startswith("/"):
                    stack = []
                todo.extend(reversed([p for p in target.split("/") if p]))
                continue
            if not stat.S_ISDIR(st.st_mode):
                if not create:
                    return None
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
            stack.append(comp)
        return "/".join([self.root, *stack])

    def ensure_dir(self, rel: str) -> str:
        return self.resolve(rel, create=True)

    def lookup(self, rel: str) -> str | None:
        """The real path of ``rel`` (last component not followed), or None."""
        if rel == ".":
            return self.root
        parent = self.resolve(_parent(rel))
        if parent is None:
            return None
        p = parent + "/" + rel.rpartition("/")[2]
        return p if os.path.lexists(p) else None

    def _remove(self, p: str) -> None:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            os.unlink(p)
            if not stat.S_ISLNK(st.st_mode):
                return
        self._forget(p)
        # directory times still to be set below p must not be: p may come back as a symlink, and
        # os.utime(follow_symlinks=False) only holds for the last component of a path
        pre = p + "/"
        for k in [k for k in self.dir_times if k == p or k.startswith(pre)]:
            del self.dir_times[k]

    def remove(self, rel: str) -> None:
        p = self.lookup(rel)
        if p is None or p == self.root:
            return
        self._remove(p)

    def clear_dir(self, rel: str, keep: set[str] = frozenset()) -> None:
        d = self.resolve(rel)
        if d is None:
            return
        for name in os.listdir(d):
            if name not in keep:
                self._remove(d + "/" + name)

    def add(self, e: LayerEntry, layer: Layer) -> None:
        t = e.type
        if t == "file":  # the common case, kept lean: one open, fd-based attributes
            parent_rel, _, base = e.path.rpartition("/")
            parent = self._dirs.get(parent_rel or ".") or self.resolve(parent_rel or ".", create=True)
            p = parent + "/" + base
            exact = not (e.mode & self._masked) and not e.xattrs
            try:
                fd = os.open(p, _CREATE_FLAGS, e.mode if exact else 0o600)
            except FileExistsError:
                self._remove(p)
                fd = os.open(p, _CREATE_FLAGS, e.mode if exact else 0o600)
            try:
                if e.size:
                    if self.reader is None:
                        self.reader = layer.data_reader()
                    off, size = layer._offsets[e.path]
                    self.reader.copy_to(fd, off, size)
                if e.xattrs:
                    self._attrs(fd, e, fd_based=True)
                else:
                    if self.as_root and (e.uid != self._ids[0] or e.gid != self._ids[1]
                                         or self._dir_gid.get(parent) != e.gid) and self._needs_chown(e, parent):
                        os.chown(fd, e.uid, e.gid)
                    if not exact:
                        os.chmod(fd, e.mode)
                    try:
                        os.utime(fd, (e.mtime, e.mtime))
                    except (OverflowError, ValueError, OSError) as err:
                        if isinstance(err, OSError) and err.errno not in (errno.EINVAL, errno.EOVERFLOW):
                            raise
            finally:
                os.close(fd)
            return
        if e.path == ".":
            return  # the destination's own attributes belong to the caller
        if t in ("char", "block"):
            if self.devices == "error":
                raise LayerError(f"entry {e.path!r}: device node {e.devmajor}:{e.devminor} not allowed")
            if self.devices == "skip" or not self.as_root:
                self.warnings.append(f"skipped {t} device {e.path}")
                return
        parent_rel, _, base = e.path.rpartition("/")
        parent = self._dirs.get(parent_rel or ".") or self.resolve(parent_rel or ".", create=True)
        p = parent + "/" + base
        if t == "dir":
            if self._dirs.get(e.path) != p:  # not already known to be this very directory
                try:
                    os.mkdir(p, 0o700)
                    self._dir_attrs.pop(p, None)
                except FileExistsError:
                    st = os.lstat(p)
                    if not stat.S_ISDIR(st.st_mode):
                        self._remove(p)
                        os.mkdir(p, 0o700)
                        self._dir_attrs.pop(p, None)
                self._dirs[e.path] = p
            self._attrs(p, e)
            return
        if os.path.lexists(p):
            self._remove(p)
        if t == "symlink":
            os.symlink(e.linkname, p)
        elif t == "hardlink":
            target = self.lookup(e.linkname)
            if target is None:
                raise LayerError(f"hardlink {e.path!r} -> {e.linkname!r}: target does not exist")
            if os.path.isdir(target) and not os.path.islink(target):
                raise LayerError(f"hardlink {e.path!r} -> {e.linkname!r}: target is a directory")
            os.link(target, p, follow_symlinks=False)
            return  # a hardlink shares the target's inode: its attributes are the target's
        elif t == "fifo":
            os.mkfifo(p, 0o600)
        elif t in ("char", "block"):
            os.mknod(p, (stat.S_IFCHR if t == "char" else stat.S_IFBLK) | 0o600,
                     os.makedev(e.devmajor, e.devminor))
        self._attrs(p, e)

    def _attrs(self, p, e: LayerEntry, *, fd_based: bool = False) -> None:
        """Owner, mode, xattrs and times of ``p`` (a path, or an open fd of a regular file)."""
        link = e.type == "symlink"
        follow = {} if fd_based else {"follow_symlinks": False}
        if e.type == "dir" and not e.xattrs and self._dir_attrs.get(p) == (e.uid, e.gid, e.mode):
            self.dir_times[p] = (e.mtime, e.mtime)  # owner and mode already set, by a lower layer's entry
            return
        if self.as_root:
            os.chown(p, e.uid, e.gid, **follow)
            if e.type == "dir":
                self._dir_gid[p] = e.gid
        if not link:
            os.chmod(p, e.mode)
        if e.type == "dir":
            self._dir_attrs[p] = (e.uid, e.gid, e.mode)
        for k, v in sorted(e.xattrs.items()) if e.xattrs else ():
            if k.startswith(_OVERLAY_XATTR_PREFIXES):
                self.warnings.append(f"dropped overlay xattr {k} on {e.path}")
                continue
            if k.startswith("system.posix_acl_default"):
                self._masked = 0o7777  # files created below get modes from this ACL, not from open(2)
            try:
                os.setxattr(p, k, v, **follow)
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
                self.warnings.append(f"could not set xattr {k} on {e.path}: {err.strerror}")
        times = (e.mtime, e.mtime)
        if e.type == "dir":
            self.dir_times[p] = times  # set after the children are written
        else:
            _utime(p, times, **follow)

    def copy_in_from(self, rel: str, parents: Sequence[os.PathLike], encoding) -> None:
        """Copy ``rel`` from the first lowerdir that has it (for a hardlink into an earlier layer)."""
        for lower in parents:
            src = _lower_lookup([Path(lower)], rel, encoding)
            if src is not None and not src.is_dir():
                dst = self.ensure_dir(_parent(rel)) + "/" + rel.rpartition("/")[2]
                shutil.copy2(src, dst, follow_symlinks=False)
                if self.as_root:
                    st = src.lstat()
                    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                return

    def finish(self) -> None:
        for p, times in sorted(self.dir_times.items(), key=lambda kv: -kv[0].count("/")):
            _utime(p, times, follow_symlinks=False)
        self.dir_times.clear()


def _utime(p, times, **kw) -> None:
    try:
        os.utime(p, times, **kw)
    except (OverflowError, ValueError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EINVAL, errno.EOVERFLOW):
            raise


def _remove_path(p) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def _lower_lookup(lowers: Sequence[Path], rel: str, encoding) -> Path | None:
    """Which lowerdir (top first) provides ``rel``, honouring whiteouts and opaque dirs."""
    comps = [] if rel == "." else rel.split("/")
    for lower in lowers:
        d, opaque = lower, False
        for i, comp in enumerate(comps):
            if encoding.is_whiteout(str(d), comp):
                return None
            nxt = d / comp
            if not os.path.lexists(nxt):
                break
            if i == len(comps) - 1:
                return nxt
            if nxt.is_symlink() or not nxt.is_dir():
                return None  # a non-directory hides everything below it
            opaque = opaque or encoding.is_opaque(str(nxt))
            d = nxt
        else:
            return d
        if opaque:
            return None
    return None


def flatten(image_or_layers, dest, *, devices: str = "skip") -> list[str]:
    """Apply layers (base first) to ``dest`` as the image-spec says; return warnings.

    Per layer: first every removal (opaque markers, then whiteouts) against the state of the layers
    below -- so an opaque whiteout applies before the layer's own entries wherever it sits in the tar,
    and a whiteout never removes a sibling of its own layer -- then the additions in tar order. A
    directory over a directory only updates attributes; anything else replaces the old path.

    ``dest`` must be new or an empty folder (the caller's files are never touched). The layers are
    applied in a temporary sibling that is renamed into place at the end, so a failure leaves nothing
    behind; it raises ``ApplyError`` naming the layer and the entry. Where the layers disagree with
    each other, we do what ``umoci unpack`` does: an opaque marker or whiteout below a lower layer's file
    changes nothing, an opaque marker for a missing directory creates none; an entry below a lower
    file, or below a symlink loop, is refused.
    """
    layers = image_or_layers.layers if hasattr(image_or_layers, "layers") else list(image_or_layers)
    dest = Path(dest)
    existing = _check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.flatten-", dir=dest.parent))
    try:
        warnings = _apply_layers(layers, tmp, devices)
        if existing is not None:  # keep the caller's folder attributes; rename(2) replaces an empty dir
            os.chmod(tmp, stat.S_IMODE(existing.st_mode))
            if os.geteuid() == 0:
                os.chown(tmp, existing.st_uid, existing.st_gid)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, dest)
    except BaseException:
        _rmtree_force(tmp)
        raise
    return warnings


def _check_destination(dest: Path):
    """The lstat of ``dest`` if it is an empty folder, None if it does not exist; else a clear OSError."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.EEXIST, "the destination is a symlink; give a new or empty folder", str(dest))
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "the destination is a file, not a folder; give a new or "
                                 "empty folder", str(dest))
    with os.scandir(dest) as it:
        if any(True for _ in it):
            raise OSError(errno.ENOTEMPTY, "the destination folder is not empty (flatten never deletes "
                          "files it did not write)", str(dest))
    return st


def _apply_layers(layers, root: Path, devices: str) -> list[str]:
    """Every layer in turn through one ``_Applier`` (its directory cache carries over).

    Directory times are set once, after the last layer: a directory's final time is that of the
    highest layer that lists it (the layers above may add to it or remove from it, which leaves it
    as that layer had it, as umoci leaves it), and a directory that most layers list again (the
    parents of what each adds) costs one ``utime`` instead of one a layer. A directory entry that
    repeats a known directory with the same owner and mode only records its time."""
    warnings: list[str] = []
    ap = _Applier(root, devices=devices)
    i, layer = -1, None
    as_root, (uid, gid) = ap.as_root, ap._ids
    os_open, utime, close = os.open, os.utime, os.close
    for i, layer in enumerate(layers):
        ap.warnings = []
        ap.reader = None
        entries = layer._entries
        e = None
        try:
            for e in entries:
                t = e.type
                if t == "opaque":
                    ap.clear_dir(e.path)
            for e in entries:
                if e.type == "whiteout":
                    ap.remove(e.path)
            ap.reader = reader = layer.data_reader()
            copy_to, offsets = reader.copy_to, layer._offsets
            dirs, dir_attrs, dir_times, add = ap._dirs, ap._dir_attrs, ap.dir_times, ap.add
            masked, dir_gid = ap._masked, ap._dir_gid
            for e in entries:
                t = e.type
                if t == "file":
                    # add()'s common case inline: a file made with its final mode and owner (see
                    # _Applier.__init__) in a known directory, where no file is yet; else add() does it all
                    path = e.path
                    parent_rel, _, base = path.rpartition("/")
                    parent = dirs.get(parent_rel or ".")
                    mode = e.mode
                    if (parent is None or mode & masked or e.xattrs
                            or as_root and (e.uid != uid or e.gid != gid or dir_gid.get(parent) != gid)):
                        add(e, layer)
                        dirs, dir_attrs, dir_times, dir_gid = ap._dirs, ap._dir_attrs, ap.dir_times, ap._dir_gid
                        masked = ap._masked
                        continue
                    try:
                        fd = os_open(parent + "/" + base, _CREATE_FLAGS, mode)
                    except FileExistsError:
                        add(e, layer)
                        dirs, dir_attrs, dir_times, dir_gid = ap._dirs, ap._dir_attrs, ap.dir_times, ap._dir_gid
                        continue
                    try:
                        if e.size:
                            copy_to(fd, *offsets[path])
                        mtime = e.mtime
                        try:
                            utime(fd, (mtime, mtime))
                        except (OverflowError, ValueError, OSError) as err:
                            if isinstance(err, OSError) and err.errno not in (errno.EINVAL, errno.EOVERFLOW):
                                raise
                    finally:
                        close(fd)
                elif t == "dir":
                    path = e.path
                    real = dirs.get(path)
                    if real is not None and not e.xattrs and dir_attrs.get(real) == (e.uid, e.gid, e.mode):
                        parent_rel, _, base = path.rpartition("/")
                        parent = dirs.get(parent_rel or ".")
                        if parent is not None and real == parent + "/" + base:  # not a symlink to a dir
                            dir_times[real] = (e.mtime, e.mtime)
                            continue
                    add(e, layer)
                    dirs, dir_attrs, dir_times, dir_gid = ap._dirs, ap._dir_attrs, ap.dir_times, ap._dir_gid
                    masked = ap._masked  # (a removal renews the caches; an ACL xattr widens the mask)
                elif t != "whiteout" and t != "opaque":
                    add(e, layer)
                    dirs, dir_attrs, dir_times, dir_gid = ap._dirs, ap._dir_attrs, ap.dir_times, ap._dir_gid
                    masked = ap._masked
            e = None
        except (OSError, LayerError) as err:
            raise ApplyError.wrap(err, i, layer, e) from err
        warnings.extend(ap.warnings)
    if layer is not None:
        try:
            ap.finish()
        except (OSError, LayerError) as err:
            raise ApplyError.wrap(err, i, layer, None) from err
    return warnings


def _rmtree_force(path: Path) -> None:
    """Remove a tree we wrote, even where a layer left a directory without write permission."""
    def fix(func, p, exc):
        if isinstance(exc, PermissionError) or (isinstance(exc, tuple) and issubclass(exc[0], PermissionError)):
            try:
                os.chmod(os.path.dirname(p), 0o700)
                if os.path.isdir(p) and not os.path.islink(p):
                    os.chmod(p, 0o700)
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
                return
            except OSError:
                pass
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=lambda f, p, ei: fix(f, p, ei[1]))


# --------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class History:
    """One build step. ``empty_layer`` steps (ENV, CMD, ...) change only the config."""

    created_by: str = ""
    empty_layer: bool = False
    comment: str = ""
    created: str | None = None
    author: str | None = None

    def to_json(self) -> dict:
        d: dict = {}
        if self.created is not None:
            d["created"] = self.created
        if self.author:
            d["author"] = self.author
        if self.created_by:
            d["created_by"] = self.created_by
        if self.comment:
            d["comment"] = self.comment
        if self.empty_layer:
            d["empty_layer"] = True
        return d

    @classmethod
    def from_json(cls, d: dict) -> "History":
        return cls(created_by=d.get("created_by", "") or "", empty_layer=bool(d.get("empty_layer", False)),
                   comment=d.get("comment", "") or "", created=d.get("created"), author=d.get("author"))


def _short(v) -> str:
    r = json.dumps(v)
    return r if len(r) <= 40 else r[:37] + "..."


@dataclass
class ImageConfig:
    """The runtime part of an image config (OCI ``config`` object)."""

    env: list[str] = field(default_factory=list)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""
    shell: list[str] | None = None           # Docker's Shell, Healthcheck and OnBuild (SHELL, HEALTHCHECK,
    healthcheck: dict | None = None          # ONBUILD): kept in the config as Docker keeps them
    on_build: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d: dict = {}
        if self.user:
            d["User"] = self.user
        if self.exposed_ports:
            d["ExposedPorts"] = {p: {} for p in sorted(self.exposed_ports)}
        if self.env:
            d["Env"] = list(self.env)
        if self.entrypoint is not None:
            d["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            d["Cmd"] = list(self.cmd)
        if self.volumes:
            d["Volumes"] = {v: {} for v in sorted(self.volumes)}
        if self.working_dir:
            d["WorkingDir"] = self.working_dir
        if self.labels:
            d["Labels"] = dict(sorted(self.labels.items()))
        if self.stop_signal:
            d["StopSignal"] = self.stop_signal
        if self.shell is not None:
            d["Shell"] = list(self.shell)
        if self.healthcheck is not None:
            d["Healthcheck"] = dict(self.healthcheck)
        if self.on_build:
            d["OnBuild"] = list(self.on_build)
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> "ImageConfig":
        d = d or {}

        def strlist(key):
            v = d.get(key)
            if v is None:
                return None
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise LayerError(f"image config: {key} must be a list of strings")
            return list(v)

        def obj(key, *, str_values=False):
            v = d.get(key)
            if v is None:
                return {}
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v) or (
                    str_values and not all(isinstance(x, str) for x in v.values())):
                want = "an object of strings" if str_values else "an object keyed by strings"
                raise LayerError(f"image config: {key} must be {want}, not {type(v).__name__} {_short(v)}")
            return v

        def string(key):
            v = d.get(key)
            if v is not None and not isinstance(v, str):
                raise LayerError(f"image config: {key} must be a string, not {type(v).__name__} {_short(v)}")
            return v or ""

        if not isinstance(d, dict):
            raise LayerError(f"image config: config must be an object, not {type(d).__name__}")
        return cls(env=strlist("Env") or [], cmd=strlist("Cmd"), entrypoint=strlist("Entrypoint"),
                   working_dir=string("WorkingDir"), labels=dict(obj("Labels", str_values=True)),
                   user=string("User"), exposed_ports=sorted(obj("ExposedPorts")),
                   volumes=sorted(obj("Volumes")), stop_signal=string("StopSignal"),
                   shell=strlist("Shell"), healthcheck=d.get("Healthcheck") if isinstance(d.get("Healthcheck"), dict)
                   else None, on_build=strlist("OnBuild") or [])

    def env_dict(self) -> dict[str, str]:
        return dict(e.split("=", 1) if "=" in e else (e, "") for e in self.env)


@dataclass
class Image:
    """An ordered list of layers (base first, as in the OCI manifest) plus config and history."""

    name: str
    layers: list[Layer] = field(default_factory=list)
    config: ImageConfig = field(default_factory=ImageConfig)
    history: list[History] = field(default_factory=list)
    architecture: str = "amd64"
    os: str = "linux"
    created: str | None = None
    author: str | None = None

    def config_json(self) -> dict:
        d = {"architecture": self.architecture, "os": self.os, "config": self.config.to_json(),
             "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in self.layers]},
             "history": [h.to_json() for h in self.history]}
        if self.created is not None:
            d["created"] = self.created
        if self.author:
            d["author"] = self.author
        return d

    def config_bytes(self) -> bytes:
        return json.dumps(self.config_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def id(self) -> str:
        """Docker's image id: the digest of the config blob."""
        return sha256_digest(self.config_bytes())

    @property
    def size(self) -> int:
        return sum(l.size for l in self.layers)

    def _repr_mimebundle_(self, include=None, exclude=None):
        """A notebook shows the image as its diagram (text where graphviz is missing)."""
        from .diagrams import image_mimebundle
        return image_mimebundle(self)

    def chain_ids(self) -> list[str]:
        """ChainID of each layer (image-spec config.md): identifies a layer together with all below it."""
        out: list[str] = []
        for l in self.layers:
            out.append(l.diff_id if not out else sha256_digest(f"{out[-1]} {l.diff_id}".encode()))
        return out

    def layer_history(self) -> list[History | None]:
        """The history entry of each layer (non-empty entries matched in order)."""
        hs = [h for h in self.history if not h.empty_layer]
        return [hs[i] if i < len(hs) else None for i in range(len(self.layers))]

    def with_layer(self, layer: Layer, created_by: str, *, name: str | None = None,
                   comment: str = "", config: ImageConfig | None = None) -> "Image":
        return Image(name or self.name, self.layers + [layer],
                     dataclasses.replace(config or self.config),
                     self.history + [History(created_by, False, comment)], self.architecture, self.os)

    def __repr__(self):
        return f"Image({self.name!r}, {len(self.layers)} layers, {self.size} bytes)"


# --------------------------------------------------------------------------------------------------
# store


@dataclass(frozen=True)
class ImageUsage:
    name: str
    size: int
    shared_size: int
    unique_size: int


@dataclass(frozen=True)
class DiskUsage:
    """Like ``docker system df -v``: what the images take with sharing, and what they would without."""

    shared_bytes: int      # stored once, used by two or more images
    unshared_bytes: int    # used by exactly one image
    saved_bytes: int       # without_sharing - stored
    per_image: tuple[ImageUsage, ...]

    @property
    def stored_bytes(self) -> int:
        return self.shared_bytes + self.unshared_bytes

    @property
    def without_sharing_bytes(self) -> int:
        return self.stored_bytes + self.saved_bytes


class Store:
    """A content-addressed layer store: each layer's tar and its unpacked lowerdir exist once.

    Layout under ``root``: ``blobs/sha256/<diff_id>`` (uncompressed tar), ``layers/<key>/`` (lowerdir),
    ``images.json`` (names -> config + diff_ids).
    """

    def __init__(self, root, encoding=None):
        from . import ondisk
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "layers").mkdir(exist_ok=True)
        self.encoding = encoding or ondisk.probe(self.root)
        self._images: dict[str, Image] = {}
        self._layers: dict[str, Layer] = {}
        self._load_index()

    def _blob_path(self, diff_id: str) -> Path:
        return self.root / "blobs" / "sha256" / diff_id.split(":", 1)[1]

    def _load_index(self) -> None:
        idx = self.root / "images.json"
        if not idx.exists():
            return
        for name, d in json.loads(idx.read_text()).items():
            layers = [self._layer(diff_id) for diff_id in d["config"]["rootfs"]["diff_ids"]]
            self._images[name] = image_from_config(name, d["config"], layers)

    def _layer(self, diff_id: str) -> Layer:
        if diff_id not in self._layers:
            layer = Layer.from_tar(self._blob_path(diff_id), compression="none")
            if layer.diff_id != diff_id:
                raise LayerError(f"store blob {diff_id} is corrupt (content is {layer.diff_id})")
            self._layers[diff_id] = layer
        return self._layers[diff_id]

    def _save_index(self) -> None:
        data = {n: {"config": im.config_json()} for n, im in sorted(self._images.items())}
        tmp = self.root / "images.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.root / "images.json")

    def add_image(self, image: Image, name: str | None = None) -> Image:
        """Store ``image`` under its name (or ``name``), which must follow Docker's reference grammar."""
        from .refs import check_reference
        if name is not None:
            image = dataclasses.replace(image, name=name)
        check_reference(image.name)
        for layer in image.layers:
            p = self._blob_path(layer.diff_id)
            if not p.exists():
                tmp = p.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    layer.write_tar(f)
                os.replace(tmp, p)
            self._layers.setdefault(layer.diff_id, layer)
        self._images[image.name] = image
        self._save_index()
        return image

    def image(self, name: str) -> Image:
        try:
            return self._images[name]
        except KeyError:
            if ":" not in name.rpartition("/")[2] and name + ":latest" in self._images:
                return self._images[name + ":latest"]
            raise KeyError(f"no image {name!r} in the store (have: {', '.join(sorted(self._images)) or 'none'})") from None

    def images(self) -> list[Image]:
        return [self._images[n] for n in sorted(self._images)]

    def remove_image(self, name: str) -> None:
        del self._images[name]
        self._save_index()

    def layers(self) -> list[Layer]:
        """Every layer some image uses, each once."""
        seen: dict[str, Layer] = {}
        for im in self.images():
            for l in im.layers:
                seen.setdefault(l.diff_id, l)
        return [seen[k] for k in sorted(seen)]

    def layer_dir(self, layer: Layer, parents: Sequence[Layer] = ()) -> Path:
        """The unpacked lowerdir of ``layer`` (unpacked on first use, then reused by every image).

        ``parents`` (base first) matter only for a layer with a hardlink into an earlier layer: such a
        lowerdir holds a copy of the target, so it is keyed by ChainID instead of diff_id.
        """
        own = {e.path for e in layer.entries()}
        cross = any(e.type == "hardlink" and e.linkname not in own for e in layer.entries())
        key = layer.diff_id
        if cross:
            for p in parents:
                key = sha256_digest(f"{key} {p.diff_id}".encode())
        d = self.root / "layers" / key.split(":", 1)[1]
        if not d.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self.root / "layers"))
            try:
                parent_dirs = [self.layer_dir(p, parents[:i]) for i, p in enumerate(parents)][::-1] if cross else []
                layer.unpack(tmp / "root", self.encoding, parents=parent_dirs)
                os.rename(tmp, d)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        return d / "root"

    def disk_usage(self) -> DiskUsage:
        users: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for im in self.images():
            for l in {l.diff_id: l for l in im.layers}.values():
                users[l.diff_id] = users.get(l.diff_id, 0) + 1
                sizes[l.diff_id] = l.size
        shared = sum(sizes[d] for d, n in users.items() if n > 1)
        unshared = sum(sizes[d] for d, n in users.items() if n == 1)
        without = sum(sizes[d] * n for d, n in users.items())
        per = []
        for im in self.images():
            ids = {l.diff_id for l in im.layers}
            sh = sum(sizes[d] for d in ids if users[d] > 1)
            un = sum(sizes[d] for d in ids if users[d] == 1)
            per.append(ImageUsage(im.name, sh + un, sh, un))
        return DiskUsage(shared, unshared, without - shared - unshared, tuple(per))


def image_from_config(name: str, cfg: dict, layers: list[Layer]) -> Image:
    """Build an Image from an OCI/Docker config document, checking it against the layers."""
    if not isinstance(cfg, dict):
        raise LayerError(f"image {name}: config is not a JSON object")
    diff_ids = (cfg.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list):
        raise LayerError(f"image {name}: config has no rootfs.diff_ids")
    if len(diff_ids) != len(layers):
        raise LayerError(f"image {name}: config lists {len(diff_ids)} diff_ids but the manifest {len(layers)} layers")
    for i, (want, layer) in enumerate(zip(diff_ids, layers)):
        if want != layer.diff_id:
            raise LayerError(f"image {name}: layer {i} has diff_id {layer.diff_id}, config says {want}")
    history = [History.from_json(h) for h in cfg.get("history") or [] if isinstance(h, dict)]
    return Image(name, list(layers), ImageConfig.from_json(cfg.get("config")), history,
                 cfg.get("architecture") or "amd64", cfg.get("os") or "linux", cfg.get("created"),
                 cfg.get("author") if isinstance(cfg.get("author"), str) else None)


# --------------------------------------------------------------------------------------------------
# containers


def _lexists_in(root: str, rel: str) -> bool:
    """Is there an entry at ``rel`` inside the layer directory ``root``, every parent reached without
    following a symlink (a lower's ``lib -> /usr/lib`` must not send the question to the host)?"""
    from . import nofollow
    try:
        with nofollow.at(root, rel) as real:
            os.lstat(real)
        return True
    except OSError:
        return False


class Container:
    """An image's layers as read-only lowers (top first) plus a fresh upper: what ``docker run`` mounts."""

    def __init__(self, image: Image, store: Store, scratch_dir, backend: str = "auto"):
        from .engine import Overlay
        self.image, self.store = image, store
        self.scratch = Path(scratch_dir)
        self.upper, self.work = self.scratch / "upper", self.scratch / "work"
        for d in (self.upper, self.work):
            d.mkdir(parents=True, exist_ok=True)
        lowers = [store.layer_dir(l, image.layers[:i]) for i, l in enumerate(image.layers)][::-1]
        if not lowers:
            empty = self.scratch / "empty"
            empty.mkdir(exist_ok=True)
            lowers = [empty]
        self.lowers = lowers
        self.overlay = Overlay(lowers=lowers, upper=self.upper, work=self.work, backend=backend,
                               encoding=store.encoding)
        # diagrams label each lane with the layer it holds (top first, like the lowers)
        self.overlay.layer_names = [f"layer {i} · {layer.diff_id[7:19]}"
                                    for i, layer in reversed(list(enumerate(image.layers)))] or ["empty"]

    def __enter__(self):
        self.overlay.mount()
        return self

    def __exit__(self, *exc):
        self.overlay.unmount()

    def diff(self) -> list[tuple[str, str]]:
        """What ``docker diff`` prints for this container on overlay2: ``(flag, "/path")`` in walk order.

        It follows moby's overlay change walker (``pkg/archive/changes.go`` ``changes`` with
        ``changes_linux.go`` ``overlayDeletedFile``), which walks only the upper directory: a whiteout is
        ``D``; an opaque directory that a lower layer also has is ``D`` too (deleted and made again), and the
        entries under it are ``A``, or ``C`` where some lower layer has the same path; the lower files it
        hides are never listed (`changes` lists them).  Another entry is ``C`` if a lower layer has the
        path, else ``A``, and the parents of an ``A`` or ``D`` are listed ``C`` before it.  (moby also
        leaves out a directory whose mode, size and mtime equal the lower one's; here every such directory
        is ``C``, so the listing does not depend on clock times.)  Where moby calls ``os.Stat`` on
        ``layer/path``, which follows a symlink out of the layer onto the host, each lower is searched
        without following any symlink.
        """
        from .ondisk import WHITEOUT, Layers
        up = Layers([str(self.upper)], self.store.encoding, has_upper=False)
        lowers = [str(p) for p in self.lowers]
        out: list[tuple[str, str]] = []
        listed: set[str] = set()

        def below(p: str) -> bool:
            return any(_lexists_in(low, p) for low in lowers)

        def record(flag: str, p: str) -> None:
            if flag in ("A", "D"):
                parts = p.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    parent = "/".join(parts[:i])
                    if parent not in listed:
                        out.append(("C", "/" + parent))
                        listed.add(parent)
            out.append((flag, "/" + p))
            listed.add(p)

        def visit(d: str) -> None:
            ents = up.entries(0, d) or {}
            for name in sorted(ents):
                p = f"{d}/{name}" if d else name
                e = ents[name]
                if e is WHITEOUT:
                    record("D", p)
                    continue
                is_dir = stat.S_ISDIR(e.st_mode)
                if is_dir and up.is_opaque(0, p) and below(p):
                    record("D", p)
                else:
                    record("C" if below(p) else "A", p)
                if is_dir:
                    visit(p)

        visit("")
        return out

    def changes(self) -> list[tuple[str, str]]:
        """The merged view's changes against the image, sorted by path: A added, C changed, D deleted,
        including the lower entries an opaque directory hides (which ``docker diff`` does not list)."""
        from .ondisk import WHITEOUT, Layers, MergedDir
        enc = self.store.encoding
        low = Layers([str(p) for p in self.lowers], enc, has_upper=False)
        up = Layers([str(self.upper)], enc, has_upper=False)
        out: dict[str, str] = {}

        def visit(d: str) -> None:
            ents = up.entries(0, d) or {}
            if d and up.is_opaque(0, d):
                below = low.lookup(d)
                if isinstance(below, MergedDir):
                    for n in low.names(below):
                        if n not in ents:
                            out[f"{d}/{n}"] = "D"
            for name in sorted(ents):
                p = f"{d}/{name}" if d else name
                e = ents[name]
                if e is WHITEOUT:
                    if low.lookup(p) is not None:
                        out[p] = "D"
                    continue
                out[p] = "C" if low.lookup(p) is not None else "A"
                if stat.S_ISDIR(e.st_mode):
                    visit(p)

        visit("")
        return [(flag, "/" + p) for p, flag in sorted(out.items())]

    def commit(self, created_by: str = "", name: str | None = None, *, comment: str = "",
               config: ImageConfig | None = None, mtime: float | None = None) -> Image:
        """The upper dir as a new layer on top of the image (the container may stay mounted)."""
        layer = Layer.from_dir(self.upper, self.store.encoding, mtime=mtime)
        image = self.image.with_layer(layer, created_by, name=name, comment=comment, config=config)
        return image



# --------------------------------------------------------------------------------------------------
# inspector


@dataclass(frozen=True)
class LayerReport:
    index: int
    created_by: str
    diff_id: str
    size: int                 # uncompressed tar bytes
    content_bytes: int        # regular-file bytes in the layer
    added: tuple[str, ...]
    modified: tuple[str, ...]
    removed: tuple[str, ...]  # paths this layer's whiteouts delete
    opaque: tuple[str, ...]   # directories this layer makes opaque
    wasted_bytes: int         # bytes of this layer hidden in the final image
    removed_bytes: int        # bytes of lower layers this layer hides (they still ship)


@dataclass(frozen=True)
class WastedPath:
    path: str
    count: int                # versions of the path across layers (whiteouts included)
    wasted_bytes: int


@dataclass(frozen=True)
class Inspection:
    """Layer-by-layer numbers for one image, in two definitions.

    Ours: ``wasted_bytes`` = file bytes stored in the layers that the final root filesystem never shows
    (overwritten, deleted by a whiteout or hidden by an opaque directory, which dive ignores);
    ``efficiency`` = bytes visible in the final root filesystem / file bytes stored in all layers.

    dive's (``dive_*``, as dive 0.13 computes them, for comparing CI thresholds): wasted = the total size
    of every path that appears in two or more layers, the surviving copy included; efficiency = the sum
    over paths of their smallest size / the sum of all their sizes; opaque markers are ignored.
    """

    name: str
    layers: tuple[LayerReport, ...]
    size: int
    content_bytes: int
    final_bytes: int
    wasted_bytes: int
    inefficiencies: tuple[WastedPath, ...]
    dive_wasted_bytes: int = 0
    dive_efficiency: float = 1.0
    dive_inefficiencies: tuple[WastedPath, ...] = ()

    @property
    def efficiency(self) -> float:
        """Bytes visible in the final root filesystem / bytes stored in all layers (1.0 = nothing wasted)."""
        return 1.0 if self.content_bytes == 0 else self.final_bytes / self.content_bytes

    @property
    def opaque_dirs(self) -> int:
        return sum(len(l.opaque) for l in self.layers)

    def to_json(self) -> dict:
        """JSON-ready dict. Names that are not UTF-8 keep their bytes as ``\\xNN`` escapes (Python's
        ``backslashreplace``), so the output is valid UTF-8 and never holds lone surrogates."""
        def paths(ps):
            return [json_path(p) for p in ps]

        return {"name": self.name, "size": self.size, "content_bytes": self.content_bytes,
                "final_bytes": self.final_bytes, "wasted_bytes": self.wasted_bytes,
                "efficiency": round(self.efficiency, 6), "opaque_dirs": self.opaque_dirs,
                "layers": [dataclasses.asdict(l) | {"tar_bytes": l.size, "file_bytes": l.content_bytes}
                           | {k: paths(getattr(l, k)) for k in ("added", "modified", "removed", "opaque")}
                           for l in self.layers],
                "inefficiencies": [dataclasses.asdict(w) | {"path": json_path(w.path)}
                                   for w in self.inefficiencies],
                "dive": {"wasted_bytes": self.dive_wasted_bytes, "efficiency": round(self.dive_efficiency, 6),
                         "inefficiencies": [dataclasses.asdict(w) | {"path": json_path(w.path)}
                                            for w in self.dive_inefficiencies]}}

    def render(self, *, top: int = 10) -> str:
        lines = [f"Image {self.name}: {len(self.layers)} layers, {human_size(self.size)}",
                 f"{'#':>3} {'tar size':>10} {'file bytes':>10} {'added':>6} {'modif':>6} {'remov':>6} "
                 f"{'opaq':>5} {'wasted':>10}  created by"]
        for l in self.layers:
            cb = l.created_by.replace("\n", " ")
            cb = cb if len(cb) <= 60 else cb[:57] + "..."
            lines.append(f"{l.index:>3} {human_size(l.size):>10} {human_size(l.content_bytes):>10} "
                         f"{len(l.added):>6} {len(l.modified):>6} "
                         f"{len(l.removed):>6} {len(l.opaque):>5} {human_size(l.wasted_bytes):>10}  {cb}")
        lines.append(f"Wasted: {human_size(self.wasted_bytes)} of {human_size(self.content_bytes)} file bytes; "
                     f"efficiency {self.efficiency:.1%}; opaque directories: {self.opaque_dirs}")
        lines.append(f"dive's definitions: wasted {human_size(self.dive_wasted_bytes)} "
                     f"(every copy of a path in 2+ layers), efficiency {self.dive_efficiency:.1%}")
        if self.inefficiencies:
            lines.append(f"{'count':>5} {'wasted':>10}  path")
            for w in self.inefficiencies[:top]:
                lines.append(f"{w.count:>5} {human_size(w.wasted_bytes):>10}  /{w.path}")
        return "\n".join(lines)

    def __str__(self):
        return self.render()


def json_path(p: str) -> str:
    """A tar name for JSON: undecodable bytes (kept as surrogates by tarfile) become ``\\xNN``."""
    try:
        p.encode("utf-8")
        return p
    except UnicodeEncodeError:
        return p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def dive_efficiency(layers: Sequence["Layer"]) -> tuple[int, float, tuple[WastedPath, ...]]:
    """dive 0.13's wasted bytes, efficiency score and inefficient paths (image/efficiency.go).

    Every leaf of each layer's tree (a file, link, whiteout or a directory with no children in that
    layer) is one version of its path; a whiteout weighs what it deletes if that was a directory (the
    sizes below it in the layers beneath), else 0 -- also for a directory that only exists as the parent
    of other entries, which dive does not count as a directory. Opaque markers are ignored, as dive
    ignores them.
    """
    below: dict[str, int] = {}        # dive's stacked tree so far: path -> size (directories 0)
    below_dirs: set[str] = set()      # directories that had a tar entry (dive: IsDir)
    below_parents: set[str] = set()   # paths with children (implicit parents are not IsDir for dive)
    total: dict[str, int] = {}
    smallest: dict[str, int] = {}
    count: dict[str, int] = {}
    for layer in layers:
        entries = [e for e in layer.entries() if e.type != "opaque" and e.path != "."]
        inner: set[str] = set()
        for e in entries:
            p = e.path
            while "/" in p:
                p = p.rpartition("/")[0]
                if p in inner:
                    break
                inner.add(p)
        for e in entries:
            if e.path in inner:
                continue
            if e.type == "whiteout":
                size = 0
                if e.path in below_dirs:
                    pre = e.path + "/"
                    size = sum(v for k, v in below.items() if k.startswith(pre))
            else:
                size = e.size if e.type == "file" else 0
            total[e.path] = total.get(e.path, 0) + size
            old = smallest.get(e.path)
            smallest[e.path] = size if old is None or size < old else old
            count[e.path] = count.get(e.path, 0) + 1
        for e in entries:  # stack this layer on the tree below (dive's FileTree.Stack)
            if e.type == "whiteout":
                if e.path in below_parents:
                    pre = e.path + "/"
                    for k in [k for k in below if k.startswith(pre)]:
                        del below[k]
                    below_dirs.difference_update([d for d in below_dirs if d.startswith(pre)])
                    below_parents.difference_update([d for d in below_parents if d.startswith(pre)])
                below.pop(e.path, None)
                below_dirs.discard(e.path)
                below_parents.discard(e.path)
                continue
            below[e.path] = e.size if e.type == "file" else 0
            if e.type == "dir":
                below_dirs.add(e.path)
            else:
                below_dirs.discard(e.path)
            p = e.path
            while "/" in p:
                p = p.rpartition("/")[0]
                if p in below_parents:
                    break
                below_parents.add(p)
                below.setdefault(p, 0)
    all_sizes = sum(total.values())
    score = 1.0 if all_sizes == 0 else sum(smallest.values()) / all_sizes
    ineff = tuple(sorted((WastedPath(p, n, total[p]) for p, n in count.items() if n >= 2),
                         key=lambda w: (-w.wasted_bytes, w.path)))
    return sum(w.wasted_bytes for w in ineff), score, ineff


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def inspect(image: Image) -> Inspection:
    """Per layer: what it adds, changes and removes, and which of its bytes the final image never shows."""
    state: dict[str, tuple[int, str, int]] = {}   # visible path -> (layer index, type, size)
    versions: list[tuple[int, str, int]] = []     # every file version: (layer, path, size)
    counts: dict[str, int] = {}
    removed_bytes = [0] * len(image.layers)
    reports = []
    history = image.layer_history()

    def drop_below(prefix: str, i: int) -> None:
        for p in [p for p in state if p.startswith(prefix)]:
            removed_bytes[i] += state.pop(p)[2]

    for i, layer in enumerate(image.layers):
        added, modified, removed, opaque = [], [], [], []
        entries = layer.entries()
        for e in entries:
            if e.type == "opaque":
                opaque.append(e.path)
                drop_below("" if e.path == "." else e.path + "/", i)
        for e in entries:
            if e.type == "whiteout":
                counts[e.path] = counts.get(e.path, 0) + 1
                if e.path in state:
                    removed.append(e.path)
                    gone = state.pop(e.path)
                    removed_bytes[i] += gone[2]
                    if gone[1] == "dir":  # only a directory has entries below it (scanning for them is O(n))
                        drop_below(e.path + "/", i)
        for e in entries:
            if e.is_removal or e.path == ".":
                continue
            size = e.size if e.type == "file" else 0
            old = state.get(e.path)
            if old is None:
                added.append(e.path)
            elif not (old[1] == "dir" and e.type == "dir"):
                modified.append(e.path)
                removed_bytes[i] += old[2]
                if old[1] == "dir":
                    drop_below(e.path + "/", i)
            if e.type != "dir":
                versions.append((i, e.path, size))
                counts[e.path] = counts.get(e.path, 0) + 1
            state[e.path] = (i, e.type, size)
        reports.append([i, layer, added, modified, removed, opaque])

    final = {(v[0], p) for p, v in state.items()}
    wasted_by_layer = [0] * len(image.layers)
    wasted_by_path: dict[str, int] = {}
    for i, p, size in versions:
        if (i, p) not in final:
            wasted_by_layer[i] += size
            wasted_by_path[p] = wasted_by_path.get(p, 0) + size
    out = []
    for i, layer, added, modified, removed, opaque in reports:
        h = history[i]
        out.append(LayerReport(i, h.created_by if h else "", layer.diff_id, layer.size, layer.content_size,
                               tuple(sorted(added)), tuple(sorted(modified)), tuple(sorted(removed)),
                               tuple(sorted(opaque)), wasted_by_layer[i], removed_bytes[i]))
    content = sum(s for _, _, s in versions)
    final_bytes = sum(v[2] for v in state.values())
    ineff = sorted((WastedPath(p, counts.get(p, 0), b) for p, b in wasted_by_path.items() if b or counts.get(p, 0) > 1),
                   key=lambda w: (-w.wasted_bytes, w.path))
    dive_wasted, dive_score, dive_ineff = dive_efficiency(image.layers)
    return Inspection(image.name, tuple(out), image.size, content, final_bytes, content - final_bytes, tuple(ineff),
                      dive_wasted, dive_score, dive_ineff)
