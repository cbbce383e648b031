"""benchmarks/run.py times overlaykit as installed: compiled once into the scratch directory, never into the
repository, and each fresh process it starts reads that bytecode instead of recompiling every module."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_run_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run_for_test", REPO / "benchmarks" / "run.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_children_use_bytecode_compiled_once_into_the_scratch_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    run = load_run_module()
    run.compile_bytecode(str(tmp_path), cold=False)
    env = run.child_env()
    assert env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pycache")
    assert "PYTHONDONTWRITEBYTECODE" not in env
    compiled = {p.name.split(".")[0] for p in (tmp_path / "pycache").rglob("*.pyc")}
    assert {"images", "tarstream", "oci", "cli"} <= compiled
    # a child started with that environment imports the cached bytecode: it compiles nothing new
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "pycache").rglob("*.pyc")}
    subprocess.run([sys.executable, "-c", "import overlaykit.oci, overlaykit.cli"], env=env, check=True)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "pycache").rglob("*.pyc")}
    assert {p: t for p, t in after.items() if p in before} == before


def test_cold_bytecode_keeps_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    run = load_run_module()
    run.compile_bytecode(str(tmp_path), cold=True)
    env = run.child_env()
    assert "PYTHONPYCACHEPREFIX" not in env or env["PYTHONPYCACHEPREFIX"] == os.environ.get("PYTHONPYCACHEPREFIX")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not (tmp_path / "pycache").exists()
