#!/usr/bin/env python3
"""Re-execute the lessons and store them with their widgets' state, deterministically (issue 13.1).

    python .ci/execute_notebooks.py [--backend sim|kernel|auto] [-j N] [--check] [NOTEBOOK ...]

(or `./dev notebooks [...]`, which runs it from the repo's venv). Without arguments: every
notebooks/*.ipynb. Each lesson runs top to bottom in a fresh kernel with notebooks/ as its working
directory, through nbconvert's ExecutePreprocessor with ``store_widget_state=True``: the state of every
widget still open at the end goes into the notebook's metadata, so JupyterLab (for a trusted notebook),
nbviewer and GitHub draw the widgets before any cell runs.

Deterministic, so that re-running changes nothing in git unless an output really changed:
- ipywidgets names models with random UUIDs; they are renamed to ``uuid5(notebook name, n)`` in order of
  first appearance (outputs, then the saved state);
- no execution timing metadata (``record_timing=False``);
- the widgets' saved state is checked for machine paths and memory addresses like every output
  (tests/test_notebook_hygiene.py); a finding fails the run and leaves the notebook unchanged.
The notebook is written atomically (a temporary sibling, then rename), and only if it executed without an
error. ``--check`` executes into memory and reports which notebooks would change.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_NAMESPACE = uuid.UUID("6f0e6a3c-1d2b-4f55-9c3e-0b7e2a9d4c11")  # fixed: overlaykit's widget ids
_MODEL_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
_MACHINE = {
    "a machine path": re.compile(r"(?<![\w.~-])/(?:tmp|home|root|work)/[\w.-]"),
    "a memory address": re.compile(r"0x[0-9a-fA-F]{8,}"),
}


def lessons(names: list[str]) -> list[Path]:
    if names:
        return [Path(n).resolve() for n in names]
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb"))


def stable_ids(nb: dict, name: str) -> dict:
    """Rename the widget models' random ids to ids derived from the notebook's name and their order.

    The order is a walk from the displayed widgets (cells in order) through each model's references
    (``IPY_MODEL_<id>`` in its state, read in key order), then any model nothing displays, by content; the
    saved state is written in that order.
    """
    widgets = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {})
    state = widgets.get("state", {})
    order: list[str] = []

    def visit(mid: str) -> None:
        if mid in order:
            return
        order.append(mid)
        if mid in state:
            for ref in re.findall(r"IPY_MODEL_([0-9a-f]{32})", json.dumps(state[mid], sort_keys=True)):
                visit(ref)
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view and view.get("model_id"):
                visit(view["model_id"])
    for mid in sorted((m for m in state if m not in order), key=lambda m: json.dumps(state[m], sort_keys=True)):
        visit(mid)
    mapping = {old: uuid.uuid5(_NAMESPACE, f"{name}:{n}").hex for n, old in enumerate(order)}
    if state:
        widgets["state"] = {m: state[m] for m in order if m in state}
    text = _MODEL_ID.sub(lambda m: mapping.get(m.group(0), m.group(0)), json.dumps(nb))
    return json.loads(text)


def widget_state_problems(nb: dict) -> list[str]:
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {})
    text = json.dumps(state)
    return [f"the saved widget state holds {what}: ...{text[max(0, m.start() - 60):m.end() + 20]}..."
            for what, rx in _MACHINE.items() for m in [rx.search(text)] if m]


def execute(path: Path, timeout: int) -> dict:
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor
    nb = nbformat.read(path, as_version=4)
    ep = ExecutePreprocessor(timeout=timeout, kernel_name="python3", store_widget_state=True,
                             record_timing=False)
    ep.preprocess(nb, {"metadata": {"path": str(path.parent)}})
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return stable_ids(json.loads(nbformat.writes(nb)), path.name)


def coalesce_streams(outputs: list) -> list:
    """One stream output per run of stdout (or stderr) lines: how the kernel splits them depends on timing."""
    out: list = []
    for o in outputs:
        if (o.get("output_type") == "stream" and out and out[-1].get("output_type") == "stream"
                and out[-1].get("name") == o.get("name")):
            out[-1]["text"] = "".join(out[-1]["text"]) + "".join(o["text"])
        else:
            out.append(o)
    return out


def write_atomically(path: Path, nb: dict) -> None:
    import nbformat
    text = nbformat.writes(nbformat.from_dict(nb))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".ipynb.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def one(path: Path, args) -> tuple[Path, str]:
    start = time.monotonic()
    try:
        nb = execute(path, args.timeout)
    except Exception as e:  # a cell's error: report it, keep the stored notebook
        first = str(e).strip().splitlines()
        return path, f"FAILED ({first[-1] if first else type(e).__name__})"
    problems = widget_state_problems(nb)
    if problems:
        return path, "FAILED: " + "; ".join(problems)
    import nbformat
    old = path.read_text(encoding="utf-8")
    new = nbformat.writes(nbformat.from_dict(nb))
    changed = old.rstrip("\n") != new.rstrip("\n")
    took = f"{time.monotonic() - start:.1f}s"
    if args.check:
        return path, f"{'would change' if changed else 'unchanged'} ({took})"
    if changed:
        write_atomically(path, nb)
    return path, f"{'written' if changed else 'unchanged'} ({took})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*")
    ap.add_argument("--backend", choices=("sim", "kernel", "auto"), default=os.environ.get("OVERLAYKIT_BACKEND"))
    ap.add_argument("-j", "--jobs", type=int, default=1, help="notebooks executed at once (each has a kernel)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--check", action="store_true", help="execute, but only report what would change")
    args = ap.parse_args(argv)
    if args.backend:
        os.environ["OVERLAYKIT_BACKEND"] = args.backend
    # the kernels import this checkout's overlaykit
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    paths = lessons(args.notebooks)
    if not paths:
        print("no notebooks to execute", file=sys.stderr)
        return 1
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for path, result in pool.map(lambda p: one(p, args), paths):
            print(f"{path.name}: {result}", flush=True)
            failed += result.startswith("FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
