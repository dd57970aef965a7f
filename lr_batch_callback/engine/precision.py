"""The arithmetic curvature algorithms run in: the operands' own dtype, never autocast's.

A leaf module: the Lanczos kernel and the model operators both need it, and the kernel must not
depend on the model machinery (isolation, substitutes, batching) to get it.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_off"]


def autocast_off(device_types: set[str]) -> contextlib.ExitStack:
    """Autocast disabled on each of ``device_types`` (products in the parameters' own dtype)."""
    stack = contextlib.ExitStack()
    for device_type in sorted(device_types):
        if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
            with contextlib.suppress(RuntimeError):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack
