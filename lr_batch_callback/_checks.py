"""Argument checks: each rule and its error message, written once for the whole package.

Every public entry point validates its arguments here, so the same kind of value is accepted
everywhere (an integral ``256.0`` read from YAML is a batch size wherever a batch size is
expected) and every message names the argument, the bad value, what is accepted and what to do.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "CURVATURES",
    "check_batch_size",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_curvature",
    "check_factor",
    "check_fraction",
    "check_integer",
    "check_positive_float",
]

T = TypeVar("T")

#: The curvatures every estimate accepts: the Hessian and the Generalised Gauss-Newton.
CURVATURES = ("hessian", "ggn")


def _is_integral(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()


def check_integer(value: object, name: str, *, minimum: int = 1, allow_none: bool = False,
                  hint: str = "") -> Any:
    """``value`` as an ``int`` ≥ ``minimum`` (``None`` passes through when ``allow_none``).

    Integral floats (``32.0`` from a YAML file or a division) are accepted and converted; strings
    and bools (``True`` is not a count) are bad types (``TypeError``), fractions, NaN and numbers
    below ``minimum`` bad values (``ValueError``).

    Example:
        >>> check_integer(32.0, "batch_size")
        32
        >>> check_integer(0, "k")
        Traceback (most recent call last):
        ...
        ValueError: k must be a positive integer, got 0.
    """
    if value is None and allow_none:
        return None
    if not _is_integral(value) or int(value) < minimum:  # type: ignore[call-overload]
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        if allow_none:
            kind += " or None"
        suffix = f"; {hint}" if hint else ""
        if isinstance(value, bool):  # a switch where a count belongs: the wrong type of value
            raise TypeError(f"{name} must be {kind}, got the bool {value!r}; pass a number"
                            f"{suffix}.")
        error = ValueError if isinstance(value, numbers.Real) or value is None else TypeError
        raise error(f"{name} must be {kind}, got {value!r}{suffix}.")
    return int(value)  # type: ignore[call-overload]


def check_batch_size(value: object, name: str, *, allow_none: bool = False) -> Any:
    """``value`` as an ``int`` ≥ 1 counting samples (integral floats accepted, e.g. ``256.0``).

    Bools, fractions, NaN and infinities are bad *values* (``ValueError``); strings, ``None``
    (unless allowed) and other objects are bad *types* (``TypeError``).

    Example:
        >>> check_batch_size(64.0, "new_batch_size")
        64
    """
    if value is None and allow_none:
        return None
    extra = " or None" if allow_none else ""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 1{extra}, got the bool {value!r}; pass the "
                         "batch size itself.")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer >= 1{extra}, got {value!r} of type "
                        f"{type(value).__name__}; pass an int.")
    if not _is_integral(value):
        raise ValueError(f"{name} must be an integer >= 1{extra}, got {value!r}; a batch size "
                         "counts samples, so round it to a whole number.")
    if int(value) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be an integer >= 1{extra}, got {value!r}.")
    return int(value)  # type: ignore[call-overload]


def check_size_schedule(value: object, name: str, point: str) -> dict[int, int]:
    """``value`` as a sorted ``{point: batch size}`` dict: keys integers >= 0, sizes >= 1.

    A bad key and a bad size get their own messages, so ``{"1": 32}`` blames the key ``"1"``.

    Example:
        >>> check_size_schedule({2: 64, 0: 32.0}, "scheduling", "epoch")
        {0: 32, 2: 64}
    """
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict {{{point}: batch size}}, got {value!r}.")
    checked = {}
    for key, size in value.items():
        start = check_integer(key, f"the {name} key {key!r}", minimum=0,
                              hint=f"keys are the {point}s where a batch size starts, e.g. "
                                   f"{{0: 32, 2: 64}}")
        checked[start] = check_batch_size(size, f"the batch size at {point} {start} of {name}")
    return dict(sorted(checked.items()))


def check_factor(value: object, name: str = "factor") -> float:
    """``value`` as a finite ``float`` > 0: a learning-rate multiplier.

    Non-numbers (bools included) are bad *types* (``TypeError``); zero, negative, NaN and infinite
    numbers are bad *values* (``ValueError``).
    """
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


def check_positive_float(value: object, name: str, *, allow_none: bool = False,
                         example: str = "") -> Any:
    """``value`` as a finite ``float`` > 0 (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(float(value)) or float(value) <= 0):
        extra = " or None" if allow_none else ""
        suffix = f"; e.g. {name}={example}" if example else ""
        raise ValueError(f"{name} must be a positive finite number{extra}, got {value!r}{suffix}.")
    return float(value)


def check_fraction(value: object, name: str, *, allow_none: bool = False, closed_low: bool = False,
                   meaning: str = "") -> Any:
    """``value`` as a float in (0, 1] (``[0, 1]`` with ``closed_low``), or ``None``."""
    if value is None and allow_none:
        return None
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(float(value)) and float(value) <= 1
          and (float(value) >= 0 if closed_low else float(value) > 0))
    if not ok:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        extra = " or None" + (f" ({meaning})" if meaning else "") if allow_none else ""
        raise ValueError(f"{name} must be a fraction in {interval}{extra}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_bool(value: object, name: str) -> bool:
    """``value`` itself when it is a ``bool`` (``"yes"``, ``1`` and ``None`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type "
                        f"{type(value).__name__}.")
    return value


def check_choice(value: object, name: str, choices: Sequence[str], *, hint: str = "") -> str:
    """``value`` when it is one of ``choices``; otherwise an error with a did-you-mean.

    Example:
        >>> check_choice("Linear", "rule", ("linear", "sqrt"))
        Traceback (most recent call last):
        ...
        ValueError: rule must be one of ('linear', 'sqrt'), got 'Linear'. Did you mean 'linear'?
    """
    if isinstance(value, str) and value in choices:
        return value
    message = f"{name} must be one of {tuple(choices)}, got {value!r}."
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), [c.lower() for c in choices], n=1)
        if close:
            match = next(c for c in choices if c.lower() == close[0])
            message += f" Did you mean {match!r}?"
    if hint:
        message += f" {hint}"
    raise (ValueError if isinstance(value, str) else TypeError)(message)


def check_callable(value: T, name: str, signature: str, *, allow_none: bool = True) -> T:
    """``value`` when it is callable (or ``None``); ``signature`` says what it is called with."""
    if value is None and allow_none:
        return value
    if not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {value!r}.")
    return value


def check_curvature(value: object) -> str:
    """``value`` as one of :data:`CURVATURES` (a did-you-mean for a near miss)."""
    return check_choice(value, "curvature", CURVATURES,
                        hint="Use 'hessian' for the full Hessian or 'ggn' for the Generalised "
                             "Gauss-Newton.")
