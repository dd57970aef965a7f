"""Spectrum monitoring in real fits: logged λ_max read back from CSV, TensorBoard and JSON files
equals an independent dense-Hessian computation on the same batch and weights."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lr_batch_callback import load_spectra, plot_spectra
from tests.lightning_helpers import TinyModule, flat_callback
from tests.reference import dense_hessian

EVERY = 3


class Snapshot(Callback):
    """Keeps the weights and batch at every measured step (runs after the measuring callback)."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[dict, tuple]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % EVERY == 0:
            self.saved[trainer.global_step] = (
                copy.deepcopy(pl_module.state_dict()), tuple(t.clone() for t in batch))


def _dense_lambda_max(state: dict, batch: tuple) -> float:
    model = TinyModule(norm=True).double()
    model.load_state_dict(state)
    model.train()
    x, y = batch
    H = dense_hessian(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x.double(), y))
    return float(torch.linalg.eigvalsh(H)[-1])


def _fit_with(logger, tmp_path):
    seed_everything(0)
    module = TinyModule(norm=True, n=96)
    cb = flat_callback(monitor_every_n_steps=EVERY, tol=1e-7, max_iter=200, k=2, smallest=True,
                       density_every=2, max_overhead=None,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    snap = Snapshot()
    trainer = Trainer(max_epochs=2, callbacks=[cb, snap], logger=logger, log_every_n_steps=50,
                      enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    trainer.fit(module)
    return trainer, snap


@pytest.mark.slow
def test_csv_logged_lambda_max_matches_dense_reference(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    trainer, snap = _fit_with(logger, tmp_path)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("hessian/lambda_max")]
    steps = [int(r["step"]) for r in rows]
    assert steps == [s for s in range(EVERY, trainer.global_step + 1, EVERY)]
    for row in rows:
        expected = _dense_lambda_max(*snap.saved[int(row["step"])])
        assert float(row["hessian/lambda_max"]) == pytest.approx(expected, rel=1e-4)
        assert float(row["hessian/converged"]) == 1.0
        assert float(row["hessian/lambda_min"]) <= float(row["hessian/top_2"])
    # the JSON files hold the same spectra, with densities every second measurement
    records = load_spectra(logger.log_dir)
    assert [r["step"] for r in records] == steps
    assert [bool(r["density"]) for r in records] == [i % 2 == 1 for i in range(len(records))]
    for r, row in zip(records, rows):
        assert r["lambda_max"] == pytest.approx(float(row["hessian/lambda_max"]), rel=1e-12)
        assert r["effective_batch_size"] == 16
    fig = plot_spectra(logger.log_dir, tmp_path / "spectra.png")
    assert (tmp_path / "spectra.png").stat().st_size > 10_000
    assert len(fig.axes) == 2
    # The runs' parent is not a run: the error names the run that has records.
    with pytest.raises(ValueError, match=r"1 run\(s\) below it do: 'csv/version_0'"):
        load_spectra(tmp_path)
    with pytest.raises(ValueError, match=r"1 run\(s\) below it do"):
        load_spectra(tmp_path / "csv")


def test_load_spectra_says_why_it_found_nothing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_spectra(tmp_path / "missing")
    (tmp_path / "run" / "spectra").mkdir(parents=True)
    with pytest.warns(UserWarning, match=r"no spectrum records \(step_\*\.json\)"):
        assert load_spectra(tmp_path / "run") == []


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_spectra(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, snap = _fit_with(logger, tmp_path)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0,
                                                          "images": 0})
    acc.Reload()
    events = acc.Scalars("hessian/lambda_max")
    assert [e.step for e in events] == list(range(EVERY, trainer.global_step + 1, EVERY))
    for e in events:
        assert e.value == pytest.approx(_dense_lambda_max(*snap.saved[e.step]), rel=1e-4)
    hist = acc.Histograms("hessian/density")
    assert len(hist) == len(events) // 2  # densities at the 2nd, 4th, ... measurement
    assert "hessian/density_figure" in acc.Tags()["images"]


def test_failed_measurement_is_a_warning_and_training_goes_on(tmp_path) -> None:
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        loss = F.cross_entropy(m(b[0]), b[1])
        return loss * float("nan") if calls["n"] == 1 else loss

    seed_everything(0)
    logger = CSVLogger(tmp_path, name="flaky")
    cb = flat_callback(monitor_every_n_steps=2, loss_fn=flaky, max_overhead=None,
                             density_every=0)
    trainer = Trainer(max_epochs=1, callbacks=[cb], logger=logger, enable_progress_bar=False,
                      enable_checkpointing=False)
    with pytest.warns(UserWarning, match="measurement skipped"):
        trainer.fit(TinyModule(n=64))
    assert trainer.global_step == 4
    assert cb.monitor.skipped == 1 and cb.monitor.measurements == 1
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    skipped = [float(r["hessian/skipped"]) for r in rows if r.get("hessian/skipped")]
    assert skipped == [1.0, 1.0]


def test_budget_skips_measurements_and_says_so(tmp_path) -> None:
    seed_everything(0)
    cb = flat_callback(monitor_every_n_steps=1, max_overhead=0.001, density_every=0,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    trainer = Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                      enable_checkpointing=False)
    with pytest.warns(UserWarning, match="max_overhead"):
        trainer.fit(TinyModule(n=128))
    assert cb.monitor.skipped >= 1
    assert cb.monitor.measurements + cb.monitor.skipped == trainer.global_step


def test_curvature_loss_method_is_used(tmp_path) -> None:
    class WithCurvatureLoss(TinyModule):
        used = 0

        def curvature_loss(self, batch):
            WithCurvatureLoss.used += 1
            return F.cross_entropy(self(batch[0]), batch[1])

    seed_everything(0)
    # Exact products: one call per graph build. (Line searches and difference products call the
    # loss once per pass or product.)
    cb = flat_callback(monitor_every_n_steps=2, density_every=0, max_overhead=None,
                       critical_sharpness=False, product="exact")
    trainer = Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                      enable_checkpointing=False)
    trainer.fit(WithCurvatureLoss(n=64))
    assert WithCurvatureLoss.used == 2 and cb.monitor.measurements == 2


