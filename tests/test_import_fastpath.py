"""The fast paths of image import and flatten give exactly what the general paths give.

``tarstream.scan_file`` (headers read, large files' data seeked past and hashed apart) against
``tarstream.scan`` (every byte streamed); ``_parse_tar``'s inline common case against ``_entry_from_member``;
files created with their final mode and owner against the layer's attributes, where a set-group-ID
directory, a umask or set-id bits would make a shortcut wrong.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaykit import images, oci, tarstream
from overlaykit.images import History, Image, Layer, LayerError, _parse_tar, flatten

from layer_helpers import make_tar

COMP = st.sampled_from(["a", "b", "usr", ".wh.a", ".wh..wh..opq", ".wh..wh.plnk", ".hidden", "..", ".", "x" * 120,
                        "caf\u00e9", "d\u00e9j\u00e0"])
PATH = st.lists(COMP, min_size=1, max_size=4).map("/".join) | st.sampled_from(
    ["./a", "/abs/b", "a//b", "a/", "./", "l" * 300 + "/f", "a/./b"])
KIND = st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "char", "fifo"])
MEMBER = st.tuples(PATH, KIND, st.binary(max_size=3000), st.integers(0, 2**33), st.integers(0, 0o7777),
                   st.sampled_from([0, 1, 1_600_000_000, 2**33 + 5]), PATH, st.booleans())


def build(members, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, kind, data, uid, mode, mtime, link, xattr in members:
            ti = tarfile.TarInfo(name)
            ti.uid, ti.gid, ti.mode, ti.mtime = uid, uid // 3, mode, mtime
            if xattr and fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = {"SCHILY.xattr.user.k": "v\u00e9", "SCHILY.xattr.security.x": "1"}
            if kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                       "char": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            ti.linkname = link if kind in ("symlink", "hardlink") else ""
            tf.addfile(ti)
    return buf.getvalue()


def outcome(fn):
    try:
        return ("ok", fn())
    except LayerError as e:
        return ("error", str(e))


def in_file(tmp_path, data: bytes, pad: int) -> tarstream.FileSource:
    """``data`` as a region of a bigger file (as a layer sits inside an archive)."""
    p = tmp_path / f"archive-{pad}-{len(data)}"
    p.write_bytes(b"\xff" * pad + data + b"\xee" * 777)
    return tarstream.FileSource.open(p).region(pad, len(data))


def full_entries(entries):
    return [(e.path, e.type, e.size, e.mode, e.uid, e.gid, e.mtime, e.linkname, e.xattrs, e.devmajor, e.devminor)
            for e in entries]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(MEMBER, max_size=10), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
       st.sampled_from(["whole", "no-eof", "truncated", "garbage"]), st.integers(0, 10_000),
       st.sampled_from([(1 << 18, 4 << 20), (700, 1000), (512, 513)]))
def test_scan_file_and_parse_agree_with_the_streaming_paths(tmp_path, members, fmt, damage, cut, buffers):
    saved = tarstream._READ_AHEAD, tarstream._GAP_CHUNK
    tarstream._READ_AHEAD, tarstream._GAP_CHUNK = buffers  # small: reads straddle every boundary
    try:
        check_scan_file(tmp_path, members, fmt, damage, cut)
    finally:
        tarstream._READ_AHEAD, tarstream._GAP_CHUNK = saved


def test_a_read_across_the_read_ahead_boundary_is_hashed_once(tmp_path, monkeypatch):
    """Found by the test above: an extension header read across the end of the read-ahead re-read (and
    re-hashed) the old buffer's tail, so the diff_id was wrong."""
    data = build([("./a", "file", b"", 0, 0, 0, "./a", False), ("l" * 300 + "/f", "file", b"\0", 0, 0, 0, "a", False),
                  ("a", "symlink", b"", 0, 0, 0, "x" * 120, False)], tarfile.GNU_FORMAT)
    for cut in (len(data), 5633 % len(data), 3000):
        src = in_file(tmp_path, data[:cut], pad=1536)
        assert outcome(lambda: tarstream.scan_file(src)) == outcome(
            lambda: tarstream.scan(tarstream.MemorySource(data[:cut]).chunks()))
    monkeypatch.setattr(tarstream, "_READ_AHEAD", 700)
    src = in_file(tmp_path, data, pad=0)
    assert tarstream.scan_file(src)[2] == "sha256:" + hashlib.sha256(data).hexdigest()


