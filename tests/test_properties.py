"""Property-based tests (hypothesis): Lanczos against the dense spectrum on random small MLPs, and
the algebra of the LR rules (monotone in the new batch size, composing along a chain of sizes)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lr_batch_callback import BatchSizeLaw, hessian_eigenvalues, scaling_factor
from lr_batch_callback.scaling import CurvatureRule, resolve_rule
from tests.reference import dense_hessian, eigvalsh

# Smooth activations: no kinks, so the Hessian is the same from every side and has no
# measure-zero surprises; all of them break the hidden units' permutation symmetry with random
# weights, so the spectrum has no exact multiplicities (which one Lanczos vector cannot resolve).
ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "gelu": nn.GELU,
               "silu": nn.SiLU}

PROPERTY_SETTINGS = settings(deadline=None, max_examples=30, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mlp_problems(draw):
    in_dim = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    out_dim = draw(st.integers(1, 2))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    batch_size = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**16))
    weight_scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [in_dim, *widths]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(sizes[-1], out_dim))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(batch_size, in_dim, generator=g, dtype=torch.float64),
             torch.randn(batch_size, out_dim, generator=g, dtype=torch.float64))
    description = f"{activation} MLP {sizes + [out_dim]}, scale {weight_scale}, B={batch_size}"
    return model, batch, seed, description


def _mse(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(problem=mlp_problems())
def test_lanczos_extremes_match_dense_eigvalsh(problem) -> None:
    model, batch, seed, description = problem
    dim = sum(p.numel() for p in model.parameters())
    assume(dim >= 4)  # which="both" with k=2 wants four eigenvalues
    dense = eigvalsh(dense_hessian(model, _mse, batch))  # ascending
    res = hessian_eigenvalues(model, _mse, batch, k=2, which="both", tol=1e-10, seed=seed,
                              max_iter=dim)
    expected = torch.stack([dense[-1], dense[-2], dense[1], dense[0]])
    scale = float(dense.abs().max())
    assert res.converged, description
    assert res.eigenvalues.shape == (4,)
    assert torch.allclose(res.eigenvalues, expected, rtol=1e-7, atol=1e-8 * scale), (
        description, res.eigenvalues, expected)
    # Every Ritz value of the run lies in the spectrum's hull: Lanczos never invents curvature.
    assert float(res.ritz_values.max()) <= float(dense[-1]) + 1e-8 * scale
    assert float(res.ritz_values.min()) >= float(dense[0]) - 1e-8 * scale


# -- LR rules -----------------------------------------------------------------------------------------

batch_sizes = st.integers(1, 1_000_000)


@st.composite
def laws(draw, finite_population: bool = True):
    """A valid law: a > 0, c >= 0, and a data set of N samples or an infinite one."""
    lambda_emp = draw(st.floats(1e-3, 1e3))
    noise = draw(st.floats(0.0, 1e6))
    dataset = draw(st.one_of(st.none(), st.integers(1, 2_000_000))) if finite_population else None
    return BatchSizeLaw(lambda_emp=lambda_emp, noise_coefficient=noise, dataset_size=dataset)


def _rules(law: BatchSizeLaw | None = None):
    yield "linear", resolve_rule("linear")
    yield "sqrt", resolve_rule("sqrt")
    if law is not None:
        yield "curvature-sgd", CurvatureRule(adaptive=False, law=law)
        yield "curvature-adam", CurvatureRule(adaptive=True, law=law)


@settings(deadline=None, max_examples=200, derandomize=True)
@given(old=batch_sizes, new=batch_sizes, bigger=batch_sizes, law=laws())
def test_lr_factor_is_monotone_in_the_new_batch_size(old, new, bigger, law) -> None:
    small, large = sorted((new, bigger))
    for name, rule in _rules(law):
        f_small, f_large = rule(old, small), rule(old, large)
        assert math.isfinite(f_small) and f_small > 0, name
        assert f_small <= f_large * (1 + 1e-12), (name, old, small, large, f_small, f_large)
    for name in ("linear", "sqrt", "none"):
        assert scaling_factor(name, old, small) <= scaling_factor(name, old, large) * (1 + 1e-12)


@settings(deadline=None, max_examples=200, derandomize=True)
@given(a=batch_sizes, b=batch_sizes, c=batch_sizes, law=laws())
def test_lr_factor_composes_along_a_chain_of_batch_sizes(a, b, c, law) -> None:
    for name, rule in _rules(law):
        assert rule(a, b) * rule(b, c) == pytest.approx(rule(a, c), rel=1e-12), name
        assert rule(a, a) == 1.0, name
        assert rule(a, b) * rule(b, a) == pytest.approx(1.0, rel=1e-12), name
    for name in ("linear", "sqrt", "none"):
        assert scaling_factor(name, a, b) * scaling_factor(name, b, c) == pytest.approx(
            scaling_factor(name, a, c), rel=1e-12)


@settings(deadline=None, max_examples=100, derandomize=True)
@given(old=batch_sizes, new=batch_sizes, law=laws(finite_population=False))
def test_curvature_rule_lies_between_no_scaling_and_the_fixed_rule(old, new, law) -> None:
    # λ(B) = a + c/B with a > 0, c ≥ 0: growing the batch never scales the LR by more than the
    # linear (√ for Adam) rule nor by less than 1 — the saturation past the critical batch size. (With a finite
    # data set the −c/N term can push the ratio past linear as B nears N: a=0.25, c=1, N=2 gives
    # λ(1)/λ(2) = 3 for a doubling; that is the law's own prediction, not tested as a bound.)
    lo, hi = sorted((old, new))
    for adaptive, fixed in ((False, "linear"), (True, "sqrt")):
        factor = CurvatureRule(adaptive=adaptive, law=law)(lo, hi)
        assert 1.0 - 1e-12 <= factor <= scaling_factor(fixed, lo, hi) * (1 + 1e-12)
