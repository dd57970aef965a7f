"""Finding the kinks a loss's gradient jumps across: the piecewise-linear operations in its graph.

A finite difference of gradients is the curvature only where the gradient is differentiable. A
ReLU, a max-pooling, a clamp or an absolute value makes it jump wherever an input crosses the
kink, and a difference then measures the jump over the step (errors of 2e-2 to 3e2 measured on a
BatchNorm–ReLU–MaxPool CNN, at every step size). Those operations are recognised by their
autograd node names (torch 2.14: ``ReluBackward0``, ``MaxPool2DWithIndicesBackward0``, ...),
counted only where they lie between the loss and a chosen parameter: a kink that no parameter
reaches (on the inputs, in a frozen part) does not move with the parameters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["PiecewiseLinearError", "kinks_on_the_way"]

# Node names without the trailing "Backward<N>": each forward is piecewise linear (or selects
# among its inputs), so its derivative jumps somewhere.
_KINKED = {
    "Relu": "ReLU", "Threshold": "ReLU/threshold", "Hardtanh": "ReLU6/Hardtanh",
    "LeakyRelu": "LeakyReLU", "PreluKernel": "PReLU", "RreluWithNoise": "RReLU",
    "Hardswish": "Hardswish", "Hardsigmoid": "Hardsigmoid", "Hardshrink": "Hardshrink",
    "Softshrink": "Softshrink", "Abs": "abs / L1 loss", "Sgn": "sign", "Sign": "sign",
    "Clamp": "clamp", "ClampMin": "clamp", "ClampMax": "clamp",
    "Maximum": "maximum", "Minimum": "minimum", "Fmax": "fmax", "Fmin": "fmin",
    "Amax": "amax", "Amin": "amin", "Max": "max", "Min": "min",
    "MaxPool2DWithIndices": "max pooling", "MaxPool3DWithIndices": "max pooling",
    "AdaptiveMaxPool2D": "adaptive max pooling", "AdaptiveMaxPool3D": "adaptive max pooling",
    "FractionalMaxPool2D": "fractional max pooling", "FractionalMaxPool3D": "fractional max pooling",
    "MaxUnpool2D": "max unpooling", "MaxUnpool3D": "max unpooling",
    "MultiMarginLoss": "multi-margin loss", "MultilabelMarginLoss": "multilabel margin loss",
    "Sort": "sort", "Topk": "top-k", "Kthvalue": "kth value", "Median": "median",
}


def _kind(node: Any) -> str | None:
    name = node.name().rstrip("0123456789")
    if not name.endswith("Backward"):
        return None
    return _KINKED.get(name.removesuffix("Backward"))


class PiecewiseLinearError(ValueError):
    """The loss is not smooth in the parameters, so finite-difference products would be wrong."""

    @classmethod
    def of(cls, kinks: Counter[str]) -> PiecewiseLinearError:
        """The error naming each kind of kink in ``kinks`` and how often the graph holds it."""
        found = ", ".join(f"{kind} ({count}×)" for kind, count in kinks.most_common())
        return cls(
            f"product='finite_difference' needs a loss whose gradient is smooth in the "
            f"parameters, but it goes through piecewise-linear operations: {found}. Across their "
            "kinks the gradient jumps, and a difference of gradients measures the jump over the "
            "step instead of the curvature (measured 2e-2 to 3e2 off on a ReLU/MaxPool CNN, at "
            "every step). Use product='exact' (double backward), or a smooth activation "
            "(GELU, SiLU, ELU, Softplus) and average pooling.")


def kinks_on_the_way(loss: Tensor, params: Sequence[Tensor] | None) -> Counter[str]:
    """The piecewise-linear operations between ``loss`` and any of ``params``, counted by kind.

    ``params=None``: any leaf that gets a gradient (sharded parameters are not in the graph: the
    forward uses gathered copies).
    """
    wanted = None if params is None else {id(p) for p in params}
    root = loss.grad_fn
    if root is None:
        return Counter()
    # Iterative post-order walk: whether each node reaches a chosen parameter's AccumulateGrad.
    reaches: dict[int, bool] = {}
    kinds: dict[int, str] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if key in reaches and not expanded:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if not expanded:
            reaches.setdefault(key, False)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in reaches)
            continue
        variable = getattr(node, "variable", None)
        hit = variable is not None and (wanted is None or id(variable) in wanted)
        reaches[key] = hit or any(reaches.get(id(c), False) for c in children)
        kind = _kind(node)
        if kind is not None and reaches[key]:
            kinds[key] = kind
    return Counter(kinds.values())
