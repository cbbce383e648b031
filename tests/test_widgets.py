"""Widgets driven from Python, without a browser: set values, click, assert state and rendered output."""
from __future__ import annotations

import os
import re
import shutil

import pytest

pytest.importorskip("ipywidgets")

from overlaykit import Overlay  # noqa: E402
from overlaykit.widgets import LayerInspector, OverlayExplorer, PredictExercise, explain_error  # noqa: E402

ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")


@pytest.fixture
def explorer(tmp_path):
    for d in ("l0/etc", "l0/d", "upper", "work"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "l0/etc/hosts").write_text("127.0.0.1\n")
    (tmp_path / "l0/d/f").write_text("f")
    (tmp_path / "upper/pre").write_text("in upper from the start")
    ov = Overlay([tmp_path / "l0"], tmp_path / "upper", tmp_path / "work", backend="sim")
    ex = OverlayExplorer(ov)
    yield ex
    ex.close()
    assert not ov.mounted


def run(ex, op, path, path2="", content="", mode="644"):
    ex.op.value, ex.path.value, ex.path2.value, ex.content.value, ex.mode.value = op, path, path2, content, mode
    ex.apply_button.click()
    return ex.message_text


def test_append_copies_up_and_all_views_follow(explorer):
    ex = explorer
    assert run(ex, "append", "etc/hosts", content="10.0.0.1\n") == "done: append /etc/hosts"
    assert (ex.ov.upper / "etc/hosts").read_text() == "127.0.0.1\n10.0.0.1\n"
    t = ex.trees()
    assert "hosts (19 B)  [copied-up]" in t["upper"]
    assert "hosts (10 B)  [shadowed by upper]" in t["lower"]
    assert "hosts (19 B)  [upper]" in t["merged"]
    assert "opened for append: 10 bytes copied into work/, renamed into upper/, from lower[0]" in ex.trace_text
    assert "10 bytes copied" in ex.trace_view.value
    assert "etc/hosts (19 B)" in ex.diagram.value
    assert not ex.undo_button.disabled


def test_delete_makes_a_whiteout(explorer):
    assert run(explorer, "delete", "d/f") == "done: delete /d/f"
    assert "f (whiteout)  [whiteout, hides lower[0]'s entry]" in explorer.trees()["upper"]
    assert "f (1 B)  [hidden by a whiteout in upper]" in explorer.trees()["lower"]
    assert "whiteout created in upper/" in explorer.trace_text


@pytest.mark.parametrize("op,path,path2,mode,message", [
    ("write", "", "", "644", "Empty path: name a file or directory inside the overlay ('.' is its root)"),
    ("write", "../x", "", "644", "Path '../x' leaves the overlay's root"),
    ("rmdir", "d", "", "644", "ENOTEMPTY: the directory is not empty: remove what is inside it first (/d)"),
    ("rename", "d", "e", "644", "EXDEV: the kernel will not rename a directory that exists in a lower layer "
                                "(redirect_dir=off); mv copies it and deletes the original instead (/d)"),
    ("rename", "d", "", "644", "Rename needs a new path"),
    ("create", "etc/hosts", "", "644", "EEXIST: something with that name already exists (/etc/hosts)"),
    ("delete", "nope", "", "644", "ENOENT: no such file or directory in the merged view (or a whiteout hides it) (/nope)"),
    ("chmod", "etc/hosts", "", "9z", "Mode '9z' is not octal: write it like 644 or 0755"),
])
def test_bad_input_gives_a_message_not_a_traceback(explorer, op, path, path2, mode, message):
    before = explorer.trees()
    assert run(explorer, op, path, path2, mode=mode) == message
    assert explorer.last_error == message
    assert "Traceback" not in explorer.message.value
    assert explorer.trees() == before


def test_exdev_trace_is_shown(explorer):
    run(explorer, "rename", "d", "e")
    assert "redirect_dir=off" in explorer.trace_text and "error" in explorer.trace_text


def test_fields_follow_the_operation(explorer):
    ex = explorer
    ex.op.value = "rename"
    assert ex.path2.layout.display == "" and ex.content.layout.display == "none"
    ex.op.value = "symlink"
    assert ex.path2.description == "points to" and ex.path.description == "link path"
    ex.op.value = "chmod"
    assert ex.mode.layout.display == "" and ex.path2.layout.display == "none"
    ex.op.value = "write"
    assert ex.content.layout.display == "" and ex.mode.layout.display == "none"


