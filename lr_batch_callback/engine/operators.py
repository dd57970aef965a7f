r"""The curvature of a model's loss on fixed batches, as a :class:`CurvatureOperator`.

Two operators are built from a model, a loss and fixed batches, over the chosen parameters
:math:`\theta` (:math:`P` entries in all):

- :class:`HessianOperator`: :math:`H = \nabla^2_\theta L(\theta)`;
- :class:`GGNOperator`: the Generalised Gauss-Newton :math:`G = J^\top H_f J`, with
  :math:`J = \partial f/\partial\theta` the Jacobian of the model output :math:`f` and
  :math:`H_f = \nabla_f^2 L` (positive semi-definite for convex losses).

For several batches :math:`b` of :math:`n_b` samples, with ``loss_fn`` returning the *mean* loss
of a batch, the operator is the sample-weighted :math:`\sum_b n_b M_b / \sum_b n_b`: the
curvature of the mean loss over all samples (over every rank's samples under
``torch.distributed``). Micro-batches of one batch are weighted by what its loss averages over:
samples, or the valid label tokens of a token-averaged LM loss
(:mod:`~lr_batch_callback.engine.weights`).

The gradient graph of each batch is built once and reused: a product is one backward pass
through the backward graph, :math:`Hv = \partial (g^\top v)/\partial\theta` with
:math:`g = \nabla_\theta L` kept with ``create_graph=True``. ``keep_graphs=False`` rebuilds the
graph for every product instead (less memory), replaying the RNG state so that dropout draws the
same masks: Lanczos needs one fixed operator.

The model operators isolate themselves: each graph build and each product runs inside
:func:`~lr_batch_callback.engine.isolation.isolated` (mode flags, BatchNorm statistics, RNG
streams, ``requires_grad`` and ``.grad`` come back as they were) and on twice-differentiable
kernels (:func:`~lr_batch_callback.engine.differentiable.twice_differentiable`); products run with
gradients on and autocast off. Holding an operator never leaves the model changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lr_batch_callback._checks import check_curvature, check_integer
from lr_batch_callback.engine.batching import BatchSizeFn, batch_size_of
from lr_batch_callback.engine.differentiable import (
    MissingDoubleBackwardError,
    check_second_derivatives,
    explain_missing_double_backward,
    twice_differentiable,
)
from lr_batch_callback.engine.isolation import isolated
from lr_batch_callback.engine.linear_operator import (
    CurvatureOperator,
    NonFiniteCurvatureError,
    fresh_seed,
)
from lr_batch_callback.engine.outputs import OutputSelector, select_output
from lr_batch_callback.engine.precision import autocast_off
from lr_batch_callback.engine.rows import flatten_rows, vjp_rows
from lr_batch_callback.engine.weights import WeightFn, micro_batches

__all__ = [
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "LossFn",
    "NonFiniteCurvatureError",
    "OutputSelector",
    "fresh_seed",
    "make_operator",
]

LossFn = Callable[[nn.Module, Any], Tensor]


# ----------------------------------------------------------------------------------------------
# Operators of a model's loss
# ----------------------------------------------------------------------------------------------


class _ModelCurvature(CurvatureOperator):
    """Shared machinery: isolation, batches weighted by sample count, graph reuse or rebuild."""

    product = "exact"  # how products are computed (engine.products.PRODUCTS)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        params: Sequence[Tensor] | None = None,
        micro_batch_size: int | None = None,
        keep_graphs: bool = True,
        batched_products: bool | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        weight_fn: WeightFn | None = None,
        distributed: bool = False,
    ) -> None:
        chosen = list(params) if params is not None else [p for p in model.parameters()
                                                           if p.requires_grad]
        if not chosen:
            raise ValueError(
                "The curvature operator got no parameters: the model has no parameter with "
                "requires_grad=True and none were passed in `params`. Unfreeze a layer or pass "
                "`params=` explicitly."
            )
        super().__init__(sum(p.numel() for p in chosen), dtype=chosen[0].dtype,
                         device=chosen[0].device, distributed=distributed)
        self.params = chosen
        # Explicitly chosen frozen parameters are differentiated, and frozen again after each
        # use: no object of this module leaves a frozen parameter trainable.
        self._frozen = [p for p in chosen if not p.requires_grad]
        batches = list(batches)
        if not batches:
            raise ValueError("The curvature operator needs at least one batch; got none.")
        size = check_integer(micro_batch_size, "micro_batch_size", allow_none=True)
        self.model = model
        self.loss_fn = loss_fn
        self._graph_checked = False
        self.keep_graphs = keep_graphs
        # vmap-batched double backward beats a loop on accelerators (one batched kernel per
        # operation instead of one per vector) but not on CPU, where the loop is faster.
        self.batched_products = (self.device.type != "cpu" if batched_products is None
                                 else batched_products)
        parts = micro_batches(model, batches, size, count=batch_size_fn or batch_size_of,
                              weight_fn=weight_fn, distributed=distributed, device=self.device)
        self.batches, self.weights, self.sample_counts = parts.batches, parts.weights, parts.samples
        self.total_samples, self.local_samples = parts.total_samples, parts.local_samples
        self.total_tokens = parts.total_tokens
        # Replaying the RNG state before each rebuild fixes dropout masks across products.
        self._rng_states: list[tuple[Tensor, Tensor | None]] = []
        self._graphs: list[Any] = []

        def build_all() -> None:
            for batch in self.batches:
                self._rng_states.append(self._capture_rng())
                graph = self._isolated_build(batch)
                if keep_graphs:
                    self._graphs.append(graph)

        # One agreement for all local batches: ranks may hold different numbers of (micro-)
        # batches, so a collective per batch would pair up mismatched calls across ranks.
        self._agree(build_all)

    def release(self) -> None:
        """Free the kept graphs (the operator cannot be used afterwards)."""
        self._graphs = []
        self.batches = []

    def __enter__(self) -> _ModelCurvature:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # -- graph building -------------------------------------------------------------------------
    def _build(self, batch: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, graph: Any, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def _differentiable(self) -> Iterator[None]:
        """Gradients on, autocast off, the chosen frozen parameters differentiable."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(autocast_off({self.device.type, "cpu"}))
            for p in self._frozen:
                p.requires_grad_(True)
            try:
                yield
            finally:
                for p in self._frozen:
                    p.requires_grad_(False)

    @contextlib.contextmanager
    def _in_force(self) -> Iterator[None]:
        """The build's environment: buffer copies, RNG fork, the twice-differentiable kernels.

        Entered for the graph build *and* for every product: a non-reentrant activation
        checkpoint re-runs its forward inside the backward pass, and that recomputation must
        update copies of the buffers (not BatchNorm's real statistics) and run on the kernels
        the graph was built with (else "recomputed values have different metadata", or a
        silently different function for Hardsigmoid and weight_norm).
        """
        with isolated(self.model), self._differentiable(), twice_differentiable():
            yield

    def _isolated_build(self, batch: Any) -> Any:
        with self._in_force():
            try:
                return self._build(batch)
            except RuntimeError as exc:
                raise explain_missing_double_backward(exc) from exc

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

    def _grad_of(self, outputs: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], **kwargs: Any
                 ) -> tuple[Tensor, ...]:
        """Gradients that must be differentiated again: dense, never sparse."""
        grads = torch.autograd.grad(outputs, list(inputs), create_graph=True, allow_unused=True,
                                    materialize_grads=True, **kwargs)
        # One walk of the parameters' graph per operator (its size is the model's).
        if inputs is self.params and not self._graph_checked:
            check_second_derivatives(grads, [outputs] if isinstance(outputs, Tensor) else outputs)
            self._graph_checked = True
        if any(g.layout != torch.strided for g in grads):
            raise MissingDoubleBackwardError(
                "A parameter gets a sparse gradient, which cannot be differentiated again. Build "
                "the module with sparse=False (nn.Embedding(sparse=True) is converted "
                "automatically), or exclude its parameters with `params=`."
            )
        return grads

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
        """Build graphs; under distribution every rank learns whether any rank failed.

        Without this, one rank raising while the others enter the next collective would hang.
        """
        if not self.distributed:
            return build()
        error: BaseException | None = None
        try:
            build()
        except Exception as exc:  # re-raised below, after the ranks agree
            error = exc
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            if error is not None:
                raise error
            raise NonFiniteCurvatureError("Another rank failed to build its curvature graph.")
        return None

    # -- products -------------------------------------------------------------------------------
    def local_matmat(self, V: Tensor) -> Tensor:
        if not self.batches:
            raise RuntimeError("This curvature operator was released; build a new one.")
        out: Tensor | None = None
        with self._differentiable():
            for i, weight in enumerate(self.weights):
                if self.keep_graphs:
                    with self._in_force():
                        product = self._apply_rows(self._graphs[i], V)
                else:
                    with self._replay_rng(i):
                        graph = self._isolated_build(self.batches[i])
                    with self._in_force():
                        product = self._apply_rows(graph, V)
                    del graph
                if out is None:  # no zero-filled accumulator: one batch is the common case
                    out = product if weight == 1.0 else product.mul_(weight)
                else:
                    out.add_(product, alpha=weight)
        assert out is not None
        # On accelerators this test would synchronise with the host at every product; there a
        # non-finite product surfaces instead in Lanczos' coefficients at its stopping test.
        # A sum is non-finite whenever an entry is, and is much cheaper than isfinite(out).all(),
        # which materialises a boolean tensor of the product's size.
        if (self.device.type == "cpu" and not self.distributed
                and not bool(torch.isfinite(out.sum()))):
            raise NonFiniteCurvatureError("A curvature product is not finite (NaN or inf).")
        return out

    def _apply_rows(self, graph: Any, V: Tensor) -> Tensor:
        try:
            if V.shape[0] == 1 or self.batched_products:
                return self._apply(graph, V)
            return torch.cat([self._apply(graph, V[i : i + 1]) for i in range(V.shape[0])])
        except RuntimeError as exc:
            raise explain_missing_double_backward(exc) from exc

    def _split(self, V: Tensor) -> list[Tensor]:
        """Rows of ``V`` as per-parameter tensors of shape ``(k, *p.shape)``."""
        k = V.shape[0]
        chunks = torch.split(V, [p.numel() for p in self.params], dim=1)
        return [c.reshape(k, *p.shape) for c, p in zip(chunks, self.params, strict=True)]


