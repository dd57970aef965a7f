"""Tests for lr_batch_callback.scaling: fixed rules, rule resolution, the curvature rule, LRScaler.

LRScaler is checked against reference runs without a scaler (the lr every step uses, and the
lr stored in the param groups afterwards) and against hand-written runs that set the scaled lr
themselves, for the schedulers that overwrite a one-off ``param_group["lr"] *= k``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler

from lr_batch_callback.scaling import (
    ADAPTIVE_OPTIMIZERS,
    CurvatureRule,
    LRScaler,
    ScalingRule,
    is_adaptive,
    resolve_rule,
    scaling_factor,
)

# --------------------------------------------------------------------------------------------
# scaling_factor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "old", "new", "expected"),
    [
        ("linear", 32, 128, 4.0),
        ("sqrt", 32, 128, 2.0),
        ("none", 32, 128, 1.0),
        ("linear", 128, 32, 0.25),
        ("sqrt", 128, 32, 0.5),
        ("none", 128, 32, 1.0),
        ("linear", 100, 100, 1.0),
        ("sqrt", 1, 2, math.sqrt(2.0)),
        ("linear", 3, 1000, 1000 / 3),
    ],
)
def test_scaling_factor_values(rule: str, old: int, new: int, expected: float) -> None:
    assert scaling_factor(rule, old, new) == expected


def test_scaling_factor_accepts_integral_numbers() -> None:
    assert scaling_factor("linear", 32.0, np.int64(64)) == 2.0  # type: ignore[arg-type]
    assert scaling_factor("sqrt", np.int32(16), 64) == 2.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, False, "32", None, float("nan"), float("inf")])
@pytest.mark.parametrize("position", ["old", "new"])
def test_scaling_factor_rejects_bad_batch_sizes(bad: Any, position: str) -> None:
    args = (bad, 32) if position == "old" else (32, bad)
    with pytest.raises((ValueError, TypeError), match=re.escape(repr(bad))) as info:
        scaling_factor("linear", *args)
    assert f"{position}_batch_size" in str(info.value)
    if isinstance(bad, (int, float)):  # numbers (bools included) are bad values, not bad types
        assert info.type is ValueError


def test_scaling_factor_rejects_unknown_rule_listing_accepted() -> None:
    with pytest.raises(ValueError, match="'cubic'") as info:
        scaling_factor("cubic", 32, 64)
    for accepted in ("linear", "sqrt", "none"):
        assert accepted in str(info.value)


def test_scaling_factor_curvature_and_auto_point_to_resolve_rule() -> None:
    with pytest.raises(ValueError, match="curvature") as info:
        scaling_factor("curvature", 32, 64)
    assert "resolve_rule" in str(info.value) and "law" in str(info.value)
    with pytest.raises(ValueError, match="auto") as info:
        scaling_factor("auto", 32, 64)
    assert "resolve_rule" in str(info.value) and "optimizer" in str(info.value)


def test_scaling_factor_rejects_non_string_rule() -> None:
    with pytest.raises(TypeError, match="resolve_rule"):
        scaling_factor(lambda old, new: 1.0, 32, 64)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    rule=st.sampled_from(["linear", "sqrt"]),
    a=st.integers(1, 4096),
    b=st.integers(1, 4096),
    c=st.integers(1, 4096),
)
def test_fixed_rules_compose_and_are_monotone(rule: str, a: int, b: int, c: int) -> None:
    composed = scaling_factor(rule, a, b) * scaling_factor(rule, b, c)
    assert math.isclose(composed, scaling_factor(rule, a, c), rel_tol=1e-12, abs_tol=0.0)
    low, high = sorted((b, c))
    assert scaling_factor(rule, a, low) <= scaling_factor(rule, a, high)


# --------------------------------------------------------------------------------------------
# is_adaptive / resolve_rule
# --------------------------------------------------------------------------------------------


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


class _Minimal(torch.optim.Optimizer):
    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def _custom_optimizer_class(name: str, base: type = _Minimal) -> Any:
    # A fresh class object every call: "auto" warns once per class, and tests must not share one.
    return type(name, (base,), {})


@pytest.mark.parametrize(
    "cls",
    [
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.RMSprop,
        torch.optim.SparseAdam,
    ],
)
def test_is_adaptive_adam_family(cls: Any) -> None:
    assert cls in ADAPTIVE_OPTIMIZERS
    assert is_adaptive(cls) is True
    assert is_adaptive(cls(_params())) is True


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.ASGD, torch.optim.LBFGS])
def test_is_adaptive_sgd_family(cls: type) -> None:
    assert is_adaptive(cls(_params(), lr=0.1)) is False


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MyLamb", True),
        ("AdaBelief", True),
        ("FusedADAM", True),
        ("LARS", False),
        ("NesterovMomentum", False),
        ("PowerSGD", False),
        ("Lion", None),
        ("Foo", None),
    ],
)
def test_is_adaptive_by_class_name(name: str, expected: bool | None) -> None:
    assert is_adaptive(_custom_optimizer_class(name)(_params())) is expected


def test_is_adaptive_follows_subclasses_and_wrappers() -> None:
    foo_adam = _custom_optimizer_class("Foo", torch.optim.AdamW)
    assert is_adaptive(foo_adam(_params())) is True
    assert is_adaptive(_custom_optimizer_class("Bar", torch.optim.SGD)(_params(), lr=0.1)) is False
    assert is_adaptive(torch.optim.Rprop(_params())) is None  # sign-based: neither family

    class Wrapper:  # duck-typed like Lightning's LightningOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    assert is_adaptive(Wrapper(torch.optim.Adam(_params()))) is True


def test_resolve_fixed_rules() -> None:
    for name, expected in (("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)):
        rule = resolve_rule(name)
        assert isinstance(rule, ScalingRule)
        assert rule.name == name
        assert rule(32, 128) == expected
        assert name in repr(rule)


def test_resolve_auto_sgd_is_linear() -> None:
    rule = resolve_rule("auto", torch.optim.SGD(_params(), lr=0.1))
    assert (rule.name, rule(32, 128)) == ("linear", 4.0)


@pytest.mark.parametrize(
    "optimizer_factory",
    [
        lambda: torch.optim.Adam(_params()),
        lambda: torch.optim.AdamW(_params()),
        lambda: torch.optim.Adagrad(_params()),
        lambda: torch.optim.RMSprop(_params()),
        lambda: _custom_optimizer_class("MyLamb")(_params()),
    ],
)
def test_resolve_auto_adaptive_is_sqrt(optimizer_factory: Callable[[], Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known families must not warn
        rule = resolve_rule("auto", optimizer_factory())
    assert (rule.name, rule(32, 128)) == ("sqrt", 2.0)


def test_resolve_auto_unknown_optimizer_warns_once_per_class() -> None:
    foo = _custom_optimizer_class("Foo")(_params())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # our de-duplication, not Python's, must limit it
        first = resolve_rule("auto", foo)
        second = resolve_rule("auto", type(foo)(_params()))  # another instance, same class
    assert (first.name, first(32, 128), second.name) == ("linear", 4.0, "linear")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    foo_messages = [m for m in messages if "Foo" in m]
    assert len(foo_messages) == 1
    assert "rule='linear'" in foo_messages[0] and "rule='sqrt'" in foo_messages[0]


def test_resolve_curvature_rule_family() -> None:
    sgd_rule = resolve_rule("curvature", torch.optim.SGD(_params(), lr=0.1))
    adam_rule = resolve_rule("curvature", torch.optim.Adam(_params()))
    assert isinstance(sgd_rule, CurvatureRule) and sgd_rule.name == "curvature"
    assert isinstance(adam_rule, CurvatureRule)
    assert (sgd_rule.adaptive, adam_rule.adaptive) == (False, True)
    assert sgd_rule.law is None and sgd_rule(32, 128) == 4.0 and adam_rule(32, 128) == 2.0


def test_resolve_callable_rule() -> None:
    def quarter_power(old: int, new: int) -> float:
        return (new / old) ** 0.25

    rule = resolve_rule(quarter_power)
    assert rule.name == "quarter_power"
    assert rule(1, 16) == 2.0
    assert resolve_rule(rule) is rule
    with pytest.raises(ValueError, match="0"):
        rule(0, 16)  # inputs are validated like scaling_factor's


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf"), "2", None])
def test_resolve_callable_rule_rejects_bad_return(bad: Any) -> None:
    rule = resolve_rule(lambda old, new: bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        rule(32, 64)


def test_resolve_rule_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="'cubic'") as info:
        resolve_rule("cubic")
    for accepted in ("linear", "sqrt", "none", "auto", "curvature"):
        assert accepted in str(info.value)
    with pytest.raises(TypeError, match="42"):
        resolve_rule(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# CurvatureRule
# --------------------------------------------------------------------------------------------


class _Law:
    """λ(B) = a + c (1/B − 1/N), the batch-size law of Granziol et al. (arXiv 2006.09092)."""

    def __init__(self, a: float, c: float, n: float) -> None:
        self.a, self.c, self.n = a, c, n

    def predict(self, batch_size: float) -> float:
        return self.a + self.c * (1.0 / batch_size - 1.0 / self.n)


def test_curvature_rule_without_law_is_exactly_fixed_rule() -> None:
    for old, new in ((32, 128), (128, 32), (7, 1000)):
        assert CurvatureRule(adaptive=False)(old, new) == scaling_factor("linear", old, new)
        assert CurvatureRule(adaptive=True)(old, new) == scaling_factor("sqrt", old, new)


def test_curvature_rule_matches_eigenvalue_ratio() -> None:
    law = _Law(a=35.0, c=354.0, n=1797)
    expected = law.predict(8) / law.predict(32)
    assert CurvatureRule(adaptive=False, law=law)(8, 32) == pytest.approx(expected, rel=1e-15)
    assert CurvatureRule(adaptive=True, law=law)(8, 32) == pytest.approx(
        math.sqrt(expected), rel=1e-15
    )


def test_curvature_rule_noise_regime_is_linear_or_sqrt() -> None:
    law = _Law(a=1.0, c=1000.0, n=1e6)  # B* = c/a = 1000
    for old, new in ((2, 8), (4, 16), (1, 4)):
        assert CurvatureRule(False, law)(old, new) == pytest.approx(new / old, rel=0.02)
        assert CurvatureRule(True, law)(old, new) == pytest.approx(math.sqrt(new / old), rel=0.01)


def test_curvature_rule_saturates_past_critical_batch_size() -> None:
    law = _Law(a=1.0, c=1000.0, n=1e6)
    for adaptive in (False, True):
        factor = CurvatureRule(adaptive, law)(20_000, 80_000)
        assert factor == pytest.approx(1.0, abs=0.05)  # linear would say 4, sqrt 2
        assert factor >= 1.0  # still never below 1 when the batch grows


def test_curvature_rule_law_set_later_and_validated() -> None:
    rule = CurvatureRule(adaptive=False)
    assert rule(8, 32) == 4.0
    rule.law = _Law(a=1.0, c=1.0, n=1e9)
    assert rule(8, 32) < 1.5
    rule.law = None
    assert rule(8, 32) == 4.0
    with pytest.raises(TypeError, match="predict"):
        rule.law = object()
    with pytest.raises(TypeError, match="adaptive"):
        CurvatureRule(adaptive="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_lambda", [float("nan"), float("inf"), 0.0, -3.0])
def test_curvature_rule_bad_prediction_falls_back_and_warns_once(bad_lambda: float) -> None:
    class BadLaw:
        def predict(self, batch_size: float) -> float:
            return bad_lambda if batch_size > 100 else 5.0

    rule = CurvatureRule(adaptive=True, law=BadLaw())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rule(32, 128) == 2.0
        assert rule(32, 512) == 4.0
        assert rule(16, 64) == 1.0  # both predictions fine: the law is used
    assert len(caught) == 1
    assert "sqrt" in str(caught[0].message) and repr(bad_lambda) in str(caught[0].message)


# --------------------------------------------------------------------------------------------
# LRScaler: trajectories under every scheduler that overwrites param_group["lr"]
# --------------------------------------------------------------------------------------------

STEPS = 14
SWITCH = 5  # the factor changes before this step


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(16, 1, generator=gen, dtype=torch.float64)


def _model() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(5, 1).double()


class _RecordingSGD(torch.optim.SGD):
    """Records the hyper-parameters each step actually uses, from inside ``step``."""

    used: list[list[dict[str, Any]]]

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.used.append(_hyper(self))
        return super().step(closure)


class _RecordingAdamW(torch.optim.AdamW):
    used: list[list[dict[str, Any]]]

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.used.append(_hyper(self))
        return super().step(closure)


def _hyper(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    keys = ("lr", "momentum", "betas")
    return [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]


_BASE_LR = {"sgd": 0.05, "adamw": 0.01}


def _make_optimizer(kind: str, params: Any, recording: str) -> torch.optim.Optimizer:
    lr = _BASE_LR[kind]
    if recording == "subclass":
        opt: torch.optim.Optimizer = (
            _RecordingSGD(params, lr=lr) if kind == "sgd" else _RecordingAdamW(params, lr=lr)
        )
    else:
        opt = torch.optim.SGD(params, lr=lr) if kind == "sgd" else torch.optim.AdamW(params, lr=lr)
    opt.used = []  # type: ignore[attr-defined]
    return opt


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s)),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
        opt, max_lr=2 * opt.param_groups[0]["lr"], total_steps=STEPS + 1
    ),
    "CosineAnnealingLR-wrap": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=3),
    "CosineAnnealingWarmRestarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=3, T_mult=2
    ),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(
        opt,
        base_lr=0.2 * opt.param_groups[0]["lr"],
        max_lr=opt.param_groups[0]["lr"],
        step_size_up=2,
        cycle_momentum=True,  # also cycles SGD's momentum / AdamW's beta1, recorded below
    ),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
            lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        ],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=1
    ),
}


def _run(
    kind: str,
    scheduler_name: str,
    factor_at: Callable[[int], float] | None,
    recording: str = "hook",
) -> dict[str, Any]:
    """Train a few steps; ``factor_at=None`` means no LRScaler at all."""
    model = _model()
    x, y = _data()
    opt = _make_optimizer(kind, model.parameters(), recording)
    scheduler = SCHEDULERS[scheduler_name](opt)
    scaler = LRScaler(opt) if factor_at is not None else None
    if recording == "hook":
        # Registered after the scaler's pre-hook, so it sees what the step will use.
        opt.register_step_pre_hook(lambda o, args, kwargs: o.used.append(_hyper(o)))
    stored_after = []
    for t in range(STEPS):
        if scaler is not None and factor_at is not None:
            scaler.set_factor(factor_at(t))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        stored_after.append(opt.param_groups[0]["lr"])
        if scheduler_name == "ReduceLROnPlateau":
            scheduler.step(1.0)  # a flat metric: a plateau, so it reduces every other step
        else:
            scheduler.step()
    return {
        "used": [u[0] for u in opt.used],  # type: ignore[attr-defined]
        "stored_after": stored_after,
        "weights": [p.detach().clone() for p in model.parameters()],
        "optimizer": opt,
        "scheduler": scheduler,
    }


def _manual_run(kind: str, hyper: list[dict[str, Any]], factor_at: Callable[[int], float]):
    """Independent reference: no scheduler, no scaler, each step's hyper-parameters set by hand."""
    model = _model()
    x, y = _data()
    opt = _make_optimizer(kind, model.parameters(), "none")
    for t, h in enumerate(hyper):
        group = opt.param_groups[0]
        group.update(h)
        group["lr"] = h["lr"] * factor_at(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("late_factor", ["batch x4", 3.0])
@pytest.mark.parametrize("recording", ["hook", "subclass"])
@pytest.mark.parametrize("scheduler_name", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_lr_trajectory_under_schedulers(
    kind: str, scheduler_name: str, recording: str, late_factor: str | float
) -> None:
    # "batch x4": the linear rule for SGD (4.0), the sqrt rule for AdamW (2.0). Those are powers
    # of two, for which lr * f / f == lr; 3.0 is not, so it catches a restore by division.
    if late_factor == "batch x4":
        late = 4.0 if kind == "sgd" else 2.0
    else:
        late = float(late_factor)

    def factor_at(t: int) -> float:
        return 1.0 if t < SWITCH else late

    reference = _run(kind, scheduler_name, None, recording)
    scaled = _run(kind, scheduler_name, factor_at, recording)

    ref_lrs = [h["lr"] for h in reference["used"]]
    assert len(ref_lrs) == STEPS
    assert len(set(ref_lrs)) > 2, "the scheduler should change the lr in this test"
    # What the optimizer used: reference × factor, exactly (same float product).
    assert [h["lr"] for h in scaled["used"]] == [lr * factor_at(t) for t, lr in enumerate(ref_lrs)]
    # Other hyper-parameters the scheduler drives (momentum, betas) are left alone.
    assert [{k: v for k, v in h.items() if k != "lr"} for h in scaled["used"]] == [
        {k: v for k, v in h.items() if k != "lr"} for h in reference["used"]
    ]
    # Stored values stay in reference units after every step, bit for bit.
    assert scaled["stored_after"] == reference["stored_after"]
    assert scaled["scheduler"].state_dict() == reference["scheduler"].state_dict()
    # The weights are those of a hand-written run with the scaled lr...
    manual = _manual_run(kind, reference["used"], factor_at)
    for got, want in zip(scaled["weights"], manual, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # ...and not those of the unscaled run (the test can fail).
    assert not all(
        torch.equal(a, b) for a, b in zip(scaled["weights"], reference["weights"], strict=True)
    )


def test_factor_three_distinguishes_restore_from_division() -> None:
    # Guards the test above: with these lrs, dividing the scaled value back is not exact.
    reference = _run("sgd", "CosineAnnealingLR-wrap", None)
    assert any(lr * 3.0 / 3.0 != lr for lr in reference["stored_after"])


def test_one_off_multiplication_is_overwritten_but_scaler_is_not() -> None:
    # Why LRScaler exists: a scheduler with a closed form ignores a one-off "lr *= k".
    opt = torch.optim.SGD(_params(), lr=0.1)
    scheduler = lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt.param_groups[0]["lr"] *= 4
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.1
    scaler = LRScaler(opt, 4.0)
    opt.step()
    scheduler.step()
    assert scaler.effective_lrs() == [0.4]


# --------------------------------------------------------------------------------------------
# LRScaler: exactness, tensors, failures
# --------------------------------------------------------------------------------------------


def _adamw_run(with_scaler: bool) -> tuple[list[torch.Tensor], dict[str, Any], Any]:
    model = _model()
    x, y = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    if with_scaler:
        LRScaler(opt, factor=1.0)
    lr_objects = []
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        lr_before = opt.param_groups[0]["lr"]
        opt.step()
        lr_objects.append(opt.param_groups[0]["lr"] is lr_before)
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict(), lr_objects


def test_factor_one_is_bit_identical_to_no_scaler() -> None:
    weights_ref, state_ref, _ = _adamw_run(with_scaler=False)
    weights, state, same_objects = _adamw_run(with_scaler=True)
    assert all(same_objects)  # factor 1.0: the lr is not even rewritten
    for a, b in zip(weights, weights_ref, strict=True):
        assert torch.equal(a, b)
    assert state["param_groups"] == state_ref["param_groups"]
    for key, per_param in state["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, state_ref["state"][key][name]), name


def test_factor_one_groups_are_not_touched() -> None:
    # Not even rewritten with an equal value: an lr the scaler cannot scale (None, as in
    # relative-step Adafactor implementations) is fine as long as its factor is 1.
    opt = _Minimal([{"params": _params(), "lr": None}, {"params": _params(), "lr": 0.1}])
    lr_object = opt.param_groups[1]["lr"]
    scaler = LRScaler(opt, 1.0)
    seen: list[bool] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[1]["lr"] is lr_object))
    opt.step()
    assert seen == [True]
    scaler.set_factor(2.0, param_group=1)
    opt.step()
    assert seen == [True, False]
    scaler.set_factor(2.0, param_group=0)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] is None"):
        opt.step()


def test_tensor_lr_is_scaled_in_place() -> None:
    def run(lr: torch.Tensor, factor: float | None) -> tuple[Any, torch.nn.Linear, list]:
        model = _model()
        x, y = _data()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        if factor is not None:
            LRScaler(opt, factor)
        used: list[torch.Tensor] = []
        opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"].clone()))
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return opt, model, used

    lr = torch.tensor(1e-3)
    opt, model, used = run(lr, 2.0)
    assert opt.param_groups[0]["lr"] is lr  # the same tensor object, never replaced
    assert torch.equal(lr, torch.tensor(1e-3))  # restored exactly
    assert all(torch.equal(u, torch.tensor(1e-3) * 2.0) for u in used)
    _, manual_model, _ = run(torch.tensor(1e-3) * 2.0, None)
    for a, b in zip(model.parameters(), manual_model.parameters(), strict=True):
        assert torch.equal(a, b)


class _FlakySGD(torch.optim.SGD):
    """Raises inside ``step`` (after the pre-hooks ran) when ``fail_next`` is set."""

    fail_next = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return super().step(closure)


def _recorder(opt: torch.optim.Optimizer) -> list[Any]:
    used: list[Any] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(float(o.param_groups[0]["lr"])))
    return used


