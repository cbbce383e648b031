"""Controls that let a learner change an overlay or an image and watch the pictures follow.

`OverlayExplorer` applies file operations to a live `Overlay` and shows the three trees, the stack
diagram and the trace; `LayerInspector` walks an image's layers the way dive does; `PredictExercise` asks
for a prediction before showing what really happens.  Every button callback catches its own errors and
shows a short message with the errno's meaning in plain words: a learner never sees a traceback.

The widgets work without a browser or kernel (ipywidgets 8), so tests set values and call ``.click()``.
"""
from __future__ import annotations

import errno
import html
import os
import stat as st
import weakref
from dataclasses import dataclass, field

import ipywidgets as W

from . import diagrams
from .diagrams import Lane, human_size, stack_lanes

#: The errno's meaning in the words of the lesson (what the kernel refused and why).
ERRNO_MEANING = {
    errno.ENOENT: "no such file or directory in the merged view (or a whiteout hides it)",
    errno.EEXIST: "something with that name already exists",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "that is a directory: use rmdir, or name a file",
    errno.ENOTEMPTY: "the directory is not empty: remove what is inside it first",
    errno.EXDEV: "the kernel will not rename a directory that exists in a lower layer (redirect_dir=off); "
                 "mv copies it and deletes the original instead",
    errno.EROFS: "the overlay is read-only: it has no upper layer to write to",
    errno.EINVAL: "invalid argument (for example, moving a directory inside itself)",
    errno.EPERM: "operation not permitted",
    errno.EACCES: "permission denied",
    errno.ELOOP: "too many symbolic links on the way (a loop?)",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENOSPC: "no space left on the device holding upper/",
    errno.EBUSY: "the file or directory is busy",
}

OPERATIONS = ("create", "write", "append", "delete", "mkdir", "rmdir", "rename", "chmod", "symlink")


def explain_error(exc: BaseException) -> str:
    """One line for a learner: ``EXDEV: the kernel will not rename ... (/src)``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        meaning = ERRNO_MEANING.get(exc.errno, exc.strerror or os.strerror(exc.errno))
        where = f" (/{str(exc.filename).lstrip('/')})" if exc.filename else ""
        return f"{name}: {meaning}{where}"
    if isinstance(exc, ValueError):
        msg = str(exc)
        return msg[:1].upper() + msg[1:]
    return f"Unexpected {type(exc).__name__}: {exc}"


def _pre(text: str, cls: str = "") -> str:
    """Text that wraps at word boundaries inside its box (a long trace line must not make the whole widget
    scroll sideways)."""
    return (f'<pre class="overlaykit-{cls}" style="margin:0;font-size:12px;line-height:1.3;'
            f'white-space:pre-wrap;overflow-wrap:anywhere">{html.escape(text)}</pre>')


def _tree_pre(text: str, cls: str) -> str:
    """A tree, one line per entry: a line too long for its column ends in an ellipsis and shows whole on
    hover (title), so indentation stays readable and columns never run into each other."""
    lines = "".join(f'<span title="{html.escape(line.strip(), quote=True)}" style="display:block;overflow:hidden;'
                    f'text-overflow:ellipsis;white-space:pre">{html.escape(line) or " "}</span>'
                    for line in text.split("\n"))
    return f'<pre class="overlaykit-{cls}" style="margin:0;font-size:12px;line-height:1.3">{lines}</pre>'


def _message_html(text: str, kind: str) -> str:
    # line-height: ipywidgets gives HTML widgets the 28 px line of a one-line control (double spacing)
    color = {"error": "#b91c1c", "ok": "#15803d", "info": "#334155"}[kind]
    return f'<div style="color:{color};line-height:1.4">{html.escape(text)}</div>'


#: One <style> for the course's widgets (an HTML widget, so it is stored with the widget state too).
#: ipywidgets draws every radio choice in a fixed-height row (one line) with its circle floated left, so a
#: long choice wraps under the next one and its circle ends up under another element; here each choice is
#: a flex row as tall as its text, with its own circle at the top.
STYLE = """<style>
.overlaykit-predict .widget-radio-box label {
  height: auto; line-height: 1.35; display: flex; align-items: flex-start; gap: 6px;
  padding: 3px 0; white-space: normal; overflow-wrap: anywhere; }
.overlaykit-predict .widget-radio-box input { flex: none; order: -1; height: auto; margin: 2px 0 0 1px;
  float: none; }
