"""Docker's overlay2 layout rebuilt from an image: names and formats as moby writes them."""
from __future__ import annotations

import hashlib
import os
import re
import stat as st

import pytest

from overlaykit import capabilities, course, dockerroot
from overlaykit.images import Container, Store

KERNEL = capabilities()["kernel"]
HEX64 = re.compile(r"^[a-f0-9]{64}(-init)?$")  # layer/filestore.go stringIDRegexp
LINK = re.compile(r"^[A-Z2-7]{26}$")           # base32, idLength = 26


def demo_image(name="demo", base_files=None):
    base = course.layer_from_files(base_files or {"etc/os-release": "demo\n", "bin/sh": 100, "tmp/": ""})
    top = course.layer_from_files({"hi": "hi\n"}, removed=["etc/os-release"])
    return course.image_from_layers(name, [("ADD rootfs /", base), ("RUN echo hi > /hi", top)])


@pytest.fixture
def layout(tmp_path):
    img = demo_image()
    store = Store(tmp_path / "store")
    store.add_image(img)
    c = Container(img, store, tmp_path / "ctr", backend="sim")
    with c:
        c.overlay.write_text("tmp/log", "hello world\n")
        c.overlay.remove("hi")
    return dockerroot.rebuild(img, tmp_path / "docker", container=c)


