"""The package's import structure (issue #11 item 6): one shared vocabulary module (base.py) that the
backends and fronts import, and a façade (engine.py) that imports neither the drawing code nor, at module
level, the backends -- so there is no import cycle to break at run time with function-level imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "overlaykit"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> dict[str, bool]:
    """The overlaykit modules ``module`` imports -> True where one import of it is at module level."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py")
    top_level = {id(node) for node in tree.body}
    # an import inside a module-level try/if still runs at import time
    for node in tree.body:
        if isinstance(node, (ast.Try, ast.If, ast.With)):
            top_level |= {id(n) for n in ast.walk(node)
                          if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    found: dict[str, bool] = {}

    def add(name: str, node) -> None:
        if name in MODULES or name == "__init__":
            found[name] = found.get(name, False) or id(node) in top_level

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    add(node.module.split(".")[0], node)
                else:  # from . import x, y
                    for a in node.names:
                        add(a.name, node)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "overlaykit":
                parts = node.module.split(".")
                if len(parts) > 1:
                    add(parts[1], node)
                else:
                    for a in node.names:
                        add(a.name, node)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "overlaykit" and len(parts) > 1:
                    add(parts[1], node)
    found.pop(module, None)
    return found


GRAPH = {m: _imports(m) for m in MODULES}
TOP = {m: {n for n, top in deps.items() if top} for m, deps in GRAPH.items()}
ANY = {m: set(deps) for m, deps in GRAPH.items()}


def _closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in edges.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str):
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_parser_sees_function_level_imports():
    # guards the test itself: engine imports openfile inside Overlay.open, capabilities imports kernel lazily
    assert GRAPH["engine"].get("openfile") is False
    assert "kernel" in ANY["capabilities"] and "kernel" not in TOP["capabilities"]
    assert TOP["engine"] >= {"base", "ondisk"}


def test_no_cycle_among_module_level_imports():
    assert _cycle(TOP) is None, " -> ".join(_cycle(TOP))


def test_base_is_a_leaf():
    assert ANY["base"] <= {"options"}, f"base.py imports {sorted(ANY['base'])}"
    assert ANY["options"] == set()


def test_backends_do_not_import_the_facade():
    for backend in ("sim", "kernel"):
        assert "engine" not in ANY[backend], f"{backend}.py imports engine.py"
        assert "engine" not in _closure(backend, TOP), f"importing {backend}.py imports engine.py"
        for dep in ANY[backend]:  # nor does anything the backend imports, even inside a function
            assert "engine" not in ANY[dep], f"{backend}.py imports {dep}.py, which imports engine.py"
        assert "base" in TOP[backend]


def test_vocabulary_comes_from_base_everywhere():
    """Only fronts that build an Overlay import engine.py; nothing imports Stat, normpath ... from it."""
    vocabulary = {"Stat", "Backend", "normpath", "show", "BackendUnavailable", "MAX_LOWERS", "DOCKER_MAX_LOWERS",
                  "BACKENDS", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT", "Options"}
    wrong = []
    for m in MODULES + ["__init__"]:
        if m == "engine":
            continue
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "engine":
                wrong += [f"{m}: {a.name}" for a in node.names if a.name in vocabulary]
    assert not wrong


def test_engine_does_not_import_diagrams_or_name_the_backends():
    assert "diagrams" not in ANY["engine"]
    assert not {"sim", "kernel", "widgets"} & ANY["engine"]


def test_vocabulary_still_importable_from_engine():
    """The other branches (and notebooks) still write ``from overlaykit.engine import Stat``."""
    from overlaykit import base, engine
    for name in ("Stat", "Backend", "normpath", "show", "BackendUnavailable", "MAX_LOWERS", "DOCKER_MAX_LOWERS",
                 "BACKENDS", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT", "Options", "_KIND_BITS"):
        assert getattr(engine, name) is getattr(base, name), name


@pytest.mark.parametrize("module", ["sim", "kernel", "base", "openfile", "runfs"])
def test_importing_a_backend_alone_loads_no_drawing(module):
    code = (f"import sys; import overlaykit.{module}; "
            "print(sorted(m for m in sys.modules if m in ('overlaykit.diagrams', 'graphviz')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_overlaykit_does_not_load_the_diagrams():
    code = "import sys, overlaykit; print('overlaykit.diagrams' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_notebook_shows_the_overlay_diagram_through_the_display_hook(tmp_path):
    """``ov`` as a cell's last expression: IPython's formatter gets the stack diagram, as before, although
    engine.py does not import diagrams.py (a fresh process, so the stand-in hook has to load it)."""
    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    (tmp_path / "l" / "a").write_text("hi\n")
    code = f"""
import sys
from IPython.core.interactiveshell import InteractiveShell
import overlaykit
shell = InteractiveShell.instance()
ov = overlaykit.Overlay([{str(tmp_path / 'l')!r}], {str(tmp_path / 'u')!r}, {str(tmp_path / 'w')!r}, backend="sim")
with ov:
    before = "overlaykit.diagrams" in sys.modules
    data, _ = shell.display_formatter.format(ov)
    from overlaykit import diagrams
    print(before, data == diagrams.overlay_mimebundle(ov), "text/html" in data)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]


def test_display_falls_back_to_repr_without_a_hook(monkeypatch, tmp_path):
    from overlaykit import Overlay, base
    monkeypatch.setattr(base, "display_hooks", {})
    ov = Overlay([tmp_path], backend="sim")
    assert ov._repr_mimebundle_() == {"text/plain": repr(ov)}
