r"""Critical sharpness: the curvature along a step, measured with forward passes only.

Along a direction :math:`d` the batch loss is :math:`f(\eta) = L(\theta + \eta d)`. The *critical
step* :math:`\eta_c` is the smallest :math:`\eta > 0` at which the loss rises back to
:math:`f(0)`, and the critical sharpness is :math:`\lambda_c = 2/\eta_c` (Kalra et al. 2026,
arXiv 2601.16979). On a quadratic,

.. math:: f(\eta) - f(0) = \eta\, g^\top d + \tfrac{\eta^2}{2}\, d^\top H d
          \quad\Rightarrow\quad \lambda_c = \frac{d^\top H d}{-g^\top d},

so along :math:`d = -g` (gradient descent) :math:`\lambda_c = g^\top H g / g^\top g`, a Rayleigh
quotient: :math:`\lambda_c \le \lambda_{max}`, equal when :math:`g` is the top eigenvector. A step
of size :math:`\eta` along :math:`d` raises the loss when :math:`\eta\lambda_c/2 > 1`: that ratio
answers "will this step at this LR raise the loss", with the optimizer's own direction, and
needs no second derivative, so it runs wherever the forward pass does (fused attention kernels
included).

The search works on :math:`q(\eta) = (f(\eta) - f(0))/\eta`, which is *linear* on a quadratic,
with :math:`q(0) = g^\top d` known exactly from the gradient: false position on :math:`q` from
:math:`(0, g^\top d)` finds a quadratic's :math:`\eta_c` with one pass past it, and brackets it on
any loss (Illinois safeguard). An uphill direction (:math:`g^\top d \ge 0`) has
:math:`\eta_c = 0`: the loss rises at every step size, reported as :math:`\lambda_c = \infty` with
no pass spent. The number of passes is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lr_batch_callback.engine.isolation import isolated

__all__ = ["CriticalStep", "LineLoss", "critical_sharpness", "critical_step"]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class CriticalStep:
    r"""The result of one line search.

    Attributes:
        step: :math:`\eta_c`; ``0.0`` for an uphill direction; when not bracketed, the largest
            step tried (the loss was still lower there, so :math:`\eta_c` is larger).
        sharpness: :math:`\lambda_c = 2/\eta_c` (``inf`` uphill); an upper bound when not
            bracketed.
        slope: :math:`g^\top d`, the loss's derivative along the direction at 0.
        passes: forward passes spent.
        converged: ``step`` is within the relative tolerance of :math:`\eta_c` (``True`` uphill).
        uphill: the direction raises the loss to first order.
    """

    step: float
    sharpness: float
    slope: float
    passes: int
    converged: bool
    uphill: bool = False


def critical_step(rise: Callable[[float], float], slope: float, first: float, *,
                  rtol: float = 0.02, max_passes: int = 12) -> CriticalStep:
    r"""The smallest :math:`\eta > 0` with ``rise(η) = f(η) - f(0) >= 0``, by false position.

    Args:
        rise: :math:`\eta \mapsto f(\eta) - f(0)`, one forward pass per call.
        slope: :math:`g^\top d` (must be the derivative of ``rise`` at 0).
        first: the first step tried (the LR in use: the answer is usually near it).
        rtol: relative accuracy of :math:`\eta_c`.
        max_passes: bound on calls of ``rise``.

    Example:
        >>> f = lambda eta: -2.0 * eta + 0.5 * 8.0 * eta**2  # g·d = -2, d·Hd = 8: η_c = 0.5
        >>> r = critical_step(f, -2.0, 0.1)
        >>> round(r.sharpness, 9), r.passes  # λ_c = d·Hd / (-g·d) = 4
        (4.0, 2)
    """
    if not (math.isfinite(slope) and math.isfinite(first) and first > 0):
        raise ValueError(f"critical_step needs a finite slope and a first step > 0, got slope="
                         f"{slope!r}, first={first!r}.")
    if slope == 0:  # a stationary point along d: no first-order descent to measure against
        return CriticalStep(math.nan, math.nan, slope, 0, False)
    if slope > 0:
        return CriticalStep(0.0, math.inf, slope, 0, True, uphill=True)
    lo, q_lo = 0.0, slope  # q(η) = rise(η)/η; q < 0 below η_c
    prev, q_prev = 0.0, slope  # the point below ``lo``: extrapolation uses the latest two
    last = (0.0, slope)  # the previous evaluation
    hi, q_hi = math.inf, math.nan
    eta, passes, side = first, 0, 0
    while passes < max_passes:
        q = rise(eta) / eta
        passes += 1
        # The secant to the previous point estimates the distance to the root; on a quadratic
        # it is exact. (|q| small alone is not enough: on a flat line q stays near 0 for long.)
        if math.isfinite(q) and math.isfinite(last[1]) and q != last[1]:
            distance = q * (eta - last[0]) / (q - last[1])
            if abs(distance) <= rtol * eta:
                root = eta - distance
                return CriticalStep(root, 2.0 / root, slope, passes, True)
        last = (eta, q)
        if q < 0:
            prev, q_prev = lo, q_lo
            lo, q_lo = eta, q
            side = side - 1 if side < 0 else -1
        else:  # risen (a non-finite loss, diverged far past η_c, counts as risen)
            hi, q_hi = eta, q if math.isfinite(q) else math.inf
            side = side + 1 if side > 0 else 1
        if math.isfinite(hi) and (hi - lo) <= rtol * hi:
            break
        eta = _next_step((prev, q_prev), (lo, q_lo), (hi, q_hi), side)
    if not math.isfinite(hi):  # the loss never rose: η_c > lo
        return CriticalStep(lo, 2.0 / lo, slope, passes, False)
    estimate = (lo - q_lo * (hi - lo) / (q_hi - q_lo) if math.isfinite(q_hi)
                else 0.5 * (lo + hi))
    converged = (hi - lo) <= rtol * hi
    return CriticalStep(estimate, 2.0 / estimate, slope, passes, converged)


def _next_step(prev: tuple[float, float], low: tuple[float, float], high: tuple[float, float],
               side: int) -> float:
    """The next step of the line search, from the latest points below and above η_c.

    Before a bracket, the secant of the latest two points below η_c (×2 to ×8 the last step: q
    flattens on most losses, so a plain secant would crawl); then false position, Illinois-damped;
    bisection while the upper end diverged (no value to use).
    """
    (p, q_p), (lo, q_lo), (hi, q_hi) = prev, low, high
    if not math.isfinite(hi):
        if q_lo <= q_p:  # no upward curvature seen yet: grow
            return lo * 8.0
        return min(max(lo - q_lo * (lo - p) / (q_lo - q_p), lo * 2.0), lo * 8.0)
    if not math.isfinite(q_hi):
        return 0.5 * (lo + hi)
    # Illinois: when the same end moved twice, halve the other end's value so the bracket
    # shrinks from both sides (plain false position stalls on a curved q).
    if side <= -2:
        q_hi = q_hi / 2.0
    elif side >= 2:
        q_lo = q_lo / 2.0
    eta = lo - q_lo * (hi - lo) / (q_hi - q_lo)
    width = hi - lo
    return min(max(eta, lo + 0.01 * width), hi - 0.01 * width)


class LineLoss:
    r"""The batch loss at :math:`\theta_0 + \eta d`, by forward passes, with nothing left behind.

    Inside ``with LineLoss(...) as line:`` the model is :func:`isolated` (modes, buffers, RNG
    streams, ``.grad`` restored on exit), every forward replays the same RNG state (one dropout
    mask for all steps), and the parameters are set to :math:`\theta_0 + \eta d` from a saved copy
    of :math:`\theta_0`, which is copied back bit for bit on exit (saved, not subtracted back).

    Args:
        model, loss_fn: as :func:`~lr_batch_callback.hessian_eigenvalues` takes them.
        batches: the batches; the loss is :math:`\sum_b w_b L_b`.
        weights: :math:`w_b`, each batch's share of the (global) mean loss.
        params: the parameters moved along the direction (default: all trainable ones).
        distributed: sum the weighted losses and gradients over the ranks (the weights are then
            the global shares) so every rank sees the global batch's line.
        gradient: this rank's flat :math:`\sum_b w_b \nabla L_b(\theta_0)`, when a curvature
            operator on the same batches already computed it (finite differences keep it): then
            :meth:`gradient` costs no pass.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                 weights: Sequence[float], *, params: Sequence[Tensor] | None = None,
                 distributed: bool = False, gradient: Tensor | None = None) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.batches, self.weights = list(batches), [float(w) for w in weights]
        self.params = (list(params) if params is not None
                       else [p for p in model.parameters() if p.requires_grad])
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.passes = 0
        self._stack = contextlib.ExitStack()
        self._origin: list[Tensor] = []
        self._devices: list[int] = []
        self._rng: tuple[Tensor, list[Tensor]] | None = None
        self._base: float | None = None
        self._given = gradient

    def __enter__(self) -> LineLoss:
        self._stack.enter_context(isolated(self.model))
        self._base = None
        self._origin = [t.detach().clone() for t in self._tensors()]
        self._devices = sorted({p.device.index or 0 for p in self.params
                                if p.device.type == "cuda"})
        self._rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._devices])
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            with torch.no_grad():
                for t, origin in zip(self._tensors(), self._origin, strict=True):
                    t.copy_(origin)
        finally:
            self._stack.close()

    def _replay(self) -> None:
        assert self._rng is not None
        torch.set_rng_state(self._rng[0])
        for device, state in zip(self._devices, self._rng[1], strict=True):
            torch.cuda.set_rng_state(state, device)

    def _total(self, value: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(value)
        return value

    def _tensors(self) -> list[Tensor]:
        """The tensors the parameters' values live in, moved in place (sharded: local rows)."""
        return list(self.params)

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
        r""":math:`a^\top b` over all parameters (vectors shaped like :meth:`gradient`'s parts)."""
        return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
                         for x, y in zip(a, b, strict=True)))

    def gradient(self) -> list[Tensor]:
        r"""The gradient :math:`g = \nabla L(\theta_0)`, shaped like the parameters.

        It costs one forward and backward per batch, with ``.grad`` untouched; none when the
        gradient was given.
        """
        if self._given is not None:
            flat = self._total(self._given.detach().clone())
        else:
            grads = [torch.zeros_like(p) for p in self.params]
            self._replay()
            for batch, weight in zip(self.batches, self.weights, strict=True):
                loss = self.loss_fn(self.model, batch) * weight
                parts = torch.autograd.grad(loss, self.params, allow_unused=True)
                for total, part in zip(grads, parts, strict=True):
                    if part is not None:
                        total.add_(part)
            self.passes += len(self.batches)
            flat = self._total(torch.cat([g.reshape(-1) for g in grads]))
        return [part.reshape(p.shape)
                for part, p in zip(torch.split(flat, [p.numel() for p in self.params]), self.params,
                                   strict=True)]

    def base_loss(self) -> float:
        r""":math:`L(\theta_0)` by the same no-grad forward as :meth:`loss_at` (computed once)."""
        if self._base is None:
            self._base = self.loss_at([torch.zeros_like(t) for t in self._tensors()], 0.0)
        return self._base

    @torch.no_grad()
    def loss_at(self, direction: Sequence[Tensor], eta: float) -> float:
        r""":math:`L(\theta_0 + \eta d)`, ``direction`` shaped like the parameters (or flat)."""
        for t, origin, d in zip(self._tensors(), self._origin, direction, strict=True):
            t.copy_(origin + eta * d.reshape(t.shape))
        self._replay()
        total = torch.zeros((), dtype=torch.float64, device=self._origin[0].device)
        for batch, weight in zip(self.batches, self.weights, strict=True):
            total += self.loss_fn(self.model, batch).double() * weight
        self.passes += len(self.batches)
        return float(self._total(total))


def critical_sharpness(line: LineLoss, gradient: Sequence[Tensor], direction: Sequence[Tensor],
                       first: float, *, rtol: float = 0.02, max_passes: int = 12) -> CriticalStep:
    r""":class:`CriticalStep` of ``line`` along ``direction`` (shaped like the parameters).

    ``first`` is the first step tried (the LR in use). The slope :math:`g^\top d` comes from
    ``gradient``; :math:`f(0)` costs one pass (shared by all directions of ``line``), each step
    tried one more.
    """
    slope = line.dot(gradient, direction)
    if slope >= 0 or not math.isfinite(slope):
        # critical_step returns before calling ``rise`` when the slope is not negative, so the
        # lambda only fills the signature.
        known = slope if math.isfinite(slope) else 0.0
        return critical_step(lambda eta: 0.0, known, first)  # noqa: ARG005
    # From here on the slope is negative: f(0) and the steps tried, each one forward pass.
    before = line.passes
    base = line.base_loss()
    result = critical_step(lambda eta: line.loss_at(direction, eta) - base, slope, first,
                           rtol=rtol, max_passes=max_passes)
    return dataclasses.replace(result, passes=line.passes - before)
