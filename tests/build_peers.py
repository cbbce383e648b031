"""Build one context with overlaykit and with buildah (the reference), and compare what they made.

buildah runs daemonless with its storage under a tmp dir (vfs driver, chroot isolation, no network); its
image is pushed as an oci-archive and read back with overlaykit's loader, so both sides are compared as
the same Python objects. Layer content = paths, types, modes, owners, link targets and file bytes (not
mtimes: buildah stamps its own creation time on directories it makes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from overlaykit import oci
from overlaykit.build import build
from overlaykit.images import Store

APPLETS = ("sh", "echo", "cat", "ls", "mkdir", "touch", "id", "head", "rm", "chmod", "ln", "cp", "true",
           "false", "test", "[", "printf", "wc", "stat")


def busybox_rootfs(ctx: Path, name: str = "rootfs") -> None:
    """`ctx/rootfs/bin`: Debian's static busybox and applet symlinks; `COPY rootfs/ /` makes a base with a
    real /bin/sh that buildah and overlaykit both can use (no registry, no network)."""
    busybox = shutil.which("busybox")
    if busybox is None or not _is_static(busybox):
        pytest.skip("busybox-static is not installed (Debian package busybox-static)")
    bin_ = ctx / name / "bin"
    bin_.mkdir(parents=True)
    shutil.copy(busybox, bin_ / "busybox")
    os.chmod(bin_ / "busybox", 0o755)
    for applet in APPLETS:
        os.symlink("busybox", bin_ / applet)
    (ctx / name / "etc").mkdir()
    (ctx / name / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (ctx / name / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    (ctx / name / "tmp").mkdir()
    os.chmod(ctx / name / "tmp", 0o1777)


def _is_static(path: str) -> bool:
    out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout if shutil.which("file") else ""
    return "dynamically" not in out


def need_buildah():
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (Debian package buildah)")
    if os.geteuid() != 0:
        pytest.skip("buildah with chroot isolation needs root here (no rootless storage is set up)")


def buildah_image(ctx: Path, tmp: Path, dockerfile: str = "Dockerfile", env: dict | None = None, *,
                  fmt: str = "oci", before: tuple = ()):
    """Build ctx/dockerfile with buildah (after the (dockerfile, tag) pairs of `before`, in the same
    storage); the image as overlaykit loads it from buildah's oci-archive (docker-archive for fmt docker,
    which keeps Docker's Shell, Healthcheck and OnBuild)."""
    need_buildah()
    base = ["buildah", "--root", str(tmp / "bh-root"), "--runroot", str(tmp / "bh-run"), "--storage-driver", "vfs"]
    run_env = {**os.environ, **(env or {})}
    try:
        for name, tag in (*before, (dockerfile, "peer")):
            _run([*base, "bud", "--layers", "--format", fmt, "--isolation", "chroot", "--pull-never",
                  "-f", str(ctx / name), "-t", tag, str(ctx)], run_env)
        dest = (f"oci-archive:{tmp / 'peer.tar'}:peer" if fmt == "oci"
                else f"docker-archive:{tmp / 'peer.tar'}:peer:latest")
        _run([*base, "push", "peer", dest], run_env)
        return oci.load(tmp / "peer.tar")[0]
    finally:
        subprocess.run([*base, "rm", "--all"], capture_output=True)
        subprocess.run([*base, "rmi", "--all", "--force"], capture_output=True)
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            if line.split()[1].startswith(str(tmp)):
                subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)


# buildah's chroot runtime sometimes fails to seal its memfd copy of itself (EBUSY, a race in the peer,
# not a difference in what is built): only that message is worth another try.
_PEER_FLAKE = "sealing memfd copy: Device or resource busy"


def _run(cmd, env):
    for _ in range(3):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        if p.returncode == 0 or _PEER_FLAKE not in p.stdout + p.stderr:
            break
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def ours(ctx: Path, tmp: Path, dockerfile: str = "Dockerfile", tag: str = "ours", **kw):
    return build(str(ctx / dockerfile), str(ctx), Store(tmp / "ok-store"), tag, **kw)


def content(layer) -> dict:
    """path -> (type, mode, uid, gid, link target, bytes) for every entry of a layer."""
    out = {}
    for e in layer.entries():
        data = layer.read(e.path) if e.type == "file" else b""
        out[e.path] = (e.type, oct(e.mode), e.uid, e.gid, e.linkname, data)
    return out


# What buildah 1.28 leaves in the layer of the first RUN of an image: the mount points it bind-mounts
# over (empty), which BuildKit and Docker do not commit. Dropped from buildah's side before comparing.
BUILDAH_MOUNTPOINTS = ("dev", "proc", "sys", "run", "etc/hostname", "etc/hosts", "etc/resolv.conf")


def peer_content(layer) -> dict:
    """content() of a buildah layer less its empty mount points (and /etc if they were all it held)."""
    out = {p: v for p, v in content(layer).items()
           if not (p in BUILDAH_MOUNTPOINTS and v[0] in ("dir", "file") and v[5] == b"")}
    if "etc" in out and out["etc"][0] == "dir" and not any(p.startswith("etc/") for p in out):
        del out["etc"]
    return out


def config_fields(image) -> dict:
    """The config fields a Dockerfile sets, without the builder's own label (and buildah's empty
    Cmd/Entrypoint lists of a docker-format scratch image, which mean the same as none)."""
    cfg = {k: v for k, v in image.config_json()["config"].items() if not (k in ("Cmd", "Entrypoint") and v == [])}
    labels = {k: v for k, v in (cfg.pop("Labels", None) or {}).items() if not k.startswith("io.buildah")}
    if labels:
        cfg["Labels"] = labels
    return cfg
