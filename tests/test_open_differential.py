"""Differential cases for open files and inode numbers: the same sequence on the sim and on the kernel.

Open files: the outcomes of each call, what copy-up did (bytes copied, from the trace), upper/ as
stored and the merged view must be equal.  Inode numbers: the raw numbers differ between a real mount
and the sim, so what is compared is what overlayfs.rst ("Inode properties") promises for this
configuration (all layers on one filesystem, xino=off, index=off): which paths share an inode, which
numbers survive copy-up and a remount, whether st_dev is the same everywhere.
"""
from __future__ import annotations

import os

import pytest

from overlaykit import Overlay, capabilities

from differential import D, F, H, build_layer, outcome, snapshot_merged, snapshot_upper
from overlaykit.ondisk import Encoding, default_xattr_ns

KERNEL = capabilities()["kernel"]
pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")]

LOWER = {"f": F("0123456789"), "g": F("hard"), "g2": H("g"), "d": D(), "d/x": F("x"), "m": D(), "m/low": F("l"),
         "big": F("B" * 5000)}
UPPER = {"u": F("upper"), "ud": D(), "m": D(), "m/up": F("u")}


def layers(tmp, name):
    root = os.path.join(tmp, name)
    enc = Encoding("kernel", default_xattr_ns())
    build_layer(os.path.join(root, "lower"), LOWER, enc)
    build_layer(os.path.join(root, "upper"), UPPER, enc)
    os.makedirs(os.path.join(root, "work"))
    return [os.path.join(root, "lower")], os.path.join(root, "upper"), os.path.join(root, "work")


def copied(ov) -> list:
    return [(e.path, e.nbytes, e.detail.split(":")[1].split(" into")[0]) for e in ov.last_events()
            if e.kind == "copy-up"]


