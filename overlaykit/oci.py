"""Image archives on disk: ``docker save`` tars, OCI image layouts and OCI archives, in and out.

Archives are untrusted: nothing is extracted; blobs are read by name, every digest and size in a
manifest is checked, and a missing or wrong blob is a ``LayerError`` naming it. Exports are
deterministic (sorted JSON, fixed tar metadata, reproducible gzip/zstd), so the same image always gives
the same digests.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

from . import tarstream
from .images import (MAX_LAYER_BYTES, Image, Layer, LayerError, flatten, image_from_config, inspect,
                     normalize_path, sha256_digest)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"

_LAYER_MEDIA = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_MAX_JSON = 16 << 20


# --------------------------------------------------------------------------------------------------
# reading


class _Source:
    """Files of an archive (tar) or a directory, read by normalized name and never extracted.

    An archive is indexed once (member name -> offset and size); blobs are then read straight from the
    file as ``tarstream.FileSource`` regions, so no layer is ever held in memory. A compressed archive
    (``docker save | gzip``) is first decompressed, as a stream, into a temporary file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file: tarstream.FileSource | None = None
        self._members: dict[str, tuple[int, int]] = {}
        if path.is_dir():
            return
        src = tarstream.FileSource.open(path)
        compression = tarstream.detect(src.pread(4, 0))
        if compression != "none":
            tmp = tempfile.TemporaryFile()
            for c in tarstream.decompressed(src.chunks(), compression, max_size=1 << 44, what=str(path)):
                tmp.write(c)
            tmp.flush()
            src = tarstream.FileSource.spooled(tmp)
        self._file = src
        try:
            with open(f"/proc/self/fd/{src.file.fd}", "rb") as f:
                for ti in tarfile.open(fileobj=f, mode="r:"):
                    if ti.isreg():
                        self._members[normalize_path(ti.name, what=f"{path}: member")] = (ti.offset_data, ti.size)
        except tarfile.TarError as e:
            raise LayerError(f"{path}: not a readable tar archive: {e}") from None
        for name, (off, size) in self._members.items():
            if off + size > src.size:
                raise LayerError(f"{path}: {name} is truncated")

    def exists(self, name: str) -> bool:
        name = normalize_path(name, what=f"{self.path}: reference")
        if self._file is None:
            p = self.path / name
            return p.is_file() and not p.is_symlink()
        return name in self._members

    def source(self, name: str, what: str) -> tarstream.Source:
        name = normalize_path(name, what=f"{self.path}: {what}")
        if self._file is None:
            p = self.path / name
            if p.is_symlink() or not p.is_file():
                raise LayerError(f"{self.path}: {what} {name} is missing")
            return tarstream.FileSource.open(p)
        m = self._members.get(name)
        if m is None:
            raise LayerError(f"{self.path}: {what} {name} is missing from the archive")
        return self._file.region(*m)

    def read(self, name: str, what: str) -> bytes:
        src = self.source(name, what)
        if src.size > _MAX_JSON:
            raise LayerError(f"{self.path}: {what} {name} is too large for a JSON document")
        data = src.read_all()
        if len(data) != src.size:
            raise LayerError(f"{self.path}: {what} {name} is truncated")
        return data

    def json(self, name: str, what: str):
        data = self.read(name, what)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise LayerError(f"{self.path}: {what} {name} is not valid JSON: {e}") from None

    def blob_source(self, desc, what: str) -> tarstream.Source:
        """A blob named by a descriptor, checked against its digest and size (streamed, not loaded)."""
        if not isinstance(desc, dict):
            raise LayerError(f"{self.path}: {what} descriptor is not an object")
        digest = desc.get("digest")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise LayerError(f"{self.path}: {what} has an invalid digest {digest!r}")
        algo, hexd = digest.split(":")
        name = f"blobs/{algo}/{hexd}"
        if not self.exists(name):
            raise LayerError(f"{self.path}: {what} blob {digest} is missing")
        src = self.source(name, f"{what} blob")
        size = desc.get("size")
        if size is not None and size != src.size:
            raise LayerError(f"{self.path}: {what} blob {digest} has size {src.size}, descriptor says {size}")
        h = hashlib.new(algo)
        for c in src.chunks():
            h.update(c)
        actual = f"{algo}:{h.hexdigest()}"
        if actual != digest:
            raise LayerError(f"{self.path}: {what} blob {digest} has the wrong digest (content is {actual})")
        return src

    def blob(self, desc, what: str) -> bytes:
        src = self.blob_source(desc, what)
        if src.size > _MAX_JSON:
            raise LayerError(f"{self.path}: {what} is too large for a JSON document")
        return src.read_all()


