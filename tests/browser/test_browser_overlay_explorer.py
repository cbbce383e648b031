"""End to end: a learner opens the overlay lesson in JupyterLab, runs it, and deletes a lower file with the explorer.

Only this test exercises the real round trip: JupyterLab's front end, ipywidgets' comms, the kernel running
overlaykit, and the widgets' HTML and SVG drawn by a browser. Unit tests click the widgets without a browser.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"   # gitignored
pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

LESSON = "03-union-mounts-and-overlayfs.ipynb"
TARGET = "in_lower.txt"                   # a file that only the lower layer has (overlaykit.course.LESSON_LOWER)

# The kernel state, read through JupyterLab's own model (expose_app_in_browser): code cells not yet run
# or still running, and error outputs.
NOTEBOOK_STATE_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = Array.from(panel.content.model.cells);
    const code = cells.filter(c => c.type === 'code' && c.sharedModel.getSource().trim());
    const errors = [];
    for (const c of code) {
        for (let i = 0; i < c.outputs.length; i++) {
            const o = c.outputs.get(i).toJSON();
            if (o.output_type === 'error') errors.push(`${o.ename}: ${o.evalue}`);
        }
    }
    return {pending: code.filter(c => c.executionCount === null).length, errors,
            running: code.filter(c => c.executionState === 'running').length,
            idle: panel.sessionContext.session?.kernel?.status === 'idle'};
}"""
# Run All is over when every code cell has run, or an error stopped it (JupyterLab then unqueues the rest).
RUN_OVER_JS = f"""() => {{
    const s = ({NOTEBOOK_STATE_JS})();
    return (s.pending === 0 || s.errors.length > 0) && s.running === 0 && s.idle;
}}"""


def svg_texts(svg) -> list[str]:
    """The labels of a graphviz SVG in the page: one string per <text> element."""
    return svg.evaluate("e => Array.from(e.querySelectorAll('text'), t => t.textContent.replace(/\\s+/g, ' ').trim())")


def test_delete_a_lower_file_in_the_explorer(chromium_path, browser_page, lab_server):
    # chromium_path first: without a browser the test skips before starting a lab server
    from playwright.sync_api import expect

    page = browser_page

    def menu(top: str, item: str) -> None:
        page.locator("#jp-menu-panel").get_by_role("menuitem", name=top, exact=True).click()
        page.get_by_role("menuitem", name=item, exact=True).click()

    notebook = LESSON
    if not (lab_server.root / notebook).exists():
        found = sorted(p.name for p in lab_server.root.glob("03-*.ipynb"))
        pytest.fail(f"notebooks/{LESSON} is missing (lesson 03 now: {found or 'none'}); update LESSON", pytrace=False)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-overlay-explorer.png"
    try:
        page.goto(lab_server.lab_url(notebook))
        expect(page.locator(".jp-NotebookPanel .jp-Cell").first).to_be_visible(timeout=30_000)
        expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=30_000)

        # Edit > Clear Outputs of All Cells (so that the stored outputs and execution counts cannot pass for
        # this run's), then Run > Run All Cells, as a learner would.
        menu("Edit", "Clear Outputs of All Cells")
        page.wait_for_function(f"({NOTEBOOK_STATE_JS})().pending > 0", timeout=10_000)
        menu("Run", "Run All Cells")
        page.wait_for_function(RUN_OVER_JS, timeout=90_000, polling=200)
        state = page.evaluate(NOTEBOOK_STATE_JS)
        assert state["errors"] == [], f"{notebook} raised errors in the browser: {state['errors']}"
        assert state["pending"] == 0, f"{state['pending']} code cells of {notebook} did not run"

        # The first cell that makes an explorer, and in its output the explorer's box (its stable CSS class),
        # still live after Run All: no later cell closes it.
        cell = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text="OverlayExplorer(")).first
        explorer = cell.locator(".jp-OutputArea-output .overlaykit-explorer").first
        cell.scroll_into_view_if_needed()
        expect(explorer).to_have_count(1, timeout=10_000)
        expect(explorer.locator("pre.overlaykit-lower")).to_contain_text(TARGET)
        explorer.scroll_into_view_if_needed()
        expect(explorer).to_be_visible()
        upper = explorer.locator("pre.overlaykit-upper")
        merged = explorer.locator("pre.overlaykit-merged")
        diagram = explorer.locator("svg").last
        expect(upper).not_to_contain_text(TARGET)
        expect(merged).to_contain_text(TARGET)
        svg_before = diagram.evaluate("e => e.outerHTML")
        assert f"{TARGET} (whiteout)" not in svg_texts(diagram)

        explorer.locator("select").select_option(label="delete")
        path = explorer.locator(".widget-text", has=page.locator("label", has_text=re.compile(r"^path$"))) \
                       .locator("input")
        path.click()
        path.press("Control+a")           # the lesson's next cell drove this explorer: replace what it typed
        path.press_sequentially(TARGET)
        explorer.get_by_role("button", name="Apply").click()

        # upper/ now holds a whiteout for the file, merged/ no longer shows it, and the diagram was redrawn.
        expect(explorer).to_contain_text(f"done: delete /{TARGET}", timeout=20_000)
        expect(upper).to_contain_text(f"{TARGET} (whiteout)")
        expect(merged).not_to_contain_text(TARGET)
        expect(diagram).to_contain_text(f"{TARGET} (whiteout)")  # the diagram comes last in the refresh
        assert diagram.evaluate("e => e.outerHTML") != svg_before, "the stack diagram was not redrawn"
        texts = svg_texts(diagram)
        assert f"{TARGET} (whiteout)" in texts, texts
        assert "hidden by a whiteout in upper" in texts, texts
        explorer.screenshot(path=str(shot))
        page.screenshot(path=str(ARTIFACTS / "browser-overlay-lesson.png"))
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / "browser-failure.png"))
        raise
    assert Path(shot).stat().st_size > 0