.overlaykit-predict .widget-radio, .overlaykit-predict .widget-radio-box { width: 100%; max-width: 100%; }
.overlaykit-predict .widget-html-content, .overlaykit-explorer .widget-html-content,
.overlaykit-layer-inspector .widget-html-content { line-height: 1.4; }
.overlaykit-explorer, .overlaykit-layer-inspector, .overlaykit-predict { max-width: 100%; overflow-x: hidden; }
/* a tree column is as wide as its share, not as its longest line: that line ends in an ellipsis */
.overlaykit-explorer .widget-html-content { min-width: 0; }
.overlaykit-explorer pre { max-width: 100%; }
/* drawn from the notebook's stored state before the kernel runs: one "not connected" mark for the whole
   widget (ipywidgets puts one on every part, and on buttons it pushes their words out) */
.overlaykit-explorer .jupyter-widgets-disconnected::before,
.overlaykit-layer-inspector .jupyter-widgets-disconnected::before,
.overlaykit-predict .jupyter-widgets-disconnected::before { display: none; }
</style>"""


def _style() -> W.HTML:
    w = W.HTML(STYLE, layout=W.Layout(display="none"))
    return w


def _on_enter(text: W.Text, callback) -> None:
    """Call ``callback()`` when the learner presses Enter in ``text``.

    The front end sends a "submit" event on Enter. ``Text.on_submit`` says it is deprecated (a warning in the
    learner's output) and the suggested ``continuous_update=False`` observer would also fire when a cell sets
    ``.value`` from Python, so the event is dispatched directly. The event can overtake the last keystrokes:
    while the kernel is busy, ipywidgets holds back value updates (and sends only the latest when the kernel
    is idle again) but sends custom events at once. So in a kernel the callback waits for that update, or
    0.3 s if none comes; without an event loop (tests) it runs at once.
    """
    import asyncio
    pending: dict[str, object] = {}

    def fire() -> None:
        handle = pending.pop("handle", None)
        if handle is not None:
            handle.cancel()
        callback()

    def value_arrived(_change) -> None:
        if "handle" in pending:  # the rest of what was typed, after the submit event
            fire()

    def submitted(_widget) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            callback()
            return
        old = pending.pop("handle", None)
        if old is not None:
            old.cancel()
        pending["handle"] = loop.call_later(0.3, fire)

    text.observe(value_arrived, names="value")
    text._submission_callbacks.register_callback(submitted)


def _bundle(widget, sentence: str, **kwargs) -> dict:
    """The widget's mimebundle with a sentence instead of ipywidgets' ``VBox(children=...)`` repr.

    Where the widget cannot be drawn (an untrusted notebook, a static viewer, a closed kernel) this
    sentence is what the learner reads.
    """
    bundle = widget._repr_mimebundle_(**kwargs)
    if bundle is None:
        return {"text/plain": sentence}
    bundle["text/plain"] = sentence
    return bundle


# ==================================================================================================
# Snapshots of upper/, kept in memory (nothing is written outside the caller's directories)
# ==================================================================================================

@dataclass(frozen=True)
class _Item:
    rel: str
    mode: int          # full st_mode
    uid: int
    gid: int
    rdev: int = 0
    data: bytes = b""  # file contents or symlink target
    xattrs: tuple = field(default=())


def _xattrs(path: str) -> tuple:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return ()
    out = []
    for n in names:
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            pass
    return tuple(out)


def snapshot_tree(root) -> tuple[_Item, ...]:
    """Everything under ``root`` (types, modes, owners, contents, xattrs, 0/0 devices), in memory."""
    root = os.fspath(root)
    items: list[_Item] = []

    def visit(d: str) -> None:
        for name in sorted(os.listdir(os.path.join(root, d) if d else root)):
            rel = os.path.join(d, name) if d else name
            p = os.path.join(root, rel)
            s = os.lstat(p)
            data = b""
            if st.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
            elif st.S_ISLNK(s.st_mode):
                data = os.fsencode(os.readlink(p))
            items.append(_Item(rel, s.st_mode, s.st_uid, s.st_gid, s.st_rdev, data,
                               () if st.S_ISLNK(s.st_mode) else _xattrs(p)))
            if st.S_ISDIR(s.st_mode):
                visit(rel)
    items.append(_Item("", os.lstat(root).st_mode, 0, 0, 0, b"", _xattrs(root)))
    visit("")
    return tuple(items)


def restore_tree(root, items: tuple[_Item, ...]) -> None:
    """Make ``root``'s contents exactly ``items`` again (``root`` itself is kept)."""
    import shutil
    root = os.fspath(root)
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    dirs = []
    for it in items:
        p = os.path.join(root, it.rel) if it.rel else root
        m = it.mode
        if it.rel == "":
            pass
        elif st.S_ISDIR(m):
            os.mkdir(p, 0o700)
        elif st.S_ISREG(m):
            with open(p, "wb") as f:
                f.write(it.data)
        elif st.S_ISLNK(m):
            os.symlink(os.fsdecode(it.data), p)
        else:
            os.mknod(p, m, it.rdev)
        if st.S_ISLNK(m):
            continue
        for name, value in it.xattrs:
            try:
                os.setxattr(p, name, value, follow_symlinks=False)
            except OSError:
                pass
        if os.geteuid() == 0:
            try:
                os.lchown(p, it.uid, it.gid)
            except OSError:
                pass
        if st.S_ISDIR(m):
            dirs.append((p, st.S_IMODE(m)))
        else:
            os.chmod(p, st.S_IMODE(m))
    for p, mode in reversed(dirs):
        os.chmod(p, mode)


# ==================================================================================================
# Trees as text
# ==================================================================================================

def lane_tree(lane: Lane, limit: int = 200) -> str:
    """A lane as an indented tree, each entry marked with its origin or its fate."""
    lines = []
    for n, e in enumerate(lane.entries):
        if n >= limit:
            lines.append(f"… +{len(lane.entries) - limit} more")
            break
        depth = e.path.count("/")
        base = e.path.rpartition("/")[2]
        label = diagrams.Entry(base, e.kind, e.size, e.target, e.opaque).label()
        if lane.name == "merged":
            mark = e.status + (f" (merged {e.by})" if e.by and "+" in e.by else "")
        else:
            mark = e.note()
        lines.append(f"{'  ' * depth}{label}" + (f"  [{mark}]" if mark else ""))
    return "\n".join(lines) if lines else "(empty)"


# ==================================================================================================
# OverlayExplorer
# ==================================================================================================

#: Explorers still working on their layers. A displayed widget stays referenced by ipywidgets (and so does
#: its overlay, with a kernel overlay's helper process), even after its cell ran again: this set lets a new
#: explorer, or a workspace being reset, retire the old ones.
_LIVE: "weakref.WeakSet[OverlayExplorer]" = weakref.WeakSet()


def _dir_ids(ov) -> tuple:
    """(device, inode) of each layer folder, None where it is missing: changes when a folder is remade."""
    out = []
    for d in (*ov.lowers, ov.upper, ov.work):
        if d is None:
            continue
        try:
            s = os.stat(d)
            out.append((s.st_dev, s.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def _retire_explorers_of(ov) -> None:
    """A new explorer on the same upper/ (its cell ran again) retires the older ones on another overlay."""
    if ov.upper is None:
        return
    for old in list(_LIVE):
        if old.ov is not ov and old.ov.upper == ov.upper:
            old.retire("a newer explorer works on the same upper/ (its cell ran again)")


def layers_reset(path) -> None:
    """Retire every explorer with a layer under ``path`` (course.workspace calls this before emptying it)."""
    root = os.path.abspath(path)
    for ex in list(_LIVE):
        dirs = [d for d in (*ex.ov.lowers, ex.ov.upper, ex.ov.work) if d is not None]
        if any(os.path.commonpath([root, str(d)]) == root for d in dirs):
            ex.retire("its workspace was reset (the cell that makes the workspace ran again)")

class OverlayExplorer:
    """Apply file operations to ``ov`` and watch lower, upper and merged follow.

    The starting upper/ is snapshotted in memory; Undo and Reset restore it by unmounting, rewriting
    upper/ and remounting, so they work on both backends.  If the explorer mounted ``ov`` it unmounts it
    on `close`.
    """

    def __init__(self, ov, *, limit: int = diagrams.LIMIT, diagram: bool = True):
        self.ov = ov
        self.limit = limit
        self.show_diagram = diagram
        self._owns_mount = not ov.mounted
        _retire_explorers_of(ov)  # first: upper/ takes one live overlay at a time (EBUSY)
        ov.mount()
        self._start = snapshot_tree(ov.upper) if ov.upper is not None else ()
        self._undo: list[tuple[str, tuple]] = []
        self.events: list = []
        self.last_error: str = ""
        self.focus: tuple[str, ...] = ()  # the paths last acted on: the diagram always draws them
        self.stale: str = ""              # why this explorer no longer works on its layers, if it does not
        self._dirs = _dir_ids(ov)
        _LIVE.add(self)

        self.op = W.Dropdown(options=list(OPERATIONS), value="write", description="operation")
        self.path = W.Text(description="path", placeholder="e.g. etc/hosts")
        self.path2 = W.Text(description="new path", placeholder="e.g. etc/hosts.bak")
        self.content = W.Textarea(description="content", placeholder="text to write")
        self.mode = W.Text(value="644", description="mode (octal)")
        self.apply_button = W.Button(description="Apply", button_style="primary", icon="play")
        self.undo_button = W.Button(description="Undo", icon="undo")
        self.reset_button = W.Button(description="Reset", icon="refresh",
                                     tooltip="back to the layers as they were when the explorer started")
        self.message = W.HTML()
        # each tree stays inside its column (long lines end in an ellipsis, whole on hover)
        self.lower_tree = W.HTML(layout=W.Layout(width="100%", overflow="hidden"))
        self.upper_tree = W.HTML(layout=W.Layout(width="100%", overflow="hidden"))
        self.merged_tree = W.HTML(layout=W.Layout(width="100%", overflow="hidden"))
        self.diagram = W.HTML()
        self.trace_view = W.HTML()

        self.apply_button.on_click(lambda _b: self._guard(self._apply))
        self.undo_button.on_click(lambda _b: self._guard(self._undo_last))
        self.reset_button.on_click(lambda _b: self._guard(self._reset))
        self.op.observe(lambda _c: self._fields(), names="value")
        for field in (self.path, self.path2, self.mode):  # Enter applies, as the Apply button does
            _on_enter(field, lambda: self._guard(self._apply))

        def column(title, w):
            return W.VBox([W.HTML(f"<b>{title}</b>"), w], layout=W.Layout(width="33%", min_width="0",
                                                                            padding="0 8px 0 0"))
        form = W.VBox([self.op, self.path, self.path2, self.content, self.mode,
                       W.HBox([self.apply_button, self.undo_button, self.reset_button]), self.message])
        trees = W.HBox([column("lower layers", self.lower_tree), column("upper/", self.upper_tree),
                        column("merged/", self.merged_tree)])
        self.widget = W.VBox([form, trees, W.HTML("<b>what the filesystem did</b>"), self.trace_view,
                              self.diagram])
        self.widget.add_class("overlaykit-explorer")  # a stable hook for CSS and browser tests
        self._fields()
        self._refresh()

    # -- display -----------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        return _bundle(self.widget, "Overlay explorer: run this cell to change files in the overlay and "
                                    "watch its layers follow.", **kwargs)

    def __repr__(self) -> str:
        lowers = ":".join(x.name for x in self.ov.lowers)
        up = self.ov.upper.name if self.ov.upper is not None else None
        return f"OverlayExplorer(lowers=[{lowers}], upper={up}, {len(self._undo)} change(s) to undo)"

    def close(self) -> None:
        _LIVE.discard(self)
        if self._owns_mount:
            self.ov.unmount()
        self.widget.close()

    def retire(self, why: str) -> None:
        """Stop working on layers that were reset or taken over: one sentence says so, and the overlay is
        unmounted (a kernel overlay's helper process ends) rather than acting on folders that changed."""
        _LIVE.discard(self)
        self.stale = (f"This explorer stopped: {why}. Run the cell that creates the explorer again to "
                      "explore the new layers.")
        try:
            self.ov.unmount()
        except Exception:  # noqa: BLE001 - the folders may be gone; the helper still ends
            pass
        self._say(self.stale, "error")
        for w in (self.apply_button, self.undo_button, self.reset_button):
            w.disabled = True

    # -- state -------------------------------------------------------------------------------------
    @property
    def message_text(self) -> str:
        """The message as plain text (what the learner reads)."""
        import re
        return html.unescape(re.sub(r"<[^>]+>", "", self.message.value))

    def _say(self, text: str, kind: str = "info") -> None:
        self.message.value = _message_html(text, kind)
        self.last_error = text if kind == "error" else ""

    def _guard(self, fn) -> None:
        """The callback boundary: any failure becomes a one-line message, never a traceback."""
        if not self.stale and _dir_ids(self.ov) != self._dirs:
            self.retire("its layer folders were deleted or made again (did a workspace cell run again?)")
        if self.stale:
            self._say(self.stale, "error")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - shown to the learner, not raised in their face
            self._say(explain_error(e), "error")
            try:
                self._refresh()
            except Exception:
                pass

    def _fields(self) -> None:
        op = self.op.value
        show = {"path2": op in ("rename", "symlink"), "content": op in ("create", "write", "append"),
                "mode": op == "chmod"}
        self.path2.description = "points to" if op == "symlink" else "new path"
        self.path.description = "link path" if op == "symlink" else "path"
        for name, visible in show.items():
            getattr(self, name).layout.display = "" if visible else "none"

    def _upper_items(self) -> tuple:
        return snapshot_tree(self.ov.upper) if self.ov.upper is not None else ()

    def _apply(self) -> None:
        from .base import normpath
        ov, op = self.ov, self.op.value
        path = self.path.value.strip()
        p = normpath(path)  # ValueError for empty or escaping paths, before anything happens
        if not p and op not in ("chmod",):
            raise ValueError("the root directory itself cannot be the target of " + op)
        second = self.path2.value.strip()
        if op in ("rename", "symlink") and not second:
            raise ValueError("rename needs a new path" if op == "rename" else "symlink needs a target to point to")
        if op == "rename":
            normpath(second)
        mode = None
        if op == "chmod":
            try:
                mode = int(self.mode.value.strip(), 8)
            except ValueError:
                raise ValueError(f"mode {self.mode.value!r} is not octal: write it like 644 or 0755") from None
            if not 0 <= mode <= 0o7777:
                raise ValueError(f"mode {self.mode.value!r} is out of range (0 to 7777)")
        before = self._upper_items()
        n0 = len(ov.trace)
        desc = f"{op} /{p}" + (f" -> {second}" if op in ("rename", "symlink") else "")
        self.focus = (p, second) if op == "rename" else (p,)
        try:
            if op == "create":
                try:
                    ov.lstat(p)
                except FileNotFoundError:
                    pass
                else:
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), p)
                ov.write_text(p, self.content.value)
            elif op == "write":
                ov.write_text(p, self.content.value)
            elif op == "append":
                ov.write_text(p, self.content.value, append=True)
            elif op == "delete":
                ov.remove(p)
            elif op == "mkdir":
                ov.mkdir(p)
            elif op == "rmdir":
                ov.rmdir(p)
            elif op == "rename":
                ov.rename(p, second)
            elif op == "chmod":
                ov.chmod(p, mode)
            elif op == "symlink":
                ov.symlink(second, p)
            else:
                raise ValueError(f"unknown operation {op!r}")
        except BaseException:
            self.events = list(ov.trace[n0:])
            if self._upper_items() != before:  # a failed operation can still have copied parents up
                self._undo.append((desc + " (failed)", before))
            raise
        self.events = list(ov.trace[n0:])
        self._undo.append((desc, before))
        self._say(f"done: {desc}", "ok")
        self._refresh()

    def _restore(self, items: tuple) -> None:
        ov = self.ov
        if ov.upper is None:
            return
        ov.unmount()
        try:
            restore_tree(ov.upper, items)
        finally:
            ov.mount()

    def _undo_last(self) -> None:
        if not self._undo:
            self._say("nothing to undo", "info")
            return
        desc, items = self._undo.pop()
        self._restore(items)
        self.events = []
        self._say(f"undone: {desc}", "ok")
        self._refresh()

    def _reset(self) -> None:
        self._restore(self._start)
        self._undo.clear()
        self.events = []
        self._say("reset to the starting layers", "ok")
        self._refresh()

    # -- views -------------------------------------------------------------------------------------
    def trees(self) -> dict[str, str]:
        """{"lower": ..., "upper": ..., "merged": ...} as the widget shows them (plain text)."""
        lanes = stack_lanes(self.ov)
        by = {lane.name: lane for lane in lanes}
        lowers = [f"{lane.title}\n" + lane_tree(lane) for lane in lanes if lane.name.startswith("lower")]
        return {"lower": "\n\n".join(lowers),
                "upper": lane_tree(by["upper"]) if "upper" in by else "(no upper: read-only overlay)",
                "merged": lane_tree(by["merged"])}

    @property
    def trace_text(self) -> str:
        return "\n".join(str(e) for e in self.events) or "(nothing yet: apply an operation)"

    def _refresh(self) -> None:
        t = self.trees()
        self.lower_tree.value = _tree_pre(t["lower"], "lower")
        self.upper_tree.value = _tree_pre(t["upper"], "upper")
        self.merged_tree.value = _tree_pre(t["merged"], "merged")
        self.trace_view.value = _pre(self.trace_text, "trace")
        self.undo_button.disabled = not self._undo
        if self.show_diagram:
            self.diagram_obj = diagrams.stack(self.ov, limit=self.limit, focus=self.focus)
            self.diagram.value = self.diagram_obj.html()


