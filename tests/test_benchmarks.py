"""Smoke tests of ``benchmarks/``: ``run.py --quick`` runs, writes its JSON and renders its tables,
and the hand-written verdict of BENCHMARKS.md survives a regeneration. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.run import _fewest, _parse_config

pytestmark = pytest.mark.examples
ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--sections", "cost,lambda", "--json",
         str(out), "--markdown", str(tmp_path / "BENCH.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    kinds = results["cost"]["digits_cnn"]["kinds"]
    assert kinds["default"]["products"] > 0 and kinds["default"]["training_steps"] > 0
    assert any(row["method"] == "ours" for row in results["lambda"]["digits_cnn"]["rows"])
    assert results["targets"] and all("met" in t for t in results["targets"])
    text = (tmp_path / "BENCH.md").read_text()
    assert "## Targets" in text and report.BEGIN in text and "VERDICT" in text


def test_verdict_survives_regeneration(tmp_path: Path) -> None:
    results = {"meta": {"command": "python benchmarks/run.py", "date": "today", "machine": {
        "cpu": "cpu", "cores": 2, "threads": 1}, "versions": {}}, "targets": [
        {"target": "t", "model": "m", "measured": "1.0×", "met": False}]}
    path = tmp_path / "BENCHMARKS.md"
    report.write_markdown(path, report.render(results), results)
    assert "placeholder" in path.read_text() and "1.0×" in path.read_text()
    path.write_text(path.read_text().replace(report._placeholder(results), "Ours wins."))
    report.write_markdown(path, report.render(results), results)
    text = path.read_text()
    assert "Ours wins." in text and "placeholder" not in text and text.count(report.BEGIN) == 1


def test_fewest_steps_search_and_config_round_trip() -> None:
    from benchmarks.methods import Outcome

    calls = []

    def run(m: int) -> Outcome:  # error 2**-m: reaches 1e-4 first at m = 14
        calls.append(m)
        return Outcome(1.0 + 2.0**-m, m, 0.0, f"f(max_iter={m})")

    best = _fewest(run, 2, 100, 1.0)
    assert best is not None and best.products == 14 and len(calls) < 14
    assert _parse_config("eigsh(k=1, which='LA', tol=0.001, ncv=5)") == {"tol": 1e-3, "ncv": 5}
