"""The lessons' re-execution tool (.ci/execute_notebooks.py) and their trust on Binder (issue 13.1)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"


def tool():
    spec = importlib.util.spec_from_file_location("execute_notebooks", REPO / ".ci/execute_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def executed(ids: list[str]) -> dict:
    """A notebook as nbconvert stores it: a VBox showing two children, ids random, state in random order."""
    box, a, b, layout = ids
    state = {
        layout: {"model_name": "LayoutModel", "state": {}},
        b: {"model_name": "HTMLModel", "state": {"value": "b", "layout": f"IPY_MODEL_{layout}"}},
        box: {"model_name": "VBoxModel", "state": {"children": [f"IPY_MODEL_{a}", f"IPY_MODEL_{b}"]}},
        a: {"model_name": "HTMLModel", "state": {"value": "a", "layout": f"IPY_MODEL_{layout}"}},
    }
    return {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {
        "text/plain": "Run this cell", VIEW: {"model_id": box, "version_major": 2, "version_minor": 0}}}]}],
        "metadata": {"widgets": {STATE: {"state": state, "version_major": 2, "version_minor": 0}}}}


def test_widget_ids_are_renamed_the_same_way_every_run():
    t = tool()
    one = t.stable_ids(executed([uuid.uuid4().hex for _ in range(4)]), "05.ipynb")
    two = t.stable_ids(executed([uuid.uuid4().hex for _ in range(4)]), "05.ipynb")
    assert json.dumps(one) == json.dumps(two)
    state = one["metadata"]["widgets"][STATE]["state"]
    box = one["cells"][0]["outputs"][0]["data"][VIEW]["model_id"]
    assert list(state)[0] == box and state[box]["model_name"] == "VBoxModel"  # walked from the displayed one
    refs = state[box]["state"]["children"]
    assert all(r[len("IPY_MODEL_"):] in state for r in refs)  # references renamed too
    other = t.stable_ids(executed([uuid.uuid4().hex for _ in range(4)]), "06.ipynb")
    assert set(other["metadata"]["widgets"][STATE]["state"]).isdisjoint(state)


def test_streams_are_coalesced_and_machine_paths_in_widget_state_are_refused():
    t = tool()
    outs = [{"output_type": "stream", "name": "stdout", "text": "a\n"},
            {"output_type": "stream", "name": "stdout", "text": ["b\n"]},
            {"output_type": "stream", "name": "stderr", "text": "c\n"}]
    assert [o["text"] for o in t.coalesce_streams(outs)] == ["a\nb\n", "c\n"]
    nb = executed([uuid.uuid4().hex for _ in range(4)])
    assert t.widget_state_problems(nb) == []
    next(iter(nb["metadata"]["widgets"][STATE]["state"].values()))["state"]["value"] = "/tmp/pytest-1/x"
    assert "a machine path" in t.widget_state_problems(nb)[0]


def test_binder_and_dev_course_trust_the_notebooks():
    post = (REPO / "binder/postBuild").read_text()
    assert "jupyter trust notebooks/*.ipynb" in post
    dev = (REPO / "dev").read_text()
    course = dev[dev.index("\ncourse() {"):]
    assert "trust_notebooks" in course[:course.index("\n}\n")]


def test_trusting_a_lesson_makes_jupyter_consider_it_trusted(tmp_path):
    """What `jupyter trust` (nbformat.sign) records is what the server checks when JupyterLab opens it."""
    nbformat = pytest.importorskip("nbformat")
    from nbformat.sign import NotebookNotary
    lesson = next(iter(sorted((REPO / "notebooks").glob("*.ipynb"))), None)
    if lesson is None:
        pytest.skip("no lesson yet")
    copy = tmp_path / lesson.name
    copy.write_bytes(lesson.read_bytes())
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    notary_args = dict(data_dir=str(tmp_path / "data"))
    assert not NotebookNotary(**notary_args).check_signature(nbformat.read(copy, as_version=4))
    subprocess.run([sys.executable, "-m", "nbformat.sign", str(copy)], env=env, check=True,
                   capture_output=True, timeout=60)
    assert NotebookNotary(**notary_args).check_signature(nbformat.read(copy, as_version=4))
