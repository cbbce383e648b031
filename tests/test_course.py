"""The notebook helpers: what they print is what learners read, so it must be right and stable."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from overlaykit import course, ondisk
from overlaykit.engine import Overlay


def test_workspace_starts_empty_even_after_a_run(tmp_path):
    ws = course.workspace("03", tmp_path)
    (ws / "left-over").write_text("x")
    (ws / "work" / "work").mkdir(parents=True)
    os.chmod(ws / "work" / "work", 0)
    ws2 = course.workspace("03", tmp_path)
    assert ws2 == ws and os.listdir(ws2) == []


def test_lesson_dirs_make_the_lessons_layers(tmp_path):
    d = course.lesson_dirs(tmp_path)
    assert sorted(os.listdir(d["lower"])) == ["in_both.txt", "in_lower.txt"]
    assert sorted(os.listdir(d["upper"])) == ["in_both.txt", "in_upper.txt"]
    assert os.listdir(d["work"]) == [] and os.listdir(d["merged"]) == []


def test_ls_marks_each_whiteout_spelling_and_recurses(tmp_path):
    root = course.write_tree(tmp_path / "t", {"d/f": "abc", ".wh.gone": "", "d/.wh..wh..opq": "", "e/": ""})
    os.symlink("d/f", root / "link")
    listing = course.ls(root, recursive=True).splitlines()
    assert listing == [
        "-rw-r--r--      0 .wh.gone   (OCI whiteout of gone)",
        "drwxr-xr-x      - d/",
        "-rw-r--r--      0 d/.wh..wh..opq   (OCI opaque marker)",
        "-rw-r--r--      3 d/f",
        "drwxr-xr-x      - e/",
        "lrwxrwxrwx      3 link -> d/f",
    ]
    top = course.ls(root).splitlines()
    assert [x.split()[2] for x in top] == [".wh.gone", "d/", "e/", "link"]
    assert course.ls(root, show_hidden=False).splitlines()[0].endswith(" d/")


def test_ls_of_an_empty_folder(tmp_path):
    assert course.ls(tmp_path) == "(empty)"


def test_ls_shows_kernel_whiteouts_and_overlay_xattrs(tmp_path):
    d = tmp_path / "up"
    d.mkdir()
    try:
        os.mknod(d / "gone", stat.S_IFCHR, 0)
        os.setxattr(d, "user.overlay.opaque", b"y")
    except OSError as e:
        pytest.skip(f"this filesystem cannot hold the kernel's format here: {e}")
    sub = d / "x"
    sub.mkdir()
    os.setxattr(sub, "user.other", b"not shown")
    assert course.ls(d) == "c---------    0,0 gone   (whiteout)\ndrwxr-xr-x      - x/"
    assert course.ls(tmp_path) == "drwxr-xr-x      - up/   [user.overlay.opaque=y]"


def test_make_xattr_whiteout_is_read_as_a_whiteout(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    try:
        p = course.make_xattr_whiteout(d, "motd", "user")
    except OSError as e:
        pytest.skip(f"no user xattrs on this filesystem: {e}")
    assert p.stat().st_size == 0
    assert os.getxattr(d, "user.overlay.opaque") == b"x"
    enc = ondisk.Encoding("kernel", "user")
    assert enc.is_whiteout(str(d), "motd") and not enc.is_opaque(str(d))
    assert course.ls(d) == "-rw-r--r--      0 motd   [user.overlay.whiteout=]"
    with pytest.raises(FileExistsError):
        course.make_xattr_whiteout(d, "motd", "user")


def test_trace_leaves_lookups_out_and_starts_where_asked(tmp_path):
    with course.lesson_overlay(tmp_path, backend="sim") as ov:
        assert course.trace(ov) == "(no copy-up, no whiteout, nothing created or removed)"
        ov.remove("in_lower.txt")
        n = len(ov.trace)
        ov.write_text("in_upper.txt", "x", append=True)
        assert course.trace(ov).splitlines() == [
            "remove     whiteout  in_lower.txt: whiteout created in upper/ to hide the lower entry"]
        assert course.trace(ov, since=n) == "(no copy-up, no whiteout, nothing created or removed)"
        assert course.trace(ov, lookups=True).splitlines()[0].startswith("remove     lookup    in_lower.txt")


def test_merged_listing_names_the_serving_layer(tmp_path):
    with course.lesson_overlay(tmp_path, backend="sim") as ov:
        ov.mkdir("d")
        lines = course.merged_listing(ov).splitlines()
    assert [(x.split()[0], x.split()[-1]) for x in lines] == [
        ("d/", "[upper]"), ("in_both.txt", "[upper]"), ("in_lower.txt", "[lower[0]]"), ("in_upper.txt", "[upper]")]


def test_report_shows_merged_upper_lower_and_the_steps(tmp_path):
    with course.lesson_overlay(tmp_path, backend="sim") as ov:
        ov.write_text("in_lower.txt", "changed\n", append=True)
        text = course.report(ov)
    assert text.splitlines() == [
        "merged/",
        "    in_both.txt    \"upper/'s copy of in_both.txt\"     [upper]",
        "    in_lower.txt   'I live in lower/\\nchanged'        [upper]",
        "    in_upper.txt   'I live in upper/'                 [upper]",
        "upper/ on disk",
        "    -rw-r--r--     29 in_both.txt",
        "    -rw-r--r--     25 in_lower.txt",
        "    -rw-r--r--     17 in_upper.txt",
        "lower/ on disk (lower[0], read-only)",
        "    -rw-r--r--     29 in_both.txt",
        "    -rw-r--r--     17 in_lower.txt",
        "what the filesystem did",
        "    append     copy-up   in_lower.txt: opened for append: 17 bytes copied into work/, "
        "renamed into upper/, from lower[0]",
    ]


def test_how_to_look_names_folders_relative_to_the_notebook(tmp_path):
    with course.lesson_overlay(tmp_path / "ws", backend="sim") as ov:
        assert course.how_to_look(ov, tmp_path) == course.wrap(ov.how_to_look())  # the simulator names no folder

    class Mounted:  # what a kernel mount says: a PID and absolute paths
        def how_to_look(self):
            return f"mounted on {tmp_path}/ws/merged only inside helper process 42: ls {tmp_path}/ws/merged"
    # absolute once the shell expands $PWD: entering a mount namespace resets the working directory
    assert course.how_to_look(Mounted(), tmp_path) == \
        "mounted on $PWD/ws/merged only inside helper process 42: ls $PWD/ws/merged"


def test_docker_diff_follows_mobys_overlay_walker_for_an_opaque_dir(tmp_path):
    """moby (pkg/archive/changes.go + changes_linux.go overlayDeletedFile): a whiteout is D; an opaque dir that a
    lower layer has is D itself, its upper entries A or C, and the lower files it hides are never listed."""
    from overlaykit.images import Container, Store
    store = Store(tmp_path / "store")
    base = course.layer_from_files({"etc/hostname": "x\n", "etc/motd": "m\n", "var/cache/apt/pkgcache.bin": 10,
                                    "var/cache/apt/srcpkgcache.bin": 20})
    image = store.add_image(course.image_from_layers("t:1", [("ADD rootfs", base)]))
    c = Container(image, store, tmp_path / "c", backend="sim")
    with c:
        ov = c.overlay
        ov.write_text("etc/motd", "changed\n")
        ov.remove("etc/hostname")
        for name in ov.listdir("var/cache/apt"):
            ov.remove("var/cache/apt/" + name)
        ov.rmdir("var/cache/apt")
        ov.mkdir("var/cache/apt")
        ov.write_text("var/cache/apt/pkgcache.bin", "fresh\n")
        ov.write_text("var/cache/apt/new.bin", "new\n")
        ov.mkdir("srv")
    assert course.docker_diff(c) == [
        ("C", "/etc"), ("D", "/etc/hostname"), ("C", "/etc/motd"),
        ("A", "/srv"),
        ("C", "/var"), ("C", "/var/cache"), ("D", "/var/cache/apt"),
        ("A", "/var/cache/apt/new.bin"), ("C", "/var/cache/apt/pkgcache.bin"),
    ]
    assert not any("srcpkgcache" in p for _, p in course.docker_diff(c))


def test_docker_diff_never_looks_through_a_lower_symlink_onto_the_host(tmp_path):
    """moby stats ``layer/path``, following a lower's ``etc -> /etc`` onto the host; a new etc/passwd
    in the container is added (A), whatever the host has at /etc/passwd."""
    from overlaykit.images import Container, Store
    assert os.path.exists("/etc/passwd")
    store = Store(tmp_path / "store")
    root = tmp_path / "base"
    (root / "srv").mkdir(parents=True)
    (root / "srv/x").write_text("x\n")
    os.symlink("/etc", root / "etc")
    from overlaykit.images import Layer
    base = Layer.from_dir(root, store.encoding)
    image = store.add_image(course.image_from_layers("t:1", [("ADD rootfs", base)]))
    with Container(image, store, tmp_path / "c", backend="sim") as c:
        c.overlay.remove("etc")
        c.overlay.mkdir("etc")
        c.overlay.write_text("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        diff = c.diff()
    assert ("A", "/etc/passwd") in diff and ("C", "/etc/passwd") not in diff


def test_long_printed_lines_wrap_at_word_boundaries():
    """Issue 13.11: JupyterLab breaks a long printed line mid-word; the package wraps it first."""
    from overlaykit.course import wrap
    text = ("The overlay is mounted on merged only inside helper process 4242 (its own mount namespace); elsewhere "
            "that directory looks empty. From a terminal, as root: `nsenter -t 4242 -m ls -la merged/` and more")
    out = wrap(text, width=60)
    lines = out.splitlines()
    assert all(len(line) <= 60 or "`" in line for line in lines), lines
    assert " ".join(line.strip() for line in lines) == text
    assert any("`nsenter -t 4242 -m ls -la merged/`" in line for line in lines)  # a command stays whole
    assert wrap("a\n\nb") == "a\n\nb"


def test_lesson_builds_print_the_same_image_ids_on_every_run(tmp_path, monkeypatch):
    """A lesson's stored `history` names image ids: course.build pins `created`, so they never change."""
    from overlaykit.images import Store
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    ids = []
    for n in range(2):
        store = Store(tmp_path / f"store{n}")
        image = course.build(course.example("hello-scratch.Dockerfile"), course.example("hello"), store, "hello",
                             log=False)
        ids.append(image.id)
    assert ids[0] == ids[1]


