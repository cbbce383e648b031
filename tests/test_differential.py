"""Sim against kernel: the same starting layers and operations must give the same everything.

Each named scenario is one rule of Documentation/filesystems/overlayfs.rst; the Hypothesis test then
throws random operation sequences over random layer stacks at both backends.  Zero divergences allowed.
"""
from __future__ import annotations

import ast
import errno
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from differential import D, F, H, L, W, diff, prepare, run
from overlaykit import capabilities
from overlaykit.ondisk import default_xattr_ns

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
KERNEL = capabilities()["kernel"]
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed here: {KERNEL.reason}")

XNS = default_xattr_ns()  # the namespace this mount reads: trusted as root, user with userxattr
#: Whiteout xattrs this process can set: its mount's own, and as root also the other (a plain xattr then).
XATTR_NAMESPACES = ["trusted", "user"] if os.geteuid() == 0 else ["user"]
XW = W(XNS)
LESSON_LOWER = {"in_lower.txt": F("lower\n"), "in_both.txt": F("both, lower copy\n")}
LESSON_UPPER = {"in_upper.txt": F("upper\n"), "in_both.txt": F("both, upper copy\n")}

SCENARIOS = {
    # the lesson's experiment, each from a fresh start
    "create a file": ([LESSON_LOWER], [("write", "new.txt", "new\n")], LESSON_UPPER),
    "delete a lower file": ([LESSON_LOWER], [("remove", "in_lower.txt"), ("exists", "in_lower.txt")], LESSON_UPPER),
    "modify a lower file": ([LESSON_LOWER], [("append", "in_lower.txt", "more\n"), ("read", "in_lower.txt")], LESSON_UPPER),
    "delete an upper-only file": ([LESSON_LOWER], [("remove", "in_upper.txt")], LESSON_UPPER),
    "delete a file in both": ([LESSON_LOWER], [("remove", "in_both.txt"), ("listdir", ".")], LESSON_UPPER),
    # lookup across several lowers
    "top lower hides lower below": ([{"f": F("top")}, {"f": F("bottom"), "g": F("g")}], [("read", "f"), ("listdir", ".")], {}),
    "directories merge across three layers": (
        [{"d/a": F("a")}, {"d/b": F("b")}, {"d/c": F("c"), "d/a": F("old a")}],
        [("listdir", "d"), ("read", "d/a"), ("stat", "d")], {}),
    "file above hides a directory below": ([{"x": F("file")}, {"x/inner": F("hidden")}], [("listdir", "."), ("stat", "x"), ("read", "x/inner")], {}),
    "directory above a file below": ([{"x/in": F("in")}, {"x": F("file below")}, {"x/deep": F("deeper")}], [("listdir", "x")], {}),
    "whiteout in a lower layer": ([{"f": W()}, {"f": F("gone"), "g": F("g")}], [("exists", "f"), ("listdir", ".")], {}),
    "opaque dir in a lower layer": ([{"d": D(opaque=True), "d/new": F("n")}, {"d/old": F("o")}], [("listdir", "d")], {}),
    "whiteout in upper from the start": ([{"f": F("f"), "g": F("g")}], [("listdir", ".")], {"f": W()}),
    # copy-up triggers and what they copy
    "copy-up on write keeps parents' metadata": (
        [{"a": D(0o750), "a/b": D(0o700), "a/b/f": F("data", 0o600)}], [("write", "a/b/f", "new")], {}),
    "copy-up on truncate": ([{"f": F("0123456789")}], [("truncate", "f", 3), ("read", "f")], {}),
    "copy-up on chmod (metadata only)": ([{"f": F("same")}], [("chmod", "f", 0o600)], {}),
    "copy-up on chown": ([{"f": F("same")}], [("chown", "f", 1234, 1234)], {}),
    "copy-up on utime": ([{"f": F("same")}], [("utime", "f", (5, 5))], {}),
    "copy-up on setxattr": ([{"f": F("same")}], [("xattr", "f", "hello"), ("getxattr", "f", "user.note")], {}),
    "copy-up on link": ([{"f": F("same")}], [("link", "f", "g"), ("lstat", "f"), ("lstat", "g")], {}),
    "copy-up of a directory on chmod": ([{"d/f": F("x")}], [("chmod", "d", 0o700), ("listdir", "d")], {}),
    "read does not copy up": ([{"d/f": F("x")}], [("read", "d/f"), ("stat", "d/f"), ("listdir", "d")], {}),
    "touch a lower file copies it up": ([{"f": F("x")}], [("touch", "f")], {}),
    "touch creates": ([{"d": D()}], [("touch", "d/new")], {}),
    # whiteouts and opaque directories
    "rm -rf d; mkdir d gives an opaque dir": (
        [{"d/a": F("a"), "d/sub/b": F("b")}],
        [("remove", "d/a"), ("remove", "d/sub/b"), ("rmdir", "d/sub"), ("rmdir", "d"), ("mkdir", "d"), ("listdir", "d")], {}),
    "rmdir of a dir that looks empty": ([{"d/a": F("a")}], [("remove", "d/a"), ("rmdir", "d"), ("exists", "d")], {}),
    "rmdir of a non-empty merged dir": ([{"d/a": F("a")}], [("rmdir", "d")], {"d/b": F("b")}),
    "delete a whole lower directory": ([{"d": D()}], [("rmdir", "d"), ("listdir", ".")], {}),
    "recreate a deleted file": ([{"f": F("old")}], [("remove", "f"), ("write", "f", "new"), ("read", "f")], {}),
    "mkdir over a lower whiteout is not opaque": ([{"d": W()}, {"d/x": F("x")}], [("mkdir", "d"), ("listdir", "d")], {}),
    # renames
    "rename a lower file": ([{"f": F("data")}], [("rename", "f", "g"), ("listdir", "."), ("read", "g")], {}),
    "rename a lower directory is EXDEV": ([{"d/f": F("x")}], [("rename", "d", "e")], {}),
    "rename a merged directory is EXDEV": ([{"d/f": F("x")}], [("rename", "d", "e")], {"d/g": F("y")}),
    "rename an upper-only directory": ([{"x": F("x")}], [("mkdir", "n"), ("write", "n/f", "1"), ("rename", "n", "m"), ("listdir", "m")], {}),
    "move an upper dir into a merged dir makes it opaque": (
        [{"d/f": F("x"), "d/e/old": F("old")}], [("mkdir", "n"), ("rename", "n", "d/e2"), ("listdir", "d")], {}),
    "rename a file over a lower file": ([{"a": F("a"), "b": F("b")}], [("rename", "a", "b"), ("read", "b"), ("listdir", ".")], {}),
    "rename over a whiteout": ([{"a": F("a"), "b": F("b")}], [("remove", "b"), ("rename", "a", "b"), ("listdir", ".")], {}),
    "rename errors": ([{"d/f": F("x"), "e": D(), "g": F("g")}],
                      [("rename", "nope", "x"), ("rename", "g", "e"), ("rename", "g", "nodir/x"), ("rename", "g", "g")], {}),
    # hardlinks split by copy-up (index=off)
    "hardlinks split by copy-up": ([{"h1": F("shared"), "h2": H("h1")}],
                                    [("lstat", "h1"), ("append", "h1", "+"), ("read", "h2"), ("lstat", "h1"), ("lstat", "h2")], {}),
    # symlinks
    "symlink is copied up as a symlink": ([{"t": F("target"), "s": L("t")}], [("chown", "s", 0, 0), ("read", "s"), ("lstat", "s")], {}),
    "create a symlink": ([{"t": F("target")}], [("symlink", "t", "s"), ("read", "s"), ("lstat", "s")], {}),
    "write through a symlink copies up the target": ([{"t": F("target"), "s": L("t")}], [("append", "s", "+"), ("read", "t")], {}),
    "dangling symlink": ([{"s": L("missing")}], [("exists", "s"), ("lstat", "s"), ("read", "s")], {}),
    # errors
    "errors on missing paths": ([{"f": F("x")}],
                                [("read", "nope"), ("remove", "nope"), ("rmdir", "nope"), ("listdir", "f"),
                                 ("read", "f/x"), ("mkdir", "a/b"), ("write", "nope/x", "1")], {}),
    "errors on kinds": ([{"d/f": F("x"), "f": F("x")}],
                        [("remove", "d"), ("rmdir", "f"), ("read", "d"), ("write", "d", "x"), ("mkdir", "f"),
                         ("mkdir", "d"), ("link", "d", "d2"), ("truncate", "d", 0), ("symlink", "x", "f")], {}),
    # xattr whiteouts (kernel 6.7+): lookups honour them anywhere; readdir filters them only under "x"
    "xattr whiteout in a lower layer, parent unmarked": (
        [{"d/f": XW, "d/g": F("g")}, {"d/f": F("lower"), "d/h": F("h")}],
        [("exists", "d/f"), ("listdir", "d"), ("read", "d/f"), ("remove", "d/f"), ("rmdir", "d")], {}),
    "xattr whiteout in a lower dir marked x": (
        [{"d": D(xwhiteouts=True), "d/f": XW}, {"d/f": F("lower"), "d/h": F("h")}],
        [("exists", "d/f"), ("listdir", "d"), ("write", "d/f", "new"), ("listdir", "d")], {}),
    "rmdir counts xattr whiteouts that readdir filters": (
        [{"d": D(xwhiteouts=True), "d/f": XW}, {"d/f": F("lower")}], [("listdir", "d"), ("rmdir", "d")], {}),
    "x on the bottom layer is ignored": ([{"d": D()}, {"d": D(xwhiteouts=True), "d/f": XW}], [("listdir", "d"), ("stat", "d/f")], {}),
    "xattr whiteout in upper": (
        [{"d/f": F("lower"), "e/f": F("lower")}],
        [("listdir", "d"), ("stat", "d/f"), ("remove", "d/f"), ("rmdir", "u"), ("mkdir", "d/f"), ("write", "e/f", "x"),
         ("symlink", "t", "u/f"), ("listdir", "u")],
        {"d/f": XW, "e": D(xwhiteouts=True), "e/f": XW, "u/f": XW}),
    "readdir hides upper xattr whiteouts once the dir is impure": (
        [{"d/f": F("lower"), "d/g": F("g"), "e/f": F("lower"), "h": F("h")}],
        [("listdir", "d"), ("append", "d/g", "+"), ("listdir", "d"), ("listdir", "e"), ("rename", "h", "e/h"),
         ("listdir", "e")], {"d/f": XW, "e/f": XW}),
    "create over a lower xattr whiteout": (
        [{"d/f": XW, "d/g": XW}, {"d/f": F("lower"), "d/g/x": F("x")}], [("mkdir", "d/g"), ("link", "d/f", "h"), ("rename", "d/f", "i"), ("symlink", "t", "d/f"), ("listdir", "d/g")], {}),
    # long names and paths
    "names of 255 and 256 bytes": (
        [{"d/" + "n" * 255: F("long"), "d/f": F("f")}],
        [("read", "d/" + "n" * 255), ("stat", "d/" + "n" * 256), ("write", "n" * 256, "x"), ("mkdir", "m" * 255),
         ("rename", "d/f", "d/" + "f" * 256), ("rename", "d/f", "m" * 255 + "/" + "f" * 255), ("listdir", "m" * 255)], {}),
    "a long path": (
        [{"/".join(["p" * 250] * 6) + "/f": F("deep")}],
        [("read", "/".join(["p" * 250] * 6) + "/f"), ("append", "/".join(["p" * 250] * 6) + "/f", "+"),
         ("mkdir", "/".join(["p" * 250] * 6) + "/" + "q" * 255)], {}),
    "private overlay xattrs are hidden": ([{"d": D(opaque=True), "d/f": F("x")}, {"e": D()}],
                                          [("getxattr", "d", "trusted.overlay.opaque"), ("listdir", "d"),
                                           ("setxattr", "d/f", "trusted.overlay.opaque", b"y"),
                                           ("getxattr", "d/f", "trusted.overlay.opaque"), ("listdir", "d")], {}),
}

