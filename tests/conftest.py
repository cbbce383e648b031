"""Suite-wide guards: no overlay mount made by a test may outlive the test session.

The kernel backend mounts for real. A mount left behind pins directories, leaks into the next run and,
as root, into the machine, so the whole session fails if one is still mounted at the end.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is a test extra; the guard below must not depend on it
    _hypothesis_settings = None

# Trees the tests write to (pytest's tmp dirs live under /tmp unless --basetemp moves them).
WATCHED_ROOTS = ("/tmp", "/work", "/root", "/home")

if _hypothesis_settings is not None:
    # Real mounts and helper processes make single examples slow and their timing noisy: a deadline
    # would only produce flaky failures. Each test still chooses its own number of examples.
    _hypothesis_settings.register_profile("overlaykit", deadline=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "overlaykit"))


@dataclass(frozen=True)
class Mount:
    mount_id: int
    mount_point: str
    fstype: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts listed in /proc/<pid>/mountinfo text (see proc(5): optional fields end at ' - ')."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        before, _, after = line.partition(" - ")
        fields = before.split()
        mounts.append(Mount(int(fields[0]), _unescape(fields[4]), after.split()[0]))
    return mounts


def _is_overlay(fstype: str) -> bool:
    # the kernel's "overlay" and FUSE implementations such as "fuse.fuse-overlayfs"
    return fstype == "overlay" or fstype.startswith("fuse")


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def leftover_overlay_mounts(before: str, after: str, roots: tuple[str, ...] = WATCHED_ROOTS) -> list[str]:
    """Mount points of overlay mounts in `after` that were not in `before` and lie under `roots`.

    Mounts are told apart by mount ID, which the kernel never reuses while a mount exists, so a
    test that unmounts and remounts the same directory is still caught.
    """
    known = {m.mount_id for m in parse_mountinfo(before)}
    return sorted(
        m.mount_point
        for m in parse_mountinfo(after)
        if m.mount_id not in known and _is_overlay(m.fstype) and _under(m.mount_point, roots)
    )


def read_mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts(tmp_path_factory):
    """Fail the session if any overlay mount made during it is still mounted at its end."""
    roots = WATCHED_ROOTS + (str(tmp_path_factory.getbasetemp()),)
    before = read_mountinfo()
    yield
    left = leftover_overlay_mounts(before, read_mountinfo(), roots)
    if left:
        pytest.fail(
            "overlay mounts made by the tests are still mounted (a test or the kernel backend did not "
            "unmount; `umount` them and find the culprit):\n  " + "\n  ".join(left),
            pytrace=False,
        )
