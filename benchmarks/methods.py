"""One λ_max estimate by each method, called the way its own sources intend, on one batch.

Every function takes the problem, the batch and the method's own knobs, and returns an
:class:`Outcome`: the estimate, the operator-vector products it used (counted by wrapping the
method's product), and the wall time *including* its set-up (graph or operator construction).

Peers (the ``bench`` extra): PyHessian 0.1, hessian-eigenthings 1.0.0a5, curvlinops (with scipy's
ARPACK ``eigsh``, the eigensolver its documentation uses). A missing peer raises
:class:`PeerMissing`; the caller turns every failure into a table entry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.problems import Problem

PEERS = {  # name: (module, distribution)
    "PyHessian": ("pyhessian", "pyhessian"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
}


class PeerMissing(RuntimeError):
    """The peer package is not installed."""


@dataclass(frozen=True)
class Outcome:
    """What one configured call returned."""

    value: float
    products: int
    seconds: float
    config: str
    converged: bool | None = None


def installed(peer: str) -> bool:
    return importlib.util.find_spec(PEERS[peer][0]) is not None


def versions() -> dict[str, str]:
    out = {}
    for name, dist in [("lr_batch_callback", "lr_batch_callback"), ("torch", "torch")] + [
            (peer, dist) for peer, (_, dist) in PEERS.items()]:
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _require(peer: str) -> None:
    if not installed(peer):
        raise PeerMissing(f"{peer} not installed")


def relative_error(value: float | None, reference: float) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    return abs(value - reference) / abs(reference)


def _config(call: str, **kwargs: Any) -> str:
    return f"{call}(" + ", ".join(f"{k}={v!r}" if not isinstance(v, float) else f"{k}={v:g}"
                                  for k, v in kwargs.items() if v is not None) + ")"


# -- ours ---------------------------------------------------------------------------------------


def ours(problem: Problem, batch: Any, *, tol: float, max_iter: int | None = None,
         seed: int = 0) -> Outcome:
    """``hessian_eigenvalues(model, loss_fn, batch, tol=..., max_iter=..., seed=...)``."""
    from lr_batch_callback import hessian_eigenvalues

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "stopped at max_iter": tuned on purpose
        res = hessian_eigenvalues(problem.model, problem.loss_fn, batch, tol=tol,
                                  max_iter=max_iter, seed=seed)
    seconds = time.perf_counter() - start
    return Outcome(float(res.eigenvalues[0]), res.num_products, seconds,
                   _config("hessian_eigenvalues", tol=tol, max_iter=max_iter), res.converged)


def ours_measurement(problem: Problem, batch: Any, *, parts: tuple[bool, bool] = (False, False),
                     seed: int = 0, config: Any = None) -> Outcome:
    """``measure_spectrum(..., MonitorConfig(), parts=parts)``: what SpectrumMonitor runs."""
    from lr_batch_callback import MonitorConfig
    from lr_batch_callback.monitoring.measurement import Parts, TrainingState, measure_spectrum

    start = time.perf_counter()
    record, _ = measure_spectrum(problem.model, problem.loss_fn, batch, config or MonitorConfig(),
                                 state=TrainingState(), parts=Parts(*parts), seed=seed)
    seconds = time.perf_counter() - start
    return Outcome(record.lambda_max, record.estimate.num_products, seconds,
                   f"measure_spectrum(MonitorConfig(), parts={parts})", record.estimate.converged)


def reference_lambda(problem: Problem, batch: Any, *, tol: float = 1e-10, max_iter: int = 300,
                     seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """λ_max from long, tight runs of ours on a float64 copy of the model and batch."""
    import copy

    from lr_batch_callback import hessian_eigenvalues

    model64 = copy.deepcopy(problem.model).double()
    x, y = batch
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in seeds:
            runs.append(hessian_eigenvalues(model64, problem.loss_fn, (x.double(), y), tol=tol,
                                            max_iter=max_iter, seed=seed))
    values = [float(r.eigenvalues[0]) for r in runs]
    lam = max(values)
    return {"lambda_max": lam, "seed_spread": (max(values) - min(values)) / abs(lam),
            "products": [r.num_products for r in runs], "converged": all(r.converged for r in runs),
            "error_bound": max(float(r.error_bounds[0]) for r in runs) / abs(lam),
            "config": f"float64 copy, tol={tol:g}, max_iter={max_iter}, seeds {list(seeds)}"}


# -- PyHessian ----------------------------------------------------------------------------------


def pyhessian(problem: Problem, batch: Any, *, tol: float = 1e-3, max_iter: int = 100,
              seed: int = 0) -> Outcome:
    """``hessian(model, criterion, data=batch, cuda=False).eigenvalues(maxIter, tol)``: power
    iteration; the start vector is drawn from the global generator, seeded here."""
    _require("PyHessian")
    import pyhessian.hessian  # noqa: F401 - the package re-exports the class under this name

    ph = sys.modules["pyhessian.hessian"]
    original = ph.hessian_vector_product
    count = [0]

    def counting(*args: Any) -> Any:
        count[0] += 1
        return original(*args)

    ph.hessian_vector_product = counting
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            start = time.perf_counter()
            h = ph.hessian(problem.model, problem.criterion, data=batch, cuda=False)
            values, _ = h.eigenvalues(maxIter=max_iter, tol=tol)
            seconds = time.perf_counter() - start
    finally:
        ph.hessian_vector_product = original
        problem.clear_grads()
    return Outcome(float(values[0]), count[0], seconds,
                   _config("eigenvalues", maxIter=max_iter, tol=tol), count[0] < max_iter)


# -- hessian-eigenthings --------------------------------------------------------------------------


def _eigenthings_operator(problem: Problem, batch: Any, count: list[int]) -> Any:
    _require("hessian-eigenthings")
    import hessian_eigenthings as he

    op = he.HessianOperator(problem.model, [batch], problem.loss_fn)
    base = op.matvec

    def counting(v: Tensor) -> Tensor:
        count[0] += 1
        return base(v)

    op.matvec = counting
    return op


def eigenthings_power(problem: Problem, batch: Any, *, tol: float = 1e-4, max_iter: int = 100,
                      seed: int = 0) -> Outcome:
    """``power_iteration_one(HessianOperator(model, [batch], loss_fn), max_iter, tol, seed)``."""
    import hessian_eigenthings as he

    count = [0]
    start = time.perf_counter()
    try:
        op = _eigenthings_operator(problem, batch, count)
        value, _, _, _, converged = he.power_iteration_one(op, max_iter=max_iter, tol=tol,
                                                           seed=seed)
    finally:
        problem.clear_grads()
    return Outcome(float(value), count[0], time.perf_counter() - start,
                   _config("power_iteration_one", max_iter=max_iter, tol=tol), bool(converged))


def eigenthings_lanczos(problem: Problem, batch: Any, *, tol: float = 1e-4,
                        max_iter: int | None = None, seed: int = 0) -> Outcome:
    """``lanczos(op, k=1, which="LA", max_iter, tol, seed)``: exactly ``max_iter`` steps (default
    ``2k``); ``tol`` only sets the ``converged`` flag."""
    import hessian_eigenthings as he

    count = [0]
    start = time.perf_counter()
    try:
        op = _eigenthings_operator(problem, batch, count)
        res = he.lanczos(op, k=1, which="LA", max_iter=max_iter, tol=tol, seed=seed)
    finally:
        problem.clear_grads()
    return Outcome(float(res.eigenvalues[0]), count[0], time.perf_counter() - start,
                   _config("lanczos", k=1, which="LA", max_iter=max_iter, tol=tol),
                   bool(res.converged[0]))


def eigenthings_lanczos_doubling(problem: Problem, batch: Any, *, tol: float = 1e-4,
                                 cap: int = 128, seed: int = 0) -> Outcome:
    """How a user without the answer drives its ``lanczos``: ``max_iter`` = 2, 4, 8, ... until
    ``converged``; products and time summed over the runs."""
    products, seconds, steps = 0, 0.0, 2
    while True:
        o = eigenthings_lanczos(problem, batch, tol=tol, max_iter=steps, seed=seed)
        products, seconds = products + o.products, seconds + o.seconds
        if o.converged or steps >= cap:
            return Outcome(o.value, products, seconds,
                           f"lanczos(k=1, which='LA', tol={tol:g}), max_iter 2, 4, … {steps}",
                           o.converged)
        steps = min(2 * steps, cap)


# -- curvlinops + scipy eigsh ---------------------------------------------------------------------


def curvlinops_eigsh(problem: Problem, batch: Any, *, tol: float = 0.0, ncv: int | None = None,
                     seed: int | None = 0) -> Outcome:
    """``eigsh(HessianLinearOperator(...).to_scipy(), k=1, which="LA", tol, ncv, v0)``; ``v0``
    drawn from ``seed`` (``None``: ARPACK's own random start)."""
    _require("curvlinops")
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    count = [0]
    start = time.perf_counter()
    try:
        # check_deterministic=False: its construction-time self-test costs extra products.
        scipy_op = HessianLinearOperator(problem.model, problem.criterion, problem.params, [batch],
                                         check_deterministic=False).to_scipy()

        def matvec(x: np.ndarray) -> np.ndarray:
            count[0] += 1
            return scipy_op.matvec(x)

        op = LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
        v0 = None
        if seed is not None:
            v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
        values = eigsh(op, k=1, which="LA", tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False)
    finally:
        problem.clear_grads()
    return Outcome(float(values[-1]), count[0], time.perf_counter() - start,
                   _config("eigsh", k=1, which="LA", tol=tol, ncv=ncv), None)


Method = Callable[..., Outcome]
