"""Smoke tests of the examples: each one runs as a user runs it, in a subprocess, in seconds.

Every test starts ``sys.executable examples/<name>.py ...`` from the repository root, writes into
pytest's ``tmp_path`` and checks the exit code and the outputs the example promises.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lr_batch_callback import SpectrumRecord, load_spectra

pytestmark = pytest.mark.examples
ROOT = Path(__file__).resolve().parents[1]


def run_example(*args: str, timeout: float = 300) -> str:
    """Run ``python <args>`` from the repository root; return stdout, fail with its tail."""
    env = dict(os.environ)
    # The package from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # Tiny tensors: one thread is as fast, and parallel test runs do not fight over the cores.
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited with {proc.returncode}\n--- stdout (tail) ---\n"
        f"{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def csv_columns_and_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def column_values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def spectra_records(run_dir: Path) -> list[SpectrumRecord]:
    assert list((run_dir / "spectra").glob("step_*.json"))
    return load_spectra(run_dir / "spectra")


def test_demo_fast(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    out = run_example("examples/demo.py", "--fast", "--output-dir", str(run_dir))

    png = run_dir / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    columns, rows = csv_columns_and_rows(run_dir / "metrics.csv")
    assert {"lr_batch/factor", "lr_batch/lr_pg0", "hessian/lambda_max", "val_acc"} <= set(columns)
    # --fast: batch size 16 then 32, LR tuned for 32, SGD -> linear rule.
    assert column_values(rows, "lr_batch/factor") == [0.5, 1.0]
    records = spectra_records(run_dir)
    assert len(records) >= 3
    assert all(r.lambda_max > 0 for r in records)
    assert any(r.density is not None for r in records)
    assert {r.effective_batch_size for r in records} == {16, 32}
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # The printed table: one row per epoch, batch size and factor as scheduled.
    assert re.search(r"epoch\s+batch size\s+LR factor\s+eff\. LR\s+λ_max\s+test acc", out)
    table = re.findall(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.e-]+)\s+([\d.]+|—)\s+([\d.]+)%$",
                       out, flags=re.MULTILINE)
    assert [(epoch, size, factor) for epoch, size, factor, *_ in table] == [
        ("0", "16", "0.5"), ("1", "32", "1")]
    assert str(png) in out and "Elapsed:" in out


def test_demo_help() -> None:
    out = run_example("examples/demo.py", "--help")
    for option in ("--dataset", "--model", "--optimizer", "--schedule", "--rule", "--epochs",
                   "--device", "--output-dir", "--seed", "--monitor-every", "--fast"):
        assert option in out


def test_cifar100_fake_data_tiny_wrn(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    run_dir = tmp_path / "cifar"
    out = run_example(
        "examples/cifar100.py", "--fake-data", "--fake-size", "16", "--model", "wrn",
        "--depth", "10", "--width", "1", "--batch-size", "8", "--batch-size-schedule", "0:8,1:16",
        "--max-steps", "3", "--monitor-every", "1", "--max-overhead", "0", "--num-workers", "0",
        "--device", "cpu",
        "--output-dir", str(run_dir),
    )
    assert "WRN-10-1" in out
    columns, rows = csv_columns_and_rows(run_dir / "metrics.csv")
    assert "hessian/lambda_max" in columns
    # Reference 128 at lr 0.1 (the paper's WRN setting); batch 8 then 16, linear rule.
    assert column_values(rows, "lr_batch/factor") == [8 / 128, 16 / 128]
    assert spectra_records(run_dir)
    assert "LR factor 0.125" in out


def test_cli_with_yaml_config(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    run_example(
        "examples/cli.py", "fit", "--config", "examples/cli_config.yaml",
        "--trainer.max_steps=21", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    )
    (log_dir,) = (tmp_path / "cli").glob("version_*")
    columns, rows = csv_columns_and_rows(log_dir / "metrics.csv")
    assert {"lr_batch/factor", "hessian/lambda_max"} <= set(columns)
    assert column_values(rows, "lr_batch/factor") == [1.0]
    assert column_values(rows, "hessian/lambda_max")  # measured at step 20
    config = (log_dir / "config.yaml").read_text()
    assert "lr_batch_callback.BatchSizeLRCallback" in config
    assert "lr_batch_callback.BatchSizeSchedule" in config


def test_cli_saves_a_rule_list_that_refits(tmp_path: Path) -> None:
    # A per-optimizer rule list is written to config.yaml as a list, and the saved file refits.
    pytest.importorskip("jsonargparse")
    config = (ROOT / "examples" / "cli_config.yaml").read_text()
    assert "rule: auto" in config
    (tmp_path / "rules.yaml").write_text(config.replace("rule: auto", "rule: [sqrt]"))
    run_example("examples/cli.py", "fit", "--config", str(tmp_path / "rules.yaml"),
                "--trainer.max_steps=2", f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false")
    (saved,) = (tmp_path / "cli").glob("version_*/config.yaml")
    text = saved.read_text()
    assert "Unable to serialize" not in text
    assert re.search(r"rule:\s*\n\s*- sqrt", text), text
    run_example("examples/cli.py", "fit", "--config", str(saved), "--trainer.max_steps=2",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'refit'}",
                "--trainer.enable_progress_bar=false")
    (refit,) = (tmp_path / "refit" / "cli").glob("version_*")
    assert re.search(r"rule:\s*\n\s*- sqrt", (refit / "config.yaml").read_text())
    _, rows = csv_columns_and_rows(refit / "metrics.csv")
    assert column_values(rows, "lr_batch/factor") == [1.0]


def test_plain_pytorch() -> None:
    out = run_example("examples/plain_pytorch.py", "--fast", "--batch-sizes", "16,64")
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.e-]+)\s+([\d.]+)\s+([\d.e+-]+)\s+([\d.]+)",
                      out, flags=re.MULTILINE)
    assert [(size, factor, lr) for size, factor, lr, *_ in rows] == [
        ("16", "0.5", "0.005"), ("64", "2", "0.02")]
    for *_, lam, limit, _ratio in rows:
        assert float(limit) == pytest.approx(2 * 1.9 / float(lam), rel=1e-2)
    assert "optimizer.param_groups[0]['lr'] = 0.01 (reference units)" in out


def test_batch_size_finder(tmp_path: Path) -> None:
    run_dir = tmp_path / "bsf"
    out = run_example("examples/batch_size_finder.py", "--fast", "--max-trials", "2",
                      "--output-dir", str(run_dir))
    found_match = re.search(r"found batch size (\d+) \(configured: 32\)", out)
    assert found_match is not None, out
    found = int(found_match.group(1))
    assert found > 32
    match = re.search(r"0\.01 at batch size 32 → factor ([\d.]+) → ([\d.e-]+) at batch size", out)
    assert match is not None, out
    assert float(match.group(1)) == pytest.approx(found / 32)  # SGD: linear rule
    assert float(match.group(2)) == pytest.approx(0.01 * found / 32)
    _, rows = csv_columns_and_rows(run_dir / "metrics.csv")
    assert column_values(rows, "lr_batch/factor")[-1] == pytest.approx(found / 32)
    assert not list(ROOT.glob(".scale_batch_size_*.ckpt"))  # the finder cleans up after itself


def _load_models():
    spec = importlib.util.spec_from_file_location("_examples_models", ROOT / "examples" / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_parameter_counts() -> None:
    """The counts that examples/models.py's docstrings (and the README) state."""
    models = _load_models()

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(models.SmallCNN()) == 151_306  # the demo's and the benchmarks' CNN
    assert count(models.SmallCNN(width=16)) == 38_282  # reproduce_paper.py
    assert count(models.SmallCNN(width=8)) == 9_802  # reproduce_paper.py --fast
    assert count(models.DigitsMLP()) == 26_122
    assert count(models.WideResNet(10, 1)) == 83_700  # the smoke tests' WRN-10-1
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        assert count(models.VGG16()) == 15_291_300
        assert count(models.VGG16(batch_norm=True)) == 15_299_748
        assert count(models.WideResNet(28, 10)) == 36_536_884


def test_llm_example_ramps_the_batch_and_logs_the_curvature(tmp_path: Path) -> None:
    run_dir = tmp_path / "llm"
    out = run_example("examples/llm.py", "--fast", "--output-dir", str(run_dir))
    # Ramp {0: 8, 4: 16} with 8 samples per batch: accumulation 2 from step 4, LR × √2 (AdamW).
    assert "Final accumulation 2 (16 samples per step)" in out, out
    match = re.search(r"LR factor ([\d.]+) \(rule sqrt\)", out)
    assert match is not None, out
    assert float(match.group(1)) == pytest.approx(2 ** 0.5, rel=1e-4)
    _, rows = csv_columns_and_rows(run_dir / "metrics.csv")
    lam = [v for v in column_values(rows, "hessian/lambda_max") if v == v]
    assert lam and all(v > 0 for v in lam)
    # The model is smooth (RMSNorm, SiLU, softmax): the default product is differences, which
    # run through the checkpointed blocks and keep the fused attention.
    assert "(differences)" in out
    assert (run_dir / "llm.png").stat().st_size > 10_000
