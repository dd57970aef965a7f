r"""Hessian products of a model whose parameters are sharded by FSDP2 (``fully_shard``).

Under ``fully_shard`` each parameter is a ``DTensor`` of which every rank holds a slice of rows
(``Shard(0)`` over a one-dimensional data-parallel mesh); the forward pass all-gathers them into
temporary full tensors, so double backward cannot reach the shards, and the exact product is
unavailable. Finite differences need only what training does: a forward and ``backward()``,
whose reduce-scatter leaves on every rank its rows of the *global* batch's gradient.

A product :math:`Hv` on a flat vector :math:`v` of all :math:`P` parameter entries (the same on
every rank) is therefore: each rank moves its own rows by :math:`h\hat v` in place, one
forward–backward of every rank's micro-batch :math:`i` with loss scaled by :math:`W w_i`
(FSDP2 averages over the :math:`W` ranks, so the result is :math:`\sum_i w_i g_i`, the
sample-weighted global gradient), then each rank writes its rows of the difference into a zero
vector and the ranks sum them (:class:`~lr_batch_callback.engine.linear_operator.CurvatureOperator`
all-reduces products). **What is gathered:** nothing of the parameters beyond what the forward
pass gathers in training; per product, one all-reduce of :math:`P` floats (the assembled product),
and the Lanczos vectors are kept whole on every rank (two or three vectors of :math:`P` floats in a
λ_max measurement). The parameters stay sharded throughout and are copied back from saved shards.

``.grad`` is set aside around each backward and put back (the identity of every ``.grad``
tensor is restored, as everywhere in the engine). Tensor parallelism (a mesh of more than one
dimension, or placements other than ``Shard(0)``) is refused.

**Line searches** (critical sharpness, :class:`ShardedLineLoss`) work on the same local rows: a
direction is kept as each rank's rows of it, :math:`\theta_0 + \eta d` is written into the shards
in place, the forward passes gather as in training and the weighted losses are summed over the
ranks; :math:`g^\top d` is a local dot product summed over the ranks (one all-reduce of a float).
Nothing of the parameters is gathered beyond the forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lr_batch_callback.engine.critical import LineLoss
from lr_batch_callback.engine.finite_difference import FiniteDifferenceHessian
from lr_batch_callback.engine.operators import LossFn

__all__ = ["ShardedFiniteDifferenceHessian", "ShardedLineLoss", "is_sharded"]


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a ``DTensor`` (FSDP2, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return any(isinstance(p, DTensor) for p in params)


class _Rows:
    """Where one parameter's local rows lie in the flat vector of all parameters."""

    def __init__(self, param: Any, offset: int) -> None:
        from torch.distributed.tensor import Shard

        mesh, placements = param.device_mesh, tuple(param.placements)
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(
                f"Sharded curvature supports FSDP2's data-parallel sharding (placements "
                f"(Shard(dim=0),) on a 1-D mesh); got placements {placements} on a "
                f"{mesh.ndim}-D mesh. Use ModelParallelStrategy(tensor_parallel_size=1), or "
                "monitor_every_n_steps=None to keep only the LR scaling.")
        self.local = param.to_local()
        rows, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
        chunk = math.ceil(rows / world)  # torch.chunk's split, which FSDP2 uses
        start = min(rank * chunk, rows)
        if self.local.shape[0] != min(chunk, rows - start):
            raise ValueError(
                f"A sharded parameter of shape {tuple(param.shape)} holds {self.local.shape[0]} "
                f"rows on rank {rank}, not the {min(chunk, rows - start)} of an even "
                "torch.chunk split; this layout is not supported.")
        width = param.numel() // max(rows, 1)
        self.begin, self.end = offset + start * width, offset + (start + self.local.shape[0]) * width
        self.numel = param.numel()


def _local_gradient(params: Sequence[Tensor], locals_: Sequence[Tensor],
                    backward: Callable[[], None]) -> Tensor:
    """This rank's rows of the gradient that ``backward()`` accumulates, flat; ``.grad`` kept.

    Each parameter's ``.grad`` is set aside before and put back after (the same tensor objects),
    so the gradient read here is only what ``backward`` computed (reduce-scattered by FSDP2).
    """
    kept = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        backward()
        parts = [p.grad.to_local() if p.grad is not None  # type: ignore[attr-defined]
                 else torch.zeros_like(local) for p, local in zip(params, locals_, strict=True)]
        return torch.cat([g.reshape(-1) for g in parts])
    finally:
        for p, grad in zip(params, kept, strict=True):
            p.grad = grad


