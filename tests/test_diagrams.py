"""Diagrams: drawn from the live state, deterministic, and readable even where graphviz's dot is missing."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from overlaykit import Overlay
from overlaykit import diagrams as D

ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")


def make_stack(tmp_path):
    for d in ("l0", "l1", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "l1/etc").mkdir()
    (tmp_path / "l1/etc/passwd").write_text("root:x:0:0\n")
    (tmp_path / "l1/etc/hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "l1/usr/lib").mkdir(parents=True)
    (tmp_path / "l1/usr/lib/a.so").write_text("x" * 100)
    (tmp_path / "l0/etc").mkdir()
    (tmp_path / "l0/etc/hosts").write_text("10.0.0.1 db\n")
    return Overlay([tmp_path / "l0", tmp_path / "l1"], tmp_path / "upper", tmp_path / "work", backend="sim")


@pytest.fixture
def ov(tmp_path):
    o = make_stack(tmp_path)
    with o:
        o.write_text("etc/passwd", "bob:x:1000\n", append=True)
        o.remove("etc/hosts")
        o.remove("usr/lib/a.so")
        o.rmdir("usr/lib")
        o.mkdir("usr/lib")
        o.write_text("usr/lib/b.so", "y")
        yield o


def lane(lanes, name):
    return next(x for x in lanes if x.name == name)


def test_import_overlaykit_does_not_load_graphviz_or_ipywidgets():
    code = "import sys, overlaykit; print('graphviz' in sys.modules, 'ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == ["False", "False"]


def test_stack_lanes_mark_origin_whiteouts_and_opaque(ov):
    lanes = D.stack_lanes(ov)
    assert [x.name for x in lanes] == ["merged", "upper", "lower[0]", "lower[1]", "work"]
    merged = {e.path: e for e in lane(lanes, "merged").entries}
    assert "etc/hosts" not in merged and "usr/lib/a.so" not in merged
    assert merged["etc/passwd"].status == "upper" and merged["usr/lib/b.so"].status == "upper"
    assert merged["etc"].by == "upper+lower[0]+lower[1]"
    upper = {e.path: e for e in lane(lanes, "upper").entries}
    assert upper["etc/hosts"].kind == "whiteout" and upper["etc/hosts"].hides == "lower[0]"
    assert upper["usr/lib"].opaque and upper["usr/lib"].hides == "lower[1]"
    assert upper["etc/passwd"].status == "copied-up" and upper["usr/lib/b.so"].status == "new"
    low1 = {e.path: e for e in lane(lanes, "lower[1]").entries}
    assert (low1["etc/passwd"].status, low1["etc/passwd"].by) == ("shadowed", "upper")
    assert (low1["etc/hosts"].status, low1["etc/hosts"].by) == ("whiteout", "upper")
    assert (low1["usr/lib/a.so"].status, low1["usr/lib/a.so"].at) == ("opaque", "usr/lib")
    assert low1["usr"].status == "merged" and not low1["usr"].hidden
    low0 = {e.path: e for e in lane(lanes, "lower[0]").entries}
    assert low0["etc/hosts"].note() == "hidden by a whiteout in upper"


def lane_rows(src: str) -> dict[str, list[str]]:
    """{lane node id: [entry label of row 0, row 1, ...]} read back from the stack's DOT."""
    out = {}
    for m in re.finditer(r"^\t(\w+) \[label=<(.*)>\]$", src, re.M):
        out[m.group(1)] = [html.unescape(t) for t in
                           re.findall(r'<TD PORT="e\d+"[^>]*>(?:<FONT[^>]*>)?([^<]*)', m.group(2))]
    return out


