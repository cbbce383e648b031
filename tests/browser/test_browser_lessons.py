"""Every lesson as a learner meets it in JupyterLab: first opened untrusted, then run and used (issue 13).

For each notebooks/*.ipynb (found by glob, so a new lesson is covered without editing this file):
1. opened fresh and untrusted, before any cell runs: every stored diagram is a drawn picture and every widget
   shows its stored state or its one-sentence text fallback (never ipywidgets' ``VBox(children=...`` repr);
2. run (Run All), then used: one explorer operation (Enter in the path field), one wrong and one right
   answer to an exercise, one inspector filter;
3. checked from the DOM at the lab's default width (about 968 px of output, file browser open) and again at
   600 px: no radio circle covered by another element, no output wider than its output area, no widget repr
   text, no "Error displaying widget".
A screenshot of each lesson goes to test-artifacts/lesson-NN.png. Lessons run a few at a time, each in a
page and kernel of its own, so the slowest (06 builds images) overlaps the others.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
# OVERLAYKIT_BROWSER_LESSONS="0[35]*" narrows the run while working on a lesson
LESSONS = sorted(p.name for p in (REPO / "notebooks").glob(os.environ.get("OVERLAYKIT_BROWSER_LESSONS", "*")
                                                                + (".ipynb" if "ipynb" not in
                                                                   os.environ.get("OVERLAYKIT_BROWSER_LESSONS", "*")
                                                                   else "")))
AT_ONCE = 3            # pages (kernels) running at the same time
NARROW = 600           # px of output width for the second layout check
pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

from .test_browser_overlay_explorer import NOTEBOOK_STATE_JS, RUN_OVER_JS  # noqa: E402

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# What the stored notebook holds, from JupyterLab's model: which outputs are diagrams and which widgets.
STORED_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    let diagrams = 0, widgets = 0;
    for (const c of Array.from(panel.content.model.cells)) {
        if (c.type !== 'code') continue;
        for (let i = 0; i < c.outputs.length; i++) {
            const d = c.outputs.get(i).toJSON().data || {};
            if (typeof d['text/html'] === 'string' ? d['text/html'].includes('overlaykit-diagram')
                : (d['text/html'] || []).join('').includes('overlaykit-diagram')) diagrams++;
            if (d['application/vnd.jupyter.widget-view+json']) widgets++;
        }
    }
    const code = Array.from(panel.content.model.cells).filter(c => c.type === 'code');
    return {diagrams, widgets, trusted: code.length > 0 && code.every(c => c.trusted)};
}"""

