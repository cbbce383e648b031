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


# --------------------------------------------------------------------------------------------------
# What the lessons must contain (issue 12): no demonstration answers a learner's exercise, every lesson from 03
# on ends with a 中文 summary, and every lesson listed as new has objectives, a diagram, a widget, a graded
# exercise and the summary. The lists are data, so a lesson added later only needs its number here.

#: Lessons written after issue 12: they must have every part (see `lesson_problems`).
NEW_LESSONS = ("11", "12")
#: From this lesson number on, every notebook ends with a 中文 summary (the glossary included).
CHINESE_SUMMARY_FROM = 3

#: Classes whose instances a learner answers (predict-then-check and graded exercises).
EXERCISE_CLASSES = ("PredictExercise", "ListingExercise", "TreeExercise", "DockerfileExercise", "Exercise")
_CREATED = re.compile(r"^\s*(\w+)\s*=\s*(?:[\w.]+\.)?(" + "|".join(EXERCISE_CLASSES) + r")\(", re.M)
#: Driving an exercise from code: typing into it, choosing, pressing its buttons, or its check/grade-and-show API.
_DRIVES = r"\b{name}\.(?:input\.value\s*=(?!=)|\w+\.value\s*=(?!=)|\w*button\.click\(|check\(|submit\()"
_CHINESE_SUMMARY = re.compile(r"^#+\s*中文小结\s*$", re.M)


def _lesson_number(path: Path) -> int | None:
    m = re.match(r"(\d+)-", path.name)
    return int(m.group(1)) if m else None


def _displayed(source: str) -> set[str]:
    """Names a cell shows as its output: its last expression, or ``display(name)``."""
    lines = [x for x in source.strip().splitlines() if x.strip() and not x.strip().startswith("#")]
    shown = set(re.findall(r"\bdisplay\((\w+)", source))
    if lines and re.fullmatch(r"\w+", lines[-1].strip()):
        shown.add(lines[-1].strip())
    return shown


