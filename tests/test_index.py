"""File handles (``overlay.origin``) and ``index=on``: the simulator against the kernel.

The kernel is the judge: the sim must write the same origin bytes for the same lower file, and each
backend must mount what the other wrote with the same inode relations (st_ino of a copied-up file
after rename + remount)."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from differential import F, H, apply, diff, layer_roots, prepare, run
from overlaykit import Overlay, capabilities, filehandle
from overlaykit.ondisk import default_xattr_ns

pytestmark = pytest.mark.kernel

KERNEL = capabilities()["kernel"]
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed here: {KERNEL.reason}")
XNS = default_xattr_ns()
ROOT = os.geteuid() == 0


def _layers(tmp, lowers_spec, upper_spec=None):
    prepare(str(tmp), lowers_spec, upper_spec)
    return layer_roots(str(tmp), len(lowers_spec))


def _origin(path: str) -> bytes | None:
    try:
        return os.getxattr(path, f"{XNS}.overlay.origin", follow_symlinks=False)
    except OSError:
        return None


def _fresh_upper(tmp, name):
    """Another upper/work pair over the same lowers (so both backends copy up the same lower inodes)."""
    upper, work = tmp / f"{name}-upper", tmp / f"{name}-work"
    upper.mkdir()
    work.mkdir()
    return str(upper), str(work)


@needs_kernel
def test_origin_is_the_kernels_file_handle(tmp_path):
    """Copy-up of the same lower file writes the same ``origin`` bytes on both backends: the lower fs's
    uuid and the inode's export handle as root; the empty "origin unknown" value without privilege."""
    lowers, _, _ = _layers(tmp_path, [{"f": F("x"), "d/g": F("y")}])
    written = {}
    for backend in ("sim", "kernel"):
        upper, work = _fresh_upper(tmp_path, backend)
        with Overlay(lowers, upper, work, backend=backend) as ov:
            ov.chmod("f", 0o600)
            ov.write_text("d/g", "z")
        written[backend] = {p: _origin(os.path.join(upper, p)) for p in ("f", "d", "d/g")}
    assert written["sim"] == written["kernel"]
    if ROOT:
        fh = filehandle.Fh.decode(written["kernel"]["f"])
        assert fh is not None and not fh.upper and fh.uuid == filehandle.fs_uuid(lowers[0])
        fd = os.open(lowers[0], os.O_RDONLY | os.O_DIRECTORY)
        try:  # the handle names the lower inode
            assert filehandle.decoded_stat(fd, fh).st_ino == os.stat(os.path.join(lowers[0], "f")).st_ino
        finally:
            os.close(fd)
    else:
        assert written["kernel"]["f"] == b""  # userxattr: no file handles in a user namespace


def _rename_session(backend, lowers, upper, work):
    with Overlay(lowers, upper, work, backend=backend) as ov:
        ov.chmod("f", 0o600)
        ov.rename("f", "moved")
        ov.mkdir("sub")
        ov.rename("moved", "sub/moved")
        return ov.lstat("sub/moved").ino


@needs_kernel
@pytest.mark.parametrize("writer,reader", [("sim", "kernel"), ("kernel", "sim"), ("sim", "sim"),
                                           ("kernel", "kernel")])
def test_renamed_copy_keeps_its_number_across_remount(tmp_path, writer, reader):
    """The other backend mounts what one wrote: a copied-up, renamed file keeps its lower inode number
    as root (found by its handle); without privilege it shows its upper inode's number (no handle)."""
    lowers, upper, work = _layers(tmp_path, [{"f": F("x")}])
    lower_ino = os.stat(os.path.join(lowers[0], "f")).st_ino
    assert _rename_session(writer, lowers, upper, work) == lower_ino
    with Overlay(lowers, upper, work, backend=reader) as ov:
        ino = ov.lstat("sub/moved").ino
    assert ino == (lower_ino if ROOT else os.stat(os.path.join(upper, "sub/moved")).st_ino)


