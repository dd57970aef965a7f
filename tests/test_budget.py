"""The monitoring budget with an injected clock: the first measurement always runs and prices
the rest; over budget the cadence stretches instead of every measurement being lost; the dear
parts wait while λ_max runs."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lr_batch_callback import MonitorConfig, SpectrumMonitor
from lr_batch_callback.monitoring.budget import Budget, Plan
from lr_batch_callback.monitoring.measurement import MeasurementCost
from tests.lightning_helpers import TinyModule


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _budget(max_overhead: float | None = 0.05) -> tuple[Budget, Clock]:
    clock = Clock()
    budget = Budget(max_overhead, clock=clock)
    budget.start(step=0)
    return budget, clock


def _measured(budget: Budget, clock: Clock, seconds: float, products: dict[str, int]) -> None:
    clock.t += seconds  # measuring time is not training time
    budget.record(seconds, MeasurementCost(build_seconds=0.1, seconds_per_product=0.1), products)


def test_the_first_measurement_always_runs_whatever_it_costs() -> None:
    budget, clock = _budget(max_overhead=1e-6)
    clock.t = 0.001  # almost no training yet
    assert budget.plan(lambda_min=True, density=True) == Plan(True, True, True)


def test_costs_are_learned_and_over_budget_postpones() -> None:
    budget, clock = _budget()
    clock.t = 10.0
    _measured(budget, clock, 1.0, {"lambda_max": 9, "lambda_min": 0, "density": 0})
    assert budget.predict(False, False) == pytest.approx(0.1 + 9 * 0.1)
    clock.t += 5.0  # 15 s of training: 5% is 0.75 s, 1 s spent already
    assert budget.plan(False, False) == Plan(False)
    clock.t += 25.0  # 40 s of training: 2 s allowed, 1 + 1 fits
    assert budget.plan(False, False) == Plan(True, False, False)


def test_the_dear_parts_wait_while_lambda_max_runs() -> None:
    budget, clock = _budget()
    clock.t = 100.0
    _measured(budget, clock, 1.0, {"lambda_max": 5, "lambda_min": 40, "density": 80})
    clock.t += 1.0
    # λ_max alone (0.6 s) fits in 5% of 100 s with 1 s spent; with the density (8.6 s) it does not.
    assert budget.plan(lambda_min=False, density=True) == Plan(True, False, False)
    clock.t += 400.0
    assert budget.plan(lambda_min=False, density=True) == Plan(True, False, True)


def test_the_sustainable_cadence_is_what_the_budget_affords() -> None:
    budget, clock = _budget()
    clock.t = 10.0  # 1000 steps of 10 ms
    _measured(budget, clock, 0.5, {"lambda_max": 4, "lambda_min": 0, "density": 0})
    # 0.5 s per measurement, 5% of 10 ms per step: one measurement every 1000 steps.
    assert budget.sustainable_every(steps_so_far=1000) == 1000


def test_no_budget_runs_everything() -> None:
    budget, clock = _budget(max_overhead=None)
    _measured(budget, clock, 100.0, {"lambda_max": 5, "lambda_min": 0, "density": 0})
    assert budget.plan(True, True) == Plan(True, True, True)
    assert budget.sustainable_every(10) is None


def test_an_explicit_cadence_never_yields_zero_measurements(tmp_path, caplog) -> None:
    seed_everything(0)
    monitor = SpectrumMonitor(every_n_steps=1, config=MonitorConfig(max_overhead=1e-4),
                              loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    trainer = Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match="cadence stretches"):
        trainer.fit(TinyModule(n=128))
    assert monitor.measurements >= 1
    assert monitor.measurements + monitor.skipped == trainer.global_step
    assert "allows about one measurement every" in caplog.text


def test_a_part_never_measured_is_priced_at_its_cap() -> None:
    budget, clock = _budget()
    budget.first_guess = {"density": 80}
    clock.t = 100.0
    _measured(budget, clock, 0.5, {"lambda_max": 5, "lambda_min": 0, "density": 0})
    clock.t += 1.0
    assert budget.predict(False, True) == pytest.approx(0.1 + 85 * 0.1)
    assert budget.plan(False, True) == Plan(True, False, False)  # 8.6 s does not fit yet
