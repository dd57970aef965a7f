r"""How curvature products are computed: exactly (double backward) or by finite differences.

- ``"exact"``: :class:`~lr_batch_callback.engine.operators.HessianOperator` /
  :class:`~lr_batch_callback.engine.operators.GGNOperator`, a backward pass through the gradient
  graph per product; exact to rounding, on twice-differentiable kernels.
- ``"finite_difference"``:
  :class:`~lr_batch_callback.engine.finite_difference.FiniteDifferenceHessian`, one first-order
  gradient per product; Hessian only, smooth losses only, accurate to about
  :math:`10^{-3}` of the radius in float32 (:math:`10^{-8}` in float64). It runs where double
  backward does not (fused attention kept, ``@once_differentiable`` functions, operations
  without a second derivative).
- ``"auto"``: the exact product, and finite differences where the exact one is unavailable (the
  build raised :class:`~lr_batch_callback.engine.differentiable.MissingDoubleBackwardError`) and
  the loss is smooth. When neither works, the error names both reasons.
- ``"fastest"``: finite differences where they are valid and accurate enough for the
  tolerance asked — Hessian curvature, a smooth loss, and ``tol`` at least
  :data:`DIFFERENCE_ACCURACY` :math:`\sqrt{\epsilon_{\text{mach}}}` (float32: 5.2e-3, so
  ``MonitorConfig``'s 1e-2 qualifies; float64: 2.2e-7) — else as ``"auto"``. Differences are
  the cheaper product wherever both exist: one forward and first-order backward (about a
  training step) against a double backward through the kept graph. A loss through
  piecewise-linear operations costs the refused attempt one forward pass, then gets the exact
  product. Without a tolerance (``tol=None``) it is ``"auto"``.

Parameters sharded by FSDP2 (``DTensor`` s) have no exact product (the forward uses gathered
copies, not the shards); ``"finite_difference"`` and ``"auto"`` build
:class:`~lr_batch_callback.engine.sharded.ShardedFiniteDifferenceHessian` there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lr_batch_callback._checks import check_choice, check_curvature, check_positive_float
from lr_batch_callback.engine.differentiable import MissingDoubleBackwardError
from lr_batch_callback.engine.finite_difference import FiniteDifferenceHessian
from lr_batch_callback.engine.operators import (
    HessianOperator,
    LossFn,
    _ModelCurvature,
    make_operator,
)
from lr_batch_callback.engine.sharded import ShardedFiniteDifferenceHessian, is_sharded
from lr_batch_callback.engine.smoothness import PiecewiseLinearError

__all__ = ["DIFFERENCE_ACCURACY", "PRODUCTS", "base_gradient", "build_operator",
           "check_product", "differences_suffice"]

PRODUCTS = ("exact", "finite_difference", "auto", "fastest")
#: ``"fastest"`` takes differences for tolerances of at least this many sqrt(eps): the measured
#: error was 7e-4 of the radius (float32 GPT-like transformer) against sqrt(eps) = 3.4e-4, so
#: a tolerance 15 sqrt(eps) = 5.2e-3 leaves it a factor 7 below what is asked.
DIFFERENCE_ACCURACY = 15.0


def differences_suffice(tol: float | None, dtype: torch.dtype) -> bool:
    """Whether forward differences in ``dtype`` are accurate to the relative tolerance ``tol``."""
    return tol is not None and tol >= DIFFERENCE_ACCURACY * math.sqrt(torch.finfo(dtype).eps)


def check_product(product: object, curvature: str = "hessian", step: object = None) -> str:
    """``product`` if it is one of :data:`PRODUCTS` and fits ``curvature`` and ``step``."""
    check_choice(product, "product", PRODUCTS)
    check_curvature(curvature)
    if product == "finite_difference" and curvature != "hessian":
        raise ValueError(
            f"product='finite_difference' computes Hessian products only, got curvature="
            f"{curvature!r}. Use curvature='hessian' with it, or product='exact' (or 'auto') for "
            "the Gauss-Newton matrix.")
    if step is not None:
        if product == "exact":
            raise ValueError(
                f"step={step!r} is the finite-difference step, but product='exact' takes none. "
                "Drop `step`, or use product='finite_difference' (or 'auto').")
        check_positive_float(step, "step", example="1e-3")
    return str(product)


def build_operator(curvature: str, product: str, model: nn.Module, loss_fn: LossFn,
                   batches: Sequence[Any], *, step: float | None = None,
                   tol: float | None = None, **kwargs: Any) -> _ModelCurvature:
    """The operator of ``curvature`` computed by ``product`` (module docstring).

    ``tol`` is the relative accuracy the caller will ask of the eigenvalues (``"fastest"``
    decides by it). ``kwargs`` are those of
    :func:`~lr_batch_callback.engine.operators.make_operator`; the options without meaning for
    finite differences (``keep_graphs``, ``ggn_output``) are ignored by it. The chosen
    operator's ``product`` attribute says which one was built.
    """
    check_product(product, curvature, step)
    chosen = kwargs.get("params")
    params = list(chosen) if chosen is not None else list(model.parameters())
    if is_sharded(params):
        return _sharded(curvature, product, model, loss_fn, batches, step, kwargs)
    if product == "finite_difference":
        return _differences(model, loss_fn, batches, step, kwargs)
    if product == "fastest":
        trainable = [p for p in params if p.requires_grad] or params
        if curvature == "hessian" and trainable and differences_suffice(tol, trainable[0].dtype):
            try:
                return _differences(model, loss_fn, batches, step, kwargs)
            except PiecewiseLinearError:
                pass  # kinks: the exact product (one forward pass spent finding out)
        product = "auto"
    try:
        return make_operator(curvature, model, loss_fn, batches, **kwargs)
    except MissingDoubleBackwardError as exact_error:
        if product == "exact":
            raise
        if curvature != "hessian":
            raise MissingDoubleBackwardError(
                f"{exact_error} (product='auto' cannot fall back to finite differences: they "
                "compute Hessian products only, and curvature='ggn' was asked for.)"
            ) from exact_error
        try:
            return _differences(model, loss_fn, batches, step, kwargs)
        except PiecewiseLinearError as fd_error:
            raise MissingDoubleBackwardError(
                f"{exact_error} Finite differences (product='auto') are refused too: {fd_error}"
            ) from exact_error


def _sharded(curvature: str, product: str, model: nn.Module, loss_fn: LossFn,
             batches: Sequence[Any], step: float | None, kwargs: dict[str, Any]
             ) -> ShardedFiniteDifferenceHessian:
    if product == "exact" or curvature != "hessian":
        raise MissingDoubleBackwardError(
            f"The parameters are sharded (FSDP2 DTensors), whose forward uses gathered copies: "
            f"double backward cannot reach the shards, so there is no exact product "
            f"(product={product!r}, curvature={curvature!r}). Use curvature='hessian' with "
            "product='finite_difference' or 'auto' (first-order gradients only).")
    options = {k: v for k, v in kwargs.items() if k not in ("ggn_output", "keep_graphs",
                                                          "batched_products")}
    return ShardedFiniteDifferenceHessian(model, loss_fn, batches, step=step, **options)


def _differences(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], step: float | None,
                 kwargs: dict[str, Any]) -> FiniteDifferenceHessian:
    options = {k: v for k, v in kwargs.items() if k not in ("ggn_output", "keep_graphs",
                                                          "batched_products")}
    return FiniteDifferenceHessian(model, loss_fn, batches, step=step, **options)


def base_gradient(operator: _ModelCurvature) -> Tensor | None:
    r"""This process's flat :math:`\sum_b w_b \nabla L_b(\theta_0)` if ``operator`` holds it, else ``None``.

    It is held as the differences' base gradient, or in the exact Hessian's kept gradient graphs
    (detached). A line search on the same batches then needs no gradient pass.
    """
    if isinstance(operator, FiniteDifferenceHessian):
        return operator.base_gradient
    if not isinstance(operator, HessianOperator) or not operator.keep_graphs:
        return None
    graphs = getattr(operator, "_graphs", [])
    if not graphs or len(graphs) != len(operator.weights):
        return None
    total: Tensor | None = None
    for graph, weight in zip(graphs, operator.weights, strict=True):
        flat = torch.cat([g.detach().reshape(-1) for g in graph]) * weight
        total = flat if total is None else total.add_(flat)
    return total
