"""redirect_dir: renaming a lower or merged directory (overlay.redirect), judged by the kernel.

With ``redirect_dir=on`` ovl_rename copies up the directory alone and writes ``overlay.redirect`` (its old
name, or the absolute path of its lower part when it changes parent); ovl_lookup follows redirects in
upper/ and in the lowers.  Each scenario runs on both backends and must agree on everything observable,
redirect values in upper/ included; then each backend mounts what the other wrote.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from differential import D, F, W, diff, prepare, run
from overlaykit import Overlay, capabilities
from overlaykit.engine import RENAME_EXCHANGE, RENAME_NOREPLACE

pytestmark = pytest.mark.kernel

KERNEL = capabilities()["kernel"]
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed here: {KERNEL.reason}")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="redirect_dir=on needs trusted.* xattrs: the kernel "
                             "refuses it with userxattr (an unprivileged mount)")

ON = "redirect_dir=on"
#: a lower dir "a" (with a file, a subdir and a file in it), merged from two lowers; "b" empty
LOWERS = [{"a/h": F("h top"), "a/f": F("f top")},
          {"a/f": F("f"), "a/sub/g": F("g"), "b": D(), "x/y/z": F("deep")}]

SCENARIOS = {
    "rename a lower dir in its parent": (
        LOWERS, [("rename", "a", "c"), ("listdir", "."), ("listdir", "c"), ("read", "c/f"), ("read", "c/sub/g"),
                 ("exists", "a")], {}),
    "rename a merged dir": (
        LOWERS, [("rename", "a", "c"), ("listdir", "c"), ("read", "c/u")], {"a/u": F("upper")}),
    "rename into another directory (absolute redirect)": (
        LOWERS, [("mkdir", "q"), ("rename", "a", "q/c"), ("listdir", "q/c"), ("read", "q/c/sub/g"), ("listdir", ".")],
        {}),
    "rename into a lower subdirectory": (
        LOWERS, [("rename", "a", "x/y/a2"), ("listdir", "x/y"), ("listdir", "x/y/a2/sub")], {}),
    "rename a redirected dir again in the same parent keeps its redirect": (
        LOWERS, [("rename", "a", "c"), ("rename", "c", "d"), ("listdir", "d"), ("listdir", ".")], {}),
    "rename a redirected dir into another dir": (
        LOWERS, [("rename", "a", "c"), ("mkdir", "q"), ("rename", "c", "q/d"), ("listdir", "q/d"),
                 ("rename", "q/d", "e"), ("listdir", "e")], {}),
    "rename back": (
        LOWERS, [("rename", "a", "c"), ("rename", "c", "a"), ("listdir", "."), ("listdir", "a")], {}),
    "rename a dir only in upper needs no redirect": (
        LOWERS, [("mkdir", "n"), ("write", "n/f", "1"), ("rename", "n", "m"), ("rename", "m", "x/m"),
                 ("listdir", "x/m")], {}),
    "a redirected dir inside a redirected dir": (
        LOWERS, [("rename", "a", "c"), ("rename", "c/sub", "c/sub2"), ("listdir", "c/sub2"), ("rename", "c", "x/c"),
                 ("listdir", "x/c/sub2"), ("rename", "x/c/sub2", "s"), ("read", "s/g"), ("listdir", "x/c")], {}),
    "move a child out of a redirected dir": (
        LOWERS, [("rename", "a", "c"), ("rename", "c/sub", "s"), ("append", "s/g", "+"), ("read", "s/g"),
                 ("listdir", "c")], {}),
    "copy-up of a child of a redirected dir": (
        LOWERS, [("rename", "a", "c"), ("append", "c/f", "+"), ("chmod", "c/h", 0o600), ("read", "c/f"),
                 ("write", "c/sub/new", "n"), ("listdir", "c/sub")], {}),
    "rmdir of a redirected dir": (
        LOWERS, [("rename", "a", "c"), ("rmdir", "c"), ("remove", "c/f"), ("remove", "c/h"), ("remove", "c/sub/g"),
                 ("rmdir", "c/sub"), ("rmdir", "c"), ("listdir", "."), ("mkdir", "c"), ("listdir", "c")], {}),
    "rename over an empty lower dir": (
        LOWERS, [("rename", "a", "b"), ("listdir", "b"), ("listdir", ".")], {}),
    "rename over a non-empty lower dir": (
        LOWERS, [("rename", "b", "x")], {}),
    "rename over a whiteout": (
        LOWERS, [("rmdir", "b"), ("rename", "a", "b"), ("listdir", "b"), ("listdir", ".")], {}),
    "rename over a whiteout in upper from the start": (
        LOWERS, [("rename", "a", "b"), ("listdir", "b")], {"b": W()}),
    "mkdir in a merged dir is opaque": (
        LOWERS, [("mkdir", "q"), ("mkdir", "a/q"), ("mkdir", "q/r"), ("listdir", "a")], {}),
    "exchange two lower dirs": (
        LOWERS, [("rename2", "a", "x", RENAME_EXCHANGE), ("listdir", "a"), ("listdir", "x"), ("listdir", "x/sub")], {}),
    "exchange a lower dir with an upper-only dir elsewhere": (
        LOWERS, [("mkdir", "x/n"), ("rename2", "a", "x/n", RENAME_EXCHANGE), ("listdir", "a"), ("listdir", "x/n")], {}),
    "noreplace": (
        LOWERS, [("rename2", "a", "b", RENAME_NOREPLACE), ("rename2", "a", "c", RENAME_NOREPLACE), ("listdir", "c")], {}),
    "redirect_max: a long absolute redirect is EXDEV": (
        [{"d" * 200 + "/" + "e" * 60 + "/m/f": F("f"), "s" * 100 + "/t": F("t")}],
        [("rename", "d" * 200 + "/" + "e" * 60 + "/m", "m"), ("rename", "s" * 100, "d" * 200 + "/s")], {}),
}


def _run_both(tmp, lowers, ops, upper, options=ON):
    sim = run("sim", os.path.join(tmp, "sim"), lowers, ops, upper_spec=upper, options=options)
    ker = run("kernel", os.path.join(tmp, "kernel"), lowers, ops, upper_spec=upper, options=options)
    return sim, ker


@needs_kernel
@as_root
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(tmp_path, name):
    lowers, ops, upper = SCENARIOS[name]
    sim, ker = _run_both(str(tmp_path), lowers, ops, upper)
    assert sim == ker, f"{name}\n{diff(sim, ker)}"


@needs_kernel
@as_root
def test_a_lower_dir_rename_writes_a_redirect(tmp_path):
    """The kernel's on-disk result, spelled out, so a sim that writes nothing cannot agree by accident."""
    lowers, ops, upper = SCENARIOS["a redirected dir inside a redirected dir"]
    for backend in ("sim", "kernel"):
        r = run(backend, str(tmp_path / backend), lowers, ops, upper_spec=upper, options=ON)
        assert r["upper"]["x/c"][-2:] == ("redirect", "/a"), backend
        assert r["upper"]["x/c/sub"] == ("whiteout",) and "x/c/sub2" not in r["upper"], backend
        assert r["upper"]["s"][-2:] == ("redirect", "/a/sub"), backend
        assert r["upper"]["a"] == ("whiteout",), backend
        assert "x/c/sub2" not in r["merged"] and r["merged"]["s/g"][0] == "file", backend


