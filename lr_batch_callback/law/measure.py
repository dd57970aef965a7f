"""Measuring the batch-size law on a model: top eigenvalues of sub-batches of several sizes.

:func:`estimate_batch_size_law` draws sub-batches of a large batch without replacement, runs the
engine's Lanczos on each (:func:`~lr_batch_callback.engine.estimate.hessian_eigenvalues`) and fits
:func:`~lr_batch_callback.law.fit.fit_batch_size_law` to the results.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lr_batch_callback._checks import check_curvature, check_integer
from lr_batch_callback.engine.batching import batch_size_of, index_batch
from lr_batch_callback.engine.estimate import hessian_eigenvalues
from lr_batch_callback.engine.lanczos import DEFAULT_TOL
from lr_batch_callback.engine.operators import LossFn
from lr_batch_callback.law.fit import fit_batch_size_law
from lr_batch_callback.law.model import BatchSizeLaw, _check_dataset_size

__all__ = ["estimate_batch_size_law"]


def _default_batch_sizes(n: int, num: int = 5) -> list[int]:
    """A geometric ladder of about ``num`` sizes from ``max(2, n/64)`` to ``n``."""
    sizes = np.geomspace(max(2.0, n / 64), n, num)
    return sorted({int(math.floor(s + 0.5)) for s in sizes} | {n})


def _check_batch_sizes(batch_sizes: Sequence[int] | None, n: int) -> list[int]:
    if batch_sizes is None:
        if n < 3:
            raise ValueError(
                f"The batch has {n} samples; the default ladder of sub-batch sizes needs at least "
                "3. Pass a larger batch."
            )
        return _default_batch_sizes(n)
    out = set()
    for size in batch_sizes:
        try:
            whole = not isinstance(size, bool) and float(size).is_integer()
        except (TypeError, ValueError):
            whole = False
        if not whole or not 1 <= size <= n:
            raise ValueError(
                f"Every sub-batch size must be an integer in [1, {n}] (the batch's size), got "
                f"{size!r}. Sub-batches are drawn from the batch passed in; pass a larger batch "
                "to measure larger sizes."
            )
        out.add(int(size))
    return sorted(out)


def _sub_batch_plan(
    n: int, batch_sizes: Sequence[int], draws: int, seed: int | None
) -> list[tuple[int, torch.Tensor | None, int]]:
    """``(size, sample indices or None for the whole batch, Lanczos seed)`` for each run.

    A private generator, so that the caller's global RNG streams are untouched and a seed
    reproduces both the sub-batches and the Lanczos start vectors.
    """
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    plan: list[tuple[int, torch.Tensor | None, int]] = []
    for size in batch_sizes:
        # Every draw of the full size is the same batch: one Lanczos run is enough.
        repeats = 1 if size == n else draws
        for _ in range(repeats):
            index = None
            if size < n:
                index = torch.randperm(n, generator=generator)[:size].sort().values
            lanczos_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            plan.append((size, index, lanczos_seed))
    return plan


def estimate_batch_size_law(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    batch_sizes: Sequence[int] | None = None,
    draws: int = 4,
    dataset_size: float | None = None,
    curvature: str = "hessian",
    seed: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = 100,
) -> BatchSizeLaw:
    r"""Measure the top eigenvalue on sub-batches of several sizes and fit :math:`\lambda(B)`.

    Sub-batches of each size are drawn without replacement from ``batch`` (``draws`` times each;
    once at the full size, where every draw is the whole batch), the top eigenvalue of each
    sub-batch's curvature is found by Lanczos
    (:func:`~lr_batch_callback.engine.estimate.hessian_eigenvalues`, random start, model state
    restored), and :func:`fit_batch_size_law` fits :math:`a + c(1/B - 1/N)` to all of them. The
    cost is one Lanczos run per sub-batch, each on a batch no larger than ``batch``.

    Args:
        model: the network; used as it is (train mode stays train mode) and left unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batch: a large batch; its size :math:`n` bounds the sub-batch sizes.
        batch_sizes: sub-batch sizes in ``[1, n]``; default about 5 sizes in a geometric ladder
            from ``max(2, n/64)`` to ``n``.
        draws: random sub-batches per size (the scatter between draws is part of the fit's error).
        dataset_size: :math:`N`, the training set size; ``None`` for an infinite data set.
        curvature: ``"hessian"`` or ``"ggn"``.
        seed: seeds the sub-batch draws and the Lanczos start vectors (``None``: fresh randomness).
        tol: relative tolerance of each Lanczos run's eigenvalue.
        max_iter: product cap per Lanczos run.

    Returns:
        The fitted :class:`BatchSizeLaw`; its observations are in run order (sizes ascending).

    Warns:
        RuntimeWarning: when Lanczos runs hit ``max_iter`` before ``tol``; their eigenvalues are
            then lower bounds.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(128, 4), torch.randn(128, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> law = estimate_batch_size_law(model, loss_fn, batch, draws=2, seed=0)
        >>> sorted(set(law.batch_sizes))
        [2.0, 6.0, 16.0, 45.0, 128.0]
    """  # noqa: E501
    check_curvature(curvature)
    check_integer(draws, "draws", hint="e.g. draws=4")
    n = batch_size_of(batch)
    sizes = _check_batch_sizes(batch_sizes, n)
    _check_dataset_size(dataset_size, float(n))
    # Fail before any Lanczos run rather than in the fit after all of them.
    num_runs = sum(1 if size == n else draws for size in sizes)
    if len(sizes) < 2 or num_runs < 3:
        raise ValueError(
            f"Sub-batch sizes {sizes} with draws={draws} give {num_runs} observations at "
            f"{len(sizes)} distinct sizes; the fit needs at least 3 at 2 distinct sizes. Add "
            "sizes or draws."
        )

    observed_sizes: list[float] = []
    observed: list[float] = []
    unconverged: list[int] = []
    for size, index, lanczos_seed in _sub_batch_plan(n, sizes, draws, seed):
        sub_batch = batch if index is None else index_batch(batch, index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # counted and reported once below
            result = hessian_eigenvalues(model, loss_fn, sub_batch, curvature=curvature, tol=tol,
                                         max_iter=max_iter, seed=lanczos_seed)
        observed_sizes.append(float(size))
        observed.append(float(result.eigenvalues[0]))
        if not result.converged:
            unconverged.append(size)
    if unconverged:
        warnings.warn(
            f"{len(unconverged)} of {len(observed)} Lanczos runs (sub-batch sizes "
            f"{sorted(set(unconverged))}) hit max_iter={max_iter} before tol={tol}; their top "
            "eigenvalues are lower bounds and bias the fit. Raise max_iter or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    return fit_batch_size_law(observed_sizes, observed, dataset_size, curvature=curvature)