def test_every_operation(explorer):
    ex = explorer
    assert run(ex, "create", "new.txt", content="hi") == "done: create /new.txt"
    assert run(ex, "write", "new.txt", content="bye") == "done: write /new.txt"
    assert run(ex, "mkdir", "dir") == "done: mkdir /dir"
    assert run(ex, "rmdir", "dir") == "done: rmdir /dir"
    assert run(ex, "rename", "new.txt", "moved.txt") == "done: rename /new.txt -> moved.txt"
    assert run(ex, "chmod", "etc/hosts", mode="600") == "done: chmod /etc/hosts"
    assert run(ex, "symlink", "link", "etc/hosts") == "done: symlink /link -> etc/hosts"
    assert ex.ov.read_text("moved.txt") == "bye" and ex.ov.stat("etc/hosts").mode == 0o600
    assert "link -> etc/hosts  [upper]" in ex.trees()["merged"]
    assert "hosts (10 B)  [metadata-only]" in ex.trees()["upper"]


def test_undo_and_reset_restore_upper(explorer):
    ex = explorer  # upper/pre existed before the explorer started: reset must keep it
    run(ex, "delete", "pre")
    run(ex, "delete", "d/f")
    run(ex, "append", "etc/hosts", content="x")
    ex.undo_button.click()
    assert ex.message_text == "undone: append /etc/hosts"
    assert ex.ov.read_text("etc/hosts") == "127.0.0.1\n" and not ex.ov.exists("d/f")
    assert ex.ov.layer_of("etc/hosts") == "lower[0]"
    ex.reset_button.click()
    assert ex.message_text == "reset to the starting layers"
    assert sorted(os.listdir(ex.ov.upper)) == ["pre"] and ex.ov.exists("d/f")
    assert ex.undo_button.disabled
    ex.undo_button.click()
    assert ex.message_text == "nothing to undo"


def test_undo_restores_whiteout_devices_and_opaque_dirs(explorer):
    ex = explorer
    run(ex, "delete", "d/f")
    run(ex, "rmdir", "d")
    run(ex, "mkdir", "d")  # an opaque directory replaces the lower one
    assert "d/ (opaque)" in ex.trees()["upper"]
    run(ex, "write", "x", content="1")
    ex.undo_button.click()
    assert "d/ (opaque)" in ex.trees()["upper"] and ex.ov.listdir("d") == []
    ex.undo_button.click()
    assert "d (whiteout)" in ex.trees()["upper"] and not ex.ov.exists("d")