# Lesson 12's helpers: disk space of a layer folder, its overlay marks, and which options this process may use.

def test_data_on_disk_counts_data_not_sizes_or_holes(tmp_path):
    course.write_tree(tmp_path, {"full.bin": b"x" * 100_000, "d/small": "hi\n"})
    with open(tmp_path / "sparse.bin", "wb") as f:   # a size and no data, like a metacopy copy-up
        f.truncate(1_000_000)
    with open(tmp_path / "part.bin", "wb") as f:     # data, a hole, data
        f.write(b"a" * 8192)
        f.seek(1 << 20)
        f.write(b"b" * 8192)
    os.symlink("full.bin", tmp_path / "link")
    got = course.data_on_disk(tmp_path)
    blocks = sum(os.lstat(tmp_path / p).st_blocks * 512 for p in ("full.bin", "d/small", "sparse.bin", "part.bin"))
    try:
        with open(tmp_path / "sparse.bin") as f:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
        seek_data = True
    except OSError as e:
        seek_data = e.errno == errno.ENXIO  # ENXIO: SEEK_DATA works, and the file is all hole
    if seek_data:
        assert got == 100_000 + 3 + 8192 + 8192
    else:  # a filesystem without SEEK_DATA: allocated blocks
        assert got == blocks


def test_overlay_marks_show_the_lessons_xattrs_only(tmp_path):
    ns = ondisk.default_xattr_ns()
    d = tmp_path / "renamed"
    d.mkdir()
    try:
        os.setxattr(d, f"{ns}.overlay.redirect", b"/opt/tool")
        os.setxattr(d, f"{ns}.overlay.origin", b"\x00\xfb")        # kernel bookkeeping: left out
        os.setxattr(d, f"{ns}.overlay.metacopy", b"")
    except OSError as e:
        pytest.skip(f"this filesystem takes no {ns}.* xattrs: {e}")
    assert course.overlay_marks(d) == "overlay.metacopy, overlay.redirect='/opt/tool'"
    assert course.overlay_marks(tmp_path) == "(no overlay xattrs)"