def test_chain_ids_follow_the_image_spec():
    img = demo_image()
    d = [l.diff_id for l in img.layers]
    want = [d[0], "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()]
    assert dockerroot.chain_ids(d) == want == img.chain_ids()


def test_layerdb_entries(layout):
    for i, r in enumerate(layout.layers):
        db = layout.layerdb(r.chain_id)
        assert db.name == r.chain_id[7:]
        assert (db / "diff").read_text() == r.diff_id
        assert (db / "cache-id").read_text() == r.cache_id and HEX64.match(r.cache_id)
        assert (db / "size").read_text() == str(r.size)
        if i == 0:
            assert not (db / "parent").exists()
        else:
            assert (db / "parent").read_text() == layout.layers[i - 1].chain_id
    assert layout.layers[0].size == len("demo\n") + 100 and layout.layers[1].size == 3


def test_overlay2_directories_links_and_lower_files(layout):
    home = layout.docker / "overlay2"
    bottom, top = layout.layers
    for r in layout.layers:
        d = home / r.cache_id
        assert LINK.match((d / "link").read_text())
        assert os.readlink(home / "l" / r.link) == f"../{r.cache_id}/diff"
        assert (home / "l" / r.link).resolve() == (d / "diff").resolve()
        assert st.S_IMODE(os.stat(d).st_mode) == 0o710
    assert not (home / bottom.cache_id / "lower").exists() and not (home / bottom.cache_id / "work").exists()
    assert (home / top.cache_id / "lower").read_text() == f"l/{bottom.link}"
    assert (home / layout.init_id / "lower").read_text() == f"l/{top.link}:l/{bottom.link}"
    assert (home / layout.mount_id / "lower").read_text() == f"l/{layout.init_link}:l/{top.link}:l/{bottom.link}"
    assert (home / top.cache_id / "committed").exists()  # a child was created on it
    assert (home / layout.mount_id / "merged").is_dir() and (home / layout.mount_id / "work").is_dir()
    # the layer's files, in the overlay's own format: layer 1 deletes etc/os-release with a whiteout
    assert (home / bottom.cache_id / "diff" / "bin" / "sh").stat().st_size == 100
    assert layout.encoding.is_whiteout(str(home / top.cache_id / "diff" / "etc"), "os-release")


def test_init_layer(layout):
    diff = layout.overlay2(layout.init_id) / "diff"
    for path, kind in dockerroot.INIT_ENTRIES.items():
        p = diff / path.lstrip("/")
        if kind == "dir":
            assert p.is_dir() and not p.is_symlink()
        elif kind == "file":
            assert p.is_file() and p.stat().st_size == 0 and st.S_IMODE(p.stat().st_mode) == 0o755
        else:
            assert os.readlink(p) == kind
    assert layout.init_id == layout.mount_id + "-init" and HEX64.match(layout.init_id)


def test_mounts_entry_and_graph_driver(layout):
    m = layout.docker / "image/overlay2/layerdb/mounts" / layout.container_id
    assert (m / "mount-id").read_text() == layout.mount_id
    assert (m / "init-id").read_text() == layout.init_id
    assert (m / "parent").read_text() == layout.layers[-1].chain_id
    data = layout.inspect()["GraphDriver"]["Data"]
    assert layout.inspect()["GraphDriver"]["Name"] == "overlay2"
    # LowerDir is the lower file resolved through l/ (overlay.go getLowerDirs), as Docker's absolute paths
    home = layout.docker / "overlay2"
    resolved = [os.path.normpath(home / "l" / os.readlink(home / s))
                for s in (home / layout.mount_id / "lower").read_text().split(":")]
    assert data["LowerDir"].split(":") == [p.replace(str(layout.docker), "/var/lib/docker") for p in resolved]
    base = f"/var/lib/docker/overlay2/{layout.mount_id}"
    assert (data["UpperDir"], data["WorkDir"], data["MergedDir"]) == (f"{base}/diff", f"{base}/work",
                                                                     f"{base}/merged")


def test_container_layer_and_ps_size(layout):
    diff = layout.overlay2(layout.mount_id) / "diff"
    assert (diff / "tmp" / "log").read_text() == "hello world\n"
    assert layout.encoding.is_whiteout(str(diff), "hi")
    assert layout.size_rw == 12 and layout.image_size == 108
    assert layout.ps_size() == "12B (virtual 120B)"


@pytest.mark.parametrize("n, text", [(0, "0B"), (2, "2B"), (999, "999B"), (1500, "1.5kB"),
                                     (183_000_000, "183MB"), (140_380_160, "140MB"), (1_234_567_890, "1.23GB")])
def test_go_human_size(n, text):
    assert dockerroot.go_human_size(n) == text


def test_deterministic_and_seeded(tmp_path):
    img = demo_image()
    a = dockerroot.rebuild(img, tmp_path / "a")
    b = dockerroot.rebuild(img, tmp_path / "b")
    c = dockerroot.rebuild(img, tmp_path / "c", seed="other")
    assert a.tree(full_ids=True) == b.tree(full_ids=True)
    assert a.layers[0].cache_id != c.layers[0].cache_id and a.layers[0].chain_id == c.layers[0].chain_id
    assert a.diagram().source == b.diagram().source


def test_same_diff_id_on_two_parents_is_stored_twice(tmp_path):
    """The layer store is keyed by ChainID: one layer on two bases gets two layerdb entries and two copies."""
    shared = course.layer_from_files({"app/run": "run\n"})
    one = course.image_from_layers("one", [("base", course.layer_from_files({"etc/a": "a"})), ("app", shared)])
    two = course.image_from_layers("two", [("base", course.layer_from_files({"etc/b": "b"})), ("app", shared)])
    la = dockerroot.rebuild(one, tmp_path / "one", container=False)
    lb = dockerroot.rebuild(two, tmp_path / "two", container=False)
    assert la.layers[1].diff_id == lb.layers[1].diff_id
    assert la.layers[1].chain_id != lb.layers[1].chain_id and la.layers[1].cache_id != lb.layers[1].cache_id


def test_rebuild_replaces_dest_atomically(tmp_path):
    img = demo_image()
    dest = tmp_path / "docker"
    dest.mkdir()
    (dest / "old").write_text("x")
    dockerroot.rebuild(img, dest, container=False)
    assert not (dest / "old").exists()
    assert sorted(os.listdir(tmp_path)) == ["docker"]  # no temporary sibling left behind


def test_tree_shows_the_layout(layout):
    text = layout.tree()
    assert text.startswith("/var/lib/docker/\n├── image/")
    assert f"{layout.short(layout.init_id)}/" in text and "mtab -> /proc/mounts" in text
    assert f"{layout.layers[0].link} -> ../{layout.layers[0].cache_id[:12]}/diff" in text
    assert "│   │   ├── hi (whiteout)" in text


def test_diagram(layout):
    d = layout.diagram()
    assert "cache-id" in d.source and "lowerdir 1" in d.source and "init layer" in d.source
    assert layout.short(layout.layers[0].chain_id) in d.text


@pytest.mark.parametrize("backend", ["sim", pytest.param("kernel", marks=[pytest.mark.kernel, pytest.mark.skipif(
    not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")])])
def test_mounting_the_rebuilt_layers_gives_the_containers_root(layout, backend):
    with layout.overlay(backend=backend) as ov:
        names = ov.listdir(".")
        assert {".dockerenv", "bin", "dev", "etc", "proc", "sys", "tmp"} == set(names)
        assert "hi" not in names and not ov.exists("etc/os-release")
        assert ov.read_text("tmp/log") == "hello world\n"
        assert ov.stat("etc/mtab", follow_symlinks=False).target == "/proc/mounts"
        tree = ov.tree()
    if backend == "kernel":
        with layout.overlay(backend="sim") as sim:
            assert sim.tree() == tree
