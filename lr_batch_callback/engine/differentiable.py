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
only the kernels differ. (Module-level functions are patched while the block runs, so another
thread calling them at the same time sees the substitutes too.)

:func:`explain_missing_double_backward` turns PyTorch's raw "derivative for ... is not
implemented" into an error that names the operation and what to do;
:func:`check_second_derivatives` finds custom ``autograd.Function`` s whose backward is marked
``@once_differentiable``, whose second derivative PyTorch silently drops.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
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
        return v * (g / v.norm())
    dims = [d for d in range(v.dim()) if d != dim]
    return v * (g / v.norm(dim=dims, keepdim=True))


def _dense(original: Any, sparse_position: int) -> Any:
    """Wrap ``F.embedding``/``F.embedding_bag`` so that ``sparse`` is always ``False``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if "sparse" in kwargs:
            kwargs["sparse"] = False
        elif len(args) > sparse_position:
            args = (*args[:sparse_position], False, *args[sparse_position + 1 :])
        return original(*args, **kwargs)

    return call


@contextlib.contextmanager
def _patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    # Restore what the owner itself held: an inherited attribute (a classmethod of a base class)
    # is deleted again rather than copied onto the owner as a bound method.
    own = name in vars(owner)
    original = vars(owner)[name] if own else None
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


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
        stack.enter_context(_math_attention())
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(_patched(F, "hardsigmoid", _hardsigmoid))
        stack.enter_context(_patched(torch, "_weight_norm", _weight_norm))
        legacy = sys.modules.get("torch.nn.utils.weight_norm")  # imported the name itself
        if legacy is not None and hasattr(legacy, "_weight_norm"):
            stack.enter_context(_patched(legacy, "_weight_norm", _weight_norm))
        # F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        stack.enter_context(_patched(F, "embedding", _dense(F.embedding, 6)))
        # F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode,
        #                 sparse, ...)
        stack.enter_context(_patched(F, "embedding_bag", _dense(F.embedding_bag, 7)))
        checkpointing = sys.modules.get("torch.utils.checkpoint")
        if checkpointing is not None and hasattr(checkpointing, "CheckpointFunction"):
            stack.enter_context(_patched(checkpointing.CheckpointFunction, "apply",
                                         staticmethod(_non_reentrant)))
        yield


_NOT_IMPLEMENTED = re.compile(r"derivative for (?:aten::)?([\w.:]+) is not implemented")


def explain_missing_double_backward(error: BaseException) -> BaseException:
    """``error`` itself, or a :class:`MissingDoubleBackwardError` naming the operation and the fix
    when it is PyTorch's "derivative for X is not implemented" (or a sparse-gradient error)."""
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


_ONCE = torch.autograd.function.once_differentiable(lambda ctx, *grads: grads).__code__
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
    """Raise if the graph of ``grads`` (built with ``create_graph=True``) passes through a
    backward marked ``@once_differentiable``.

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
