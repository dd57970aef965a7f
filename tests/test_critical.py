"""Critical sharpness (forward-only line search) against exact curvature, and the optimizer
update directions against the optimizers' own steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_batch_callback.engine.critical import LineLoss, critical_sharpness, critical_step
from lr_batch_callback.engine.isolation import isolated
from lr_batch_callback.engine.operators import HessianOperator
from lr_batch_callback.monitoring.directions import gradient_direction, update_direction
from tests.models import ce_loss, classification_batch, make
from tests.reference import assert_same_state, dense_hessian, snapshot


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# -- the line search on functions whose answer is known -------------------------------------------

@pytest.mark.parametrize("first", [1e-3, 0.1, 0.45, 0.55, 3.0, 100.0])
def test_a_quadratic_gives_its_rayleigh_quotient(first: float) -> None:
    # f(η) - f(0) = η g·d + η²/2 d·Hd with g·d = -2, d·Hd = 8: η_c = 0.5, λ_c = 4.
    r = critical_step(lambda eta: -2.0 * eta + 4.0 * eta**2, -2.0, first)
    assert r.converged and not r.uphill
    assert r.sharpness == pytest.approx(4.0, rel=1e-9)
    assert r.passes <= 4


def test_a_non_quadratic_loss_gives_where_it_actually_rises() -> None:
    # f(η) - f(0) = -η + η³: rises back at η_c = 1 (the quadratic model would never rise).
    r = critical_step(lambda eta: -eta + eta**3, -1.0, 0.05, rtol=1e-3, max_passes=30)
    assert r.converged
    assert r.step == pytest.approx(1.0, rel=2e-3)


def test_uphill_and_stationary_directions_spend_no_pass() -> None:
    calls: list[float] = []
    up = critical_step(lambda eta: calls.append(eta) or 1.0, 0.3, 0.1)
    assert up.uphill and up.sharpness == math.inf and up.step == 0.0 and up.passes == 0
    flat = critical_step(lambda eta: calls.append(eta) or 0.0, 0.0, 0.1)
    assert math.isnan(flat.sharpness) and not flat.converged
    assert calls == []


def test_a_loss_that_never_rises_stops_at_the_bound() -> None:
    calls: list[float] = []
    r = critical_step(lambda eta: calls.append(eta) or -eta, -1.0, 0.1, max_passes=6)
    assert not r.converged and len(calls) == 6 == r.passes
    assert r.step == max(calls) and r.sharpness == pytest.approx(2 / max(calls))  # an upper bound


def test_a_diverging_loss_is_bracketed() -> None:
    r = critical_step(lambda eta: -eta if eta < 0.5 else math.inf, -1.0, 1.0, max_passes=30)
    assert 0.45 <= r.step <= 0.51


@pytest.mark.parametrize("slope,first", [(math.nan, 0.1), (-1.0, 0.0), (-1.0, math.inf)])
def test_bad_arguments_are_refused(slope: float, first: float) -> None:
    with pytest.raises(ValueError, match="finite slope and a first step > 0"):
        critical_step(lambda eta: 0.0, slope, first)


# -- on models: exact curvature, nothing left behind ---------------------------------------------

def test_on_least_squares_it_equals_the_dense_rayleigh_quotient() -> None:
    # The loss is exactly quadratic in the weights: 2/η_c along -g is gᵀHg/gᵀg.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1)).double()
    model[0].requires_grad_(False)  # linear in the remaining weights: a quadratic loss
    x, y = torch.randn(64, 10, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)

    def loss_fn(m, b):
        return F.mse_loss(m(b[0]), b[1])

    H = dense_hessian(model, loss_fn, (x, y))
    with LineLoss(model, loss_fn, [(x, y)], [1.0]) as line:
        g = line.gradient()
        result = critical_sharpness(line, g, [-t for t in g], first=0.01)
    flat = _flat(g)
    assert result.converged
    assert result.sharpness == pytest.approx(float(flat @ H @ flat / (flat @ flat)), rel=1e-8)
    assert result.sharpness <= float(torch.linalg.eigvalsh(H)[-1])


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_bn", "dropout"])
def test_on_small_networks_the_loss_rises_at_the_critical_step_and_no_trace_is_left(
        name: str) -> None:
    # Not quadratic: η_c is where the loss actually rises back. Checked with plain forward passes
    # of an independent copy (same dropout mask, BatchNorm on batch statistics).
    model = make(name)
    batch = classification_batch(name)
    reference = copy.deepcopy(model)
    rng = torch.get_rng_state()
    before = snapshot(model)
    with LineLoss(model, ce_loss, [batch], [1.0]) as line:
        g = line.gradient()
        result = critical_sharpness(line, g, [-t for t in g], first=0.05)
    assert_same_state(model, before)
    assert result.converged and result.passes <= 12

    def loss_at(eta: float) -> float:
        with torch.no_grad():
            for p, q, t in zip(model.parameters(), reference.parameters(), g):
                q.copy_(p - eta * t)
            torch.set_rng_state(rng)
            return float(ce_loss(reference, batch))

    eta_c = 2 / result.sharpness
    assert loss_at(0.9 * eta_c) < loss_at(0.0) < loss_at(1.1 * eta_c)
    # Against the exact quotient gᵀHg/gᵀg (the curvature at η = 0): the same order.
    with isolated(model):
        flat = _flat(g)
        quotient = float(flat @ HessianOperator(model, ce_loss, [batch]).matvec(flat)
                         / (flat @ flat))
    assert 0.2 < result.sharpness / quotient < 5.0, (result.sharpness, quotient)


def test_parameters_are_restored_bit_for_bit_also_on_error() -> None:
    model = make("mlp_tanh", dtype=torch.float32)
    batch = classification_batch("mlp_tanh", dtype=torch.float32)
    before = snapshot(model)

    def failing(m, b):
        if not torch.is_grad_enabled():
            raise RuntimeError("boom")
        return ce_loss(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        with LineLoss(model, failing, [batch], [1.0]) as line:
            g = line.gradient()
            line.loss_at([-t for t in g], 0.3)
    assert_same_state(model, before)


# -- the optimizers' directions, against their own steps ----------------------------------------

def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2,
                                           dampening=0.1),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    "amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
}


@pytest.mark.parametrize("warm", [0, 3])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_update_direction_is_the_optimizers_next_step(name: str, warm: int) -> None:
    model = _net()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = OPTIMIZERS[name](groups)
    optimizer.param_groups[1]["lr"] *= 0.3  # a second group at another LR
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(warm):  # momentum buffers and moments built up
        optimizer.zero_grad()
        F.cross_entropy(model(x + torch.randn_like(x)), y).backward()
        optimizer.step()
    params = list(model.parameters())
    grad = list(torch.autograd.grad(F.cross_entropy(model(x), y), params))
    state_before = copy.deepcopy(optimizer.state_dict())
    direction = update_direction(optimizer, params, grad)
    assert direction is not None
    assert str(optimizer.state_dict()) == str(state_before)  # computed without stepping

    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name]([{"params": twin[0].parameters()},
                                 {"params": twin[2].parameters()}])
    twin_opt.load_state_dict(state_before)
    for p, g in zip(twin.parameters(), grad):
        p.grad = g.clone()
    twin_opt.step()
    lr = optimizer.param_groups[0]["lr"]
    for p, q, d in zip(params, twin.parameters(), direction):
        torch.testing.assert_close((q.detach() - p.detach()) / lr, d, rtol=1e-7, atol=1e-9)


def test_the_gradient_direction_is_preconditioned_for_adam_only() -> None:
    model = _net()
    params = list(model.parameters())
    grad = [torch.ones_like(p) for p in params]
    sgd = torch.optim.SGD(params, lr=0.1)
    assert all(torch.equal(d, -g) for d, g in zip(gradient_direction(sgd, params, grad), grad))
    adam = torch.optim.Adam(params, lr=1e-3)
    assert gradient_direction(adam, params, grad) is None  # no second moment before a step
    F.cross_entropy(model(torch.randn(4, 5, dtype=torch.float64)), torch.arange(4) % 3).backward()
    adam.step()
    direction = gradient_direction(adam, params, grad)
    for p, d in zip(params, direction):
        state = adam.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999)
        torch.testing.assert_close(d, -1 / (v_hat.sqrt() + 1e-8))
    assert update_direction(torch.optim.RMSprop(params), params, grad) is None
