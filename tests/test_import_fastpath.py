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
from hypothesis import HealthCheck, event, given, settings
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


# -------------------------------------------------------------------------------------------------- flatten

NAMES = ["a", "a/b", "a/b/c", "a/x", "c", "c/y", "l", "l/z", "a/l"]
LINK_TARGETS = ["a", "/a/b", "../c", "nowhere", "a/b", "l", "."]


@st.composite
def stack_layers(draw):
    """Tars of 1 to 4 layers over a few paths: files, directories, symlinks (into the tree, absolute,
    dangling, to themselves), hard links (within and across layers), fifos, whiteouts, opaque markers,
    with modes, owners and times; the parser refuses some stacks and the appliers must agree on them."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        members, seen, added = [], set(), {}
        for _ in range(draw(st.integers(0, 7))):
            path = draw(st.sampled_from(NAMES))
            kind = draw(st.sampled_from(["file", "file", "dir", "dir", "symlink", "hardlink", "fifo", "whiteout",
                                         "opaque"]))
            removal = kind in ("whiteout", "opaque")
            # what the parser refuses (tested elsewhere) mostly left out, so most stacks get applied:
            # a path twice in a layer, an entry below a non-directory of the same layer
            if (path, removal) in seen or not removal and path in added:
                continue
            below = path if kind == "opaque" else path.rpartition("/")[0]
            ancestors = [below.rsplit("/", k)[0] for k in range(below.count("/") + 1)] if below else []
            if any(added.get(a, "dir") not in ("dir", "symlink") for a in ancestors) or (
                    kind != "dir" and not removal and any(n.startswith(path + "/") for n in added)):
                continue
            seen.add((path, removal))
            if not removal:
                added[path] = kind
            parent, _, base = path.rpartition("/")
            ti = tarfile.TarInfo(path)
            ti.mtime = draw(st.sampled_from([0, 7, 1000, 500_000]))
            ti.uid = ti.gid = draw(st.sampled_from([0, 0, 1000]))
            ti.mode = draw(st.sampled_from([0o755, 0o700, 0o750] if kind == "dir" else [0o644, 0o600, 0o755, 0o4755,
                                                                                         0o444]))
            data = b""
            if kind == "whiteout":
                ti.name = (parent + "/" if parent else "") + ".wh." + base
            elif kind == "opaque":
                ti.name = path + "/.wh..wh..opq"
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, draw(st.sampled_from(LINK_TARGETS))
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, draw(st.sampled_from(NAMES))
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                data = draw(st.sampled_from([b"", b"one", b"two" * 3000]))
                ti.size = len(data)
            members.append((ti, data))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in members:
                tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
        layers.append(buf.getvalue())
    return layers


def reference_flatten(layers, root) -> list[str]:
    """The applier as it was before the flatten fast paths: every entry through ``_Applier.add``,
    directory times set after each layer, the whole directory cache forgotten at each removal."""
    ap = images._Applier(root)
    ap._prunes = 0
    warnings = []
    for i, layer in enumerate(layers):
        ap.warnings, ap.reader, e = [], None, None
        try:
            for e in layer._entries:
                if e.type == "opaque":
                    ap.clear_dir(e.path)
            for e in layer._entries:
                if e.type == "whiteout":
                    ap.remove(e.path)
            ap.reader = layer.data_reader()
            for e in layer._entries:
                if not e.is_removal:
                    ap.add(e, layer)
            e = None
            ap.finish()
        except (OSError, LayerError) as err:
            raise images.ApplyError.wrap(err, i, layer, e) from err
        warnings.extend(ap.warnings)
    return warnings


def tree(root) -> dict:
    """Everything flatten decides about a tree: types, modes, owners, data, link targets, which paths
    share an inode, and times (a directory's time only where the reference did not leave the clock's)."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            inodes.setdefault(st_.st_ino, []).append(rel)
            out[rel] = [stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid, st_.st_ino,
                        st_.st_mtime if not stat.S_ISDIR(st_.st_mode) or st_.st_mtime < 1e9 else "clock",
                        os.readlink(p) if stat.S_ISLNK(st_.st_mode) else
                        open(p, "rb").read() if stat.S_ISREG(st_.st_mode) else None]
    for rec in out.values():
        rec[4] = min(inodes[rec[4]])  # the inode as the first of its names
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(stack_layers())
def test_flatten_fast_paths_give_the_reference_tree(tmp_path_factory, tars):
    try:
        layers = [Layer.from_tar(t) for t in tars]
    except LayerError:
        event("refused at import")
        return  # refused at import (an entry below a file of its own layer, a hard link to nowhere...)
    base = tmp_path_factory.mktemp("flat")
    ref_root = base / "ref"
    ref_root.mkdir()
    try:
        ref = outcome(lambda: reference_flatten(layers, ref_root))
        new = outcome(lambda: flatten(layers, base / "new"))
        event(f"{len(layers)} layers: {ref[0]}")
        assert new[0] == ref[0], (new, ref)
        if ref[0] == "ok":
            assert new == ref
            t_ref, t_new = tree(ref_root), tree(base / "new")
            for rel, rec in t_ref.items():  # where the reference left a directory the clock's time, the fast
                if rec[5] == "clock" and rel in t_new:  # path leaves the highest listing layer's
                    t_new[rel][5] = "clock"
            assert t_new == t_ref
        else:
            assert new[1] == ref[1]
            assert not (base / "new").exists()
    finally:
        images._rmtree_force(base)


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(os, name)

    def counted(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)
    monkeypatch.setattr(os, name, counted)
    return calls