def test_stack_dot_draws_lanes_links_and_hiding_edges(ov):
    d = D.stack(ov)
    src = d.source
    for title in ("merged/ — what processes see", "upper: upper/ — writable layer", "lower[1]: l1/ — read-only layer"):
        assert title in d.text
    assert "<B>lower[1]: l1/</B>" in src and "read-only layer" in src
    assert "lowerdir=l0:l1,upperdir=upper,workdir=work" in src
    rows = lane_rows(src)
    # the whiteout in upper points, dashed, at lower[0]'s etc/hosts, which it hides (port n<k>: the row's note)
    wh = rows["u"].index("etc/hosts (whiteout)")
    hosts0 = next(k for k, lbl in enumerate(rows["l0"]) if lbl.startswith("etc/hosts"))
    assert re.search(rf"\tu:n{wh}:e -> l0:n{hosts0}:e \[[^]]*style=dashed[^]]*tooltip=hides\]", src)
    opq, lib1 = rows["u"].index("usr/lib/ (opaque)"), rows["l1"].index("usr/lib/")
    assert re.search(rf"\tu:n{opq}:e -> l1:n{lib1}:e \[[^]]*hides contents", src)
    # each merged entry is linked from its row to the row serving it, in the layer it names
    lanes = D.stack_lanes(ov)
    merged = lane(lanes, "merged").entries
    key = {x.name: x.key for x in lanes}
    for k, e in enumerate(merged):
        dst = [x.path for x in lane(lanes, e.status).entries].index(e.path)
        assert f"\tm:n{k}:e -> {key[e.status]}:e{dst}:w [color=\"#1d4ed8\"]" in src
    assert src.count('color="#1d4ed8"') == len(merged)
    # the layers share one column (rank), top to bottom as they stack
    assert re.search(r"\{\n\t\trank=same\n\t\tu -> l0 \[style=invis\]\n\t\tl0 -> l1 \[style=invis\]\n"
                     r"\t\tl1 -> w \[style=invis\]\n\t\}", src)


def nested(tmp_path, names=("a", "b", "c")):
    """Three lowers in the shape of lesson 03: etc/ merged from all three, bin/ only in the bottom one."""
    a, b, c = (tmp_path / n for n in names)
    for d, files in ((a, {"etc/os-release": "a"}), (b, {"etc/os-release": "b", "etc/hosts": "b"}),
                     (c, {"etc/hosts": "c", "bin/sh": "sh", "app.txt": "x", "app/run": "r"})):
        for rel, text in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
    for n in ("upper", "work"):
        (tmp_path / n).mkdir()
    return Overlay([a, b, c], tmp_path / "upper", tmp_path / "work", backend="sim")


def test_every_lane_is_in_path_order_a_directory_then_its_children(tmp_path):
    o = nested(tmp_path)
    with o:
        lanes = D.stack_lanes(o)
        src = D.stack(o).source
    merged = [e.path for e in lane(lanes, "merged").entries]
    # "app.txt" sorts before "app/" as a string ('.' < '/'), but a tree lists app/ and its children together
    assert merged == ["app", "app/run", "app.txt", "bin", "bin/sh", "etc", "etc/hosts", "etc/os-release"]
    assert [e.path for e in lane(lanes, "lower[2]").entries] == ["app", "app/run", "app.txt", "bin", "bin/sh",
                                                                "etc", "etc/hosts"]
    rows = lane_rows(src)
    assert rows["m"] == [e.label() for e in lane(lanes, "merged").entries]
    assert rows["l2"] == [e.label() for e in lane(lanes, "lower[2]").entries]
    assert D.path_key("app/run") < D.path_key("app.txt") < D.path_key("bin")


def test_lanes_are_labelled_by_index_and_the_callers_names(tmp_path):
    o = nested(tmp_path)
    with o:
        d = D.stack(o, names={"lower[0]": "layer 3 (RUN apt-get install -y curl)"})
        plain = D.stack(o)
    assert "lower[0]: layer 3 (RUN apt-get install -y curl) — read-only layer" in d.text
    assert "lower[0]: a/ — read-only layer" in plain.text and "lower[1]: b/ — read-only layer" in d.text
    assert "lower[0]: layer 3 (RUN apt-get install -y curl)</B>" in d.source
    o.layer_names = ["layer 2 · sha256:1111", None, "layer 0 · sha256:3333"]  # aligned with o.lowers
    t = D.stack(o).text
    assert "lower[0]: layer 2 · sha256:1111 —" in t and "lower[1]: b/ —" in t and "lower[2]: layer 0 · sha256:3333 —" in t
    o.layer_names = {"lower[1]": "the middle one"}
    assert "lower[1]: the middle one —" in D.stack(o).text
    assert "lower[1]: mine —" in D.stack(o, names={"lower[1]": "mine"}).text  # the caller's names win