if XNS == "trusted":  # only root can set the other namespace's marker (trusted.*) next to its own
    SCENARIOS["user.overlay.whiteout on a trusted mount is a plain file"] = (
        [{"d/f": W("user")}, {"d/f": F("lower")}], [("stat", "d/f"), ("listdir", "d")], {})


def _run_both(tmp_path, lowers, ops, upper, **kw):
    sim = run("sim", str(tmp_path / "sim"), lowers, ops, upper_spec=upper, **kw)
    ker = run("kernel", str(tmp_path / "kernel"), lowers, ops, upper_spec=upper, **kw)
    return sim, ker


@needs_kernel
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(tmp_path, name):
    lowers, ops, upper = SCENARIOS[name]
    sim, ker = _run_both(tmp_path, lowers, ops, upper)
    assert sim == ker, f"{name}: sim and kernel disagree\n{diff(sim, ker)}"


READ_ONLY_OPS = [("read", "f"), ("write", "f", "x"), ("write", "new", "x"), ("remove", "f"), ("remove", "nope"),
                 ("mkdir", "f"), ("mkdir", "n"), ("rmdir", "d"), ("rmdir", "nope"), ("chmod", "f", 0o600),
                 ("rename", "f", "g"), ("rename", "nope", "g"), ("truncate", "f", 0), ("symlink", "f", "s"),
                 ("listdir", ".")]


