"""st_dev and st_ino when the layers are on more than one filesystem (overlayfs.rst "Inode properties").

Measured on Linux 6.18 with the lower layer on tmpfs (/dev/shm) and upper/ on ext4:

* ``xino=off`` (the default): directories report the overlay's device and a number of the overlay's own
  (unique while mounted); non-directories report a per-filesystem anonymous device (upper's and each
  lower filesystem's differ from each other and from the overlay's) and the real inode number (a
  copied-up file keeps its origin's number and device).
* ``xino=on|auto``: everything reports the overlay's device; the inode number is the real one with the
  filesystem's index (upper 0, then each further filesystem 1, 2, ...) in the high bits: with two
  filesystems a lower object's number is ``ino | 1 << 63`` ("xino feature enabled using 2 upper inode bits").

With all layers on one filesystem nothing changes (one device, real numbers), which is what the simulator
does there anyway.  Relations, not raw device numbers, are what the tests compare.
"""
from __future__ import annotations

import os


class InodeMap:
    """Maps (real device, inode number, is a directory) to what stat(2) on the overlay reports."""

    def __init__(self, upper_dev: int | None, lower_devs: list[int], xino: str, overlay_dev: int):
        devs: list[int] = []
        for d in ([upper_dev] if upper_dev is not None else []) + list(lower_devs):
            if d not in devs:
                devs.append(d)
        self.fsid = {d: i for i, d in enumerate(devs)}
        self.same_fs = len(devs) <= 1
        self.packed = not self.same_fs and xino in ("on", "auto")
        self.shift = 64 - (len(devs) - 1).bit_length()
        self.overlay_dev = overlay_dev
        self._dir_inos: dict[tuple[int, int], int] = {}

    def pseudo_dev(self, real_dev: int) -> int:
        """An anonymous device per layer filesystem (ovl_fs's pseudo_dev), distinct from the overlay's."""
        return os.makedev(0, 0xFFF00 + self.fsid.get(real_dev, 0xFF))

    def map(self, real_dev: int, ino: int, is_dir: bool) -> tuple[int, int]:
        if self.same_fs:
            return self.overlay_dev, ino
        if self.packed:
            return self.overlay_dev, ino | (self.fsid.get(real_dev, 0) << self.shift)
        if is_dir:  # the overlay inode's own number (get_next_ino), stable while mounted
            key = (real_dev, ino)
            return self.overlay_dev, self._dir_inos.setdefault(key, len(self._dir_inos) + 2)
        return self.pseudo_dev(real_dev), ino