def load(path, *, max_layer_size: int = MAX_LAYER_BYTES) -> list[Image]:
    """Read every image in a ``docker save`` tar, an OCI image layout directory or an OCI archive."""
    path = Path(path)
    if not path.exists():
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    src = _Source(path)
    if src.exists("manifest.json"):
        return _load_docker(src, max_layer_size)
    if src.exists("index.json"):
        return _load_oci(src, max_layer_size)
    raise LayerError(f"{path}: neither a docker save archive (manifest.json) nor an OCI layout (index.json)")


def _layer(src: tarstream.Source, compression: str | None, what: str, max_size: int,
           digest: str | None = None) -> Layer:
    try:
        return Layer.from_source(src, compression=compression, max_size=max_size, what=what, digest=digest)
    except LayerError as e:
        raise LayerError(f"{what}: {e}") from None


def _load_docker(src: _Source, max_size: int) -> list[Image]:
    manifest = src.json("manifest.json", "manifest")
    if not isinstance(manifest, list):
        raise LayerError(f"{src.path}: manifest.json is not a list")
    images, cache = [], {}
    for n, m in enumerate(manifest):
        if not isinstance(m, dict) or not isinstance(m.get("Config"), str) or not isinstance(m.get("Layers"), list):
            raise LayerError(f"{src.path}: manifest.json entry {n} needs Config and Layers")
        cfg_bytes = src.read(m["Config"], "config")
        hexname = Path(m["Config"]).name.removesuffix(".json")
        if re.fullmatch(r"[a-f0-9]{64}", hexname) and hashlib.sha256(cfg_bytes).hexdigest() != hexname:
            raise LayerError(f"{src.path}: config {m['Config']} has the wrong digest "
                             f"(content is sha256:{hashlib.sha256(cfg_bytes).hexdigest()})")
        try:
            cfg = json.loads(cfg_bytes)
        except ValueError as e:
            raise LayerError(f"{src.path}: config {m['Config']} is not valid JSON: {e}") from None
        layers = []
        for i, lp in enumerate(m["Layers"]):
            if not isinstance(lp, str):
                raise LayerError(f"{src.path}: manifest.json entry {n}: layer {i} is not a path")
            if lp not in cache:
                cache[lp] = _layer(src.source(lp, "layer"), None, f"{src.path}: layer {lp}", max_size)
            layers.append(cache[lp])
        tags = [t for t in m.get("RepoTags") or [] if isinstance(t, str)]
        name = tags[0] if tags else sha256_digest(cfg_bytes)
        try:
            images.append(image_from_config(name, cfg, layers))
        except LayerError as e:
            raise LayerError(f"{src.path}: config {m['Config']}: {e}") from None
    return images


def _load_oci(src: _Source, max_size: int) -> list[Image]:
    if src.exists("oci-layout"):
        layout = src.json("oci-layout", "oci-layout")
        if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
            raise LayerError(f"{src.path}: oci-layout has no imageLayoutVersion")
    index = src.json("index.json", "index")
    images: list[Image] = []
    _walk_index(src, index, "index.json", None, images, max_size, depth=0)
    return images


def _walk_index(src, index, what, name, images, max_size, depth):
    if depth > 4:
        raise LayerError(f"{src.path}: image indexes nested too deeply")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise LayerError(f"{src.path}: {what} has no manifests list")
    descs = index["manifests"]
    if depth > 0:  # a multi-platform index: take linux/amd64 (or the only one)
        plat = [d for d in descs if isinstance(d, dict)
                and (d.get("platform") or {}).get("architecture") == "amd64"
                and (d.get("platform") or {}).get("os") == "linux"]
        descs = plat[:1] or descs[:1]
    for i, desc in enumerate(descs):
        if not isinstance(desc, dict):
            raise LayerError(f"{src.path}: {what} entry {i} is not a descriptor")
        ann = desc.get("annotations") or {}
        nm = name or ann.get(REF_NAME) or ann.get("io.containerd.image.name") or desc.get("digest", "?")
        mt = desc.get("mediaType")
        data = src.blob(desc, f"manifest {i} of {what}")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise LayerError(f"{src.path}: manifest {desc.get('digest')} is not valid JSON: {e}") from None
        mt = mt or doc.get("mediaType")
        if mt in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
            _walk_index(src, doc, f"index {desc['digest']}", nm, images, max_size, depth + 1)
        elif mt in (OCI_MANIFEST, DOCKER_MANIFEST, None):
            images.append(_load_manifest(src, doc, nm, max_size))
        else:
            raise LayerError(f"{src.path}: {what} entry {i} has unsupported media type {mt!r}")


