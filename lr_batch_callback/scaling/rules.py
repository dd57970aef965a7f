"""Learning-rate scaling rules for a change of batch size.

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

Imports neither Lightning nor the curvature engine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from lr_batch_callback._checks import check_batch_size, check_choice, check_factor
from lr_batch_callback.law.model import curvature_lr_factor
from lr_batch_callback.scaling.optimizers import is_adaptive, unwrap_optimizer

__all__ = [
    "FIXED_RULES",
    "RULES",
    "CurvatureRule",
    "ScalingRule",
    "resolve_rule",
    "scaling_factor",
]

#: Rules that need nothing but the two batch sizes (accepted by :func:`scaling_factor`).
FIXED_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
#: Every rule name :func:`resolve_rule` accepts.
RULES: tuple[str, ...] = (*FIXED_RULES, "auto", "curvature")

# Optimizer classes "auto" already warned about: one warning per class, not one per resize.
_warned_auto_classes: set[type] = set()


def _did_you_mean(name: str, choices: tuple[str, ...]) -> str:
    try:
        check_choice(name, "rule", choices)
    except ValueError as exc:
        text = str(exc)
        return text[text.index(" Did you mean"):] if "Did you mean" in text else ""
    return ""


def _fixed_factor(rule: str, old: int, new: int) -> float:
    if rule == "linear":
        return new / old
    if rule == "sqrt":
        return math.sqrt(new / old)
    return 1.0


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
        raise ValueError(f"Unknown rule {rule!r}; accepted rules are {FIXED_RULES}."
                         + _did_you_mean(rule, FIXED_RULES))
    old = check_batch_size(old_batch_size, "old_batch_size")
    new = check_batch_size(new_batch_size, "new_batch_size")
    return _fixed_factor(rule, old, new)



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
        old = check_batch_size(old_batch_size, "old_batch_size")
        new = check_batch_size(new_batch_size, "new_batch_size")
        value = self._factor(old, new)
        try:
            return check_factor(value, f"the factor of scaling rule {self.name!r} for {old} -> {new}")
        except TypeError as exc:  # a rule that returns a non-number is a wrong value, not type
            raise ValueError(str(exc)) from exc

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
        try:
            return curvature_lr_factor(lam_old, lam_new, self.adaptive)
        except ValueError:
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
            "(old_batch_size, new_batch_size) -> float." + _did_you_mean(rule, RULES)
        )
    if callable(rule):
        return _CallableRule(rule)
    raise TypeError(
        f"rule must be one of {RULES} or a callable (old_batch_size, new_batch_size) -> "
        f"float, got {rule!r} of type {type(rule).__name__}."
    )


def _warn_auto_guess(optimizer: Any) -> None:
    optimizer = unwrap_optimizer(optimizer)
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
