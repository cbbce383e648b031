"""benchmarks/run.py runs end to end on tiny workloads and prints its ratios (no timing is asserted)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "run.py"

TINY = ["--files", "300", "--layers", "1,3", "--big", "300,3", "--image", "300,3", "--lookups", "40",
        "--reps", "2", "--walk-reps", "1", "--copy-sizes", "1K,8K", "--copy-reps", "1", "--image-reps", "1",
        "--build-reps", "1", "--trace-ops", "4000", "--skip", "notebooks"]


def run(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OVERLAYKIT_BACKEND", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout)


@pytest.mark.timeout(600)
def test_tiny_run_prints_ratios_and_summary(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out_json = tmp_path / "raw.json"
    p = run([*TINY, "--tmp", str(scratch), "--json", str(out_json)], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    # every figure is printed as it is measured, then a markdown summary table
    assert "`import overlaykit`" in out
    assert re.search(r"stat, existing paths \(300 files, 3 layers\)\s+(sim\s+[\d.]+ µs)?", out)
    assert "| what | sim | reference | ratio | target | met? | notes |" in out
    table = out[out.index("| what |"):].splitlines()
    rows = json.loads(out_json.read_text())["rows"]
    assert len(table) == len(rows) + 2
    whats = [r["what"] for r in rows]
    for expected in ("stat, existing paths (300 files, 1 layers)", "stat, missing paths (300 files, 3 layers)",
                     "full walk", "listdir /usr/bin", "peak RSS", "RSS growth, 4000 traced operations",
                     "import + flatten vs tar -x",
                     "inspect (300 files, 3 layers)", "modify (append 1 byte), file of 8.0 KiB",
                     "chmod (metadata only), file of 1.0 KiB"):
        assert any(expected in w for w in whats), (expected, whats)
    # comparisons carry a ratio sim / reference, consistent with the two medians printed
    compared = [r for r in rows if r["ref"] is not None]
    assert compared, rows
    for r in compared:
        assert r["ratio"] == pytest.approx(r["sim"] / r["ref"])
        assert re.search(re.escape(r["what"]) + r"\s+sim .* ratio\s+[\d.]+x", out)
    if "real overlay mounts: yes" in out:
        assert any(r["ref_name"] == "kernel" for r in compared)
        assert "warning: walk entries differ" not in out
        assert "warning: the kernel finds" not in out
    assert "warning: the sim finds" not in out
    # the generated workloads are gone
    assert list(scratch.iterdir()) == []


def test_cannot_run_exits_nonzero(tmp_path):
    p = run([*TINY, "--tmp", str(tmp_path / "does-not-exist")], tmp_path, timeout=120)
    assert p.returncode != 0