@needs_kernel
def test_read_only_overlay(tmp_path):
    lowers = [{"f": F("x"), "d": D()}, {"g": F("y")}]
    sim, ker = _run_both(tmp_path, lowers, READ_ONLY_OPS, None, read_only=True)
    assert sim == ker, diff(sim, ker)
    assert ("err", "EROFS") in sim["results"]


@needs_kernel
def test_fallback_encoding_matches_kernel(tmp_path):
    """The sim writing OCI-style marker files still makes the same decisions as the kernel."""
    lowers, ops, upper = SCENARIOS["rm -rf d; mkdir d gives an opaque dir"]
    sim = run("sim", str(tmp_path / "sim"), lowers, ops, encoding="fallback")
    ker = run("kernel", str(tmp_path / "kernel"), lowers, ops)
    assert sim == ker, diff(sim, ker)


# -- random sequences -------------------------------------------------------------------------------
NAMES = ["a", "b", "c"]
paths = hs.lists(hs.sampled_from(NAMES), min_size=1, max_size=2).map("/".join)
contents = hs.sampled_from(["", "x", "hello\n", "0123456789"])


def _layer(draw_top: bool):
    item = hs.one_of(
        contents.map(F), hs.just(D()), hs.sampled_from(["a", "b", "../a", "/c", "missing"]).map(L),
        hs.sampled_from(XATTR_NAMESPACES).map(W), hs.just(D(xwhiteouts=True)),
        *([hs.just(W()), hs.just(D(opaque=True))] if draw_top else []),
    )
    return hs.dictionaries(paths, item, max_size=5).map(_consistent).flatmap(_maybe_linked)


