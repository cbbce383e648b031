"""Docker's on-disk layout (overlay2 storage driver) rebuilt from an overlaykit image and container.

`rebuild` writes, under a scratch folder, what ``/var/lib/docker`` holds for one image and one container
made from it, with the names and file formats of moby's source:

* ``image/overlay2/layerdb/sha256/<chainID>/`` per image layer: ``diff`` (the layer's diff_id),
  ``size`` (bytes of its files, decimal), ``cache-id`` (the overlay2 directory that holds the files) and,
  except for the bottom layer, ``parent`` (the ChainID below).  moby ``layer/filestore.go`` (``SetDiffID``,
  ``SetSize``, ``SetCacheID``, ``SetParent``); the layer store is keyed by ChainID, not diff_id
  (``layer/layer_store.go``), so one diff_id on two different parents is stored twice.  Not written:
  ``tar-split.json.gz`` (tar headers to recreate the exact layer tar for ``docker save``/``push``).
* ``image/overlay2/layerdb/mounts/<container-id>/`` with ``mount-id``, ``init-id`` and ``parent``
  (``layer/filestore.go``: ``SetMountID``, ``SetInitID``, ``SetMountParent``).
* ``overlay2/<cache-id>/`` per layer: ``diff/`` (the files), ``link`` (a 26-character id) and, above the
  bottom layer, ``lower`` (``l/<link>`` of every layer below, top first, ``:``-separated) and ``work/``;
  a parent gets an empty ``committed`` file when a child is created.  ``overlay2/l/<link>`` is a symlink
  ``../<cache-id>/diff``: short names keep the mount options within one page for up to 128 lowers.
  ``merged/`` exists while the layer is mounted.  moby ``daemon/graphdriver/overlay2/overlay.go``
  (``create``, ``getLower``, ``GetMetadata``; ``idLength = 26``, ``linkDir = "l"``).
* the init layer ``overlay2/<mount-id>-init/``: a read-only layer between the image and the container
  holding ``/.dockerenv``, ``/etc/hosts``, ``/etc/hostname``, ``/etc/resolv.conf``, ``/dev/console``
  (empty files, mode 0755), ``/etc/mtab -> /proc/mounts`` and the mount points ``/dev/pts``,
  ``/dev/shm``, ``/proc``, ``/sys`` (moby ``daemon/initlayer/setup_unix.go``; the ``-init`` name:
  ``layer/layer_store.go`` ``initMount``);
* the container's writable layer ``overlay2/<mount-id>/`` whose ``diff/`` is the container's upper/.

``docker inspect``'s ``GraphDriver.Data`` (LowerDir, UpperDir, WorkDir, MergedDir) is `graph_driver`,
and ``docker ps -s``'s SIZE column is `ps_size`: the writable layer's bytes, then "virtual" = image
layers' bytes + writable layer (moby ``daemon/images/image_unix.go`` ``GetContainerLayerSize``; Docker's
docs, "Container size on disk", https://docs.docker.com/engine/storage/drivers/).

Docker draws cache ids, mount ids, container ids (64 hex digits) and links (base32 of random bytes,
``overlayutils/randomid.go``) at random.  Here every one is derived from ``seed`` with sha256, so the
layout, its tree and its diagram are the same on every run and machine: same formats, not Docker's values.

Example::

    >>> from overlaykit import course, dockerroot
    >>> img = course.image_from_layers("demo", [("ADD rootfs", course.layer_from_files({"etc/os": "x\\n"}))])
    >>> layout = dockerroot.rebuild(img, "/tmp/ok-docker")    # the image and a fresh container
    >>> print(layout.graph_driver["UpperDir"])                 # doctest: +ELLIPSIS
    /var/lib/docker/overlay2/8696d80fc3d4.../diff
    >>> layout.ps_size()
    '0B (virtual 2B)'
    >>> print(layout.tree())                   # doctest: +SKIP
    /var/lib/docker/
    ├── image/
    ...
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat as st
from dataclasses import dataclass, field
from pathlib import Path

from . import ondisk

#: Where Docker keeps its state; the rebuilt tree mirrors it under ``dest``.
DOCKER_ROOT = "/var/lib/docker"
#: overlay2's short link length (``idLength`` in overlay.go).
LINK_LENGTH = 26
#: Files and mount points the init layer adds (daemon/initlayer/setup_unix.go): path -> dir, file or link target.
INIT_ENTRIES = {"/dev/pts": "dir", "/dev/shm": "dir", "/proc": "dir", "/sys": "dir", "/.dockerenv": "file",
                "/etc/resolv.conf": "file", "/etc/hosts": "file", "/etc/hostname": "file",
                "/dev/console": "file", "/etc/mtab": "/proc/mounts"}


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID of each layer: ChainID(L0) = diff_id(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + diff_id(Ln)).

    OCI image-spec ``config.md`` ("Layer ChainID").
    """
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def derived_id(seed: str, what: str) -> str:
    """64 hex digits from ``seed`` and ``what`` (Docker's ids are random; these are reproducible)."""
    return hashlib.sha256(f"overlaykit-dockerroot/{seed}/{what}".encode()).hexdigest()


