"""The guard that makes a curvature estimate invisible to training.

Everything an estimate could disturb is saved on entry and put back on exit, also when the
estimate raises (``KeyboardInterrupt`` included):

- the ``training`` flag of every submodule (models may mix train and eval submodules);
- every buffer (BatchNorm ``running_mean``/``running_var``/``num_batches_tracked``, spectral-norm
  vectors, ...): inside the block each module holds a *copy* of its buffers, and the originals
  are put back on exit, never written to. So statistics updated by a train-mode forward go to
  the copies (which graphs built inside keep alive: BatchNorm's backward reads them), and a
  caller's live graph that saved an original (eval-mode BatchNorm) stays valid;
- the RNG streams: torch's CPU generator, every initialised CUDA device's generator, Python's
  ``random`` and NumPy's global state;
- ``requires_grad`` of every parameter and the identity of every ``.grad`` tensor.

Inside, gradients are enabled, inference mode and autocast are off (products are computed in the
parameters' own dtype, never in a lower autocast precision) and ``torch.compile``d code runs eagerly
because compiled graphs do not support double backward.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lr_batch_callback.engine.precision import autocast_off

__all__ = ["autocast_off", "isolated"]


def _eager_stance() -> contextlib.AbstractContextManager[Any]:
    if "torch._dynamo" not in sys.modules:
        # Nothing was compiled, and importing dynamo just to say so is slow.
        return contextlib.nullcontext()
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:  # torch < 2.6: nothing to do, compiled modules raise and are reported
        return contextlib.nullcontext()
    try:
        stance: contextlib.AbstractContextManager[Any] = set_stance("force_eager")
        return stance
    except Exception:  # pragma: no cover - defensive: stance API changed
        return contextlib.nullcontext()


def _cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (``torch.cuda.is_initialized``, unannotated)."""
    initialized: Callable[[], bool] = torch.cuda.is_initialized
    return initialized()


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` free to be used for a curvature estimate, then undo every trace.

    The block may call ``model`` in train mode (BatchNorm uses batch statistics, dropout draws
    masks): running statistics, counters and RNG streams are restored afterwards, bit for bit.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = model[1].running_mean.clone()
        >>> with isolated(model):
        ...     _ = model(torch.randn(8, 3))
        >>> torch.equal(model[1].running_mean, before)
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    device_types = ({t.device.type for t in params} | {b[2].device.type for b in buffers}
                    | {"cpu"})

    cuda_devices: list[int] = []
    # is_initialized first: is_available loads NVML on a CUDA build without a GPU.
    if _cuda_initialized() and torch.cuda.is_available():
        cuda_devices = list(range(torch.cuda.device_count()))
    python_state = random.getstate()
    numpy_state = np.random.get_state()

    try:
        with torch.no_grad():
            for module, name, buffer in buffers:
                module._buffers[name] = buffer.detach().clone()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(autocast_off(device_types))
            stack.enter_context(_eager_stance())
            yield
    finally:
        for module, name, buffer in buffers:
            module._buffers[name] = buffer
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in zip(params, requires_grad, grads, strict=True):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
        random.setstate(python_state)
        np.random.set_state(numpy_state)
