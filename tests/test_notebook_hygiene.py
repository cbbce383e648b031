"""Stored notebook outputs are what a learner sees first and what nbval compares against.

So every notebook must be saved fully executed, top to bottom, without errors, and with nothing in its
outputs that belongs to the machine it ran on: temporary or home paths, memory addresses, clock times.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(
    p for p in (REPO / "notebooks").glob("**/*.ipynb")
    if ".ipynb_checkpoints" not in p.parts and "_scratch" not in p.parts
)

# Binary payloads are base64: any "pattern" found there is noise.
_BINARY_MIME = ("image/png", "image/jpeg", "image/gif")

MACHINE_SPECIFIC = {
    "a machine path": re.compile(r"(?<![\w.~-])/(?:tmp|home|root|work)/[\w.-]"),
    "a memory address": re.compile(r"0x[0-9a-fA-F]{8,}"),
    "a timestamp": re.compile(
        r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}"                      # ISO 8601 / str(datetime)
        r"|\b\d{1,2}:\d{2}:\d{2}\b"                                 # clock time
        r"|\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d \d{2}:\d{2}\b"  # ls -l
        r"|\b1[5-9]\d{8}\.\d+\b"                                    # time.time()
        r"|\b1[5-9]\d{17}\b"                                        # st_mtime_ns
    ),
}


def _source(cell) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def _texts(output):
    """Every human-readable string an output carries."""
    if output.get("output_type") == "stream":
        yield _source({"source": output.get("text", "")})
    for mime, value in output.get("data", {}).items():
        if mime in _BINARY_MIME:
            continue
        if isinstance(value, list):  # nbformat may split text into lines
            value = "".join(value)
        yield value if isinstance(value, str) else json.dumps(value)


def hygiene_problems(nb: dict) -> list[str]:
    """What is wrong with a saved notebook, one line per problem; empty when it is clean."""
    problems = []
    last_count = 0
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code" or not _source(cell).strip():
            continue
        where = f"cell {index}"
        count = cell.get("execution_count")
        if count is None:
            problems.append(f"{where}: not executed (no stored output, so nbval checks nothing there)")
        elif count <= last_count:
            problems.append(f"{where}: executed out of order (count {count} after {last_count}); "
                            "restart the kernel and run all")
        else:
            last_count = count
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"{where}: stored output is an error ({output.get('ename')}: {output.get('evalue')})")
            for text in _texts(output):
                for what, pattern in MACHINE_SPECIFIC.items():
                    m = pattern.search(text)
                    if m:
                        problems.append(f"{where}: output holds {what}: {text[max(0, m.start() - 30):m.end() + 30]!r}")
    # Saved widget state (JupyterLab stores Output-widget contents here) is shown to learners too.
    state = json.dumps(nb.get("metadata", {}).get("widgets", {}))
    for what, pattern in MACHINE_SPECIFIC.items():
        if what != "a timestamp" and pattern.search(state):  # widget state has no clock times, but has ids
            problems.append(f"saved widget state holds {what}")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_notebook_is_saved_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = hygiene_problems(nb)
    assert not problems, f"{path.relative_to(REPO)}:\n  " + "\n  ".join(problems)


# The checker itself, on notebooks made up for the purpose.

def _nb(*cells, widgets=None):
    nb = {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    if widgets is not None:
        nb["metadata"]["widgets"] = widgets
    return nb


def _code(source, count, *outputs):
    return {"cell_type": "code", "source": source, "execution_count": count, "outputs": list(outputs), "metadata": {}}


def _stream(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def _data(mime, value):
    return {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": {mime: value}}


def test_a_clean_notebook_passes():
    nb = _nb(
        {"cell_type": "markdown", "source": "Files live in /tmp/whatever", "metadata": {}},
        _code("print('upper/in_upper.txt')", 1, _stream("upper/in_upper.txt\nmerged/etc/hosts\n")),
        _code("", None),
        _code("x = 1", 2),
        _code("x", 3, _data("text/plain", ["1"]), _data("image/png", "iVBORw0KGgo/tmp/AAAA")),
    )
    assert hygiene_problems(nb) == []


@pytest.mark.parametrize("bad, expected", [
    (_code("x = 1", None), "not executed"),
    (_code("1/0", 1, {"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero",
                      "traceback": []}), "is an error"),
    (_code("print(d)", 1, _stream("made /tmp/tmpk2j3/upper\n")), "a machine path"),
    (_code("d", 1, _data("text/plain", ["PosixPath('/home/learner/x')"])), "a machine path"),
    (_code("d", 1, _data("text/html", "<b>/work/main/notebooks</b>")), "a machine path"),
    (_code("g", 1, _data("text/plain", "<graphviz.graphs.Digraph at 0x7f3a2b1c4d90>")), "a memory address"),
    (_code("now()", 1, _data("text/plain", "datetime(2026, 11, 28) -> 2026-11-28 02:33:10")), "a timestamp"),
    (_code("!ls -l", 1, _stream("-rw-r--r-- 1 root root 13 Nov 28 02:33 README.md\n")), "a timestamp"),
    (_code("st", 1, _stream("mtime_ns=1764297190123456789\n")), "a timestamp"),
])
def test_the_checker_finds(bad, expected):
    problems = hygiene_problems(_nb(bad))
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_checker_finds_cells_run_out_of_order():
    problems = hygiene_problems(_nb(_code("a = 1", 2), _code("b = a", 1)))
    assert problems == ["cell 1: executed out of order (count 1 after 2); restart the kernel and run all"]


def test_the_checker_reads_saved_widget_state():
    widgets = {"application/vnd.jupyter.widget-state+json": {"state": {"m1": {"state": {
        "outputs": [{"output_type": "stream", "text": "/tmp/tmpab12/upper/x"}]}}}}}
    assert hygiene_problems(_nb(widgets=widgets)) == ["saved widget state holds a machine path"]
