"""Layers, flatten, images, the store, containers and the inspector."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from layer_helpers import make_tar, snapshot  # noqa: E402

from overlaykit import ondisk  # noqa: E402
from overlaykit.images import (Container, History, Image, ImageConfig, Layer, LayerEntry, LayerError,  # noqa: E402
                               Store, flatten, inspect)

ENCODINGS = [ondisk.FALLBACK] + ([ondisk.KERNEL_ROOT] if os.geteuid() == 0 else [])


def layer(*members) -> Layer:
    return Layer.from_tar(make_tar(*members))


def f(path, data="", **kw):
    return LayerEntry(path, "file", size=len(data), **kw), data.encode()


def d(path, **kw):
    return LayerEntry(path, "dir", mode=kw.pop("mode", 0o755), **kw), None


# ---------------------------------------------------------------------------------------------- Layer

def test_layer_identity_and_entries():
    tar = make_tar(("etc", "dir"), ("etc/motd", "file", "hello"), ("etc/.wh.issue", "file"),
                   ("var/.wh..wh..opq", "file"), ("bin/sh", "symlink", "busybox"))
    l = Layer.from_tar(tar)
    import hashlib
    assert l.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() == l.digest
    assert l.size == len(tar) and l.media_type.endswith(".tar")
    kinds = [(e.path, e.type) for e in l.entries()]
    assert kinds == [("etc", "dir"), ("etc/motd", "file"), ("etc/issue", "whiteout"), ("var", "opaque"),
                     ("bin/sh", "symlink")]
    assert [e.tar_name for e in l.entries()][2:4] == ["etc/.wh.issue", "var/.wh..wh..opq"]
    assert l.read("etc/motd") == b"hello"
    assert l.tar_bytes() == tar


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers_keep_diff_id(compression):
    plain = layer(("a", "file", "x" * 1000))
    c = plain.with_compression(compression)
    assert c.diff_id == plain.diff_id and c.digest != plain.digest
    assert c.media_type.endswith("+" + compression)
    again = Layer.from_tar(c.blob())
    assert again.compression == compression and again.digest == c.digest and again.diff_id == plain.diff_id
    with pytest.raises(LayerError, match="declared"):
        Layer.from_tar(c.blob(), compression="none" if compression == "gzip" else "gzip")


def test_from_entries_is_deterministic_and_puts_whiteouts_first():
    items = [f("b/z", "z"), d("b"), (LayerEntry("b/y", "whiteout"), None), (LayerEntry("b", "opaque"), None)]
    l1, l2 = Layer.from_entries(items), Layer.from_entries(list(reversed(items)))
    assert l1.diff_id == l2.diff_id
    assert [e.tar_name for e in l1.entries()] == ["b", "b/.wh..wh..opq", "b/.wh.y", "b/z"]


def test_xattrs_round_trip():
    l = Layer.from_entries([(LayerEntry("bin/ping", "file", size=1, xattrs={"security.capability": b"\x01\xff\x00"}), b"p")])
    again = Layer.from_tar(l.tar_bytes())
    assert again.entries()[0].xattrs == {"security.capability": b"\x01\xff\x00"}


# ---------------------------------------------------------------------------------------------- flatten

def test_flatten_whiteouts_and_replacements(tmp_path):
    base = layer(("etc", "dir"), ("etc/a", "file", "a"), ("etc/b", "file", "b"), ("x", "file", "file-x"),
                 ("y", "dir"), ("y/inner", "file", "i"), ("opq", "dir"), ("opq/old", "file", "o"))
    top = layer(("etc", "dir"), ("etc/.wh.a", "file"), ("x", "dir"), ("x/now-a-dir", "file", "d"),
                ("y", "file", "now a file"), ("opq", "dir"), ("opq/new", "file", "n"))
    # the opaque marker sits *after* the layer's own opq/new: it must still apply first
    top2 = layer(("opq", "dir"), ("opq/new2", "file", "n2"), ("opq/.wh..wh..opq", "file"))
    flatten([base, top, top2], tmp_path / "root")
    snap = snapshot(tmp_path / "root")
    assert sorted(snap) == ["etc", "etc/b", "opq", "opq/new2", "x", "x/now-a-dir", "y"]
    assert snap["y"][0] == "file" and snap["x"][0] == "dir"


def test_whiteout_does_not_remove_a_sibling_of_its_own_layer(tmp_path):
    base = layer(("f", "file", "old"))
    top = layer(("f", "file", "new"), (".wh.f", "file"))  # re-added in the same layer, whiteout after it
    flatten([base, top], tmp_path / "r")
    assert (tmp_path / "r" / "f").read_text() == "new"


def test_hardlink_to_earlier_layer_and_attributes(tmp_path):
    base = layer(("bin", "dir"), ("bin/busybox", "file", "BB", {"mode": 0o4755}))
    top = layer(("bin", "dir", None, {"mode": 0o700, "mtime": 1234}), ("bin/sh", "hardlink", "bin/busybox"))
    flatten([base, top], tmp_path / "r")
    sh, bb = tmp_path / "r/bin/sh", tmp_path / "r/bin/busybox"
    assert os.path.samefile(sh, bb) and sh.read_text() == "BB"
    assert stat.S_IMODE(bb.stat().st_mode) == 0o4755
    assert stat.S_IMODE((tmp_path / "r/bin").stat().st_mode) == 0o700
    assert (tmp_path / "r/bin").stat().st_mtime == 1234


def test_symlinked_parent_is_resolved_inside_dest(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    base = layer(("lib", "symlink", str(outside)), ("up", "symlink", "../../.."))
    top = layer(("lib/evil", "file", "x"), ("up/evil2", "file", "y"))
    flatten([base, top], tmp_path / "r")
    assert list(outside.iterdir()) == []
    # an absolute or escaping symlink is followed inside dest, like securejoin/containerd RootPath
    assert (tmp_path / "r" / str(outside).lstrip("/") / "evil").read_text() == "x"
    assert (tmp_path / "r" / "evil2").read_text() == "y"


def test_flatten_image_object(tmp_path):
    im = Image("t", [layer(("a", "file", "1"))], ImageConfig(cmd=["sh"]), [History("COPY a /a")])
    flatten(im, tmp_path / "r")
    assert (tmp_path / "r/a").read_text() == "1"


# ---------------------------------------------------------------------------------------------- unpack / from_dir

@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: e.kind)
def test_unpack_then_from_dir_round_trips_the_changeset(tmp_path, enc):
    l = layer(("d", "dir"), ("d/.wh.gone", "file"), ("o", "dir"), ("o/.wh..wh..opq", "file"), ("o/n", "file", "n"),
              ("d/new", "file", "new"), ("l", "symlink", "d/new"))
    l.unpack(tmp_path / "low", enc)
    assert enc.is_whiteout(str(tmp_path / "low/d"), "gone")
    assert enc.is_opaque(str(tmp_path / "low/o"))
    back = Layer.from_dir(tmp_path / "low", enc)
    assert sorted((e.tar_name, e.type) for e in back.entries()) == sorted(
        (e.tar_name, e.type) for e in l.entries())
    wh = [e for e in back.entries() if e.type == "whiteout"][0]
    assert wh.mode == 0o600  # as moby's ConvertWrite


def test_from_dir_reads_kernel_format_upper(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making char 0/0 whiteouts and trusted xattrs needs root")
    up = tmp_path / "upper"
    (up / "etc").mkdir(parents=True)
    os.mknod(up / "etc/passwd", stat.S_IFCHR, 0)
    (up / "var").mkdir()
    os.setxattr(up / "var", "trusted.overlay.opaque", b"y")
    (up / "var/x").write_text("x")
    l = Layer.from_dir(up, ondisk.KERNEL_ROOT, mtime=0)
    assert [e.tar_name for e in l.entries()] == ["etc", "etc/.wh.passwd", "var", "var/.wh..wh..opq", "var/x"]
    assert all("overlay" not in k for e in l.entries() for k in e.xattrs)
    assert Layer.from_dir(up, ondisk.KERNEL_ROOT, mtime=0).diff_id == l.diff_id


# ---------------------------------------------------------------------------------------------- store / container

def _base_images():
    base = layer(("etc", "dir"), ("etc/os-release", "file", "ubuntu" * 100), ("usr", "dir"),
                 ("usr/lib.so", "file", "L" * 5000))
    images = []
    for i in range(5):
        app = layer(("app", "dir"), (f"app/svc{i}", "file", f"service {i}"))
        images.append(Image(f"svc{i}", [base, app], ImageConfig(), [History("FROM ubuntu"), History("COPY app")]))
    return base, images


def test_store_shares_layers(tmp_path):
    base, images = _base_images()
    s = Store(tmp_path / "store")
    for im in images:
        s.add_image(im)
    blobs = list((tmp_path / "store/blobs/sha256").iterdir())
    assert len(blobs) == 6
    du = s.disk_usage()
    assert du.shared_bytes == base.size
    assert du.unshared_bytes == sum(im.layers[1].size for im in images)
    assert du.saved_bytes == 4 * base.size
    assert [u.name for u in du.per_image] == [f"svc{i}" for i in range(5)]
    assert all(u.shared_size == base.size for u in du.per_image)
    d1 = s.layer_dir(base)
    assert s.layer_dir(base) == d1 and (d1 / "etc/os-release").exists()
    again = Store(tmp_path / "store")  # persisted index
    assert [im.name for im in again.images()] == [f"svc{i}" for i in range(5)]
    assert again.image("svc3").layers[1].diff_id == images[3].layers[1].diff_id


@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_container_diff_and_commit(tmp_path, backend):
    if backend == "kernel":
        from overlaykit import capabilities
        info = capabilities()["kernel"]
        if not info.available:
            pytest.skip(info.reason)
    base = layer(("etc", "dir"), ("etc/a", "file", "a"), ("etc/b", "file", "b"), ("var", "dir"),
                 ("var/cache", "dir"), ("var/cache/x", "file", "x"), ("var/cache/y", "file", "y"))
    im = Image("base", [base], ImageConfig(), [History("ADD rootfs")])
    store = Store(tmp_path / "store")
    store.add_image(im)
    with Container(im, store, tmp_path / "c", backend=backend) as c:
        ov = c.overlay
        ov.write_text("etc/a", "changed")
        ov.remove("etc/b")
        ov.write_text("new.txt", "n")
        ov.remove("var/cache/x")
        ov.remove("var/cache/y")
        ov.rmdir("var/cache")
        ov.mkdir("var/cache")
        ov.write_text("var/cache/z", "z")
        changes, diff = c.changes(), c.diff()
        new = c.commit("RUN change things", name="changed")
    assert changes == [("C", "/etc"), ("C", "/etc/a"), ("D", "/etc/b"), ("A", "/new.txt"), ("C", "/var"),
                       ("C", "/var/cache"), ("D", "/var/cache/x"), ("D", "/var/cache/y"), ("A", "/var/cache/z")]
    # docker diff (moby's walker): the re-made opaque dir is D, the lower files it hides are not listed
    assert diff == [("C", "/etc"), ("C", "/etc/a"), ("D", "/etc/b"), ("A", "/new.txt"), ("C", "/var"),
                    ("D", "/var/cache"), ("A", "/var/cache/z")]
    assert new.name == "changed" and len(new.layers) == 2
    assert new.history[-1] == History("RUN change things")
    names = {e.tar_name: e.type for e in new.layers[1].entries()}
    assert names["etc/.wh.b"] == "whiteout" and names["var/cache/.wh..wh..opq"] == "opaque"
    flatten(new, tmp_path / "r")
    assert sorted(snapshot(tmp_path / "r")) == ["etc", "etc/a", "new.txt", "var", "var/cache", "var/cache/z"]
    assert (tmp_path / "r/etc/a").read_text() == "changed"
    # the committed image runs again as a container, through the store
    store.add_image(new)
    with Container(new, store, tmp_path / "c2", backend=backend) as c2:
        assert c2.overlay.listdir("var/cache") == ["z"]
        assert not c2.overlay.exists("etc/b")


# ---------------------------------------------------------------------------------------------- inspector

def test_inspect_counts_waste_and_opaque_dirs():
    big = "B" * 10_000
    l0 = layer(("tmp", "dir"), ("tmp/src.tar.gz", "file", big), ("etc", "dir"), ("etc/conf", "file", "v1"))
    l1 = layer(("tmp", "dir"), ("tmp/.wh.src.tar.gz", "file"), ("etc", "dir"), ("etc/conf", "file", "v2"),
               ("etc/new", "file", "n"))
    l2 = layer(("etc", "dir"), ("etc/.wh..wh..opq", "file"), ("etc/only", "file", "o"))
    im = Image("t", [l0, l1, l2], history=[History("ADD src"), History("RUN rm"), History("RUN reset etc")])
    r = inspect(im)
    assert [x.created_by for x in r.layers] == ["ADD src", "RUN rm", "RUN reset etc"]
    assert r.layers[0].added == ("etc", "etc/conf", "tmp", "tmp/src.tar.gz")
    assert r.layers[1].removed == ("tmp/src.tar.gz",) and r.layers[1].modified == ("etc/conf",)
    assert r.layers[1].added == ("etc/new",)
    assert r.layers[2].opaque == ("etc",) and r.opaque_dirs == 1
    assert r.layers[0].wasted_bytes == 10_002 and r.layers[1].wasted_bytes == 3
    assert r.layers[1].removed_bytes == 10_002 and r.layers[2].removed_bytes == 3
    assert r.content_bytes == 10_006 and r.final_bytes == 1 and r.wasted_bytes == 10_005
    assert r.efficiency == pytest.approx(1 / 10_006)
    assert r.inefficiencies[0].path == "tmp/src.tar.gz" and r.inefficiencies[0].count == 2
    text = r.render()
    assert "RUN rm" in text and "opaque directories: 1" in text
    j = r.to_json()
    assert j["layers"][1]["removed"] == ["tmp/src.tar.gz"] and j["opaque_dirs"] == 1


def test_inspect_efficient_image():
    im = Image("ok", [layer(("a", "file", "abc"))])
    r = inspect(im)
    assert r.efficiency == 1.0 and r.wasted_bytes == 0 and r.inefficiencies == ()


# dive's definitions (issue 14, item 11), computed here from the tar members with none of images.py's code:
# dive 0.13 image/efficiency.go visits the leaves of each layer's tree; a whiteout weighs the bytes below it
# if it deletes a directory (else 0); opaque markers are ignored; wasted = all bytes of paths seen 2+ times,
# efficiency = sum of each path's smallest size / sum of all sizes.

def dive_numbers(tars: list[bytes]) -> tuple[int, float]:
    import io
    import posixpath
    import tarfile
    stacked: dict[str, tuple[bool, int]] = {}   # path -> (is_dir, size)
    sizes: dict[str, list[int]] = {}
    for data in tars:
        members = []
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf:
                name = posixpath.normpath("/" + m.name)
                if name == "/" or posixpath.basename(name) == ".wh..wh..opq":
                    continue
                members.append((name, m))
        tree = {name for name, _ in members}
        for name, _ in members:  # the implicit parents are nodes of the layer tree too
            while (name := posixpath.dirname(name)) != "/":
                tree.add(name)
        leaves = {n for n in tree if not any(o.startswith(n + "/") for o in tree)}
        for name, m in members:
            base = posixpath.basename(name)
            target = posixpath.join(posixpath.dirname(name), base[4:]) if base.startswith(".wh.") else name
            if target not in leaves and name not in leaves:
                continue
            if base.startswith(".wh."):
                was_dir = stacked.get(target, (False, 0))[0]
                size = sum(s for p, (_, s) in stacked.items() if p.startswith(target + "/")) if was_dir else 0
            else:
                size = m.size if m.isreg() else 0
            sizes.setdefault(target, []).append(size)
        for name, m in members:
            base = posixpath.basename(name)
            if base.startswith(".wh."):
                target = posixpath.join(posixpath.dirname(name), base[4:])
                for p in [p for p in stacked if p == target or p.startswith(target + "/")]:
                    del stacked[p]
            else:
                stacked[name] = (m.isdir(), m.size if m.isreg() else 0)
                p = name
                while (p := posixpath.dirname(p)) != "/":
                    stacked.setdefault(p, (False, 0))  # an implicit parent is not a directory to dive
    wasted = sum(sum(v) for v in sizes.values() if len(v) >= 2)
    total = sum(sum(v) for v in sizes.values())
    return wasted, 1.0 if total == 0 else sum(min(v) for v in sizes.values()) / total


DIVE_CASES = {
    "overwrite and delete": [
        make_tar(("etc", "dir"), ("etc/passwd", "file", "root"), ("usr/lib/a", "file", "A" * 1000),
                 ("usr/lib/b", "file", "B" * 500), ("bin/sh", "file", "S" * 300)),
        make_tar(("etc/passwd", "file", "root+app"), ("usr/.wh.lib", "file"), ("bin/.wh.sh", "file"),
                 ("new", "file", "N" * 40)),
        make_tar(("usr", "dir"), ("usr/.wh..wh..opq", "file"), ("usr/lib", "dir"), ("usr/lib/a", "file", "a" * 10),
                 ("etc/passwd", "file", "x"))],
    "empty dirs and links": [
        make_tar(("d", "dir"), ("e", "dir"), ("e/f", "file", "x" * 7), ("l", "symlink", "e/f")),
        make_tar(("d", "dir"), ("l", "symlink", "e"), ("h", "hardlink", "e/f"), ("e/f", "file", "y" * 3))],
    "no waste": [make_tar(("a", "file", "abc")), make_tar(("b", "file", "de"))],
    "explicit directory deleted": [
        make_tar(("usr", "dir"), ("usr/lib", "dir"), ("usr/lib/a", "file", "A" * 100), ("usr/lib/x", "dir"),
                 ("usr/lib/x/b", "file", "B" * 50), ("keep", "file", "k")),
        make_tar(("usr/.wh.lib", "file"), ("keep", "file", "kk")),
        make_tar(("usr/lib", "dir"), ("usr/lib/a", "file", "a"))],
}


@pytest.mark.parametrize("case", sorted(DIVE_CASES))
def test_inspect_reports_dives_definitions(case):
    tars = DIVE_CASES[case]
    r = inspect(Image("t", [Layer.from_tar(t) for t in tars]))
    wasted, score = dive_numbers(tars)
    assert r.dive_wasted_bytes == wasted
    assert r.dive_efficiency == pytest.approx(score)
    assert sum(w.wasted_bytes for w in r.dive_inefficiencies) == wasted
    j = r.to_json()["dive"]
    assert j["wasted_bytes"] == wasted and j["efficiency"] == pytest.approx(score, abs=1e-6)
    text = r.render()
    assert "dive's definitions: wasted" in text and "tar size" in text and "file bytes" in text
    if case == "overwrite and delete":  # ours and dive's differ, as the issue measured on redis
        assert wasted > 0 and r.wasted_bytes != wasted and r.efficiency != pytest.approx(score)


def test_inspect_layer_sizes_are_tar_and_file_bytes():
    r = inspect(Image("t", [Layer.from_tar(t) for t in DIVE_CASES["no waste"]]))
    assert [l.content_bytes for l in r.layers] == [3, 2]
    assert all(l.size >= 1024 and l.size % 512 == 0 for l in r.layers)
    assert r.to_json()["layers"][0]["file_bytes"] == 3 and r.to_json()["layers"][0]["tar_bytes"] == r.layers[0].size
