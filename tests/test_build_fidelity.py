"""The builder against buildah (issue 14): the same context built by both, layers and configs compared.

Each test builds with overlaykit always; the buildah side skips (with the reason) where buildah is missing
or cannot run. What buildah 1.28 cannot do (heredocs) is compared with BuildKit's documented result.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from build_peers import buildah_image, busybox_rootfs, config_fields, content, ours  # noqa: E402

from overlaykit.build import BUILD_EPOCH  # noqa: E402

OLD = 978307200  # 2001-01-01, older than any clamp


def write(p: Path, text: str = "x", mode: int | None = None) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    if mode is not None:
        os.chmod(p, mode)
    return p


def peer(ctx, tmp):
    try:
        return buildah_image(ctx, tmp)
    except RuntimeError as e:
        pytest.fail(str(e))


# ---------------------------------------------------------------------- 1. .dockerignore

# (patterns, path, excluded?) in moby patternmatcher's terms: patterns relative to the context root,
# `*` and `?` stop at `/`, `**` spans directories, a pattern matching a parent matches its children,
# later `!` patterns re-include, leading `/` and `..` are cleaned away.
CASES = [
    (["**"], "file", True),
    (["**"], "dir/file", True),
    (["**/"], "file", True),
    (["**/**"], "dir/file", True),
    (["dir/**"], "dir/file", True),
    (["dir/**"], "dir/dir2/file", True),
    (["dir/**"], "other/file", False),
    (["**/file"], "file", True),
    (["**/file"], "dir/file", True),
    (["**/file"], "dir/dir/file", True),
    (["**/*.txt"], "a/b/c.txt", True),
    (["**/*.txt"], "c.txt", True),
    (["dir/**/file"], "dir/file", True),
    (["dir/**/file"], "dir/a/b/file", True),
    (["dir/**/file"], "dirx/file", False),
    (["*/file"], "dir/file", True),
    (["*/file"], "dir/dir/file", False),
    (["abc*"], "abcdef", True),
    (["abc*"], "xabc", False),
    (["a?c"], "abc", True),
    (["a?c"], "a/c", False),
    (["[a-c]x"], "bx", True),
    (["[a-c]x"], "dx", False),
    (["[^a-c]x"], "dx", True),
    (["dir/*.go"], "dir/a/b.go", False),
    (["a\\*b"], "a*b", True),
    (["a\\*b"], "axb", False),
    (["foo"], "foo/bar/baz", True),
    (["foo.bar"], "fooxbar", False),
    (["a+b"], "a+b", True),
    (["(x)"], "(x)", True),
    (["/abs"], "abs", True),
    (["/dir/../abs"], "abs", True),
    (["./rel"], "rel", True),
    (["*.md", "!README*.md", "README-secret.md"], "README.md", False),
    (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
    (["*.md", "!README*.md", "README-secret.md"], "notes.md", True),
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs", "!docs/README.md"], "docs/other.md", True),
    (["!x", "x"], "x", True),
    (["x", "!x"], "x", False),
    (["  spaced  "], "spaced", True),
    (["**/foo/bar"], "foo/bar", True),
    (["**/foo/bar"], "x/y/foo/bar", True),
    (["**/.hidden"], ".hidden", True),
    ([".*"], ".env", True),
    ([".*"], "xenv", False),
    (["*"], "a/b", True),
    (["dir/"], "dir/file", True),
    (["! docs"], "docs", False),
]


@pytest.mark.parametrize("patterns,path,excluded", CASES)
def test_dockerignore_rules_follow_moby_patternmatcher(patterns, path, excluded):
    from overlaykit.dockerignore import IgnoreRules
    assert IgnoreRules(patterns).excluded(path) is excluded


def test_dockerignore_file_comments_and_blank_lines():
    from overlaykit.dockerignore import IgnoreRules
    rules = IgnoreRules.parse("\ufeff# a comment\n\n*.log\n  # not a comment: a pattern\n")
    assert rules.excluded("a.log") and not rules.excluded("a.txt")
    assert rules.excluded("  # not a comment: a pattern".strip()) is True
    assert len(rules.patterns) == 2
    with pytest.raises(ValueError, match="illegal exclusion"):
        IgnoreRules(["!"])


def dockerignore_context(ctx: Path) -> None:
    write(ctx / ".dockerignore", "# secrets and junk\nsecret.env\n**/*.log\nnode_modules\n/build/../out\n"
          "!keep.log\ndocs\n!docs/README.md\nDockerfile\n.dockerignore\n")
    write(ctx / "Dockerfile", "FROM scratch\nCOPY . /app/\n")
    for name in ("secret.env", "a.log", "sub/b.log", "sub/deep/c.log", "keep.log", "node_modules/x/y.js",
                 "out/o", "docs/README.md", "docs/other.md", "src/app.py", "sub/ok.txt"):
        write(ctx / name, name)


def test_dockerignore_excludes_from_copy_like_buildah(tmp_path):
    ctx = tmp_path / "ctx"
    dockerignore_context(ctx)
    mine = content(ours(ctx, tmp_path, backend="sim").layers[0])
    files = {p for p, v in mine.items() if v[0] == "file"}
    assert files == {"app/keep.log", "app/docs/README.md", "app/src/app.py", "app/sub/ok.txt"}
    theirs = peer(ctx, tmp_path)
    assert mine == content(theirs.layers[0])


def test_ignored_source_is_not_found(tmp_path):
    ctx = tmp_path / "ctx"
    dockerignore_context(ctx)
    write(ctx / "Dockerfile", "FROM scratch\nCOPY secret.env /\n")
    from overlaykit.build import BuildError
    with pytest.raises(BuildError, match="secret.env"):
        ours(ctx, tmp_path, backend="sim")


# ---------------------------------------------------------------------- 2. modes, owners, mtimes

ROOT = os.geteuid() == 0
NEEDS_ROOT = pytest.mark.skipif(not ROOT, reason="--chown to another user needs a privileged builder")


def modes_context(ctx: Path) -> None:
    chown = "COPY --chown=7:8 app /owned/\n" if ROOT else ""  # an unprivileged builder cannot give files away
    write(ctx / "Dockerfile", f"FROM scratch\nCOPY app /app/\n{chown}COPY app/f /single\n")
    write(ctx / "app/f", "file", 0o640)
    write(ctx / "app/private/p", "p", 0o600)
    write(ctx / "app/tmp/t", "t")
    os.chmod(ctx / "app/tmp", 0o1777)
    os.chmod(ctx / "app/private", 0o700)
    os.utime(ctx / "app/f", (OLD, OLD))
    os.utime(ctx / "app/private", (OLD, OLD))
    if os.geteuid() == 0:
        os.chown(ctx / "app/f", 1234, 1234)
        os.chown(ctx / "app/tmp", 1234, 1234)


@pytest.mark.parametrize("backend", ["sim", "auto"])
def test_copy_modes_owners_mtimes_do_not_depend_on_umask(tmp_path, backend):
    ctx = tmp_path / "ctx"
    modes_context(ctx)
    old = os.umask(0o077)
    try:
        image = ours(ctx, tmp_path, backend=backend)
    finally:
        os.umask(old)
    app = image.layers[0]
    got = content(app)
    assert got["app/tmp"][:4] == ("dir", "0o1777", 0, 0)
    assert got["app/private"][:4] == ("dir", "0o700", 0, 0)
    assert got["app/f"][:4] == ("file", "0o640", 0, 0)
    assert got["app/private/p"][:4] == ("file", "0o600", 0, 0)
    assert got["app"][:4] == ("dir", "0o755", 0, 0)
    if ROOT:
        assert {v[2:4] for v in content(image.layers[1]).values()} == {(7, 8)}
    mtimes = {e.path: e.mtime for e in app.entries()}
    assert mtimes["app/f"] == OLD and mtimes["app/private"] == OLD
    assert max(mtimes.values()) <= BUILD_EPOCH


def test_copy_modes_owners_mtimes_like_buildah(tmp_path):
    ctx = tmp_path / "ctx"
    modes_context(ctx)
    theirs = peer(ctx, tmp_path)
    old = os.umask(0o077)
    try:
        mine = ours(ctx, tmp_path, backend="sim")
    finally:
        os.umask(old)
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        assert content(a) == content(b)
    m = {e.path: e.mtime for e in mine.layers[0].entries()}
    t = {e.path: e.mtime for e in theirs.layers[0].entries()}
    assert m["app/f"] == t["app/f"] == OLD and m["app/private"] == t["app/private"] == OLD


# ---------------------------------------------------------------------- 4. ENV

ENV_FILE = ("FROM scratch\nENV a=1\nENV a=2 b=$a c=\\$a d='$a' e=\"$a\" f=${a}x\n"
            "ENV legacy two  \"quoted\"   words $a\nENV g=a\\ b h=\"q \\\"x\\\"\" i=${nope:-dflt}\n")


def test_env_substitutes_values_from_before_the_instruction(tmp_path):
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", ENV_FILE)
    env = ours(ctx, tmp_path, backend="sim").config.env_dict()
    assert {k: env[k] for k in "abcdef"} == {"a": "2", "b": "1", "c": "$a", "d": "$a", "e": "1", "f": "1x"}
    assert env["legacy"] == "two  quoted   words 2"  # the legacy form keeps its blanks, drops the quotes
    assert (env["g"], env["h"], env["i"]) == ("a b", 'q "x"', "dflt")


def test_env_like_buildah(tmp_path):
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", ENV_FILE)
    theirs = peer(ctx, tmp_path)
    assert config_fields(ours(ctx, tmp_path, backend="sim")) == config_fields(theirs)


# ---------------------------------------------------------------------- 6. symlinks, --chmod, --chown

def links_context(ctx: Path) -> None:
    write(ctx / "Dockerfile", "FROM scratch\nCOPY lnk /one/\nCOPY l* /wild/\nCOPY lnk /named\n"
          "COPY --chmod=751 dir /c\nCOPY --chown=5:6 dir /o/\nCOPY --chown=5:6 lnk /ol/\nCOPY dirlink /viadir/\n")
    write(ctx / "real.txt", "the target", 0o640)
    os.symlink("real.txt", ctx / "lnk")
    write(ctx / "dir/sub/f", "f", 0o644)
    os.symlink("../real.txt", ctx / "dir/inner")
    os.symlink("f", ctx / "dir/sub/rel")
    os.symlink("dir", ctx / "dirlink")


@NEEDS_ROOT
@pytest.mark.parametrize("backend", ["sim", "auto"])
def test_symlinks_chmod_chown(tmp_path, backend):
    ctx = tmp_path / "ctx"
    links_context(ctx)
    image = ours(ctx, tmp_path, backend=backend)
    one, wild, named, chmod, chown, chown_link, viadir = (content(layer) for layer in image.layers)
    assert one["one/lnk"] == ("file", "0o640", 0, 0, "", b"the target")
    assert wild["wild/lnk"][0] == "file" and wild["wild/lnk"][5] == b"the target"
    assert named["named"][0] == "file"
    assert chmod["c/sub"][:2] == ("dir", "0o751") and chmod["c/sub/f"][:2] == ("file", "0o751")
    assert chown["o/inner"][:5] == ("symlink", "0o777", 5, 6, "../real.txt")
    assert chown["o/sub/rel"][2:4] == (5, 6)
    assert chown_link["ol/lnk"][:4] == ("file", "0o640", 5, 6)
    assert viadir["viadir/sub/f"][5] == b"f" and viadir["viadir/inner"][:1] == ("symlink",)


def test_symlinks_chmod_chown_like_buildah(tmp_path):
    ctx = tmp_path / "ctx"
    links_context(ctx)
    theirs = peer(ctx, tmp_path)
    mine = ours(ctx, tmp_path, backend="sim")
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        assert content(a) == content(b)


# ---------------------------------------------------------------------- 7. PATH, created

def test_scratch_gets_default_path_like_buildah(tmp_path):
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", "FROM scratch\nCOPY f /\nENV X=1\n")
    write(ctx / "f")
    mine = ours(ctx, tmp_path, backend="sim")
    assert mine.config.env[0] == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    theirs = peer(ctx, tmp_path)
    assert config_fields(mine) == config_fields(theirs)


def test_source_date_epoch_gives_reproducible_digests(tmp_path, monkeypatch):
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", "FROM scratch\nCOPY f /\nENV X=1\nCOPY g /\n")
    write(ctx / "f")
    write(ctx / "g")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = ours(ctx, tmp_path / "a", backend="sim")
    os.utime(ctx / "g")  # touched between builds: still clamped
    second = ours(ctx, tmp_path / "b", backend="sim")
    assert first.id == second.id
    cfg = first.config_json()
    assert cfg["created"] == "2023-11-14T22:13:20Z"
    assert [h["created"] for h in cfg["history"]] == ["2023-11-14T22:13:20Z"] * 3
    assert {e.mtime for layer in first.layers for e in layer.entries()} == {1700000000}


def test_created_is_recorded_without_source_date_epoch(tmp_path, monkeypatch):
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", "FROM scratch\nCOPY f /\nENV X=1\n")
    write(ctx / "f")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    import datetime
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    image = ours(ctx, tmp_path, backend="sim")
    created = datetime.datetime.fromisoformat(image.config_json()["created"].replace("Z", "+00:00"))
    assert created >= before
    assert all("created" in h for h in image.config_json()["history"])
    stored = image  # the store keeps it
    assert stored.created == image.created


@pytest.mark.skipif(ROOT, reason="about unprivileged builders")
def test_chown_to_another_user_is_a_clear_error_when_unprivileged(tmp_path):
    from overlaykit.build import BuildError
    ctx = tmp_path / "ctx"
    write(ctx / "Dockerfile", "FROM scratch\nCOPY --chown=7:8 f /f\nCOPY --chown=0:0 f /g\n")
    write(ctx / "f")
    with pytest.raises(BuildError, match=r"line 2: COPY --chown=7:8: an unprivileged builder cannot"):
        ours(ctx, tmp_path, backend="sim")
    write(ctx / "Dockerfile", "FROM scratch\nCOPY --chown=0:0 f /g\n")
    assert content(ours(ctx, tmp_path, backend="sim").layers[0])["g"][2:4] == (0, 0)


def tar_context(ctx: Path) -> None:
    import io
    import tarfile
    ctx.mkdir(parents=True)
    write(ctx / "Dockerfile", "FROM scratch\nADD arch.tar /x/\n")
    with tarfile.open(ctx / "arch.tar", "w") as tf:
        def add(name, kind, mode, uid=0, data=b"", link=""):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, uid, OLD
            ti.size, ti.linkname = len(data), link
            tf.addfile(ti, io.BytesIO(data) if data else None)
        add("d", tarfile.DIRTYPE, 0o700, 5)
        add("d/f", tarfile.REGTYPE, 0o600, 7, b"inside")
        add("d/l", tarfile.SYMTYPE, 0o777, 7, link="f")
        add("top", tarfile.REGTYPE, 0o755, 0, b"#!/bin/sh\n")


def test_add_extracts_modes_mtimes_owners_from_the_archive(tmp_path):
    ctx = tmp_path / "ctx"
    tar_context(ctx)
    old = os.umask(0o077)
    try:
        layer = ours(ctx, tmp_path, backend="sim").layers[0]
    finally:
        os.umask(old)
    got = content(layer)
    who = (lambda n: n) if ROOT else (lambda n: 0)
    assert got["x/d"][:4] == ("dir", "0o700", who(5), who(5))
    assert got["x/d/f"] == ("file", "0o600", who(7), who(7), "", b"inside")
    assert got["x/d/l"][:5] == ("symlink", "0o777", who(7), who(7), "f")
    assert got["x/top"][:2] == ("file", "0o755")
    mtimes = {e.path: e.mtime for e in layer.entries()}
    assert mtimes["x/d"] == mtimes["x/d/f"] == OLD


def test_add_extracts_like_buildah(tmp_path):
    ctx = tmp_path / "ctx"
    tar_context(ctx)
    theirs = peer(ctx, tmp_path)
    mine = ours(ctx, tmp_path, backend="sim")
    assert content(mine.layers[0]) == content(theirs.layers[0])
    m = {e.path: e.mtime for e in mine.layers[0].entries()}
    t = {e.path: e.mtime for e in theirs.layers[0].entries()}
    assert m["x/d"] == t["x/d"] and m["x/d/f"] == t["x/d/f"]
