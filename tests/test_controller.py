"""GlobalCoefficientController: formulas, bounds, direction, state, bad input."""

from __future__ import annotations

import json
import math
import sys

import numpy as np

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_reg.controller import DEFAULT_LR, DEFAULT_MAX_VALUE, GlobalCoefficientController
from tests.resume import arguments, check_resume, finite, json_round_trip

SETTINGS = settings(max_examples=40, deadline=None)
entropies = st.floats(min_value=0.0, max_value=20.0, allow_nan=False)
targets = st.floats(min_value=1e-3, max_value=10.0, allow_nan=False)
steps = st.lists(st.tuples(entropies, targets), min_size=1, max_size=40)


def _raw(initial: float, **kwargs) -> GlobalCoefficientController:
    """A controller on the raw entropy (no smoothing, no damping), additive unless ``rule`` says
    otherwise: the rules' own formulas. Smoothing and damping: tests/test_study_controller.py."""
    kwargs.setdefault("rule", "proportional")
    if "min_value" not in kwargs and kwargs["rule"] != "log":
        kwargs["min_value"] = 0.0
    return GlobalCoefficientController(initial, smoothing=0.0, damping=0.0, **kwargs)


def _make(rule: str, lr: float | None = None) -> GlobalCoefficientController:
    if rule == "log":
        return _raw(1e-3, lr=lr, min_value=1e-5, max_value=1e-2, rule="log")
    return _raw(0.0, lr=lr, rule=rule)


def test_defaults_are_the_documented_ones():
    # The module docstring's numbers: the damped log rule on a 0.9 average, alpha in [1e-4, 1e-2].
    c = GlobalCoefficientController()
    assert c.rule == "log" and c.lr == 0.05 and c.damping == 1.0 and c.smoothing == 0.9
    assert c.value == c.integral == c.min_value == 1e-4
    assert c.max_value == DEFAULT_MAX_VALUE == 1e-2
    # The additive rules keep their own: lr 1e-4 in alpha units, a floor of 0, no damping.
    for rule in ("proportional", "sign"):
        c = GlobalCoefficientController(rule=rule)
        assert (c.lr, c.min_value, c.value, c.damping) == (DEFAULT_LR[rule], 0.0, 0.0, 0.0) == (1e-4, 0.0, 0.0, 0.0)


def test_proportional_formula():
    c = _raw(2e-3, lr=1e-3, max_value=1.0)
    # alpha += lr * (target - H) / target, by hand: 2e-3 + 1e-3 * (0.8 - 0.6) / 0.8 = 2.25e-3
    assert c.update(0.6, 0.8) == pytest.approx(2.25e-3, rel=1e-12)
    # 2.25e-3 + 1e-3 * (0.8 - 1.2) / 0.8 = 1.75e-3
    assert c.update(1.2, 0.8) == pytest.approx(1.75e-3, rel=1e-12)
    assert c.value == pytest.approx(1.75e-3, rel=1e-12)


def test_sign_formula():
    c = _raw(5e-4, lr=1e-4, rule="sign")
    assert c.update(0.1, 0.2) == pytest.approx(6e-4, rel=1e-12)
    assert c.update(0.3, 0.2) == pytest.approx(5e-4, rel=1e-12)
    assert c.update(0.2, 0.2) == pytest.approx(5e-4, rel=1e-12)  # on target: no move


def test_log_formula():
    c = _raw(1e-3, lr=0.5, min_value=1e-6, max_value=1.0, rule="log")
    # log alpha += 0.5 * (1 - 0.5) / 1  ->  alpha = 1e-3 * exp(0.25)
    assert c.update(0.5, 1.0) == pytest.approx(1e-3 * math.exp(0.25), rel=1e-12)
    assert c.update(3.0, 1.0) == pytest.approx(1e-3 * math.exp(0.25 - 1.0), rel=1e-12)


def test_clipping_at_both_ends():
    c = _raw(0.0, lr=1.0, max_value=0.5)
    assert c.update(0.0, 1.0) == 0.5  # 0 + 1 * 1 -> clipped to 0.5
    assert c.update(10.0, 1.0) == 0.0  # 0.5 - 9 -> clipped to 0
    c = _raw(1e-3, lr=100.0, min_value=1e-4, max_value=1e-2, rule="log")
    assert c.update(0.0, 1.0) == 1e-2
    assert c.update(1e6, 1.0) == 1e-4


def test_relative_error_makes_lr_scale_free():
    # Same relative error at entropy scales 10x apart gives the same step.
    a = _raw(0.0, lr=1e-3).update(0.4, 0.5)
    b = _raw(0.0, lr=1e-3).update(4.0, 5.0)
    assert a == pytest.approx(b, rel=1e-12) and a == pytest.approx(2e-4, rel=1e-12)