def answered_exercises(nb: dict) -> list[str]:
    """Cells that answer an exercise the learner is shown (after Run All it would already be answered).

    An exercise is a variable bound to one of `EXERCISE_CLASSES`; it is *the learner's* if some cell
    displays it. Answering is setting a value on it, pressing one of its buttons or calling its ``check``.
    A demonstration must use an instance of its own that no cell displays.
    """
    cells = [_source(c) for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    exercises = {m.group(1) for src in cells for m in _CREATED.finditer(src)}
    shown = set().union(*(_displayed(src) for src in cells)) if cells else set()
    problems = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        src = _source(cell)
        for name in sorted(exercises & shown):
            if re.search(_DRIVES.format(name=re.escape(name)), src):
                problems.append(f"cell {index}: answers the learner's exercise {name!r}; "
                                "demonstrate on a separate instance that no cell displays")
    return problems


def chinese_summary_problems(nb: dict) -> list[str]:
    """The last markdown cells must hold a '中文小结' heading followed by 3 to 5 Chinese sentences."""
    md = [_source(c) for c in nb.get("cells", []) if c.get("cell_type") == "markdown"]
    for src in reversed(md[-2:]):
        m = _CHINESE_SUMMARY.search(src)
        if m:
            body = src[m.end():]
            body = body.split("\n#", 1)[0]
            sentences = body.count("。")
            if not 3 <= sentences <= 5:
                return [f"the 中文 summary has {sentences} sentences ('。'); write 3 to 5"]
            return []
    return ["no 中文 summary: end the lesson with a '### 中文小结' section of 3 to 5 sentences"]


def new_lesson_problems(nb: dict) -> list[str]:
    """What a new lesson lacks: objectives, a diagram, a widget, a graded exercise, a 中文 summary."""
    md = "\n".join(_source(c) for c in nb.get("cells", []) if c.get("cell_type") == "markdown")
    code = "\n".join(_source(c) for c in nb.get("cells", []) if c.get("cell_type") == "code")
    problems = []
    if not re.search(r"\*\*(You will learn to|In this lesson you will)\*\*", md):
        problems.append("no objectives ('**You will learn to**' followed by a list)")
    if not re.search(r"\bdiagrams\.\w+\(", code):
        problems.append("no diagram (a cell calling overlaykit.diagrams)")
    if not re.search(r"\b(PredictExercise|OverlayExplorer|LayerInspector|\w+Exercise)\(", code):
        problems.append("no widget (an exercise, explorer or inspector)")
    if not re.search(r"\b(ListingExercise|TreeExercise|DockerfileExercise)\(", code):
        problems.append("no graded exercise (overlaykit.grading)")
    return problems + chinese_summary_problems(nb)


LESSONS = [p for p in NOTEBOOKS if _lesson_number(p) is not None]


@pytest.mark.parametrize("path", LESSONS, ids=[p.name for p in LESSONS])
def test_no_lesson_answers_a_learners_exercise(path):
    problems = answered_exercises(json.loads(path.read_text(encoding="utf-8")))
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


SUMMARISED = [p for p in LESSONS if _lesson_number(p) >= CHINESE_SUMMARY_FROM]


@pytest.mark.parametrize("path", SUMMARISED, ids=[p.name for p in SUMMARISED])
def test_lessons_end_with_a_chinese_summary(path):
    problems = chinese_summary_problems(json.loads(path.read_text(encoding="utf-8")))
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("number", NEW_LESSONS)
def test_new_lessons_have_every_part(number):
    found = [p for p in LESSONS if p.name.startswith(number + "-")]
    if not found:
        pytest.skip(f"lesson {number} is not on this branch yet")
    for path in found:
        problems = new_lesson_problems(json.loads(path.read_text(encoding="utf-8")))
        assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# The lesson checks themselves, on made-up notebooks.

def _md(source):
    return {"cell_type": "markdown", "source": source, "metadata": {}}


def test_the_checker_finds_a_demonstration_that_answers_the_learners_exercise():
    nb = _nb(_code("q2 = PredictExercise('How many?', answer='4')\nq2", 1),
             _code("q2.input.value = '3'\nq2.check_button.click()\nprint(q2.feedback_text)", 2))
    assert answered_exercises(nb) == ["cell 1: answers the learner's exercise 'q2'; "
                                      "demonstrate on a separate instance that no cell displays"]
    graded = _nb(_code("ex = grading.ListingExercise('predict', 'rm merged/x')\ndisplay(ex)", 1),
                 _code("ex.check('answer')", 2))
    assert len(answered_exercises(graded)) == 1


def test_the_checker_accepts_a_separate_demonstration_instance():
    nb = _nb(_code("question = dict(question='How many?', answer='4')\n"
                   "demo = PredictExercise(**question)\ndemo.input.value = '3'\ndemo.check_button.click()", 1),
             _code("q2 = PredictExercise(**question)\nq2", 2),
             _code("explorer = OverlayExplorer(ov)\nexplorer", 3),
             _code("explorer.op.value = 'delete'\nexplorer.apply_button.click()", 4))  # explorers are tools
    assert answered_exercises(nb) == []


@pytest.mark.parametrize("summary, expected", [
    ("## Summary\n\n- a\n\n### 中文小结\n\n一。二。三。", []),
    ("### 中文小结\n\n一。二。三。四。五。六。", ["the 中文 summary has 6 sentences ('。'); write 3 to 5"]),
    ("## Summary\n\n- only English.", ["no 中文 summary: end the lesson with a '### 中文小结' section of 3 to 5 sentences"]),
])
def test_the_checker_reads_the_chinese_summary(summary, expected):
    assert chinese_summary_problems(_nb(_md("# 11 · x"), _md(summary))) == expected


def test_the_checker_lists_what_a_new_lesson_lacks():
    bare = _nb(_md("# 11 · A lesson\n\nNo objectives."), _code("x = 1", 1))
    assert [p.split(" (")[0] for p in new_lesson_problems(bare)] == [
        "no objectives", "no diagram", "no widget", "no graded exercise", "no 中文 summary: end the lesson with a '### 中文小结' section of 3 to 5 sentences"]
    full = _nb(_md("# 11\n\n**You will learn to**\n- a"), _code("diagrams.stack(ov)", 1),
               _code("ex = grading.TreeExercise('make it', {}, {})\nex", 2),
               _md("## Summary\n\n### 中文小结\n\n一。二。三。"))
    assert new_lesson_problems(full) == []
