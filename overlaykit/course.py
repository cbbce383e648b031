"""Small helpers that keep the notebooks' cells short: lesson workspaces and the lesson's experiment.

Everything is written under one scratch folder that the caller names (by default ``_scratch/<lesson>``
next to the notebook), and every listing prints paths relative to it, so stored outputs are the same on
every machine.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat as st
import sys
import textwrap
import weakref
from pathlib import Path

from . import ondisk
from .engine import Overlay

#: The lesson's starting layers: lower has in_lower.txt and in_both.txt, upper has in_upper.txt and in_both.txt.
LESSON_LOWER = {"in_lower.txt": "I live in lower/\n", "in_both.txt": "lower/'s copy of in_both.txt\n"}
LESSON_UPPER = {"in_upper.txt": "I live in upper/\n", "in_both.txt": "upper/'s copy of in_both.txt\n"}

#: The last workspace folder and (a weak reference to) the last lesson overlay these helpers made;
#: ``%%overlay`` without a name uses them. Weak, so remembering an overlay never keeps it mounted.
_last: dict = {}


def workspace(name: str, root: str | os.PathLike = "_scratch") -> Path:
    """A fresh, empty folder ``root/name`` (anything left from an earlier run is removed first)."""
    path = Path(root) / name
    if path.exists():
        widgets = sys.modules.get("overlaykit.widgets")  # only if a lesson made widgets (no ipywidgets import)
        if widgets is not None:
            widgets.layers_reset(path)  # explorers on the old folders say so and end their helpers
        _rmtree(path)
    path.mkdir(parents=True)
    _last.clear()
    _last["workspace"] = path
    return path


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc):  # the kernel's work/work is mode 000
        os.chmod(os.path.dirname(p), 0o700)
        os.chmod(p, 0o700) if os.path.isdir(p) else None
        func(p)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path, onerror=onerror)


def write_tree(root: str | os.PathLike, files: dict[str, str | bytes]) -> Path:
    """Create ``root`` and the files in ``files`` (``{"etc/hostname": "box\\n"}``); a key ending in / is a directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in sorted(files.items()):
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def lesson_dirs(ws: str | os.PathLike, *, lower: dict | None = None, upper: dict | None = None) -> dict[str, Path]:
    """The lesson's script: ``mkdir lower upper work merged`` and the starting files."""
    ws = Path(ws)
    dirs = {name: ws / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    write_tree(dirs["lower"], LESSON_LOWER if lower is None else lower)
    write_tree(dirs["upper"], LESSON_UPPER if upper is None else upper)
    return dirs


def lesson_overlay(ws: str | os.PathLike, *, backend: str = "auto", **layers) -> Overlay:
    """An unmounted Overlay over `lesson_dirs` (use it in a ``with`` block).

    A re-run cell asks again for the same workspace while the overlay made last time (an explorer's)
    may still be mounted; upper/ takes one live overlay at a time (EBUSY), so that one is unmounted first.
    """
    key = os.path.abspath(Path(ws) / "upper")
    previous = _made.pop(key, None)
    if previous is not None and previous() is not None:
        previous().unmount()
    d = lesson_dirs(ws, **layers)
    ov = Overlay([d["lower"]], d["upper"], d["work"], merged=d["merged"], backend=backend)
    _made[key] = weakref.ref(ov)
    _last.update(workspace=Path(ws), overlay=weakref.ref(ov))
    return ov


#: upper/ path -> the overlay lesson_overlay made for it last.
_made: dict[str, weakref.ref] = {}


def ls(path: str | os.PathLike, *, show_hidden: bool = True, recursive: bool = False) -> str:
    """A deterministic ``ls -l`` of one layer folder: type and mode, size or device, name (no times, no owners).

    This is how a learner inspects upper/ on disk: a whiteout shows as ``c--------- 0,0``, an opaque
    directory carries its xattr, and the other two whiteout spellings are named too (a zero-size file
    with an ``overlay.whiteout`` xattr, and the OCI ``.wh.`` marker files).  ``recursive`` lists the
    whole tree, names relative to ``path``.
    """
    path = Path(path)
    lines: list[str] = []

    def visit(d: Path, prefix: str) -> None:
        for name in sorted(os.listdir(d)):
            if not show_hidden and name.startswith("."):
                continue
            p = d / name
            s = os.lstat(p)
            lines.append(_ls_line(p, prefix + name, s))
            if recursive and st.S_ISDIR(s.st_mode):
                visit(p, prefix + name + "/")

    visit(path, "")
    return "\n".join(lines) or "(empty)"


def _ls_line(p: Path, shown: str, s: os.stat_result) -> str:
    mode = st.filemode(s.st_mode)
    if st.S_ISCHR(s.st_mode) or st.S_ISBLK(s.st_mode):
        size = f"{os.major(s.st_rdev)},{os.minor(s.st_rdev)}"
    elif st.S_ISDIR(s.st_mode):
        size = "-"
    else:
        size = str(s.st_size)
    extra = ""
    if st.S_ISLNK(s.st_mode):
        extra = f" -> {os.readlink(p)}"
    elif st.S_ISCHR(s.st_mode) and s.st_rdev == 0:
        extra = "   (whiteout)"
    elif st.S_ISDIR(s.st_mode) or st.S_ISREG(s.st_mode):
        # only the markers the lesson is about; the kernel also keeps bookkeeping xattrs
        # (origin, impure) that the simulator does not write
        xs = [x for x in _listxattr(p) if x.endswith((".overlay.opaque", ".overlay.whiteout"))]
        if xs:
            extra = "   [" + ", ".join(f"{x}={_getxattr(p, x)}" for x in sorted(xs)) + "]"
        if st.S_ISREG(s.st_mode) and p.name == ondisk.OPAQUE_MARKER:
            extra += "   (OCI opaque marker)"
        elif st.S_ISREG(s.st_mode) and p.name.startswith(ondisk.WHITEOUT_PREFIX):
            extra += f"   (OCI whiteout of {p.name[len(ondisk.WHITEOUT_PREFIX):]})"
    return f"{mode} {size:>6} {shown}{'/' if st.S_ISDIR(s.st_mode) else ''}{extra}"


def _listxattr(p) -> list[str]:
    try:
        return os.listxattr(p, follow_symlinks=False)
    except OSError:
        return []


def _getxattr(p, name) -> str:
    try:
        return os.getxattr(p, name, follow_symlinks=False).decode(errors="replace")
    except OSError:
        return "?"


def merged_listing(ov: Overlay) -> str:
    """``ls`` of the merged view with each entry's content, like the lesson's ``cat merged/*``."""
    lines = []
    for name in ov.listdir("."):
        s = ov.stat(name, follow_symlinks=False)
        if s.kind == "file":
            lines.append(f"{name:<14} {ov.read_text(name).rstrip()!r:<34} [{ov.layer_of(name)}]")
        else:
            lines.append(f"{name + ('/' if s.kind == 'dir' else ''):<14} {s.kind:<34} [{ov.layer_of(name)}]")
    return "\n".join(lines) or "(empty)"


def trace(ov: Overlay, *, since: int = 0, lookups: bool = False) -> str:
    """What the filesystem did, one line per step (``ov.trace[since:]``); lookups left out unless asked."""
    lines = [str(e) for e in ov.trace[since:] if lookups or e.kind != "lookup"]
    return "\n".join(lines) or "(no copy-up, no whiteout, nothing created or removed)"


def make_xattr_whiteout(dir_path: str | os.PathLike, name: str, xattr_ns: str | None = None) -> Path:
    """Write the kernel's second whiteout spelling: an empty file ``name`` with ``<ns>.overlay.whiteout``,
    in a directory marked ``<ns>.overlay.opaque=x`` ("look for xattr whiteouts here").

    overlayfs reads this form but never writes it; layer tools and nested overlays do.
    """
    ns = xattr_ns or ondisk.default_xattr_ns()
    d = Path(dir_path)
    p = d / name
    p.touch(exist_ok=False)
    os.setxattr(p, f"{ns}.overlay.whiteout", b"", follow_symlinks=False)
    os.setxattr(d, f"{ns}.overlay.opaque", b"x", follow_symlinks=False)
    return p


def report(ov: Overlay, *, since: int = 0, lowers: bool = True) -> str:
    """The lesson's after-each-step look: merged/, upper/ (and the lowers) on disk, and the trace."""
    sections = [("merged/", merged_listing(ov)), (f"{ov.upper.name}/ on disk", ls(ov.upper, recursive=True))
                if ov.upper is not None else ("upper", "(none: a read-only overlay)")]
    if lowers:
        for k, low in enumerate(ov.lowers):
            sections.append((f"{low.name}/ on disk (lower[{k}], read-only)", ls(low, recursive=True)))
    sections.append(("what the filesystem did", trace(ov, since=since)))
    return "\n".join(f"{title}\n" + "\n".join("    " + line for line in body.splitlines())
                     for title, body in sections)


def how_to_look(ov: Overlay, relative_to: str | os.PathLike = ".") -> str:
    """``ov.how_to_look()`` with the notebook's folder written as ``$PWD/``, so the paths stay absolute.

    ``nsenter -m`` enters the helper's mount namespace, and entering a mount namespace resets the working
    directory to its root (setns(2)), so a relative path would name the wrong folder. Run from the
    notebook's folder, the shell expands ``$PWD`` to the absolute path before nsenter runs; the stored
    output names no machine path. The command still names the helper's PID, which changes on every run.
    """
    base = os.path.abspath(relative_to).rstrip(os.sep) + os.sep
    return wrap(ov.how_to_look().replace(base, "$PWD/"))


def wrap(text: str, width: int = 88) -> str:
    """``text`` wrapped at word boundaries, each paragraph on its own; a `backticked command` is never
    split. JupyterLab itself breaks a long printed line wherever the output area ends, mid-word."""
    def keep(m):
        return m.group(0).replace(" ", "\u00a0")  # textwrap splits only at ASCII whitespace
    out = []
    for para in text.split("\n"):
        filled = textwrap.fill(re.sub(r"`[^`]*`", keep, para), width=width, break_long_words=False,
                               break_on_hyphens=False, subsequent_indent="  " if para.strip() else "")
        out.append(filled.replace("\u00a0", " "))
    return "\n".join(out)

# --------------------------------------------------------------------------------------------------
# Images (lessons 01, 02, 06, 07, 09): small deterministic layers and docker-like listings of them.


def layer_from_files(files: dict[str, str | bytes | int], *, removed=(), opaque=(), mtime: float = 0,
                     uid: int = 0):
    """A layer owned by root with every time 0, so its diff_id is the same on every machine and for every user.

    ``mtime`` and ``uid`` set every entry's time and owner instead: the diff_id hashes the whole tar
    stream, so the same files with other times or owners make another layer (lesson 02).

    ``files`` maps a path to its content (str or bytes) or to a size (int: that many pseudo-random-looking
    but deterministic bytes); a key ending in ``/`` is a directory. ``removed`` paths become ``.wh.``
    whiteouts, ``opaque`` directories get a ``.wh..wh..opq`` marker. Parent directories are added as tar does.
    """
    import hashlib
    from .images import Layer, LayerEntry

    items: dict[tuple[str, str], tuple] = {}
    meta = {"mtime": mtime, "uid": uid, "gid": uid}

    def add_parents(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            items.setdefault((d, "dir"), (LayerEntry(d, "dir", mode=0o755, **meta), None))

    for rel, content in files.items():
        rel = rel.strip("/") if not rel.endswith("/") else rel.strip("/") + "/"
        if rel.endswith("/"):
            add_parents(rel.rstrip("/") + "/x")
            continue
        if isinstance(content, int):
            seed = hashlib.sha256(rel.encode()).digest()
            content = (seed * (content // len(seed) + 1))[:content]
        data = content.encode() if isinstance(content, str) else bytes(content)
        add_parents(rel)
        mode = 0o755 if "/bin/" in "/" + rel else 0o644
        items[(rel, "file")] = (LayerEntry(rel, "file", size=len(data), mode=mode, **meta), data)
    for rel in removed:
        rel = rel.strip("/")
        add_parents(rel)
        items[(rel, "whiteout")] = (LayerEntry(rel, "whiteout", mode=0o600, **meta), None)
    for rel in opaque:
        rel = rel.strip("/")
        add_parents(rel + "/x")
        items[(rel, "opaque")] = (LayerEntry(rel, "opaque", mode=0o755, **meta), None)
    return Layer.from_entries(items.values())


def image_from_layers(name: str, steps, *, cmd=None, env=()):
    """An Image from ``[(created_by, layer_or_None), ...]`` in build order; None is a config-only step."""
    from .images import History, Image, ImageConfig

    layers, history = [], []
    for created_by, layer in steps:
        history.append(History(created_by, empty_layer=layer is None))
        if layer is not None:
            layers.append(layer)
    return Image(name, layers, ImageConfig(env=list(env), cmd=list(cmd) if cmd else None), history)


def history(image) -> str:
    """``docker history`` of an image, newest step first: IMAGE, CREATED BY, SIZE, COMMENT.

    Like Docker for a pulled image, only the top row has an image id (the others are ``<missing>``);
    SIZE is the layer's content size, the bytes of its files (moby ``pkg/archive/diff.go`` sums
    ``hdr.Size`` while unpacking), not the size of its tar. The CREATED column is left out so the
    listing reads the same on every run. `layers` shows the diff_ids.
    """
    from .diagrams import created_by_text, human_size

    layers = iter(image.layers)
    rows = []
    for h in image.history:
        layer = None if h.empty_layer else next(layers, None)
        size = human_size(layer.content_size) if layer is not None else "0 B"
        cb = created_by_text(h.created_by)
        rows.append(["<missing>", cb if len(cb) <= 60 else cb[:57] + "...", size, h.comment or ""])
    rows.reverse()
    if rows:
        rows[0][0] = image.id[7:19]
    head = ["IMAGE", "CREATED BY", "SIZE", "COMMENT"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    fmt = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def layers(image) -> str:
    """The image's layers, base first: diff_id (12 hex digits), tar size, content size, ChainID.

    The tar is what the diff_id hashes; its size includes 512-byte headers and padding (Python's
    tarfile pads to 10,240-byte records; Go's archive/tar, which Docker uses, only to 1,024 bytes).
    """
    from .diagrams import human_size

    rows = [(str(i), l.diff_id[7:19], human_size(l.size), human_size(l.content_size), c[7:19])
            for i, (l, c) in enumerate(zip(image.layers, image.chain_ids()))]
    head = ("#", "DIFF_ID", "TAR SIZE", "CONTENT", "CHAIN_ID")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    fmt = lambda r: "  ".join(f"{r[i]:<{widths[i]}}" if i in (0, 1, 4) else f"{r[i]:>{widths[i]}}"  # noqa: E731
                              for i in range(5)).rstrip()
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def tar_listing(layer, *, limit: int | None = 40, kinds=None) -> str:
    """``tar tv`` of a layer in tar order: type and mode, size, name as stored (``.wh.`` markers included).

    Owners and times are left out, as in `ls`: they are not what the lesson is about. ``kinds`` keeps only
    entries of those types (e.g. ``("whiteout", "opaque")`` for what a layer deletes).
    """
    import stat as _st
    from .images import LayerEntry  # noqa: F401  (type of the entries)

    types = {"file": _st.S_IFREG, "dir": _st.S_IFDIR, "symlink": _st.S_IFLNK, "hardlink": _st.S_IFREG,
             "char": _st.S_IFCHR, "block": _st.S_IFBLK, "fifo": _st.S_IFIFO,
             "whiteout": _st.S_IFREG, "opaque": _st.S_IFREG}
    entries = [e for e in layer.entries() if kinds is None or e.type in kinds]
    lines = []
    for e in entries[:limit] if limit else entries:
        mode = _st.filemode(types[e.type] | e.mode)
        if e.type == "hardlink":
            mode = "h" + mode[1:]
        name = "./" if e.path == "." else e.tar_name + ("/" if e.type == "dir" else "")
        extra = {"symlink": f" -> {e.linkname}", "hardlink": f" link to {e.linkname}",
                 "whiteout": "   (whiteout: deletes " + e.path + ")",
                 "opaque": "   (opaque: hides what lower layers have in " + e.path + "/)"}.get(e.type, "")
        lines.append(f"{mode} {e.size:>9} {name}{extra}")
    if limit and len(entries) > limit:
        lines.append(f"... +{len(entries) - limit} more entries")
    return "\n".join(lines) or "(empty layer)"


def tree(root: str | os.PathLike, *, limit: int | None = 40) -> str:
    """Every path under a plain directory (e.g. a flattened root filesystem), sorted, with file sizes."""
    root = Path(root)
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = d / name
            rel = p.relative_to(root).as_posix()
            s = os.lstat(p)
            if st.S_ISDIR(s.st_mode):
                lines.append(rel + "/")
            elif st.S_ISLNK(s.st_mode):
                lines.append(f"{rel} -> {os.readlink(p)}")
            else:
                lines.append(f"{rel} ({s.st_size} B)")
    lines.sort()
    total = len(lines)
    if limit and total > limit:
        lines = lines[:limit] + [f"... +{total - limit} more"]
    return "\n".join(lines) or "(empty)"


def example(name: str) -> Path:
    """A file or folder of the examples that ship with overlaykit (the lesson's Dockerfiles, ``hello/``)."""
    from importlib import resources
    return Path(str(resources.files("overlaykit") / "examples" / name))


def build(dockerfile, context, store, tag: str, *, log: bool = True, width: int = 100, **options):
    """`overlaykit.build.build`, printing one line per step and what it made, like ``docker build``.

    Unlike `build.TextProgress` the log does not say which backend ran the step, so it reads the same
    on every machine. ``dockerfile`` is a path or the Dockerfile's text. The lessons' builds are
    reproducible: ``created`` is pinned (``source_date_epoch``, as SOURCE_DATE_EPOCH would), so the image
    ids a lesson prints are the same on every run.
    """
    from .build import BUILD_EPOCH, build as run_build
    from .diagrams import human_size

    def progress(event, step):
        if event == "start":
            text = step.describe()
            print(text if len(text) <= width else text[:width - 3] + "...")
        elif step.instruction.name == "FROM":
            ref = step.instruction.value.split()[0]
            print(" ---> starts empty: no base layers" if ref == "scratch" else f" ---> starts from the layers of {ref}")
        elif step.layer_size is None:
            print(" ---> no layer (config only)")
        else:
            print(f" ---> new layer, {human_size(step.layer_size)}")

    options.setdefault("source_date_epoch", int(BUILD_EPOCH))
    return run_build(dockerfile, context, store, tag, progress=progress if log else None, **options)



def docker_diff(container) -> list[tuple[str, str]]:
    """What ``docker diff`` prints for a container on overlay2 (moby's overlay change walker): see
    `Container.diff`, which this names for the lessons."""
    return container.diff()


# --------------------------------------------------------------------------------------------------
# Lesson 12 (corners and costs): what a layer folder really holds, and which options this process may use.


def data_on_disk(folder: str | os.PathLike) -> int:
    """Bytes of data a layer folder's regular files hold on disk: their data extents, holes left out
    (``lseek`` SEEK_DATA/SEEK_HOLE), so a ``metacopy`` copy-up, which has the file's full size but no
    data, counts 0. Where a filesystem cannot say, a file counts its allocated blocks, as ``du`` does."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            if st.S_ISREG(s.st_mode):
                total += _data_bytes(p, s)
    return total


def _data_bytes(path: str, s: os.stat_result) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        n, pos = 0, 0
        while pos < s.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here to the end
                    break
                return s.st_blocks * 512  # no SEEK_DATA here
            end = os.lseek(fd, start, os.SEEK_HOLE)
            n, pos = n + end - start, end
        return n
    finally:
        os.close(fd)


#: The overlay xattrs the lessons are about; the kernel's own bookkeeping (origin, impure) is left out.
LESSON_XATTRS = ("redirect", "metacopy", "opaque", "whiteout")


def overlay_marks(path: str | os.PathLike) -> str:
    """The overlay xattrs on one entry of upper/, namespace left out: ``overlay.redirect='/dir'``."""
    shown = []
    for name in sorted(_listxattr(path)):
        ns, _, rest = name.partition(".")
        if rest.startswith("overlay.") and rest[len("overlay."):] in LESSON_XATTRS:
            value = os.getxattr(path, name, follow_symlinks=False)
            shown.append(f"{rest}={value.decode(errors='replace')!r}" if value else rest)
    return ", ".join(shown) or "(no overlay xattrs)"


def options_refused(options) -> str | None:
    """Why an overlay mounted by this process would not do what ``options`` ask (None: it would).

    As root the overlay keeps its bookkeeping in ``trusted.*`` xattrs; an ordinary user's overlay (in a user
    namespace, or the simulator without root) needs ``userxattr``, and with it the kernel refuses
    ``redirect_dir`` and ``metacopy`` and turns ``index`` off (fs/overlayfs/params.c, as `Options.resolve`).
    """
    from .options import Options
    from .ondisk import default_xattr_ns
    asked = Options.parse(options)
    try:
        got = asked.resolve(userxattr=default_xattr_ns() == "user", has_upper=True)
    except OSError as e:
        return f"an ordinary user's overlay uses userxattr, and mount(2) refuses it: {e.strerror}"
    lost = [k for k in sorted(asked.given) if asked.value(k) != got.value(k)]
    if lost:
        return ("an ordinary user's overlay uses userxattr, which turns " + ", ".join(f"{k}=off" for k in lost)
                + " (no file handles in a user namespace)")
    return None


def drop_from_page_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to forget the cached pages of one file (written back first): ``posix_fadvise``
    DONTNEED. Some filesystems (tmpfs) keep their pages whatever one asks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: str | os.PathLike) -> float:
    """How much of a file is in the page cache now (0.0 to 1.0), as mincore(2) reports it for a mapping of
    the file: the pages belong to the file's inode, whoever read them (lesson 12: every container of an image)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), str(path))
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