class ShardedFiniteDifferenceHessian(FiniteDifferenceHessian):
    """Finite-difference Hessian products on FSDP2 shards (module docstring).

    A :class:`~lr_batch_callback.engine.finite_difference.FiniteDifferenceHessian` whose
    arguments are the same; ``distributed`` is always on.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], **kwargs: Any
                 ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Sharded parameters need an initialised torch.distributed process "
                               "group.")
        chosen = kwargs.get("params")
        params = list(chosen) if chosen is not None else [
            p for p in model.parameters() if p.requires_grad]
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        self._rows = [_Rows(p, offset) for p, offset in zip(params, offsets, strict=False)]
        self._world = dist.get_world_size()
        kwargs["distributed"] = True
        super().__init__(model, loss_fn, batches, **kwargs)

    def _tensors(self) -> list[Tensor]:
        return [r.local for r in self._rows]

    def _sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())

    def _local(self, v: Tensor) -> list[Tensor]:
        return [v[r.begin:r.end].reshape(r.local.shape) for r in self._rows]

    def _full(self, local: Tensor) -> Tensor:
        full = local.new_zeros(self.dim)
        at = 0
        for r in self._rows:
            full[r.begin:r.end] = local[at:at + r.end - r.begin]
            at += r.end - r.begin
        return full

    def _build(self, batch: Any) -> None:
        if len(self._rng_states) == 1:
            self._same_count_on_every_rank()
        super()._build(batch)

    def _same_count_on_every_rank(self) -> None:
        # Every backward is a collective (reduce-scatter): the ranks must run as many.
        counts = torch.tensor([len(self.batches), -len(self.batches)], device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if int(counts[0]) != -int(counts[1]):
            raise ValueError(
                f"The ranks split their batches into different numbers of micro-batches "
                f"(between {-int(counts[1])} and {int(counts[0])}); under FSDP2 every backward "
                "is a collective. Give every rank the same batch size, or micro_batch_size=None.")

    def _weighted_gradient(self, index: int, batch: Any) -> Tensor:
        """This rank's rows of :math:`w_i`-weighted global gradient of micro-batch ``index``."""

        def backward() -> None:
            loss = self._loss(batch)
            self._check_smooth(loss, None)
            # FSDP2 averages gradients over the ranks: scaling by W·w_i makes the sum Σ w_i g_i.
            torch.autograd.backward(loss * (self._world * self.weights[index]))

        return _local_gradient(self.params, [r.local for r in self._rows], backward).to(self.dtype)


class ShardedLineLoss(LineLoss):
    r"""A :class:`~lr_batch_callback.engine.critical.LineLoss` on FSDP2 shards (module docstring).

    Directions and gradients are this rank's rows (shaped like each parameter's local shard);
    ``gradient`` is this rank's rows of the global batch's gradient (the sharded curvature
    operator's base gradient), not summed again. ``distributed`` is always on: the ranks'
    weighted losses are summed.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                 weights: Sequence[float], *, params: Sequence[Tensor] | None = None,
                 gradient: Tensor | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Sharded parameters need an initialised torch.distributed process "
                               "group.")
        super().__init__(model, loss_fn, batches, weights, params=params, distributed=True,
                         gradient=gradient)
        self._locals = [_Rows(p, 0).local for p in self.params]  # checks the layout too
        self._world = dist.get_world_size()

    def _tensors(self) -> list[Tensor]:
        return self._locals

    def loss_at(self, direction: Sequence[Tensor], eta: float) -> float:
        """The loss at θ0 + ηd; every FSDP2 group is resharded after the forward.

        A no-grad forward leaves the root group unsharded (``reshard_after_forward`` is off for
        it by default), and the next forward would reuse its gathered copy of θ0 instead of the
        moved shards: resharding makes every forward gather the shards as they are.
        """
        try:
            return super().loss_at(direction, eta)
        finally:
            self._reshard()

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def __exit__(self, *exc_info: object) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._reshard()

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
        """The dot product of two sharded vectors: local rows, summed over the ranks."""
        total = torch.tensor([super().dot(a, b)], dtype=torch.float64, device=self._locals[0].device)
        dist.all_reduce(total)
        return float(total.item())

    def gradient(self) -> list[Tensor]:
        """This rank's rows of the global batch's gradient, one tensor per local shard."""
        if self._given is not None:
            flat = self._given.detach().clone()
        else:
            flat = self._backward()
        sizes = [t.numel() for t in self._locals]
        return [part.reshape(t.shape)
                for part, t in zip(torch.split(flat, sizes), self._locals, strict=True)]

    def _backward(self) -> Tensor:
        def backward() -> None:
            self._replay()
            for batch, weight in zip(self.batches, self.weights, strict=True):
                # FSDP2 averages gradients over the ranks: scaling by W makes the sum the weighted one.
                torch.autograd.backward(self.loss_fn(self.model, batch) * (weight * self._world))

        flat = _local_gradient(self.params, self._locals, backward)
        self.passes += len(self.batches)
        return flat
