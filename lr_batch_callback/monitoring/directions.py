r"""The directions an optimizer's next step takes, per unit of its learning rate, without stepping.

Critical sharpness (:mod:`~lr_batch_callback.engine.critical`) is measured along two directions:

- **the (preconditioned) gradient**: :math:`-g` for SGD-family optimizers, :math:`-P^{-1} g` with
  Adam's :math:`P = \sqrt{\hat v} + \epsilon` for Adam-family ones: the step without momentum;
- **the actual update** :math:`\Delta\theta / \eta`: what ``optimizer.step()`` would do with
  gradient :math:`g`, momentum, weight decay and bias corrections included, computed from a copy
  of the update rule (SGD, Adam, AdamW; ``None`` for other optimizers) so that the optimizer's
  state is never touched and no step hook runs.

Both are scaled per parameter group by ``group_lr / lr``, so a step :math:`\eta` along them is
the optimizer's step at learning rate :math:`\eta` in the first group. Under FSDP2 the
parameters and the optimizer's state are sharded ``DTensor`` s: the directions are then each
rank's rows, computed from the local shards of the state (the update rules are elementwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lr_batch_callback.scaling.optimizers import is_adaptive

__all__ = ["adam_preconditioner", "gradient_direction", "update_direction"]


def _local(t: Tensor) -> Tensor:
    """This rank's rows of a sharded ``DTensor``; any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    local: Tensor = to_local() if callable(to_local) else t
    return local


def _groups(optimizer: torch.optim.Optimizer,
            params: Sequence[Tensor]) -> list[dict[str, Any]] | None:
    """The param group of each of ``params`` (``None`` if one is not in the optimizer)."""
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    groups: list[dict[str, Any]] = []
    for p in params:
        group = owner.get(id(p))
        if group is None:
            return None
        groups.append(group)
    return groups


def _lr_ratios(groups: list[dict[str, Any]]) -> list[float]:
    first = float(groups[0]["lr"]) if groups and float(groups[0]["lr"]) else 1.0
    return [float(g["lr"]) / first for g in groups]


def gradient_direction(optimizer: torch.optim.Optimizer | None, params: Sequence[Tensor],
                       gradient: Sequence[Tensor]) -> list[Tensor] | None:
    r"""The step without momentum: :math:`-g` (SGD family) or :math:`-P^{-1}g` (Adam family).

    The Adam-family direction needs a second moment. ``None`` when the optimizer's family or
    state does not say which.
    """
    if optimizer is None:
        return [-g for g in gradient]
    groups = _groups(optimizer, params)
    adaptive = is_adaptive(optimizer)
    if groups is None or adaptive is None:
        return None
    ratios = _lr_ratios(groups)
    if not adaptive:
        return [-g * r for g, r in zip(gradient, ratios, strict=True)]
    scale = adam_preconditioner(optimizer, list(params))  # P^{-1/2}, flat
    if scale is None:
        return None
    sizes = [g.numel() for g in gradient]
    return [-g * s.reshape(g.shape).to(g) ** 2 * r
            for g, s, r in zip(gradient, torch.split(scale, sizes), ratios, strict=True)]


def update_direction(optimizer: torch.optim.Optimizer | None, params: Sequence[Tensor],
                     gradient: Sequence[Tensor]) -> list[Tensor] | None:
    r"""The update :math:`\Delta\theta/\eta` of ``optimizer``'s next step with gradient ``gradient``.

    For SGD, Adam and AdamW (their subclasses included); ``None`` for other optimizers.
    """
    if optimizer is None:
        return None
    groups = _groups(optimizer, params)
    if groups is None:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        step = _sgd_update
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        step = _adam_update
    else:
        return None
    out = []
    for p, g, group, ratio in zip(params, gradient, groups, _lr_ratios(groups), strict=True):
        local = _local(p.detach())
        out.append(step(optimizer, p, g.reshape(local.shape).to(local), group) * ratio)
    return out


def _sgd_update(optimizer: torch.optim.Optimizer, p: Tensor, g: Tensor,
                group: dict[str, Any]) -> Tensor:
    r"""The update of torch.optim.SGD per unit LR.

    With :math:`g' = \pm g + \text{wd}\,\theta` and :math:`b' = \mu b + (1-\tau) g'`, the step
    is :math:`-b'` (or :math:`-(g' + \mu b')` with Nesterov).
    """
    g = -g if group.get("maximize", False) else g
    if group.get("weight_decay", 0.0):
        g = g + group["weight_decay"] * _local(p.detach())
    momentum = group.get("momentum", 0.0)
    if momentum:
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        buf = g.clone() if buf is None else momentum * _local(buf) + (1 - group.get("dampening", 0.0)) * g
        g = g + momentum * buf if group.get("nesterov", False) else buf
    return -g


def _adam_update(optimizer: torch.optim.Optimizer, p: Tensor, g: Tensor,
                 group: dict[str, Any]) -> Tensor:
    r"""The update of torch.optim.Adam/AdamW per unit LR.

    It is :math:`-\hat m'/(\sqrt{\hat v'} + \epsilon)`, minus :math:`\text{wd}\,\theta` when
    the decay is decoupled (AdamW).
    """
    beta1, beta2 = group["betas"]
    eps, decay = group["eps"], group.get("weight_decay", 0.0)
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    g = -g if group.get("maximize", False) else g
    theta = _local(p.detach())
    if decay and not decoupled:
        g = g + decay * theta
    state = {k: _local(v) if isinstance(v, Tensor) else v
             for k, v in optimizer.state.get(p, {}).items()}
    step = float(state.get("step", 0)) + 1
    m = beta1 * state.get("exp_avg", torch.zeros_like(theta)) + (1 - beta1) * g
    v = beta2 * state.get("exp_avg_sq", torch.zeros_like(theta)) + (1 - beta2) * g * g
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        v = torch.maximum(state["max_exp_avg_sq"], v)
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    update: Tensor = -m_hat / (v_hat.sqrt() + eps)
    if decay and decoupled:
        update = update - decay * theta
    return update


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> Tensor | None:
    r"""The preconditioner :math:`P^{-1/2}` of Adam-family optimizers, one flat vector over ``params``.

    It is :math:`1/\sqrt{\sqrt{\hat v} + \epsilon}` with :math:`\hat v = v/(1-\beta_2^t)`;
    ``None`` when the optimizer holds no second-moment estimate for every parameter (before its
    first step, or not Adam-like).
    """
    parts = []
    for group in optimizer.param_groups:
        beta2 = group.get("betas", (0.9, 0.999))[1]
        eps = group.get("eps", 1e-8)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state or "step" not in state:
                continue
            step = float(_local(state["step"]) if isinstance(state["step"], Tensor)
                         else state["step"])
            v_hat = _local(state["exp_avg_sq"]) / (1 - beta2**step)
            parts.append((p, (v_hat.sqrt() + eps).rsqrt()))
    lookup = {id(p): scale for p, scale in parts}
    if any(id(p) not in lookup for p in params):
        return None
    return torch.cat([lookup[id(p)].reshape(-1) for p in params])
