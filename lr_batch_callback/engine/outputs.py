"""Which part of a model's return value is the network output :math:`f` of the GGN.

``J^T H_f J`` needs the output the loss consumes. A model may return several tensors (logits and
features, a dict with hidden states): by default all of them are :math:`f`, which is only right
when none is computed from another; :func:`select_output` refuses dependent outputs unless the
caller names the one the loss uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["OutputSelector", "select_output"]

#: Which part of a model's return value is the output :math:`f` of the GGN: an index, a key or
#: attribute name, or a function of the return value.
OutputSelector = int | str | Callable[[Any], Tensor] | None


def select_output(output: Any, selector: OutputSelector) -> list[Tensor]:
    """The tensors of a model's return value that are the GGN's output :math:`f`."""
    if selector is None:
        leaves = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.requires_grad]
        _check_independent(leaves)
        return leaves
    chosen: Any
    if callable(selector):
        chosen = selector(output)
    elif isinstance(selector, str):
        chosen = output[selector] if isinstance(output, dict) else getattr(output, selector, None)
    else:
        chosen = output[selector]
    if not isinstance(chosen, Tensor) or not chosen.requires_grad:
        raise ValueError(
            f"ggn_output={selector!r} selected {type(chosen).__name__}, not a tensor that depends "
            "on the parameters. Name the model output the loss is computed from."
        )
    return [chosen]


def _graph_nodes(tensor: Tensor) -> set[Any]:
    seen: set[Any] = set()
    stack = [tensor.grad_fn] if tensor.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(parent for parent, _ in node.next_functions if parent is not None)
    return seen


def _check_independent(leaves: list[Tensor]) -> None:
    """Refuse outputs of which one is computed from another (e.g. ``(logits, features)``)."""
    if len(leaves) < 2:
        return
    graphs = [_graph_nodes(t) for t in leaves]
    for i, leaf in enumerate(leaves):
        for j, other in enumerate(graphs):
            if i != j and leaf.grad_fn is not None and leaf.grad_fn in other:
                raise ValueError(
                    f"curvature='ggn': the model returns {len(leaves)} tensors and output {i} "
                    f"(shape {tuple(leaf.shape)}) is an ancestor of output {j} (shape "
                    f"{tuple(leaves[j].shape)}), e.g. (logits, features): treating both as the "
                    "network output f would count the same path twice. Say which one the loss is "
                    "computed from with ggn_output= (an index, a key, or a function of the output), "
                    "e.g. ggn_output=0."
                )
