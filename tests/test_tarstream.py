"""tarstream.scan, the fast tar header parser behind every layer, agrees with the standard library's tarfile
on the formats layer tools write (ustar, PAX, GNU long names) and refuses what tarfile would misread."""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaykit import tarstream
from overlaykit.images import LayerError

NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=40)
PATH = st.lists(NAME, min_size=1, max_size=6).map("/".join)
KIND = st.sampled_from(["file", "dir", "symlink", "hardlink", "char", "fifo"])
MEMBER = st.tuples(PATH, KIND, st.binary(max_size=1500), st.integers(0, 2**21), st.integers(0, 0o7777),
                   st.integers(0, 2**33), PATH, st.booleans())


def build(members, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, kind, data, uid, mode, mtime, link, xattr in members:
            ti = tarfile.TarInfo(name)
            ti.uid, ti.gid, ti.mode, ti.mtime = uid, uid // 2, mode, mtime
            if xattr and fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = {"SCHILY.xattr.user.k": "v\u00e9"}
            if kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                       "char": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            ti.linkname = link if kind in ("symlink", "hardlink") else ""
            ti.devmajor, ti.devminor = (uid % 256, mode % 256) if kind == "char" else (0, 0)
            tf.addfile(ti)
    return buf.getvalue()


def expected(data: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            out.append((ti.name, ti.type, ti.size if ti.isreg() else 0, ti.mode, ti.uid, ti.gid, ti.mtime,
                        ti.linkname, ti.devmajor if ti.ischr() else 0, ti.devminor if ti.ischr() else 0,
                        ti.offset_data if ti.isreg() else None,
                        {k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")} or None))
    return out


def scanned(data: bytes, chunk: int) -> tuple[list[tuple], int, str]:
    members, size, digest = tarstream.scan(tarstream.MemorySource(data).chunks(chunk))
    return [(m[0].rstrip("/") if m[1] == b"5" else m[0], m[1], m[2] if m[1] in (b"0", b"\0", b"7") else 0,
             m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10] if m[1] in (b"0", b"\0", b"7") else None, m[11])
            for m in members], size, digest


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MEMBER, max_size=8), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
       st.sampled_from([512, 700, 1 << 20]))
def test_scan_agrees_with_tarfile(members, fmt, chunk):
    data = build(members, fmt)
    got, size, digest = scanned(data, chunk)
    assert size == len(data) and digest == "sha256:" + hashlib.sha256(data).hexdigest()
    want = expected(data)
    assert got == want


def test_ustar_prefix_and_base256_numbers():
    ti = tarfile.TarInfo("p" * 90 + "/" + "n" * 90)
    ti.size = 3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b"abc"))
    got, _, _ = scanned(buf.getvalue(), 1 << 20)
    assert got[0][0] == "p" * 90 + "/" + "n" * 90
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("big-uid")
        ti.uid = 2**40  # GNU writes it base-256
        tf.addfile(ti, io.BytesIO(b""))
    assert scanned(buf.getvalue(), 1 << 20)[0][0][4] == 2**40


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompressed_streams_concatenated_members_and_refuses_truncation(compression):
    comp = (lambda b: gzip.compress(b, mtime=0)) if compression == "gzip" else zstandard.ZstdCompressor().compress
    blob = comp(b"hello ") + comp(b"world")
    assert b"".join(tarstream.decompressed(iter([blob[:5], blob[5:]]), compression, max_size=100, what="x")) \
        == b"hello world"
    with pytest.raises(LayerError, match="corrupt|truncated"):
        b"".join(tarstream.decompressed(iter([blob[:-6]]), compression, max_size=100, what="x"))
    with pytest.raises(LayerError, match="exceeds the limit"):
        b"".join(tarstream.decompressed(iter([comp(b"\0" * 5000)]), compression, max_size=1000, what="x"))


def test_sparse_files_are_refused_clearly():
    ti = tarfile.TarInfo("holes")
    ti.type = tarfile.GNUTYPE_SPARSE
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(ti)
    with pytest.raises(LayerError, match="sparse files are not supported"):
        tarstream.scan(iter([buf.getvalue()]))


@pytest.mark.parametrize("start", ["none", "gzip", "zstd"])
def test_recompression_spooled_to_disk_round_trips(monkeypatch, tmp_path, start):
    """Above IN_MEMORY_MAX a recompressed blob (or a decompressed copy) goes to a temporary file: same bytes."""
    from overlaykit import oci
    from overlaykit.images import Image, Layer
    monkeypatch.setattr(tarstream, "IN_MEMORY_MAX", 0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(50):
            ti = tarfile.TarInfo(f"d/f{i}")
            data = bytes([i]) * (i * 300)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    layer = Layer.from_tar(tar).with_compression(start) if start != "none" else Layer.from_tar(tar)
    layer = Layer.from_tar(layer.blob())  # a compressed layer read back from its blob (no tar in memory)
    for c in ("none", "gzip", "zstd"):
        other = layer.with_compression(c)
        assert other.tar_bytes() == tar and other.diff_id == layer.diff_id
        assert Layer.from_tar(other.blob()).diff_id == layer.diff_id
        assert other.read("d/f7") == bytes([7]) * 2100
    oci.save(Image("spool:1", [layer]), tmp_path / "o", format="oci-layout", compression="zstd")
    (back,) = oci.load(tmp_path / "o")
    assert back.layers[0].tar_bytes() == tar
