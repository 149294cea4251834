"""DifficultyAllocator against a float64 loop reference; id types, equivariance, state, bad input."""

from __future__ import annotations

import collections
import json
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_reg.difficulty import DifficultyAllocator, group_index
from tests.resume import arguments, check_resume, finite

SETTINGS = settings(max_examples=40, deadline=None)


def reference(scores, ids, rule, threshold=0.5, success=0.5, normalize=True):
    """Per-response weights from the formulas, with plain Python loops."""
    solved, count = defaultdict(float), defaultdict(int)
    for s, g in zip(scores, ids, strict=True):
        solved[g] += 1.0 if s > success else 0.0
        count[g] += 1
    acc = {g: solved[g] / count[g] for g in count}
    if rule == "linear":
        w = [1.0 - acc[g] for g in ids]
    elif rule == "threshold":
        w = [1.0 if acc[g] < threshold else 0.0 for g in ids]
    else:
        w = [1.0 for _ in ids]
    mean = sum(w) / len(w)
    if normalize and mean > 0:
        w = [x / mean for x in w]
    return np.array(w), acc


@st.composite
def batches(draw):
    n = draw(st.integers(min_value=1, max_value=40))
    ids = draw(st.lists(st.integers(min_value=0, max_value=7), min_size=n, max_size=n))
    scores = draw(st.lists(st.sampled_from([0.0, 1.0, 0.3, 0.7, -1.0]), min_size=n, max_size=n))
    return scores, ids


@pytest.mark.parametrize("rule", ["linear", "threshold", "uniform"])
@pytest.mark.parametrize("normalize", [True, False])
@settings(max_examples=25, deadline=None)
@given(batch=batches(), threshold=st.floats(min_value=0.05, max_value=1.0))
def test_matches_reference(rule, normalize, batch, threshold):
    scores, ids = batch
    alloc = DifficultyAllocator(rule, threshold=threshold, normalize=normalize)
    got = alloc(torch.tensor(scores), torch.tensor(ids))
    want, acc = reference(scores, ids, rule, threshold=threshold, normalize=normalize)
    assert got.dtype == torch.float32 and got.shape == (len(scores),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(got).all() and (got >= 0).all()
    if normalize:
        assert got.double().mean().item() == pytest.approx(1.0, rel=1e-6) or (got == 0).all()
    else:
        assert (got <= 1.0).all()
    accs = list(acc.values())
    assert alloc.stats["accuracy"] == pytest.approx(np.mean(accs))
    assert alloc.stats["solved_groups"] == pytest.approx(np.mean([a == 1.0 for a in accs]))
    assert alloc.stats["unsolved_groups"] == pytest.approx(np.mean([a == 0.0 for a in accs]))
    assert alloc.stats["mixed_groups"] == pytest.approx(np.mean([0.0 < a < 1.0 for a in accs]))
    assert alloc.stats["num_groups"] == len(accs)


@SETTINGS
@given(batch=batches(), seed=st.integers(min_value=0, max_value=2**16))
def test_permutation_equivariance(batch, seed):
    scores, ids = batch
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    alloc = DifficultyAllocator("linear")
    w = alloc(torch.tensor(scores), torch.tensor(ids))
    wp = alloc(torch.tensor(scores)[perm], torch.tensor(ids)[perm])
    torch.testing.assert_close(wp, w[perm], rtol=1e-6, atol=0)


def test_group_id_types_agree():
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    uid = ["u7", "u7", "u2", "u2", "u2", "zz", "zz", "u7"]
    ints = [1, 1, 0, 0, 0, 2, 2, 1]
    want, _ = reference(scores, uid, "linear")
    alloc = DifficultyAllocator()
    variants = [
        np.array(uid, dtype=object),  # verl's uid
        np.array(uid),
        uid,
        tuple(uid),
        ints,
        torch.tensor(ints),
        np.array(ints, dtype=np.int32),
    ]
    for ids in variants:
        np.testing.assert_allclose(alloc(torch.tensor(scores), ids).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(alloc(scores, uid).numpy(), want, rtol=1e-6)  # a list of scores too


def test_ints_and_strings_are_not_merged():
    # np.asarray([1, "1"]) would merge both into "1"; mixing types is an error instead.
    with pytest.raises(TypeError, match="group_ids"):
        group_index([1, "1", 1], 3)
    inverse, n = group_index(["b", "a", "b"], 3)
    assert n == 2 and inverse[0] == inverse[2] != inverse[1]


def test_plus_minus_one_rewards():
    # DAPO-style +1/-1 rewards: solved means score > 0.
    alloc = DifficultyAllocator("linear", success_threshold=0.0, normalize=False)
    w = alloc(torch.tensor([1.0, -1.0, -1.0, -1.0]), [0, 0, 1, 1])
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 1.0, 1.0]))
    acc = alloc.group_accuracy(torch.tensor([1.0, -1.0, -1.0, -1.0]), [0, 0, 1, 1])
    torch.testing.assert_close(acc, torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_threshold_rule_example():
    alloc = DifficultyAllocator("threshold", threshold=0.5, normalize=True)
    # accuracies: g0 = 1/4, g1 = 2/4 (not < 0.5), g2 = 0
    scores = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32)
    ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    w = alloc(scores, ids)
    # raw weights 1,0,1 per group -> mean 2/3 -> normalized 1.5
    torch.testing.assert_close(w, torch.tensor([1.5] * 4 + [0.0] * 4 + [1.5] * 4))
    assert alloc.stats["weight_mean"] == pytest.approx(2 / 3)