def check_scan_file(tmp_path, members, fmt, damage, cut):
    data = build(members, fmt)
    if damage == "no-eof":
        data = data[:-1024] if len(data) > 1024 else data
    elif damage == "truncated":
        data = data[:cut % max(1, len(data))]
    elif damage == "garbage":
        data = data[:-1024] + b"garbage!" * 64 + bytes(512) if len(data) > 1024 else data
    src = in_file(tmp_path, data, pad=512 * (cut % 5))

    streamed = outcome(lambda: tarstream.scan(tarstream.MemorySource(data).chunks(777)))
    seeked = outcome(lambda: tarstream.scan_file(src))
    assert seeked == streamed
    if streamed[0] == "ok":
        assert streamed[1][2] == "sha256:" + hashlib.sha256(data).hexdigest()

    # _parse_tar's inline common case builds the entries _entry_from_member builds, and refuses the same
    def general_path():
        saved, images._FAST_TYPES = images._FAST_TYPES, {}  # every member through _entry_from_member
        try:
            return full_entries(_parse_tar(tarstream.MemorySource(data).chunks())[0])
        finally:
            images._FAST_TYPES = saved

    fast = outcome(lambda: full_entries(_parse_tar(None, scanned=tarstream.scan_file(src))[0]))
    assert fast == outcome(general_path)


def test_layers_parsed_from_a_file_match_layers_parsed_from_bytes(tmp_path):
    tar = make_tar(("etc", "dir"), ("etc/passwd", "file", "root:x:0:0"), ("etc/.wh.shadow", "file"),
                   ("usr/.wh..wh..opq", "file"), ("usr/bin/sh", "file", b"\x7fELF" * 5000),
                   ("usr/bin/ash", "hardlink", "usr/bin/sh"), ("lib", "symlink", "usr/lib"),
                   ("x" * 200 + "/y", "file", "long"), ("attrs", "file", "x", {"pax": {"SCHILY.xattr.user.a": "1"}}),
                   ("dev/null", "char"), ("empty", "file", b""))
    p = tmp_path / "layer.tar"
    p.write_bytes(tar)
    from_file, from_bytes = Layer.from_tar(p), Layer.from_tar(tar)
    assert from_file.diff_id == from_bytes.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert full_entries(from_file.entries()) == full_entries(from_bytes.entries())
    assert from_file.read("usr/bin/sh") == b"\x7fELF" * 5000
    assert from_file.read("empty") == b""


def test_a_file_that_shrinks_under_the_scan_is_an_error_not_a_wrong_digest(tmp_path):
    p = tmp_path / "layer.tar"
    p.write_bytes(make_tar(("a", "file", b"x" * 50_000)))
    src = tarstream.FileSource.open(p)
    os.truncate(p, 1024)
    with pytest.raises(LayerError, match="shrank"):
        tarstream.scan_file(src)


