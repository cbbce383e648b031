"""st_dev/st_ino with the layers on two filesystems (lower on tmpfs /dev/shm, upper on the tmp dir's),
xino=off/on/auto: the simulator's relations against the kernel's (xino.py)."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from overlaykit import Overlay, capabilities, filehandle

pytestmark = pytest.mark.kernel

KERNEL = capabilities()["kernel"]
SHM = "/dev/shm"


def _second_fs(tmp_path) -> bool:
    try:
        return os.access(SHM, os.W_OK) and os.stat(SHM).st_dev != os.stat(tmp_path).st_dev
    except OSError:
        return False


def relations(backend: str, xino: str, shm: str, tmp: str) -> dict:
    lower = os.path.join(shm, f"{backend}-{xino}-lower")
    os.makedirs(os.path.join(lower, "d"))
    for name in ("f", "g"):
        with open(os.path.join(lower, name), "w") as f:
            f.write(name)
    upper, work = os.path.join(tmp, f"{backend}-{xino}-upper"), os.path.join(tmp, f"{backend}-{xino}-work")
    os.makedirs(upper)
    os.makedirs(work)
    real = {p: os.lstat(os.path.join(lower, p)).st_ino for p in ("f", "g", "d")}
    real["."] = os.stat(upper).st_ino
    ids = {}
    with Overlay([lower], upper, work, backend=backend, options={"xino": xino}) as ov:
        for p in (".", "f", "g", "d"):
            s = ov.lstat(p)
            ids["before", p] = (s.dev, s.ino)
        ov.chmod("f", 0o600)  # copied up: keeps its number and device
        ov.write_text("new", "n")
        ov.mkdir("nd")
        for p in (".", "f", "g", "d", "new", "nd"):
            s = ov.lstat(p)
            ids["after", p] = (s.dev, s.ino)
        h = ov.os_open("f", os.O_RDONLY)
        try:
            s = ov.fstat(h)
            ids["fstat", "f"] = (s.dev, s.ino)
        finally:
            ov.close(h)
    keys = sorted(ids)
    devs = sorted({v[0] for v in ids.values()}, key=lambda d: [ids[k][0] for k in keys].index(d))
    low = (1 << 62) - 1
    return {
        "device classes": {k: devs.index(ids[k][0]) for k in keys},
        "number is the real one": {k: ids[k][1] == real.get(k[1]) for k in keys},
        "low bits are the real one": {k: ids[k][1] & low == real.get(k[1]) for k in keys},
        "high bits set": {k: ids[k][1] >> 62 != 0 for k in keys},
        "shared numbers": sorted((a, b) for a in keys for b in keys if a < b and ids[a][1] == ids[b][1]),
    }


@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed here: {KERNEL.reason}")
@pytest.mark.parametrize("xino", ["off", "on", "auto"])
def test_cross_filesystem_inode_relations_agree(tmp_path, xino):
    if not _second_fs(tmp_path):
        pytest.skip(f"{SHM} is not a second writable filesystem here")
    shm = tempfile.mkdtemp(dir=SHM, prefix="overlaykit-xino-")
    try:
        sim = relations("sim", xino, shm, str(tmp_path))
        ker = relations("kernel", xino, shm, str(tmp_path))
    finally:
        shutil.rmtree(shm)
    assert sim == ker
    one_device = len(set(ker["device classes"].values())) == 1
    if xino == "off" and os.geteuid() == 0:  # dirs: the overlay's device; files: their filesystem's
        assert not one_device
    if xino != "off" and os.geteuid() == 0:  # one device, lower numbers marked in the high bits
        assert one_device and ker["high bits set"]["before", "g"] and not ker["high bits set"]["after", "new"]


@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed here: {KERNEL.reason}")
def test_origin_of_a_tmpfs_lower_carries_its_uuid(tmp_path):
    """A lower layer on tmpfs (which has an s_uuid, unlike an ext4 made without one): both backends write
    the same origin, its uuid the tmpfs's (uuid=on, the default) as root, empty without privilege."""
    if not _second_fs(tmp_path):
        pytest.skip(f"{SHM} is not a second writable filesystem here")
    shm = tempfile.mkdtemp(dir=SHM, prefix="overlaykit-origin-")
    try:
        with open(os.path.join(shm, "f"), "w") as f:
            f.write("x")
        written = {}
        for backend in ("sim", "kernel"):
            upper, work = tmp_path / f"{backend}-upper", tmp_path / f"{backend}-work"
            upper.mkdir()
            work.mkdir()
            with Overlay([shm], str(upper), str(work), backend=backend) as ov:
                ov.chmod("f", 0o600)
                xns = ov.encoding.private_prefix
            written[backend] = os.getxattr(upper / "f", xns + "origin")
        assert written["sim"] == written["kernel"]
        if os.geteuid() == 0:
            fh = filehandle.Fh.decode(written["kernel"])
            assert fh.uuid == filehandle.fs_uuid(shm) != filehandle.NULL_UUID
    finally:
        shutil.rmtree(shm)
