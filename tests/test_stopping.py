"""The stopping rule on built spectra: it stops soon after the eigenvalue is accurate, and never
claims convergence for a value off by more than 10× the tolerance — single outliers, close pairs,
clusters, tiny gaps, power laws."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from lr_batch_callback import CurvatureOperator, lanczos
from lr_batch_callback.engine.lanczos import error_bounds

N = 300


def _spectrum(kind: str, gap: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    bulk = g.uniform(-0.5, 0.5, N)
    if kind == "powerlaw":
        return torch.tensor(np.sort(g.pareto(1.5, N))[::-1] / 10)
    top = {"single": np.array([1.0]), "pair": np.array([1.0 - gap, 1.0]),
           "cluster": 1 - gap * np.arange(4)[::-1], "repeated": np.ones(3)}[kind]
    return torch.tensor(np.concatenate([top, bulk[len(top):]]))


def _operator(values: torch.Tensor, seed: int) -> CurvatureOperator:
    g = torch.Generator().manual_seed(seed + 100)
    Q, _ = torch.linalg.qr(torch.randn(N, N, dtype=torch.float64, generator=g))
    return CurvatureOperator.from_matrix(Q @ torch.diag(values) @ Q.T)


def _first_accurate(op: CurvatureOperator, exact: float, tol: float, seed: int, upto: int) -> int:
    for m in range(1, upto + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = lanczos(op, tol=1e-300, seed=seed, max_iter=m)
        if abs(res.eigenvalues[0].item() - exact) <= tol * abs(exact):
            return m
    return upto + 1


CASES = [(kind, gap) for kind in ("pair", "cluster") for gap in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)]
CASES += [("single", 0.0), ("powerlaw", 0.0), ("repeated", 0.0)]


@pytest.mark.parametrize(("kind", "gap"), CASES)
def test_converged_values_are_within_ten_times_the_tolerance(kind: str, gap: float) -> None:
    for tol, seed in itertools.product((1e-2, 1e-3, 1e-4, 1e-6), range(3)):
        values = _spectrum(kind, gap, seed)
        exact = float(values.max())
        res = lanczos(_operator(values, seed), tol=tol, seed=seed, max_iter=N)
        error = abs(res.eigenvalues[0].item() - exact) / exact
        assert res.converged
        assert error <= 10 * tol, (kind, gap, tol, seed, error)


@pytest.mark.parametrize("kind", ["single", "powerlaw"])
def test_well_separated_eigenvalues_stop_soon_after_they_are_accurate(kind: str) -> None:
    for tol, seed in itertools.product((1e-2, 1e-4), range(3)):
        values = _spectrum(kind, 0.0, seed)
        op = _operator(values, seed)
        res = lanczos(op, tol=tol, seed=seed, max_iter=N)
        first = _first_accurate(op, float(values.max()), tol, seed, res.num_products)
        assert res.num_products <= first + 4, (kind, tol, seed, res.num_products, first)


def test_the_bound_is_quadratic_once_the_gap_is_resolved_and_never_below_residual_over_5() -> None:
    theta = np.array([0.0, 1.0, 2.0])
    r = np.array([0.5, 0.1, 1e-2])
    assert error_bounds(theta, r, [2])[0] == pytest.approx(max(1e-4 / 0.9, 1e-2 / 5))
    unresolved = np.array([0.5, 0.5, 0.6])  # the neighbour's interval reaches θ: gap unknown
    assert error_bounds(theta, unresolved, [2])[0] == pytest.approx(0.6)