@needs_kernel
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_default_options_still_refuse_to_move_a_lower_dir(tmp_path, backend):
    """redirect_dir=off (this kernel's default): EXDEV, and nothing is written."""
    r = run(backend, str(tmp_path), LOWERS, [("rename", "a", "c"), ("rename2", "a", "x", RENAME_EXCHANGE)])
    assert r["results"] == [("err", "EXDEV"), ("err", "EXDEV")]
    assert r["upper"] == {}


# -- inode numbers ------------------------------------------------------------------------------------
def _inos(ov: Overlay, paths) -> dict:
    return {p: ov.stat(p, follow_symlinks=False).ino for p in paths}


def _relations(before: dict, after: dict) -> dict:
    """Which paths keep which earlier inode number: comparable across backends (the numbers are not)."""
    inv = {}
    for p, ino in before.items():
        inv.setdefault(ino, p)
    return {p: inv.get(ino, "new") for p, ino in after.items()}


@needs_kernel
@as_root
def test_a_moved_dir_keeps_its_inode_number_also_after_remount(tmp_path):
    rel = {}
    for backend in ("sim", "kernel"):
        tmp = str(tmp_path / backend)
        prepare(tmp, LOWERS, {})
        lowers = [os.path.join(tmp, f"lower{i}") for i in range(2)]
        layers = (lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work"))
        with Overlay(*layers, backend=backend, options=ON) as ov:
            before = _inos(ov, ["a", "a/sub", "a/f", "b", "x"])
            ov.rename("a", "c")
            ov.mkdir("q")
            ov.rename("c/sub", "q/sub")
            during = _inos(ov, ["c", "q/sub", "c/f", "b", "x", "q"])
        with Overlay(*layers, backend=backend, options=ON) as ov:
            after = _inos(ov, ["c", "q/sub", "c/f", "b", "x", "q"])
        rel[backend] = (_relations(before, during), _relations(before, after))
    assert rel["sim"] == rel["kernel"]
    assert rel["kernel"][0]["c"] == "a" and rel["kernel"][0]["q/sub"] == "a/sub"


# -- each mounts what the other wrote ---------------------------------------------------------------
def _view(ov: Overlay) -> dict:
    out = {}
    for top, dirs, files in ov.walk("."):
        for name in dirs + files:
            p = name if top in (".", "") else f"{top}/{name}"
            s = ov.stat(p, follow_symlinks=False)
            out[p] = (s.kind, oct(s.mode), ov.read_bytes(p) if s.kind == "file" else None)
    return out


WRITER_OPS = [("rename", "a", "c"), ("mkdir", "q"), ("rename", "c", "q/c"), ("rename", "q/c/sub", "s"),
              ("append", "q/c/f", "+"), ("rename", "x/y", "x/y2"), ("rename", "x", "q/x")]


@needs_kernel
@as_root
@pytest.mark.parametrize("writer,reader", [("sim", "kernel"), ("kernel", "sim")])
def test_each_backend_mounts_what_the_other_wrote(tmp_path, writer, reader):
    tmp = str(tmp_path)
    prepare(tmp, LOWERS, {})
    lowers = [os.path.join(tmp, f"lower{i}") for i in range(2)]
    layers = (lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work"))
    with Overlay(*layers, backend=writer, options=ON) as ov:
        for op, *args in WRITER_OPS:
            if op == "append":
                ov.write_bytes(args[0], args[1].encode(), append=True)
            else:
                getattr(ov, op)(*args)
        seen = _view(ov)
        inos = _inos(ov, list(seen))
    for options in (ON, None):  # redirect_dir=off still follows (redirect_always_follow=Y)
        with Overlay(*layers, backend=reader, options=options) as ov:
            assert _view(ov) == seen, options
            again = _inos(ov, list(seen))
        dirs = [p for p, v in seen.items() if v[0] == "dir"]
        assert {p: again[p] for p in dirs} == {p: inos[p] for p in dirs}, options
    assert "q/c/sub" not in seen and "s/g" in seen and "q/x/y2/z" in seen


@needs_kernel
@as_root
def test_a_redirect_in_a_lower_layer_after_rotation(tmp_path):
    """The upper of one mount becomes a lower of the next (a container image layer): its redirects and
    whiteouts still apply there, absolute ones from the roots of the layers below."""
    views = {}
    for backend in ("sim", "kernel"):
        tmp = str(tmp_path / backend)
        prepare(tmp, LOWERS, {})
        lowers = [os.path.join(tmp, f"lower{i}") for i in range(2)]
        with Overlay(lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work"), backend=backend, options=ON) as ov:
            for op, *args in WRITER_OPS:
                if op == "append":
                    ov.write_bytes(args[0], args[1].encode(), append=True)
                else:
                    getattr(ov, op)(*args)
            expected = _view(ov)
        os.makedirs(os.path.join(tmp, "up2"))
        os.makedirs(os.path.join(tmp, "work2"))
        rotated = [os.path.join(tmp, "upper")] + lowers
        with Overlay(rotated, os.path.join(tmp, "up2"), os.path.join(tmp, "work2"), backend=backend,
                     options=ON) as ov:
            assert _view(ov) == expected, backend
            ov.rename("q/c", "c2")  # a lower dir that has a redirect in its own (lower) layer
            ov.write_bytes("c2/sub-new", b"n")
            views[backend] = (_view(ov), sorted(os.listdir(os.path.join(tmp, "up2"))))
        with Overlay(rotated, backend=backend) as ov:  # read-only, redirects followed in every lower
            views[backend] += (_view(ov),)
    assert views["sim"] == views["kernel"]


@needs_kernel
@as_root
@pytest.mark.parametrize("value", ["", "a/b", "//a", "/a//b"])
def test_an_invalid_redirect_fails_the_lookup(tmp_path, value):
    res = {}
    for backend in ("sim", "kernel"):
        tmp = str(tmp_path / backend)
        prepare(tmp, LOWERS, {"d": D()})
        os.setxattr(os.path.join(tmp, "upper", "d"), "trusted.overlay.redirect", value.encode())
        lowers = [os.path.join(tmp, f"lower{i}") for i in range(2)]
        with Overlay(lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work"), backend=backend) as ov:
            try:
                res[backend] = ("ok", ov.listdir("d"))
            except OSError as e:
                res[backend] = ("err", errno.errorcode[e.errno])
    assert res["sim"] == res["kernel"]


# -- unprivileged: userxattr refuses redirect_dir=on, and ignores (nofollow) redirects ------------------------
def _learner_script(tmp: str, body: str) -> str:
    import pwd
    user = pwd.getpwnam("learner")
    repo = os.path.join(tmp, "repo")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(here, "overlaykit"), os.path.join(repo, "overlaykit"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(here, "tests", "differential.py"), repo)
    script = os.path.join(tmp, "script.py")
    with open(script, "w") as f:
        f.write(body)
    for dirpath, dirnames, filenames in os.walk(tmp):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            os.chown(n, user.pw_uid, user.pw_gid, follow_symlinks=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYKIT_", "PYTEST_"))}
    env.update(HOME=tmp, PYTHONPATH=repo, PYTHONDONTWRITEBYTECODE="1", USER="learner")
    out = subprocess.run(["runuser", "-u", "learner", "--", sys.executable, script], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


LEARNER_BODY = r'''
import errno, os, sys
from differential import prepare, run, F, D
from overlaykit import Overlay
tmp = sys.argv[0].rsplit("/", 1)[0]
out = {}
for backend in ("sim", "kernel"):
    base = os.path.join(tmp, backend)
    prepare(base, [{"a/f": F("f")}], {})
    layers = ([os.path.join(base, "lower0")], os.path.join(base, "upper"), os.path.join(base, "work"))
    try:
        Overlay(*layers, backend=backend, options="redirect_dir=on").mount().unmount()
        out[backend] = ["mounted"]
    except OSError as e:
        out[backend] = [errno.errorcode[e.errno]]
    # a redirect an earlier (root) mount could have written: with userxattr it is not followed
    os.mkdir(os.path.join(base, "upper", "c"))
    os.setxattr(os.path.join(base, "upper", "c"), "user.overlay.redirect", b"a")
    with Overlay(*layers, backend=backend) as ov:
        for p in ("c", "a"):
            try:
                out[backend].append(ov.listdir(p))
            except OSError as e:
                out[backend].append(errno.errorcode[e.errno])
        try:
            ov.rename("a", "d")
            out[backend].append("renamed")
        except OSError as e:
            out[backend].append(errno.errorcode[e.errno])
    # the same upper as a lower layer (rotated): a redirect in a lower is refused the same way
    with Overlay([layers[1], layers[0][0]], backend=backend) as ov:
        for p in ("c", "a"):
            try:
                out[backend].append(ov.listdir(p))
            except OSError as e:
                out[backend].append(errno.errorcode[e.errno])
print(repr(out))
'''


@needs_kernel
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to run as learner")
def test_unprivileged_mounts_refuse_redirect_dir_on_and_do_not_follow():
    import ast
    import pwd
    try:
        pwd.getpwnam("learner")
    except KeyError:
        pytest.skip("no user named learner")
    tmp = tempfile.mkdtemp(prefix="overlaykit-redirect-")
    try:
        os.chmod(tmp, 0o755)
        out = ast.literal_eval(_learner_script(tmp, LEARNER_BODY))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out["sim"] == out["kernel"], out
    # mount(2) refuses redirect_dir=on with userxattr; a redirect met in upper/ whose target exists in a
    # lower is refused (EPERM, "refusing to follow redirect"), not ignored; directories cannot move
    assert out["kernel"] == ["EINVAL", "EPERM", ["f"], "EXDEV", "EPERM", ["f"]], out


# -- random directory moves ----------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

_paths = hs.lists(hs.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
_item = hs.one_of(hs.just(D()), hs.just(D()), hs.sampled_from(["x", "y"]).map(F), hs.just(D(opaque=True)),
                  hs.just(W()))


#: the bottom layer always has directories to move, one with a subdirectory
_BASE = {"a": D(), "b": D(), "a/c": D(), "a/c/a": F("x"), "b/b": F("y")}


def _tree(top: bool):
    items = _item if top else hs.one_of(hs.just(D()), hs.sampled_from(["x", "y"]).map(F))
    trees = hs.dictionaries(_paths, items, max_size=6)
    return trees.map(_consistent) if top else trees.map(lambda t: _consistent({**_BASE, **t}))


def _consistent(spec: dict) -> dict:
    out = {}
    for p in sorted(spec, key=lambda x: x.count("/")):
        parts = p.split("/")
        if any(not isinstance(out.get("/".join(parts[:i]), D()), D) for i in range(1, len(parts))):
            continue
        out[p] = spec[p]
    return out


_ops = hs.one_of(
    hs.tuples(hs.just("rename"), _paths, _paths), hs.tuples(hs.just("rename"), _paths, _paths),
    *[hs.tuples(hs.just("rename"), hs.sampled_from(["a", "b", "a/c", "b/a", "c/c", "c"]),
                hs.lists(hs.sampled_from(["a", "b", "c"]), min_size=1, max_size=2).map("/".join))] * 4,
    hs.tuples(hs.just("rename2"), _paths, _paths, hs.sampled_from([RENAME_EXCHANGE, RENAME_NOREPLACE])),
    hs.tuples(hs.just("mkdir"), _paths), hs.tuples(hs.just("rmdir"), _paths), hs.tuples(hs.just("remove"), _paths),
    hs.tuples(hs.just("write"), _paths, hs.just("w")), hs.tuples(hs.just("append"), _paths, hs.just("+")),
    hs.tuples(hs.just("listdir"), _paths), hs.tuples(hs.just("chmod"), _paths, hs.just(0o700)),
)

EXAMPLES = int(os.environ.get("OVERLAYKIT_DIFF_EXAMPLES", "200"))


@needs_kernel
@as_root
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(top=_tree(True), bottom=_tree(False), upper=_tree(True), sequence=hs.lists(_ops, min_size=1, max_size=8))
def test_random_directory_moves(top, bottom, upper, sequence):
    with tempfile.TemporaryDirectory() as tmp:
        sim, ker = _run_both(tmp, [top, bottom], sequence, upper)
        assert sim == ker, f"layers={[top, bottom]} upper={upper} ops={sequence}\n{diff(sim, ker)}"
        # and each backend mounts what the other wrote, seeing the same merged tree
        for reader, writer, seen in (("kernel", "sim", sim), ("sim", "kernel", ker)):
            again = run(reader, os.path.join(tmp, writer), [top, bottom], [], prebuilt=True, options=ON)
            assert again["merged"] == seen["merged"], f"{reader} mounting what {writer} wrote: layers=" \
                f"{[top, bottom]} upper={upper} ops={sequence}\n{diff({**again, 'results': []}, {**seen, 'results': []})}"


@needs_kernel
@as_root
@pytest.mark.parametrize("backend", ["sim", "kernel"])
def test_the_trace_says_where_the_redirect_points(tmp_path, backend):
    tmp = str(tmp_path)
    prepare(tmp, LOWERS, {})
    lowers = [os.path.join(tmp, f"lower{i}") for i in range(2)]
    with Overlay(lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work"), backend=backend, options=ON) as ov:
        ov.rename("a", "c")
        first = [str(e) for e in ov.last_events() if e.kind == "redirect"]
        ov.mkdir("q")
        ov.rename("c", "q/c")
        second = [str(e) for e in ov.last_events() if e.kind == "redirect"]
        ov.rename("q/c", "q/d")  # keeps its absolute redirect: nothing new written
        third = [e for e in ov.last_events() if e.kind == "redirect"]
    assert len(first) == 1 and "redirect to a written" in first[0] and first[0].split()[2] == "c:", first
    assert len(second) == 1 and "redirect to /a written" in second[0], second
    assert third == []


@needs_kernel
def test_exchange_of_upper_dirs_marks_them_opaque_with_default_options(tmp_path):
    """ovl_rename (RENAME_EXCHANGE): a pure upper dir that lands in a merged parent is marked opaque first,
    with or without redirect_dir, and each new parent of an entry with an origin is marked impure."""
    lowers = [{"x/f": F("f"), "y/g": F("g")}]
    ops = [("mkdir", "n"), ("mkdir", "x/m"), ("write", "x/m/h", "h"), ("rename2", "n", "x/m", RENAME_EXCHANGE),
           ("listdir", "x"), ("rename2", "x/f", "n", RENAME_EXCHANGE), ("listdir", "x/f")]
    sim = run("sim", str(tmp_path / "sim"), lowers, ops)
    ker = run("kernel", str(tmp_path / "kernel"), lowers, ops)
    assert sim == ker, diff(sim, ker)


@needs_kernel
@as_root
@pytest.mark.parametrize("layer", [0, 1])
def test_a_redirect_in_the_last_layer_is_not_read(tmp_path, layer):
    """ovl_lookup reads no overlay xattr of a directory in the last layer it looks in: an invalid redirect
    there is harmless (EINVAL one layer up), and a valid one leads nowhere."""
    res = {}
    for backend in ("sim", "kernel"):
        tmp = str(tmp_path / backend)
        prepare(tmp, [{"d/top": F("t")}, {"d/f": F("f"), "e/g": F("g")}], None, read_only=True)
        os.setxattr(os.path.join(tmp, f"lower{layer}", "d"), "trusted.overlay.redirect", b"a/b")
        with Overlay([os.path.join(tmp, "lower0"), os.path.join(tmp, "lower1")], backend=backend) as ov:
            try:
                res[backend] = ("ok", ov.listdir("d"))
            except OSError as e:
                res[backend] = ("err", errno.errorcode[e.errno])
    assert res["sim"] == res["kernel"]
    assert res["kernel"] == (("err", "EINVAL") if layer == 0 else ("ok", ["f", "top"]))


@as_root
def test_diagrams_of_a_redirected_dir(tmp_path):
    """The stack and lookup diagrams show a moved directory and say where its lookup was redirected."""
    from overlaykit import diagrams
    tmp = str(tmp_path)
    prepare(tmp, LOWERS, {})
    lowers = [os.path.join(tmp, f"lower{i}") for i in range(2)]
    with Overlay(lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work"), backend="sim", options=ON) as ov:
        ov.rename("a", "c")
        steps = ov.lookup_steps("c/f")
        text = str(diagrams.lookup(ov, "c/f"))
        lanes = diagrams.stack_lanes(ov, "c")
    assert ("c", "upper", "dir, redirect to a") in steps and ("c", "lower[0]", "dir at /a") in steps
    assert ("c/f", "lower[0]", "file at /a/f") in steps
    assert "/c in upper: dir, redirect to a" in text and "/c/f in lower[0]: file at /a/f" in text
    assert lanes


@needs_kernel
@as_root
@pytest.mark.parametrize("options", ["redirect_dir=follow", "redirect_dir=nofollow", "redirect_dir=off", None])
def test_other_redirect_modes_on_what_redirect_dir_on_wrote(tmp_path, options):
    """follow (and off, with redirect_always_follow=Y) follow redirects but make none (EXDEV); nofollow refuses
    to follow one that leads somewhere (EPERM, "refusing to follow redirect")."""
    ops = [("listdir", "."), ("listdir", "c"), ("read", "c/f"), ("listdir", "q/d"), ("read", "q/d/g"),
           ("rename", "x", "x2"), ("rename", "c", "c3"), ("mkdir", "n"), ("rename", "n", "q/n")]
    out = {}
    for backend in ("sim", "kernel"):
        tmp = str(tmp_path / backend)
        run(backend, tmp, LOWERS, [("rename", "a", "c"), ("mkdir", "q"), ("rename", "c/sub", "q/d")], options=ON)
        out[backend] = run(backend, tmp, LOWERS, ops, prebuilt=True, options=options)
    assert out["sim"] == out["kernel"], diff(out["sim"], out["kernel"])
    results = dict(zip((f"{op[0]} {op[1]}" for op in ops), out["kernel"]["results"]))
    if options == "redirect_dir=nofollow":
        assert results["listdir c"] == ("err", "EPERM")
    else:
        assert results["listdir c"] == ("ok", ["f", "h"]) and results["rename x"] == ("err", "EXDEV")
