"""Synthetic layer stacks for the benchmarks: directories shaped like a distribution image.

A stack holds ``n_files`` distinct file paths spread over ``n_layers`` layer directories (the base layer
gets half of them, as a distribution base image does), in a tree of realistic depth (mostly 2 to 7) and
fan-out (about a dozen entries per directory, with two large directories in the way of /usr/bin and
/usr/lib/x86_64-linux-gnu that every layer adds to).  Every layer above the base also rewrites files of
the layers below, deletes some (whiteouts: a char 0/0 device, the kernel's format) and, now and then,
deletes a whole directory or re-creates one as opaque.  The generator keeps a model of the merged view,
so the benchmarks can pick paths that exist and paths that do not.
"""
from __future__ import annotations

import os
import random
import stat as st
from dataclasses import dataclass, field

TOP = ("bin", "etc", "home", "lib", "opt", "root", "sbin", "srv", "usr", "var")
WORDS = ("share", "lib", "doc", "local", "include", "python3", "site-packages", "man", "locale", "cache",
         "src", "apt", "dpkg", "info", "perl5", "node_modules", "ssl", "certs", "systemd", "X11", "fonts",
         "icons", "zoneinfo", "terminfo", "pkgconfig", "gconv", "firmware", "modules", "log", "run")
BIG_DIRS = ("usr/bin", "usr/lib/x86_64-linux-gnu")


@dataclass
class Stack:
    """Layer directories (``lowers`` top first, as in ``lowerdir=``) and the model of their merged view."""

    root: str
    lowers: list[str]
    files: dict[str, int]                     # visible file path -> size
    dirs: set[str]                            # visible directories ('' = root)
    deleted: list[str] = field(default_factory=list)   # whited-out file paths (visible before, not now)
    big_dirs: tuple[str, ...] = BIG_DIRS
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        c = self.counts
        return (f"{len(self.lowers)} layers, {c['new']} files added, {c['rewritten']} rewritten, "
                f"{c['whiteouts']} file whiteouts, {c['dir_whiteouts']} dir whiteouts, {c['opaque']} opaque dirs; "
                f"merged view: {len(self.files)} files in {len(self.dirs)} dirs")


def _dirs_tree(rng: random.Random, n_dirs: int) -> list[str]:
    """``n_dirs`` directories under the usual top-level names, depth mostly 2..7."""
    dirs = ["", *TOP, "usr/lib", "usr/share", "usr/lib/x86_64-linux-gnu"]
    seen = set(dirs)
    depth = {d: (0 if not d else d.count("/") + 1) for d in dirs}
    i = 0
    while len(dirs) < n_dirs:
        parent = rng.choice(dirs[1:])
        if depth[parent] >= 8 or parent in BIG_DIRS:
            continue
        # deeper parents are chosen less often, so fan-out shrinks with depth as in real trees
        if rng.random() < depth[parent] / 10:
            continue
        name = f"{rng.choice(WORDS)}{i}" if rng.random() < 0.7 else f"pkg-{i}"
        i += 1
        d = f"{parent}/{name}"
        if d not in seen:
            seen.add(d)
            dirs.append(d)
            depth[d] = depth[parent] + 1
    return dirs


def _write(path: str, size: int, tag: int) -> None:
    with open(path, "wb") as f:
        f.write(bytes([65 + tag % 26]) * size)


def _ensure(root: str, d: str, made: set) -> None:
    if d in made:
        return
    parent = d.rpartition("/")[0] if "/" in d else ""
    if d:
        _ensure(root, parent, made)
        os.mkdir(os.path.join(root, d), 0o755)
    made.add(d)


