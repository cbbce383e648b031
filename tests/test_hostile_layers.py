"""Untrusted layer tars: each hostile shape gets a clear error or the image-spec's safe behaviour,
and nothing is ever written outside the destination (checked on the destination's parent)."""
from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from layer_helpers import full_snapshot, make_tar  # noqa: E402

from overlaykit import ondisk  # noqa: E402
from overlaykit.images import Layer, LayerError, flatten  # noqa: E402


@pytest.fixture
def arena(tmp_path):
    """parent/ with a sentinel tree and dest/; yields (dest, check) where check() asserts parent is untouched."""
    parent = tmp_path / "parent"
    (parent / "sentinel").mkdir(parents=True)
    (parent / "sentinel/file").write_text("keep")
    (parent / "etc").mkdir()
    (parent / "etc/passwd").write_text("root:x:0:0")
    dest = parent / "dest"
    before = full_snapshot(parent)

    def check():
        after = full_snapshot(parent)
        outside = {k: v for k, v in after.items() if k != "dest" and not k.startswith("dest/") and k != "."}
        assert outside == {k: v for k, v in before.items() if k != "."}

    return dest, check


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../evil", "a/../../../etc/passwd"])
def test_dotdot_is_rejected(name):
    with pytest.raises(LayerError, match=r"'\.\.'"):
        Layer.from_tar(make_tar((name, "file", "x")))


def test_absolute_names_are_relative_to_the_root(arena):
    dest, check = arena
    l = Layer.from_tar(make_tar(("/etc/passwd", "file", "pwned"), ("/abs", "dir")))
    assert [e.path for e in l.entries()] == ["etc/passwd", "abs"]
    flatten([l], dest)
    assert (dest / "etc/passwd").read_text() == "pwned"
    check()


@pytest.mark.parametrize("target", ["/", "..", "../..", "../../sentinel", "/../../sentinel"])
def test_symlink_escape_in_parent_path(arena, target):
    dest, check = arena
    l1 = Layer.from_tar(make_tar(("esc", "symlink", target)))
    l2 = Layer.from_tar(make_tar(("esc/file", "file", "x"), ("esc/.wh.file2", "file")))
    flatten([l1, l2], dest)
    check()


def test_symlink_escape_in_same_layer(arena):
    dest, check = arena
    l = Layer.from_tar(make_tar(("esc", "symlink", "../sentinel"), ("esc/file", "file", "overwrite")))
    flatten([l], dest)
    check()
    # a final-component symlink is never followed: replacing it replaces the link itself
    l2 = Layer.from_tar(make_tar(("esc", "file", "plain")))
    shutil.rmtree(dest)
    flatten([l, l2], dest)
    assert (dest / "esc").read_text() == "plain"
    check()


def test_whiteout_through_symlink_stays_inside(arena):
    dest, check = arena
    l1 = Layer.from_tar(make_tar(("esc", "symlink", "../sentinel")))
    l2 = Layer.from_tar(make_tar(("esc/.wh.file", "file"), ("esc/.wh..wh..opq", "file")))
    flatten([l1, l2], dest)
    check()


@pytest.mark.parametrize("link", ["../sentinel/file", "/../../sentinel/file", "a/../../x"])
def test_hardlink_escape(link):
    with pytest.raises(LayerError, match=r"'\.\.'"):
        Layer.from_tar(make_tar(("h", "hardlink", link)))


def test_hardlink_through_symlink_stays_inside(arena):
    dest, check = arena
    l1 = Layer.from_tar(make_tar(("esc", "symlink", "../../sentinel")))
    l2 = Layer.from_tar(make_tar(("h", "hardlink", "esc/file")))
    with pytest.raises(LayerError, match="target does not exist"):
        flatten([l1, l2], dest)
    check()


def test_hardlink_to_missing_or_dir(arena):
    dest, check = arena
    with pytest.raises(LayerError, match="target does not exist"):
        flatten([Layer.from_tar(make_tar(("h", "hardlink", "nope")))], dest)
    with pytest.raises(LayerError, match="is a directory"):
        flatten([Layer.from_tar(make_tar(("d", "dir"), ("h", "hardlink", "d")))], dest)
    check()