@needs_kernel
def test_stale_origin_falls_back_to_the_upper_number(tmp_path):
    """An origin naming a lower inode that is gone decodes to nothing: the upper's own number."""
    lowers, upper, work = _layers(tmp_path, [{"f": F("x"), "g": F("y")}])
    _rename_session("sim", lowers, upper, work)
    os.unlink(os.path.join(lowers[0], "f"))  # offline change of the lower layer
    seen = {}
    for backend in ("sim", "kernel"):
        with Overlay(lowers, upper, work, backend=backend) as ov:
            seen[backend] = ov.lstat("sub/moved").ino
    assert seen["sim"] == seen["kernel"] == os.stat(os.path.join(upper, "sub/moved")).st_ino


# -- index=on ---------------------------------------------------------------------------------------------
needs_root = pytest.mark.skipif(not ROOT, reason="index=on needs file handles: an unprivileged mount falls back "
                                                 "to index=off (tested below)")
HARDLINKS = [{"h1": F("h\n"), "h2": H("h1"), "h3": H("h1"), "s": F("s")}]
INDEX_SCENARIOS = {
    "chmod one alias": [("chmod", "h1", 0o600)],
    "write through a second alias": [("chmod", "h1", 0o600), ("write", "h2", "w")],
    "unlink an alias never copied up": [("remove", "h1")],
    "unlink every alias": [("chmod", "h1", 0o600), ("remove", "h1"), ("remove", "h2"), ("remove", "h3")],
    "rename an alias, link another": [("rename", "h1", "x"), ("link", "h2", "y")],
    "truncate an alias": [("truncate", "h3", 1)],
    "append to an alias": [("append", "h2", "more")],
    "unlink a copied-up alias": [("chmod", "h2", 0o600), ("remove", "h2"), ("write", "h3", "z")],
    "rename over an alias never copied up": [("rename", "s", "h1")],
    "rename an alias over another": [("rename", "h1", "h2"), ("chmod", "h3", 0o600), ("rename", "h3", "h2")],
    "rename over a copied-up alias": [("chmod", "h1", 0o600), ("rename", "s", "h1"), ("append", "h2", "+")],
}


def _relations(ov) -> dict:
    """Each merged name: the names sharing its st_ino (the numbers themselves differ between two layer
    copies), its link count and its content, so a write through one name shows through the others."""
    names = sorted(ov.listdir("."))
    stats = {n: ov.lstat(n) for n in names}
    return {n: (tuple(m for m in names if stats[m].ino == s.ino), s.nlink,
                ov.read_bytes(n) if s.kind == "file" else None) for n, s in stats.items()}


@needs_kernel
@needs_root
@pytest.mark.parametrize("name", sorted(INDEX_SCENARIOS))
def test_index_scenarios_agree(tmp_path, name):
    """Named hard-link scenarios: sim and kernel give the same results, merged view, upper/, origin and
    nlink xattrs and work/index entries (differential.run with options="index=on")."""
    ops = INDEX_SCENARIOS[name]
    sim = run("sim", str(tmp_path / "sim"), HARDLINKS, ops, options="index=on")
    ker = run("kernel", str(tmp_path / "kernel"), HARDLINKS, ops, options="index=on")
    assert sim == ker, f"{name}: sim and kernel disagree\n{diff(sim, ker)}"
    assert "work/index" in ker["xattrs"]


@needs_kernel
@needs_root
@pytest.mark.parametrize("name", sorted(INDEX_SCENARIOS))
def test_index_scenarios_agree_with_metacopy_on(tmp_path, name):
    """The same scenarios with metacopy=on too: the index entry of a chmod-ed alias is a metacopy file
    (no data), a lower alias then reads its own data, and a write through any name fills the one inode."""
    ops = INDEX_SCENARIOS[name]
    sim = run("sim", str(tmp_path / "sim"), HARDLINKS, ops, options="index=on,metacopy=on")
    ker = run("kernel", str(tmp_path / "kernel"), HARDLINKS, ops, options="index=on,metacopy=on")
    assert sim == ker, f"{name}: sim and kernel disagree\n{diff(sim, ker)}"


def _kernel_log() -> list[str]:
    """dmesg, where the kernel names an index entry it finds invalid, stale or orphaned ([] if unreadable)."""
    try:
        r = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return r.stdout.splitlines() if r.returncode == 0 else []


