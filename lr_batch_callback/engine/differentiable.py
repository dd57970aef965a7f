"""Twice-differentiable paths for operations whose fast kernels have no (or a wrong) double backward.

Curvature products differentiate the backward pass, so every operation in the loss needs a
correct double backward. Measured on torch 2.14.1, several common ones do not:

- ``scaled_dot_product_attention``'s fused kernels (CPU flash; CUDA flash and memory-efficient),
  used by ``nn.MultiheadAttention``, ``nn.TransformerEncoder`` and torchvision's ViT: no double
  backward. The math backend computes the same function with ordinary operations.
- ``Hardsigmoid`` (MobileNetV3's squeeze-excitation gate): no double backward;
  ``relu6(x + 3) / 6`` is the same function and has one.
- ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm``): its double backward is
  wrong (an asymmetric "Hessian"); ``v · g / ‖v‖`` written with plain operations is right.
- cuDNN's RNN kernels: no double backward on CUDA; the native kernels have one.
- sparse embedding gradients (``nn.Embedding(sparse=True)``): sparse tensors cannot be
  differentiated again; the dense gradient is the same derivative.
- reentrant activation checkpointing (``torch.utils.checkpoint(use_reentrant=True)``): its
  backward runs a nested ``backward()`` that ``autograd.grad`` refuses, and is not differentiable
  again. The non-reentrant checkpoint computes the same function and supports double backward.

:func:`twice_differentiable` switches all of these for the duration of a graph build and puts
them back afterwards. Non-reentrant checkpoints re-run their forward inside the backward pass, so
the substitutes must also be in force during every product, not only the graph build (the
operators of :mod:`~lr_batch_callback.engine.operators` re-enter this context for each one).
The substitutions are exact: the forward values are the same functions,
only the kernels differ. They are process-wide while a block runs, like torch's own backend
flags (math attention, cuDNN off): autograd's device threads, where checkpoints recompute, must
see them too. Concurrent and nested blocks are safe (the first to enter installs, the last to
leave restores, under a lock); a thread running meanwhile computes the same functions.

:func:`explain_missing_double_backward` turns PyTorch's raw "derivative for ... is not
implemented" into an error that names the operation and what to do;
:func:`check_second_derivatives` finds custom ``autograd.Function`` s whose backward is marked
``@once_differentiable``, whose second derivative PyTorch silently drops.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MissingDoubleBackwardError", "check_second_derivatives",
           "explain_missing_double_backward", "twice_differentiable"]


class MissingDoubleBackwardError(RuntimeError):
    """An operation in the loss has no second derivative in PyTorch."""


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    out = F.relu6(input + 3.0) / 6.0
    if inplace:
        return input.copy_(out)
    return out


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    # torch._weight_norm(v, g, dim) = v * (g / ||v||), the norm over every dim but ``dim``.
    if dim == -1:
        whole: Tensor = v * (g / v.norm())
        return whole
    dims = [d for d in range(v.dim()) if d != dim]
    per_slice: Tensor = v * (g / v.norm(dim=dims, keepdim=True))
    return per_slice


def _dense(original: Any, sparse_position: int) -> Any:
    """Wrap ``F.embedding``/``F.embedding_bag`` so that ``sparse`` is always ``False``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if "sparse" in kwargs:
            kwargs["sparse"] = False
        elif len(args) > sparse_position:
            args = (*args[:sparse_position], False, *args[sparse_position + 1 :])
        return original(*args, **kwargs)

    return call


class _SharedPatches:
    """Module attributes replaced by substitutes while any thread is inside the block.

    The substitutes must be in force in *every* thread while a block runs: autograd runs the
    backward of CUDA tensors on its own device threads, and a non-reentrant checkpoint re-runs its
    forward there, so a per-thread switch would give those recomputations the originals (a
    silently wrong product). The patching is made safe across threads instead: the attributes
    are installed by the first thread to enter and restored by the last one to leave (a lock
    orders the two, nested and concurrent blocks included), and an attribute the owner only
    inherited (a classmethod of a base class) is deleted again rather than copied onto the owner.
    A thread that trains meanwhile computes the same functions through the substitutes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[tuple[Any, str, bool, Any]] = []  # owner, name, own, original

    def active(self) -> bool:
        """Whether some thread is inside the block (the substitutes are then in force)."""
        return self._users > 0

    @contextlib.contextmanager
    def scope(self, targets: Callable[[], list[tuple[Any, str, Any]]]) -> Iterator[None]:
        """Put the substitutes of ``targets()`` (owner, name, substitute) in force while inside."""
        with self._lock:
            if self._users == 0:
                self._install(targets())
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore()

    def _install(self, targets: list[tuple[Any, str, Any]]) -> None:
        for owner, name, substitute in targets:
            own = name in vars(owner)
            stored = vars(owner)[name] if own else None
            original = getattr(owner, name)
            self._saved.append((owner, name, own, stored))
            dispatch = self._dispatcher(original, substitute)
            setattr(owner, name, staticmethod(dispatch) if isinstance(owner, type) else dispatch)

    def _dispatcher(self, original: Callable[..., Any], substitute: Callable[..., Any]
                    ) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return (substitute if self.active() else original)(*args, **kwargs)

        return call

    def _restore(self) -> None:
        for owner, name, own, stored in reversed(self._saved):
            if own:
                setattr(owner, name, stored)
            else:
                delattr(owner, name)
        self._saved.clear()


_PATCHES = _SharedPatches()


def _non_reentrant(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
    """``CheckpointFunction.apply`` (the reentrant checkpoint) as a non-reentrant checkpoint."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)