def test_all_solved_stays_zero_not_nan():
    alloc = DifficultyAllocator("linear", normalize=True)
    w = alloc(torch.ones(6), [0, 0, 1, 1, 2, 2])
    assert torch.equal(w, torch.zeros(6))
    assert alloc.stats["solved_groups"] == 1.0 and alloc.stats["weight_mean"] == 0.0


def test_callable_rule():
    alloc = DifficultyAllocator(lambda acc: 4.0 * acc * (1.0 - acc), normalize=False)
    w = alloc(torch.tensor([1.0, 0.0, 1.0, 1.0]), [0, 0, 1, 1])
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    alloc = DifficultyAllocator(lambda acc: (1.0 - acc).numpy() ** 2, normalize=False)
    torch.testing.assert_close(alloc([0.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.25, 0.25]))


@pytest.mark.parametrize(
    "rule, error",
    [
        (lambda acc: -acc, ValueError),
        (lambda acc: acc * float("nan"), ValueError),
        (lambda acc: acc[:1], ValueError),
        (lambda acc: "heavy", TypeError),
    ],
)
def test_bad_callable_rule_leaves_state(rule, error):
    alloc = DifficultyAllocator(rule)
    alloc._apply({"stats": {}})
    with pytest.raises(error, match="rule"):
        alloc(torch.tensor([1.0, 0.0]), [0, 1])
    assert alloc.stats == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_give_cuda_weights():
    w = DifficultyAllocator()(torch.tensor([1.0, 0.0], device="cuda"), torch.tensor([0, 0], device="cuda"))
    assert w.device.type == "cuda"
    torch.testing.assert_close(w.cpu(), torch.tensor([1.0, 1.0]))


def test_state_round_trip_and_metrics():
    alloc = DifficultyAllocator()
    alloc(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), [0, 0, 1, 1, 2, 2])
    other = DifficultyAllocator()
    other.load_state_dict(json.loads(json.dumps(alloc.state_dict())))
    assert other.metrics() == alloc.metrics()
    m = alloc.metrics("p/")
    assert m == {
        "p/difficulty/accuracy": pytest.approx(0.5),
        "p/difficulty/solved_groups": pytest.approx(1 / 3),
        "p/difficulty/unsolved_groups": pytest.approx(1 / 3),
        "p/difficulty/mixed_groups": pytest.approx(1 / 3),
        "p/difficulty/weight_mean": pytest.approx(0.5),
        "p/difficulty/num_groups": 3.0,
    }


