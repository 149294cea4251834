"""AnchoredTarget: anchor, ratio schedule, state, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from entropy_reg.target import AnchoredTarget
from tests.resume import arguments, check_resume, finite, json_round_trip

SETTINGS = settings(max_examples=40, deadline=None)
entropy_seqs = st.lists(st.floats(min_value=1e-3, max_value=12.0, allow_nan=False), min_size=1, max_size=30)


def test_first_value_anchors_by_default():
    t = AnchoredTarget()
    assert t.value is None and t.anchor is None
    assert t.update(1.6) == pytest.approx(0.8)
    assert t.anchor == 1.6
    assert t.update(0.1) == pytest.approx(0.8)  # later values never move the anchor
    assert t.update(9.0) == pytest.approx(0.8)


def test_warmup_mean():
    t = AnchoredTarget(0.25, warmup_steps=3)
    assert t.update(1.0) is None
    assert t.update(2.0) is None
    assert t.metrics() == {"aer/warmup_remaining": 1.0}
    assert t.update(4.5) == pytest.approx(0.25 * 2.5)  # the completing call returns a target
    assert t.anchor == pytest.approx(2.5)
    assert t.metrics("p/") == {"p/target": pytest.approx(0.625), "p/anchor": pytest.approx(2.5), "p/target_ratio": 0.25}


def test_initial_entropy_skips_warmup():
    t = AnchoredTarget(0.4, warmup_steps=5, initial_entropy=3.0)
    assert t.value == pytest.approx(1.2)
    assert t.update(0.2) == pytest.approx(1.2)
    assert t.anchor == 3.0


@SETTINGS
@given(seq=entropy_seqs, warmup=st.integers(min_value=1, max_value=10), ratio=st.floats(min_value=0.05, max_value=1.5))
def test_anchor_is_mean_of_warmup_and_never_moves(seq, warmup, ratio):
    t = AnchoredTarget(ratio, warmup_steps=warmup)
    outs = [t.update(h) for h in seq]
    if len(seq) < warmup:
        assert all(o is None for o in outs) and t.anchor is None
        return
    anchor = sum(seq[:warmup]) / warmup
    assert t.anchor == pytest.approx(anchor, rel=1e-12)
    assert outs[: warmup - 1] == [None] * (warmup - 1)
    assert all(o == pytest.approx(ratio * anchor, rel=1e-12) for o in outs[warmup - 1 :])


def test_linear_schedule():
    t = AnchoredTarget(0.6, initial_entropy=2.0, final_ratio=0.2, schedule_steps=4)
    # ratio_k = 0.6 + (0.2 - 0.6) * min(k / 4, 1), k = 0, 1, ...
    got = [t.update(1.0) for _ in range(7)]
    want = [2.0 * (0.6 - 0.4 * min(k / 4, 1.0)) for k in range(7)]
    assert got == pytest.approx(want, rel=1e-12)
    assert t.current_ratio == pytest.approx(0.2)


def test_schedule_counts_from_anchoring_update():
    t = AnchoredTarget(1.0, warmup_steps=2, final_ratio=0.5, schedule_steps=2)
    assert t.update(2.0) is None
    assert t.update(2.0) == pytest.approx(2.0)  # k = 0
    assert t.update(2.0) == pytest.approx(1.5)  # k = 1
    assert t.update(2.0) == pytest.approx(1.0)  # k = 2


@SETTINGS
@given(seq=entropy_seqs, cut=st.integers(min_value=0, max_value=30), warmup=st.integers(min_value=1, max_value=4))
def test_state_round_trip(seq, cut, warmup):
    cut = min(cut, len(seq))

    def make() -> AnchoredTarget:
        return AnchoredTarget(0.5, warmup_steps=warmup, final_ratio=0.3, schedule_steps=5)

    ref = make()
    want = [ref.update(h) for h in seq]
    first = make()
    for h in seq[:cut]:
        first.update(h)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
    assert [resumed.update(h) for h in seq[cut:]] == want[cut:]


def test_accepts_0d_tensor():
    assert AnchoredTarget().update(torch.tensor(1.0)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(ratio=0.0), "ratio"),
        (dict(ratio=-0.5), "ratio"),
        (dict(ratio=float("nan")), "ratio"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(initial_entropy=0.0), "initial_entropy"),
        (dict(initial_entropy=float("inf")), "initial_entropy"),
        (dict(final_ratio=0.0, schedule_steps=3), "final_ratio"),
        (dict(final_ratio=0.2), "schedule_steps"),
        (dict(schedule_steps=3), "schedule_steps"),
    ],
)
def test_bad_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AnchoredTarget(**kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="warmup_steps"):
        AnchoredTarget(warmup_steps=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ratio"):
        AnchoredTarget(ratio="0.5")  # type: ignore[arg-type]


@pytest.mark.parametrize("entropy", [float("nan"), float("inf"), -1.0, "1.0", None, torch.ones(2)])
@pytest.mark.parametrize("anchored", [False, True])
def test_bad_entropy_leaves_state(entropy, anchored):
    t = AnchoredTarget(0.5, warmup_steps=2)
    t.update(1.0)
    if anchored:
        t.update(2.0)
    before = t.state_dict()
    with pytest.raises((ValueError, TypeError), match="entropy"):
        t.update(entropy)
    assert t.state_dict() == before


def test_zero_anchor_rejected_without_change():
    t = AnchoredTarget(0.5, warmup_steps=2)
    t.update(0.0)
    before = t.state_dict()
    with pytest.raises(ValueError, match="entropy"):
        t.update(0.0)
    assert t.state_dict() == before
    assert t.update(1.0) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "state, name",
    [
        ({"anchor": -1.0, "warmup_sum": 0.0, "warmup_count": 1, "anchored_updates": 1}, "anchor"),
        ({"anchor": None, "warmup_sum": 1.0, "warmup_count": 1, "anchored_updates": 2}, "anchor"),
        ({"anchor": 1.0, "warmup_sum": float("nan"), "warmup_count": 1, "anchored_updates": 1}, "warmup_sum"),
        ({"anchor": 1.0, "warmup_sum": 1.0, "warmup_count": -2, "anchored_updates": 1}, "warmup_count"),
        ({"anchor": 1.0, "warmup_sum": 1.0, "warmup_count": 1}, "anchored_updates"),
        ({"anchor": 1.0, "warmup_sum": 1.0, "warmup_count": 1, "anchored_updates": 1, "ratio": 0.5}, "ratio"),
        ({"anchor": 1.0, "warmup_sum": 1.0, "warmup_count": 1, "anchored_updates": 1, "x": 0}, "unknown"),
        ("anchor", "state"),
    ],
)
def test_bad_state_leaves_state(state, name):
    """A bad or unknown key, a missing one, a wrong kind: ValueError/TypeError naming it, state untouched."""
    t = AnchoredTarget(0.5, warmup_steps=2)
    t.update(1.0)
    before = t.state_dict()
    with pytest.raises((ValueError, TypeError), match=name):
        t.load_state_dict(state)
    assert t.state_dict() == before


@st.composite
def targets(draw):
    """Valid settings, from the edges of the float range (construction may still reject them)."""
    kw = dict(ratio=draw(positive), warmup_steps=draw(st.integers(min_value=1, max_value=3)))
    if draw(st.booleans()):
        kw["initial_entropy"] = draw(positive)
    if draw(st.booleans()):
        kw.update(final_ratio=draw(positive), schedule_steps=draw(st.integers(min_value=1, max_value=4)))
    return kw


positive = finite.filter(lambda x: x > 0.0)


@settings(max_examples=200, deadline=None)
@given(config=targets(), calls=st.lists(arguments, max_size=12))
def test_every_reachable_state_is_json_safe_and_resumes_exactly(config, calls):
    try:
        AnchoredTarget(**config)
    except ValueError:
        assume(False)  # e.g. initial_entropy * ratio overflows: rejected at construction, tested below
    check_resume(lambda: AnchoredTarget(**config), [lambda t, h=h: t.update(h) for h in calls])


def test_warmup_sum_overflow_is_rejected():
    # Regression (issue 11): 1e308 twice made the warm-up sum, the anchor and the target inf.
    t = AnchoredTarget(warmup_steps=2)
    assert t.update(1e308) is None
    before = t.state_dict()
    with pytest.raises(ValueError, match="entropy"):
        t.update(1e308)
    assert t.state_dict() == before
    assert t.update(1e307) == 0.5 * (1e308 + 1e307) / 2  # the warm-up goes on from where it was
    json_round_trip(t.state_dict())


@pytest.mark.parametrize(
    "kwargs, entropy",
    [
        (dict(ratio=4.0), 1e308),  # 4e308 overflows
        (dict(ratio=0.5, final_ratio=4.0, schedule_steps=3), 1e308),  # the schedule's end overflows
        (dict(ratio=0.4), 5e-324),  # 0.4 * 5e-324 rounds to a target of 0
        (dict(ratio=1.0, final_ratio=1e-10, schedule_steps=2), 1e-320),  # the schedule's end underflows
    ],
)
def test_anchor_whose_targets_leave_the_float_range_is_rejected(kwargs, entropy):
    t = AnchoredTarget(**kwargs)
    before = t.state_dict()
    with pytest.raises(ValueError, match="entropy"):
        t.update(entropy)
    assert t.state_dict() == before
    with pytest.raises(ValueError, match="initial_entropy"):
        AnchoredTarget(**kwargs, initial_entropy=entropy)
    with pytest.raises(ValueError, match=r"state\['anchor'\]"):
        t.load_state_dict({"anchor": entropy, "warmup_sum": entropy, "warmup_count": 1, "anchored_updates": 1})
    assert t.state_dict() == before


def test_extreme_but_representable_targets_are_kept():
    # Every target over the schedule is checked at its two ends, and these ends are in range.
    t = AnchoredTarget(ratio=1.0, final_ratio=1.7, schedule_steps=2)
    assert t.update(1e308) == 1e308
    t.update(0.0)
    assert t.update(0.0) == 1.7 * 1e308
    json_round_trip(t.state_dict())


def test_huge_python_int_is_not_finite():
    # Regression (issue 11): OverflowError on d15f0c3 (fixed by checks.py in 96176c8).
    t = AnchoredTarget()
    with pytest.raises(ValueError, match="entropy"):
        t.update(10**400)
    assert t.anchor is None