def test_lowerdirs_sharing_a_basename_are_told_apart_by_their_parent(tmp_path):
    # a store keeps each layer as layers/<diff_id hex>/root: every lowerdir is called "root"
    dirs = ["layers/" + "ab" * 32 + "/root", "layers/" + "cd" * 32 + "/root", "layers/" + "ef" * 32 + "/root"]
    o = nested(tmp_path, dirs)
    t = D.stack(o).text
    assert f"lower[0]: {'ab' * 6}…/root/ —" in t and f"lower[2]: {'ef' * 6}…/root/ —" in t
    assert "upper: upper/ —" in t


@needs_dot
def test_stack_of_a_nested_tree_stays_readable_in_width(tmp_path):
    o = nested(tmp_path)
    with o:
        o.mkdir("etc/conf.d")
        for k in range(12):  # more entries than a lane shows
            o.write_text(f"etc/conf.d/file-{k:02}.conf", "x" * k)
        o.remove("etc/hosts")
        svg = D.stack(o).svg()
    width = float(re.search(r'<svg width="(\d+)pt"', svg).group(1))
    assert width <= 1200, width


def test_stack_is_deterministic_and_summarised(ov, tmp_path):
    a, b = D.stack(ov), D.stack(ov)
    assert a.source == b.source and a.text == b.text
    small = D.stack(ov, limit=2)
    n_upper = len(lane(D.stack_lanes(ov), "upper").entries)
    assert f"+{n_upper - 2} more" in small.source and f"+{n_upper - 2} more" in small.text
    assert not ADDRESS.search(a.source + a.text) and str(tmp_path) not in a.source + a.text


def test_stack_narrowed_to_a_subtree(ov):
    d = D.stack(ov, "usr")
    assert "usr/lib/b.so" in d.text and "etc/passwd" not in d.text


def test_stack_of_an_unmounted_overlay_reads_the_disk(tmp_path):
    o = make_stack(tmp_path)
    with o:
        o.remove("etc/hosts")
    merged = {e.path for e in lane(D.stack_lanes(o), "merged").entries}
    assert "etc/hosts" not in merged and "etc/passwd" in merged
    assert D.overlay_mimebundle(o)["text/plain"].endswith("(not mounted)")


def test_lookup_shows_layers_top_first_and_the_stop(ov):
    d = D.lookup(ov, "usr/lib/b.so")
    assert d.text.splitlines()[1:] == [
        "  1. /usr in upper: dir", "  2. /usr in lower[0]: absent", "  3. /usr in lower[1]: dir",
        "  4. /usr/lib in upper: opaque dir", "  5. /usr/lib/b.so in upper: file",
        "  -> /usr/lib/b.so is served by upper"]
    assert "not looked at" in d.source  # lower layers under the opaque dir are never visited
    w = D.lookup(ov, "etc/hosts")
    assert "a whiteout in upper stopped the search" in w.text
    assert "/etc/passwd is served by upper" in D.lookup(ov, "/etc/passwd").text
    assert "not found in any layer (ENOENT)" in D.lookup(ov, "nope").text


def test_copy_up_before_after_from_trace(ov):
    d = D.copy_up(ov, "etc/passwd")
    assert d.title == "copy-up of /etc/passwd: 11 bytes copied from lower[1], 1 parent dir(s) copied up (metadata)"
    assert "etc/ (copied up (metadata))" in d.text and "11 bytes copied from lower[1]" in d.text
    assert "cluster_before" in d.source and "cluster_after" in d.source
    ev = next(e for e in ov.trace if e.kind == "copy-up" and e.path == "etc/passwd")
    assert D.copy_up(ov, ev).source == d.source
    none = D.copy_up(ov, "usr/lib/b.so")
    assert "no copy-up of /usr/lib/b.so" in none.text and "served by upper" in none.text