def derived_link(seed: str, cache_id: str) -> str:
    """A 26-character link name in Docker's alphabet (base32: A-Z and 2-7), derived from ``seed``."""
    raw = hashlib.sha256(f"overlaykit-dockerroot/{seed}/link/{cache_id}".encode()).digest()
    return base64.b32encode(raw).decode()[:LINK_LENGTH]


@dataclass
class LayerRecord:
    """One image layer as Docker stores it: layerdb entry and overlay2 directory."""

    index: int
    diff_id: str
    chain_id: str
    parent: str | None
    cache_id: str
    link: str
    size: int          # layerdb ``size``: bytes of the layer's regular files
    created_by: str = ""


@dataclass
class DockerLayout:
    """A rebuilt ``/var/lib/docker`` under ``root`` (``root/var/lib/docker/...``) and what it describes."""

    root: Path
    image_name: str
    layers: list[LayerRecord]
    container_id: str | None = None
    mount_id: str | None = None
    init_link: str | None = None
    mount_link: str | None = None
    encoding: ondisk.Encoding = field(default_factory=lambda: ondisk.Encoding("kernel", ondisk.default_xattr_ns()))

    # -- paths --------------------------------------------------------------------------------------
    @property
    def docker(self) -> Path:
        """The rebuilt ``/var/lib/docker`` (under the scratch folder)."""
        return self.root / DOCKER_ROOT.lstrip("/")

    def overlay2(self, cache_id: str) -> Path:
        return self.docker / "overlay2" / cache_id

    def layerdb(self, chain_id: str) -> Path:
        return self.docker / "image" / "overlay2" / "layerdb" / "sha256" / chain_id.split(":", 1)[1]

    @property
    def init_id(self) -> str | None:
        return f"{self.mount_id}-init" if self.mount_id else None

    # -- what docker prints -------------------------------------------------------------------------
    @property
    def size_rw(self) -> int:
        """``SizeRw``: bytes of regular files in the container layer's diff/, measured now (moby
        ``directory.Size``, each inode once), so it follows what the container writes."""
        if self.mount_id is None:
            return 0
        return _files_bytes(self.overlay2(self.mount_id) / "diff")

    @property
    def image_size(self) -> int:
        """Bytes of files in all image layers (``docker image ls`` SIZE, as the layer store counts it)."""
        return sum(l.size for l in self.layers)

    @property
    def virtual_size(self) -> int:
        """``SizeRootFs``: the image layers plus the writable layer."""
        return self.image_size + self.size_rw

    def ps_size(self) -> str:
        """The SIZE column of ``docker ps -s``: ``2B (virtual 183MB)`` (docker/cli uses 3 significant digits)."""
        return f"{go_human_size(self.size_rw)} (virtual {go_human_size(self.virtual_size)})"

    @property
    def graph_driver(self) -> dict[str, str]:
        """``docker inspect``'s GraphDriver.Data for the container (overlay.go ``GetMetadata``), Docker's paths."""
        if self.mount_id is None:
            raise ValueError("no container: rebuild(image, dest, container=...) lays out a container's layers")
        base = f"{DOCKER_ROOT}/overlay2"
        lowers = [f"{base}/{self.init_id}/diff"] + [f"{base}/{l.cache_id}/diff" for l in reversed(self.layers)]
        return {"LowerDir": ":".join(lowers), "MergedDir": f"{base}/{self.mount_id}/merged",
                "UpperDir": f"{base}/{self.mount_id}/diff", "WorkDir": f"{base}/{self.mount_id}/work"}

    def inspect(self) -> dict:
        """The GraphDriver part of ``docker inspect <container>``."""
        return {"GraphDriver": {"Data": self.graph_driver, "Name": "overlay2"}}

    def mount_options(self) -> str:
        """The options overlay2 passes to mount(2), relative to ``overlay2/`` (overlay.go ``Get``, ``mountFrom``)."""
        lower = (self.overlay2(self.mount_id) / "lower").read_text()
        return f"lowerdir={lower},upperdir={self.mount_id}/diff,workdir={self.mount_id}/work"

    # -- showing it ---------------------------------------------------------------------------------
    def short(self, ident: str) -> str:
        """An id cut to 12 characters, as docker prints them (``-init`` kept)."""
        ident = ident.split(":", 1)[-1]
        return ident[:12] + ("-init" if ident.endswith("-init") else "")

    def tree(self, *, full_ids: bool = False, show_diff: bool = True) -> str:
        """``/var/lib/docker`` as a tree: every folder and small file with its content (ids cut to 12)."""
        name = (lambda s: s) if full_ids else self._shorten
        lines = [DOCKER_ROOT + "/"]

        def visit(d: Path, prefix: str, depth: int) -> None:
            entries = sorted(os.listdir(d))
            for i, n in enumerate(entries):
                p = d / n
                last = i == len(entries) - 1
                branch = prefix + ("└── " if last else "├── ")
                s = os.lstat(p)
                label = name(n)
                if st.S_ISLNK(s.st_mode):
                    lines.append(f"{branch}{label} -> {name(os.readlink(p))}")
                elif st.S_ISDIR(s.st_mode):
                    inner = self._dir_note(p)
                    lines.append(f"{branch}{label}/{inner}")
                    if inner == "" or (show_diff and n == "diff" and self._small_diff(p)):
                        visit(p, prefix + ("    " if last else "│   "), depth + 1)
                elif st.S_ISCHR(s.st_mode):
                    lines.append(f"{branch}{label} (whiteout)")
                else:
                    lines.append(f"{branch}{label}{self._file_note(p, n)}")

        visit(self.docker, "", 0)
        return "\n".join(lines)

    def _shorten(self, text: str) -> str:
        import re
        return re.sub(r"[0-9a-f]{64}", lambda m: m.group(0)[:12], text)

    def _small_diff(self, p: Path) -> bool:
        """Only the init layer's and the container's diff/ are listed file by file."""
        owner = p.parent.name
        return owner == self.init_id or owner == self.mount_id

    def _dir_note(self, p: Path) -> str:
        if p.name == "diff" and not self._small_diff(p):
            n = sum(len(f) + len(d) for _, d, f in os.walk(p))
            return f"  ({n} entries: the layer's files)"
        if p.name in ("work", "merged") and not os.listdir(p):
            return "  (empty)" if p.name == "work" else "  (mount point)"
        return ""

    def _file_note(self, p: Path, n: str) -> str:
        s = os.lstat(p)
        if n in ("diff", "size", "cache-id", "parent", "link", "lower", "mount-id", "init-id") \
                and s.st_size <= 4096 and p.parent.parent.name != "diff":
            text = p.read_text()
            return f"  = {self._shorten(text) if len(text) < 300 else text[:60] + '...'}"
        return f"  ({s.st_size} B)" if s.st_size else "  (empty)"

    def diagram(self):
        """Layerdb entries (ChainID) -> overlay2 directories (cache-id) -> the container's mount, as a Diagram."""
        from .diagrams import Diagram, _digraph
        text = self._diagram_text()
        title = (f"Docker's layout: {len(self.layers)} image layer{'s' if len(self.layers) != 1 else ''}"
                 + (", init layer, container layer" if self.mount_id else ""))
        g = _digraph("docker", f"{DOCKER_ROOT} for {self.image_name}", rankdir="LR")
        if g is None:
            return Diagram(title, None, text)
        with g.subgraph(name="cluster_layerdb") as c:
            c.attr(label="image/overlay2/layerdb/sha256/<ChainID>", style="rounded", color="#94a3b8")
            for l in self.layers:
                c.node(f"db{l.index}", f"ChainID {self.short(l.chain_id)}\\ndiff {self.short(l.diff_id)}\\n"
                                       f"size {l.size}", fillcolor="#eef2ff")
            if self.mount_id:
                c.node("mounts", f"mounts/{self.short(self.container_id)}\\nmount-id, init-id, parent",
                       fillcolor="#fef3c7")
        with g.subgraph(name="cluster_overlay2") as c:
            c.attr(label="overlay2/<cache-id>  (diff/, link, lower, work/)", style="rounded", color="#94a3b8")
            if self.mount_id:
                c.node("rw", f"{self.short(self.mount_id)}/diff\\ncontainer layer (upperdir)\\nl/{self.mount_link[:6]}…",
                       fillcolor="#dcfce7")
                c.node("init", f"{self.short(self.init_id)}/diff\\ninit layer\\nl/{self.init_link[:6]}…",
                       fillcolor="#fef9c3")
            for l in reversed(self.layers):
                c.node(f"ov{l.index}", f"{self.short(l.cache_id)}/diff\\nlayer {l.index}\\nl/{l.link[:6]}…",
                       fillcolor="#f1f5f9")
        for l in self.layers:
            g.edge(f"db{l.index}", f"ov{l.index}", label="cache-id")
            if l.index:
                g.edge(f"db{l.index}", f"db{l.index - 1}", label="parent", style="dashed")
        if self.mount_id:
            g.node("merged", f"{self.short(self.mount_id)}/merged\\nthe container's /", shape="folder",
                   fillcolor="#e0f2fe")
            g.edge("mounts", "rw", label="mount-id")
            g.edge("mounts", "init", label="init-id")
            g.edge("mounts", f"db{len(self.layers) - 1}", label="parent", style="dashed")
            g.edge("rw", "merged", label="upperdir")
            g.edge("init", "merged", label="lowerdir 1")
            for k, l in enumerate(reversed(self.layers), 2):
                g.edge(f"ov{l.index}", "merged", label=f"lowerdir {k}", color="#94a3b8")
        return Diagram(title, g.source, text)

    def _diagram_text(self) -> str:
        rows = [f"layerdb ChainID {self.short(l.chain_id)} (diff {self.short(l.diff_id)}) -> cache-id "
                f"{self.short(l.cache_id)} -> overlay2/{self.short(l.cache_id)}/diff" for l in self.layers]
        if self.mount_id:
            rows.append(f"container {self.short(self.container_id)}: upperdir overlay2/{self.short(self.mount_id)}/diff,"
                        f" lowerdirs {self.short(self.init_id)} then the image layers top first")
        return "\n".join(rows)

    def overlay(self, *, backend: str = "auto"):
        """An `Overlay` over the rebuilt container layers, as overlay2 mounts them (merged/ = the container's /)."""
        from .engine import Overlay
        if self.mount_id is None:
            raise ValueError("no container in this layout")
        lowers = [self.overlay2(self.init_id) / "diff"] + [self.overlay2(l.cache_id) / "diff"
                                                           for l in reversed(self.layers)]
        c = self.overlay2(self.mount_id)
        ov = Overlay(lowers, c / "diff", c / "work", merged=c / "merged", backend=backend, encoding=self.encoding)
        ov.layer_names = ["init layer"] + [f"layer {l.index} · {l.diff_id[7:19]}" for l in reversed(self.layers)]
        return ov