def _load_manifest(src: _Source, m, name: str, max_size: int) -> Image:
    if not isinstance(m, dict) or not isinstance(m.get("layers"), list):
        raise LayerError(f"{src.path}: manifest of {name} has no layers list")
    cfg_bytes = src.blob(m.get("config"), f"config of {name}")
    try:
        cfg = json.loads(cfg_bytes)
    except ValueError as e:
        raise LayerError(f"{src.path}: config of {name} is not valid JSON: {e}") from None
    layers = []
    for i, desc in enumerate(m["layers"]):
        mt = desc.get("mediaType") if isinstance(desc, dict) else None
        if mt not in _LAYER_MEDIA:
            raise LayerError(f"{src.path}: layer {i} of {name} has unsupported media type {mt!r}")
        blob = src.blob_source(desc, f"layer {i} of {name}")
        layers.append(_layer(blob, _LAYER_MEDIA[mt], f"{src.path}: layer {i} ({desc['digest']}) of {name}",
                             max_size, digest=desc["digest"]))
    try:
        return image_from_config(name, cfg, layers)
    except LayerError as e:
        raise LayerError(f"{src.path}: config {m['config'].get('digest')}: {e}") from None


# --------------------------------------------------------------------------------------------------
# writing


def _dumps(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _as_list(images) -> list[Image]:
    return [images] if isinstance(images, Image) else list(images)


def _convert(layer: Layer, compression: str | None) -> Layer:
    return layer if compression is None else layer.with_compression(compression)


def oci_layout_files(images, compression: str | None = None) -> dict:
    """The files of an OCI image layout (bytes, or a ``tarstream.Source`` for a layer blob).
    ``compression`` None keeps each layer's own blob."""
    files: dict[str, bytes] = {"oci-layout": _dumps({"imageLayoutVersion": "1.0.0"})}
    manifests = []

    def put(data: bytes) -> str:
        d = sha256_digest(data)
        files[f"blobs/sha256/{d[7:]}"] = data
        return d

    for im in _as_list(images):
        cfg = im.config_bytes()
        layers = [_convert(l, compression) for l in im.layers]
        for l in layers:
            files[f"blobs/sha256/{l.digest[7:]}"] = l._blob()  # streamed when written
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": put(cfg), "size": len(cfg)},
                    "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.blob_size}
                               for l in layers]}
        mb = _dumps(manifest)
        manifests.append({"mediaType": OCI_MANIFEST, "digest": put(mb), "size": len(mb),
                          "annotations": {REF_NAME: im.name}})
    files["index.json"] = _dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    return files


def docker_archive_files(images, compression: str = "none") -> dict:
    """The files of a ``docker save`` archive (modern form: manifest.json + config + layer tars)."""
    files: dict[str, bytes] = {}
    manifest, repositories = [], {}
    for im in _as_list(images):
        cfg = im.config_bytes()
        cfg_name = sha256_digest(cfg)[7:] + ".json"
        files[cfg_name] = cfg
        paths = []
        for l in im.layers:
            l = _convert(l, compression)
            p = l.diff_id[7:] + "/layer.tar"
            files[p] = l._blob()  # streamed when written
            paths.append(p)
        tag = docker_tag(im.name)
        manifest.append({"Config": cfg_name, "RepoTags": [tag] if tag else None, "Layers": paths})
        if tag and im.layers:
            repo, _, t = tag.rpartition(":")
            repositories.setdefault(repo, {})[t] = im.layers[-1].diff_id[7:]
    files["manifest.json"] = _dumps(manifest)
    if repositories:
        files["repositories"] = _dumps(repositories)
    return files


def docker_tag(name: str) -> str | None:
    """``name`` as a docker RepoTag (``repo:tag``), or None if it is a bare digest."""
    if not name or name.startswith("sha256:"):
        return None
    return name if ":" in name.rpartition("/")[2] else name + ":latest"


def _write_dir(files: dict, dest: Path) -> None:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(dest))
    for rel, data in sorted(files.items()):
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            for c in ([data] if isinstance(data, bytes) else data.chunks()):
                f.write(c)


def _write_tar(files: dict, path: Path) -> None:
    dirs = sorted({str(Path(r).parents[i]) for r in files for i in range(len(Path(r).parts) - 1)})
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d + "/")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(ti)
        for rel, data in sorted(files.items()):
            ti = tarfile.TarInfo(rel)
            ti.mode, ti.mtime = 0o644, 0
            if isinstance(data, bytes):
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.size = data.size
                tf.addfile(ti, tarstream.ChunkReader(data.chunks()))


def save_oci_layout(images, dest, *, compression: str | None = None) -> None:
    _write_dir(oci_layout_files(images, compression), Path(dest))


def save_oci_archive(images, path, *, compression: str | None = None) -> None:
    _write_tar(oci_layout_files(images, compression), Path(path))


def save_docker(images, path, *, compression: str = "none") -> None:
    _write_tar(docker_archive_files(images, compression), Path(path))


# --------------------------------------------------------------------------------------------------
# command line helpers (overlaykit/cli.py calls these)


