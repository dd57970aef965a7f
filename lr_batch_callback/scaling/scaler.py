"""``LRScaler``: a persistent learning-rate factor applied at optimizer-step time.

A step pre-hook multiplies each param group's ``lr`` by its factor and a step post-hook puts the
saved value back. Schedulers therefore keep computing the reference-batch learning rate, the
optimizer uses reference × factor, and checkpoints stay in reference units.

Imports neither Lightning nor the curvature engine.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lr_batch_callback._checks import check_factor
from lr_batch_callback.scaling.optimizers import unwrap_optimizer

__all__ = ["LRScaler"]

# optimizer -> its scaler: weak keys, so that a scaler never keeps an optimizer alive.
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, LRScaler] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Applying a factor at step time
# --------------------------------------------------------------------------------------------


class LRScaler:
    """A persistent learning-rate factor for any ``torch.optim.Optimizer``, applied at step time.

    A step pre-hook saves each param group's ``lr`` and multiplies it by the group's factor; a
    step post-hook puts the saved value back, bit for bit (it is restored, never divided). So
    every scheduler (``LambdaLR``, ``OneCycleLR``, ``CosineAnnealingLR``, ``CyclicLR``,
    ``ReduceLROnPlateau``, ...) keeps computing the reference-batch learning rate, the step
    uses reference × factor, and ``optimizer.state_dict()`` and scheduler checkpoints stay in
    reference units. Works in plain loops, Lightning Fabric and under Lightning.

    - Groups whose factor is exactly ``1.0`` are not touched, so factor 1 is bit-identical to
      no scaler.
    - Tensor learning rates (capturable/fused Adam) are scaled in place; the tensor object is
      kept.
    - Groups added later with ``add_param_group`` get factor ``1.0``.
    - If a step raises between the hooks, the next step (or :meth:`restore`) puts the saved
      value back first, so the factor never compounds. A scheduler stepped *before* that sees
      the scaled value; call :meth:`restore` in your exception handler to avoid it.

    Args:
        optimizer: The optimizer to scale (a wrapper with an ``.optimizer`` attribute, such as
            ``LightningOptimizer``, is unwrapped).
        factor: One factor for every param group, or one per group (finite, > 0).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> scaler = LRScaler(opt, factor=4.0)
        >>> w.grad = torch.ones(1)
        >>> opt.step()  # uses lr 0.4
        >>> w.item(), opt.param_groups[0]["lr"], scaler.effective_lrs()
        (0.6000000238418579, 0.1, [0.4])
        >>> scaler.remove()
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, factor: float | Sequence[float] = 1.0
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        self.optimizer = optimizer
        self._factors: list[float] = self._check_factors(factor, len(optimizer.param_groups))
        # group index -> (saved reference lr, marker of the value written by the pre-hook).
        self._pending: dict[int, tuple[Any, Any]] = {}
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        _ATTACHED[optimizer] = self

    @staticmethod
    def attached_to(optimizer: Any) -> LRScaler | None:
        """The scaler currently hooked into ``optimizer`` (the latest one), or ``None``.

        Lets user code that only sees the optimizer read the LR a step uses (the package's own
        monitor is told about its scaling part instead).
        """
        scaler = _ATTACHED.get(unwrap_optimizer(optimizer))
        return scaler if scaler is not None and scaler.attached else None

    # ---- factors -------------------------------------------------------------------------

    @staticmethod
    def _check_factors(factor: float | Sequence[float], num_groups: int) -> list[float]:
        if isinstance(factor, Sequence) and not isinstance(factor, str):
            if len(factor) != num_groups:
                raise ValueError(
                    f"Got {len(factor)} factors {list(factor)!r} for an optimizer with "
                    f"{num_groups} param groups; pass one factor per group or a single float."
                )
            return [check_factor(f, f"factor[{i}]") for i, f in enumerate(factor)]
        return [check_factor(factor)] * num_groups

    def _factor_of(self, index: int) -> float:
        # Groups added after construction default to 1.0 ("pad on use").
        return self._factors[index] if index < len(self._factors) else 1.0

    @property
    def factors(self) -> list[float]:
        """The factor of each param group (a copy)."""
        return [self._factor_of(i) for i in range(len(self.optimizer.param_groups))]

    @property
    def factor(self) -> float:
        """The factor common to all param groups; assigning sets every group's factor."""
        factors = set(self.factors)
        if len(factors) != 1:
            raise ValueError(
                f"The param groups have different factors {self.factors!r}; read `factors` "
                "for the per-group values."
            )
        return factors.pop()

    @factor.setter
    def factor(self, factor: float) -> None:
        self.set_factor(factor)

    def set_factor(self, factor: float, param_group: int | None = None) -> None:
        """Set the factor of one param group, or of all current groups when ``param_group=None``.

        Takes effect at the next ``optimizer.step()``; the stored ``lr`` values are not touched.

        Args:
            factor: A finite float > 0.
            param_group: Index into ``optimizer.param_groups``, or ``None`` for all groups.
        """
        value = check_factor(factor)
        num_groups = len(self.optimizer.param_groups)
        self._factors = self.factors  # pad for groups added since
        if param_group is None:
            self._factors = [value] * num_groups
            return
        if (
            isinstance(param_group, bool)
            or not isinstance(param_group, numbers.Integral)
            or not 0 <= param_group < num_groups
        ):
            raise ValueError(
                f"param_group must be an index in [0, {num_groups}) or None for all groups, "
                f"got {param_group!r}."
            )
        self._factors[int(param_group)] = value

    def effective_lrs(self) -> list[float]:
        """The learning rate each param group's next step will use: ``lr × factor``."""
        lrs = []
        for i, group in enumerate(self.optimizer.param_groups):
            lr = float(group["lr"])
            # Inside a step (e.g. from a closure) the stored lr is already scaled.
            lrs.append(lr if i in self._pending else lr * self._factor_of(i))
        return lrs

    # ---- hooks ---------------------------------------------------------------------------

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any  # noqa: ARG002
                  ) -> None:
        # (optimizer, args, kwargs) is torch's step pre-hook signature; the step's own arguments
        # do not matter here.
        # Pending values mean the previous step raised after this hook, or this is a nested
        # hooked step (a subclass whose step calls super().step()): restore first so the
        # factor is applied to the reference value, never compounded.
        self.restore()
        for i, group in enumerate(optimizer.param_groups):
            factor = self._factor_of(i)
            if factor == 1.0:
                continue  # untouched: bit-identical to having no scaler
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                # Capturable/fused optimizers (and CUDA graphs) hold on to this tensor: scale it
                # in place. ``_version`` later tells whether someone else wrote to it.
                with torch.no_grad():
                    saved = lr.detach().clone()
                    lr.mul_(factor)
                self._pending[i] = (saved, lr._version)
            elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
                scaled = lr * factor
                group["lr"] = scaled
                self._pending[i] = (lr, scaled)
            else:
                raise TypeError(
                    f"param_groups[{i}]['lr'] is {lr!r}; LRScaler can only scale a float or "
                    "tensor learning rate. Set the factor of this group to 1.0."
                )

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any,  # noqa: ARG002
                   kwargs: Any) -> None:  # noqa: ARG002 - torch's step post-hook signature
        self.restore()

    def restore(self) -> None:
        """Put back the reference ``lr`` values saved by a step that did not finish.

        Called automatically after every step; call it yourself after catching an exception
        raised by ``optimizer.step()`` if you step a scheduler before the next optimizer step.
        A value written meanwhile by someone else (a scheduler) is kept: it is already in
        reference units.
        """
        groups = self.optimizer.param_groups
        for i, (saved, marker) in self._pending.items():
            if i >= len(groups):
                continue
            lr = groups[i]["lr"]
            if isinstance(saved, torch.Tensor):
                if isinstance(lr, torch.Tensor) and lr._version == marker:
                    with torch.no_grad():
                        lr.copy_(saved)
            # Identity, not equality: a scheduler that wrote a new value wrote a new object.
            elif lr is marker:
                groups[i]["lr"] = saved
        self._pending.clear()

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered on the optimizer."""
        return bool(self._handles)

    def remove(self) -> None:
        """Restore any pending ``lr`` values and detach both hooks (idempotent)."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]

    def __enter__(self) -> LRScaler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def state_dict(self) -> dict[str, list[float]]:
        """The per-group factors, the only state needed to resume."""
        return {"factors": self.factors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load factors saved by :meth:`state_dict` (after all param groups have been added)."""
        if "factors" not in state_dict:
            raise ValueError(
                f"state_dict must hold 'factors', got keys {sorted(state_dict)!r}; pass the dict "
                "returned by LRScaler.state_dict()."
            )
        self._factors = self._check_factors(
            list(state_dict["factors"]), len(self.optimizer.param_groups)
        )

    def __repr__(self) -> str:
        return (
            f"LRScaler(optimizer={type(self.optimizer).__name__}, factors={self.factors!r}, "
            f"attached={self.attached})"
        )