def go_human_size(n: int) -> str:
    """go-units ``HumanSizeWithPrecision(n, 3)``: decimal units, 3 significant digits, no space (``183MB``)."""
    x, units = float(n), ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while x >= 1000 and i < len(units) - 1:
        x /= 1000
        i += 1
    return f"{x:.3g}{units[i]}"


def _write(p: Path, text: str, mode: int = 0o644) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, p)


def _files_bytes(root: Path) -> int:
    """Bytes of regular files under ``root``, each inode once (moby ``directory.Size``)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            s = os.lstat(os.path.join(dirpath, f))
            if st.S_ISREG(s.st_mode) and (s.st_dev, s.st_ino) not in seen:
                seen.add((s.st_dev, s.st_ino))
                total += s.st_size
    return total


def _init_layer(diff: Path) -> None:
    """What daemon/initlayer/setup_unix.go writes into the init layer's diff/."""
    for path, kind in INIT_ENTRIES.items():
        p = diff / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(p.parent, 0o755)
        if kind == "dir":
            p.mkdir(mode=0o755, exist_ok=True)
        elif kind == "file":
            p.touch()
            os.chmod(p, 0o755)
        else:
            os.symlink(kind, p)


def rebuild(image, dest, *, container=None, seed: str = "overlaykit", name: str = "container") -> DockerLayout:
    """Write Docker's layout for ``image`` (an `images.Image`) under ``dest`` and return it.

    With ``container`` (an `images.Container` of that image, mounted or not) its upper/ becomes the
    container layer's ``diff/``; without, an empty container layer is laid out (a fresh ``docker create``).
    Pass ``container=False`` for the image layers only.  ``dest`` is emptied first; the tree is built
    in a temporary sibling and renamed into place.
    """
    from .images import Layer
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        enc = ondisk.probe(tmp)
        layout = _lay_out(image, tmp, enc, container, seed, name, Layer)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    layout.root = dest
    return layout


