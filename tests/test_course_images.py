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


def test_history_is_newest_first_with_empty_layers():
    l0 = course.layer_from_files({"hello": "x"})
    im = course.image_from_layers("t", [("/bin/sh -c #(nop) COPY file:hello in / ", l0),
                                        ('/bin/sh -c #(nop)  CMD ["/hello"]', None)], cmd=["/hello"])
    assert im.config.cmd == ["/hello"] and len(im.layers) == 1
    lines = course.history(im).splitlines()
    assert lines[0].split() == ["LAYER", "(diff_id)", "SIZE", "EMPTY_LAYER", "CREATED", "BY"]
    assert lines[1].split()[:4] == ["-", "0", "B", "true"] and lines[1].endswith('CMD ["/hello"]')
    assert lines[2].startswith(l0.diff_id[7:19]) and " false " in lines[2] and lines[2].endswith("COPY file:hello in /")


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
