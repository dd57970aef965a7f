"""The monitoring budget: which due measurements run, and what cadence that gives.

It keeps monitoring a small fraction of training time. Training time is wall time since the start
minus the time spent measuring. A measurement that is due runs when the time spent measuring, plus
its predicted cost, stays within ``max_overhead`` of the training time; otherwise it waits for the
next due step, so an expensive configuration stretches the cadence instead of losing every
measurement. The first measurement always runs: it prices the others (the cost of building the
curvature graph and of one product, measured, not guessed). The occasional parts (λ_min, density)
are left out first: a measurement that does not fit whole runs without them when λ_max alone fits,
and they wait for a measurement that can afford them.

No Lightning here; the clock can be injected for tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lr_batch_callback.monitoring.measurement import MeasurementCost, Parts

__all__ = ["Budget", "Plan"]


@dataclass(frozen=True)
class Plan:
    """The parts a measurement will have (``run=False``: postponed by the budget)."""

    run: bool
    lambda_min: bool = False
    density: bool = False

    @property
    def parts(self) -> Parts:
        """The occasional parts of the planned measurement."""
        return Parts(lambda_min=self.lambda_min, density=self.density)


class Budget:
    """Decides which due measurements run (see the module docstring).

    Args:
        max_overhead: fraction of training time measurements may take; ``None``: no budget.
        clock: seconds, monotonic (injectable for tests).
        first_guess: products per part (``"lambda_min"``, ``"density"``) assumed before that part
            was ever measured, usually its cap.
    """

    def __init__(self, max_overhead: float | None,
                 clock: Callable[[], float] = time.perf_counter,
                 first_guess: dict[str, int] | None = None) -> None:
        self.max_overhead = max_overhead
        self.clock = clock
        self.spent_seconds = 0.0
        self.cost: MeasurementCost | None = None
        self._start: float | None = None
        self._start_step = 0
        self.last_products = {"lambda_max": 0, "lambda_min": 0, "density": 0}
        # Products of a part never measured yet: its cap, so that a dear part is not taken as
        # free the first time (λ_min and the density cost tens of times λ_max).
        self.first_guess = dict(first_guess or {})

    def start(self, step: int) -> None:
        """Mark the start of training (training time excludes measuring time)."""
        if self._start is None:
            self._start = self.clock()
            self._start_step = step

    def training_seconds(self) -> float:
        """Wall time since :meth:`start`, less the time spent measuring (0 before the start)."""
        if self._start is None:
            return 0.0
        return max(self.clock() - self._start - self.spent_seconds, 0.0)

    def predict(self, lambda_min: bool, density: bool) -> float:
        """Predicted seconds of a measurement with these parts (``inf`` before the first)."""
        if self.cost is None:
            return math.inf
        def count(part: str) -> int:
            return self.last_products[part] or self.first_guess.get(part, 0)

        products = count("lambda_max")
        if lambda_min:
            products += count("lambda_min")
        if density:
            products += count("density")
        return self.cost.build_seconds + products * self.cost.seconds_per_product

    def _fits(self, seconds: float) -> bool:
        assert self.max_overhead is not None
        return self.spent_seconds + seconds <= self.max_overhead * self.training_seconds()

    def plan(self, lambda_min: bool, density: bool) -> Plan:
        """The parts of the measurement due now, given what is wanted."""
        if self.max_overhead is None or self.cost is None:
            return Plan(True, lambda_min, density)
        if self._fits(self.predict(lambda_min, density)):
            return Plan(True, lambda_min, density)
        if (lambda_min or density) and self._fits(self.predict(False, False)):
            return Plan(True, False, False)
        return Plan(False)

    def record(self, seconds: float, cost: MeasurementCost, products: dict[str, int]) -> None:
        """Account for a measurement that ran: its wall time, cost model and product counts."""
        self.spent_seconds += seconds
        self.cost = cost
        for part, count in products.items():
            if count:
                self.last_products[part] = count

    def sustainable_every(self, steps_so_far: int) -> int | None:
        """Steps between measurements the budget sustains at the current costs.

        ``None`` without a budget or before a measurement.
        """
        if self.max_overhead is None or self.cost is None or steps_so_far <= 0:
            return None
        per_step = self.training_seconds() / steps_so_far
        if per_step <= 0:
            return None
        return max(1, math.ceil(self.predict(False, False) / (self.max_overhead * per_step)))
