"""Batches as nested containers of tensors: their size, sub-batches and concatenation.

A *batch* is whatever a data loader yields: a tensor, or a tuple/list/dict (nested) of tensors
and other values. Its *size* is the leading dimension shared by its tensors. Sub-batches slice
every tensor leaf along that dimension and keep the other leaves as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["batch_size_of", "concat_batches", "index_batch", "split_batch", "BatchSizeFn"]

BatchSizeFn = Callable[[Any], int]


def _tensor_leaves(batch: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(batch)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0]


def batch_size_of(batch: Any) -> int:
    """Number of samples in ``batch``: the leading dimension of its first tensor with one.

    Raises:
        ValueError: if the batch holds no tensor with a leading dimension.

    Example:
        >>> batch_size_of((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    leaves = _tensor_leaves(batch)
    if not leaves:
        raise ValueError(
            f"Cannot tell the number of samples in a batch of type {type(batch).__name__}: it holds "
            "no tensor with a leading (batch) dimension. Pass `batch_size_fn=` to say how to count."
        )
    return int(leaves[0].shape[0])


def index_batch(batch: Any, index: torch.Tensor | slice) -> Any:
    """The sub-batch made of the samples at ``index`` (a slice or an index tensor)."""
    size = batch_size_of(batch)
    leaves, spec = tree_flatten(batch)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == size:
            if isinstance(index, torch.Tensor):
                out.append(leaf.index_select(0, index.to(leaf.device)))
            else:
                out.append(leaf[index])
        else:
            out.append(leaf)
    return tree_unflatten(out, spec)


def split_batch(batch: Any, micro_batch_size: int) -> list[Any]:
    """Split ``batch`` into consecutive sub-batches of at most ``micro_batch_size`` samples."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size}.")
    size = batch_size_of(batch)
    return [index_batch(batch, slice(i, i + micro_batch_size)) for i in range(0, size, micro_batch_size)]


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the sample dimension.

    Tensor leaves whose leading dimension is the batch size are concatenated; other leaves are
    taken from the first batch.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch.")
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    sizes = [batch_size_of(b) for b in batches]
    for _, other_spec in flat[1:]:
        if other_spec != spec:
            raise ValueError("Cannot concatenate batches with different structures.")
    out = []
    for i, leaf in enumerate(flat[0][0]):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == sizes[0]:
            out.append(torch.cat([f[0][i] for f in flat], dim=0))
        else:
            out.append(leaf)
    return tree_unflatten(out, spec)