@pytest.mark.slow
def test_logged_critical_sharpness_matches_a_line_search_on_the_same_weights(tmp_path) -> None:
    from lr_batch_callback.engine.critical import LineLoss, critical_sharpness

    logger = CSVLogger(tmp_path, name="critical")
    _, snap = _fit_with(logger, tmp_path)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("hessian/lambda_max")]
    assert rows
    for row in rows:
        state, (x, y) = snap.saved[int(row["step"])]
        model = TinyModule(norm=True).double()
        model.load_state_dict(state)
        with LineLoss(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                      [(x.double(), y)], [1.0]) as line:
            g = line.gradient()
            expected = critical_sharpness(line, g, [-t for t in g], first=0.05, rtol=1e-4,
                                          max_passes=40).sharpness
        logged = float(row["hessian/critical_sharpness"])
        assert logged == pytest.approx(expected, rel=0.03)  # float32 run, 2 % search tolerance
        # SGD: LR 0.05 (factor 1); the ratio is LR·λ_c/2, for both directions.
        assert float(row["hessian/critical_ratio"]) == pytest.approx(0.05 * logged / 2, rel=1e-6)
        update = float(row["hessian/critical_sharpness_update"])
        assert float(row["hessian/critical_ratio_update"]) == pytest.approx(0.05 * update / 2,
                                                                            rel=1e-6)
    records = load_spectra(logger.log_dir)
    assert [r.estimate.critical_sharpness for r in records] == pytest.approx(
        [float(r["hessian/critical_sharpness"]) for r in rows], rel=1e-6)
    assert all(r.estimate.critical_passes > 0 for r in records)
