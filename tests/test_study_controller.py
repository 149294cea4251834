"""The controller's damping (PI) term and its entropy smoothing: formulas against a float64
reference, bounds, monotone integral, state round trip, bad input, the chatter damping removes
on a lagged plant and the jitter smoothing removes on a noisy one."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from entropy_reg.controller import GlobalCoefficientController
from entropy_reg.regularizer import AdaptiveEntropyRegularizer, AERConfig

LO, HI = 1e-3, 1.0


def _reference(rule: str, lr: float, damping: float, integral: float, h: float, t: float) -> tuple[float, float]:
    """(new integral, new alpha) from the documented formulas, in float64 (``h`` already smoothed)."""
    e = (t - h) / t
    if rule == "proportional":
        i = min(max(integral + lr * e, LO), HI)
        return i, min(max(i + damping * e, LO), HI)
    i = min(max(integral * math.exp(lr * e), LO), HI)
    return i, min(max(i * math.exp(damping * e), LO), HI)


steps = st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.05, 3.0)), min_size=1, max_size=40)
# For the regularizer, whose first entropy becomes the anchor (which must be > 0).
entropies = st.lists(st.floats(0.01, 5.0), min_size=1, max_size=40)


@given(rule=st.sampled_from(["proportional", "log"]), lr=st.floats(0.0, 2.0), damping=st.floats(0.0, 3.0),
       seq=steps)
def test_pi_matches_reference_and_stays_in_bounds(rule: str, lr: float, damping: float,
                                                  seq: list[tuple[float, float]]) -> None:
    c = GlobalCoefficientController(0.01, lr=lr, min_value=LO, max_value=HI, rule=rule, damping=damping,
                                    smoothing=0.0)
    integral = 0.01
    for h, t in seq:
        before = c.integral
        integral, alpha = _reference(rule, lr, damping, integral, h, t)
        assert c.update(h, t) == pytest.approx(alpha, rel=1e-12, abs=1e-15)
        assert c.integral == pytest.approx(integral, rel=1e-12, abs=1e-15)
        assert LO <= c.integral <= HI and LO <= c.value <= HI
        # The integral never moves against the error's sign.
        if h < t:
            assert c.integral >= before
        elif h > t:
            assert c.integral <= before


@given(rule=st.sampled_from(["proportional", "log"]), lr=st.floats(0.0, 2.0), damping=st.floats(0.0, 3.0),
       beta=st.one_of(st.just(0.0), st.floats(0.0, 0.999)), seq=steps)
def test_smoothing_matches_reference(rule: str, lr: float, damping: float, beta: float,
                                     seq: list[tuple[float, float]]) -> None:
    c = GlobalCoefficientController(0.01, lr=lr, min_value=LO, max_value=HI, rule=rule, damping=damping,
                                    smoothing=beta)
    integral, smooth = 0.01, None
    for h, t in seq:
        smooth = h if smooth is None else beta * smooth + (1 - beta) * h
        before = c.integral
        integral, alpha = _reference(rule, lr, damping, integral, smooth, t)
        assert c.update(h, t) == pytest.approx(alpha, rel=1e-12, abs=1e-15)
        assert c.smoothed == pytest.approx(smooth, rel=1e-12, abs=1e-300)
        # The integral follows the sign of the smoothed error, never the raw one.
        if smooth < t * (1 - 1e-12):
            assert c.integral >= before
        elif smooth > t * (1 + 1e-12):
            assert c.integral <= before


@given(rule=st.sampled_from(["proportional", "log", "sign"]), seq=steps)
def test_without_damping_value_is_the_integral(rule: str, seq: list[tuple[float, float]]) -> None:
    c = GlobalCoefficientController(0.01, lr=0.05, min_value=LO, max_value=HI, rule=rule, damping=0.0)
    for h, t in seq:
        c.update(h, t)
        assert c.value == c.integral


@given(seq=entropies, split=st.integers(0, 40))
def test_state_round_trip_through_json_continues_identically(seq: list[float], split: int) -> None:
    cfg = AERConfig(coef_rule="log", coef_lr=0.1, coef_damping=1.0, coef_init=1e-3, coef_min=1e-3, coef_max=1.0,
                    coef_smoothing=0.9)
    whole, first = AdaptiveEntropyRegularizer(cfg), AdaptiveEntropyRegularizer(cfg)
    split = min(split, len(seq))
    for h in seq:
        whole.update(h)
    for h in seq[:split]:
        first.update(h)
    resumed = AdaptiveEntropyRegularizer(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    for h in seq[split:]:
        resumed.update(h)
    assert resumed.state_dict() == whole.state_dict()
    assert resumed.value == whole.value


@pytest.mark.parametrize(
    "kwargs, name",
    [({"damping": -0.1}, "damping"), ({"damping": float("nan")}, "damping"), ({"damping": "1"}, "damping"),
     ({"damping": 0.5, "rule": "sign"}, "damping"), ({"smoothing": 1.0}, "smoothing"),
     ({"smoothing": -0.1}, "smoothing"), ({"smoothing": float("nan")}, "smoothing"), ({"smoothing": "0.9"}, "smoothing"),
     ({"smoothing": True}, "smoothing")],
)
def test_bad_damping_or_smoothing_is_rejected(kwargs: dict, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        GlobalCoefficientController(1e-3, min_value=1e-4, **kwargs)


def _lagged_plant(cfg: AERConfig, gain: float, lag: int = 10, steps: int = 3000, seed: int = 0,
                  ema: float = 0.0) -> list[float]:
    """Entropy decays 0.4% per step, the bonus acts ``lag`` steps late, and each measurement has
    3% noise (a 128-response batch), optionally smoothed by an EMA of weight ``ema`` on the
    past before the controller sees it: alpha over the run."""
    rng = random.Random(seed)
    reg = AdaptiveEntropyRegularizer(cfg)
    h, alphas, pending, smooth = 0.45, [], [0.0] * lag, None
    for _ in range(steps):
        measured = max(h * (1 + 0.03 * rng.gauss(0.0, 1.0)), 0.0)
        smooth = measured if smooth is None else ema * smooth + (1 - ema) * measured
        reg.update(smooth)
        pending.append(reg.value)
        h = h - 0.004 * h + gain * pending.pop(0)
        alphas.append(reg.value)
    return alphas


def _cv(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) / m


@pytest.mark.parametrize("gain", [0.02, 0.2])
def test_damping_removes_the_limit_cycle(gain: float) -> None:
    integral = AERConfig(coef_rule="proportional", coef_lr=0.02, coef_max=0.3, coef_smoothing=0.0)
    pi = AERConfig(coef_rule="log", coef_lr=0.1, coef_damping=1.0, coef_init=1e-3, coef_min=1e-3, coef_max=1.0,
                   coef_smoothing=0.0)
    late = slice(1500, None)
    # The integral rule swings alpha through most of its range; the PI rule holds it.
    cycling = _cv(_lagged_plant(integral, gain)[late])
    assert cycling > 0.5
    assert _cv(_lagged_plant(pi, gain)[late]) < 0.25
    # Smoothing the measured entropy adds lag: the integral rule cycles harder, not less.
    assert _cv(_lagged_plant(integral, gain, ema=0.9)[late]) > cycling
    # The library's default (damped log rule on the 0.9 average, lr 0.05; here with the demo's
    # range) holds this plant; the same at lr 0.1 cycles, which is why the study rejected it.
    default = AERConfig(coef_init=1e-3, coef_min=1e-3, coef_max=1.0)
    assert _cv(_lagged_plant(default, gain)[late]) < 0.25
    assert _cv(_lagged_plant(replace(default, coef_lr=0.1), gain)[late]) > 0.5


def _jitter(xs: list[float]) -> float:
    """Mean absolute step-to-step change over the mean (dimensionless)."""
    return sum(abs(b - a) for a, b in zip(xs, xs[1:])) / (len(xs) - 1) / (sum(xs) / len(xs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothing_cuts_the_jitter_that_measurement_noise_puts_on_alpha(seed: int) -> None:
    """Entropy already at the target, measured with 20% noise (digitsum's step-to-step spread
    at 128 responses): the damped log rule on the raw measurement moves alpha by tens of
    percent a step (0.26 in log alpha); on the 0.9 average, about 12x less (0.02)."""

    def log_steps(beta: float) -> float:
        rng = random.Random(seed)
        c = GlobalCoefficientController(0.03, lr=0.3, min_value=LO, max_value=HI, rule="log", damping=1.0,
                                        smoothing=beta)
        alphas = [c.update(max(1.0 + 0.2 * rng.gauss(0.0, 1.0), 0.0), 1.0) for _ in range(2000)]
        return sum(abs(math.log(b / a)) for a, b in zip(alphas, alphas[1:])) / (len(alphas) - 1)

    raw, smoothed = log_steps(0.0), log_steps(0.9)
    assert raw > 0.15
    assert smoothed < raw / 3
