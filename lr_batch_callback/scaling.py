"""Learning-rate scaling rules for a change of batch size, and the hook that applies them.

A rule maps a change of (effective) batch size ``B_old → B_new`` to a multiplicative factor on
the learning rate:

- ``"linear"``: ``B_new / B_old`` — SGD in the noise-dominated regime (Goyal et al. 2017);
- ``"sqrt"``: ``√(B_new / B_old)`` — Adam-family optimizers, whose ``1/√v`` preconditioner
  tracks the batch curvature (Malladi et al. 2022; Granziol et al. 2022);
- ``"none"``: ``1``;
- ``"auto"``: ``"sqrt"`` for adaptive optimizers, ``"linear"`` otherwise (timm's convention);
- ``"curvature"``: ``λ(B_old) / λ(B_new)`` for SGD and its square root for adaptive optimizers,
  where ``λ(B)`` is the top eigenvalue of the batch Hessian predicted by a fitted law
  ``λ(B) = a + c (1/B − 1/N)`` (Granziol, Zohren & Roberts, arXiv 2006.09092). It equals the
  linear/√ rule while noise dominates (``B ≪ B* = c/a``) and saturates past ``B*``, where the
  fixed rules are known to overshoot.

:class:`LRScaler` applies a factor to any :class:`torch.optim.Optimizer` *at step time*: a step
pre-hook multiplies each param group's ``lr`` and a step post-hook puts the saved value back.
Schedulers therefore keep computing the reference-batch learning rate, the optimizer uses
reference × factor, and checkpoints stay in reference units.

This module imports neither Lightning nor the curvature engine.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "FIXED_RULES",
    "RULES",
    "CurvatureRule",
    "LRScaler",
    "ScalingRule",
    "is_adaptive",
    "resolve_rule",
    "scaling_factor",
]

#: Rules that need nothing but the two batch sizes (accepted by :func:`scaling_factor`).
FIXED_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
#: Every rule name :func:`resolve_rule` accepts.
RULES: tuple[str, ...] = (*FIXED_RULES, "auto", "curvature")

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

# Optimizer classes "auto" already warned about: one warning per class, not one per resize.
_warned_auto_classes: set[type] = set()


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_batch_size(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` ≥ 1, or raise naming the bad value."""
    # bool is an int subclass, but ``True`` as a batch size is always a bug.
    if isinstance(value, bool):
        raise ValueError(
            f"{name} must be an integer >= 1, got the bool {value!r}; pass the batch size itself."
        )
    if isinstance(value, numbers.Integral):
        size = int(value)
    elif isinstance(value, numbers.Real):
        # Integral floats (e.g. 256.0 from a YAML file or a division) are accepted.
        as_float = float(value)
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise ValueError(
                f"{name} must be an integer >= 1, got {value!r}; a batch size counts samples, "
                "so round it to a whole number."
            )
        size = int(as_float)
    else:
        raise TypeError(
            f"{name} must be an integer >= 1, got {value!r} of type {type(value).__name__}; "
            "pass an int."
        )
    if size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return size


