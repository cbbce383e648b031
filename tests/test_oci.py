"""docker save archives, OCI layouts and OCI archives: round trips, validation, CLI helpers."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from layer_helpers import make_tar, snapshot  # noqa: E402

from overlaykit import oci  # noqa: E402
from overlaykit.images import History, Image, ImageConfig, Layer, LayerError, flatten  # noqa: E402


def sample_images():
    base = Layer.from_tar(make_tar(("etc", "dir"), ("etc/os", "file", "debian"), ("bin", "dir"),
                                   ("bin/sh", "file", "#!sh", {"mode": 0o755})))
    top = Layer.from_tar(make_tar(("etc", "dir"), ("etc/.wh.os", "file"), ("app", "dir"), ("app/x", "file", "x")))
    cfg = ImageConfig(env=["PATH=/bin"], cmd=["sh"], entrypoint=None, working_dir="/app",
                      labels={"a": "b"}, user="1000", exposed_ports=["80/tcp"])
    hist = [History("ADD rootfs /"), History("ENV PATH=/bin", empty_layer=True), History("COPY app /app")]
    return [Image("demo:1", [base, top], cfg, hist), Image("base", [base], ImageConfig(), [History("ADD rootfs /")])]


@pytest.mark.parametrize("fmt", ["docker", "layout", "archive"])
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip(tmp_path, fmt, compression):
    images = sample_images()
    p = tmp_path / "out"
    if fmt == "docker":
        oci.save_docker(images, p, compression=compression)
    elif fmt == "layout":
        oci.save_oci_layout(images, p, compression=compression)
    else:
        oci.save_oci_archive(images, p, compression=compression)
    back = oci.load(p)
    names = [im.name for im in back]
    assert names == (["demo:1", "base:latest"] if fmt == "docker" else ["demo:1", "base"])
    for a, b in zip(images, back):
        assert [l.diff_id for l in a.layers] == [l.diff_id for l in b.layers]
        assert all(l.compression == compression for l in b.layers)
        assert b.config == a.config and b.history == a.history
    flatten(back[0], tmp_path / "r")
    assert sorted(snapshot(tmp_path / "r")) == ["app", "app/x", "bin", "bin/sh", "etc"]


def test_exports_are_deterministic(tmp_path):
    oci.save_oci_archive(sample_images(), tmp_path / "a.tar", compression="gzip")
    oci.save_oci_archive(sample_images(), tmp_path / "b.tar", compression="gzip")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_layout_blobs_are_shared(tmp_path):
    oci.save_oci_layout(sample_images(), tmp_path / "l")
    blobs = sorted(p.name for p in (tmp_path / "l/blobs/sha256").iterdir())
    # 2 layers (base shared) + 2 configs + 2 manifests
    assert len(blobs) == 6


def _layout(tmp_path):
    oci.save_oci_layout(sample_images()[:1], tmp_path / "l", compression="gzip")
    idx = json.loads((tmp_path / "l/index.json").read_text())
    mdig = idx["manifests"][0]["digest"][7:]
    manifest = json.loads((tmp_path / "l/blobs/sha256" / mdig).read_text())
    return tmp_path / "l", manifest


def test_missing_blob_is_named(tmp_path):
    lay, m = _layout(tmp_path)
    d = m["layers"][1]["digest"]
    (lay / "blobs/sha256" / d[7:]).unlink()
    with pytest.raises(LayerError, match=f"layer 1 of demo:1 blob {d} is missing"):
        oci.load(lay)


def test_wrong_digest_is_named(tmp_path):
    lay, m = _layout(tmp_path)
    d = m["layers"][0]["digest"]
    p = lay / "blobs/sha256" / d[7:]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(LayerError, match=f"{d} has the wrong digest"):
        oci.load(lay)


def test_diff_id_mismatch_is_named(tmp_path):
    images = sample_images()[:1]
    files = oci.docker_archive_files(images)
    cfg_name = json.loads(files["manifest.json"])[0]["Config"]
    cfg = json.loads(files[cfg_name])
    cfg["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
    del files[cfg_name]
    files["manifest.json"] = json.dumps([{"Config": "c.json", "RepoTags": ["x:1"],
                                          "Layers": json.loads(files["manifest.json"])[0]["Layers"]}]).encode()
    files["c.json"] = json.dumps(cfg).encode()
    oci._write_tar(files, tmp_path / "d.tar")
    with pytest.raises(LayerError, match="layer 0 has diff_id sha256:.*config says sha256:0000"):
        oci.load(tmp_path / "d.tar")


def test_digest_path_traversal_rejected(tmp_path):
    lay, m = _layout(tmp_path)
    idx = json.loads((lay / "index.json").read_text())
    idx["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    (lay / "index.json").write_text(json.dumps(idx))
    with pytest.raises(LayerError, match="invalid digest"):
        oci.load(lay)


def test_docker_manifest_layer_path_traversal_rejected(tmp_path):
    files = oci.docker_archive_files(sample_images()[:1])
    m = json.loads(files["manifest.json"])
    m[0]["Layers"][0] = "../../etc/passwd"
    files["manifest.json"] = json.dumps(m).encode()
    oci._write_tar(files, tmp_path / "d.tar")
    with pytest.raises(LayerError, match=r"'\.\.'"):
        oci.load(tmp_path / "d.tar")


def test_truncated_archive(tmp_path):
    oci.save_docker(sample_images(), tmp_path / "d.tar")
    data = (tmp_path / "d.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerError):
        oci.load(tmp_path / "t.tar")


def test_not_an_image(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("hello")
        tf.addfile(ti, io.BytesIO(b""))
    (tmp_path / "x.tar").write_bytes(buf.getvalue())
    with pytest.raises(LayerError, match="neither a docker save archive"):
        oci.load(tmp_path / "x.tar")


def test_cli_inspect_and_export(tmp_path):
    oci.save_oci_archive(sample_images(), tmp_path / "a.tar")
    out, err = io.StringIO(), io.StringIO()
    assert oci.cli_inspect(str(tmp_path / "a.tar"), out=out, err=err) == 1
    assert "holds 2 images" in err.getvalue()
    out = io.StringIO()
    assert oci.cli_inspect(str(tmp_path / "a.tar"), name="demo:1", as_json=True, out=out) == 0
    j = json.loads(out.getvalue())
    assert j["name"] == "demo:1" and j["layers"][1]["removed"] == ["etc/os"]
    out = io.StringIO()
    assert oci.cli_export_rootfs(str(tmp_path / "a.tar"), str(tmp_path / "root"), name="demo:1", out=out) == 0
    assert (tmp_path / "root/app/x").read_text() == "x" and not (tmp_path / "root/etc/os").exists()
    err = io.StringIO()
    assert oci.cli_export_rootfs(str(tmp_path / "a.tar"), str(tmp_path / "root"), name="demo:1", err=err) == 1
    assert "Directory not empty" in err.getvalue()
