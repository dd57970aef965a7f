"""How the parts are wired: every hook forwarded, one owner per piece of state, no global registry."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from lr_batch_callback import BatchSizeLRCallback
from lr_batch_callback.callbacks import BatchSizeLRScaling, SpectrumMonitor
from lr_batch_callback.monitoring.measurement import MonitorConfig
from tests.lightning_helpers import TinyModule

FAST = MonitorConfig(critical_sharpness=False, density_every=0, save_spectra=False, max_overhead=1.0)


def _trainer(callbacks: list[Callback], steps: int = 4, accumulate: int = 1) -> Trainer:
    return Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                   accumulate_grad_batches=accumulate)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if (name.startswith("on_") or name in ("setup", "teardown")) and callable(attr):
            calls = object.__getattribute__(self, "calls")

            def record(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return attr(*args, **kwargs)

            return record
        return attr


def test_the_combined_callback_forwards_every_callback_hook_to_both_parts() -> None:
    cb = BatchSizeLRCallback(monitor_every_n_steps=None, verbose=False)
    first, second = _Recorder(), _Recorder()
    cb._parts = (first, second)
    hooks = sorted(name for name, member in vars(Callback).items()
                   if callable(member) and (name.startswith("on_") or name in ("setup", "teardown")))
    assert len(hooks) > 20  # the whole Callback API, not the six hooks forwarded by hand before
    for name in hooks:
        getattr(cb, name)(*([None] * 6)[: getattr(Callback, name).__code__.co_argcount - 1])
    assert first.calls == hooks
    assert second.calls == hooks


@pytest.mark.slow  # a Trainer run
def test_the_monitor_reads_the_batch_size_and_lr_from_the_scaling_part() -> None:
    module = TinyModule(batch_size=16)
    cb = BatchSizeLRCallback(rule="linear", reference_batch_size=8, monitor_every_n_steps=2,
                             monitor=FAST, verbose=False)
    _trainer([cb], steps=4).fit(module)
    record = cb.monitor.last
    assert record is not None
    assert cb.factors == [2.0]
    assert record.context.effective_batch_size == 16
    assert record.context.lr_factor == 2.0
    assert record.context.lr == pytest.approx(module.lr * 2.0)


@pytest.mark.slow  # a Trainer run
def test_separate_parts_find_each_other_through_the_trainer() -> None:
    module = TinyModule(batch_size=16, optimizer="adamw", lr=1e-3)
    scaling = BatchSizeLRScaling(rule="sqrt", reference_batch_size=4, verbose=False)
    monitor = SpectrumMonitor(every_n_steps=2, config=FAST)
    _trainer([monitor, scaling], steps=4).fit(module)
    record = monitor.last
    assert record is not None
    assert record.context.lr_factor == pytest.approx(2.0)
    assert record.context.lr == pytest.approx(1e-3 * 2.0)


@pytest.mark.slow  # a Trainer run
def test_a_monitor_alone_reports_the_optimizer_lr_and_factor_one() -> None:
    module = TinyModule(batch_size=16, lr=0.03)
    monitor = SpectrumMonitor(every_n_steps=2, config=FAST)
    _trainer([monitor], steps=4).fit(module)
    assert monitor.last is not None
    assert monitor.last.context.lr_factor == 1.0
    assert monitor.last.context.lr == pytest.approx(0.03)


@pytest.mark.slow  # a Trainer run
def test_factors_have_one_owner_and_survive_the_end_of_fit() -> None:
    module = TinyModule(batch_size=16)
    scaling = BatchSizeLRScaling(rule="linear", reference_batch_size=32, verbose=False)
    assert scaling.factors == []
    _trainer([scaling], steps=2).fit(module)
    assert scaling.factors == [0.5]  # read from the (now detached) LRScaler
    assert not scaling._scalers[0].attached
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == module.lr  # reference units


def test_use_scaling_refuses_what_is_not_a_scaling_part() -> None:
    with pytest.raises(TypeError, match="BatchSizeLRScaling"):
        SpectrumMonitor().use_scaling(object())  # type: ignore[arg-type]
