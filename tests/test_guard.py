"""The guard on batch-size increases: the factor is capped at the edge measured after the change."""

from __future__ import annotations

import math
from typing import Any

import pytest
from lightning.pytorch import Trainer, seed_everything

from lr_batch_callback import BatchSizeLRCallback, MonitorConfig
from lr_batch_callback.callbacks import BatchSizeRamp
from lr_batch_callback.monitoring.guard import guard_factor
from lr_batch_callback.monitoring.warning import CALIBRATION
from tests.lightning_helpers import MemoryLogger, TinyModule

MOMENTUM = 0.9  # TinyModule's SGD


def _fit(guard: bool, ramp: dict[int, int], lr: float = 0.5, steps: int = 12, every: int = 1000,
         logger: Any = False) -> tuple[BatchSizeLRCallback, TinyModule]:
    seed_everything(0)  # the initialisation decides how far past the edge the factor lands
    module = TinyModule(batch_size=8, lr=lr, n=512)
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=every, verbose=False,
                             monitor=MonitorConfig(guard=guard, critical_sharpness=False,
                                                   density_every=0, save_spectra=False,
                                                   max_overhead=None))
    trainer = Trainer(max_steps=steps, callbacks=[BatchSizeRamp(ramp), cb], logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    return cb, module


def test_guard_factor_is_the_factor_over_the_ratio_past_the_edge() -> None:
    assert guard_factor(8.0, 2.0) == 4.0
    assert guard_factor(8.0, 1.0) is None
    assert guard_factor(8.0, None) is None
    assert guard_factor(8.0, math.nan) is None


@pytest.mark.slow  # a Trainer run
def test_an_increase_past_the_edge_is_capped_at_the_measured_edge() -> None:
    cb, module = _fit(guard=True, ramp={0: 8, 2: 64})
    record = cb.monitor.last
    assert record is not None and record.effective_batch_size == 64
    assert record.context.lr_factor == 8.0  # measured at the rule's factor, right after it
    lam = record.estimate.eigenvalues[0]
    ratio = 0.5 * 8.0 * lam / (2 * (1 + MOMENTUM))
    assert record.context.stability == pytest.approx(ratio, rel=1e-9)
    assert ratio > 1  # the setting of this test: linear scaling overshoots the edge
    cap = 8.0 / ratio
    assert cb.scaling.guard_cap == pytest.approx(cap)
    assert cb.factors == [pytest.approx(cap)]
    # The LR the next steps use is at the edge of the measured curvature: 2(1+μ)/λ.
    assert cb.scaling.scaling_metrics()["lr_batch/lr_pg0"] == pytest.approx(
        2 * (1 + MOMENTUM) / lam)
    assert cb.scaling.scaling_metrics()["lr_batch/guard_cap"] == pytest.approx(cap)
    assert cb.scaling.state_dict()["guard_cap"] == pytest.approx(cap)


@pytest.mark.slow  # a Trainer run
def test_without_the_guard_the_rule_factor_stands() -> None:
    cb, _ = _fit(guard=False, ramp={0: 8, 2: 64})
    assert cb.monitor.last is not None and cb.monitor.last.context.stability > 1
    assert cb.factors == [8.0]
    assert cb.scaling.guard_cap is None


@pytest.mark.slow  # a Trainer run
def test_a_small_lr_is_not_capped() -> None:
    cb, _ = _fit(guard=True, ramp={0: 8, 2: 16}, lr=1e-3)
    assert cb.monitor.last is not None and cb.monitor.last.context.stability < 1
    assert cb.factors == [2.0]
    assert cb.scaling.guard_cap is None


@pytest.mark.slow  # a Trainer run
def test_the_warning_after_an_increase_uses_the_absolute_form_without_a_prior_measurement() -> None:
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match="after the batch-size increase to 64"):
        cb, _ = _fit(guard=False, ramp={0: 8, 2: 64}, logger=logger)
    record = cb.monitor.last
    assert record is not None and record.context.stability is not None
    (risk,) = logger.values("hessian/change_risk").values()
    assert risk == pytest.approx(record.context.stability / CALIBRATION[(False, False)][1])


@pytest.mark.slow  # a Trainer run
def test_the_warning_after_an_increase_compares_with_the_measurement_before_it() -> None:
    logger = MemoryLogger()
    cb, _ = _fit(guard=False, ramp={0: 8, 2: 64}, lr=0.01, every=4, logger=logger)
    stability = logger.values("hessian/stability")
    sizes = logger.values("hessian/effective_batch_size")
    before = max(step for step, size in sizes.items() if size == 8)
    after = min(step for step, size in sizes.items() if size == 64)
    (step, risk), = logger.values("hessian/change_risk").items()
    assert step == after
    # LR × λ_max after over before = the ratio of the stability ratios (same momentum).
    expected = stability[after] / stability[before] / CALIBRATION[(False, True)][1]
    assert risk == pytest.approx(expected, rel=1e-9)


def test_a_restored_cap_applies_only_at_the_size_it_was_measured_at() -> None:
    from lr_batch_callback.callbacks import BatchSizeLRScaling

    state = {"reference_batch_size": 8, "guard_cap": 0.25, "guard_cap_batch_size": 64}
    for size, expected in ((64, [0.25]), (8, [1.0])):
        scaling = BatchSizeLRScaling(rule="linear", verbose=False)
        scaling.load_state_dict(state)
        module = TinyModule(batch_size=size, lr=0.01)
        Trainer(max_steps=1, callbacks=[scaling], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu").fit(module)
        factor = min(size / 8, 0.25) if expected == [0.25] else size / 8
        assert scaling.factors == [pytest.approx(factor)]


@pytest.mark.slow  # a Trainer run
def test_no_measurement_right_after_the_change_means_no_guard_and_no_warning() -> None:
    seed_everything(0)
    module = TinyModule(batch_size=8, lr=0.5, n=512)
    cb = BatchSizeLRCallback(rule="linear", monitor_every_n_steps=11, verbose=False,
                             monitor_on_batch_size_change=False,
                             monitor=MonitorConfig(critical_sharpness=False, density_every=0,
                                                   save_spectra=False, max_overhead=None))
    logger = MemoryLogger()
    Trainer(max_steps=12, callbacks=[BatchSizeRamp({0: 8, 2: 64}), cb], logger=logger,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu").fit(module)
    assert cb.monitor.last is not None and cb.monitor.last.step == 11
    assert cb.factors == [8.0]
    assert not logger.values("hessian/change_risk")
