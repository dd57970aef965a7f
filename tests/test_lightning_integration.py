"""Lightning without surprises (issue 13): the reference batch size, resumes, logged batch sizes,
spectra per run as artifacts (MLflow, W&B offline), batch_size_fn, the effective LR per step,
the progress bar, fast_dev_run, BatchSizeSchedule, argument checks."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lr_batch_callback import (
    BatchSizeLRCallback,
    BatchSizeSchedule,
    MonitorConfig,
    load_spectra,
    scaling_factor,
)
from tests.lightning_helpers import LRRecorder, MemoryLogger, TinyModule

QUIET = MonitorConfig(max_overhead=None, lambda_min_every=0, density_every=0)


def _fit(module: Any, callbacks: list[Any], tmp_path: Path, epochs: int = 1, **kwargs: Any) -> Trainer:
    seed_everything(0)
    defaults: dict[str, Any] = dict(logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    accelerator="cpu", devices=1, default_root_dir=tmp_path)
    defaults.update(kwargs)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, **defaults)
    trainer.fit(module)
    return trainer


# -- 2. the reference batch size comes from what trains ------------------------------------------

class IgnoresItsAttribute(TinyModule):
    """``self.batch_size = 64`` (or a stale hparams value) while the loader uses 16."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True,
                          generator=torch.Generator().manual_seed(1))


def test_loader_wins_over_a_stale_attribute_and_says_so(tmp_path) -> None:
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    rec = LRRecorder()
    with pytest.warns(UserWarning, match=r"`batch_size` is 64 but the train dataloader uses "
                                         r"batch_size=16"):
        _fit(IgnoresItsAttribute(batch_size=64, n=64), [cb, rec], tmp_path)
    assert cb.reference_batch_size == 16 and cb.factors == [1.0]
    assert rec.used == [0.05] * 4


def test_stale_hparams_batch_size_is_not_the_reference(tmp_path) -> None:
    class FromHparams(IgnoresItsAttribute):
        def __init__(self) -> None:
            super().__init__(n=64)
            del self.batch_size
            self.save_hyperparameters({"batch_size": 64})

    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    with pytest.warns(UserWarning, match="the dataloader is what trains"):
        _fit(FromHparams(), [cb], tmp_path)
    assert cb.factors == [1.0]


# -- 3. a resume with the rule spelled differently keeps the reference ----------------------------