def _check_factor(value: object, name: str = "factor") -> float:
    """Return ``value`` as a finite ``float`` > 0, or raise naming the bad value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a finite real number > 0, got {value!r} of type "
            f"{type(value).__name__}."
        )
    factor = float(value)
    if not math.isfinite(factor) or factor <= 0.0:
        raise ValueError(
            f"{name} must be a finite real number > 0, got {value!r}; a learning-rate factor "
            "multiplies the learning rate, so it cannot be zero, negative, inf or nan."
        )
    return factor


def _fixed_factor(rule: str, old: int, new: int) -> float:
    if rule == "linear":
        return new / old
    if rule == "sqrt":
        return math.sqrt(new / old)
    return 1.0


def _unwrap_optimizer(optimizer: Any) -> Any:
    # Wrappers such as Lightning's LightningOptimizer keep the real optimizer in ``.optimizer``;
    # duck-typed so that this module never imports Lightning.
    if not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return optimizer


# --------------------------------------------------------------------------------------------
# Fixed rules
# --------------------------------------------------------------------------------------------


def scaling_factor(rule: str, old_batch_size: int, new_batch_size: int) -> float:
    r"""Learning-rate factor of a fixed scaling rule for a batch-size change.

    .. math::

        f_\text{linear} = \frac{B_\text{new}}{B_\text{old}}, \qquad
        f_\text{sqrt} = \sqrt{\frac{B_\text{new}}{B_\text{old}}}, \qquad
        f_\text{none} = 1.

    Args:
        rule: ``"linear"`` (SGD-family), ``"sqrt"`` (Adam-family) or ``"none"``.
        old_batch_size: The batch size the learning rate was tuned for (an integer ≥ 1).
        new_batch_size: The batch size that will be used (an integer ≥ 1).

    Returns:
        The factor to multiply the learning rate by.

    Raises:
        ValueError: For an unknown rule, for ``"auto"``/``"curvature"`` (they need the
            optimizer or a fitted law: use :func:`resolve_rule`), or for a batch size that is
            not an integer ≥ 1.
        TypeError: If ``rule`` is not a string or a batch size is not a number.

    Example:
        >>> scaling_factor("linear", 32, 128)
        4.0
        >>> scaling_factor("sqrt", 32, 128)
        2.0
        >>> scaling_factor("sqrt", 128, 32)
        0.5
    """
    if not isinstance(rule, str):
        raise TypeError(
            f"rule must be one of {FIXED_RULES}, got {rule!r} of type {type(rule).__name__}; "
            "for a callable rule use resolve_rule(rule)(old_batch_size, new_batch_size)."
        )
    if rule == "auto":
        raise ValueError(
            "rule='auto' chooses between 'linear' and 'sqrt' from the optimizer, which "
            "scaling_factor does not see; use resolve_rule('auto', optimizer)(old, new) or pass "
            "'linear'/'sqrt' explicitly."
        )
    if rule == "curvature":
        raise ValueError(
            "rule='curvature' needs a fitted batch-size law λ(B); use "
            "resolve_rule('curvature', optimizer) and set its .law, CurvatureRule(adaptive, law), "
            "or BatchSizeLRCallback(rule='curvature'), which measures the law during training."
        )
    if rule not in FIXED_RULES:
        raise ValueError(f"Unknown rule {rule!r}; accepted rules are {FIXED_RULES}.")
    old = _check_batch_size(old_batch_size, "old_batch_size")
    new = _check_batch_size(new_batch_size, "new_batch_size")
    return _fixed_factor(rule, old, new)


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
    optimizer = _unwrap_optimizer(optimizer)
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


# --------------------------------------------------------------------------------------------
# Rule objects
# --------------------------------------------------------------------------------------------


class ScalingRule:
    """A batch-size → learning-rate-factor rule: ``rule(old_batch_size, new_batch_size)``.

    Calling a rule validates both batch sizes (integers ≥ 1) and the returned factor (finite,
    > 0). Subclasses implement :meth:`_factor`. Obtain one with :func:`resolve_rule`.

    Attributes:
        name: ``"linear"``, ``"sqrt"``, ``"none"``, ``"curvature"`` or a user callable's name.

    Example:
        >>> rule = resolve_rule("linear")
        >>> rule.name, rule(64, 256)
        ('linear', 4.0)
    """

    name: str

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, old_batch_size: int, new_batch_size: int) -> float:
        """Return the learning-rate factor for ``old_batch_size → new_batch_size``."""
        old = _check_batch_size(old_batch_size, "old_batch_size")
        new = _check_batch_size(new_batch_size, "new_batch_size")
        value = self._factor(old, new)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"Scaling rule {self.name!r} returned {value!r} for {old} -> {new}; a rule must "
                "return a finite float > 0."
            )
        factor = float(value)
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(
                f"Scaling rule {self.name!r} returned {value!r} for {old} -> {new}; a rule must "
                "return a finite float > 0 (a learning-rate multiplier)."
            )
        return factor

    def _factor(self, old: int, new: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _FixedRule(ScalingRule):
    def _factor(self, old: int, new: int) -> float:
        return _fixed_factor(self.name, old, new)


class _CallableRule(ScalingRule):
    def __init__(self, fn: Callable[[int, int], float]) -> None:
        super().__init__(getattr(fn, "__name__", None) or repr(fn))
        self.fn = fn

    def _factor(self, old: int, new: int) -> float:
        return self.fn(old, new)


class CurvatureRule(ScalingRule):
    r"""The measured-curvature rule: scale by the ratio of batch-Hessian top eigenvalues.

    With ``λ(B)`` the top eigenvalue of the batch Hessian at batch size ``B`` (predicted by
    ``law.predict``), stability of SGD on the local quadratic gives ``lr_max(B) = 2/λ(B)``,
    and Adam's ``1/√v`` preconditioner turns that into ``lr_max ∝ 1/√λ(B)``:

    .. math::

        f_\text{SGD} = \frac{\lambda(B_\text{old})}{\lambda(B_\text{new})}, \qquad
        f_\text{adaptive} = \sqrt{\frac{\lambda(B_\text{old})}{\lambda(B_\text{new})}}.

    For the law ``λ(B) = a + c (1/B − 1/N)`` the factor reduces to the linear (√) rule where
    noise dominates, ``B ≪ B* = c/a``, and saturates (→ 1) past the critical batch size ``B*``.

    While :attr:`law` is ``None`` (not fitted yet), and whenever the law predicts a λ that is not
    finite and > 0, the fixed rule is used instead: linear, or √ when ``adaptive``. The latter
    case warns once per law.

    Args:
        adaptive: Whether the optimizer is Adam-family (√ of the eigenvalue ratio).
        law: Any object with ``predict(batch_size: float) -> float`` giving ``λ(B)``, or
            ``None``. Settable later through the :attr:`law` attribute.

    Example:
        >>> class Law:
        ...     def predict(self, batch_size):
        ...         return 35.0 + 354.0 * (1 / batch_size - 1 / 1797)
        >>> rule = CurvatureRule(adaptive=False)
        >>> rule(8, 32)  # no law yet: linear
        4.0
        >>> rule.law = Law()
        >>> # B* = c/a ≈ 10, so both changes are past it; linear would give 4.0 and 2.0.
        >>> round(rule(8, 32), 3), round(rule(512, 1024), 3)
        (1.724, 1.01)
    """

    def __init__(self, adaptive: bool, law: object | None = None) -> None:
        super().__init__("curvature")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}.")
        self.adaptive = adaptive
        self._warned = False
        self.law = law

    @property
    def law(self) -> object | None:
        """The fitted law (an object with ``predict(batch_size)``), or ``None``."""
        return self._law

    @law.setter
    def law(self, law: object | None) -> None:
        if law is not None and not callable(getattr(law, "predict", None)):
            raise TypeError(
                f"law must have a predict(batch_size) -> float method (e.g. a fitted "
                f"BatchSizeLaw) or be None, got {law!r}."
            )
        self._law = law
        self._warned = False  # a new law deserves its own warning

    @property
    def fallback(self) -> str:
        """The fixed rule used without a usable law: ``"sqrt"`` if adaptive, else ``"linear"``."""
        return "sqrt" if self.adaptive else "linear"

    def _factor(self, old: int, new: int) -> float:
        if self._law is None:
            return _fixed_factor(self.fallback, old, new)
        lam_old = float(self._law.predict(float(old)))  # type: ignore[attr-defined]
        lam_new = float(self._law.predict(float(new)))  # type: ignore[attr-defined]
        if not all(math.isfinite(lam) and lam > 0.0 for lam in (lam_old, lam_new)):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"The curvature law {self._law!r} predicted λ({old}) = {lam_old!r} and "
                    f"λ({new}) = {lam_new!r}; eigenvalue ratios need finite values > 0, so the "
                    f"{self.fallback!r} rule is used instead. Refit the law on more batch sizes "
                    "or choose rule='linear'/'sqrt' explicitly.",
                    UserWarning,
                    stacklevel=3,
                )
            return _fixed_factor(self.fallback, old, new)
        ratio = lam_old / lam_new
        return math.sqrt(ratio) if self.adaptive else ratio

    def __repr__(self) -> str:
        return f"CurvatureRule(adaptive={self.adaptive}, law={self._law!r})"


def resolve_rule(
    rule: str | ScalingRule | Callable[[int, int], float], optimizer: Any = None
) -> ScalingRule:
    """Turn a rule given by name or as a callable into a :class:`ScalingRule`.

    Args:
        rule: ``"linear"``, ``"sqrt"``, ``"none"``, ``"auto"`` (√ for adaptive optimizers,
            linear for SGD-family, linear with a one-time warning per optimizer class when it
            has to guess), ``"curvature"`` (a :class:`CurvatureRule` whose law is set later), a
            :class:`ScalingRule` (returned as is), or a callable
            ``(old_batch_size, new_batch_size) -> float``.
        optimizer: The optimizer (instance or class) the factor will be applied to; needed by
            ``"auto"`` and ``"curvature"``.

    Returns:
        A callable rule with a ``name``.

    Raises:
        ValueError: For an unknown rule name.
        TypeError: If ``rule`` is neither a string nor a callable.

    Example:
        >>> import torch
        >>> adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
        >>> rule = resolve_rule("auto", adam)
        >>> rule.name, rule(32, 128)
        ('sqrt', 2.0)
    """
    if isinstance(rule, ScalingRule):
        return rule
    if isinstance(rule, str):
        if rule in FIXED_RULES:
            return _FixedRule(rule)
        if rule == "auto":
            adaptive = is_adaptive(optimizer)
            if adaptive is None:
                _warn_auto_guess(optimizer)
            return _FixedRule("sqrt" if adaptive else "linear")
        if rule == "curvature":
            return CurvatureRule(adaptive=bool(is_adaptive(optimizer)))
        raise ValueError(
            f"Unknown rule {rule!r}; accepted rules are {RULES} or a callable "
            "(old_batch_size, new_batch_size) -> float."
        )
    if callable(rule):
        return _CallableRule(rule)
    raise TypeError(
        f"rule must be one of {RULES} or a callable (old_batch_size, new_batch_size) -> "
        f"float, got {rule!r} of type {type(rule).__name__}."
    )


def _warn_auto_guess(optimizer: Any) -> None:
    optimizer = _unwrap_optimizer(optimizer)
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if cls in _warned_auto_classes:
        return
    _warned_auto_classes.add(cls)
    if optimizer is None:
        subject = "no optimizer was given, so it cannot tell whether the optimizer is"
    else:
        subject = f"it does not know whether {cls.__name__} is"
    warnings.warn(
        f"rule='auto': {subject} adaptive (Adam-family, 'sqrt') "
        "or SGD-family ('linear'); using 'linear'. Pass rule='linear' or rule='sqrt' to choose "
        "explicitly.",
        UserWarning,
        stacklevel=3,
    )


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
        optimizer = _unwrap_optimizer(optimizer)
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

    # ---- factors -------------------------------------------------------------------------

    @staticmethod
    def _check_factors(factor: float | Sequence[float], num_groups: int) -> list[float]:
        if isinstance(factor, Sequence) and not isinstance(factor, str):
            if len(factor) != num_groups:
                raise ValueError(
                    f"Got {len(factor)} factors {list(factor)!r} for an optimizer with "
                    f"{num_groups} param groups; pass one factor per group or a single float."
                )
            return [_check_factor(f, f"factor[{i}]") for i, f in enumerate(factor)]
        return [_check_factor(factor)] * num_groups

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
        value = _check_factor(factor)
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

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
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

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
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