_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".oci", ".docker")


def _looks_like_path(ref: str) -> bool:
    from .refs import is_reference
    return ref.startswith(("/", "./", "../", "~")) or ref.lower().endswith(_ARCHIVE_SUFFIXES) or not is_reference(ref)


def resolve_image(ref: str, *, name: str | None = None, store=None) -> Image:
    """An image from an archive/layout path (``name`` picks one of several) or from a store by name."""
    p = Path(ref)
    if ref and p.exists():
        images = load(p)
        if name is not None:
            for im in images:
                if im.name == name or im.name == f"{name}:latest":
                    return im
            raise LookupError(f"{ref}: no image named {name!r} (have: {', '.join(im.name for im in images)})")
        if len(images) != 1:
            raise LookupError(f"{ref} holds {len(images)} images; pick one by name: "
                              f"{', '.join(im.name for im in images) or 'none'}")
        return images[0]
    if _looks_like_path(ref) or store is None:
        raise LookupError(f"no such file: {ref}")
    from .images import Store
    st = store if isinstance(store, Store) else Store(store)
    try:
        return st.image(ref)
    except KeyError:
        have = ", ".join(im.name for im in st.images()) or "none"
        raise LookupError(f"no such file or stored image: {ref} (the store {st.root} has: {have})") from None


def error_text(e: BaseException) -> str:
    """One clear sentence for the command line: 'PATH: what is wrong' rather than '[Errno N] ...'."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        if e.errno == errno.ENOENT:
            return f"no such file: {e.filename}"
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e)


def cli_inspect(image: str, *, as_json: bool = False, name: str | None = None, store=None,
                out=None, err=None) -> int:
    """``python -m overlaykit inspect IMAGE [--json]``; returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        report = inspect(resolve_image(image, name=name, store=store))
    except (OSError, LookupError, ValueError) as e:
        print(f"overlaykit inspect: {error_text(e)}", file=err)
        return 1
    if as_json:
        json.dump(report.to_json(), out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        print(report.render(), file=out)
    return 0


def cli_export_rootfs(image: str, dest: str, *, name: str | None = None, store=None, out=None, err=None) -> int:
    """``python -m overlaykit export-rootfs IMAGE DEST``: flatten into DEST (which must be empty or new)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        im = resolve_image(image, name=name, store=store)
        warnings = flatten(im, Path(dest))
    except (OSError, LookupError, ValueError) as e:
        print(f"overlaykit export-rootfs: {error_text(e)}", file=err)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=err)
    print(f"{im.name}: {len(im.layers)} layers flattened into {dest}", file=out)
    return 0


SAVE_FORMATS = ("oci", "oci-layout", "docker")


def save(images, dest, *, format: str = "oci", compression: str | None = None) -> None:
    """Write ``images`` as an OCI archive, an OCI image layout folder or a ``docker save`` archive.

    The result appears atomically: it is written to a temporary sibling and renamed into place.
    ``compression`` None keeps each layer's blob as it is (docker archives: uncompressed).
    """
    from .images import _rmtree_force
    from .refs import check_reference
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown format {format!r} (expected {', '.join(SAVE_FORMATS)})")
    if compression not in (None, "none", "gzip", "zstd"):
        raise ValueError(f"unknown compression {compression!r} (expected gzip, zstd or none)")
    for im in _as_list(images):
        check_reference(im.name)
    dest = Path(dest)
    if os.path.lexists(dest) and (format != "oci-layout" or not dest.is_dir() or dest.is_symlink()
                                  or any(dest.iterdir())):
        raise FileExistsError(errno.EEXIST, "already exists; give a new path" + (
            " or an empty folder" if format == "oci-layout" else ""), str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.save-{os.getpid()}"
    try:
        if format == "oci-layout":
            save_oci_layout(images, tmp, compression=compression)
        elif format == "oci":
            save_oci_archive(images, tmp, compression=compression)
        else:
            save_docker(images, tmp, compression=compression or "none")
        os.replace(tmp, dest) if format != "oci-layout" else os.rename(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            _rmtree_force(tmp)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def cli_save(image: str, output: str, *, format: str = "oci", compression: str | None = None,
             name: str | None = None, store=None, out=None, err=None) -> int:
    """``overlaykit save NAME -o FILE --format oci|oci-layout|docker [--compression gzip|zstd|none]``."""
    from .refs import check_reference
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if not image or not Path(image).exists():
            check_reference(image)
        im = resolve_image(image, name=name, store=store)
        save(im, output, format=format, compression=compression)
    except (OSError, LookupError, ValueError) as e:
        print(f"overlaykit save: {error_text(e)}", file=err)
        return 1
    print(f"{im.name}: {len(im.layers)} layers saved to {output} ({format}"
          f"{', ' + compression if compression else ''})", file=out)
    return 0