def test_copy_up_of_deep_file_lists_every_parent(tmp_path):
    for d in ("low/a/b", "upper", "work"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "low/a/b/f").write_text("12345")
    with Overlay([tmp_path / "low"], tmp_path / "upper", tmp_path / "work", backend="sim") as o:
        o.chmod("a/b/f", 0o600)
        d = D.copy_up(o, "a/b/f")
    assert "a/ (copied up (metadata)), a/b/ (copied up (metadata))" in d.text and "5 bytes copied" in d.text


@needs_dot
def test_svg_is_deterministic_without_version_comment(ov):
    b1, b2 = D.overlay_mimebundle(ov), D.overlay_mimebundle(ov)
    assert set(b1) == {"text/html", "text/plain"}
    assert b1 == b2
    svg = D.stack(ov).svg()
    assert "<svg" in svg and "Generated by graphviz" not in svg
    assert not ADDRESS.search(b1["text/plain"]) and "\n" not in b1["text/plain"]
    assert ov._repr_mimebundle_() == b1


def test_without_dot_a_diagram_says_so_and_shows_text(ov, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    d = D.stack(ov)
    assert d.svg() is None and not d.available()
    bundle = d._repr_mimebundle_()
    assert "image/svg+xml" not in bundle
    first, rest = bundle["text/plain"].split("\n", 1)
    assert "'dot' program is not installed" in first and rest == d.text
    assert "<pre>" in bundle["text/html"] and "etc/passwd (22 B)" in bundle["text/html"]
    for make in (lambda: D.overlay_mimebundle(ov), lambda: D.lookup(ov, "etc")._repr_mimebundle_(),
                 lambda: D.copy_up(ov, "etc/passwd")._repr_mimebundle_()):
        assert "text/html" in make() and "image/svg+xml" not in make()
    with pytest.raises(RuntimeError, match="dot"):
        d.pipe("png")
    assert "not installed" in d.html()


# -- images, layers, stores and Dockerfiles, on small duck-typed fakes (the images API's attributes) --

@dataclass(frozen=True)
class FakeEntry:
    path: str
    type: str
    size: int = 0
    linkname: str = ""

    @property
    def is_removal(self):
        return self.type in ("whiteout", "opaque")


@dataclass(frozen=True)
class FakeLayer:
    diff_id: str
    size: int
    items: tuple = ()

    @property
    def digest(self):
        return self.diff_id

    def entries(self):
        return list(self.items)


@dataclass(frozen=True)
class H:
    created_by: str
    empty_layer: bool = False


@dataclass
class FakeImage:
    name: str
    layers: list
    history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)


