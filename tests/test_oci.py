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
    assert f"{tmp_path / 'root'}: the destination folder is not empty" in err.getvalue()


# --- issue 14, items 8 and 12: save, names, and the command line's errors ------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402

from overlaykit import cli  # noqa: E402
from overlaykit.images import Store  # noqa: E402
from overlaykit.refs import InvalidReference, check_reference  # noqa: E402


@pytest.mark.parametrize("fmt", ["oci", "oci-layout", "docker"])
@pytest.mark.parametrize("compression", [None, "gzip", "zstd", "none"])
def test_cli_save_round_trips_each_format(tmp_path, fmt, compression, capsys):
    store = Store(tmp_path / "store")
    demo = sample_images()[0]
    store.add_image(demo)
    out = tmp_path / ("out" if fmt == "oci-layout" else "out.tar")
    argv = ["--store", str(tmp_path / "store"), "save", "demo:1", "-o", str(out), "--format", fmt]
    if compression:
        argv += ["--compression", compression]
    assert cli.main(argv) == 0, capsys.readouterr().err
    (back,) = oci.load(out)
    assert back.name == "demo:1" and [l.diff_id for l in back.layers] == [l.diff_id for l in demo.layers]
    assert back.config == demo.config
    want = {"gzip": "gzip", "zstd": "zstd"}.get(compression, "none")
    assert all(l.compression == want for l in back.layers)
    assert [p.name for p in tmp_path.iterdir() if ".save-" in p.name] == []
    # never overwrites: a second save to the same path is refused and leaves the first intact
    before = sorted(out.rglob("*")) if out.is_dir() else out.read_bytes()
    assert cli.main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert (sorted(out.rglob("*")) if out.is_dir() else out.read_bytes()) == before


@pytest.mark.parametrize("bad", ["UPPER/bad tag:::", "Shop:1", "shop:-x", "a//b", "shop:" + "x" * 129,
                                 "shop@sha256:abc", "", "-shop"])
def test_invalid_image_names_are_refused_by_the_store_and_the_cli(tmp_path, bad, capsys):
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidReference, match="invalid image name"):
        store.add_image(sample_images()[1], name=bad)
    assert store.images() == []
    assert cli.main(["--store", str(tmp_path / "store"), "save", "-o", str(tmp_path / "o.tar"), "--", bad]) == 1
    assert "invalid image name" in capsys.readouterr().err
    assert not (tmp_path / "o.tar").exists()


@pytest.mark.parametrize("good", ["shop", "shop:1.0", "library/redis:7-alpine", "localhost:5000/a/b:v_1",
                                  "registry.example.com/team/app@sha256:" + "a" * 64, "a__b.c-d/e",
                                  "sha256:" + "0" * 64])
def test_valid_image_names_are_accepted(good):
    assert check_reference(good) == good