@pytest.mark.parametrize(
    "scores, ids, name, error",
    [
        (torch.tensor([]), [], "scores", ValueError),
        (torch.tensor([1.0, float("nan")]), [0, 1], "scores", ValueError),
        (torch.tensor([1.0, float("inf")]), [0, 1], "scores", ValueError),
        (torch.ones(2, 2), [0, 1], "scores", ValueError),
        (torch.tensor([True, False]), [0, 1], "scores", TypeError),
        (["a", "b"], [0, 1], "scores", TypeError),
        (torch.tensor([1.0, 0.0]), [0, 1, 2], "group_ids", ValueError),
        (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), "group_ids", TypeError),
        (torch.tensor([1.0, 0.0]), np.array([[0, 1]]), "group_ids", ValueError),
        (torch.tensor([1.0, 0.0]), np.array([0, "a"], dtype=object), "group_ids", TypeError),
        (torch.tensor([1.0, 0.0]), 3, "group_ids", TypeError),
    ],
)
def test_bad_input_leaves_state(scores, ids, name, error):
    alloc = DifficultyAllocator()
    alloc(torch.tensor([1.0, 0.0]), [0, 0])
    before = alloc.state_dict()
    with pytest.raises(error, match=name):
        alloc(scores, ids)
    assert alloc.state_dict() == before


@pytest.mark.parametrize(
    "kwargs, name, error",
    [
        (dict(rule="quadratic"), "rule", ValueError),
        (dict(rule=3), "rule", TypeError),
        (dict(threshold=0.0), "threshold", ValueError),
        (dict(threshold=1.5), "threshold", ValueError),
        (dict(success_threshold=float("nan")), "success_threshold", ValueError),
        (dict(normalize=1), "normalize", TypeError),
    ],
)
def test_bad_construction(kwargs, name, error):
    with pytest.raises(error, match=name):
        DifficultyAllocator(**kwargs)


def test_bad_state_leaves_state():
    alloc = DifficultyAllocator()
    alloc(torch.tensor([1.0, 0.0]), [0, 0])
    before = alloc.state_dict()
    for bad in ({"stats": {"accuracy": 0.5}}, {"stats": 3}, {}, {"stats": {**before["stats"], "accuracy": float("nan")}}):
        with pytest.raises((ValueError, TypeError), match="stats"):
            alloc.load_state_dict(bad)
        assert alloc.state_dict() == before


def test_any_sequence_of_ids_is_a_sequence():
    # Regression (issue 11): range(n) was rejected while a list of floats was accepted.
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    ids = [0, 1, 2, 3, 4, 5]
    want, _ = reference(scores, ids, "linear")
    alloc = DifficultyAllocator()
    variants = [
        range(6),
        collections.deque(ids),
        [np.int64(i) for i in ids],
        [torch.tensor(i) for i in ids],  # one-element integer tensors are counts too
        np.array(ids, dtype=object),
        [2**70 + i for i in ids],  # beyond int64 (hashed prompt ids) stays exact
        np.array([f"p{i}" for i in ids]),
    ]
    for group_ids in variants:
        np.testing.assert_allclose(alloc(scores, group_ids).numpy(), want, rtol=1e-6)
    # two ids 1 apart above 2**63 are two groups, not one (a float64 round trip would merge them)
    inverse, n = group_index([2**64, 2**64 + 1], 2)
    assert n == 2 and inverse.tolist() == [0, 1]