def sha(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


BASE = [FakeLayer(sha(1), 63_000_000, (FakeEntry("bin", "dir"), FakeEntry("bin/sh", "file", 120_000))),
        FakeLayer(sha(2), 1_000, (FakeEntry("etc/motd", "whiteout"), FakeEntry("var/cache", "opaque")))]
BASE_H = [H("/bin/sh -c #(nop) ADD file:abc in / "), H("/bin/sh -c rm /etc/motd"),
          H('/bin/sh -c #(nop)  CMD ["bash"]', True)]


def service(k: int) -> FakeImage:
    own = FakeLayer(sha(10 + k), 2_000 + k, (FakeEntry(f"srv/app{k}", "file", 2_000 + k),))
    return FakeImage(f"service-{k:03d}", BASE + [own], BASE_H + [H(f"/bin/sh -c #(nop) COPY file:{k} in /srv ")])


def test_image_diagram_lists_layers_top_first_with_created_by():
    img = FakeImage("redis:demo", BASE + [FakeLayer(sha(3), 5_500_000)],
                    BASE_H + [H("/bin/sh -c apt-get install -y redis"), H("/bin/sh -c #(nop)  EXPOSE 6379", True)])
    d = D.image(img)
    assert d.title == "Image redis:demo: 3 layers, 68.5 MB"
    lines = d.text.splitlines()
    assert "EXPOSE 6379" in lines[2] and "config only" in lines[2]
    assert lines[3].split()[:4] == ["layer", "2", "5.5", "MB"] and "RUN apt-get install -y redis" in lines[3]
    assert "layer 0" in lines[-1] and "ADD file:abc in /" in lines[-1]
    assert "sha256:030303030303" in d.source and d.source == D.image(img).source
    b = D.image_mimebundle(img)
    assert b["text/plain"] == "Image redis:demo: 3 layers, 68.5 MB"


def test_layer_diagram_marks_whiteouts_and_opaque():
    d = D.layer_diagram(BASE[1])
    assert "etc/motd (whiteout: deletes it)" in d.text and "var/cache/ (opaque: hides lower contents)" in d.text
    assert D.layer_mimebundle(BASE[1])["text/plain"] == "Layer sha256:020202020202: 2 entries, 1.0 kB"
    assert "+1 more" in D.layer_diagram(BASE[1], limit=1).text


def test_store_of_100_services_draws_a_few_and_the_saving():
    images = [service(k) for k in range(100)]
    d = D.store(images, show=3)
    stored = 63_001_000 + sum(2_000 + k for k in range(100))
    without = 100 * 63_001_000 + sum(2_000 + k for k in range(100))
    assert d.title == (f"store: 100 images: {D.human_size(stored)} stored with sharing, "
                       f"{D.human_size(without)} without; sharing saves {D.human_size(without - stored)}")
    assert "… 97 more images" in d.source and "… 97 more images" in d.text
    assert d.source.count("shared by 100 images") == 2  # the two base layers, each drawn once
    assert d.source.count('shape=tab') == 4
    assert "more -> L" in d.source


def test_store_uses_the_stores_own_accounting():
    class FakeStore:
        def images(self):
            return [service(2), service(1)]

        def disk_usage(self):
            return type("U", (), dict(stored_bytes=1, without_sharing_bytes=3, saved_bytes=2))()
    d = D.store(FakeStore())
    assert "2 images: 1 B stored with sharing, 3 B without; sharing saves 2 B" in d.title
    assert d.text.index("service-001") < d.text.index("service-002")


DOCKERFILE = """\
FROM golang AS build
RUN go build -o /app
FROM base:latest
# the service
ENV PORT=8080
RUN apt-get update && \\
    apt-get install -y curl
COPY --from=build /app /app
CMD ["/app"]
"""


def test_dockerfile_next_to_its_layers():
    img = FakeImage("svc", BASE + [FakeLayer(sha(4), 30_000_000), FakeLayer(sha(5), 7_000_000)],
                    BASE_H + [H("/bin/sh -c #(nop)  ENV PORT=8080", True),
                              H("/bin/sh -c apt-get update && apt-get install -y curl"),
                              H("/bin/sh -c #(nop) COPY file:x in /app"), H('/bin/sh -c #(nop)  CMD ["/app"]', True)])
    d = D.dockerfile((DOCKERFILE, img))
    rows = {line.split("->")[0].strip(): line.split("->", 1)[1].strip() for line in d.text.splitlines()[1:]}
    assert rows["1:  FROM golang AS build"] == "earlier build stage: not in the final image"
    assert rows["3:  FROM base:latest"] == "base image: 2 layers, 63.0 MB"
    assert rows["5:  ENV PORT=8080"] == "config only: no layer"
    run = next(k for k in rows if k.startswith("6:"))
    assert rows[run].startswith("layer 2 · 30.0 MB")
    assert rows["8:  COPY --from=build /app /app"].startswith("layer 3 · 7.0 MB")
    assert rows['9:  CMD ["/app"]'] == "config only: no layer"

    class Build:
        dockerfile = DOCKERFILE
        image = img
    assert D.dockerfile(Build()).source == d.source


def test_created_by_text():
    assert D.created_by_text("/bin/sh -c #(nop)  ENV A=1") == "ENV A=1"
    assert D.created_by_text("/bin/sh -c apt-get  update") == "RUN apt-get update"
    assert D.created_by_text("COPY . /app # buildkit") == "COPY . /app # buildkit"


@needs_dot
def test_pictures_render(ov, tmp_path):
    for d in (D.stack(ov), D.lookup(ov, "etc/passwd"), D.copy_up(ov, "etc/passwd"),
              D.store([service(k) for k in range(5)])):
        out = d.save(tmp_path / "x.png")
        assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_and_image_display_as_diagrams():
    """Issue 4: a Layer or Image alone in a cell shows its diagram, with a short deterministic text."""
    from overlaykit import course
    layer = course.layer_from_files({"etc/hosts": "x"})
    image = course.image_from_layers("demo", [("COPY hosts /etc/", layer)])
    for obj in (layer, image):
        bundle = obj._repr_mimebundle_()
        assert "text/plain" in bundle and "0x" not in bundle["text/plain"]
        assert bundle == obj._repr_mimebundle_()
        if "image/svg+xml" in bundle:
            assert "<svg" in bundle["image/svg+xml"]


@needs_dot
def test_diagrams_render_in_untrusted_notebooks_and_fit_the_output(ov):
    """Issue 13.1/13.10: JupyterLab draws image/svg+xml only in trusted notebooks, and a fresh clone is
    untrusted; sanitized text/html keeps an <img> whose data: URI is the SVG, scaled to the output width."""
    import base64
    from html.parser import HTMLParser
    bundle = D.overlay_mimebundle(ov)
    assert "image/svg+xml" not in bundle
    tags = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))
    P().feed(bundle["text/html"])
    assert [t for t, _ in tags] == ["img"]
    attrs = tags[0][1]
    assert "max-width:100%" in attrs["style"] and attrs["alt"] == bundle["text/plain"]
    prefix = "data:image/svg+xml;base64,"
    assert attrs["src"].startswith(prefix)
    assert base64.b64decode(attrs["src"][len(prefix):]).decode() == D.stack(ov).svg()
    # in widgets the SVG is inline, and scales down the same way
    assert "<svg style=\"max-width:100%;height:auto\" " in D.stack(ov).html()


