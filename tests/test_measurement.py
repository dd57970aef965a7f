"""``measure_spectrum`` (monitoring/measurement.py) on tiny float64 models against dense references.

The Hessian and the GGN are built row by row with autograd (tests/reference.py) and
diagonalised with ``torch.linalg.eigvalsh``; the critical sharpness is checked on a loss that is
exactly quadratic in the parameters, where it is a closed-form quotient of the dense Hessian.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_batch_callback.monitoring.measurement import (
    MonitorConfig,
    Parts,
    TrainingState,
    measure_spectrum,
)
from tests.reference import assert_same_state, dense_ggn, dense_hessian, eigvalsh, snapshot

F64 = torch.float64
EXACT = dict(product="exact", max_overhead=None, tol=1e-10, max_iter=60, density_every=0)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)  # 51 parameters


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def test_hessian_eigenvalues_match_the_dense_hessian_and_the_record_says_what_ran() -> None:
    model, batch = _mlp(), _batch()
    exact = eigvalsh(dense_hessian(model, _ce, batch))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    state = TrainingState(step=40, epoch=2, effective_batch_size=64, optimizer=opt, lr=0.2,
                          lr_factor=4.0)
    before = snapshot(model)
    config = MonitorConfig(k=2, lambda_min_every=1, critical_sharpness=False, **EXACT)
    record, cost = measure_spectrum(model, _ce, batch, config, state=state,
                                    parts=Parts(lambda_min=True), seed=3)
    assert_same_state(model, before)  # weights, modes, grads and RNG streams untouched
    est = record.estimate
    assert est.eigenvalues == pytest.approx([float(exact[-1]), float(exact[-2])], rel=1e-8)
    assert est.lambda_min == pytest.approx(float(exact[0]), rel=1e-8)
    assert est.lambda_min < 0  # cross-entropy through tanh: an indefinite Hessian
    assert est.converged and est.product == "exact" and est.num_samples == 16
    assert est.num_tokens is None and not est.critical and est.critical_sharpness is None
    assert est.preconditioned_lambda_max is None  # SGD: no preconditioner
    assert len(est.error_bounds) >= 3 and all(0 <= b <= 1e-6 for b in est.error_bounds)
    assert 0 < est.num_products <= 60
    assert (record.step, record.epoch, record.curvature) == (40, 2, "hessian")
    assert record.density is None
    ctx = record.context
    assert (ctx.effective_batch_size, ctx.lr, ctx.lr_factor) == (64, 0.2, 4.0)
    # Heavy-ball SGD is stable on the quadratic while lr·λ_max < 2(1 + μ).
    assert ctx.stability == pytest.approx(0.2 * float(exact[-1]) / (2 * 1.5), rel=1e-8)
    assert ctx.critical_ratio is None and ctx.critical_ratio_update is None
    assert cost.build_seconds >= 0 and cost.seconds_per_product > 0
    assert est.seconds >= cost.build_seconds


def test_without_the_occasional_parts_there_is_no_lambda_min_and_no_density() -> None:
    model, batch = _mlp(), _batch()
    exact = eigvalsh(dense_hessian(model, _ce, batch))
    record, _ = measure_spectrum(model, _ce, batch, MonitorConfig(critical_sharpness=False, **EXACT),
                                 state=TrainingState(), parts=Parts(), seed=0)
    assert record.lambda_min is None and record.density is None
    assert record.eigenvalues == pytest.approx([float(exact[-1])], rel=1e-8)
    assert "hessian/lambda_min" not in record.metrics()
    assert record.context.stability is None  # no optimizer, no LR


def test_ggn_eigenvalues_match_the_dense_gauss_newton_matrix() -> None:
    model, (x, y) = _mlp(seed=2), _batch(seed=3)
    G = dense_ggn(model, lambda f: F.cross_entropy(f, y), x)
    exact = eigvalsh(G)
    config = MonitorConfig(curvature="ggn", k=2, lambda_min_every=1, critical_sharpness=False,
                           **EXACT)
    record, _ = measure_spectrum(model, _ce, (x, y), config, state=TrainingState(),
                                 parts=Parts(lambda_min=True), seed=1)
    assert record.curvature == "ggn" and record.estimate.converged
    assert record.eigenvalues == pytest.approx([float(exact[-1]), float(exact[-2])], rel=1e-8)
    # A GGN is positive semi-definite; with 16·(3-1) = 32 < 51 directions it has a null space.
    assert float(exact[0]) == pytest.approx(0.0, abs=1e-12)
    assert record.lambda_min == pytest.approx(0.0, abs=1e-8 * float(exact[-1]))
    # ... and is not the Hessian.
    H = eigvalsh(dense_hessian(model, _ce, (x, y)))
    assert abs(float(H[-1]) - float(exact[-1])) > 1e-4 * float(exact[-1])


def test_the_density_quadrature_is_exact_once_the_probes_span_their_krylov_space() -> None:
    model, batch = _mlp(), _batch()
    exact = eigvalsh(dense_hessian(model, _ce, batch))
    config = MonitorConfig(density_probes=3, density_steps=80, critical_sharpness=False,
                           **{**EXACT, "density_every": 1})
    record, _ = measure_spectrum(model, _ce, batch, config, state=TrainingState(),
                                 parts=Parts(density=True), seed=5)
    density = record.density
    assert density is not None and len(density.nodes) == len(density.weights) == 3
    assert density.sigma > 0 and density.num_products > 0
    assert record.estimate.num_products >= density.num_products  # the total includes it
    for nodes, weights in zip(density.nodes, density.weights):
        assert sum(weights) == pytest.approx(1.0, abs=1e-10)  # Gauss quadrature of a unit probe
        assert min(weights) >= 0
        # 80 steps > 51 parameters: the probe's Krylov space is invariant and every node with
        # weight is an eigenvalue of the dense Hessian.
        for node, weight in zip(nodes, weights):
            if weight > 1e-8:
                assert float((exact - node).abs().min()) <= 1e-7 * float(exact.abs().max()), node
    # The same seed gives the same probes; another seed other probes.
    again, _ = measure_spectrum(model, _ce, batch, config, state=TrainingState(),
                                parts=Parts(density=True), seed=5)
    other, _ = measure_spectrum(model, _ce, batch, config, state=TrainingState(),
                                parts=Parts(density=True), seed=6)
    assert again.density == density
    assert other.density is not None and other.density.weights != density.weights


# -- critical sharpness on an exactly quadratic loss ---------------------------------------------

def _quadratic_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(4)
    model = nn.Linear(5, 2).to(F64)  # MSE of a linear model: quadratic in the parameters
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 5, dtype=F64, generator=g)
    return model, (x, torch.randn(32, 2, dtype=F64, generator=g))


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _flat_grad(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(_mse(model, batch), _params(model))
    return torch.cat([g.reshape(-1) for g in grads])


def test_critical_sharpness_along_the_gradient_is_the_rayleigh_quotient_of_the_gradient() -> None:
    model, batch = _quadratic_problem()
    H = dense_hessian(model, _mse, batch)
    g = _flat_grad(model, batch)
    expected = float(g @ H @ g / (g @ g))  # λ_c = gᵀHg / gᵀg along -g on a quadratic
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    config = MonitorConfig(critical_sharpness=True, **EXACT)
    record, _ = measure_spectrum(model, _mse, batch, config,
                                 state=TrainingState(optimizer=opt, lr=0.3), parts=Parts(), seed=0)
    est = record.estimate
    assert est.critical and est.critical_passes > 0
    # False position on (f(η) - f(0))/η, linear on a quadratic: exact after one pass past η_c.
    assert est.critical_sharpness == pytest.approx(expected, rel=1e-6)
    assert est.critical_sharpness <= est.eigenvalues[0] * (1 + 1e-9)  # a Rayleigh quotient
    # Plain SGD: the update is -lr·g, the same line.
    assert est.critical_sharpness_update == pytest.approx(expected, rel=1e-6)
    assert record.context.critical_ratio == pytest.approx(0.3 * est.critical_sharpness / 2)
    assert record.metrics()["hessian/critical_sharpness"] == est.critical_sharpness


def test_critical_sharpness_along_the_momentum_update_uses_the_optimizer_state() -> None:
    model, batch = _quadratic_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    other = (batch[0].flip(0)[:8], -batch[1][:8])  # a different batch builds the momentum
    opt.zero_grad()
    _mse(model, other).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in _params(model)]).clone()
    H = dense_hessian(model, _mse, batch)
    g = _flat_grad(model, batch)
    d = -(0.9 * buf + g)  # the next update's direction
    slope = float(g @ d)
    assert slope < 0  # downhill here, so λ_c is finite
    expected = float(d @ H @ d) / -slope
    config = MonitorConfig(critical_sharpness=True, **EXACT)
    record, _ = measure_spectrum(model, _mse, batch, config,
                                 state=TrainingState(optimizer=opt, lr=0.05), parts=Parts(), seed=0)
    assert record.estimate.critical_sharpness_update == pytest.approx(expected, rel=1e-6)
    assert record.estimate.critical_sharpness == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-6)
    # The measurement does not step the optimizer.
    after = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in _params(model)])
    assert torch.equal(after, buf)


def test_an_uphill_update_has_infinite_critical_sharpness() -> None:
    model, batch = _quadratic_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _flat_grad(model, batch)
    offset = 0
    for p in _params(model):  # a momentum buffer pointing up the gradient, 10× as long
        n = p.numel()
        opt.state[p]["momentum_buffer"] = -10 * g[offset : offset + n].reshape(p.shape)
        offset += n
    config = MonitorConfig(critical_sharpness=True, **EXACT)
    record, _ = measure_spectrum(model, _mse, batch, config,
                                 state=TrainingState(optimizer=opt, lr=0.05), parts=Parts(), seed=0)
    assert record.estimate.critical_sharpness_update == math.inf
    assert record.context.critical_ratio_update == math.inf
    assert math.isfinite(record.estimate.critical_sharpness)


# -- the configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(k=3, lambda_min_every=1, max_iter=5), r"max_iter must be an integer >= 6"),
    (dict(product="bogus"), r"product must be one of"),
    (dict(tol=-1.0), r"tol must be a positive finite number"),
    (dict(curvature="fisher"), r"curvature must be one of \('hessian', 'ggn'\)"),
    (dict(max_overhead=1.5), r"max_overhead must be a fraction in \(0, 1\]"),
    (dict(curvature="ggn", product="finite_difference"), r"computes Hessian products only"),
])
def test_the_configuration_refuses_what_a_measurement_cannot_do(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MonitorConfig(**kwargs)