def test_exception_inside_step_does_not_compound() -> None:
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = _FlakySGD([w], lr=0.125)
    scaler = LRScaler(opt, 4.0)
    used = _recorder(opt)
    opt.fail_next = True
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 0.5  # the post-hook never ran
    w.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    opt.step()
    # The hooks also run in SGD.step called through super(): every pass sees 0.125 × 4.
    assert set(used) == {0.5}
    assert w.item() == -1.0  # two steps of 0.5, not 2.0 + 8.0
    assert opt.param_groups[0]["lr"] == 0.125
    assert scaler.factors == [4.0]


def test_exception_in_closure_then_restore() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    scaler = LRScaler(opt, 3.0)

    def bad_closure() -> torch.Tensor:
        raise ValueError("closure failed")

    with pytest.raises(ValueError, match="closure failed"):
        opt.step(bad_closure)
    assert scaler.effective_lrs() == [0.1 * 3.0]  # inside an unfinished step: already scaled
    scaler.restore()
    assert opt.param_groups[0]["lr"] == 0.1
    used = _recorder(opt)
    opt.step()
    assert used == [0.1 * 3.0]


def test_exception_then_scheduler_write_keeps_new_reference_value() -> None:
    # A closed-form scheduler writes a fresh reference value after the failed step; the next
    # step must scale that value, not put back the stale one.
    opt = _FlakySGD(_params(), lr=0.1)
    scheduler = lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    LRScaler(opt, 4.0)
    used = _recorder(opt)
    opt.fail_next = True
    with pytest.raises(RuntimeError):
        opt.step()
    scheduler.step()  # writes 0.05
    opt.step()
    # (_FlakySGD's super().step() runs the hooks a second time; both passes see 0.05 × 4.)
    assert used[0] == 0.1 * 4.0 and set(used[1:]) == {0.05 * 4.0}
    assert opt.param_groups[0]["lr"] == 0.05