def test_device_nodes_are_skipped_or_refused(arena):
    dest, check = arena
    l = Layer.from_tar(make_tar(("dev/sda", "char", None), ("dev/fifo", "fifo", None)))
    assert [e.type for e in l.entries()] == ["char", "fifo"]
    warnings = flatten([l], dest)
    assert warnings == ["skipped char device dev/sda"]
    assert not (dest / "dev/sda").exists() and (dest / "dev/fifo").exists()
    with pytest.raises(LayerError, match="device node"):
        flatten([l], dest.parent / "dest2", devices="error")
    assert not (dest.parent / "dest2").exists()
    check()


def test_duplicate_paths_rejected():
    with pytest.raises(LayerError, match="duplicate path 'a'"):
        Layer.from_tar(make_tar(("a", "file", "1"), ("a", "file", "2")))
    with pytest.raises(LayerError, match="duplicate path 'a'"):
        Layer.from_tar(make_tar(("a", "file", "1"), ("./a", "symlink", "x")))
    # a path and its whiteout may share a layer (the whiteout hits lower layers only)
    Layer.from_tar(make_tar(("a", "file", "1"), (".wh.a", "file")))


@pytest.mark.parametrize("name", [".wh.", "d/.wh.", ".wh..", ".wh..."])
def test_bad_whiteout_names(name):
    with pytest.raises(LayerError, match="invalid whiteout"):
        Layer.from_tar(make_tar((name, "file")))


def test_whiteout_must_be_a_file_and_cannot_be_a_parent():
    with pytest.raises(LayerError, match="must be a regular file"):
        Layer.from_tar(make_tar((".wh.x", "dir")))
    with pytest.raises(LayerError, match="cannot be directories"):
        Layer.from_tar(make_tar((".wh.x/y", "file")))


def test_aufs_metadata_is_skipped():
    l = Layer.from_tar(make_tar((".wh..wh.plnk", "file"), ("a", "file")))
    assert [e.path for e in l.entries()] == ["a"]


def test_absurd_size_is_truncation():
    tar = bytearray(make_tar(("big", "file", "x" * 10), fmt=tarfile.USTAR_FORMAT))
    # rewrite the size field (offset 124, 11 octal digits) to 1 GiB and fix the checksum
    tar[124:136] = b"%011o\0" % (1 << 30)
    tar[148:156] = b"        "
    tar[148:156] = b"%06o\0 " % sum(tar[0:512])
    with pytest.raises(LayerError, match="truncated"):
        Layer.from_tar(bytes(tar))


def test_decompression_bomb_is_capped():
    bomb = gzip.compress(b"\0" * (4 << 20))
    with pytest.raises(LayerError, match="exceeds the limit"):
        Layer.from_tar(bomb, max_size=1 << 20)


@pytest.mark.parametrize("cut", [100, 511, 700, 1500])
def test_truncated_and_malformed(cut):
    tar = make_tar(("a", "file", "x" * 1000), ("b", "file", "y"))
    with pytest.raises(LayerError):
        Layer.from_tar(tar[:cut])


def test_garbage_header_in_the_middle():
    tar = bytearray(make_tar(("a", "file", "x"), ("b", "file", "y")))
    second = 1024 if tar[512:513] == b"x" else None
    assert second is not None
    tar[second:second + 512] = b"\x07" * 512
    with pytest.raises(LayerError, match="malformed tar header"):
        Layer.from_tar(bytes(tar))


def test_not_a_tar_and_empty():
    with pytest.raises(LayerError):
        Layer.from_tar(b"hello world" * 100)
    with pytest.raises(LayerError, match="empty"):
        Layer.from_tar(b"")
    assert Layer.from_tar(b"\0" * 1024).entries() == []


def test_overlay_xattrs_in_a_tar_are_dropped(arena):
    dest, check = arena
    l = Layer.from_tar(make_tar(("d", "dir", None, {"pax": {"SCHILY.xattr.trusted.overlay.opaque": "y"}})))
    warnings = flatten([l], dest)
    assert warnings == ["dropped overlay xattr trusted.overlay.opaque on d"]
    assert ondisk.KERNEL_ROOT.is_opaque(str(dest / "d")) is False
    check()


def test_path_too_long():
    with pytest.raises(LayerError, match="longer than"):
        Layer.from_tar(make_tar(("a" * 300, "file")))


# ---------------------------------------------------------------------------------------------- fuzz