def _lay_out(image, root: Path, enc, container, seed, name, Layer) -> DockerLayout:
    diff_ids = [l.diff_id for l in image.layers]
    chains = chain_ids(diff_ids)
    history = image.layer_history() if hasattr(image, "layer_history") else [None] * len(diff_ids)
    records = []
    for i, (layer, chain) in enumerate(zip(image.layers, chains)):
        cache = derived_id(seed, f"cache-id/{chain}")
        h = history[i] if i < len(history) else None
        records.append(LayerRecord(i, layer.diff_id, chain, chains[i - 1] if i else None, cache,
                                   derived_link(seed, cache), layer.content_size,
                                   getattr(h, "created_by", "") or ""))
    layout = DockerLayout(root, image.name, records, encoding=enc)
    docker = layout.docker
    links = docker / "overlay2" / "l"
    links.mkdir(parents=True)
    os.chmod(docker / "overlay2", 0o710)
    os.chmod(links, 0o700)

    def driver_create(cache_id: str, link: str, parent: str | None) -> Path:
        """overlay.go ``create``: diff/, link, l/<link>; with a parent also work/, lower, parent's committed."""
        d = docker / "overlay2" / cache_id
        (d / "diff").mkdir(parents=True)
        os.chmod(d, 0o710)
        os.symlink(f"../{cache_id}/diff", links / link)
        _write(d / "link", link)
        if parent is not None:
            (d / "work").mkdir(mode=0o700)
            pd = docker / "overlay2" / parent
            _write(pd / "committed", "", 0o600)
            lower = f"l/{(pd / 'link').read_text()}"
            if (pd / "lower").exists():
                lower += ":" + (pd / "lower").read_text()
            _write(d / "lower", lower)
        return d

    prev_cache = None
    for r, layer in zip(records, image.layers):
        d = driver_create(r.cache_id, r.link, prev_cache)
        parents = [layout.overlay2(x.cache_id) / "diff" for x in reversed(records[:r.index])]
        layer.unpack(d / "diff", enc, parents=parents)
        db = layout.layerdb(r.chain_id)
        _write(db / "diff", r.diff_id)
        _write(db / "size", str(r.size))
        _write(db / "cache-id", r.cache_id)
        if r.parent:
            _write(db / "parent", r.parent)
        prev_cache = r.cache_id

    if container is False:
        return layout
    layout.container_id = derived_id(seed, f"container/{name}")
    layout.mount_id = derived_id(seed, f"mount-id/{name}")
    layout.init_link = derived_link(seed, layout.init_id)
    layout.mount_link = derived_link(seed, layout.mount_id)
    init = driver_create(layout.init_id, layout.init_link, prev_cache)
    _init_layer(init / "diff")
    rw = driver_create(layout.mount_id, layout.mount_link, layout.init_id)
    (rw / "merged").mkdir()
    if container is not None:
        upper_layer = Layer.from_dir(container.upper, container.store.encoding)
        upper_layer.unpack(rw / "diff", enc)
    mounts = docker / "image" / "overlay2" / "layerdb" / "mounts" / layout.container_id
    _write(mounts / "mount-id", layout.mount_id)
    _write(mounts / "init-id", layout.init_id)
    if records:
        _write(mounts / "parent", records[-1].chain_id)
    return layout


__all__ = ["rebuild", "DockerLayout", "LayerRecord", "chain_ids", "derived_id", "derived_link", "go_human_size",
           "INIT_ENTRIES", "DOCKER_ROOT", "LINK_LENGTH"]
