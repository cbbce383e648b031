"""The end-of-session mount guard in conftest.py must catch a mount that a test forgot."""

import os
import subprocess

import pytest

from conftest import leftover_overlay_mounts, parse_mountinfo, read_mountinfo

BEFORE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 0:30 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
40 27 0:41 / /tmp/old/merged rw,relatime shared:5 - overlay overlay rw,lowerdir=/tmp/old/l
"""


def _with(*lines):
    return BEFORE + "".join(line + "\n" for line in lines)


def test_a_new_overlay_mount_under_a_watched_root_is_reported():
    after = _with("51 27 0:52 / /tmp/pytest-of-root/pytest-3/t0/merged rw - overlay overlay rw,lowerdir=a")
    assert leftover_overlay_mounts(BEFORE, after) == ["/tmp/pytest-of-root/pytest-3/t0/merged"]


def test_fuse_overlayfs_counts_as_an_overlay():
    after = _with("52 27 0:53 / /home/learner/m rw - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0")
    assert leftover_overlay_mounts(BEFORE, after) == ["/home/learner/m"]


def test_mounts_from_before_the_session_and_unrelated_ones_are_not_reported():
    after = _with(
        "53 27 0:54 / /tmp/scratch rw - tmpfs tmpfs rw",  # not an overlay
        "54 27 0:55 / /mnt/merged rw - overlay overlay rw",  # outside the watched roots
        "55 27 0:56 / /tmpfoo/merged rw - overlay overlay rw",  # a prefix, not a parent
    )
    assert leftover_overlay_mounts(BEFORE, after) == []


def test_a_remount_of_the_same_mount_point_is_a_new_mount():
    after = BEFORE.replace("40 27 0:41 / /tmp/old/merged", "56 27 0:57 / /tmp/old/merged")
    assert leftover_overlay_mounts(BEFORE, after) == ["/tmp/old/merged"]


def test_escaped_mount_points_are_decoded():
    (m,) = parse_mountinfo(r"60 27 0:61 / /tmp/with\040space rw - overlay overlay rw")
    assert m.mount_point == "/tmp/with space" and m.fstype == "overlay"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting an overlay in this mount namespace needs root")
def test_the_guard_sees_a_real_overlay_mount(tmp_path):
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    before = read_mountinfo()
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine refuses overlay mounts: {done.stderr.strip()}")
    try:
        seen = leftover_overlay_mounts(before, read_mountinfo(), (str(tmp_path),))
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)
    assert seen == [str(dirs["merged"])]
    assert leftover_overlay_mounts(before, read_mountinfo(), (str(tmp_path),)) == []