def test_exception_with_tensor_lr_does_not_compound() -> None:
    lr = torch.tensor(0.125)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    LRScaler(opt, 2.0)
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(float(o.param_groups[0]["lr"])))

    def bad_closure() -> torch.Tensor:
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError):
        opt.step(bad_closure)
    x, y = _data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert used == [0.25, 0.25]
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.125


def test_nested_hooked_step_does_not_compound() -> None:
    # A subclass whose step calls super().step() runs the hooks twice once SGD.step is patched.
    torch.optim.SGD(_params(), lr=0.1)  # make sure SGD.step carries the hooks

    class Nested(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            return super().step(closure)

    w = torch.nn.Parameter(torch.zeros(1))
    opt = Nested([w], lr=0.25)
    LRScaler(opt, 4.0)
    used = _recorder(opt)
    w.grad = torch.ones(1)
    opt.step()
    assert used == [1.0, 1.0]  # the outer and the inner hook pass both see 0.25 × 4
    assert w.item() == -1.0 and opt.param_groups[0]["lr"] == 0.25


# --------------------------------------------------------------------------------------------
# LRScaler: groups, state, lifecycle, validation
# --------------------------------------------------------------------------------------------


def _two_group_sgd() -> torch.optim.SGD:
    return torch.optim.SGD([{"params": _params(), "lr": 0.1}, {"params": _params(), "lr": 0.5}])


def _used_lrs(opt: torch.optim.Optimizer) -> list[float]:
    used: list[list[float]] = []
    handle = opt.register_step_pre_hook(
        lambda o, a, k: used.append([g["lr"] for g in o.param_groups])
    )
    opt.step()
    handle.remove()
    return used[0]


def test_per_group_factors() -> None:
    opt = _two_group_sgd()
    scaler = LRScaler(opt, [2.0, 1.0])
    assert scaler.factors == [2.0, 1.0]
    assert _used_lrs(opt) == [0.2, 0.5]
    with pytest.raises(ValueError, match="factors"):
        _ = scaler.factor
    scaler.set_factor(3.0, param_group=1)
    assert scaler.factors == [2.0, 3.0]
    assert _used_lrs(opt) == [0.2, 0.5 * 3.0]
    assert scaler.effective_lrs() == [0.2, 0.5 * 3.0]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    scaler.factor = 5.0
    assert scaler.factor == 5.0 and scaler.factors == [5.0, 5.0]
    with pytest.raises(ValueError, match="2"):
        scaler.set_factor(2.0, param_group=2)
    with pytest.raises(ValueError, match="3 factors"):
        LRScaler(opt, [1.0, 2.0, 3.0])


def test_added_param_group_gets_factor_one() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    scaler = LRScaler(opt, 4.0)
    opt.add_param_group({"params": _params(), "lr": 0.3})
    assert scaler.factors == [4.0, 1.0]
    assert _used_lrs(opt) == [0.1 * 4.0, 0.3]
    scaler.set_factor(2.0, param_group=1)
    assert _used_lrs(opt) == [0.1 * 4.0, 0.3 * 2.0]
    scaler.set_factor(3.0)
    assert scaler.factors == [3.0, 3.0]


def test_state_dict_round_trip() -> None:
    scaler = LRScaler(_two_group_sgd(), [2.0, 3.0])
    state = scaler.state_dict()
    assert state == {"factors": [2.0, 3.0]}
    fresh_opt = _two_group_sgd()
    fresh = LRScaler(fresh_opt)
    fresh.load_state_dict(state)
    assert fresh.factors == [2.0, 3.0]
    assert _used_lrs(fresh_opt) == [0.1 * 2.0, 0.5 * 3.0]
    with pytest.raises(ValueError, match="2 param groups"):
        LRScaler(_two_group_sgd()).load_state_dict({"factors": [1.0]})
    with pytest.raises(ValueError, match="factors"):
        fresh.load_state_dict({})
    # The optimizer's own checkpoint stays in reference units.
    assert [g["lr"] for g in fresh_opt.state_dict()["param_groups"]] == [0.1, 0.5]


def test_remove_and_context_manager_stop_scaling() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    hooks_before = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    scaler = LRScaler(opt, 4.0)
    assert scaler.attached and "4.0" in repr(scaler) and "SGD" in repr(scaler)
    assert _used_lrs(opt) == [0.4]
    scaler.remove()
    scaler.remove()  # idempotent
    assert not scaler.attached
    assert _used_lrs(opt) == [0.1]
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == (
        hooks_before
    )
    with LRScaler(opt, 2.0) as inner:
        assert _used_lrs(opt) == [0.2]
    assert not inner.attached
    assert _used_lrs(opt) == [0.1]


def test_remove_restores_pending_values() -> None:
    opt = _FlakySGD(_params(), lr=0.1)
    scaler = LRScaler(opt, 4.0)
    opt.fail_next = True
    with pytest.raises(RuntimeError):
        opt.step()
    scaler.remove()
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_factor_validation_values(bad: float) -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        LRScaler(opt, bad)
    scaler = LRScaler(opt)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        scaler.set_factor(bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        LRScaler(_two_group_sgd(), [1.0, bad])


def test_factor_and_optimizer_types_validated() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    with pytest.raises(TypeError, match="'2'"):
        LRScaler(opt, "2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="True"):
        LRScaler(opt, True)
    with pytest.raises(TypeError, match="Optimizer"):
        LRScaler(object())  # type: ignore[arg-type]


def test_wrapped_optimizer_is_unwrapped() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)

    class Wrapper:
        optimizer = opt

    scaler = LRScaler(Wrapper(), 2.0)  # type: ignore[arg-type]
    assert scaler.optimizer is opt
    assert _used_lrs(opt) == [0.2]