def test_without_dot_the_explorer_shows_text(explorer, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    run(explorer, "write", "etc/hosts", content="z")
    assert "not installed" in explorer.diagram.value and "<pre>" in explorer.diagram.value


def test_reprs_have_no_addresses(explorer):
    text = repr(explorer) + str(explorer.trees()) + explorer.trace_text
    assert not ADDRESS.search(text)
    assert repr(explorer) == "OverlayExplorer(lowers=[l0], upper=upper, 0 change(s) to undo)"
    ex = PredictExercise("Which layer serves /etc/hosts?", ["upper", "lower[0]"], answer="lower[0]")
    assert repr(ex) == "PredictExercise('Which layer serves /etc/hosts?')"
    assert "application/vnd.jupyter.widget-view+json" in explorer._repr_mimebundle_()


def test_explorer_leaves_a_mounted_overlay_mounted(tmp_path):
    for d in ("l0", "upper", "work"):
        (tmp_path / d).mkdir()
    with Overlay([tmp_path / "l0"], tmp_path / "upper", tmp_path / "work", backend="sim") as ov:
        OverlayExplorer(ov, diagram=False).close()
        assert ov.mounted


def test_predict_with_choices_and_live_answer(explorer):
    ov = explorer.ov
    q = PredictExercise("Which layer serves /etc/hosts?", ["upper", "lower[0]"],
                        explanation="Nothing has written to it, so the lower layer serves it.",
                        answer=lambda: ov.layer_of("etc/hosts"))
    q.check_button.click()
    assert q.feedback_text == "Choose an answer first." and q.correct is None
    q.input.value = "upper"
    q.check_button.click()
    assert q.correct is False and q.feedback_text.startswith("Not quite.")
    q.input.value = "lower[0]"
    q.check_button.click()
    assert q.correct is True and "the lower layer serves it" in q.feedback_text
    run(explorer, "append", "etc/hosts", content="!")  # the live answer follows the state
    q.check_button.click()
    assert q.correct is False
    q.answer_button.click()
    assert q.feedback_text.startswith("Answer: upper.")


def test_predict_free_answer_and_check_function():
    q = PredictExercise("Which files appear in upper/?", answer=["etc", "etc/hosts"])
    q.input.value = " etc/hosts,  etc "
    q.check_button.click()
    assert q.correct is True
    c = PredictExercise("How many MB?", check=lambda v: (float(v) == 63, "63 MB: the base layer"), explanation="")
    c.input.value = "12"
    c.check_button.click()
    assert not c.correct and "63 MB: the base layer" in c.feedback_text
    c.input.value = "not a number"
    c.check_button.click()
    assert c.feedback_text.startswith("Could not check this: ") and "Traceback" not in c.feedback.value
    with pytest.raises(ValueError):
        PredictExercise("no way to check")


def test_explain_error_words():
    import errno
    assert explain_error(OSError(errno.EROFS, "x", "a")).startswith("EROFS: the overlay is read-only")
    assert explain_error(OSError(errno.EDOM, os.strerror(errno.EDOM), "a")) == f"EDOM: {os.strerror(errno.EDOM)} (/a)"


# -- LayerInspector on real layers from the images API ------------------------------------------------

def build_image():
    images = pytest.importorskip("overlaykit.images")
    E = images.LayerEntry
    l0 = images.Layer.from_entries([(E("etc", "dir", mode=0o755), None), (E("etc/motd", "file", size=5), b"hello"),
                                    (E("var/cache", "dir"), None), (E("var/cache/big", "file", size=1000), b"x" * 1000)])
    l1 = images.Layer.from_entries([(E("etc", "dir", mode=0o755), None), (E("etc/motd", "file", size=3), b"bye"),
                                    (E("etc/new", "file", size=2), b"nn"), (E("var/cache/big", "whiteout"), None)])
    hist = [images.History("/bin/sh -c #(nop) ADD file:base in / "), images.History("/bin/sh -c cleanup")]
    return images.Image("demo:1", [l0, l1], history=hist)


def test_layer_inspector_marks_changes_and_filters():
    img = build_image()
    li = LayerInspector(img)
    assert li.layer_choice.value == 1
    rows = {p: c for c, p, _ in li.entries()}
    assert rows["etc/motd"] == "modified" and rows["etc/new"] == "added" and rows["var/cache/big"] == "removed"
    assert "- var/cache/big" in li.tree_text and "+ etc/new (2 B)" in li.tree_text
    li.filter.value = "added"
    assert li.tree_text == "+ etc/new (2 B)"
    li.filter.value = "removed"
    assert li.tree_text == "- var/cache/big"
    li.filter.value = "all"
    li.layer_choice.value = 0
    assert "+ var/cache/big (1.0 kB)" in li.tree_text
    assert "wasted" in li.summary_text and "efficiency" in li.summary_text
    assert "RUN cleanup" in li.layer_choice.options[1][0]
    assert not ADDRESS.search(repr(li) + li.summary_text + li.tree_text)


def test_layer_inspector_bars_tooltips_and_scroll_box():
    """Issue 13.9: proportional bars with the wasted part, full command on hover, sizes that do not wrap,
    the file list in a scroll box, the filter on its label's line."""
    li = LayerInspector(build_image())
    table = li.layers_table.value
    widths = [float(w) for w in re.findall(r'<div style="width:([\d.]+)%;height:10px;background:#60a5fa', table)]
    from overlaykit.images import inspect
    ins = inspect(build_image())
    biggest = max(r.size for r in ins.layers)
    assert widths == [pytest.approx(100 * r.size / biggest, abs=0.1) for r in ins.layers]
    waste = [float(w) for w in re.findall(r'class="overlaykit-waste" style="width:([\d.]+)%', table)]
    # layer 0's var/cache/big (1000 B) and etc/motd (5 B) are hidden in the final image; layer 1 wastes nothing
    assert waste == [pytest.approx(100 * 1005 / ins.layers[0].size, abs=0.1), 0.0]
    assert "10.2\u00a0kB" in table and " kB<" not in table
    assert 'title="RUN cleanup"' in table
    assert li.layer_choice.tooltip == "layer 1: RUN cleanup"
    assert li.tree.layout.max_height == "420px" and li.tree.layout.overflow == "auto"
    assert li.filter.style.button_width == "auto"


def test_layer_inspector_switches_images():
    img = build_image()
    images = pytest.importorskip("overlaykit.images")
    other = images.Image("one:1", img.layers[:1], history=img.history[:1])
    li = LayerInspector([img, other])
    li.image_choice.value = 1
    assert len(li.layer_choice.options) == 1 and li.summary_text.startswith("one:1: 1 layers")


def test_widgets_carry_stable_css_classes(explorer):
    # browser tests and the course's CSS find the widgets by these classes, not by their layout
    assert "overlaykit-explorer" in explorer.widget._dom_classes
    assert "overlaykit-predict" in PredictExercise("?", answer="x").widget._dom_classes
    inspector = LayerInspector(build_image())
    assert "overlaykit-layer-inspector" in inspector.widget._dom_classes


def test_tree_lines_end_in_an_ellipsis_with_the_whole_note_on_hover(explorer):
    """Issue 13.5/13.7: tree columns never run into each other, the trace wraps instead of scrolling."""
    run(explorer, "delete", "d/f")
    for view in (explorer.lower_tree, explorer.upper_tree, explorer.merged_tree):
        spans = re.findall(r'<span title="([^"]*)" style="([^"]*)">', view.value)
        assert spans and all("text-overflow:ellipsis" in st and "overflow:hidden" in st for _, st in spans)
    assert "f (whiteout)  [whiteout, hides lower[0]&#x27;s entry]" in \
        [t for t, _ in re.findall(r'<span title="([^"]*)" style="([^"]*)">', explorer.upper_tree.value)]
    style = re.search(r'<pre class="overlaykit-trace" style="([^"]*)"', explorer.trace_view.value).group(1)
    assert "white-space:pre-wrap" in style and "overflow-wrap:anywhere" in style


def test_enter_in_the_path_field_applies(explorer):
    explorer.op.value, explorer.path.value = "delete", "d/f"
    explorer.path._handle_string_msg(None, {"event": "submit"}, None)  # what Enter sends
    assert explorer.message_text == "done: delete /d/f"


def test_the_diagram_draws_the_entry_just_touched_beyond_the_limit(tmp_path):
    """Issue 13.6: deleting etc/motd, alphabetically past the first 10 entries, still draws the whiteout
    and the lower etc/motd it hides."""
    for d in ("l0/a", "upper", "work"):
        (tmp_path / d).mkdir(parents=True)
    for k in range(12):
        (tmp_path / f"l0/a/f{k:02d}").write_text("x")
    (tmp_path / "l0/etc").mkdir()
    (tmp_path / "l0/etc/motd").write_text("hi")
    ov = Overlay([tmp_path / "l0"], tmp_path / "upper", tmp_path / "work", backend="sim")
    ex = OverlayExplorer(ov)
    try:
        assert "etc/motd (2 B)" not in ex.diagram.value  # cut by the limit before anything happens
        assert run(ex, "delete", "etc/motd") == "done: delete /etc/motd"
        svg = ex.diagram.value
        assert "etc/motd (whiteout)" in svg and "etc/motd (2 B)" in svg and "hidden by a whiteout in upper" in svg
        assert "more" in svg  # the rest is still summarised
    finally:
        ex.close()


def test_rerunning_the_workspace_cell_retires_the_explorer(tmp_path, monkeypatch):
    """Issue 13.8: the explorer says in one sentence that its layers were reset, instead of ENOENT."""
    from overlaykit import course
    monkeypatch.chdir(tmp_path)
    ws = course.workspace("t")
    ex = OverlayExplorer(course.lesson_overlay(ws, backend="sim"))
    ws = course.workspace("t")  # the workspace cell runs again
    assert not ex.ov.mounted
    for button in (ex.apply_button, ex.reset_button):
        button.click()
        assert ex.message_text.startswith("This explorer stopped: its workspace was reset")
        assert "ENOENT" not in ex.message_text and "whiteout" not in ex.message_text
    # folders deleted some other way are noticed at the next action too
    new = OverlayExplorer(course.lesson_overlay(ws, backend="sim"))
    (ws / "upper").rename(ws / "upper.old")  # kept, so that the new folder cannot reuse its inode
    (ws / "upper").mkdir()
    run(new, "write", "x", content="1")
    assert new.message_text.startswith("This explorer stopped: its layer folders were deleted or made again")
    new.close()


def test_a_new_explorer_on_the_same_upper_retires_the_old_one(tmp_path):
    for d in ("l0", "upper", "work"):
        (tmp_path / d).mkdir()
    old = OverlayExplorer(Overlay([tmp_path / "l0"], tmp_path / "upper", tmp_path / "work", backend="sim"))
    new = OverlayExplorer(Overlay([tmp_path / "l0"], tmp_path / "upper", tmp_path / "work", backend="sim"))
    assert not old.ov.mounted and old.stale and new.ov.mounted and not new.stale
    new.close()


def test_text_fallbacks_are_sentences_not_reprs(explorer):
    """Issue 13.1: where a widget cannot be drawn (untrusted notebook, static viewer) its text/plain shows."""
    from overlaykit import course
    q = PredictExercise("Which layer serves /etc/hosts?", ["upper", "lower[0]"], answer="lower[0]")
    t = PredictExercise("How many?", answer="4")
    layer = course.layer_from_files({"etc/hosts": "x"})
    ins = LayerInspector(course.image_from_layers("demo", [("COPY hosts /etc/", layer)]))
    texts = {k: w._repr_mimebundle_()["text/plain"] for k, w in
             {"q": q, "t": t, "explorer": explorer, "inspector": ins}.items()}
    for k, text in texts.items():
        assert "children=" not in text and "VBox" not in text and not ADDRESS.search(text), text
        assert "Run this cell" in text or "run this cell" in text, text
        assert "application/vnd.jupyter.widget-view+json" in \
            {"q": q, "t": t, "explorer": explorer, "inspector": ins}[k]._repr_mimebundle_()
    assert texts["q"].splitlines()[:3] == ["Exercise: Which layer serves /etc/hosts?", "  ( ) upper",
                                           "  ( ) lower[0]"]
    assert "demo" in texts["inspector"]


def test_second_wrong_answer_says_try_2_and_enter_checks():
    """Issue 13.4: a repeated wrong answer visibly changes; Enter (the front end's submit event) checks."""
    import warnings
    q = PredictExercise("How many?", answer="4")
    q.input.value = "3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning may reach the learner's output
        q.input._handle_string_msg(None, {"event": "submit"}, None)  # what Enter sends
    first = q.feedback_text
    assert first.startswith("Not quite.")
    q.check_button.click()
    assert q.feedback_text.startswith("Not quite (try 2).") and q.feedback_text != first
    q.input.value = "4"  # a value set from Python alone does not check
    assert q.feedback_text.startswith("Not quite (try 2).")
    q.check_button.click()
    assert q.correct is True and q.feedback_text.startswith("Right!")
    assert "line-height:1.4" in q.feedback.value  # not ipywidgets' 28 px line (double spacing)


def _helpers() -> list[int]:
    """This process's live kernel-overlay helpers (``python -m overlaykit._nsworker``)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[1]) == os.getpid() and b"overlaykit._nsworker" in cmd:
            out.append(int(pid))
    return out


@pytest.mark.kernel
def test_rerunning_workspace_and_explorer_cells_leaves_one_helper(tmp_path, monkeypatch):
    """Issue 13.8: each re-run used to leave one more helper process until the kernel stopped."""
    from overlaykit import course
    from overlaykit.capabilities import capabilities
    info = capabilities()["kernel"]
    if not info.available:
        pytest.skip(f"kernel backend not allowed: {info.reason}")
    monkeypatch.chdir(tmp_path)
    kept = []  # what ipywidgets' registry and IPython's Out[] keep alive in a real kernel
    try:
        for _ in range(4):
            ws = course.workspace("leak")
            kept.append(OverlayExplorer(course.lesson_overlay(ws, backend="kernel")))
            assert len(_helpers()) == 1, _helpers()
        # the explorer's cell alone running again (same workspace) retires the previous explorer too
        kept.append(OverlayExplorer(course.lesson_overlay(ws, backend="kernel")))
        assert len(_helpers()) == 1 and kept[-2].stale
    finally:
        for ex in kept:
            ex.close()
    assert _helpers() == []


def test_enter_waits_for_keystrokes_that_arrive_after_it(explorer):
    """In a kernel, the submit event can overtake the last value update (ipywidgets holds those back while
    the kernel is busy): the explorer must apply what was typed, not a prefix of it."""
    import asyncio

    async def scenario():
        explorer.op.value, explorer.path.value = "write", "b"
        explorer.path._handle_string_msg(None, {"event": "submit"}, None)   # Enter, overtaking...
        explorer.path.value = "browser-test.txt"                            # ...the rest of the typing
        await asyncio.sleep(0.05)
        first = explorer.message_text
        explorer.path._handle_string_msg(None, {"event": "submit"}, None)   # Enter, nothing pending
        await asyncio.sleep(0.5)
        return first, explorer.message_text, explorer.trees()["upper"]
    first, second, upper = asyncio.run(scenario())
    assert first == "done: write /browser-test.txt"
    assert second == "done: write /browser-test.txt"
    assert "b (" not in upper.replace("browser-test.txt", "")