# ==================================================================================================
# LayerInspector (dive-like)
# ==================================================================================================

FILTERS = ("all", "added", "modified", "removed", "unchanged")
_MARK = {"added": "+", "modified": "~", "removed": "-", "opaque": "#", "unchanged": " "}
_MARK_COLOR = {"added": "#15803d", "modified": "#b45309", "removed": "#b91c1c", "opaque": "#6d28d9",
               "unchanged": "#334155"}


def _inspect(image):
    from .images import inspect
    return inspect(image)


def layer_states(image) -> list[dict[str, object]]:
    """The root filesystem after each layer: ``{path: LayerEntry}`` (OCI whiteout rules applied)."""
    state: dict[str, object] = {}
    out = []
    for layer in image.layers:
        entries = layer.entries()
        for e in entries:
            if e.type == "opaque":
                prefix = "" if e.path == "." else e.path + "/"
                for p in [p for p in state if p.startswith(prefix)]:
                    del state[p]
        for e in entries:
            if e.type == "whiteout":
                for p in [p for p in state if p == e.path or p.startswith(e.path + "/")]:
                    del state[p]
        for e in entries:
            if not e.is_removal and e.path != ".":
                state[e.path] = e
        out.append(dict(state))
    return out


class LayerInspector:
    """Choose an image and a layer; see the tree as of that layer with its changes marked, like dive.

    Marks: ``+`` added, ``~`` modified, ``-`` removed (by a whiteout), ``#`` made opaque.  The header shows
    the layer's created_by, size, wasted bytes, and the image's efficiency.
    """

    def __init__(self, images, *, limit: int = 300):
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("LayerInspector needs at least one image")
        self.images = list(images)
        self.limit = limit
        self._cache: dict[int, tuple] = {}
        self.image_choice = W.Dropdown(options=[(im.name, k) for k, im in enumerate(self.images)], value=0,
                                       description="image", layout=W.Layout(width="auto", flex="0 1 auto"),
                                       style={"description_width": "initial"})
        # the layer's whole command shows on hover (tooltip): the dropdown itself cuts long ones
        self.layer_choice = W.Dropdown(description="layer", layout=W.Layout(width="auto", flex="1 1 auto",
                                                                            min_width="0"),
                                       style={"description_width": "initial"})
        # buttons as wide as their words, on the line of their label (ToggleButtons puts its own
        # description above the buttons)
        self.filter = W.ToggleButtons(options=list(FILTERS), value="all", style={"button_width": "auto"},
                                      layout=W.Layout(width="auto"))
        self.summary = W.HTML()
        self.layers_table = W.HTML()
        self.tree = W.HTML()
        self.message = W.HTML()
        self.image_choice.observe(lambda _c: self._guard(self._image_changed), names="value")
        self.layer_choice.observe(lambda _c: self._guard(self._refresh), names="value")
        self.filter.observe(lambda _c: self._guard(self._refresh), names="value")
        # the file list scrolls in a box of its own (a layer can hold thousands of paths)
        self.tree.layout = W.Layout(flex="1 1 auto", min_width="0", max_height="420px", overflow="auto")
        self.layers_table.layout = W.Layout(flex="0 1 auto", min_width="0")
        show = W.HBox([W.Label("show", layout=W.Layout(width="auto", margin="0 6px 0 0")), self.filter],
                      layout=W.Layout(align_items="center"))
        self.widget = W.VBox([_style(), W.HBox([self.image_choice, self.layer_choice]), show,
                              self.message, self.summary, W.HBox([self.layers_table, self.tree])])
        self.widget.add_class("overlaykit-layer-inspector")
        self._image_changed()

    def _repr_mimebundle_(self, **kwargs):
        names = ", ".join(im.name for im in self.images)
        return _bundle(self.widget, f"Layer inspector for {names}: run this cell to browse the layers.",
                       **kwargs)

    def __repr__(self) -> str:
        return f"LayerInspector({', '.join(im.name for im in self.images)})"

    def _guard(self, fn) -> None:
        try:
            fn()
            self.message.value = ""
        except Exception as e:  # noqa: BLE001
            self.message.value = _message_html(explain_error(e), "error")

    def _data(self):
        k = self.image_choice.value
        if k not in self._cache:
            im = self.images[k]
            self._cache[k] = (im, _inspect(im), layer_states(im))
        return self._cache[k]

    def _image_changed(self) -> None:
        im, ins, _ = self._data()
        opts = [(f"{r.index}: {diagrams._short(diagrams.created_by_text(r.created_by) or '(no history)', 50)}"
                 f" ({human_size(r.size)})", r.index) for r in ins.layers]
        top = len(opts) - 1
        self.layer_choice.options = opts
        self.layer_choice.value = top if top >= 0 else None
        self._refresh()

    def entries(self, which: str | None = None) -> list[tuple[str, str, str]]:
        """(change, path, label) of the tree for the chosen layer and filter, in path order."""
        im, ins, states = self._data()
        k = self.layer_choice.value
        if k is None:
            return []
        rep = ins.layers[k]
        which = which or self.filter.value
        added, modified, removed, opaque = set(rep.added), set(rep.modified), set(rep.removed), set(rep.opaque)
        state = states[k]
        rows = []
        for p in sorted(set(state) | removed | (opaque - {"."})):
            if p in removed:
                change = "removed"
            elif p in added:
                change = "added"
            elif p in modified:
                change = "modified"
            elif p in opaque:
                change = "opaque"
            else:
                change = "unchanged"
            if which != "all" and change != which and not (which == "removed" and change == "opaque"):
                continue
            e = state.get(p)
            if e is None:
                label = p + ("/ (opaque)" if change == "opaque" else "")
            elif e.type == "dir":
                label = p + "/" + (" (opaque)" if p in opaque else "")
            elif e.type == "file":
                label = f"{p} ({human_size(e.size)})"
            elif e.type in ("symlink", "hardlink"):
                label = f"{p} -> {e.linkname}"
            else:
                label = f"{p} ({e.type})"
            rows.append((change, p, label))
        return rows

    @property
    def tree_text(self) -> str:
        rows = self.entries()
        lines = [f"{_MARK[c]} {label}" for c, _, label in rows[: self.limit]]
        if len(rows) > self.limit:
            lines.append(f"… +{len(rows) - self.limit} more")
        return "\n".join(lines) or "(nothing to show with this filter)"

    @property
    def summary_text(self) -> str:
        im, ins, _ = self._data()
        k = self.layer_choice.value
        lines = [f"{ins.name}: {len(ins.layers)} layers, {human_size(ins.size)}; "
                 f"wasted {human_size(ins.wasted_bytes)}; efficiency {ins.efficiency * 100:.1f}%"]
        if k is not None:
            r = ins.layers[k]
            lines.append(f"layer {r.index}: {diagrams.created_by_text(r.created_by) or '(no history)'}")
            lines.append(f"  {human_size(r.size)}; {len(r.added)} added, {len(r.modified)} modified, "
                         f"{len(r.removed)} removed, {len(r.opaque)} opaque; "
                         f"{human_size(r.wasted_bytes)} of it wasted (hidden in the final image)")
        return "\n".join(lines)

    def _refresh(self) -> None:
        im, ins, _ = self._data()
        k = self.layer_choice.value
        self.summary.value = _pre(self.summary_text, "summary")
        if k is not None:
            self.layer_choice.tooltip = (f"layer {k}: " + (diagrams.created_by_text(ins.layers[k].created_by)
                                                           or "(no history)"))
        self.layers_table.value = layers_table_html(ins, k)
        body = []
        rows = self.entries()
        for c, _, label in rows[: self.limit]:
            body.append(f'<span title="{html.escape(label, quote=True)}" style="color:{_MARK_COLOR[c]}">'
                        f'{html.escape(_MARK[c] + " " + label)}</span>')
        more = len(rows) - self.limit
        if more > 0:
            body.append(f"… +{more} more")
        self.tree.value = ('<pre class="overlaykit-files" style="margin:0;font-size:12px;white-space:pre">'
                           + ("\n".join(body) or "(nothing to show with this filter)") + "</pre>")