# Drawn diagrams: <img class="overlaykit-diagram"> loaded with a real size.
DRAWN_DIAGRAMS_JS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel img.overlaykit-diagram'))
    .filter(i => i.complete && i.naturalWidth > 0).length"""

# The layout checks, computed in the page over every output of the open notebook.
LAYOUT_JS = r"""() => {
    const problems = [];
    const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
    const text = panel.innerText;
    const repr = text.match(/\b(VBox|HBox|RadioButtons|Dropdown|ToggleButtons)\(children=|\b(VBox|HBox)\(/);
    if (repr) problems.push(`widget repr text: ${text.substr(Math.max(0, repr.index - 40), 120)}`);
    if (text.includes('Error displaying widget')) problems.push('"Error displaying widget"');
    let width = 0;
    for (const out of panel.querySelectorAll('.jp-OutputArea-output')) {
        width = Math.max(width, out.clientWidth);
        if (out.scrollWidth > out.clientWidth + 2) {
            const cell = out.closest('.jp-Cell');
            const n = Array.from(panel.querySelectorAll('.jp-Cell')).indexOf(cell);
            problems.push(`cell ${n}: output ${out.scrollWidth}px wide in ${out.clientWidth}px`);
        }
    }
    // nothing sticks out of its output area on the right (where the area clips, scrollWidth cannot tell),
    // except inside a box that scrolls or clips on purpose (the inspector's file list, a tree line)
    for (const out of panel.querySelectorAll('.jp-OutputArea-output')) {
        const right = out.getBoundingClientRect().right;
        for (const el of out.querySelectorAll('*')) {
            const r = el.getBoundingClientRect();
            if (!r.width || r.right <= right + 1) continue;
            let clipped = false;
            for (let a = el.parentElement; a && a !== out; a = a.parentElement) {
                if (/auto|scroll|hidden/.test(getComputedStyle(a).overflowX)) { clipped = true; break; }
            }
            if (clipped) continue;
            problems.push(`${el.tagName.toLowerCase()}.${String(el.className).slice(0, 60)} ends ` +
                          `${Math.round(r.right - right)}px right of its output area`);
            break;
        }
    }
    // no sideways scrolling inside the course's widgets either (trace lines, trees, file lists wrap)
    for (const el of panel.querySelectorAll('.overlaykit-explorer pre, .overlaykit-predict *')) {
        if (el.scrollWidth > el.clientWidth + 2 && el.clientWidth > 0) {
            problems.push(`${el.tagName.toLowerCase()}.${el.className}: ${el.scrollWidth}px in ${el.clientWidth}px`);
        }
    }
    // a tree line longer than its column ends in an ellipsis inside the column (not under the next one)
    for (const span of panel.querySelectorAll('.overlaykit-explorer pre span[title]')) {
        const col = span.closest('.widget-html');
        const r = span.getBoundingClientRect();
        if (r.width && col && r.right > col.getBoundingClientRect().right + 1) {
            problems.push(`explorer tree line "${span.title.slice(0, 40)}" runs ${Math.round(r.right -
                          col.getBoundingClientRect().right)}px past its column`);
            break;
        }
    }
    let radios = 0;
    for (const r of panel.querySelectorAll('.overlaykit-predict input[type=radio]')) {
        r.scrollIntoView({block: 'center'});
        const b = r.getBoundingClientRect();
        if (!b.width) continue;
        radios++;
        const hit = document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2);
        const label = r.closest('label');
        if (!(hit === r || (label && label.contains(hit)))) {
            problems.push(`radio "${label ? label.innerText.slice(0, 50) : '?'}" is covered by ` +
                          `${hit ? hit.tagName + '.' + hit.className : 'nothing'}`);
        }
    }
    return {problems, width, radios};
}"""


def _open(page, server, lesson: str, n: int) -> None:
    # a workspace of its own per page, so that pages do not restore each other's open notebooks
    page.goto(f"{server.url}/lab/workspaces/w{n}/tree/{lesson}?reset&token={server.token}")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('#jp-main-statusbar')?.innerText.includes('Idle')",
                           timeout=60_000)


def _menu(page, top: str, item: str) -> None:
    page.locator("#jp-menu-panel").get_by_role("menuitem", name=top, exact=True).click()
    page.get_by_role("menuitem", name=item, exact=True).click()


def _before_running(page, lesson: str) -> list[str]:
    """Untrusted and not run: diagrams drawn, widgets as stored state or their sentence."""
    stored = page.evaluate(STORED_JS)
    problems = []
    if stored["trusted"]:
        problems.append("the fresh copy is trusted: this check would not see what an untrusted one shows")
    if stored["diagrams"]:
        try:
            page.wait_for_function(f"() => ({DRAWN_DIAGRAMS_JS})() >= {stored['diagrams']}", timeout=15_000)
        except Exception:
            problems.append(f"{page.evaluate(DRAWN_DIAGRAMS_JS)} of {stored['diagrams']} stored diagrams drawn")
    if stored["widgets"]:
        shown = page.evaluate("""() => {
            const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
            return {views: p.querySelectorAll('.jupyter-widgets.widget-vbox').length,
                    sentences: (p.innerText.match(/[Rr]un this cell/g) || []).length};
        }""")
        if shown["views"] + shown["sentences"] < stored["widgets"]:
            problems.append(f"{stored['widgets']} stored widgets, but {shown['views']} drawn and "
                            f"{shown['sentences']} fallback sentences")
    problems += page.evaluate(LAYOUT_JS)["problems"]
    return [f"{lesson} before running: {p}" for p in problems]


def _explorer_operation(page) -> list[str]:
    ex = page.locator(".overlaykit-explorer").first
    if not ex.count():
        return []
    ex.scroll_into_view_if_needed()
    ex.locator("select").first.select_option(label="write")
    path = ex.locator(".widget-text", has=page.locator("label", has_text=re.compile(r"^path$"))).locator("input")
    path.click()
    path.press("Control+a")
    path.press_sequentially("browser-test.txt")
    path.press("Enter")  # Enter applies (issue 13.7)
    try:
        page.wait_for_function("() => document.querySelector('.overlaykit-explorer')?.innerText"
                               ".includes('done: write /browser-test.txt')", timeout=20_000)
    except Exception:
        return ["explorer: Enter in the path field did not apply 'write /browser-test.txt': "
                + ex.inner_text()[:300]]
    return []


def _feedback(box) -> str:
    return box.locator(".widget-html").last.inner_text().strip()


def _answer_exercises(page) -> list[str]:
    """One wrong and one right answer, on the first exercise with choices and the first with a text field."""
    problems = []
    boxes = page.locator(".overlaykit-predict")
    with_choices = boxes.filter(has=page.locator("input[type=radio]")).first
    if with_choices.count():
        with_choices.scroll_into_view_if_needed()
        labels = with_choices.locator(".widget-radio-box label")
        seen = set()
        for i in range(labels.count()):
            labels.nth(i).locator("input").click()   # the circle itself: it must be clickable
            with_choices.get_by_role("button", name="Check").click()
            page.wait_for_timeout(150)
            fb = ""
            for _ in range(50):
                fb = _feedback(with_choices)
                if fb.startswith(("Right!", "Not quite")) and fb not in seen:
                    break
                page.wait_for_timeout(100)
            seen.add(fb)
            if fb.startswith("Right!") and any(s.startswith("Not quite") for s in seen):
                break
        if not any(s.startswith("Right!") for s in seen) or not any(s.startswith("Not quite") for s in seen):
            problems.append(f"exercise with choices: expected a wrong and a right answer, saw {sorted(seen)}")
    with_text = boxes.filter(has=page.locator(".widget-text input")).first
    if with_text.count():
        with_text.scroll_into_view_if_needed()
        field = with_text.locator(".widget-text input")
        field.fill("certainly not this")
        field.press("Enter")  # Enter checks (issue 13.4)
        try:
            page.wait_for_function("b => b.innerText.includes('Not quite')", arg=with_text.element_handle(),
                                   timeout=10_000)
        except Exception:
            problems.append("text exercise: Enter did not check the answer: " + with_text.inner_text()[:200])
            return problems
        with_text.get_by_role("button", name="Show the answer").click()
        page.wait_for_function("b => b.innerText.includes('Answer: ')", arg=with_text.element_handle(),
                               timeout=10_000)
        m = re.search(r"Answer: (.*?)\.(\s|$)", _feedback(with_text))
        if m:
            field.fill(m.group(1))
            field.press("Enter")
            try:
                page.wait_for_function("b => b.innerText.includes('Right!')", arg=with_text.element_handle(),
                                       timeout=10_000)
            except Exception:
                problems.append(f"text exercise: the shown answer {m.group(1)!r} was not accepted")
    return problems


def _inspector_filter(page) -> list[str]:
    ins = page.locator(".overlaykit-layer-inspector").first
    if not ins.count():
        return []
    ins.scroll_into_view_if_needed()
    ins.get_by_role("button", name="added", exact=True).click()
    page.wait_for_timeout(500)
    text = ins.inner_text()
    if "Traceback" in text or "Error" in text:
        return [f"inspector filter 'added': {text[:300]}"]
    return []


def _set_output_width(page, want: int) -> int:
    """Resize the window so that outputs are about ``want`` px wide; returns the width measured."""
    size = page.viewport_size
    width = page.evaluate(LAYOUT_JS)["width"] or 968
    page.set_viewport_size({"width": size["width"] - (width - want), "height": size["height"]})
    page.wait_for_timeout(400)
    return page.evaluate(LAYOUT_JS)["width"]


SCROLLER_JS = """() => {
    const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
    const all = [p, ...p.querySelectorAll('*')].filter(e => e.scrollHeight > e.clientHeight + 10 &&
        /auto|scroll/.test(getComputedStyle(e).overflowY));
    all.sort((a, b) => b.scrollHeight - a.scrollHeight);
    if (!all.length) return 0;
    all[0].scrollTop = 0;
    return all[0].scrollHeight - all[0].clientHeight;
}"""


def _screenshot(page, name: str) -> None:
    """The whole notebook in one picture: a window as tall as the notebook (capped), then back."""
    size = page.viewport_size
    extra = page.evaluate(SCROLLER_JS)
    page.set_viewport_size({"width": size["width"], "height": min(size["height"] + extra + 50, 16_000)})
    page.wait_for_timeout(400)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    page.set_viewport_size(size)
    page.wait_for_timeout(200)


def test_every_lesson_first_open_run_and_use(chromium_path, browser_page, lab_server):
    assert LESSONS, "notebooks/ has no lesson"
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser_page.context
    problems: list[str] = []
    timings: dict[str, float] = {}
    stored: dict[str, dict] = {}
    start = time.monotonic()
    for batch_start in range(0, len(LESSONS), AT_ONCE):
        batch = LESSONS[batch_start:batch_start + AT_ONCE]
        pages = {}
        for n, lesson in enumerate(batch, batch_start):
            page = browser_page if n == 0 else context.new_page()
            page.set_viewport_size({"width": 1400, "height": 1000})
            t0 = time.monotonic()
            _open(page, lab_server, lesson, n)
            problems += _before_running(page, lesson)
            stored[lesson] = page.evaluate(STORED_JS)
            if os.environ.get("OVERLAYKIT_BROWSER_BEFORE_SHOTS"):
                _screenshot(page, f"lesson-{lesson.split('-')[0]}-before")
            _menu(page, "Edit", "Clear Outputs of All Cells")
            page.wait_for_function(f"({NOTEBOOK_STATE_JS})().pending > 0", timeout=10_000)
            _menu(page, "Run", "Run All Cells")
            pages[lesson] = (page, t0)
        for lesson, (page, t0) in pages.items():
            page.bring_to_front()
            try:
                page.wait_for_function(RUN_OVER_JS, timeout=180_000, polling=300)
                state = page.evaluate(NOTEBOOK_STATE_JS)
                if state["errors"] or state["pending"]:
                    problems.append(f"{lesson}: errors {state['errors']}, {state['pending']} cells not run")
                    continue
                found = _explorer_operation(page) + _answer_exercises(page) + _inspector_filter(page)
                found += page.evaluate(LAYOUT_JS)["problems"]
                _screenshot(page, f"lesson-{lesson.split('-')[0]}")
                narrow = _set_output_width(page, NARROW)
                found += [f"at {narrow}px: {p}" for p in page.evaluate(LAYOUT_JS)["problems"]]
                _screenshot(page, f"lesson-{lesson.split('-')[0]}-{NARROW}px")
                problems += [f"{lesson}: {p}" for p in found]
                page.set_viewport_size({"width": 1400, "height": 1000})
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / f"lesson-{lesson.split('-')[0]}-failure.png"))
                raise
            finally:
                timings[lesson] = time.monotonic() - t0
                page.evaluate("() => window.jupyterapp.shell.currentWidget?.sessionContext?.shutdown()")
                if page is not browser_page:
                    page.close()
    took = time.monotonic() - start
    (ARTIFACTS / "browser-lessons-timing.txt").write_text(
        "".join(f"{k}: {v:.1f}s (stored: {stored.get(k)})\n" for k, v in timings.items()) + f"total: {took:.1f}s\n")
    assert not problems, "\n".join(problems)


def test_a_trusted_lesson_shows_its_widgets_before_running(chromium_path, browser_page, lab_server, tmp_path):
    """Where the course is installed (Binder's postBuild, ./dev course) the lessons are trusted, and then
    JupyterLab draws every widget from the state stored in the notebook, before any cell runs."""
    import subprocess
    import sys
    lesson = next((name for name in LESSONS if (lab_server.root / name).read_text().count(WIDGET_MIME) >= 2
                   and "widget-state+json" in (lab_server.root / name).read_text()), None)
    if lesson is None:
        pytest.skip("no lesson stores widget state yet (./dev notebooks stores it)")
    # `jupyter trust`, with the server's own data dir (where its notary keeps signatures)
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "jupyter" / "data"))
    subprocess.run([sys.executable, "-m", "nbformat.sign", str(lab_server.root / lesson)], env=env, check=True,
                   capture_output=True, timeout=60)
    page = browser_page
    _open(page, lab_server, lesson, 0)
    stored = page.evaluate(STORED_JS)
    assert stored["trusted"], "the signed lesson did not open trusted"
    drawn = ("() => document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output "
             ".jupyter-widgets.widget-vbox[class*=\"overlaykit-\"]').length")
    try:
        page.wait_for_function(f"() => ({drawn})() >= {stored['widgets']}", timeout=30_000)
    except Exception:
        pytest.fail(f"{page.evaluate(drawn)} of {stored['widgets']} stored widgets drawn in trusted {lesson}")
    problems = page.evaluate(LAYOUT_JS)["problems"]
    assert not problems, problems
    _screenshot(page, f"lesson-{lesson.split('-')[0]}-trusted-before-running")