def open_files(ov) -> list:
    """Every open-file case of issue 11; one observation per step."""
    out = []

    def step(fn):
        out.append(outcome(fn))

    h = ov.os_open("f", os.O_RDWR)  # open for write, write nothing
    out.append(copied(ov))
    step(lambda: ov.close(h))
    step(lambda: ov.read_bytes("f"))
    h = ov.os_open("big", os.O_WRONLY | os.O_TRUNC)  # metadata only
    out.append(copied(ov))
    step(lambda: ov.fstat(h).size)
    step(lambda: ov.pwrite(h, b"abc", 10))  # a hole, then data
    step(lambda: ov.close(h))
    step(lambda: ov.read_bytes("big"))
    r = ov.os_open("d/x", os.O_RDONLY)  # a reader on the lower file, then another handle copies it up
    w = ov.os_open("d/x", os.O_WRONLY | os.O_APPEND)
    out.append(copied(ov))
    step(lambda: ov.pwrite(w, b"-appended", 0))
    step(lambda: ov.pread(r, 100, 0))
    step(lambda: ov.rename("d/x", "d/y"))
    step(lambda: ov.pwrite(w, b"+", 0))
    step(lambda: ov.remove("d/y"))
    step(lambda: ov.pread(r, 100, 0))
    step(lambda: ov.fstat(w).nlink)
    step(lambda: ov.close(r))
    step(lambda: ov.close(w))
    step(lambda: ov.os_open("d", os.O_WRONLY))
    step(lambda: ov.os_open("u", os.O_RDONLY | os.O_DIRECTORY))
    step(lambda: ov.os_open("u", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    with ov.open("g", "r+b") as f:  # a hard-linked lower file: its copy-up breaks the link
        f.seek(2)
        f.write(b"RD")
    out.append(copied(ov))
    step(lambda: ov.read_bytes("g2"))
    step(lambda: ov.stat("g").nlink)
    return out


def test_open_file_cases_agree(tmp_path):
    results = {}
    for backend in ("sim", "kernel"):
        lowers, upper, work = layers(str(tmp_path), backend)
        with Overlay(lowers, upper, work, backend=backend) as ov:
            steps = open_files(ov)
            results[backend] = (steps, snapshot_upper(ov), snapshot_merged(ov))
    assert results["sim"][0] == results["kernel"][0]
    assert results["sim"][1] == results["kernel"][1]
    assert results["sim"][2] == results["kernel"][2]
    # and what they agree on is what the kernel does
    steps = results["kernel"][0]
    assert steps[0] == [("f", 10, " 10 bytes copied")]
    assert steps[3] == [("big", 0, " 0 bytes copied (O_TRUNC")]


PATHS = [".", "f", "g", "g2", "d", "d/x", "m", "m/low", "m/up", "u", "ud", "big"]


def inode_relations(backend: str, tmp: str, options=None) -> dict:
    """Which numbers stay, which paths share them, and st_dev, through copy-ups and a remount."""
    lowers, upper, work = layers(tmp, backend)
    ident = {}

    def look(ov, when):
        for p in PATHS + (["new", "nd"] if when != "before" else []):
            s = ov.lstat("big-moved" if p == "big" and when == "after remount" else p)
            ident[when, p] = (s.dev, s.ino)

    with Overlay(lowers, upper, work, backend=backend, options=options) as ov:
        look(ov, "before")
        ov.chmod("f", 0o600)             # a plain copy-up
        ov.write_text("g", "new")        # a hard-linked one (O_TRUNC)
        ov.touch("m/low")
        ov.chmod("d", 0o700)             # a directory copied up
        ov.write_text("new", "n")
        ov.mkdir("nd")
        look(ov, "after copy-up")
        ov.chmod("big", 0o600)           # copied up, then renamed: the inode keeps its number
        before = ov.lstat("big").ino
        ov.rename("big", "big-moved")
        ident["renamed", "big"] = (0, ov.lstat("big-moved").ino == before)
    with Overlay(lowers, upper, work, backend=backend, options=options) as ov:
        look(ov, "after remount")
    whens = ("before", "after copy-up", "after remount")
    paths = PATHS + ["new", "nd"]
    # after a remount the kernel finds a renamed file's origin by its file handle ("big" is "big-moved"
    # then): as root its number survives; an unprivileged mount writes no handle and so cannot keep it
    renamed = ident.pop(("renamed", "big"))[1]
    return {
        "renamed keeps its number": renamed,
        # one st_dev across the tree of a mount (a new mount may get a new anonymous device)
        "one st_dev per mount": [len({ident[k][0] for k in ident if k[0] == w}) == 1 for w in whens],
        "same st_dev after remount": ident["after copy-up", "."][0] == ident["after remount", "."][0],
        "kept through copy-up": {p: ident["before", p][1] == ident["after copy-up", p][1] for p in paths
                                 if ("before", p) in ident},
        "kept through remount": {p: ident["after copy-up", p][1] == ident["after remount", p][1] for p in paths},
        "shared": {w: sorted((a, b) for a in paths for b in paths if a < b and (w, a) in ident
                             and ident.get((w, a)) == ident.get((w, b))) for w in whens},
    }


def test_inode_relations_agree(tmp_path):
    sim = inode_relations("sim", str(tmp_path))
    kernel = inode_relations("kernel", str(tmp_path))
    sim.pop("same st_dev after remount")  # the kernel's is a new anonymous device per mount; the sim's is fixed
    kernel.pop("same st_dev after remount")
    assert sim == kernel
    # the kernel's promises, as measured on this kernel
    assert kernel["one st_dev per mount"] == [True, True, True]
    assert kernel["kept through copy-up"]["f"] and kernel["kept through copy-up"]["d"]
    assert not kernel["kept through copy-up"]["g"]  # index=off: a hard link's copy-up gets a new number
    assert kernel["shared"]["before"] == [("g", "g2")] and kernel["shared"]["after copy-up"] == []
    assert kernel["kept through remount"]["big"] == (os.geteuid() == 0)  # found again by its file handle


def test_inode_relations_agree_with_index_on(tmp_path):
    """overlayfs.rst "Inode properties" with index=on: a hard-linked file keeps its number through copy-up
    and its links stay one inode (as root; an unprivileged mount falls back to index=off)."""
    sim = inode_relations("sim", str(tmp_path), "index=on")
    kernel = inode_relations("kernel", str(tmp_path), "index=on")
    sim.pop("same st_dev after remount")
    kernel.pop("same st_dev after remount")
    assert sim == kernel
    root = os.geteuid() == 0
    assert kernel["kept through copy-up"]["g"] == root
    assert (("g", "g2") in kernel["shared"]["after copy-up"]) == root


# -- random sequences of open-file calls ------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

NAMES = ["f", "g", "d/x", "u", "new", "d"]
FLAGS = [os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
         os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.O_RDONLY | os.O_NOFOLLOW]
STEP = hs.one_of(
    hs.tuples(hs.just("open"), hs.sampled_from(NAMES), hs.sampled_from(FLAGS)),
    hs.tuples(hs.just("pwrite"), hs.integers(0, 3), hs.binary(max_size=6), hs.integers(0, 12)),
    hs.tuples(hs.just("pread"), hs.integers(0, 3), hs.integers(0, 16), hs.integers(0, 12)),
    hs.tuples(hs.just("ftruncate"), hs.integers(0, 3), hs.integers(0, 8)),
    hs.tuples(hs.just("close"), hs.integers(0, 3)),
    hs.tuples(hs.just("rename"), hs.sampled_from(NAMES), hs.sampled_from(NAMES)),
    hs.tuples(hs.just("remove"), hs.sampled_from(NAMES)),
)


def replay(ov, steps) -> list:
    handles, out = [], []
    for step in steps:
        name, *args = step
        if name == "open":
            r = outcome(lambda: ov.os_open(args[0], args[1], 0o644))
            if r[0] == "ok":
                handles.append(r[1])
                r = ("ok", len(handles) - 1)
            out.append((r, copied(ov)))
            continue
        if name in ("pwrite", "pread", "ftruncate", "close"):
            if args[0] >= len(handles):
                continue
            h = handles[args[0]]
            fn = {"pwrite": lambda: ov.pwrite(h, args[1], args[2]), "pread": lambda: ov.pread(h, args[1], args[2]),
                  "ftruncate": lambda: ov.ftruncate(h, args[1]), "close": lambda: ov.close(h)}[name]
            out.append(outcome(fn))
            continue
        out.append(outcome(lambda: getattr(ov, name)(*args)))
    return out


@settings(max_examples=int(os.environ.get("OVERLAYKIT_OPEN_EXAMPLES", "15")), deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=True)
@given(hs.lists(STEP, max_size=10))
def test_random_open_file_sequences_agree(tmp_path_factory, steps):
    results = {}
    tmp = str(tmp_path_factory.mktemp("open-seq"))
    for backend in ("sim", "kernel"):
        lowers, upper, work = layers(tmp, backend)
        with Overlay(lowers, upper, work, backend=backend) as ov:
            results[backend] = (replay(ov, steps), snapshot_upper(ov), snapshot_merged(ov))
    assert results["sim"] == results["kernel"], steps