@needs_kernel
@needs_root
@pytest.mark.parametrize("name", sorted(INDEX_SCENARIOS))
def test_hard_links_stay_one_inode(tmp_path, name):
    """The inode relations of every name (number shared, nlink, content) agree, and after a remount each
    backend shows the same relations over what the other wrote."""
    ops = INDEX_SCENARIOS[name]
    seen = {}
    for writer in ("sim", "kernel"):
        tmp = tmp_path / writer
        prepare(str(tmp), HARDLINKS, None)
        lowers, upper, work = layer_roots(str(tmp), 1)
        with Overlay(lowers, upper, work, backend=writer, options="index=on") as ov:
            for op in ops:
                apply(ov, op)
            seen[writer, "live"] = _relations(ov)
        for reader in ("sim", "kernel"):
            with Overlay(lowers, upper, work, backend=reader, options="index=on") as ov:
                seen[writer, reader] = _relations(ov)
    assert len({repr(v) for v in seen.values()}) == 1, seen
    entries = [n for w in ("sim", "kernel") for n in os.listdir(tmp_path / w / "work" / "index")]
    assert not [line for line in _kernel_log() if any(n in line for n in entries)]  # no index complaint
    relations = seen["kernel", "kernel"]
    aliases = [n for n in ("h2", "h3", "x", "y") if n in relations]  # names the ops never replace
    if aliases:
        group = relations[aliases[0]][0]
        assert set(aliases) <= set(group)  # still one inode ...
        assert all(relations[n][1] == len(group) for n in group)  # ... whose link count is its names


@needs_kernel
@needs_root
@pytest.mark.parametrize("writer", ["sim", "kernel"])
def test_other_lower_is_estale(tmp_path, writer):
    """index=on ties upper/ to the lower root: mounting it over another lower fails with ESTALE on both
    backends (ovl_verify_origin of the upper root), and with index=off it mounts."""
    prepare(str(tmp_path), HARDLINKS, None)
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    with Overlay(lowers, upper, work, backend=writer, options="index=on") as ov:
        ov.chmod("h1", 0o600)
    other = tmp_path / "other"
    other.mkdir()
    (other / "h1").write_text("other")
    for backend in ("sim", "kernel"):
        with pytest.raises(OSError) as info:
            Overlay([str(other)], upper, work, backend=backend, options="index=on").mount()
        assert info.value.errno == errno.ESTALE, (backend, info.value)
        with Overlay([str(other)], upper, work, backend=backend) as ov:
            assert ov.read_text("h1") == "h\n"


@needs_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_second_mount_of_an_upper_is_busy(tmp_path, backend):
    prepare(str(tmp_path), HARDLINKS, None)
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    with Overlay(lowers, upper, work, backend=backend, options="index=on"):
        for other in ("sim", "kernel"):
            with pytest.raises(OSError) as info:
                Overlay(lowers, upper, work, backend=other, options="index=on").mount()
            assert info.value.errno == errno.EBUSY


@needs_kernel
def test_unprivileged_index_falls_back_to_off(tmp_path):
    """As an unprivileged user (userxattr) the kernel falls back to index=off: both backends then break
    hard links on copy-up alike and write no work/index."""
    ops = INDEX_SCENARIOS["write through a second alias"]
    runs = {}
    for options in ("index=on", None):
        for backend in ("sim", "kernel"):
            runs[backend, options] = run(backend, str(tmp_path / f"{backend}-{options}"), HARDLINKS, ops,
                                         options=options)
    assert runs["sim", "index=on"] == runs["kernel", "index=on"], diff(runs["sim", "index=on"],
                                                                       runs["kernel", "index=on"])
    if not ROOT:
        assert runs["kernel", "index=on"] == runs["kernel", None]
        assert "work/index" not in runs["kernel", "index=on"]["xattrs"]


@needs_kernel
@needs_root
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_trace_says_linked_to_the_index_entry(tmp_path, backend):
    prepare(str(tmp_path), HARDLINKS, None)
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    with Overlay(lowers, upper, work, backend=backend, options="index=on") as ov:
        ov.chmod("h1", 0o600)
        ov.chmod("h2", 0o600)
        events = [e for e in ov.trace if e.kind == "copy-up"]
    entry = os.listdir(os.path.join(work, "index"))
    assert len(entry) == 1
    assert [e.path for e in events] == ["h1", "h2"]
    assert all(f"linked to the index entry work/index/{entry[0]}" in e.detail for e in events)
    assert events[0].nbytes == 2 and events[1].nbytes == 0 and "already in the index" in events[1].detail