def test_a_directory_every_layer_lists_again_is_timed_once_and_made_once(tmp_path, monkeypatch):
    """Each layer of a stack lists the parents of what it adds: before the fast paths, every such entry
    cost a utime (and, after any removal of a directory, a mkdir and an lstat for every directory)."""
    dirs = [("usr", "dir"), ("usr/lib", "dir"), ("usr/lib/pkg", "dir"), ("etc", "dir"), ("etc/old", "dir")]
    layers = [Layer.from_tar(make_tar(*dirs, ("usr/lib/pkg/f0", "file", "0")))]
    for i in range(1, 6):
        extra = [("etc/.wh.old", "file")] if i == 1 else []
        layers.append(Layer.from_tar(make_tar(*dirs[:4], *extra, (f"usr/lib/pkg/f{i}", "file", str(i)))))
    utimes, mkdirs = count_calls(monkeypatch, "utime"), count_calls(monkeypatch, "mkdir")
    flatten(layers, tmp_path / "root")
    dir_utimes = sorted(p.rpartition("flatten-")[2].partition("/")[2] for p in utimes if isinstance(p, str))
    assert dir_utimes == ["etc", "usr", "usr/lib", "usr/lib/pkg"]  # once each (files: by their fd)
    made = [str(p).rpartition("flatten-")[2].partition("/")[2] for p in mkdirs if "flatten-" in str(p)]
    assert sorted(made) == ["", "etc", "etc/old", "usr", "usr/lib", "usr/lib/pkg"]  # the destination, then each once
    assert sorted(os.listdir(tmp_path / "root/usr/lib/pkg")) == [f"f{i}" for i in range(6)]


def test_a_directory_changed_by_a_higher_layer_that_does_not_list_it_keeps_its_listed_time(tmp_path):
    """As umoci leaves it (and as an overlay mount of the unpacked layers shows it): the time of the
    highest layer that lists the directory, not the time of the flatten."""
    layers = [Layer.from_tar(make_tar(("d", "dir", None, {"mtime": 1000}), ("d/a", "file", "a"),
                                      ("e", "dir", None, {"mtime": 2000}), ("e/a", "file", "a"))),
              Layer.from_tar(make_tar(("d/b", "file", "b"), ("e/.wh.a", "file")))]
    flatten(layers, tmp_path / "root")
    assert os.lstat(tmp_path / "root/d").st_mtime == 1000
    assert os.lstat(tmp_path / "root/e").st_mtime == 2000
    assert sorted(os.listdir(tmp_path / "root/d")) == ["a", "b"] and os.listdir(tmp_path / "root/e") == []


def test_a_directory_entry_over_a_symlink_to_a_known_directory_replaces_the_symlink(tmp_path):
    """The repeated-directory shortcut must not take a symlink (cached as the directory it leads to) for
    the directory itself, even with the same owner and mode."""
    layers = [Layer.from_tar(make_tar(("a", "dir", None, {"mtime": 5}), ("l", "symlink", "a"),
                                      ("l/z", "file", "z"))),
              Layer.from_tar(make_tar(("l", "dir", None, {"mtime": 6}), ("l/y", "file", "y")))]
    flatten(layers, tmp_path / "new")
    (tmp_path / "ref").mkdir()
    reference_flatten(layers, tmp_path / "ref")
    assert tree(tmp_path / "new") == tree(tmp_path / "ref")
    assert not os.path.islink(tmp_path / "new/l") and os.listdir(tmp_path / "new/l") == ["y"]
    assert os.listdir(tmp_path / "new/a") == ["z"]


def test_parsing_a_layer_sets_off_no_garbage_collection(tmp_path):
    """The parse makes no reference cycles, but its new objects (an entry and a member tuple each)
    would set off a collection every 700, each walking them again: a fifth of an import's time."""
    import gc
    p = tmp_path / "layer.tar"
    p.write_bytes(make_tar(*[(f"d{i // 100}/f{i}", "file", "x") for i in range(5000)]))
    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])
    gc.collect()
    gc.callbacks.append(count)
    try:
        layer = Layer.from_tar(p)
    finally:
        gc.callbacks.remove(count)
    assert len(layer.entries()) == 5000
    assert len(runs) <= 1, runs  # (the one due as collection is enabled again, not one per 700 objects)
    assert gc.isenabled()