@pytest.mark.parametrize("rule", ["proportional", "sign", "log"])
@SETTINGS
@given(seq=steps, lr=st.one_of(st.none(), st.floats(min_value=0.0, max_value=10.0)))
def test_bounds_and_direction(rule, seq, lr):
    c = _make(rule, lr)
    for h, t in seq:
        before = c.value
        after = c.update(h, t)
        assert after == c.value
        assert c.min_value <= after <= c.max_value
        if h < t:
            assert after >= before
        elif h > t:
            assert after <= before
        else:
            assert after == before


@pytest.mark.parametrize("rule", ["proportional", "sign", "log"])
def test_zero_lr_freezes_even_for_huge_error(rule):
    c = _make(rule, 0.0)
    v = c.value
    c.update(1e300, 1e-300)
    assert c.value == v


@pytest.mark.parametrize("rule", ["proportional", "sign", "log"])
@SETTINGS
@given(seq=steps, cut=st.integers(min_value=0, max_value=40))
def test_state_round_trip_is_bit_exact(rule, seq, cut):
    cut = min(cut, len(seq))
    ref = _make(rule)
    ref_values = [ref.update(h, t) for h, t in seq]
    first = _make(rule)
    for h, t in seq[:cut]:
        first.update(h, t)
    resumed = _make(rule)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
    assert [resumed.update(h, t) for h, t in seq[cut:]] == ref_values[cut:]
    assert resumed.steps == len(seq)


def test_accepts_0d_tensors():
    c = _raw(0.0, lr=1e-3)
    assert c.update(torch.tensor(0.5), torch.tensor(1.0, dtype=torch.float64)) == pytest.approx(5e-4)