def test_the_mount_line_names_layers_as_the_lanes_do(tmp_path):
    """Issue 13.10: a store's lowerdirs are all <id>/root; the header said lowerdir=root:root."""
    for d in ("aaa/root", "bbb/root", "c/upper", "c/work"):
        (tmp_path / d).mkdir(parents=True)
    ov = Overlay([tmp_path / "aaa/root", tmp_path / "bbb/root"], tmp_path / "c/upper", tmp_path / "c/work",
                 backend="sim")
    line = D.mount_line(ov)
    assert "lowerdir=aaa/root:bbb/root," in line and "upperdir=upper,workdir=work" in line
    titles = [lane.title for lane in D.stack_lanes(ov)]
    assert any("aaa/root/" in t for t in titles) and any("bbb/root/" in t for t in titles)


def test_a_copied_up_hard_link_is_a_copy_up_not_new(tmp_path):
    """Issue 13.10: lesson 04's upper data/h1 (a hard link in lower, then written) was drawn as "new"."""
    import os
    (tmp_path / "lower/data").mkdir(parents=True)
    (tmp_path / "lower/data/h1").write_text("one file, two names\n")
    os.link(tmp_path / "lower/data/h1", tmp_path / "lower/data/h2")
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend="sim") as ov:
        ov.write_text("data/h1", "changed\n")
        upper = next(lane for lane in D.stack_lanes(ov) if lane.name == "upper")
        notes = {e.path: e.note() for e in upper.entries}
        assert notes["data/h1"].startswith("copied-up"), notes
        assert not notes["data"].startswith("new"), notes
        svg_text = D.stack(ov).source
        assert "data/h1" in svg_text



def test_a_path_filter_says_filtered_not_empty(tmp_path):
    """Issue 13.10: stack(ov, "etc") showed a layer with nothing under etc/ as "(empty)"."""
    for d in ("l0/etc", "l1/usr", "upper", "work"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "l0/etc/hosts").write_text("x")
    (tmp_path / "l1/usr/bin").write_text("y")
    with Overlay([tmp_path / "l0", tmp_path / "l1"], tmp_path / "upper", tmp_path / "work", backend="sim") as ov:
        d = D.stack(ov, "etc")
        assert "(nothing under /etc: filtered)" in d.text and "(empty)" not in d.text
        if d.source is not None:
            assert "(nothing under /etc: filtered)" in d.source and "(empty)" not in d.source
        assert "(empty)" in D.stack(ov).text  # upper/ really is empty without a filter