def test_every_layer_of_an_archive_is_hashed_where_it_lies(tmp_path):
    layers = [Layer.from_tar(make_tar((f"d{i}", "dir"), (f"d{i}/f", "file", os.urandom(200_000))))
              for i in range(5)]
    image = Image("t/many:1", layers, history=[History(f"l{i}") for i in range(5)])
    good = tmp_path / "good.tar"
    oci.save_docker(image, good)
    (loaded,) = oci.load(good)
    assert [l.diff_id for l in loaded.layers] == [l.diff_id for l in layers]

    bad = tmp_path / "bad.tar"  # layer 0's bytes changed: its diff_id no longer matches the config
    blob = good.read_bytes()
    at = blob.index(layers[0].read("d0/f")[:64])
    bad.write_bytes(blob[:at] + bytes(64) + blob[at + 64:])
    with pytest.raises(LayerError, match="diff_id"):
        oci.load(bad)
    (again,) = oci.load(good)
    assert [l.diff_id for l in again.layers] == [l.diff_id for l in layers]


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and set-group-ID directories need root")
def test_flatten_owners_and_modes_are_the_layers_under_a_setgid_parent_and_any_umask(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chown(parent, 0, 4321)
    os.chmod(parent, 0o2775)  # files made below would get group 4321 without a chown
    members = [("d", "dir", None, {"mode": 0o755}), ("d/plain", "file", "a", {"mode": 0o644}),
               ("d/all", "file", "b", {"mode": 0o666}), ("d/suid", "file", "c", {"mode": 0o4755}),
               ("d/ro", "file", "d" * 100_000, {"mode": 0o400}), ("top", "file", "e", {"mode": 0o600}),
               ("sg", "dir", None, {"mode": 0o2755}), ("sg/f", "file", "f", {"mode": 0o640})]
    layer = Layer.from_tar(make_tar(*members))
    old = os.umask(0o027)
    try:
        flatten([layer], parent / "root")
    finally:
        os.umask(old)
    root = parent / "root"
    for name, kind, _payload, extra in members:
        st_ = os.lstat(root / name)
        assert (st_.st_uid, st_.st_gid) == (0, 0), name
        assert stat.S_IMODE(st_.st_mode) == extra["mode"], name
    assert (root / "d/ro").read_bytes() == b"d" * 100_000


def test_flatten_modes_are_exact_for_an_unprivileged_user_too(tmp_path):
    members = [("a", "file", "1", {"mode": 0o644}), ("b", "file", "2", {"mode": 0o755}),
               ("c", "file", "3", {"mode": 0o666}), ("d", "file", "4", {"mode": 0o1644}),
               ("e", "file", "", {"mode": 0o000})]
    for umask in (0o022, 0o077, 0o000):
        old = os.umask(umask)
        try:
            flatten([Layer.from_tar(make_tar(*members))], tmp_path / f"root-{umask:o}")
        finally:
            os.umask(old)
        for name, _kind, payload, extra in members:
            p = tmp_path / f"root-{umask:o}" / name
            assert stat.S_IMODE(os.lstat(p).st_mode) == extra["mode"], (umask, name)
            if extra["mode"] & 0o400 or os.geteuid() == 0:
                assert p.read_text() == payload


def test_a_directory_declared_again_gets_the_upper_layers_attributes_even_after_removal(tmp_path):
    """Directory owner/mode are set once and skipped when a higher layer declares the same ones: the
    record of what was set must die with the directory (whiteout, opaque parent, replacement)."""
    ids = {"uid": 5, "gid": 6} if os.geteuid() == 0 else {}

    def tar(*members):
        out = []
        for m in members:
            extra = dict(m[3]) if len(m) > 3 else {}
            out.append((*m[:3], extra))
        return Layer.from_tar(make_tar(*out))

    def layer_with_ids(members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, kind, mode, mtime in members:
                ti = tarfile.TarInfo(name)
                ti.mode, ti.mtime = mode, mtime
                ti.uid, ti.gid = ids.get("uid", 0), ids.get("gid", 0)
                if kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                else:
                    tf.addfile(ti, io.BytesIO(b""))
        return Layer.from_tar(buf.getvalue())

    layers = [
        layer_with_ids([("d", "dir", 0o700, 10), ("d/sub", "dir", 0o711, 11), ("e", "dir", 0o750, 12)]),
        tar(("d/.wh.sub", "file"), (".wh.e", "file")),                     # both removed
        tar(("d/sub/x", "file", "x"), ("e/y", "file", "y")),               # both made again, implicitly
        layer_with_ids([("d/sub", "dir", 0o711, 20), ("e", "dir", 0o750, 21)]),  # declared as in layer 0
        layer_with_ids([("d", "dir", 0o700, 30)]),                          # same attributes, new mtime
    ]
    flatten(layers, tmp_path / "root")
    for rel, mode, mtime in (("d", 0o700, 30), ("d/sub", 0o711, 20), ("e", 0o750, 21)):
        st_ = os.lstat(tmp_path / "root" / rel)
        assert (stat.S_IMODE(st_.st_mode), st_.st_mtime) == (mode, mtime), rel
        if ids:
            assert (st_.st_uid, st_.st_gid) == (5, 6), rel
