"""``product="fastest"`` (MonitorConfig's default): differences where valid and accurate enough,
else the exact product; the preconditioned sharpness on request, with exact products; the line
search reusing the operator's gradient. References: dense Hessians (double backward, row by row)
and plain autograd gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_batch_callback import MonitorConfig, OperatorOptions, hessian_eigenvalues
from lr_batch_callback.engine.products import DIFFERENCE_ACCURACY, base_gradient, build_operator
from lr_batch_callback.monitoring.measurement import Parts, TrainingState, measure_spectrum
from tests.reference import assert_same_state, dense_hessian, eigvalsh, snapshot

FASTEST = OperatorOptions(product="fastest")


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _mlp(activation: nn.Module, dtype: torch.dtype = torch.float32
         ) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), activation, nn.Linear(12, 2)).to(dtype)
    batch = (torch.randn(40, 5, dtype=dtype), torch.randn(40, 2, dtype=dtype))
    return model, batch


def test_the_monitor_defaults_to_fastest_without_the_preconditioned_eigenproblem() -> None:
    config = MonitorConfig()
    assert config.product == "fastest"
    assert config.preconditioned_sharpness is False
    with pytest.raises(TypeError, match="preconditioned_sharpness"):
        MonitorConfig(preconditioned_sharpness=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("activation", "dtype", "tol", "expected"), [
    (nn.Tanh(), torch.float32, 1e-2, "finite_difference"),  # smooth, loose: differences
    (nn.Tanh(), torch.float32, 1e-3, "exact"),  # tighter than float32 differences can give
    (nn.Tanh(), torch.float64, 1e-6, "finite_difference"),  # float64 differences are 1e-8 good
    (nn.Tanh(), torch.float64, 1e-8, "exact"),
    pytest.param(nn.ReLU(), torch.float32, 1e-2, "exact",  # kinks: differences refused, exact used
                 marks=pytest.mark.slow),
])
def test_fastest_chooses_by_smoothness_and_tolerance(activation: nn.Module, dtype: torch.dtype,
                                                     tol: float, expected: str) -> None:
    model, batch = _mlp(activation, dtype)
    before = snapshot(model)
    result = hessian_eigenvalues(model, _mse, batch, k=2, tol=tol, seed=0, options=FASTEST)
    assert result.product == expected
    assert_same_state(model, before)
    dense = eigvalsh(dense_hessian(model.double(), _mse, tuple(t.double() for t in batch)))
    top = dense.flip(0)[:2]
    # Within the tolerance asked (float32 dense reference of a float32 model: rounding 1e-5).
    assert torch.allclose(result.eigenvalues.double(), top, rtol=max(tol, 1e-5), atol=0)


def test_the_threshold_is_fifteen_sqrt_eps() -> None:
    limit = DIFFERENCE_ACCURACY * math.sqrt(torch.finfo(torch.float32).eps)
    model, batch = _mlp(nn.Tanh())
    above = build_operator("hessian", "fastest", model, _mse, [batch], tol=limit * 1.01)
    below = build_operator("hessian", "fastest", model, _mse, [batch], tol=limit * 0.99)
    none = build_operator("hessian", "fastest", model, _mse, [batch])
    ggn = build_operator("ggn", "fastest", model, _mse, [batch], tol=1.0)
    assert (above.product, below.product, none.product, ggn.product) == (
        "finite_difference", "exact", "exact", "exact")


@pytest.mark.parametrize("product", ["exact", "finite_difference"])
def test_the_operator_gradient_is_the_batch_gradient(product: str) -> None:
    model, batch = _mlp(nn.Tanh(), torch.float64)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        _mse(model, batch), list(model.parameters()))])
    # Two micro-batches: the weighted sum is the full batch's gradient.
    with build_operator("hessian", product, model, _mse, [batch], micro_batch_size=15) as op:
        got = base_gradient(op)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for p in model.parameters():
        assert p.grad is None


def test_the_line_search_reuses_the_gradient_and_gives_the_same_sharpness() -> None:
    model, batch = _mlp(nn.Tanh(), torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = TrainingState(step=1, optimizer=opt, lr=0.05)
    records = {}
    for product in ("exact", "finite_difference"):
        cfg = MonitorConfig(product=product, tol=1e-8, max_iter=60)
        records[product], _ = measure_spectrum(model, _mse, batch, cfg, state=state,
                                               parts=Parts(), seed=0)
    exact, diff = records["exact"].estimate, records["finite_difference"].estimate
    assert exact.critical_sharpness is not None and diff.critical_sharpness is not None
    # The same line search on the same gradient (float64 differences: 1e-8 apart).
    assert math.isclose(exact.critical_sharpness, diff.critical_sharpness, rel_tol=1e-6)
    assert exact.critical_passes == diff.critical_passes
    # Reused: the passes are forward passes only (f(0) and the steps, at most 12 per direction).
    assert exact.critical_passes <= 1 + 2 * 12


def test_the_preconditioned_sharpness_on_request_is_exact_and_matches_the_dense_one() -> None:
    model, batch = _mlp(nn.Tanh())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        _mse(model, batch).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    state = TrainingState(step=5, optimizer=opt, lr=1e-2)
    off, _ = measure_spectrum(model, _mse, batch, MonitorConfig(), state=state, parts=Parts(),
                              seed=0)
    assert off.estimate.preconditioned_lambda_max is None
    assert off.estimate.product == "finite_difference"
    on, _ = measure_spectrum(model, _mse, batch, MonitorConfig(preconditioned_sharpness=True,
                                                               tol=1e-4, max_iter=60),
                             state=state, parts=Parts(), seed=0)
    assert on.estimate.product == "exact"  # the preconditioned eigenproblem needs exact products
    # Reference: P = diag(sqrt(v_hat)) + eps, dense Hessian, lambda_max(P^-1/2 H P^-1/2).
    scale = []
    for p in model.parameters():
        st = opt.state[p]
        v_hat = st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))
        scale.append((1.0 / (v_hat.sqrt() + 1e-8)).sqrt().reshape(-1))
    s = torch.cat(scale).double()
    H = dense_hessian(model.double(), _mse, tuple(t.double() for t in batch))
    reference = float(eigvalsh(s[:, None] * H * s[None, :])[-1])
    assert on.estimate.preconditioned_lambda_max is not None
    assert math.isclose(on.estimate.preconditioned_lambda_max, reference, rel_tol=1e-3)
