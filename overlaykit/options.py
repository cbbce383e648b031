"""The overlay's mount options (redirect_dir, index, metacopy, xino, nfs_export) and the kernel's rules
for them: which values are accepted, which combinations conflict, and what each one becomes on a given
mount (fs/overlayfs/params.c, ``ovl_fs_params_verify``; checked on 6.18 as root and with userxattr).

`Options.parse` takes what a user wrote (``{"redirect_dir": "on"}`` or ``"redirect_dir=on,index=on"``);
`Options.resolve` applies the dependency rules at mount time and returns what the mount really does,
raising `OSError` EINVAL with the kernel's own message where mount(2) refuses.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field, replace

#: Every option this module knows, with the values mount(2) accepts.
VALUES = {
    "redirect_dir": ("on", "follow", "nofollow", "off"),
    "index": ("on", "off"),
    "metacopy": ("on", "off"),
    "xino": ("on", "off", "auto"),
    "nfs_export": ("on", "off"),
}
_BOOLS = ("index", "metacopy", "nfs_export")


def _module_param(name: str, default: str) -> str:
    """The overlay module's Kconfig/module-parameter default (/sys/module/overlay/parameters/NAME)."""
    try:
        with open(f"/sys/module/overlay/parameters/{name}") as f:
            return f.read().strip()
    except OSError:
        return default


def redirect_always_follow() -> bool:
    """CONFIG_OVERLAY_FS_REDIRECT_ALWAYS_FOLLOW (y in Debian and upstream's default): with it,
    ``redirect_dir=off`` still *follows* redirects written by an earlier mount; it only stops creating them."""
    return _module_param("redirect_always_follow", "Y") in ("Y", "y", "1")


class UnknownOption(OSError, ValueError):
    """An option name overlaykit does not know: mount(2) answers EINVAL ("Unknown parameter")."""


