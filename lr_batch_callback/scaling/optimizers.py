"""Which optimizers are Adam-family (square-root rule) and which SGD-family (linear rule).

Imports neither Lightning nor the curvature engine.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ADAPTIVE_OPTIMIZERS", "is_adaptive", "unwrap_optimizer"]

#: Optimizers that divide by a running estimate of the squared gradient (or a similar
#: curvature proxy), for which the square-root rule applies.
ADAPTIVE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(
    cls
    for cls in (
        getattr(torch.optim, name, None)
        for name in (
            "Adam",
            "AdamW",
            "Adamax",
            "NAdam",
            "RAdam",
            "Adagrad",
            "Adadelta",
            "Adafactor",
            "RMSprop",
            "SparseAdam",
        )
    )
    if cls is not None  # Adafactor only exists from torch 2.5 on
)

# Plain gradient steps (with or without momentum / averaging / line search): the linear rule.
_SGD_FAMILY: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.ASGD,
    torch.optim.LBFGS,
)
# Substrings of class names, as timm matches them ("ada" also catches Adafactor, AdaBelief, ...).
_ADAPTIVE_NAME_PARTS = ("adam", "lamb", "ada")
_SGD_NAME_PARTS = ("sgd", "lars", "momentum")



def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a wrapper with an ``.optimizer`` attribute, or the argument itself.

    Such a wrapper is Lightning's ``LightningOptimizer``.
    """
    # Wrappers such as Lightning's LightningOptimizer keep the real optimizer in ``.optimizer``;
    # duck-typed so that this module never imports Lightning.
    if not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return optimizer



def is_adaptive(optimizer: Any) -> bool | None:
    """Whether an optimizer belongs to the Adam family (√ rule) or the SGD family (linear rule).

    Known torch classes (and their subclasses) are matched first; otherwise the class names along
    the MRO are matched case-insensitively: names containing ``"adam"``, ``"lamb"`` or ``"ada"``
    are adaptive (timm's convention), names containing ``"sgd"``, ``"lars"`` or ``"momentum"``
    are SGD-family.

    Args:
        optimizer: An optimizer instance or class (a wrapper with an ``.optimizer`` attribute,
            such as Lightning's ``LightningOptimizer``, is unwrapped).

    Returns:
        ``True`` for adaptive, ``False`` for SGD-family, ``None`` when unknown (e.g. ``Rprop``,
        which is sign-based, or ``Muon``).

    Example:
        >>> import torch
        >>> params = [torch.nn.Parameter(torch.zeros(1))]
        >>> is_adaptive(torch.optim.AdamW(params)), is_adaptive(torch.optim.SGD(params, lr=0.1))
        (True, False)
        >>> print(is_adaptive(torch.optim.Rprop(params)))
        None
    """
    optimizer = unwrap_optimizer(optimizer)
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer or klass is object:
            break
        if klass in ADAPTIVE_OPTIMIZERS:
            return True
        if klass in _SGD_FAMILY:
            return False
        name = klass.__name__.lower()
        if any(part in name for part in _ADAPTIVE_NAME_PARTS):
            return True
        if any(part in name for part in _SGD_NAME_PARTS):
            return False
    return None