def test_metrics():
    c = _raw(1e-3, lr=1e-3)
    assert c.metrics() == {"aer/coef": 1e-3}
    c.update(0.75, 1.0)
    m = c.metrics(prefix="x/")
    assert m == {"x/coef": pytest.approx(1.25e-3), "x/rel_error": pytest.approx(0.25), "x/entropy_smoothed": 0.75}
    smoothed = GlobalCoefficientController(smoothing=0.5)
    smoothed.update(1.0, 1.0)
    # H_bar = 0.5 * 1.0 + 0.5 * 0.2 = 0.6; e = (1 - 0.6) / 1
    assert smoothed.update(0.2, 1.0) and smoothed.metrics()["aer/entropy_smoothed"] == pytest.approx(0.6)
    assert smoothed.metrics()["aer/rel_error"] == pytest.approx(0.4)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-4), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(min_value=1e-2, max_value=1e-3), "min_value"),
        (dict(min_value=-1.0), "min_value"),
        (dict(max_value=float("inf")), "max_value"),
        (dict(initial=0.5), "initial"),
        (dict(rule="pid"), "rule"),
        (dict(rule="log", initial=1e-3, min_value=0.0), "min_value"),
        (dict(initial=1e-5), "initial"),  # below the log rule's default floor of 1e-4
        (dict(rule="log", initial=0.0, min_value=0.0), "min_value"),
    ],
)
def test_bad_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GlobalCoefficientController(**kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="rule"):
        GlobalCoefficientController(rule=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lr"):
        GlobalCoefficientController(lr="0.1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "entropy, target, name",
    [
        (float("nan"), 1.0, "entropy"),
        (float("inf"), 1.0, "entropy"),
        (-0.1, 1.0, "entropy"),
        (0.5, 0.0, "target"),
        (0.5, -1.0, "target"),
        (0.5, float("nan"), "target"),
        (torch.tensor([0.5, 0.6]), 1.0, "entropy"),
        (True, 1.0, "entropy"),
    ],
)
def test_bad_update_leaves_state(entropy, target, name):
    c = _raw(1e-3, lr=1e-3)
    c.update(0.5, 1.0)
    before = c.state_dict()
    with pytest.raises((ValueError, TypeError), match=name):
        c.update(entropy, target)
    assert c.state_dict() == before


@pytest.mark.parametrize(
    "state, name",
    [
        ({"value": 0.5, "integral": 1e-3, "steps": 1, "last_error": None, "smoothed": None}, "'value'"),
        ({"value": float("nan"), "integral": 1e-3, "steps": 1, "last_error": None, "smoothed": None}, "'value'"),
        ({"value": 1e-3, "integral": 0.5, "steps": 1, "last_error": None, "smoothed": None}, "'integral'"),
        ({"value": 1e-3, "integral": 1e-3, "steps": -1, "last_error": None, "smoothed": None}, "'steps'"),
        ({"value": 1e-3, "integral": 1e-3, "steps": 1.5, "last_error": None, "smoothed": None}, "'steps'"),
        ({"value": 1e-3, "integral": 1e-3, "steps": 1, "last_error": float("inf"), "smoothed": None}, "'last_error'"),
        ({"value": 1e-3, "integral": 1e-3, "steps": 1, "last_error": 0.5, "smoothed": -0.1}, "'smoothed'"),
        ({"value": 1e-3, "integral": 1e-3, "steps": 1, "last_error": 0.5, "smoothed": float("nan")}, "'smoothed'"),
        ({"value": 1e-3, "integral": 1e-3, "steps": 1, "smoothed": None}, "last_error"),
        ({"value": 1e-3, "integral": 1e-3, "steps": 1, "last_error": None}, "smoothed"),
        ({"value": 1e-3, "steps": 1, "last_error": None}, "integral"),
        ({"value": 1e-3, "steps": 1, "last_error": 0.5, "lr": 1.0}, "unknown"),  # strict like torch
        ({"value": 1e-3, "steps": 1, "last_error": 0.5, "extra": None}, "extra"),
        ({"value": 1e-3, "last_error": 0.5}, "steps"),
        ({"value": 1e-3, "steps": 1, "last_error": 1.5}, "last_error"),  # e <= 1 always
        ([("value", 1e-3)], "state"),
    ],
)
def test_bad_state_leaves_state(state, name):
    """A bad or unknown key, a missing one, a wrong kind: ValueError/TypeError naming it, state untouched."""
    c = _raw(1e-3, lr=1e-3)
    c.update(0.5, 1.0)
    before = c.state_dict()
    with pytest.raises((ValueError, TypeError), match=name):
        c.load_state_dict(state)
    assert c.state_dict() == before


@st.composite
def controllers(draw):
    """A valid controller config, with settings from the edges of the float range."""
    rule = draw(st.sampled_from(["proportional", "sign", "log"]))
    lo, hi = sorted([draw(finite), draw(finite)])
    if rule == "log" and lo == 0.0:
        lo = draw(st.sampled_from([5e-324, 1e-310, 1e-5]))
        hi = max(lo, hi)
    smoothing = draw(st.sampled_from([0.0, 5e-324, 0.5, 0.9, 1.0 - 2**-53]))
    return dict(initial=draw(st.sampled_from([lo, hi])), lr=draw(st.one_of(st.none(), finite)), min_value=lo, max_value=hi, rule=rule,
                smoothing=smoothing)


@settings(max_examples=150, deadline=None)
@given(config=controllers(), calls=st.lists(st.tuples(arguments, arguments), max_size=10))
def test_every_reachable_state_is_json_safe_and_resumes_exactly(config, calls):
    check_resume(
        lambda: GlobalCoefficientController(**config),
        [lambda c, h=h, t=t: c.update(h, t) for h, t in calls],
    )


def test_tiny_target_keeps_the_state_finite():
    # Regression (issue 11): H / target overflowed, last_error = -inf, and the state could
    # neither be dumped with allow_nan=False nor loaded back.
    c = _raw(5e-3, lr=1e-4)
    assert c.update(1.0, 1e-310) == 0.0  # the full step down, clipped at min_value
    assert c.last_error == -sys.float_info.max
    resumed = _raw(5e-3, lr=1e-4)
    resumed.load_state_dict(json_round_trip(c.state_dict()))
    assert resumed.state_dict() == c.state_dict()
    assert resumed.update(0.5, 1.0) == c.update(0.5, 1.0) == pytest.approx(0.5e-4, rel=1e-12)


@pytest.mark.parametrize("rule", ["proportional", "sign", "log"])
def test_huge_lr_times_error_stays_clipped(rule):
    # lr * e = -inf (and exp(-inf) = 0 for the log rule) must land on min_value, never NaN.
    c = _raw(1e-3, lr=sys.float_info.max, min_value=1e-5, max_value=1e-2, rule=rule)
    assert c.update(1.0, 1e-310) == 1e-5
    assert c.update(0.0, 1.0) == 1e-2
    json_round_trip(c.state_dict())


@pytest.mark.parametrize("bad", [10**400, -(10**400)])
def test_huge_python_ints_are_not_finite(bad):
    # Regression (issue 11): float(10**400) raised OverflowError (fails on d15f0c3; fixed by checks.py in 96176c8).
    c = _raw(1e-3, lr=1e-3)
    with pytest.raises(ValueError, match="entropy"):
        c.update(bad, 1.0)
    with pytest.raises(ValueError, match="target"):
        c.update(0.5, bad)
    assert c.steps == 0


def test_numbers_of_every_kind_are_numbers():
    kinds = [0.5, np.float32(0.5), np.float64(0.5), np.int64(1), torch.tensor(0.5, dtype=torch.bfloat16), np.array(0.5)]
    for h in kinds:
        for t in kinds:
            c = _raw(0.0, lr=1e-3, max_value=1.0)
            assert c.update(h, t) == pytest.approx(max(1e-3 * (float(t) - float(h)) / float(t), 0.0), rel=1e-12, abs=1e-18)