_names = st.sampled_from(["a", "b", "a/b", "a/b/c", "..", "../x", "/abs", "a/../../x", ".wh.a", "a/.wh.b",
                          ".wh..wh..opq", "a/.wh..wh..opq", ".wh.", "lnk", "lnk/x", "lnk/.wh.y", "./c", "."])
_generic = st.tuples(
    _names,
    st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo", "char"]),
    st.sampled_from(["", "data", "../../sentinel", "/", "..", "a", "a/b", "/etc/passwd", "../sentinel/file"]),
)
# Relative escapes that would land exactly in the watched parent dir (dest/<target>/[<i>/][a/]lnk).
# Absolute targets ("/") are covered by the explicit tests above, so a broken build cannot touch the host.
_escape = st.tuples(st.sampled_from(["lnk", "a/lnk"]), st.just("symlink"),
                    st.sampled_from(["../../sentinel", "../../../sentinel", "../../../../parent/sentinel"]))
_victim = st.tuples(st.sampled_from(["lnk/x", "a/lnk/x", "lnk/file", "lnk/.wh.file", "lnk/.wh..wh..opq",
                                     "a/lnk/.wh.file", "a/lnk/.wh..wh..opq", "h", "lnk/d"]),
                    st.sampled_from(["file", "dir", "hardlink", "symlink"]),
                    st.sampled_from(["", "lnk/file", "a/lnk/file", "x"]))
_member = st.one_of(_generic, _escape, _victim)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        pos %= len(b)
        if kind == "flip":
            b[pos] = val
        elif kind == "cut":
            del b[pos:]
        elif kind == "dup":
            b[pos:pos] = b[pos:pos + 512]
    return bytes(b)


_ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "dup"]), st.integers(0, 1 << 16), st.integers(0, 255)),
                max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.tuples(st.lists(_member, max_size=6), _ops, st.booleans()), min_size=1, max_size=3))
def test_fuzz_mutated_tars_never_escape(tmp_path, layers):
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    parent = base / "parent"
    (parent / "sentinel").mkdir(parents=True)
    (parent / "sentinel/file").write_text("keep")
    before = full_snapshot(parent)
    parsed = []
    for members, ops, gz in layers:
        data = _mutate(make_tar(*[(n, k, (p if k in ("symlink", "hardlink") else p or "")) for n, k, p in members]),
                       ops)
        if gz:
            data = gzip.compress(data, mtime=0)
        try:
            parsed.append(Layer.from_tar(data))
        except LayerError:
            continue
    for target in ("flat", "unpack-fallback", "unpack-kernel"):
        dest = parent / "dest" / target
        try:
            if target == "flat":
                flatten(parsed, dest)
            else:
                enc = ondisk.FALLBACK if target == "unpack-fallback" else ondisk.KERNEL_ROOT
                if enc is ondisk.KERNEL_ROOT and os.geteuid() != 0:
                    continue
                for i, l in enumerate(parsed):
                    l.unpack(dest / str(i), enc)
        except (LayerError, OSError):
            pass
    after = full_snapshot(parent)
    assert {k: v for k, v in after.items() if k != "." and k != "dest" and not k.startswith("dest/")} == \
        {k: v for k, v in before.items() if k != "."}


# --- layers that disagree with the layers below them (issue 14, item 9): umoci's answers ----------------
# Each shape was unpacked with `umoci unpack` 0.4.7 (tests/test_real_tools.py repeats that where umoci is
# installed): umoci refuses a file below a lower file and anything below a symlink loop, and accepts an opaque
# marker or whiteout below a file (changing nothing) and an opaque marker for a missing directory (creating none).

UMOCI_REFUSES = {
    "file below a lower file": ([("f", "file", "x")], [("f/x", "file", "y")], "f/x", "Not a directory"),
    "symlink loop in a lower layer": ([("a", "symlink", "b"), ("b", "symlink", "a")], [("a/x", "file", "y")],
                                      "a/x", "Too many levels of symbolic links"),
    "symlink to itself": ([("a", "symlink", "a")], [("a/.wh..wh..opq", "file")], "a/.wh..wh..opq",
                          "Too many levels of symbolic links"),
}