def make_stack(root: str, n_layers: int, n_files: int, *, seed: int = 1, opaque_xattr: str | None = None,
               max_file: int = 4096) -> Stack:
    """Write the stack under ``root`` (layer directories ``root/l000`` .. bottom first) and return it.

    ``opaque_xattr`` is the xattr that marks an opaque directory (``trusted.overlay.opaque`` as root,
    ``user.overlay.opaque`` otherwise); None writes no opaque directories.
    """
    rng = random.Random(seed * 1000003 + n_layers * 7919 + n_files)
    n_dirs = max(len(TOP) + 4, n_files // 12)
    tree = _dirs_tree(rng, n_dirs)
    files: dict[str, int] = {}
    visible_dirs = {""}
    dead: set = set()   # directories of the tree that a whiteout deleted
    deleted: list[str] = []
    counts = dict(new=0, rewritten=0, whiteouts=0, dir_whiteouts=0, opaque=0)
    base_share = n_files // 2 if n_layers > 1 else n_files
    per_layer = [base_share] + [(n_files - base_share) // max(1, n_layers - 1)] * (n_layers - 1)
    per_layer[-1] += n_files - sum(per_layer)
    layer_dirs = []
    serial = 0
    for li in range(n_layers):
        lroot = os.path.join(root, f"l{li:03d}")
        os.mkdir(lroot)
        layer_dirs.append(lroot)
        made: set = {""}
        # deletions and rewrites of what the layers below show
        if li > 0 and files:
            existing = list(files)
            k_del = max(1, per_layer[li] // 30)
            k_rw = max(1, per_layer[li] // 10)
            for p in rng.sample(existing, min(len(existing), k_del + k_rw))[:k_del + k_rw]:
                parent, _, name = p.rpartition("/")
                _ensure(lroot, parent, made)
                if k_del > 0:
                    os.mknod(os.path.join(lroot, p), st.S_IFCHR | 0o600, 0)
                    del files[p]
                    deleted.append(p)
                    counts["whiteouts"] += 1
                    k_del -= 1
                else:
                    size = rng.randrange(max_file)
                    _write(os.path.join(lroot, p), size, li)
                    files[p] = size
                    counts["rewritten"] += 1
            if li % 10 == 5:  # now and then a whole directory goes, or comes back opaque
                cands = sorted(d for d in visible_dirs if d.count("/") >= 2 and d not in BIG_DIRS
                               and d not in made and not any(b.startswith(d + "/") for b in BIG_DIRS))
                if cands:
                    d = rng.choice(cands)
                    gone = [p for p in files if p.startswith(d + "/")]
                    for p in gone:
                        del files[p]
                    deleted.extend(gone[:50])
                    for x in [x for x in visible_dirs if x == d or x.startswith(d + "/")]:
                        visible_dirs.discard(x)
                    dead.update(x for x in tree if x == d or x.startswith(d + "/"))
                    parent, _, name = d.rpartition("/")
                    _ensure(lroot, parent, made)
                    if opaque_xattr and li % 20 == 15:
                        _ensure(lroot, d, made)
                        os.setxattr(os.path.join(lroot, d), opaque_xattr, b"y")
                        visible_dirs.add(d)
                        dead.discard(d)
                        for j in range(3):
                            p = f"{d}/opaque-{li}-{j}"
                            _write(os.path.join(lroot, p), 100, li)
                            files[p] = 100
                        counts["opaque"] += 1
                    else:
                        os.mknod(os.path.join(lroot, d), st.S_IFCHR | 0o600, 0)
                        counts["dir_whiteouts"] += 1
        # new files: a few percent into the two big directories, the rest anywhere in the tree
        for _ in range(per_layer[li]):
            r = rng.random()
            if r < 0.05:
                d = BIG_DIRS[0] if r < 0.02 else BIG_DIRS[1]
            else:
                d = rng.choice(tree)
                while d in dead:  # a deleted directory: put the file in its nearest live ancestor
                    d = d.rpartition("/")[0] if "/" in d else ""
            serial += 1
            p = f"{d}/f{serial}.dat" if d else f"f{serial}.dat"
            _ensure(lroot, d, made)
            size = rng.randrange(max_file)
            _write(os.path.join(lroot, p), size, li)
            files[p] = size
            counts["new"] += 1
            x = d
            while x not in visible_dirs:
                visible_dirs.add(x)
                x = x.rpartition("/")[0] if "/" in x else ""
    # directories of the merged view: those that hold visible files, with their ancestors
    dirs = {""}
    for p in files:
        d = p.rpartition("/")[0] if "/" in p else ""
        while d not in dirs:
            dirs.add(d)
            d = d.rpartition("/")[0] if "/" in d else ""
    return Stack(root, layer_dirs[::-1], files, dirs, deleted, BIG_DIRS, counts)


def sample_paths(stack: Stack, n: int, seed: int = 7) -> tuple[list[str], list[str]]:
    """``n`` existing files and ``n`` missing paths (whited-out files, unknown names, missing parents)."""
    rng = random.Random(seed)
    existing = rng.sample(sorted(stack.files), min(n, len(stack.files)))
    missing: list[str] = []
    deleted = sorted(set(stack.deleted) - stack.files.keys())
    dirs = sorted(stack.dirs - {""})
    while len(missing) < n:
        r = rng.random()
        if r < 0.4 and deleted:
            p = rng.choice(deleted)
        elif r < 0.8 and dirs:
            p = f"{rng.choice(dirs)}/no-such-{len(missing)}"
        else:
            p = f"{rng.choice(dirs) if dirs else 'x'}/missing-dir-{len(missing)}/file"
        if p not in stack.files and p not in stack.dirs:
            missing.append(p)
    return existing, missing