def test_cli_missing_archive_is_no_such_file(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert cli.main(["--store", store, "inspect", str(tmp_path / "x.tar")]) == 1
    assert capsys.readouterr().err.strip() == f"overlaykit inspect: no such file: {tmp_path / 'x.tar'}"
    assert cli.main(["--store", store, "inspect", "x.tar"]) == 1
    assert capsys.readouterr().err.strip() == "overlaykit inspect: no such file: x.tar"
    assert cli.main(["--store", store, "export-rootfs", "x.tar", str(tmp_path / "r")]) == 1
    assert "no such file: x.tar" in capsys.readouterr().err
    assert cli.main(["--store", store, "inspect", "redis"]) == 1
    assert "no such file or stored image: redis" in capsys.readouterr().err


def test_cli_export_to_a_file_is_a_clear_sentence(tmp_path, capsys):
    oci.save_docker(sample_images()[0], tmp_path / "a.tar")
    (tmp_path / "f").write_text("mine")
    assert cli.main(["--store", str(tmp_path / "s"), "export-rootfs", str(tmp_path / "a.tar"), str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"overlaykit export-rootfs: {tmp_path / 'f'}: the destination is a file, not a folder; " \
                          "give a new or empty folder"
    assert (tmp_path / "f").read_text() == "mine"


def _docker_archive_with_config(tmp_path, edit) -> Path:
    oci.save_docker(sample_images()[0], tmp_path / "a.tar")
    files = {}
    with tarfile.open(tmp_path / "a.tar") as tf:
        for m in tf.getmembers():
            if m.isreg():
                files[m.name] = tf.extractfile(m).read()
    manifest = json.loads(files["manifest.json"])
    cfg = json.loads(files[manifest[0]["Config"]])
    edit(cfg)
    del files[manifest[0]["Config"]]
    manifest[0]["Config"] = "config.json"
    files["config.json"] = json.dumps(cfg).encode()
    files["manifest.json"] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (tmp_path / "b.tar").write_bytes(buf.getvalue())
    return tmp_path / "b.tar"


def test_list_typed_labels_name_the_file(tmp_path, capsys):
    path = _docker_archive_with_config(tmp_path, lambda c: c["config"].__setitem__("Labels", ["a=b"]))
    with pytest.raises(LayerError, match=r"b\.tar: config config\.json: .*Labels must be an object of strings"):
        oci.load(path)
    assert cli.main(["--store", str(tmp_path / "s"), "inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "config.json" in err and "Labels" in err and "Traceback" not in err


def test_json_escapes_non_utf8_names(tmp_path, capsys):
    # tarfile keeps undecodable bytes as surrogates; --json must not emit them as lone surrogates
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    layer = Layer.from_tar(make_tar((name, "file", "x"), fmt=tarfile.GNU_FORMAT))
    assert layer.entries()[0].path == name
    oci.save_docker(Image("odd", [layer], history=[History("ADD odd")]), tmp_path / "odd.tar")
    assert cli.main(["--store", str(tmp_path / "s"), "inspect", "--json", str(tmp_path / "odd.tar")]) == 0
    raw = capsys.readouterr().out
    raw.encode("utf-8")  # valid UTF-8: no lone surrogates
    assert "\\ud" not in raw
    assert json.loads(raw)["layers"][0]["added"] == ["caf\\xe9.txt"]


def test_inspect_piped_into_head_exits_quietly(tmp_path):
    items = [(f"d{i // 100}/f{i}", "file", "x") for i in range(20000)]  # output far beyond a pipe buffer
    oci.save_docker(Image("many", [Layer.from_tar(make_tar(*items))], history=[History("ADD")]), tmp_path / "m.tar")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run(f"{sys.executable} -m overlaykit --store {tmp_path / 's'} inspect --json {tmp_path / 'm.tar'}"
                       " | head -1; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.stdout == "{\n"
    assert p.stderr == "" and p.returncode == 0


# --- issue 14, speed and memory: layers are streamed, never held whole ------------------------------------

def _sparse_tar_member(f, name: str, size: int) -> None:
    """A tar member of ``size`` zero bytes written as a hole (no disk used)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, 0
    f.write(ti.tobuf(format=tarfile.PAX_FORMAT))
    f.seek(size + (-size % 512), os.SEEK_CUR)


def _big_docker_archive(path: Path, size: int) -> tuple[int, int]:
    """A docker archive with an uncompressed layer holding a ``size``-byte file of zeros (sparse on disk) and
    a gzip layer holding another; returns the apparent size of the archive and the layers' total."""
    import hashlib
    import zlib
    layer1 = path.parent / "l1.tar"
    with open(layer1, "wb") as f:
        _sparse_tar_member(f, "zeros", size)
        f.write(b"\0" * 1024)
    # the gzip layer: a tar of another zero file, compressed as a stream
    gz = path.parent / "l2.tar.gz"
    diff2 = hashlib.sha256()
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(gz, "wb") as f:
        ti = tarfile.TarInfo("more-zeros")
        ti.size = size
        head = ti.tobuf(format=tarfile.PAX_FORMAT)
        diff2.update(head)
        f.write(comp.compress(head))
        block = bytes(1 << 20)
        left = size + (-size % 512) + 1024
        while left:
            n = min(left, len(block))
            diff2.update(block[:n])
            f.write(comp.compress(block[:n]))
            left -= n
        f.write(comp.flush())
    diff1 = hashlib.sha256()
    with open(layer1, "rb") as f:
        while chunk := f.read(1 << 20):
            diff1.update(chunk)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff1.hexdigest(),
                                                                "sha256:" + diff2.hexdigest()]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["big:1"],
                            "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode()
    with open(path, "wb") as f:
        for name, data in (("config.json", cfg), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            f.write(ti.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512))
        for name, src in (("l1/layer.tar", layer1), ("l2/layer.tar", gz)):
            ti = tarfile.TarInfo(name)
            ti.size = src.stat().st_size
            f.write(ti.tobuf(format=tarfile.PAX_FORMAT))
            if src == layer1:  # zeros with a tar header: copy the header, leave the rest a hole
                with open(src, "rb") as s:
                    f.write(s.read(1536))
                f.seek(ti.size - 1536 + (-ti.size % 512), os.SEEK_CUR)
            else:
                f.write(src.read_bytes() + b"\0" * (-ti.size % 512))
        f.write(b"\0" * 1024)
    layer1.unlink()
    gz.unlink()
    return path.stat().st_size, 2 * size


@pytest.mark.slow
def test_memory_stays_bounded_for_an_archive_much_bigger_than_the_bound(tmp_path):
    bound = 300 << 20
    archive_size, layers = _big_docker_archive(tmp_path / "big.tar", 700 << 20)
    assert layers > 4 * bound // 2  # far more than the bound (the old code held every layer: > 2.8 GB)
    code = f"""
import json, sys
from overlaykit import oci
from overlaykit.images import flatten, inspect
(im,) = oci.load({str(tmp_path / 'big.tar')!r})
report = inspect(im)
flatten(im, {str(tmp_path / 'root')!r})
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
print(json.dumps({{"hwm_kib": hwm, "files": report.content_bytes}}))
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["files"] == layers
    assert (tmp_path / "root/zeros").stat().st_size == 700 << 20
    assert (tmp_path / "root/more-zeros").stat().st_size == 700 << 20
    assert out["hwm_kib"] * 1024 < bound, f"peak RSS {out['hwm_kib'] >> 10} MiB"


def test_inspect_help_says_what_wasted_and_efficiency_mean(capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "wasted (ours): file bytes stored in some layer that the final root filesystem never shows" in text
    assert "efficiency (ours): bytes visible in the final root filesystem / all file bytes stored" in text
    assert "dive's definitions" in text and "surviving copy included" in text and "opaque markers ignored" in text
    assert "tar size" in text and "file bytes" in text and "backslashreplace" in text
