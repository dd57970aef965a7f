r"""Hessian products from first-order gradients: a forward difference along each vector.

.. math:: H v \approx \frac{\|v\|}{h}\Big(g\big(\theta_0 + \tfrac{h}{\|v\|} v\big) - g(\theta_0)\Big),
          \qquad g = \nabla_\theta L,

with :math:`g(\theta_0)` computed once when the operator is built. Each product is one forward
and one *first-order* backward pass, so it runs where double backward does not: fused and flash
attention kernels (kept, not swapped for the :math:`O(T^2)` math kernel), custom
``autograd.Function`` s marked ``@once_differentiable``, operations without a second derivative.

**Error.** The truncation error is :math:`\tfrac{h}{2}\,\nabla^3 L[\hat v, \hat v]`, linear in
:math:`h` on every Ritz value (measured on a GPT-like transformer in float32, 135k parameters:
top-3 errors 1.5e-3 at :math:`h = 10^{-3}`, 1.5e-4 at :math:`10^{-4}`); rounding contributes about
:math:`\epsilon_{\text{mach}}\,\|g\|/h`, and the perturbation itself is rounded to
:math:`\epsilon_{\text{mach}}\|\theta_0\|`. The default step grows with the parameters' size from a
floor, :math:`h = \sqrt{\epsilon_{\text{mach}}}\,\max(1, 0.01\|\theta_0\|)`: on that transformer
(:math:`\|\theta_0\| = 140`, :math:`h = 4.8\cdot10^{-4}`) the top three eigenvalues came within
:math:`7\cdot10^{-4}` of the exact ones (relative, 3 seeds) and the asymmetry stayed below
:math:`3.4\cdot10^{-4}`; in float64 the zoo's smooth models came within :math:`3\cdot10^{-8}`.
Each product costs about what a training step does (one forward, one first-order backward), less
than the exact product's double backward. The floor matters on small
models: a 163-parameter tanh MLP (:math:`\|\theta_0\| = 2.7`, float32) was 3.6e-3 off at
:math:`h = 10^{-5}` (rounding) and 5.5e-5 at :math:`h = \sqrt{\epsilon} = 3.4\cdot10^{-4}`.

**Where it differs by design.** ``spectral_norm`` re-runs its power iteration in every forward
pass, so differences see :math:`\sigma(W)`'s dependence on the weights, which the exact product
(through a fixed :math:`u, v`) leaves out: 6.5e-3 apart on the zoo's MLP.

**Where it is wrong.** Across a kink of a piecewise-linear function (ReLU, max-pooling, clamp,
abs, hard activations) the gradient jumps, and a difference measures the jump divided by
:math:`h`, not the curvature: on a BatchNorm–ReLU–MaxPool CNN the products were 2e-2 to 3e2 off
at every step size. Such losses are refused when the operator is built
(:class:`PiecewiseLinearError`, found by walking the gradient graph), and the Lanczos symmetry
probe (a difference operator is only symmetric where the loss is smooth) reports what the walk
cannot see as ``converged=False``.

**Invisible to training.** The parameters are moved in place (so sharded or wrapped parameters
need no functional call) and copied back from a saved copy after every product: bit-identical,
never subtracted back. Every gradient runs inside
:func:`~lr_batch_callback.engine.isolation.isolated` with the RNG state of the build replayed, so
dropout draws the same masks at :math:`\theta_0` and at every :math:`\theta_0 + h\hat v`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lr_batch_callback._checks import check_positive_float
from lr_batch_callback.engine.isolation import isolated
from lr_batch_callback.engine.linear_operator import NonFiniteCurvatureError
from lr_batch_callback.engine.operators import LossFn, _ModelCurvature
from lr_batch_callback.engine.smoothness import PiecewiseLinearError, kinks_on_the_way

__all__ = ["FiniteDifferenceHessian", "PiecewiseLinearError", "default_step"]

#: The step over ``sqrt(eps)·‖θ‖`` above the floor ``sqrt(eps)``: 4.8e-4 on the GPT-like
#: transformer (‖θ‖ = 140) the rule was measured on.
STEP_SCALE = 0.01
#: Asymmetry (of the spectral radius) a smooth difference operator stays under: ≤ 3.4e-4 on the
#: float32 transformer at the default step; kinks crossed gave 3.3e-2 (MobileNetV3, float32) to
#: 0.48 (ResNet-18).
DIFFERENCE_SYMMETRY = 1e-2


def default_step(theta_norm: float, dtype: torch.dtype) -> float:
    r"""The difference step :math:`\sqrt{\epsilon_{\text{mach}}}\max(1, 0.01\|\theta_0\|)`."""
    return math.sqrt(torch.finfo(dtype).eps) * max(1.0, STEP_SCALE * theta_norm)


class FiniteDifferenceHessian(_ModelCurvature):
    r"""Hessian products by forward differences of first-order gradients (module docstring).

    Takes the arguments of :class:`~lr_batch_callback.engine.operators.HessianOperator` except
    ``keep_graphs`` and ``batched_products`` (there is no graph to keep: the gradient at
    :math:`\theta_0` is one vector), plus:

    Args:
        step: the difference step :math:`h` (the norm of the parameter perturbation); default
            :func:`default_step`.

    Attributes:
        product: ``"finite_difference"``.
        step: the step in use.

    Raises:
        PiecewiseLinearError: when the loss goes through a piecewise-linear operation of the
            chosen parameters (ReLU, max-pooling, ...), where differences are wrong.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> model = model.double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> H = FiniteDifferenceHessian(model, loss_fn, [(x, y)])
        >>> H.matvec(torch.ones(H.dim, dtype=torch.float64)).shape
        torch.Size([21])
    """

    product = "finite_difference"

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], *,
                 step: float | None = None, **kwargs: Any) -> None:
        for name in ("keep_graphs", "batched_products"):
            kwargs.pop(name, None)
        if step is not None:
            check_positive_float(step, "step", example="1e-3")
        self._gradient: Tensor | None = None
        self._kinks_checked = False
        super().__init__(model, loss_fn, batches, keep_graphs=False, **kwargs)
        # Saved after the build (which never moves them): what every product restores.
        self._theta = [t.detach().clone() for t in self._tensors()]
        norm = math.sqrt(self._sum(sum(float(t.double().pow(2).sum()) for t in self._theta)))
        self.step = float(step) if step is not None else default_step(norm, self.dtype)
        self.symmetry_tolerance = DIFFERENCE_SYMMETRY
        self.asymmetry_causes = (
            "with product='finite_difference', a loss that is not smooth in the parameters (a "
            "piecewise-linear operation the build could not see, data-dependent control flow), "
            "where differences of gradients measure jumps: use product='exact'")

    @property
    def base_gradient(self) -> Tensor | None:
        r"""This process's flat :math:`\sum_b w_b \nabla L_b(\theta_0)` (``None`` once released).

        It is the gradient every product differences against, reusable by a line search.
        """
        return self._gradient

    # -- what subclasses for sharded parameters change -------------------------------------------
    def _tensors(self) -> list[Tensor]:
        """The tensors the parameters' values live in, moved in place by a product."""
        return list(self.params)

    def _sum(self, value: float) -> float:
        """``value`` summed over the ranks that share the parameters (none here)."""
        return value

    def _local(self, v: Tensor) -> list[Tensor]:
        """This process's part of the flat vector ``v``, one tensor per :meth:`_tensors` entry."""
        return [d[0] for d in self._split(v[None])]

    def _full(self, local: Tensor) -> Tensor:
        """The flat vector of a concatenation of :meth:`_local` parts."""
        return local

    def release(self) -> None:
        """Free the batches, the base gradient and the saved weights (the operator is unusable after)."""
        super().release()
        self._gradient = None
        self._theta = []

    # -- the environment: the build's, without the twice-differentiable substitutes -------------
    @contextlib.contextmanager
    def _in_force(self) -> Iterator[None]:
        """Isolation and gradients on; fused kernels stay (first-order backward only)."""
        with isolated(self.model), self._differentiable():
            yield

    def _build(self, batch: Any) -> None:
        r"""Add this batch's weighted gradient at :math:`\theta_0` to the kept one."""
        index = len(self._rng_states) - 1
        gradient = self._weighted_gradient(index, batch)
        if self._gradient is None:
            self._gradient = gradient
        else:
            self._gradient.add_(gradient)

    def _weighted_gradient(self, index: int, batch: Any) -> Tensor:
        """The flat gradient of batch ``index``'s loss times its weight."""
        loss = self._loss(batch)
        self._check_smooth(loss, self.params)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
        # A sparse embedding gradient is the same derivative as the dense one.
        flat = torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads])
        return flat.to(self.dtype).mul_(self.weights[index])

    def _check_smooth(self, loss: Tensor, params: Sequence[Tensor] | None) -> None:
        if not self._kinks_checked:
            kinks = kinks_on_the_way(loss, params)
            if kinks:
                raise PiecewiseLinearError.of(kinks)
            self._kinks_checked = True

    # -- products --------------------------------------------------------------------------------
    def local_matmat(self, V: Tensor) -> Tensor:
        """This process's Hessian products with the rows of ``V``, by differences of gradients."""
        if not self.batches or self._gradient is None:
            raise RuntimeError("This curvature operator was released; build a new one.")
        rows = [self._difference(v) for v in V]
        out = torch.stack(rows)
        if (self.device.type == "cpu" and not self.distributed
                and not bool(torch.isfinite(out.sum()))):
            raise NonFiniteCurvatureError("A curvature product is not finite (NaN or inf).")
        return out

    def _difference(self, v: Tensor) -> Tensor:
        assert self._gradient is not None
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        scale = self.step / norm
        moved: Tensor | None = None
        try:
            with torch.no_grad():
                for t, theta, d in zip(self._tensors(), self._theta, self._local(v), strict=True):
                    t.copy_(theta + scale * d.to(theta.dtype))
            for i in range(len(self.weights)):
                with self._replay_rng(i), self._in_force():
                    gradient = self._weighted_gradient(i, self.batches[i])
                moved = gradient if moved is None else moved.add_(gradient)
        finally:
            with torch.no_grad():
                for t, theta in zip(self._tensors(), self._theta, strict=True):
                    t.copy_(theta)
        assert moved is not None
        return self._full(moved.sub_(self._gradient).div_(scale))