def _maybe_linked(spec: dict):
    """Sometimes one more name for a file of the layer: a hard link (index=on keeps such links together)."""
    files = sorted(p for p, item in spec.items() if isinstance(item, F))
    if not files:
        return hs.just(spec)
    return hs.one_of(hs.just(spec), hs.tuples(hs.sampled_from(files), paths).map(
        lambda pair: _consistent({**spec, pair[1]: H(pair[0])}) if pair[1] not in spec else spec))


def _consistent(spec: dict) -> dict:
    """Drop entries whose parent is a non-directory in the same layer (they could not exist)."""
    out = {}
    for p in sorted(spec, key=lambda x: x.count("/")):
        parent = p.rpartition("/")[0]
        if parent and (parent in out and not isinstance(out[parent], D)):
            continue
        out[p] = spec[p]
    links = {p: item for p, item in out.items() if isinstance(item, H)}
    for p, item in links.items():  # hard links last, and only to a file of this layer
        del out[p]
        if isinstance(out.get(item.other), F) and not any(item.other.startswith(q + "/") for q in links):
            out[p] = item
    return out


ops = hs.one_of(
    hs.tuples(hs.just("write"), paths, contents),
    hs.tuples(hs.just("append"), paths, contents),
    hs.tuples(hs.just("remove"), paths),
    hs.tuples(hs.just("mkdir"), paths),
    hs.tuples(hs.just("rmdir"), paths),
    hs.tuples(hs.just("rename"), paths, paths),
    hs.tuples(hs.just("chmod"), paths, hs.sampled_from([0o600, 0o755])),
    hs.tuples(hs.just("symlink"), hs.sampled_from(["a", "../b", "/c"]), paths),
    hs.tuples(hs.just("link"), paths, paths),
    hs.tuples(hs.just("truncate"), paths, hs.sampled_from([0, 3])),
    hs.tuples(hs.just("touch"), paths),
    hs.tuples(hs.just("xattr"), paths, hs.just("v")),
    hs.tuples(hs.just("read"), paths),
    hs.tuples(hs.just("listdir"), paths),
)

