"""Several vectors through autograd at once: vector-Jacobian products of rows, and flattening.

A block of :math:`k` vectors is a ``(k, P)`` matrix; per parameter, a tensor of shape
``(k, *p.shape)``. One vmap-batched backward pass (``is_grads_batched``) takes all rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["flatten_rows", "vjp_rows"]


def vjp_rows(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor]
             ) -> tuple[Tensor, ...]:
    """Vector-Jacobian products of rows: ``grads`` have a leading row dimension."""
    k = grads[0].shape[0]
    batched = k > 1
    result = torch.autograd.grad(
        list(outputs), list(inputs),
        grad_outputs=list(grads) if batched else [g[0] for g in grads],
        retain_graph=True, allow_unused=True, materialize_grads=True,
        is_grads_batched=batched,
    )
    return result if batched else tuple(r.unsqueeze(0) for r in result)


def flatten_rows(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The ``(k, P)`` matrix of per-parameter row tensors ``(k, *p.shape)``."""
    # One copy per tensor into a preallocated matrix: reshape-then-cat would copy twice the
    # gradients that double backward returns with non-contiguous strides (convolutions).
    sizes = [t[0].numel() for t in tensors]
    out = torch.empty((k, sum(sizes)), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t, n in zip(tensors, sizes, strict=True):
        out[:, offset : offset + n].view(t.shape).copy_(t)
        offset += n
    return out