def test_resume_with_another_spelling_of_the_rule_keeps_the_reference(tmp_path, caplog) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = BatchSizeLRCallback(rule="auto", monitor_every_n_steps=None)
    _fit(TinyModule(n=64), [BatchSizeSchedule({0: 16, 1: 32}), first, ckpt], tmp_path, epochs=2,
         enable_checkpointing=True)
    assert first.factors == [2.0]
    second = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    seed_everything(0)
    trainer = Trainer(max_epochs=3, callbacks=[second], logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(TinyModule(batch_size=64, n=64), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.reference_batch_size == 16 and second.factors == [4.0]


def test_changing_the_rule_on_resume_is_announced(tmp_path, caplog) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(TinyModule(n=64), [BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None), ckpt],
         tmp_path, enable_checkpointing=True)
    second = BatchSizeLRCallback(rule="sqrt", monitor_every_n_steps=None)
    trainer = Trainer(max_epochs=2, callbacks=[second], logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(TinyModule(batch_size=64, n=64), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert "trained with rule 'linear', this run uses 'sqrt'" in caplog.text
    assert second.factors == [2.0]  # sqrt(64 / 16) from the kept reference


# -- 4. logged batch sizes say what they are ------------------------------------------------------

@pytest.mark.slow
def test_measured_samples_and_effective_batch_size_are_separate_keys(tmp_path) -> None:
    logger = MemoryLogger()
    cb = BatchSizeLRCallback(monitor_every_n_steps=1, monitor=QUIET,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    _fit(TinyModule(batch_size=32, n=192), [cb], tmp_path, logger=logger,
         accumulate_grad_batches=3)
    assert set(logger.values("hessian/batch_size").values()) == {32.0}  # one micro-batch
    assert set(logger.values("hessian/effective_batch_size").values()) == {96.0}


# -- 5. spectra per run, never shared; artifacts in MLflow and W&B --------------------------------

def _monitored(tmp_path: Path, logger: Any) -> BatchSizeLRCallback:
    cb = BatchSizeLRCallback(monitor_every_n_steps=2, monitor=QUIET,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    _fit(TinyModule(n=64), [cb], tmp_path, logger=logger)
    return cb


@pytest.mark.slow
def test_two_csv_runs_keep_their_own_spectra(tmp_path) -> None:
    a, b = CSVLogger(tmp_path, name="same"), CSVLogger(tmp_path, name="same")
    _monitored(tmp_path, a)
    _monitored(tmp_path, b)
    assert a.log_dir != b.log_dir
    assert [r.step for r in load_spectra(a.log_dir)] == [2, 4]
    assert [r.step for r in load_spectra(b.log_dir)] == [2, 4]


@pytest.mark.slow
def test_mlflow_runs_get_the_spectra_as_artifacts(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    runs = []
    for _ in range(2):
        logger = MLFlowLogger(experiment_name="spectra", tracking_uri=uri)
        _monitored(tmp_path, logger)
        runs.append(logger.run_id)
    client = MlflowClient(tracking_uri=uri)
    for run_id in runs:
        names = sorted(Path(a.path).name for a in client.list_artifacts(run_id, "spectra"))
        assert names == ["step_000000002_hessian.json", "step_000000004_hessian.json"]
        local = client.download_artifacts(run_id, "spectra/step_000000004_hessian.json",
                                          str(tmp_path / run_id))
        record = json.loads(Path(local).read_text())
        assert record["step"] == 4 and math.isfinite(record["lambda_max"])
        history = client.get_metric_history(run_id, "hessian/lambda_max")
        assert [m.step for m in history] == [2, 4]
    assert not (tmp_path / "mlruns" / "spectra").exists()  # nothing in a folder shared by runs


@pytest.mark.slow
def test_wandb_offline_run_gets_the_spectra_as_run_files(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    logger = WandbLogger(project="spectra", save_dir=str(tmp_path), offline=True)
    run = logger.experiment
    saved: list[tuple[str, dict[str, Any]]] = []
    real_save = run.save

    def spy(glob_str: str, *args: Any, **kwargs: Any) -> Any:
        saved.append((glob_str, kwargs))
        return real_save(glob_str, *args, **kwargs)

    monkeypatch.setattr(run, "save", spy)  # the public API the library uploads files with
    _monitored(tmp_path, logger)
    files = Path(run.dir)
    last = run.summary["hessian/lambda_max"]  # the run's summary: the last logged value
    wandb.finish()  # flushes and closes the run: the files read below are complete on disk
    assert files.name == "files" and files.parent.name.startswith("offline-run-")
    names = ["step_000000002_hessian.json", "step_000000004_hessian.json"]
    assert sorted(p.name for p in (files / "spectra").glob("*.json")) == names
    records = load_spectra(files)
    assert [r.step for r in records] == [2, 4] and all(math.isfinite(r.lambda_max) for r in records)
    assert last == pytest.approx(records[-1].lambda_max, rel=1e-12)  # the same measurement
    # Each file was saved with the run at once, relative to the run's files folder.
    assert [Path(g).relative_to(files).as_posix() for g, _ in saved] == [f"spectra/{n}" for n in names]
    assert all(kw.get("base_path") == str(files) and kw.get("policy") == "now" for _, kw in saved)


# -- 6. batch_size_fn for custom batch objects ----------------------------------------------------

class Batch(NamedTuple):
    inputs: torch.Tensor
    labels: torch.Tensor


class Custom:
    """A batch object that is not a tensor container: only batch_size_fn can count it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


class CustomBatches(TinyModule):
    def __init__(self, size: int) -> None:
        super().__init__(n=64)
        del self.batch_size
        self.size = size

    def train_dataloader(self) -> DataLoader:
        x, y = self.data.tensors
        batches = [Custom(x[i:i + self.size], y[i:i + self.size]) for i in range(0, 64, self.size)]
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    def training_step(self, batch: Custom, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch.x), batch.y)


def test_batch_size_fn_counts_custom_batches(tmp_path) -> None:
    cb = BatchSizeLRCallback(rule="linear", reference_batch_size=8, batch_size_fn=lambda b: len(b.x),
                             monitor_every_n_steps=None)
    _fit(CustomBatches(size=16), [cb], tmp_path)
    assert cb.effective_batch_size == 16 and cb.factors == [2.0]


def test_without_batch_size_fn_scaling_says_it_is_inactive(tmp_path) -> None:
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    with pytest.warns(UserWarning) as record:
        _fit(CustomBatches(size=16), [cb], tmp_path)
    messages = [str(w.message) for w in record]
    assert any("pass `batch_size_fn=`" in m for m in messages)
    assert sum("inactive" in m and "batch_size_fn=" in m for m in messages) == 1  # said once
    assert cb.factors == []


# -- 7. the effective LR on every step, the progress bar ------------------------------------------

def test_effective_lr_on_the_logging_cadence_and_factor_in_the_progress_bar(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="lr")
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=2, monitor=QUIET,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    trainer = _fit(TinyModule(n=64), [BatchSizeSchedule({0: 16, 1: 32}), cb], tmp_path, epochs=2,
                   logger=logger, log_every_n_steps=1)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("lr_batch/lr_pg0") and not
                r.get("lr_batch/factor")]
    by_step = {int(r["step"]): float(r["lr_batch/lr_pg0"]) for r in rows}
    assert sorted(by_step) == list(range(0, 6))  # every optimizer step (cadence 1)
    assert [by_step[s] for s in range(6)] == [0.05] * 4 + [pytest.approx(0.1)] * 2
    assert trainer.progress_bar_metrics["lr_factor"] == 2.0
    assert math.isfinite(trainer.progress_bar_metrics["lambda_max"])


class BarRecorder(Callback):
    """The progress bar's ``lr_factor`` at the start of every batch and at the end."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self.seen.append(trainer.progress_bar_metrics.get("lr_factor"))

    def on_train_end(self, trainer: Trainer, *args: Any) -> None:
        self.seen.append(trainer.progress_bar_metrics.get("lr_factor"))


def test_factor_reaches_the_progress_bar_off_the_logging_cadence(tmp_path) -> None:
    # 6 steps with log_every_n_steps=50: no step is a logging step, yet the bar shows the factor
    # from the first step on, and the new one after the change.
    bar = BarRecorder()
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    _fit(TinyModule(n=64), [bar, BatchSizeSchedule({0: 16, 1: 32}), cb], tmp_path, epochs=2,
         log_every_n_steps=50)
    # Before each step: the factor of the step before it (none before the first); then the last.
    assert bar.seen == [None, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]


# -- 8. fast_dev_run, BatchSizeSchedule, one line per change --------------------------------------

def test_fast_dev_run_writes_no_spectra_files(tmp_path) -> None:
    cb = BatchSizeLRCallback(monitor_every_n_steps=1, monitor=QUIET,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    _fit(TinyModule(n=64), [cb], tmp_path, logger=CSVLogger(tmp_path), fast_dev_run=True)
    assert not list(tmp_path.rglob("step_*.json"))


def test_schedule_announces_no_change_for_an_epoch_that_never_runs(tmp_path, caplog) -> None:
    module = TinyModule(n=32)
    with caplog.at_level("INFO"):
        _fit(module, [BatchSizeSchedule({0: 16, 2: 32})], tmp_path, epochs=2)
    assert "from epoch 2" not in caplog.text
    assert module.batch_size == 16


def test_schedule_resumes_without_lightnings_missing_callback_warning(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(TinyModule(n=32), [BatchSizeSchedule({0: 16}), ckpt], tmp_path, enable_checkpointing=True)
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(TinyModule(n=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not [w for w in record if "BatchSizeSchedule" in str(w.message)]


@pytest.mark.slow
def test_curvature_rule_prints_one_factor_line_per_change(tmp_path, caplog) -> None:
    cb = BatchSizeLRCallback(rule="curvature", monitor_every_n_steps=None,
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with caplog.at_level("INFO"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(TinyModule(n=128), [BatchSizeSchedule({0: 16, 1: 64}), cb], tmp_path, epochs=2)
    lines = [r for r in caplog.messages if "effective batch size 64" in r]
    assert len(lines) == 1


# -- 9. every argument validated --------------------------------------------------------------------

@pytest.mark.parametrize("build,message", [
    (lambda: MonitorConfig(lambda_min_every="yes"), r"lambda_min_every must be a non-negative integer"),
    (lambda: BatchSizeLRCallback(verbose="no"), r"verbose must be True or False, got 'no'"),
    (lambda: MonitorConfig(save_spectra=None), r"save_spectra must be True or False, got None"),
    (lambda: BatchSizeLRCallback(batch_size_attr=None), r"batch_size_attr must be an attribute name"),
    (lambda: BatchSizeLRCallback(rule="Linear"), r"Unknown rule 'Linear'.*Did you mean 'linear'\?"),
    (lambda: BatchSizeLRCallback(rule="sqr"), r"Did you mean 'sqrt'\?"),
    (lambda: BatchSizeLRCallback(monitor_every_n_steps=0), r"None turns monitoring off"),
    (lambda: MonitorConfig(curvature="hesian"), r"Did you mean 'hessian'\?"),
    (lambda: BatchSizeLRCallback(reference_batch_size=12.5), r"reference_batch_size must be an integer >= 1"),
    (lambda: BatchSizeLRCallback(monitor="default"), r"monitor must be a MonitorConfig"),
])
def test_every_argument_is_validated(build, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


@pytest.mark.parametrize("build,error,message", [
    # The wrong kind of value is a TypeError, a wrong value of the right kind a ValueError.
    (lambda: BatchSizeLRCallback(monitor_every_n_steps=True), TypeError,
     r"monitor_every_n_steps must be a positive integer or None, got the bool True"),
    (lambda: BatchSizeLRCallback(reference_batch_size="32"), TypeError,
     r"reference_batch_size must be an integer >= 1 or None, got '32' of type str"),
    (lambda: BatchSizeLRCallback(rule=[]), ValueError, r"rule=\[\] names no rule"),
    (lambda: BatchSizeSchedule({"1": 32}), TypeError, r"the scheduling key '1' must be a "
     r"non-negative integer"),
    (lambda: BatchSizeSchedule({1: 0}), ValueError, r"the batch size at epoch 1 of scheduling"),
    (lambda: BatchSizeSchedule({-1: 32}), ValueError, r"the scheduling key -1"),
])
def test_construction_errors_name_the_bad_value_and_its_kind(build, error, message) -> None:
    with pytest.raises(error, match=message):
        build()


def test_integral_numbers_are_accepted_where_counts_are_expected() -> None:
    # What a YAML file or a division gives: 32.0 is the count 32; a string is not a number.
    assert BatchSizeLRCallback(reference_batch_size=32.0).scaling.reference_batch_size == 32
    assert BatchSizeLRCallback(monitor_every_n_steps=20.0).monitor.every_n_steps == 20
    assert BatchSizeSchedule({0.0: 32.0}).scheduling == {0: 32}


def test_integer_rules_are_the_same_in_scaling_factor_and_the_callback(tmp_path) -> None:
    assert scaling_factor("sqrt", 32.0, 64) == pytest.approx(math.sqrt(2))
    cb = BatchSizeLRCallback(rule="linear", reference_batch_size=32.0, monitor_every_n_steps=None)
    assert cb.reference_batch_size == 32 and isinstance(cb.reference_batch_size, int)


def test_monitoring_off_is_none_not_zero() -> None:
    cb = BatchSizeLRCallback(monitor_every_n_steps=None)
    assert not cb.monitor.enabled
    assert os.environ.get("NOTHING") is None