@pytest.mark.parametrize(
    "ids, error",
    [
        ([0.0, 1.0], TypeError),  # floats are not ids: 1.0 and 1 would merge
        ([0, 1.5], TypeError),
        ([True, False], TypeError),
        (np.array([True, False]), TypeError),
        (torch.tensor([True, False]), TypeError),
        (np.array([0.0, 1.0]), TypeError),
        ([b"a", b"b"], TypeError),  # ids are integers or str, in a list or an array alike
        (np.array([b"a", b"b"]), TypeError),
        ("ab", TypeError),  # text is not a sequence of ids
        ({0: 0, 1: 1}, TypeError),
        ([[0], [1]], TypeError),
        (range(3), ValueError),
        (np.array(["a", "b"], dtype=object).reshape(1, 2), ValueError),
    ],
)
def test_ids_that_are_not_ids(ids, error):
    alloc = DifficultyAllocator()
    alloc([1.0, 0.0], [0, 0])
    before = alloc.state_dict()
    with pytest.raises(error, match="group_ids"):
        alloc([1.0, 0.0], ids)
    assert alloc.state_dict() == before


def test_scores_of_every_kind():
    want, _ = reference([1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1], "linear")
    alloc = DifficultyAllocator()
    for scores in (
        [1, 0, 0, 0],
        (np.float32(1.0), np.float64(0.0), torch.tensor(0.0), np.int8(0)),
        range(1, -3, -1),  # 1, 0, -1, -2
        np.array([1, 0, 0, 0], dtype=np.int16),
        np.array([1.0, 0.0, 0.0, 0.0], dtype=object),
    ):
        np.testing.assert_allclose(alloc(scores, [0, 0, 1, 1]).numpy(), want, rtol=1e-6)


@pytest.mark.parametrize(
    "scores, error",
    [
        ([1.0, 10**400], ValueError),  # was OverflowError
        ([1.0, float("nan")], ValueError),  # plain floats take the fast path: still checked
        ([1.0, -float("inf")], ValueError),
        ([True, False], TypeError),  # bools are not numbers
        (np.array([True, False]), TypeError),
        ([1.0, None], TypeError),
        ("10", TypeError),
        (np.array(["1", "0"]), TypeError),
    ],
)
def test_scores_that_are_not_numbers(scores, error):
    alloc = DifficultyAllocator()
    with pytest.raises(error, match="scores"):
        alloc(scores, [0, 1])
    assert alloc.stats == {}


def test_normalize_is_a_flag():
    assert DifficultyAllocator(normalize=np.bool_(False)).normalize is False
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="normalize"):
            DifficultyAllocator(normalize=bad)


def test_weights_whose_mean_overflows_are_rejected():
    # Finite weights near the float maximum: their mean (a state entry) would be inf.
    alloc = DifficultyAllocator(lambda acc: torch.full_like(acc, sys.float_info.max))
    alloc([1.0], [0])
    before = alloc.state_dict()
    with pytest.raises(ValueError, match="rule"):
        alloc([1.0, 0.0], [0, 1])
    assert alloc.state_dict() == before


def test_load_state_is_strict():
    alloc = DifficultyAllocator()
    alloc([1.0, 0.0], [0, 0])
    before = alloc.state_dict()
    for bad in ({**before, "rule": "linear"}, {"stats": {**before["stats"], "extra": 1.0}}, ["stats"]):
        with pytest.raises((ValueError, TypeError), match="state"):
            alloc.load_state_dict(bad)
        assert alloc.state_dict() == before


@settings(max_examples=100, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.lists(arguments, min_size=1, max_size=4), st.lists(st.integers(0, 2), min_size=1, max_size=4)),
        max_size=6,
    ),
    scale=finite,
)
def test_every_reachable_state_is_json_safe_and_resumes_exactly(calls, scale):
    def make() -> DifficultyAllocator:
        # a callable rule with weights up to `scale` (finite, possibly the float maximum)
        return DifficultyAllocator(lambda acc: (1.0 - acc) * scale)

    check_resume(make, [lambda a, s=s, g=g: a(s, g) for s, g in calls])