@dataclass(frozen=True)
class Options:
    """What a mount does.  ``given`` holds the names the user set explicitly (the kernel's conflicts
    depend on it: ``metacopy=on`` alone turns redirect_dir on, ``metacopy=on,redirect_dir=off`` is refused)."""

    redirect_dir: str = "off"
    index: bool = False
    metacopy: bool = False
    xino: str = "off"
    nfs_export: bool = False
    given: frozenset = field(default=frozenset(), compare=False)

    # -- what the mount does ---------------------------------------------------------------------
    @property
    def creates_redirects(self) -> bool:
        """Renaming a lower or merged directory copies it up with an ``overlay.redirect`` (else EXDEV)."""
        return self.redirect_dir == "on"

    @property
    def follows_redirects(self) -> bool:
        """Lookup follows ``overlay.redirect`` xattrs found in upper/ and the lowers."""
        if self.redirect_dir in ("on", "follow"):
            return True
        return self.redirect_dir == "off" and redirect_always_follow()

    # -- parsing ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, options=None) -> "Options":
        """``None``, an `Options`, a dict (values as strings or bools) or the kernel's ``"a=b,c=d"``.

        Unknown names raise `UnknownOption` (EINVAL, as mount(2); also a ValueError); a bad value raises `OSError` EINVAL with mount(2)'s message
        ("overlay: Bad value for 'xino'"), as the kernel does at mount time."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if isinstance(options, str):
            pairs = []
            for item in filter(None, (x.strip() for x in options.split(","))):
                key, sep, value = item.partition("=")
                pairs.append((key.strip(), value.strip() if sep else None))
        elif isinstance(options, dict):
            pairs = list(options.items())
        else:
            raise TypeError(f"options must be a dict or a string like 'redirect_dir=on,index=on', "
                            f"not {type(options).__name__}")
        values: dict = {}
        for key, value in pairs:
            if key not in VALUES:
                known = ", ".join(VALUES)
                raise UnknownOption(errno.EINVAL, f"unknown overlay option {key!r}: the simulator and the "
                                                  f"kernel backend take {known}")
            if isinstance(value, bool):
                value = "on" if value else "off"
            if value not in VALUES[key]:
                raise OSError(errno.EINVAL, f"overlay: Bad value for '{key}' ({value!r}; one of "
                                            f"{', '.join(VALUES[key])})")
            values[key] = value
        kw = {k: (v == "on") if k in _BOOLS else v for k, v in values.items()}
        return cls(**kw, given=frozenset(values))

    def resolve(self, *, userxattr: bool, has_upper: bool, same_fs: bool = True) -> "Options":
        """What the kernel makes of these options on a mount: conflicts raise OSError EINVAL with the
        kernel's message; silent fallbacks (index without an upper, xino on one filesystem, userxattr's
        nofollow) are applied, as dmesg reports them.  The steps and their order are
        ``ovl_fs_params_verify``'s (fs/overlayfs/params.c), judged by tests/test_options_kernel.py."""
        o, given = self, self.given
        follow_mode = "follow" if redirect_always_follow() else "nofollow"
        # the kernel's redirect mode: redirect_dir=off is stored as follow (or nofollow) at parse time
        red = follow_mode if o.redirect_dir == "off" else o.redirect_dir
        index, metacopy, nfs_export = o.index, o.metacopy, o.nfs_export
        set_redirect, set_metacopy, set_nfs = "redirect_dir" in given, "metacopy" in given, "nfs_export" in given
        set_index = "index" in given and has_upper  # index=on is "useless in a non-upper mount, ignore"
        if not has_upper:
            index = False
        # "to make the logic simpler" the kernel turns follow into on without an upper (nothing is created)
        ro_follow = not has_upper and red == "follow"
        if ro_follow:
            red = "on"
        if metacopy and red != "on":
            if set_metacopy and set_redirect:
                raise OSError(errno.EINVAL, f"overlayfs: conflicting options: metacopy=on,redirect_dir={red}")
            if set_redirect:
                metacopy = False  # "disabling metacopy due to redirect_dir=..."
            else:
                red = "on"
        if nfs_export and not index:
            if not has_upper and red != "nofollow":
                nfs_export = False  # "NFS export requires redirect_dir=nofollow on non-upper mount"
            elif set_nfs and set_index:
                raise OSError(errno.EINVAL, "overlayfs: conflicting options: nfs_export=on,index=off")
            elif set_index:
                nfs_export = False  # "disabling nfs_export due to index=off"
            else:
                index = True
        if nfs_export and metacopy:
            if set_nfs and set_metacopy:
                raise OSError(errno.EINVAL, "overlayfs: conflicting options: nfs_export=on,metacopy=on")
            if set_metacopy:
                nfs_export = False
            else:
                metacopy = False
        if userxattr:
            if set_redirect and red != "nofollow":
                raise OSError(errno.EINVAL, f"overlayfs: conflicting options: userxattr,redirect_dir={red}")
            if metacopy and set_metacopy:
                raise OSError(errno.EINVAL, "overlayfs: conflicting options: userxattr,metacopy=on")
            red, metacopy = "nofollow", False
            # and no file handles in a user namespace: index and nfs_export fall back to off (super.c)
            index = nfs_export = False
        if ro_follow and red == "on":
            red = "follow"
        if not has_upper:
            index = False  # an index lives in workdir: none without an upper (nfs_export stays, read-only)
        # keep the user's spelling where it means what the kernel ended with ("off" = follow here)
        same = red == (follow_mode if o.redirect_dir == "off" else o.redirect_dir)
        xino = o.xino
        if same_fs:
            xino = "off"  # "xino=on is useless with all layers on same fs"
        elif userxattr and xino == "auto":
            xino = "off"  # auto needs the upper fs's 32-bit file handles, which a user namespace cannot use
        return replace(o, redirect_dir=o.redirect_dir if same else red, index=index, metacopy=metacopy,
                       nfs_export=nfs_export, xino=xino)

    # -- spelling --------------------------------------------------------------------------------
    def mount_string(self) -> str:
        """The options as mount(8) takes them, every one spelled out (what the kernel backend passes)."""
        return ",".join(f"{k}={self.value(k)}" for k in VALUES)

    def kernel_pairs(self) -> tuple:
        """(name, value) pairs for mount(2), before `resolve`: what was given, and "off" for the rest that
        the distribution's Kconfig could otherwise turn on, except where that would conflict with what was
        given (metacopy=on implies redirect_dir=on; nfs_export=on implies index=on)."""
        pairs = []
        for key in ("redirect_dir", "index", "metacopy", "nfs_export", "xino"):
            if key in self.given:
                pairs.append((key, self.value(key)))
            elif key == "redirect_dir" and self.metacopy or key == "index" and self.nfs_export or key == "xino":
                continue
            else:
                pairs.append((key, "off"))
        return tuple(pairs)

    def value(self, key: str) -> str:
        v = getattr(self, key)
        return ("on" if v else "off") if isinstance(v, bool) else v

    def __str__(self) -> str:
        return self.mount_string()


def same_filesystem(paths) -> bool:
    """Are all these layer directories on one filesystem (xino has nothing to do then)?"""
    devs = set()
    for p in paths:
        try:
            devs.add(os.stat(p).st_dev)
        except OSError:
            pass  # mount() reports a missing layer with its own errno
    return len(devs) <= 1