def test_options_refused_says_what_an_ordinary_users_overlay_cannot_do(monkeypatch):
    monkeypatch.setattr(ondisk, "default_xattr_ns", lambda: "trusted")     # root: every option works
    assert course.options_refused("metacopy=on") is None
    assert course.options_refused({"index": "on", "redirect_dir": "on"}) is None
    monkeypatch.setattr(ondisk, "default_xattr_ns", lambda: "user")        # an ordinary user: userxattr
    assert course.options_refused("metacopy=on").endswith("conflicting options: userxattr,metacopy=on")
    assert "userxattr,redirect_dir=on" in course.options_refused("redirect_dir=on")
    assert "turns index=off" in course.options_refused("index=on")
    assert course.options_refused(None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the option is refused to an ordinary user (userxattr)")
def test_metacopy_on_a_real_mount_leaves_upper_without_data(tmp_path):
    from overlaykit import capabilities
    if not capabilities()["kernel"].available:
        pytest.skip("no kernel overlay here")
    lower = course.write_tree(tmp_path / "lower", {"big.bin": b"." * 1_000_000})
    up, work = course.write_tree(tmp_path / "upper", {}), course.write_tree(tmp_path / "work", {})
    with Overlay([lower], up, work, backend="kernel", options="metacopy=on") as ov:
        ov.chown("big.bin", 1000, 1000)
        assert course.overlay_marks(up / "big.bin") == "overlay.metacopy"
        assert course.data_on_disk(up) < 100_000 and (up / "big.bin").stat().st_size == 1_000_000
        ov.write_bytes("big.bin", b"!", append=True)
        assert course.overlay_marks(up / "big.bin") == "(no overlay xattrs)"
        assert course.data_on_disk(up) >= 1_000_000


def test_cached_fraction_sees_pages_read_through_an_overlay(tmp_path):
    """The pages a container reads belong to the lower file: the notebook sees them from outside the overlay."""
    lower = course.write_tree(tmp_path / "lower", {"lib.so": b"x" * 400_000, "empty": b""})
    course.drop_from_page_cache(lower / "lib.so")
    if course.cached_fraction(lower / "lib.so") > 0.5:
        pytest.skip("this filesystem keeps its pages cached (tmpfs)")
    assert course.cached_fraction(lower / "empty") == 1.0
    with Overlay([lower], course.write_tree(tmp_path / "upper", {}), course.write_tree(tmp_path / "work", {})) as ov:
        ov.read_bytes("lib.so")
    assert course.cached_fraction(lower / "lib.so") == 1.0
    with pytest.raises(OSError):
        course.cached_fraction(tmp_path / "missing")
