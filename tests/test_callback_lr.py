"""BatchSizeLRCallback in real Trainer.fit runs: the LR used equals the scheduler's LR × factor."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import CSVLogger

from lr_batch_callback import BatchSizeLRCallback, BatchSizeSchedule
from tests.lightning_helpers import LRRecorder, TinyModule, flat_callback

SCHEDULERS = ["lambda", "onecycle", "cosine", "warm_restarts", "cyclic", "sequential", "plateau"]


def _fit(module, callbacks, tmp_path, epochs=4, **trainer_kwargs):
    seed_everything(0)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("optimizer,expected", [("sgd", 4.0), ("adamw", 2.0)])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_used_lr_is_scheduler_lr_times_factor(tmp_path, scheduler, optimizer, expected) -> None:
    schedule = {0: 16, 2: 64}  # effective batch size 16 -> 64 at epoch 2
    kwargs = dict(optimizer=optimizer, scheduler=scheduler, n=128, log_constant=True)
    base = LRRecorder()
    _fit(TinyModule(**kwargs), [BatchSizeSchedule(schedule), base], tmp_path)
    rec = LRRecorder()
    cb = BatchSizeLRCallback(rule="auto", monitor_every_n_steps=None)
    _fit(TinyModule(**kwargs), [BatchSizeSchedule(schedule), cb, rec], tmp_path)
    assert rec.batch_sizes == base.batch_sizes
    assert 16 in rec.batch_sizes and 64 in rec.batch_sizes
    assert len(rec.used) == len(base.used) > 10
    for used, ref, bs in zip(rec.used, base.used, rec.batch_sizes):
        factor = 1.0 if bs == 16 else expected
        assert used == pytest.approx(ref * factor, rel=1e-12, abs=0), (scheduler, bs)
    assert cb.reference_batch_size == 16 and cb.effective_batch_size == 64
    assert cb.factors == [expected]


def test_gradient_accumulation_scheduler_scales_lr(tmp_path) -> None:
    rec = LRRecorder()
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    base = LRRecorder()
    _fit(TinyModule(n=128), [GradientAccumulationScheduler({0: 1, 2: 4}), base], tmp_path)
    _fit(TinyModule(n=128), [GradientAccumulationScheduler({0: 1, 2: 4}), cb, rec], tmp_path)
    steps_before = 2 * (128 // 16)
    assert rec.used[:steps_before] == base.used[:steps_before]
    assert rec.used[steps_before:] == [u * 4.0 for u in base.used[steps_before:]]
    assert cb.effective_batch_size == 64 and cb.reference_batch_size == 16


def test_batch_size_finder_result_rescales_lr(tmp_path) -> None:
    from lightning.pytorch.callbacks import BatchSizeFinder

    rec = LRRecorder()
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    module = TinyModule(batch_size=8, n=512, lr=0.01)
    finder = BatchSizeFinder(mode="power", steps_per_trial=1, init_val=8, max_trials=3)
    _fit(module, [finder, cb, rec], tmp_path, epochs=1)
    found = module.batch_size
    assert found == 32  # trials at 8, 16 and 32 all succeed: nothing runs out of memory here
    assert cb.reference_batch_size == 8
    assert cb.factors == [found / 8]
    assert rec.used[0] == pytest.approx(0.01 * found / 8, rel=1e-12)


def test_resume_with_other_batch_size_is_relative_to_original_reference(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    # first run: reference 16, the schedule moves it to 32 (factor 2) before the checkpoint
    seed_everything(0)
    trainer = Trainer(max_epochs=2, callbacks=[BatchSizeSchedule({0: 16, 1: 32}), cb, ckpt],
                      logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(TinyModule(n=128))
    assert cb.factors == [2.0]
    # resume on a "different machine": batch size 64 and no schedule -> factor 64/16, not 2*4
    cb2 = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    rec = LRRecorder()
    trainer2 = Trainer(max_epochs=3, callbacks=[cb2, rec], logger=False,
                       enable_progress_bar=False, default_root_dir=tmp_path)
    trainer2.fit(TinyModule(batch_size=64, n=128), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb2.reference_batch_size == 16
    assert cb2.factors == [4.0]
    assert rec.used and all(u == pytest.approx(0.05 * 4.0) for u in rec.used)
    # the checkpointed LR stays in reference units
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.05


def test_explicit_reference_and_callable_rule(tmp_path) -> None:
    rec = LRRecorder()
    cb = BatchSizeLRCallback(rule=lambda old, new: (new / old) ** 0.25, reference_batch_size=1,
                             monitor_every_n_steps=None)
    _fit(TinyModule(batch_size=16, n=64), [cb, rec], tmp_path, epochs=1)
    assert cb.factors == [pytest.approx(2.0)]
    assert all(u == pytest.approx(0.1) for u in rec.used)


def test_no_change_is_bit_identical_with_monitoring(tmp_path) -> None:
    def run(with_callback: bool):
        seed_everything(0)  # the same initial weights in both runs
        module = TinyModule(norm=True, dropout=0.2, n=128, optimizer="adamw", lr=1e-2)
        cbs = ([flat_callback(monitor_every_n_steps=2, density_every=2, max_overhead=None)]
               if with_callback else [])
        trainer = _fit(module, cbs, tmp_path, epochs=2)
        if with_callback:
            assert cbs[0].monitor.measurements == trainer.global_step // 2  # it did measure
        return module, trainer.optimizers[0].state_dict()

    with pytest.warns(UserWarning, match="training_step"):
        m1, o1 = run(True)
    m0, o0 = run(False)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m0.state_dict().items()):
        assert torch.equal(a, b), k  # weights and BatchNorm statistics
    for key, state in o0["state"].items():
        for name, value in state.items():
            assert torch.equal(o1["state"][key][name], value), name


def test_logged_lr_keys_in_csv(tmp_path) -> None:
    import csv

    logger = CSVLogger(tmp_path, name="run")
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=None)
    seed_everything(0)
    trainer = Trainer(max_epochs=3, callbacks=[BatchSizeSchedule({0: 16, 2: 32}), cb],
                      logger=logger, enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(TinyModule(n=64))
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("lr_batch/factor")]
    assert [float(r["lr_batch/factor"]) for r in rows] == [1.0, 2.0]
    assert [float(r["lr_batch/effective_batch_size"]) for r in rows] == [16.0, 32.0]
    assert float(rows[1]["lr_batch/lr_pg0"]) == pytest.approx(0.1)
    assert int(rows[1]["step"]) == 2 * 4  # logged at the step of the change


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "quadratic"}, "quadratic"),
        ({"reference_batch_size": 0}, "reference_batch_size"),
        ({"reference_batch_size": -32}, "reference_batch_size"),
        ({"monitor_every_n_steps": 0}, "monitor_every_n_steps"),
        ({"curvature": "fisher"}, "curvature"),
        ({"k": 0}, "k must be"),
        ({"tol": 0.0}, "tol must be"),
        ({"max_overhead": 1.5}, "max_overhead"),
        ({"density_probes": -1}, "density_probes"),
    ],
)
def test_bad_arguments(kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        flat_callback(**kwargs)


def test_rule_list_must_match_optimizers(tmp_path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    cb = BatchSizeLRCallback(rule=["linear", "sqrt"], monitor_every_n_steps=None)
    with pytest.raises(MisconfigurationException, match="2 rules for 1 optimizers"):
        _fit(TinyModule(n=32), [cb], tmp_path, epochs=1)


def test_factor_is_never_nan() -> None:
    cb = BatchSizeLRCallback()
    assert math.isnan(cb.scaling_metrics()["lr_batch/effective_batch_size"])


def test_curvature_rule_fits_the_law_and_uses_it(tmp_path) -> None:
    import torch.nn.functional as F

    logger = CSVLogger(tmp_path, name="curv")
    rec = LRRecorder()
    # min_r_squared=0: this test is about the law being used; the gate has its own test below.
    cb = flat_callback(rule="curvature", monitor_every_n_steps=None, law_samples=64,
                       law_draws=2, law_min_r_squared=0.0,
                       loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    seed_everything(0)
    trainer = Trainer(max_epochs=3, callbacks=[BatchSizeSchedule({0: 16, 2: 64}), cb, rec],
                      logger=logger, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(TinyModule(n=128))
    assert cb.law is not None and cb.law.r_squared == cb.law.r_squared  # fitted, finite
    expected = cb.law.predict(16) / cb.law.predict(64)
    assert cb.factors == [pytest.approx(expected, rel=1e-12)]
    # the last steps ran at 64 with the law's factor (the fit at the change precedes them)
    assert rec.used[-1] == pytest.approx(0.05 * expected, rel=1e-9)
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("law/critical_batch_size")]
    assert rows and float(rows[-1]["law/lambda_emp"]) == pytest.approx(cb.law.lambda_emp)


def test_noisy_law_falls_back_to_the_fixed_rule(tmp_path) -> None:
    import torch.nn.functional as F

    cb = flat_callback(rule="curvature", monitor_every_n_steps=None, law_samples=64,
                       law_draws=2, law_min_r_squared=1.0,  # no real fit is that good
                             loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.warns(UserWarning, match="too noisy to use"):
        _fit(TinyModule(n=128), [BatchSizeSchedule({0: 16, 2: 64}), cb], tmp_path, epochs=3)
    assert cb.law is not None and cb.law.r_squared < 1.0
    assert cb.factors == [4.0]  # linear, the SGD fallback


def test_metrics_and_rule_names_after_fit(tmp_path) -> None:
    cb = BatchSizeLRCallback(monitor_every_n_steps=None)
    _fit(TinyModule(n=64, optimizer="adamw", lr=1e-3), [BatchSizeSchedule({0: 16, 1: 64}), cb],
         tmp_path, epochs=2)
    assert cb.rule_names == ["sqrt"]
    metrics = cb.scaling_metrics()  # still available after teardown removed the hooks
    assert metrics["lr_batch/factor"] == 2.0
    assert metrics["lr_batch/lr_pg0"] == pytest.approx(2e-3)