EXAMPLES = int(os.environ.get("OVERLAYKIT_DIFF_EXAMPLES", "500"))
#: The mount option sets every random sequence may run under (None: the defaults).
OPTION_SETS = [None, "index=on", "redirect_dir=on", "metacopy=on", "metacopy=on,index=on"]


def _run_or_refused(backend: str, tmp: str, *args, **kw) -> dict:
    """`run`, or what mount(2) said when it refused the options (userxattr refuses redirect_dir=on)."""
    try:
        return run(backend, tmp, *args, **kw)
    except OSError as e:
        return {"mount refused": errno.errorcode.get(e.errno, e.errno)}


@needs_kernel
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(top=_layer(True), bottom=_layer(False), upper=_layer(True), sequence=hs.lists(ops, max_size=8),
       options=hs.sampled_from(OPTION_SETS))
def test_random_sequences(top, bottom, upper, sequence, options):
    with tempfile.TemporaryDirectory() as tmp:
        sim = _run_or_refused("sim", os.path.join(tmp, "sim"), [top, bottom], sequence, upper_spec=upper,
                              options=options)
        ker = _run_or_refused("kernel", os.path.join(tmp, "kernel"), [top, bottom], sequence, upper_spec=upper,
                              options=options)
    assert sim == ker, f"options={options} layers={[top, bottom]} upper={upper} ops={sequence}\n" + \
        (diff(sim, ker) if "results" in sim and "results" in ker else f"sim={sim} kernel={ker}")


# -- unprivileged permission shapes: layers built by root, mounted by the user `learner` -----------------
def _learner():
    try:
        return pwd.getpwnam(os.environ.get("OVERLAYKIT_TEST_USER", "learner"))
    except KeyError:
        return None


LEARNER = _learner()
ME = LEARNER.pw_uid if LEARNER else 1000  # the unprivileged user, in the specs below
OTHER = 1234  # a user that is neither root nor the learner


def _own(**kw):
    return {"owner": ME, **kw}


#: The kernel copies up and looks up with the mounter's rights (in a user namespace: any inode it owns,
#: whatever its mode); the caller's own checks (sticky, protected_hardlinks, search, write) still apply.
PERMISSION_SCENARIOS = {
    "own lower files of mode 000 and 0222 are copied up": (
        [{"f000": F("zero", 0o000, ME), "f222": F("two", 0o222, ME), "g000": F("g", 0o000, ME)}],
        [("read", "f000"), ("chmod", "f000", 0o600), ("read", "f000"), ("append", "f222", "+"), ("chmod", "f222", 0o644),
         ("read", "f222"), ("link", "g000", "h"), ("lstat", "h")], {}),
    "copy-up into an own 0555 directory": (
        [{"d": D(0o555, owner=ME), "d/f": F("f", 0o644, ME), "d/s": D(0o755, owner=ME), "d/s/g": F("g", 0o644, ME)}],
        [("write", "d/new", "x"), ("chmod", "d/f", 0o600), ("append", "d/s/g", "+"), ("listdir", "d")], {}),
    "a root-owned search-only directory": (
        [{"d": D(0o711, owner=0), "d/f": F("f", 0o644, ME), "d/in": D(0o755, owner=0), "d/in/g": F("g", 0o644, 0)}],
        [("read", "d/f"), ("listdir", "d"), ("read", "d/in/g"), ("chmod", "d/f", 0o600), ("stat", "d/in")], {}),
    "sticky directory": (
        [{"t": D(0o1777, owner=ME), "t/theirs": F("x", 0o644, OTHER), "t/mine": F("m", 0o644, ME),
          "r": D(0o1777, owner=0), "r/theirs": F("x", 0o666, OTHER), "r/mine": F("m", 0o644, ME)}],
        [("remove", "t/theirs"), ("rename", "t/theirs", "moved"), ("remove", "t/mine"), ("remove", "r/theirs"),
         ("rename", "t/mine", "r/theirs"), ("remove", "r/mine")], {}),
    "hard links to other users' files": (
        [{"root644": F("x", 0o644, 0), "root666": F("x", 0o666, 0), "mine": F("m", 0o600, ME)}],
        [("link", "root644", "a"), ("link", "root666", "b"), ("link", "mine", "c")], {}),
    "other owners show as the overflow ids": (
        [{"rootf": F("x", 0o644, 0), "otherd": D(0o755, owner=OTHER), "mine": F("m", 0o644, ME)}],
        [("lstat", "rootf"), ("stat", "otherd"), ("lstat", "mine"), ("stat", ".")], {}),
}