UMOCI_ACCEPTS = {
    "opaque marker below a file": ([("f", "file", "x")], [("f/.wh..wh..opq", "file"), ("g", "file", "z")],
                                   {"f": "x", "g": "z"}),
    "whiteout below a file": ([("f", "file", "x")], [("f/.wh.y", "file")], {"f": "x"}),
    "opaque marker for a missing directory": ([("g", "file", "x")], [("d/.wh..wh..opq", "file")], {"g": "x"}),
    "hard link through a symlink": ([("real", "dir"), ("real/f", "file", "data"), ("l", "symlink", "real")],
                                    [("h", "hardlink", "l/f")], {"h": "data", "real/f": "data"}),
}


@pytest.mark.parametrize("case", sorted(UMOCI_REFUSES))
def test_conflicting_layers_are_refused_naming_layer_and_entry_and_leave_nothing(arena, case):
    from overlaykit.images import ApplyError
    dest, check = arena
    lower, upper, entry, why = UMOCI_REFUSES[case]
    layers = [Layer.from_tar(make_tar(*lower)), Layer.from_tar(make_tar(*upper))]
    with pytest.raises(ApplyError) as info:
        flatten(layers, dest)
    msg = str(info.value)
    assert f"layer 1 ({layers[1].diff_id})" in msg and repr(entry) in msg and why in msg
    assert info.value.layer_index == 1 and info.value.entry == entry
    assert isinstance(info.value, LayerError) and info.value.errno is not None
    assert not os.path.lexists(dest)  # nothing partial: not even the folder
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".dest")] == []
    check()


@pytest.mark.parametrize("case", sorted(UMOCI_ACCEPTS))
def test_conflicting_layers_umoci_accepts_give_umocis_tree(arena, case):
    dest, check = arena
    lower, upper, files = UMOCI_ACCEPTS[case]
    flatten([Layer.from_tar(make_tar(*lower)), Layer.from_tar(make_tar(*upper))], dest)
    got = {}
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in filenames:
            p = Path(dirpath, n)
            if not p.is_symlink():
                got[p.relative_to(dest).as_posix()] = p.read_text()
    assert got == files
    assert not (dest / "d").exists() and (not (dest / "f").exists() or (dest / "f").is_file())
    check()


def test_failure_in_an_existing_empty_destination_leaves_it_empty(arena):
    dest, check = arena
    dest.mkdir()
    layers = [Layer.from_tar(make_tar(("f", "file", "x"), ("ok", "file", "1"))),
              Layer.from_tar(make_tar(("f/x", "file", "y")))]
    with pytest.raises(LayerError):
        flatten(layers, dest)
    assert dest.is_dir() and list(dest.iterdir()) == []
    check()


def test_flatten_refuses_a_non_empty_destination_and_keeps_the_callers_files(arena):
    dest, check = arena
    dest.mkdir()
    (dest / "mine.txt").write_text("precious")
    opaque_root = Layer.from_tar(make_tar((".wh..wh..opq", "file"), ("new", "file", "n")))
    with pytest.raises(OSError, match="not empty") as info:
        flatten([opaque_root], dest)
    assert info.value.errno == errno.ENOTEMPTY and info.value.filename == str(dest)
    assert sorted(os.listdir(dest)) == ["mine.txt"] and (dest / "mine.txt").read_text() == "precious"
    check()


def test_flatten_refuses_a_file_or_symlink_as_destination(arena):
    dest, check = arena
    dest.write_text("a file")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        flatten([Layer.from_tar(make_tar(("a", "file", "1")))], dest)
    assert dest.read_text() == "a file"
    dest.unlink()
    dest.symlink_to("sentinel")
    with pytest.raises(OSError, match="symlink"):
        flatten([Layer.from_tar(make_tar(("a", "file", "1")))], dest)
    check()


def test_directory_times_are_never_set_through_a_symlink_that_replaced_the_directory(arena):
    """Found by the fuzz test: 'lnk/file' (a dir) then 'lnk' -> ../../sentinel in the same layer. The directory
    times set at the end of the layer must not follow the new symlink to the host's sentinel/file."""
    dest, check = arena
    layer = Layer.from_tar(make_tar(("lnk/file", "dir"), ("lnk", "symlink", "../../sentinel")))
    flatten([layer], dest)
    assert os.readlink(dest / "lnk") == "../../sentinel"
    check()
    for i, l in enumerate([layer]):
        l.unpack(dest.parent / "dest" / f"u{i}", ondisk.FALLBACK)
    check()