class HessianOperator(_ModelCurvature):
    r"""Products with the Hessian :math:`\nabla^2_\theta L` of the loss on fixed batches.

    Args:
        model: the network; called by ``loss_fn`` as it is (train or eval mode is the caller's).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batches: one or more batches; the operator is their sample-weighted average.
        params: the parameters to differentiate (default: all with ``requires_grad``).
        micro_batch_size: split each batch into micro-batches of at most this many samples
            (exact for losses that average over samples or tokens without cross-sample terms,
            not for BatchNorm in train mode).
        keep_graphs: keep each batch's gradient graph for reuse (fast) or rebuild it per
            product (less memory).
        batched_products: several products in one vmap-batched backward pass
            (``is_grads_batched``), or a loop. Default: batched on accelerators, looped on CPU.
        batch_size_fn: counts the samples of a batch (default: leading tensor dimension).
        weight_fn: counts what ``loss_fn`` averages over in a micro-batch (e.g. the valid
            tokens of a token-mean loss); default: label tokens of mapping batches with
            ``labels`` (Hugging Face), else samples (see :mod:`~lr_batch_callback.engine.weights`).
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
        return self._grad_of(self._loss(batch), self.params)

    def _apply(self, graph: tuple[Tensor, ...], V: Tensor) -> Tensor:
        k = V.shape[0]
        # Gradient entries that do not depend on the parameters contribute nothing to Hv.
        pairs = [(g, v) for g, v in zip(graph, self._split(V), strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(V)
        outputs, grads = zip(*pairs, strict=True)
        return flatten_rows(vjp_rows(outputs, self.params, grads), k)

class GGNOperator(_ModelCurvature):
    r"""Products with the Generalised Gauss-Newton :math:`J^\top (\nabla_f^2 L) J` on fixed batches.

    The model output :math:`f` comes from the *one* call of ``model(...)`` inside ``loss_fn``:
    by default all its tensors (which must not be computed from one another), or the part
    selected by ``ggn_output``. ``Jv`` uses the double-vjp trick on the kept graph,
    :math:`J v = \partial (J^\top u)^\top v / \partial u`, so no forward pass is repeated. Terms
    of the loss that depend on the parameters other than through :math:`f` (an explicit weight
    penalty, a loss on other outputs) are not part of the GGN.

    Takes the arguments of :class:`HessianOperator`, plus:

    Args:
        ggn_output: the part of the model's return value that is :math:`f`: an index (tuple
            outputs), a key or attribute name (dicts, dataclasses such as Hugging Face's
            ``ModelOutput``), or a function of the return value; ``None``: all its tensors.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], *,
                 ggn_output: OutputSelector = None, **kwargs: Any) -> None:
        self.ggn_output = ggn_output
        super().__init__(model, loss_fn, batches, **kwargs)
        # JᵀH_fJ is positive semi-definite when the loss is convex in f (cross-entropy, squared
        # error, token means of them). Lanczos drops this bound by itself if a Ritz value
        # contradicts it (a loss that is not convex in f).
        self.lower_bound = 0.0

    def _build(self, batch: Any) -> tuple[list[Tensor], list[Tensor], list[Tensor], tuple[Tensor, ...]]:
        captured: list[Any] = []
        handle = self.model.register_forward_hook(lambda _m, _a, out: captured.append(out))
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
        leaves = select_output(captured[0], self.ggn_output)
        if not leaves:
            raise ValueError("curvature='ggn': the model output has no tensor that requires grad.")
        dloss_df = self._grad_of(loss, leaves)
        dummies = [torch.zeros_like(f, requires_grad=True) for f in leaves]
        jt_dummy = self._grad_of(leaves, self.params, grad_outputs=dummies)
        return leaves, list(dloss_df), dummies, jt_dummy

    def _apply(self, graph: tuple[list[Tensor], list[Tensor], list[Tensor], tuple[Tensor, ...]],
               V: Tensor) -> Tensor:
        leaves, dloss_df, dummies, jt_dummy = graph
        k = V.shape[0]
        pairs = [(g, v) for g, v in zip(jt_dummy, self._split(V), strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(V)
        outputs, grads = zip(*pairs, strict=True)
        jv = vjp_rows(outputs, dummies, grads)
        live = [(d, f, u) for d, f, u in zip(dloss_df, leaves, jv, strict=True) if d.requires_grad]
        if not live:  # the loss is linear in the output: the GGN vanishes
            return torch.zeros_like(V)
        d_out, _, u_in = zip(*live, strict=True)
        hjv = vjp_rows(d_out, leaves, u_in)
        return flatten_rows(vjp_rows(leaves, self.params, hjv), k)


def make_operator(curvature: str, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                  **kwargs: Any) -> _ModelCurvature:
    """The operator for ``curvature`` in ``("hessian", "ggn")``; ``kwargs`` as the classes take."""
    check_curvature(curvature)
    if curvature == "hessian":
        kwargs.pop("ggn_output", None)
        return HessianOperator(model, loss_fn, batches, **kwargs)
    return GGNOperator(model, loss_fn, batches, **kwargs)