def _nb(text: str) -> str:
    """Sizes never break between number and unit ("104.7 / MB")."""
    return text.replace(" ", "\u00a0")


def layers_table_html(ins, chosen=None) -> str:
    """One row per layer, dive-like: a bar as long as the layer's share of the largest layer, its wasted
    part (bytes hidden in the final image) in red, the size and the command (whole on hover)."""
    biggest = max([r.size for r in ins.layers], default=0) or 1
    rows = []
    for r in ins.layers:
        cmd = diagrams.created_by_text(r.created_by) or "(no history)"
        size_pct = 100 * r.size / biggest
        waste_pct = 100 * min(r.wasted_bytes, r.size) / r.size if r.size else 0
        bar = (f'<div class="overlaykit-bar" title="{html.escape(_nb(human_size(r.size)))}, '
               f'{html.escape(_nb(human_size(r.wasted_bytes)))} wasted" style="width:90px;height:10px;'
               f'background:#f1f5f9"><div style="width:{size_pct:.1f}%;height:10px;background:#60a5fa;'
               f'display:flex;justify-content:flex-end"><div class="overlaykit-waste" style="width:'
               f'{waste_pct:.1f}%;height:10px;background:#ef4444"></div></div></div>')
        style = "font-weight:bold;background:#fef3c7" if r.index == chosen else ""
        rows.append(f'<tr style="{style}"><td>{r.index}</td><td>{bar}</td>'
                    f'<td style="white-space:nowrap;text-align:right">{html.escape(_nb(human_size(r.size)))}</td>'
                    f'<td title="{html.escape(cmd, quote=True)}">{html.escape(diagrams._short(cmd, 40))}</td></tr>')
    return ('<table class="overlaykit-layers" style="font-size:12px;line-height:1.3"><tr><th>#</th>'
            '<th title="size, and in red the part hidden in the final image">size</th><th></th><th>command</th>'
            '</tr>' + "".join(rows) + "</table>")


