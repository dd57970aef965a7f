"""No side effects: every estimate leaves the model, RNG streams and gradients bit for bit as found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lr_batch_callback import HessianOperator, hessian_eigenvalues, lanczos, spectral_density
from lr_batch_callback.engine.estimate import OperatorOptions
from tests.models import ce_loss, classification_batch
from tests.reference import assert_same_state, snapshot


class BNDropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _model_with_state() -> nn.Module:
    torch.manual_seed(0)
    model = BNDropoutNet().double()
    model.train()
    model(torch.randn(16, 5, dtype=torch.float64))  # non-trivial running statistics
    model.head.eval()  # a mixed-mode model: each submodule's flag must come back as it was
    model.fc1.weight.requires_grad_(False)
    model.bn.weight.grad = torch.ones_like(model.bn.weight)
    return model


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_estimates_leave_no_trace(curvature: str) -> None:
    model = _model_with_state()
    batch = classification_batch("mlp_tanh")
    before = snapshot(model)
    hessian_eigenvalues(model, ce_loss, batch, k=2, which="both", curvature=curvature)
    spectral_density(model, ce_loss, batch, num_probes=3, num_steps=5, curvature=curvature)
    hessian_eigenvalues(model, ce_loss, batch, curvature=curvature, seed=0,
                        options=OperatorOptions(keep_graphs=False))
    assert_same_state(model, before)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_state_restored_when_the_estimate_is_interrupted(error: BaseException) -> None:
    model = _model_with_state()
    batch = classification_batch("mlp_tanh")
    before = snapshot(model)
    calls = {"n": 0}

    def failing_loss(m: nn.Module, b):
        calls["n"] += 1
        loss = ce_loss(m, b)  # runs the forward: BN statistics and RNG move
        if calls["n"] == 2:
            raise error
        return loss

    with pytest.raises(type(error)):  # fails while building the second batch's graph
        lanczos(HessianOperator(model, failing_loss, [batch, batch]))
    calls["n"] = -1  # construction makes calls 0 and 1; the first product's rebuild raises
    with pytest.raises(type(error)):  # fails inside a product (graphs rebuilt per product)
        lanczos(HessianOperator(model, failing_loss, [batch, batch], keep_graphs=False))
    assert_same_state(model, before)


def test_estimate_runs_in_parameter_precision_outside_autocast() -> None:
    model = nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    seen = []

    def loss_fn(m, b):
        out = m(b[0])
        seen.append(out.dtype)
        return nn.functional.cross_entropy(out, b[1])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        hessian_eigenvalues(model, loss_fn, (x, y), seed=0)
    assert seen == [torch.float32]


def test_inference_mode_caller_is_supported() -> None:
    model = nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with torch.inference_mode():
        res = hessian_eigenvalues(model, ce_loss, (x, y), seed=0)
    assert res.converged and torch.is_inference_mode_enabled() is False


def test_non_finite_loss_raises_and_restores() -> None:
    model = _model_with_state()
    batch = classification_batch("mlp_tanh")
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="not finite"):
        hessian_eigenvalues(model, lambda m, b: ce_loss(m, b) * float("nan"), batch)
    assert_same_state(model, before)


def test_compiled_module_is_estimated_eagerly() -> None:
    """AOTAutograd graphs have no double backward; the estimate runs the module eagerly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    compiled(x).sum().backward()  # compiled once, as in training
    model.zero_grad(set_to_none=True)
    plain = hessian_eigenvalues(model, ce_loss, (x, y), seed=0)
    through_compiled = hessian_eigenvalues(compiled, ce_loss, (x, y), seed=0)
    torch.testing.assert_close(through_compiled.eigenvalues, plain.eigenvalues)


def test_callers_live_graph_survives_an_estimate() -> None:
    """Untouched buffers are not rewritten: an eval-mode BatchNorm graph can still backward."""
    torch.manual_seed(0)
    model = _model_with_state()
    model.eval()
    x, y = classification_batch("mlp_tanh")
    loss = ce_loss(model, (x, y))  # saves running_mean/var for its backward
    hessian_eigenvalues(model, ce_loss, (x, y), seed=0)
    loss.backward()  # would raise "modified by an inplace operation" if buffers were rewritten


def test_reassigned_buffer_is_put_back() -> None:
    model = _model_with_state()
    original = model.bn.running_mean

    def loss_fn(m, b):
        m.bn.running_mean = torch.zeros_like(original)  # a module that swaps its buffers
        return ce_loss(m, b)

    hessian_eigenvalues(model, loss_fn, classification_batch("mlp_tanh"), seed=0)
    assert model.bn.running_mean is original