def _permission_case(rng: random.Random) -> tuple[list[dict], list[tuple], dict]:
    """Random layers with the shapes above: modes 000/0222/0555/0711/sticky, owned by the learner, root or
    another user; and random operations on them."""
    owners = [ME, ME, ME, 0, OTHER]
    file_modes = [0o644, 0o600, 0o000, 0o222, 0o444, 0o666]
    dir_modes = [0o755, 0o755, 0o555, 0o711, 0o1777, 0o700, 0o000]

    def layer(top: bool, upper: bool = False) -> dict:
        spec = {}
        for _ in range(rng.randint(0, 5)):
            path = "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 2)))
            r = rng.random()
            owner = ME if upper else rng.choice(owners)  # upper/ is the mounter's own
            if r < 0.5:
                spec[path] = F(rng.choice(["", "x", "hello\n"]), rng.choice(file_modes), owner)
            elif r < 0.85:
                # No lower dir of mode 0: one of ours the kernel reads with the mounter's rights and the sim
                # cannot (README, "How faithful the simulator is"); nor one of another user's that others may
                # not search, for two kernel quirks not modelled (readdir of an impure parent then fails
                # with EACCES; a whiteout left under such a dir)
                modes = [m for m in dir_modes if (m or upper) and (owner == ME or m & 0o005)]
                spec[path] = D(rng.choice(modes), owner=owner)
            elif top:
                spec[path] = W()
            else:
                spec[path] = L(rng.choice(["a", "../b", "missing"]))
        spec = _consistent(spec)
        for p in list(spec):  # implicit parents belong to the learner, so that copy-ups can reach below
            parent = p.rpartition("/")[0]
            if parent and parent not in spec:
                spec[parent] = D(owner=ME)
        return spec

    def op() -> tuple:
        path = "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 2)))
        other = "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 2)))
        return rng.choice([
            ("write", path, "w"), ("append", path, "+"), ("read", path), ("listdir", path), ("lstat", path),
            ("chmod", path, rng.choice([0o600, 0o755, 0o000])), ("chown", path, ME, -1), ("truncate", path, 1),
            ("xattr", path, "v"), ("touch", path), ("remove", path), ("rmdir", path), ("mkdir", path),
            ("rename", path, other), ("link", path, other), ("symlink", "a", path), ("utime", path, (5, 5)),
        ])

    return [layer(True), layer(False)], [op() for _ in range(rng.randint(1, 8))], layer(True, upper=True)


@pytest.mark.skipif(os.geteuid() != 0 or LEARNER is None or shutil.which("runuser") is None,
                    reason="needs root (to build layers owned by several users), runuser and a user named learner")
