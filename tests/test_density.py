"""Stochastic Lanczos quadrature: normalisation, mean = trace/P, batched = sequential."""

from __future__ import annotations

import math

import pytest
import torch

from lr_batch_callback import HessianOperator, spectral_density
from lr_batch_callback.engine.density import broaden, rademacher_probes, slq, slq_quadrature
from tests.models import ce_loss, classification_batch, make
from tests.reference import dense_hessian
from tests.test_lanczos import MatrixOperator


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_bn"])
def test_density_integrates_to_one_and_mean_is_trace_over_p(name: str) -> None:
    model = make(name)
    batch = classification_batch(name)
    H = dense_hessian(model, ce_loss, batch)
    sd = spectral_density(model, ce_loss, batch, num_probes=40, num_steps=25, seed=0)
    assert abs(sd.integral() - 1) < 1e-3
    trace_over_p = (torch.trace(H) / H.shape[0]).item()
    spread = torch.linalg.eigvalsh(H).abs().max().item()
    # Hutchinson with 40 probes: a few percent of the spectral scale
    assert abs(sd.mean() - trace_over_p) < 0.05 * spread
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(40, dtype=torch.float64))


def test_quadrature_is_exact_for_polynomials_of_low_degree() -> None:
    """m-point Gauss quadrature integrates v^T A^j v exactly for j < 2m."""
    Q, _ = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-1, 2, 80, dtype=torch.float64)) @ Q.T
    probes = rademacher_probes(3, 80, torch.Generator().manual_seed(0))
    nodes, weights = slq_quadrature(MatrixOperator(A), probes, num_steps=6)
    for j in range(0, 12):
        exact = torch.einsum("pi,ij,pj->p", probes, torch.linalg.matrix_power(A, j), probes)
        quad = (weights * nodes**j).sum(1)
        torch.testing.assert_close(quad, exact, rtol=1e-8, atol=1e-10)


def test_batched_equals_sequential() -> None:
    model = make("dropout")
    batch = classification_batch("dropout")
    torch.manual_seed(0)
    a = slq(HessianOperator(model, ce_loss, [batch]), 4, 12, seed=5, batched=True)
    torch.manual_seed(0)
    b = slq(HessianOperator(model, ce_loss, [batch]), 4, 12, seed=5, batched=False)
    torch.testing.assert_close(a.nodes, b.nodes, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-8, atol=1e-10)
    assert a.num_products == b.num_products == 48


def test_exhausted_krylov_space_is_truncated() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).repeat_interleave(1, 0)
    probes = rademacher_probes(2, 3, torch.Generator().manual_seed(0))
    nodes, weights = slq_quadrature(MatrixOperator(A), probes, num_steps=10)
    assert nodes.shape == (2, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=torch.float64))
    live = nodes[weights > 1e-12]
    torch.testing.assert_close(live.sort().values, torch.tensor([1.0, 1, 2, 2, 3, 3],
                                                               dtype=torch.float64))


def test_broadening_width_is_stated_and_used() -> None:
    nodes = torch.tensor([[0.0, 10.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    grid, density, sigma = broaden(nodes, weights, sigma=0.5)
    assert sigma == 0.5
    peak = density[(grid - 10).abs().argmin()].item()
    assert peak == pytest.approx(0.5 / (0.5 * math.sqrt(2 * math.pi)), rel=1e-3)
    assert abs(torch.trapezoid(density, grid).item() - 1) < 1e-6
    with pytest.raises(ValueError, match="sigma"):
        broaden(nodes, weights, sigma=-1.0)


def test_bad_arguments() -> None:
    model = make("mlp_tanh")
    batch = classification_batch("mlp_tanh")
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(model, ce_loss, batch, num_probes=0)
    with pytest.raises(ValueError, match="num_steps"):
        spectral_density(model, ce_loss, batch, num_steps=0)