def _math_attention() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has only the math path off CUDA
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run a block (a forward pass that will be differentiated twice) on exact substitutes.

    Example:
        >>> x = torch.randn(4, requires_grad=True)
        >>> with twice_differentiable():
        ...     y = torch.nn.functional.hardsigmoid(x * 2).sum()
        ...     (g,) = torch.autograd.grad(y, x, create_graph=True)
        >>> torch.autograd.grad(g.sum(), x)[0].shape  # no "not implemented" error
        torch.Size([4])
    """
    with contextlib.ExitStack() as stack:
        # Kernel choices are torch's process-wide backend flags (no per-thread switch exists):
        # another thread running meanwhile computes the same functions with the math kernels.
        stack.enter_context(_math_attention())
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(_PATCHES.scope(_substitutes))
        yield


def _substitutes() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, substitute) for every Python-level function that is replaced."""
    targets: list[tuple[Any, str, Any]] = [
        (F, "hardsigmoid", _hardsigmoid),
        (torch, "_weight_norm", _weight_norm),
        # F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        (F, "embedding", _dense(F.embedding, 6)),
        # F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode,
        #                 sparse, ...)
        (F, "embedding_bag", _dense(F.embedding_bag, 7)),
    ]
    legacy = sys.modules.get("torch.nn.utils.weight_norm")  # imported the name itself
    if legacy is not None and hasattr(legacy, "_weight_norm"):
        targets.append((legacy, "_weight_norm", _weight_norm))
    checkpointing = sys.modules.get("torch.utils.checkpoint")
    if checkpointing is not None and hasattr(checkpointing, "CheckpointFunction"):
        targets.append((checkpointing.CheckpointFunction, "apply", _non_reentrant))
    return targets


_NOT_IMPLEMENTED = re.compile(r"derivative for (?:aten::)?([\w.:]+) is not implemented")


def explain_missing_double_backward(error: BaseException) -> BaseException:
    """``error`` itself, or a :class:`MissingDoubleBackwardError` naming the operation and the fix.

    The error is rewritten when it is PyTorch's "derivative for X is not implemented" (or a
    sparse-gradient error).
    """
    text = str(error)
    if "use_reentrant=True" in text:
        return MissingDoubleBackwardError(
            "The model uses reentrant activation checkpointing (use_reentrant=True), whose "
            "backward cannot be differentiated again. Checkpoint with use_reentrant=False "
            "(Hugging Face: gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            '{"use_reentrant": False})): it computes the same function and supports curvature '
            f"products. PyTorch said: {text.splitlines()[0]}"
        )
    match = _NOT_IMPLEMENTED.search(text)
    if match:
        op = match.group(1)
        forward = op.removesuffix("_backward")
        return MissingDoubleBackwardError(
            f"The loss uses `{forward}`, whose backward `{op}` has no derivative in PyTorch "
            f"{torch.__version__}, so its curvature cannot be computed (curvature products "
            "differentiate the backward pass). Write that operation with twice-differentiable "
            "operations inside the model (as this library does for Hardsigmoid and attention), "
            "or exclude the parameters before it with `params=` (curvature of the later layers "
            f"only). PyTorch said: {text.splitlines()[0]}"
        )
    if "sparse" in text.lower() and ("layout" in text.lower() or "not implemented" in text.lower()
                                     or "reshape" in text.lower()):
        return MissingDoubleBackwardError(
            "A parameter gets a sparse gradient (e.g. nn.Embedding(sparse=True) called through "
            "something other than torch.nn.functional.embedding), which cannot be differentiated "
            "again. Build the module with sparse=False, or exclude its parameters with `params=`. "
            f"PyTorch said: {text.splitlines()[0]}"
        )
    return error


# The code object every @once_differentiable wrapper shares (the wrapped function is irrelevant).
_ONCE = torch.autograd.function.once_differentiable(lambda _ctx, *grads: grads).__code__
_DELAYED = ("torch::autograd::Error", "torch::autograd::DelayedError")


def _nodes(roots: Sequence[Any]) -> Iterator[Any]:
    """Every autograd node reachable from ``roots`` (grad_fns), each once."""
    stack, seen = [r for r in roots if r is not None], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)


def check_second_derivatives(grads: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
    """Raise if the graph of ``grads`` passes through a backward marked ``@once_differentiable``.

    ``grads`` were built with ``create_graph=True``.
    Such a backward's outputs are detached copies behind a ``DelayedError`` node that PyTorch
    prunes when the parameters are differentiated again, so the second derivative through it is
    silently zero: the "Hessian" would be wrong (and asymmetric), not refused.
    """
    # DelayedError's node is named "torch::autograd::Error" (torch 2.14).
    if not any(n.name() in _DELAYED for n in _nodes([g.grad_fn for g in grads])):
        return
    names = sorted({node._forward_cls.__name__ for node in _nodes([o.grad_fn for o in outputs])
                    if getattr(getattr(getattr(node, "_forward_cls", None), "backward", None),
                               "__code__", None) is _ONCE})
    which = ", ".join(names) if names else "a custom autograd.Function"
    raise MissingDoubleBackwardError(
        f"The loss goes through {which}, whose backward is marked @once_differentiable: PyTorch "
        "treats its second derivative as zero, so curvature products through it would be wrong. "
        "Write that backward with differentiable operations (drop @once_differentiable), or "
        "exclude the parameters before it with `params=` (curvature of the later layers only).")