# ==================================================================================================
# PredictExercise
# ==================================================================================================

class PredictExercise:
    """Predict, then check: a question, choices or a free answer, feedback and a "Show the answer" button.

    ``answer`` may be a value or a callable computing it from the live state (e.g. ``lambda:
    ov.layer_of("etc/hosts")``).  ``check(prediction)`` may return a bool or ``(bool, feedback)``;
    without it the prediction is compared with the answer (case and surrounding spaces ignored).
    """

    def __init__(self, question: str, choices=None, check=None, explanation: str = "", *, answer=None):
        if check is None and answer is None:
            raise ValueError("PredictExercise needs a check function or an answer")
        self.question_text = question
        self.choices = list(choices) if choices is not None else None
        self._check = check
        self._answer = answer
        self.explanation = explanation
        self.question = W.HTML(f'<div style="line-height:1.4"><b>{html.escape(question)}</b></div>')
        if self.choices is not None:
            self.input = W.RadioButtons(options=[str(c) for c in self.choices], value=None,
                                        layout=W.Layout(width="100%"))
        else:
            self.input = W.Text(placeholder="your prediction (Enter checks it)",
                                layout=W.Layout(width="32em", max_width="100%"))
            _on_enter(self.input, lambda: self._guard(self._do_check))
        self.check_button = W.Button(description="Check", button_style="primary")
        self.answer_button = W.Button(description="Show the answer")
        self.feedback = W.HTML()
        self.correct: bool | None = None
        self.attempts = 0
        self.check_button.on_click(lambda _b: self._guard(self._do_check))
        self.answer_button.on_click(lambda _b: self._guard(self._show_answer))
        self.widget = W.VBox([_style(), self.question, self.input,
                              W.HBox([self.check_button, self.answer_button]), self.feedback])
        self.widget.add_class("overlaykit-predict")

    def _repr_mimebundle_(self, **kwargs):
        lines = [f"Exercise: {self.question_text}"]
        lines += [f"  ( ) {c}" for c in self.choices or ()]
        lines.append("Run this cell to answer it here (the answer is checked in the notebook).")
        return _bundle(self.widget, "\n".join(lines), **kwargs)

    def __repr__(self) -> str:
        return f"PredictExercise({self.question_text!r})"

    @property
    def feedback_text(self) -> str:
        import re
        return html.unescape(re.sub(r"<[^>]+>", "", self.feedback.value.replace("<br>", "\n")))

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.feedback.value = _message_html("Could not check this: " + explain_error(e), "error")

    def answer(self):
        return self._answer() if callable(self._answer) else self._answer

    def _do_check(self) -> None:
        value = self.input.value
        if value is None or (isinstance(value, str) and not value.strip()):
            self.feedback.value = _message_html(
                "Choose an answer first." if self.choices is not None else "Type your prediction first.", "info")
            self.correct = None
            return
        if self._check is not None:
            result = self._check(value)
            ok, note = (result if isinstance(result, tuple) else (bool(result), ""))
        else:
            ok, note = _same(value, self.answer()), ""
        self.correct = bool(ok)
        self.attempts += 1
        # a second wrong answer must not look like nothing happened: say which try this was
        head = "Right!" if ok else ("Not quite." if self.attempts == 1 else f"Not quite (try {self.attempts}).")
        parts = [head] + ([note] if note else []) + ([self.explanation] if ok and self.explanation else [])
        if not ok:
            parts.append('Try again, or press "Show the answer".')
        self.feedback.value = _message_html(" ".join(parts), "ok" if ok else "error")

    def _show_answer(self) -> None:
        parts = []
        if self._answer is not None:
            parts.append(f"Answer: {_fmt(self.answer())}.")
        if self.explanation:
            parts.append(self.explanation)
        self.feedback.value = _message_html(" ".join(parts) or "No answer was given for this exercise.", "info")


def _norm(v) -> str:
    return " ".join(str(v).split()).casefold()


def _same(a, b) -> bool:
    if isinstance(b, (list, tuple, set, frozenset)) and isinstance(a, str):
        want = sorted(_norm(x) for x in b)
        got = sorted(_norm(x) for x in a.replace(",", " ").split())
        return want == got
    return _norm(a) == _norm(b)


def _fmt(v) -> str:
    if isinstance(v, (list, tuple, set, frozenset)):
        return ", ".join(str(x) for x in sorted(v)) or "(none)"
    return str(v)


__all__ = ["OverlayExplorer", "LayerInspector", "PredictExercise", "explain_error", "ERRNO_MEANING",
           "OPERATIONS", "snapshot_tree", "restore_tree", "lane_tree", "layer_states"]
