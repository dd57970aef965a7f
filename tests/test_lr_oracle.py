"""Smoke test of the LR-oracle benchmark: ``python benchmarks/lr_oracle --quick`` runs as a user runs it.

It starts the package folder in a subprocess from the repository root, writing into pytest's
``tmp_path``, and checks that every promised output exists and parses and that every rule has a
score for every task × optimizer × protocol × budget, and that ``python -m benchmarks.lr_oracle
--markdown-only`` rebuilds the same markdown from the compact summary. No timing assertions: the
quick mode is sized to take seconds, but the machine may be shared.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.examples
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lr_oracle"  # a package: python benchmarks/lr_oracle runs its __main__


def test_lr_oracle_quick(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"benchmarks/lr_oracle --quick exited with {proc.returncode}\n--- stdout (tail) ---\n"
        f"{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}"
    )

    results = json.loads((tmp_path / "lr_oracle.json").read_text())
    assert results["config"]["quick"] is True
    tasks = results["tasks"]
    assert set(tasks) == {"digits_cnn", "tiny_lm", "noisy_teacher"}
    rules = results["config"]["rules"]
    assert set(rules) == {"sgd", "adam"}
    for kind in ("sgd", "adam"):
        assert {"linear", "sqrt", "none", "curvature"} <= set(rules[kind])
    seen = set()
    for tr in results["results"]:
        seen.add((tr["task"], tr["optimizer"]))
        # critical sharpness on the batches of lambda: along -g / -P^-1 g (a descent direction:
        # finite, > 0) and along the next update (JSON null = inf: the update is uphill there)
        for m in tr["measurements"]:
            for B in m["lambda"]:
                assert math.isfinite(m["critical"][B]) and m["critical"][B] > 0
                up = m["critical_update"][B]
                assert up is None or (math.isfinite(up) and up > 0)
        assert set(tr["protocols"]) == {"a", "b"}
        for proto in tr["protocols"].values():
            summary = proto["scores"]["summary"]
            assert set(summary) == {"fixed_step", "fixed_epoch"}
            for budget in summary.values():
                assert set(budget) == set(rules[tr["optimizer"]])
                for score in budget.values():
                    assert score["cells"] >= 1
                    assert score["mean_abs_log2_err"] is not None
                    assert math.isfinite(score["mean_abs_log2_err"]) and score["mean_abs_log2_err"] >= 0
                    assert 0.0 <= score["frac_in_band"] <= 1.0
                    assert score["divergences"] >= 0
            # every batch size has an oracle for both budgets
            for run in proto["runs"].values():
                for curve in run["curves"].values():
                    assert curve["k_star"] is not None
    assert seen == {(t, o) for t in tasks for o in ("sgd", "adam")}

    with (tmp_path / "lr_oracle.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"task", "optimizer", "protocol", "budget", "B", "rule", "log2_err", "in_band"} <= set(rows[0])
    assert {r["rule"] for r in rows} == set(rules["sgd"]) | set(rules["adam"])

    md = (tmp_path / "lr_oracle.md").read_text()
    assert "| rule |" in md and "`curvature`" in md
    for name in tasks:
        png = tmp_path / f"lr_oracle_{name}.png"
        assert png.stat().st_size > 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The compact summary (what is committed) regenerates the same report.
    summary = tmp_path / "lr_oracle_summary.json"
    assert json.loads(summary.read_text())["format"] == "lr_oracle_summary/1"
    again = tmp_path / "from_summary"
    again.mkdir()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lr_oracle", "--markdown-only", str(summary),
                           "--fig-dir", str(again)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (again / "lr_oracle.md").read_text() == md
    assert all((again / f"lr_oracle_{name}.png").stat().st_size > 0 for name in tasks)