@needs_kernel
@pytest.mark.parametrize("options", [None, "index=on"])
def test_merged_root_reports_the_upper_roots_number(tmp_path, options):
    """ovl_get_root: the root inode takes the upper root's number, not the lower root's it merges with."""
    prepare(str(tmp_path), HARDLINKS, None)
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    for backend in ("sim", "kernel"):
        with Overlay(lowers, upper, work, backend=backend, options=options) as ov:
            assert ov.lstat(".").ino == os.stat(upper).st_ino, backend


@needs_kernel
def test_merge_dir_made_by_hand_gets_the_kernels_origin(tmp_path):
    """ovl_fix_origin: a lookup of an upper dir merging with a lower one, with no origin yet, records the
    lower dir's handle (empty without privilege): the same bytes on both backends."""
    prepare(str(tmp_path), [{"d/x": F("x")}], {"d/y": F("y")})
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    written = {}
    for backend in ("sim", "kernel"):
        try:
            os.removexattr(os.path.join(upper, "d"), f"{XNS}.overlay.origin")
        except OSError:
            pass
        with Overlay(lowers, upper, work, backend=backend) as ov:
            assert sorted(ov.listdir("d")) == ["x", "y"]
        written[backend] = _origin(os.path.join(upper, "d"))
    assert written["sim"] == written["kernel"] is not None


@needs_root
def test_failed_indexed_copy_up_leaves_no_entry_and_no_name(tmp_path, monkeypatch):
    """An index=on copy-up is built under a #<hex> temp in work/index and renamed into place: a failure
    part-way leaves neither an index entry nor an upper name, and the next mount clears the temp."""
    from overlaykit import sim as sim_module
    prepare(str(tmp_path), HARDLINKS, None)
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    real_copy = sim_module.SimBackend._copy_leaf

    def fail_after_copy(self, src, dst, s, *args):
        real_copy(self, src, dst, s, *args)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Overlay(lowers, upper, work, backend="sim", options="index=on") as ov:
        monkeypatch.setattr(sim_module.SimBackend, "_copy_leaf", fail_after_copy)
        with pytest.raises(OSError) as info:
            ov.chmod("h1", 0o600)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert os.listdir(upper) == [] and os.listdir(os.path.join(work, "index")) == []
        ov.chmod("h1", 0o600)
        assert ov.read_text("h2") == "h\n" and ov.lstat("h2").nlink == 3
    os.close(os.open(os.path.join(work, "index", "#leftover"), os.O_CREAT | os.O_WRONLY))
    with Overlay(lowers, upper, work, backend="sim", options="index=on") as ov:
        assert ov.lstat("h1").ino == ov.lstat("h3").ino
    assert [n for n in os.listdir(os.path.join(work, "index")) if n.startswith("#")] == []


@needs_kernel
@needs_root
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_stale_index_entry_is_removed_at_mount(tmp_path, backend):
    """ovl_indexdir_cleanup: an entry whose origin does not match its name is stale and goes at mount (the
    kernel logs "failed to verify index"); the upper name linked to it stays."""
    prepare(str(tmp_path), HARDLINKS, None)
    lowers, upper, work = layer_roots(str(tmp_path), 1)
    with Overlay(lowers, upper, work, backend="kernel", options="index=on") as ov:
        ov.chmod("h1", 0o600)
    (entry,) = os.listdir(os.path.join(work, "index"))
    bogus = filehandle.Fh(1, bytes(8)).encode()
    os.setxattr(os.path.join(work, "index", entry), f"{XNS}.overlay.origin", bogus)
    with Overlay(lowers, upper, work, backend=backend, options="index=on") as ov:
        assert ov.read_text("h1") == "h\n"
    assert os.listdir(os.path.join(work, "index")) == []
    assert os.path.exists(os.path.join(upper, "h1"))
