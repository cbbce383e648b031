"""The image helpers of overlaykit.course: deterministic layers and docker-like listings."""
from overlaykit import course
from overlaykit.images import flatten


def test_layer_from_files_is_content_addressed_and_root_owned():
    a = course.layer_from_files({"etc/motd": "hi\n", "usr/bin/app": 5000})
    b = course.layer_from_files({"usr/bin/app": 5000, "etc/motd": "hi\n"})
    c = course.layer_from_files({"etc/motd": "hi!\n", "usr/bin/app": 5000})
    assert a.diff_id == b.diff_id != c.diff_id
    entries = {e.path: e for e in a.entries()}
    assert sorted(entries) == ["etc", "etc/motd", "usr", "usr/bin", "usr/bin/app"]
    assert entries["usr/bin/app"].size == 5000 and entries["usr/bin/app"].mode == 0o755
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in a.entries())
    assert a.read("etc/motd") == b"hi\n"


def test_removals_flatten_as_the_image_spec_says(tmp_path):
    base = course.layer_from_files({"etc/a": "a", "etc/b": "b", "var/cache/x": 10, "var/cache/y": 20})
    top = course.layer_from_files({"var/cache/z": "z"}, removed=["etc/a"], opaque=["var/cache"])
    listing = course.tar_listing(top)
    assert "etc/.wh.a   (whiteout: deletes etc/a)" in listing
    assert "var/cache/.wh..wh..opq" in listing
    flatten([base, top], tmp_path / "root")
    assert course.tree(tmp_path / "root") == "\n".join(
        ["etc/", "etc/b (1 B)", "var/", "var/cache/", "var/cache/z (1 B)"])


def test_history_has_docker_history_columns_and_content_sizes():
    l0 = course.layer_from_files({"hello": "x"})
    im = course.image_from_layers("t", [("/bin/sh -c #(nop) COPY file:hello in / ", l0),
                                        ('/bin/sh -c #(nop)  CMD ["/hello"]', None)], cmd=["/hello"])
    assert im.config.cmd == ["/hello"] and len(im.layers) == 1
    lines = course.history(im).splitlines()
    assert lines[0].split() == ["IMAGE", "CREATED", "BY", "SIZE", "COMMENT"]
    # newest first; only the top row names an image (like a pulled image), the rest are <missing>
    assert lines[1].startswith(im.id[7:19]) and lines[1].split()[-2:] == ["0", "B"]
    assert 'CMD ["/hello"]' in lines[1]
    # SIZE is the content (1 byte of file), not the 10,240-byte tar
    assert lines[2].startswith("<missing>") and lines[2].split()[-2:] == ["1", "B"] and l0.size == 10240


def test_layers_lists_diff_ids_tar_and_content_sizes_and_chain_ids():
    import hashlib
    a = course.layer_from_files({"a": "aa"})
    b = course.layer_from_files({"b": "b" * 2000})
    im = course.image_from_layers("t", [("ADD a", a), ("ADD b", b)])
    rows = [line.split() for line in course.layers(im).splitlines()]
    chain_b = "sha256:" + hashlib.sha256(f"{a.diff_id} {b.diff_id}".encode()).hexdigest()
    assert rows[0] == ["#", "DIFF_ID", "TAR", "SIZE", "CONTENT", "CHAIN_ID"]
    assert rows[1] == ["0", a.diff_id[7:19], "10.2", "kB", "2", "B", a.diff_id[7:19]]
    assert rows[2] == ["1", b.diff_id[7:19], "10.2", "kB", "2.0", "kB", chain_b[7:19]]


def test_layer_from_files_times_and_owners_change_the_diff_id():
    files = {"etc/motd": "hi\n", "bin/app": 100}
    zero = course.layer_from_files(files)
    assert course.layer_from_files(files, mtime=0, uid=0).diff_id == zero.diff_id
    later = course.layer_from_files(files, mtime=1_700_000_000)
    owned = course.layer_from_files(files, uid=1000)
    assert len({zero.diff_id, later.diff_id, owned.diff_id}) == 3
    assert {e.mtime for e in later.entries()} == {1_700_000_000}
    assert {(e.uid, e.gid) for e in owned.entries()} == {(1000, 1000)}
    assert all(later.read(p) == zero.read(p) for p in ("etc/motd", "bin/app"))


def test_tar_listing_cuts_long_layers():
    layer = course.layer_from_files({f"f{i:02}": "x" for i in range(12)})
    text = course.tar_listing(layer, limit=5)
    assert text.splitlines()[-1] == "... +7 more entries" and len(text.splitlines()) == 6


def test_tar_listing_can_show_only_removals():
    top = course.layer_from_files({"var/cache/z": "z"}, removed=["etc/a"], opaque=["var/cache"])
    lines = course.tar_listing(top, kinds=("whiteout", "opaque")).splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("etc/.wh.a   (whiteout: deletes etc/a)")
    assert "var/cache/.wh..wh..opq" in lines[1]


def test_build_log_reads_the_same_on_every_backend(tmp_path, capsys):
    from overlaykit.images import Store
    image = course.build(course.example("hello-scratch.Dockerfile"), course.example("hello"),
                         Store(tmp_path / "store"), "hello")
    assert image.config.cmd == ["/hello"]
    assert capsys.readouterr().out.splitlines() == [
        "Step 1/3 : FROM scratch", " ---> starts empty: no base layers",
        "Step 2/3 : COPY hello /", " ---> new layer, 10.2 kB",
        'Step 3/3 : CMD ["/hello"]', " ---> no layer (config only)"]
