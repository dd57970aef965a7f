"""What the engine does where PyTorch cannot help: wrong or missing double backwards, outputs that
are not independent, and the twice-differentiable substitutes it switches on."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_batch_callback import hessian_eigenvalues
from lr_batch_callback.engine.differentiable import MissingDoubleBackwardError
from lr_batch_callback.engine.estimate import OperatorOptions
from tests.reference import eigvalsh, zoo_ggn
from tests.zoo import ZOO, LogitsAndFeatures


class _WrongSecondDerivative(torch.autograd.Function):
    """tanh whose backward is right but whose double backward is not (not symmetric)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        y = torch.tanh(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        # Each entry's slope depends on its neighbour's input: no function has this as its
        # gradient, so the "Hessian" differentiated from it is not symmetric.
        return grad * (1 - torch.tanh(x) ** 2) * (1 + 0.3 * x.roll(1, dims=-1))


class _NoSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clamp_min(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad


def _mlp_with(fn) -> tuple[nn.Module, tuple, object]:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.b(fn(self.a(x)))

    model = Net().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.arange(8) % 3
    return model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1])


def test_an_asymmetric_operator_is_flagged_and_not_converged() -> None:
    model, batch, loss_fn = _mlp_with(_WrongSecondDerivative.apply)
    with pytest.warns(RuntimeWarning, match=r"not symmetric.*double backward"):
        res = hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-8, seed=0)
    assert not res.converged
    assert res.asymmetry > 1e-6


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_once_differentiable_function_is_named(curvature: str) -> None:
    """PyTorch silently drops the second derivative through @once_differentiable (no error, a
    wrong, asymmetric operator). The graph build finds the Function and names it."""
    model, batch, loss_fn = _mlp_with(_NoSecondDerivative.apply)
    with pytest.raises(MissingDoubleBackwardError,
                       match=r"through _NoSecondDerivative, whose backward is marked "
                             r"@once_differentiable.*`params=`"):
        hessian_eigenvalues(model, loss_fn, batch, curvature=curvature, seed=0)


def test_parameters_after_a_once_differentiable_function_still_measure() -> None:
    # The named fix: the layer after it alone has a correct curvature (dense reference).
    from tests.reference import dense_hessian

    model, batch, loss_fn = _mlp_with(_NoSecondDerivative.apply)
    later = list(model.b.parameters())
    res = hessian_eigenvalues(model, loss_fn, batch, tol=1e-10, seed=0,
                              options=OperatorOptions(params=later))
    H = dense_hessian(model, loss_fn, batch, params=later)
    assert float(res.eigenvalues[0]) == pytest.approx(float(eigvalsh(H)[-1]), rel=1e-8)


def test_hardsigmoid_without_substitute_is_explained() -> None:
    """The raw PyTorch error becomes one that names the operation and what to do."""
    from lr_batch_callback.engine.differentiable import explain_missing_double_backward

    x = torch.randn(5, requires_grad=True)
    (g,) = torch.autograd.grad(F.hardsigmoid(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(g.sum(), x)
    explained = explain_missing_double_backward(info.value)
    assert isinstance(explained, MissingDoubleBackwardError)
    assert "hardsigmoid" in str(explained) and "params=" in str(explained)


def test_dependent_outputs_need_a_choice_for_the_ggn() -> None:
    case = ZOO["logits_and_features"]()
    with pytest.raises(ValueError, match=r"ancestor.*ggn_output="):
        hessian_eigenvalues(case.model, lambda m, b: F.cross_entropy(m(b[0])[0], b[1]), case.batch,
                            curvature="ggn", seed=0)


def test_ggn_of_the_chosen_output_equals_the_logits_only_network() -> None:
    case = ZOO["logits_and_features"]()
    logits_only = LogitsAndFeatures().double()
    logits_only.load_state_dict(case.model.state_dict())
    exact = eigvalsh(zoo_ggn(case))[-1].item()
    for selector in (0, lambda out: out[0]):
        res = hessian_eigenvalues(case.model, case.loss_fn, case.batch, curvature="ggn",
                                  tol=1e-10, seed=0, options=OperatorOptions(ggn_output=selector))
        assert res.eigenvalues[0].item() == pytest.approx(exact, rel=1e-8)


def test_substitutes_are_switched_off_after_the_estimate() -> None:
    """Outside an estimate PyTorch's own kernels run again (hardsigmoid, attention, cuDNN)."""
    case = ZOO["mobilenet_v3_small"]()
    hessian_eigenvalues(case.model, case.loss_fn, case.batch, seed=0,
                        options=OperatorOptions(params=case.params))
    assert F.hardsigmoid.__module__ == "torch.nn.functional"
    assert torch._weight_norm.__module__ != __name__ and "lr_batch_callback" not in str(
        getattr(torch._weight_norm, "__module__", ""))
    assert torch.backends.cudnn.enabled
    x = torch.randn(3, requires_grad=True)
    (g,) = torch.autograd.grad(F.hardsigmoid(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), x)


def test_weight_norm_gives_the_hessian_of_the_plain_function() -> None:
    """torch._weight_norm's own double backward is wrong; the estimate runs the plain formula."""
    case = ZOO["weight_norm_mlp"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no asymmetry warning
        res = hessian_eigenvalues(case.model, case.loss_fn, case.batch, tol=1e-10, seed=0)
    assert res.converged and res.asymmetry < 1e-10
