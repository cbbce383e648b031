"""Inode numbers in a rotated stack: each upper becomes a lower before the next step (unionmount-testsuite's
``--ov=N``), the sim against the kernel.

The suite's rename-mass-5 links lower files, then renames the links one by one, remounting after each
rename with the old upper pushed into the lowers.  Whether a renamed link keeps its number depends on the
index: with index=off a lower file with two links is copied up without an origin (ovl_do_copy_up), so the
copy shows its own number; with index=on the index vouches for the origin and the number stays.  What is
compared is relations, not raw numbers: which names share a number, and whether it survived the step.
"""
from __future__ import annotations

import os

import pytest

from overlaykit import Overlay, capabilities

KERNEL = capabilities()["kernel"]
pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")]

NAMES = range(100, 105)
RENAMES = [(103, 104), (102, 103), (101, 102)]  # the gap moves down, as in the suite's ring


def rotation_relations(backend: str, tmp: str, options=None) -> dict:
    """Link every lower file, then rename links with a remount and an upper rotation after each rename."""
    root = os.path.join(tmp, backend)
    os.makedirs(os.path.join(root, "l", "a"))
    for i in NAMES:
        with open(os.path.join(root, "l", "a", f"foo{i}"), "w") as f:
            f.write(str(i))
    lowers, uppers = [os.path.join(root, "l")], []

    def new_upper():
        k = len(uppers)
        for sub in ("u", "w"):
            os.makedirs(os.path.join(root, f"upper{k}", sub))
        uppers.append(os.path.join(root, f"upper{k}"))

    def mount():
        return Overlay(list(lowers), os.path.join(uppers[-1], "u"), os.path.join(uppers[-1], "w"),
                       backend=backend, options=options)

    def shared(ov):
        names = sorted(ov.listdir("a"))
        ino = {n: ov.lstat(f"a/{n}").ino for n in names}
        return sorted((a, b) for a in names for b in names if a < b and ino[a] == ino[b])

    new_upper()
    with mount() as ov:
        lower = {i: ov.lstat(f"a/foo{i}").ino for i in NAMES}
        for i in NAMES:
            ov.link(f"a/foo{i}", f"a/no_foo{i}")
    out = {}
    with mount() as ov:
        out["linked, remounted"] = {"shared": shared(ov),
                                    "kept": [ov.lstat(f"a/no_foo{i}").ino == lower[i] for i in NAMES]}
    for a, b in RENAMES:
        with mount() as ov:
            before = ov.lstat(f"a/no_foo{a}").ino
            ov.rename(f"a/no_foo{a}", f"a/no_foo{b}")
            during = ov.lstat(f"a/no_foo{b}").ino
        lowers.insert(0, os.path.join(uppers[-1], "u"))  # the upper rotates into the lowers
        new_upper()
        with mount() as ov:
            after = ov.lstat(f"a/no_foo{b}").ino
            out[f"no_foo{a} -> no_foo{b}"] = {"kept by rename": during == before,
                                               "kept by rotation": after == during, "shared": shared(ov)}
    # the suite's own check: the last rename, then a remount without rotation (its layers ran out)
    a, b = 100, 101  # no_foo100 is still a link in the first upper, now the lowest but one layer
    with mount() as ov:
        before = ov.lstat(f"a/no_foo{a}").ino
        ov.rename(f"a/no_foo{a}", f"a/no_foo{b}")
    with mount() as ov:
        out["renamed link in a rotated lower, remounted"] = {"kept": ov.lstat(f"a/no_foo{b}").ino == before,
                                                             "shared": shared(ov)}
    return out


@pytest.mark.parametrize("options", [None, "index=on"])
def test_rotated_stack_inode_relations_agree(tmp_path, options):
    sim = rotation_relations("sim", str(tmp_path), options)
    kernel = rotation_relations("kernel", str(tmp_path), options)
    assert sim == kernel
    # the kernel, as measured here: a link renamed out of a rotated lower keeps its number only when the
    # index vouches for it (index=on, as root; an unprivileged mount falls back to index=off)
    last = kernel["renamed link in a rotated lower, remounted"]["kept"]
    assert last == (options == "index=on" and os.geteuid() == 0)
