"""Smoke tests of examples/reproduce_paper.py: the fast modes run end to end and write their outputs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.examples
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce_paper.py"
TABLE_HEADER = ("| optimizer | rule | B | LR factor | LR | LR / LR_max(B) | LR / LR_max(B), peak | steps "
                "| test accuracy | test loss | failed |")

pytest.importorskip("matplotlib")


def _run(tmp_path: Path, *extra: str) -> str:
    # One thread: on a busy 2-core machine, two torch threads per process oversubscribe badly.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--fast", "--threads", "1", "--output-dir", str(tmp_path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    for name in ("spectra_vs_batch.png", "lambda_vs_inv_batch.png", "results.md", "results.json"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} was not written"
    return (tmp_path / "results.md").read_text()


def _r_squared(results: str) -> float:
    match = re.search(r"R² = (-?[0-9.]+(?:e[-+]?\d+)?)", results)
    assert match, "results.md states no R²"
    return float(match.group(1))


def test_fast_digits(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    results = _run(tmp_path)
    assert TABLE_HEADER in results
    assert math.isfinite(_r_squared(results))
    for rule in ("linear", "sqrt", "none", "curvature"):
        assert f"| SGD | {rule} |" in results and f"| Adam | {rule} |" in results
    assert "B\\* = c/a" in results and "Elapsed" in results


def test_fast_full_path_on_fake_cifar(tmp_path: Path) -> None:
    """The --full (CIFAR-100, GPU) path with fake data, a tiny WideResNet and tiny sizes."""
    pytest.importorskip("torchvision")
    results = _run(tmp_path, "--full", "--fake-data", "96", "--arch", "wrn10_1", "--device", "cpu")
    assert TABLE_HEADER in results
    assert math.isfinite(_r_squared(results))
    assert "FAKE CIFAR-100" in results


def test_report_only_refills_generated_blocks_and_keeps_the_prose(tmp_path: Path) -> None:
    """results.md is rebuilt from results.json alone; text outside the generated blocks survives."""
    pytest.importorskip("sklearn")
    generated = _run(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "curvature", "trajectory", "tuning", "runs"} <= set(data)
    assert data["problem"]["num_params"] == 9_802  # SmallCNN(width=8), the --fast network
    hand_written = "\n## Verdict by hand\n\nThe law holds.\n"
    stale = re.sub(r"(<!-- generated:training -->\n).*?(<!-- /generated -->)", r"\1stale\n\2", generated,
                   flags=re.DOTALL)
    assert stale != generated
    (tmp_path / "results.md").write_text(stale + hand_written)
    result = subprocess.run([sys.executable, str(SCRIPT), "--report-only", "--output-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.md").read_text() == generated + hand_written