@needs_kernel
def test_unprivileged_permission_shapes_as_learner():
    """Both backends mounted by `learner` (user namespace + userxattr) over layers root built with other
    owners and restrictive modes: named scenarios, then EXAMPLES random cases.  Zero divergences."""
    rng = random.Random(10)
    named = list(PERMISSION_SCENARIOS.items())
    cases = named + [(f"random #{i}", _permission_case(rng)) for i in range(EXAMPLES)]
    user = (LEARNER.pw_uid, LEARNER.pw_gid)
    base = tempfile.mkdtemp(prefix="overlaykit-perm-")
    try:
        os.chmod(base, 0o755)
        repo = os.path.join(base, "repo")  # a copy the learner may read, wherever this checkout lives
        shutil.copytree(REPO / "overlaykit", os.path.join(repo, "overlaykit"), ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "tests" / "differential.py", repo)
        todo = []
        for i, (name, (lowers, ops, upper)) in enumerate(cases):
            tmp = os.path.join(base, f"case{i}")
            for side in ("sim", "kernel"):
                prepare(os.path.join(tmp, side), lowers, upper, xattr_ns="user", user=user)
            os.chmod(tmp, 0o755)
            todo.append((tmp, len(lowers), ops))
        with open(os.path.join(base, "cases"), "w") as f:
            f.write(repr(todo))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYKIT_", "PYTEST_"))}
        env.update(HOME=base, PYTHONPATH=repo, PYTHONDONTWRITEBYTECODE="1", USER=LEARNER.pw_name)
        out = subprocess.run(["runuser", "-u", LEARNER.pw_name, "--", sys.executable, os.path.join(repo, "differential.py"),
                              os.path.join(base, "cases")], env=env, capture_output=True, text=True, timeout=3600)
        assert out.returncode == 0, out.stdout + out.stderr
        diffs = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    bad = [f"{name}: layers={c[0]} upper={c[2]} ops={c[1]}\n{d}" for (name, c), d in zip(cases, diffs) if d]
    assert not bad, f"{len(bad)} of {len(cases)} cases diverge:\n" + "\n".join(bad[:5])


@pytest.mark.skipif(os.geteuid() != 0 or LEARNER is None or shutil.which("runuser") is None,
                    reason="needs root (to build the layers), runuser and a user named learner")
def test_what_the_sim_cannot_do_unprivileged_fails_first_and_says_why():
    """Without user namespaces (Binder) the sim cannot read an owned lower file of mode 000 or 0222, which
    the kernel's mounter can: it fails before writing anything to upper/, with EACCES and a sentence."""
    base = tempfile.mkdtemp(prefix="overlaykit-perm-")
    try:
        prepare(os.path.join(base, "sim"), [{"d": D(owner=ME), "d/f000": F("zero", 0o000, ME), "d/f222": F("two", 0o222, ME),
                                             "n": D(0o000, owner=ME), "n/f": F("x", 0o644, ME)}],
                {}, xattr_ns="user", user=(LEARNER.pw_uid, LEARNER.pw_gid))
        os.chmod(base, 0o755)
        script = f"""
import errno, os
from overlaykit import Overlay
t = {os.path.join(base, "sim")!r}
with Overlay([t + "/lower0"], t + "/upper", t + "/work", backend="sim", trace=False) as ov:  # (the trace observer is not the sim)
    out = []
    for fn in (lambda: ov.chmod("d/f000", 0o600), lambda: ov.write_bytes("d/f222", b"+", append=True)):
        try:
            fn()
            out.append("ok")
        except OSError as e:
            out.append((errno.errorcode[e.errno], e.filename, "simulator" in e.strerror, sorted(os.listdir(t + "/upper"))))
    ov.chmod("n", 0o755)
    try:
        ov.read_text("n/f")
        out.append("ok")
    except OSError as e:
        out.append((errno.errorcode[e.errno], e.filename, "simulator" in e.strerror))
print(repr(out))
"""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYKIT_", "PYTEST_"))}
        env.update(HOME=base, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", PATH="/nonexistent")  # no unshare(1)
        out = subprocess.run(["/usr/sbin/runuser" if os.path.exists("/usr/sbin/runuser") else shutil.which("runuser"),
                              "-u", LEARNER.pw_name, "--", sys.executable, "-c", script],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        results = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert results[:2] == [("EACCES", p, True, []) for p in ("d/f000", "d/f222")]  # nothing copied up, not even d
    assert results[2] == ("EACCES", "n/f", True)  # the kernel reads n (mode 000, ours) as the mounter
