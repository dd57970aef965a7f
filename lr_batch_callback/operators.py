r"""Curvature matrices of a model's loss on a fixed batch, as products with flat vectors.

Two symmetric :math:`P\times P` operators over the chosen parameters :math:`\theta`
(:math:`P` = their total number of entries):

- the Hessian :math:`H = \nabla^2_\theta L(\theta)`;
- the Generalised Gauss-Newton :math:`G = J^\top H_f J`, with :math:`J = \partial f/\partial\theta`
  the Jacobian of the model output :math:`f` and :math:`H_f = \nabla_f^2 L` the Hessian of the
  loss with respect to that output (positive semi-definite for convex losses).

For several batches (or micro-batches) :math:`b` with :math:`n_b` samples each, and ``loss_fn``
returning the *mean* loss over a batch, the operator is the sample-weighted average
:math:`\sum_b n_b M_b / \sum_b n_b` — the curvature of the mean loss over all samples. Under
``torch.distributed`` the average runs over every rank's samples too.

The gradient graph of each batch is built once and reused for every product
(:math:`Hv = \partial (g^\top v)/\partial\theta` with :math:`g = \nabla_\theta L` kept with
``create_graph=True``): a product then costs one backward pass through the backward graph
instead of a new forward and backward. ``keep_graphs=False`` trades that speed for memory by
rebuilding each batch's graph for every product; the RNG state is replayed so that dropout draws
the same masks every time, keeping the operator fixed, which Lanczos needs.

Build and use an operator inside :func:`lr_batch_callback.isolation.isolated`, which restores
BatchNorm statistics, RNG streams and modes afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lr_batch_callback.batching import BatchSizeFn, batch_size_of

__all__ = [
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "NonFiniteCurvatureError",
    "make_operator",
]

LossFn = Callable[[nn.Module, Any], Tensor]


class NonFiniteCurvatureError(FloatingPointError):
    """A loss or a curvature product was NaN or infinite."""


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _flatten_batched(tensors: Sequence[Tensor], k: int) -> Tensor:
    return torch.cat([t.reshape(k, -1) for t in tensors], dim=1)


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


class CurvatureOperator:
    """A symmetric linear operator on flat parameter vectors: ``op @ v`` and ``op.matmat(V)``.

    Attributes:
        dim: the number of parameters :math:`P`.
        num_products: operator-vector products computed so far (a ``matmat`` of ``k`` rows
            counts ``k``).
    """

    def __init__(self, params: Sequence[Tensor], *, distributed: bool = False) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError(
                "The curvature operator got no parameters: the model has no parameter with "
                "requires_grad=True and none were passed in `params`. Unfreeze a layer or pass "
                "`params=` explicitly."
            )
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0
        self.distributed = distributed and _distributed_world() > 1

    # -- to be provided by subclasses --------------------------------------------------------
    def _local_matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """The product with one flat vector ``v`` of length :attr:`dim`."""
        return self.matmat(v.reshape(1, -1)).reshape(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """Products with the rows of ``V`` (shape ``(k, dim)``), returned as rows."""
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(f"Expected vectors of shape (k, {self.dim}), got {tuple(V.shape)}.")
        V = V.to(device=self.device, dtype=self.dtype)
        if not self.distributed:
            out = self._local_matmat(V)
        else:
            error: Exception | None = None
            try:
                out = self._local_matmat(V)
            except Exception as exc:  # e.g. out of memory on this rank only
                # Enter the all-reduce anyway, with NaN: every rank then fails together below
                # instead of the others waiting for this one until the collective times out.
                error = exc
                out = torch.full_like(V, float("nan"))
            out = self._allreduce_mean(out)
            if error is not None:
                raise error
            # Tested after the reduction, which carries a NaN/inf from any rank to every rank:
            # a rank raising before it would leave the others waiting in the all-reduce.
            if out.device.type == "cpu" and not bool(torch.isfinite(out).all()):
                raise NonFiniteCurvatureError("A curvature product is not finite (NaN or inf).")
        self.num_products += V.shape[0]
        return out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v.T).T

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Make ``tensor`` equal to rank 0's copy on every rank (a no-op without distribution)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    # -- distribution ---------------------------------------------------------------------------
    def _allreduce_mean(self, out: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - defined by the sample-weighted subclass


class _BatchedCurvature(CurvatureOperator):
    """Shared machinery: batches weighted by sample count, graph reuse or recomputation."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        params: Sequence[Tensor] | None = None,
        keep_graphs: bool = True,
        batched_products: bool | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        distributed: bool = False,
    ) -> None:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, distributed=distributed)
        for p in self.params:
            if not p.requires_grad:  # an explicitly chosen frozen parameter: differentiate anyway
                p.requires_grad_(True)
        if len(batches) == 0:
            raise ValueError("The curvature operator needs at least one batch; got none.")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.keep_graphs = keep_graphs
        # vmap-batched double backward beats a loop on accelerators but not on CPU (measured:
        # 2.34x vs 2.09x a gradient step per vector on a 151k-parameter CNN).
        self.batched_products = (self.device.type != "cpu" if batched_products is None
                                 else batched_products)
        size_fn = batch_size_fn or batch_size_of
        self.sample_counts = [int(size_fn(b)) for b in self.batches]
        for n in self.sample_counts:
            if n < 1:
                raise ValueError(f"Every batch needs at least one sample; got a batch of size {n}.")
        local = float(sum(self.sample_counts))
        self.total_samples = local
        if self.distributed:
            self.total_samples = self._allreduce_sum(
                torch.tensor([local], dtype=torch.float64, device=self.device)
            ).item()
        # Replaying the RNG state before each rebuild fixes dropout masks across products.
        self._rng_states: list[tuple[Tensor, Tensor | None]] = []
        self._graphs: list[Any] = []

        def build_all() -> None:
            for batch in self.batches:
                self._rng_states.append(self._capture_rng())
                graph = self._build(batch)
                if keep_graphs:
                    self._graphs.append(graph)
                else:
                    del graph

        # One agreement for all local batches: ranks may hold different numbers of (micro-)
        # batches, so a collective per batch would pair up mismatched calls across ranks.
        self._agree(build_all)

    # -- graph building -------------------------------------------------------------------------
    def _build(self, batch: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, graph: Any, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss(self, batch: Any) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                "loss_fn(model, batch) must return a scalar tensor, got "
                f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}."
            )
        loss = loss.reshape(())
        if not torch.isfinite(loss):
            raise NonFiniteCurvatureError(f"The loss is not finite ({loss.item()}); no curvature.")
        if not loss.requires_grad:
            raise ValueError(
                "The loss does not depend on the chosen parameters (it has no grad_fn). Check that "
                "loss_fn calls the model and that the parameters require gradients."
            )
        return loss

    def _capture_rng(self) -> tuple[Tensor, Tensor | None]:
        cuda_state = None
        if self.device.type == "cuda":
            cuda_state = torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state(), cuda_state

    @contextlib.contextmanager
    def _replay_rng(self, index: int) -> Iterator[None]:
        cpu_state, cuda_state = self._rng_states[index]
        devices = [self.device] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, self.device)
            yield

    def _agree(self, build: Callable[[], Any]) -> Any:
        """Build a graph; under distribution every rank learns whether any rank failed.

        Without this, one rank raising while the others enter the next collective would hang.
        """
        if not self.distributed:
            return build()
        error: BaseException | None = None
        graph = None
        try:
            graph = build()
        except Exception as exc:  # re-raised below, after the ranks agree
            error = exc
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        if self._allreduce_sum(flag).item() > 0:
            if error is not None:
                raise error
            raise NonFiniteCurvatureError("Another rank failed to build its curvature graph.")
        return graph

    # -- products -------------------------------------------------------------------------------
    def _local_matmat(self, V: Tensor) -> Tensor:
        out: Tensor | None = None
        for i, (batch, n) in enumerate(zip(self.batches, self.sample_counts, strict=True)):
            if self.keep_graphs:
                product = self._apply_rows(self._graphs[i], V)
            else:
                with self._replay_rng(i):
                    graph = self._build(batch)
                product = self._apply_rows(graph, V)
                del graph
            weight = n / self.total_samples
            if out is None:  # no zero-filled accumulator: one batch is the common case
                out = product if weight == 1.0 else product.mul_(weight)
            else:
                out.add_(product, alpha=weight)
        assert out is not None
        # On accelerators this test would synchronise with the host at every product; there a
        # non-finite product surfaces instead in Lanczos' coefficients at its stopping test.
        # A sum is non-finite whenever an entry is (or when huge entries overflow, which are
        # useless anyway), and costs a tenth of isfinite(out).all().
        if (self.device.type == "cpu" and not self.distributed
                and not bool(torch.isfinite(out.sum()))):
            raise NonFiniteCurvatureError("A curvature product is not finite (NaN or inf).")
        return out

    def _apply_rows(self, graph: Any, V: Tensor) -> Tensor:
        if V.shape[0] == 1 or self.batched_products:
            return self._apply(graph, V)
        return torch.cat([self._apply(graph, V[i : i + 1]) for i in range(V.shape[0])])

    def _split(self, V: Tensor) -> list[Tensor]:
        """Rows of ``V`` as per-parameter tensors of shape ``(k, *p.shape)``."""
        k = V.shape[0]
        chunks = torch.split(V, [p.numel() for p in self.params], dim=1)
        return [c.reshape(k, *p.shape) for c, p in zip(chunks, self.params, strict=True)]

    def _grad(self, outputs: Sequence[Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor],
              batched: bool) -> tuple[Tensor, ...]:
        if not batched:
            grads = [g[0] for g in grads]
        result = torch.autograd.grad(
            list(outputs), list(inputs), grad_outputs=list(grads), retain_graph=True,
            allow_unused=True, materialize_grads=True, is_grads_batched=batched,
        )
        if not batched:
            return tuple(r.unsqueeze(0) for r in result)
        return result

    # -- distribution ---------------------------------------------------------------------------
    def _allreduce_sum(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _allreduce_mean(self, out: Tensor) -> Tensor:
        # Each rank's product is already weighted by n_local / N_total: a sum is the mean.
        return self._allreduce_sum(out)


class HessianOperator(_BatchedCurvature):
    r"""Products with the Hessian :math:`\nabla^2_\theta L` of the loss on fixed batches.

    Args:
        model: the network; called by ``loss_fn`` as it is (train or eval mode is the caller's).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batches: one or more batches; the operator is their sample-weighted average.
        params: the parameters to differentiate (default: all with ``requires_grad``).
        keep_graphs: keep each batch's gradient graph for reuse (fast) or rebuild it per
            product (less memory).
        batched_products: compute several products in one vmap-batched backward pass
            (``is_grads_batched``), or one at a time when ``False``. Default: batched on
            accelerators, looped on CPU, where batching is slower.
        batch_size_fn: counts the samples of a batch (default: leading tensor dimension).
        distributed: average over all ranks of the default process group.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> H = HessianOperator(model, loss_fn, [(x, y)])
        >>> H.matvec(torch.ones(H.dim)).shape
        torch.Size([4])
    """

    def _build(self, batch: Any) -> tuple[Tensor, ...]:
        loss = self._loss(batch)
        grads = torch.autograd.grad(
            loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True
        )
        return grads

    def _apply(self, graph: tuple[Tensor, ...], V: Tensor) -> Tensor:
        k = V.shape[0]
        # Gradient entries that do not depend on the parameters contribute nothing to Hv.
        pairs = [(g, v) for g, v in zip(graph, self._split(V), strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(V)
        outputs, grads = zip(*pairs, strict=True)
        hv = self._grad(outputs, self.params, grads, batched=k > 1)
        return _flatten_batched(hv, k)


class GGNOperator(_BatchedCurvature):
    r"""Products with the Generalised Gauss-Newton :math:`J^\top (\nabla_f^2 L) J` on fixed batches.

    The model output :math:`f` is the value returned by the *one* call of ``model(...)`` inside
    ``loss_fn`` (all its tensor leaves when it is a tuple or dict). ``Jv`` uses the double-vjp
    trick on the kept graph: :math:`J v = \partial (J^\top u)^\top v / \partial u`, so no forward
    pass is repeated. Terms of the loss that depend on the parameters other than through
    :math:`f` (e.g. an explicit weight penalty) are not part of the GGN.

    Takes the same arguments as :class:`HessianOperator`.
    """

    def _build(self, batch: Any) -> tuple[list[Tensor], list[Tensor], list[Tensor], tuple[Tensor, ...]]:
        captured: list[Any] = []

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.append(output)

        handle = self.model.register_forward_hook(hook)
        try:
            loss = self._loss(batch)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                "curvature='ggn' needs the model output: loss_fn must call model(...) exactly once, "
                f"but it was called {len(captured)} times. Use curvature='hessian', or write a "
                "loss_fn that computes the loss from a single model(batch) call."
            )
        leaves = [t for t in tree_flatten(captured[0])[0] if isinstance(t, Tensor) and t.requires_grad]
        if not leaves:
            raise ValueError("curvature='ggn': the model output has no tensor that requires grad.")
        dloss_df = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True,
                                       materialize_grads=True)
        dummies = [torch.zeros_like(f, requires_grad=True) for f in leaves]
        jt_dummy = torch.autograd.grad(leaves, self.params, grad_outputs=dummies, create_graph=True,
                                       allow_unused=True, materialize_grads=True)
        return leaves, list(dloss_df), dummies, jt_dummy

    def _apply(self, graph: tuple[list[Tensor], list[Tensor], list[Tensor], tuple[Tensor, ...]],
               V: Tensor) -> Tensor:
        leaves, dloss_df, dummies, jt_dummy = graph
        k = V.shape[0]
        batched = k > 1
        pairs = [(g, v) for g, v in zip(jt_dummy, self._split(V), strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(V)
        outputs, grads = zip(*pairs, strict=True)
        jv = self._grad(outputs, dummies, grads, batched)
        live = [(d, f, u) for d, f, u in zip(dloss_df, leaves, jv, strict=True) if d.requires_grad]
        if not live:  # the loss is linear in the output: the GGN vanishes
            return torch.zeros_like(V)
        d_out, _, u_in = zip(*live, strict=True)
        hjv = self._grad(d_out, leaves, u_in, batched)
        gv = self._grad(leaves, self.params, hjv, batched)
        return _flatten_batched(gv, k)


CURVATURES = ("hessian", "ggn")


def make_operator(
    curvature: str,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    **kwargs: Any,
) -> _BatchedCurvature:
    """The operator for ``curvature`` in ``("hessian", "ggn")``."""
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, batches, **kwargs)
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, batches, **kwargs)
    raise ValueError(
        f"curvature must be one of {CURVATURES}, got {curvature!r}. Use 'hessian' for the full "
        "Hessian or 'ggn' for the Generalised Gauss-Newton."
    )
