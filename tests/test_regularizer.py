"""AdaptiveEntropyRegularizer: coefficients, loss and its gradient, update order, state, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_reg.aggregation import AGG_MODES
from entropy_reg.regularizer import AdaptiveEntropyRegularizer, AERConfig
from tests.resume import arguments, check_resume, finite, json_round_trip


def _reg(**kw) -> AdaptiveEntropyRegularizer:
    return AdaptiveEntropyRegularizer(AERConfig(**kw))


def test_coefficients_are_alpha_times_weights():
    reg = _reg(coef_init=2e-3)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    ids = np.array(["a", "a", "b", "b", "c", "c"], dtype=object)
    # accuracies 0.5, 0, 1 -> linear weights 0.5, 1, 0 -> mean 0.5 -> normalized 1, 2, 0
    want = 2e-3 * torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0, 0.0])
    torch.testing.assert_close(reg.coefficients(scores, ids), want)
    assert reg.value == 2e-3


@pytest.mark.parametrize("agg", AGG_MODES)
def test_loss_value_and_gradient(agg):
    g = torch.Generator().manual_seed(3)
    ent = (torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    c = torch.tensor([1e-3, 0.0, 4e-3], dtype=torch.float64)
    loss = AdaptiveEntropyRegularizer().loss(ent, mask, c, agg=agg)
    # float64 reference from the formulas: minus the aggregate of c_i * H_it
    e, m = ent.detach().numpy(), mask.numpy()
    n_i = m.sum(1)
    seq_sum = np.array([(c[i].item() * e[i] * m[i]).sum() for i in range(3)])
    ref = {
        "token-mean": seq_sum.sum() / m.sum(),
        "token-sum": seq_sum.sum(),
        "seq-mean-token-sum": seq_sum.mean(),
        "seq-mean-token-mean": (seq_sum / n_i).mean(),
        "seq-mean-token-sum-norm": seq_sum.mean() / 4,
    }[agg]
    assert loss.item() == pytest.approx(-ref, rel=1e-12)
    loss.backward()
    row_scale = {
        "token-mean": np.full(3, 1 / m.sum()),
        "token-sum": np.ones(3),
        "seq-mean-token-sum": np.full(3, 1 / 3),
        "seq-mean-token-mean": 1 / (3 * n_i),
        "seq-mean-token-sum-norm": np.full(3, 1 / 12),
    }[agg]
    want = -(c.numpy() * row_scale)[:, None] * m
    np.testing.assert_allclose(ent.grad.numpy(), want, rtol=1e-12, atol=0)


def test_loss_scalar_coefficient_and_agg_kwargs():
    ent = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    reg = AdaptiveEntropyRegularizer()
    assert reg.loss(ent, mask, 0.5).item() == pytest.approx(-0.5 * 2.5)
    got = reg.loss(ent, mask, 0.5, agg="token-mean", dp_size=2, batch_num_tokens=8)
    assert got.item() == pytest.approx(-0.5 * 10 / 8 * 2)


def test_loss_does_not_differentiate_through_coefficients():
    c = torch.tensor([1.0, 2.0], requires_grad=True)
    ent = torch.ones(2, 3, requires_grad=True)
    AdaptiveEntropyRegularizer().loss(ent, torch.ones(2, 3), c).backward()
    assert c.grad is None and ent.grad is not None


def test_update_order_warmup_then_control():
    reg = _reg(target_ratio=0.5, warmup_steps=2, coef_rule="proportional", coef_lr=1e-3, coef_smoothing=0.0)
    m = reg.update(2.0)
    assert reg.value == 0.0 and m["aer/warmup_remaining"] == 1.0 and m["aer/entropy"] == 2.0
    m = reg.update(torch.tensor(1.0))  # anchor 1.5, target 0.75, H above target: alpha stays at 0
    assert reg.value == 0.0 and m["aer/target"] == pytest.approx(0.75)
    m = reg.update(0.5)  # alpha = 0 + 1e-3 * (0.75 - 0.5) / 0.75
    assert reg.value == pytest.approx(1e-3 / 3, rel=1e-12)
    assert m["aer/coef"] == reg.value and m["aer/rel_error"] == pytest.approx(1 / 3)
    assert all(isinstance(v, float) for v in m.values())
    assert set(reg.update(0.5, prefix="x/")) >= {"x/coef", "x/target", "x/anchor", "x/entropy"}


@settings(max_examples=30, deadline=None)
@given(
    seq=st.lists(st.floats(min_value=0.01, max_value=5.0), min_size=1, max_size=25),
    cut=st.integers(min_value=0, max_value=25),
    rule=st.sampled_from(["proportional", "sign", "log"]),
)
def test_resume_is_bit_exact(seq, cut, rule):
    cut = min(cut, len(seq))
    kw = dict(coef_rule=rule, warmup_steps=2, final_ratio=0.3, schedule_steps=6)
    if rule == "log":
        kw.update(coef_init=1e-3, coef_min=1e-5)
    scores, ids = torch.tensor([1.0, 0.0, 0.0, 0.0]), [0, 0, 1, 1]

    ref = _reg(**kw)
    want = []
    for h in seq:
        ref.coefficients(scores, ids)
        want.append(ref.update(h))
    run = _reg(**kw)
    for h in seq[:cut]:
        run.coefficients(scores, ids)
        run.update(h)
    resumed = _reg(**kw)
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    assert resumed.metrics() == run.metrics()
    got = []
    for h in seq[cut:]:
        resumed.coefficients(scores, ids)
        got.append(resumed.update(h))
    assert got == want[cut:]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, torch.ones(3), "x"])
def test_bad_update_changes_nothing(bad):
    reg = _reg(warmup_steps=2)
    reg.update(1.0)
    before = reg.state_dict()
    with pytest.raises((ValueError, TypeError), match="entropy"):
        reg.update(bad)
    assert reg.state_dict() == before


def test_update_is_atomic_when_controller_rejects(monkeypatch):
    # The target has already taken the entropy when the controller runs: if the controller
    # raises, the regularizer must roll the target back. (The controller no longer rejects
    # any target that AnchoredTarget gives, so a stub raises here.)
    reg = _reg(warmup_steps=2)
    reg.update(1.0)
    before = reg.state_dict()

    def refuse(entropy, target):
        raise ValueError("target: refused")

    monkeypatch.setattr(reg.controller, "update", refuse)
    with pytest.raises(ValueError, match="target"):
        reg.update(1.0)
    assert reg.state_dict() == before


def test_tiny_first_entropy_keeps_the_state_resumable():
    # Regression (issue 11): update(1e-310) then update(1.0) stored last_error = -inf.
    reg = _reg()
    reg.update(1e-310)
    metrics = reg.update(1.0)
    assert metrics["aer/rel_error"] == -sys.float_info.max and metrics["aer/coef"] == reg.controller.min_value
    resumed = _reg()
    resumed.load_state_dict(json_round_trip(reg.state_dict()))
    assert resumed.state_dict() == reg.state_dict()
    assert resumed.update(0.5) == reg.update(0.5)


def test_subnormal_anchor_whose_target_is_zero_is_rejected():
    # 0.4 * 5e-324 rounds to 0: no target of 0 nats, neither built in nor fed in.
    with pytest.raises(ValueError, match="initial_entropy"):
        _reg(initial_entropy=5e-324, target_ratio=0.4)
    reg = _reg(target_ratio=0.4)
    with pytest.raises(ValueError, match="entropy"):
        reg.update(5e-324)
    assert reg.target.anchor is None and reg.last_entropy is None


def test_huge_python_int_is_not_finite():
    # Regression (issue 11): OverflowError on d15f0c3 (fixed by checks.py in 96176c8).
    reg = _reg()
    with pytest.raises(ValueError, match="entropy"):
        reg.update(10**400)
    with pytest.raises(ValueError, match="coefficients"):
        reg.loss(torch.ones(1, 2), torch.ones(1, 2), 10**400)


@pytest.mark.parametrize("where", [None, "controller", "target", "allocator"])
def test_load_state_rejects_unknown_keys(where):
    reg = _reg()
    reg.coefficients([1.0, 0.0], [0, 0])
    reg.update(1.0)
    before = reg.state_dict()
    bad = json_round_trip(before)
    (bad if where is None else bad[where])["surprise"] = 0
    with pytest.raises(ValueError, match="surprise"):
        reg.load_state_dict(bad)
    assert reg.state_dict() == before


@st.composite
def aer_calls(draw):
    """One public call: update(entropy) or coefficients(scores, group_ids)."""
    if draw(st.booleans()):
        h = draw(arguments)
        return lambda reg: reg.update(h)
    n = draw(st.integers(min_value=1, max_value=4))
    scores = draw(st.lists(arguments, min_size=n, max_size=n))
    ids = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return lambda reg: reg.coefficients(scores, ids)


@settings(max_examples=150, deadline=None)
@given(
    rule=st.sampled_from(["proportional", "sign", "log"]),
    warmup=st.integers(min_value=1, max_value=2),
    ratio=st.sampled_from([1e-300, 0.5, 1.5, 1e300]),
    lr=st.one_of(st.none(), finite),
    calls=st.lists(aer_calls(), max_size=10),
)
def test_every_reachable_state_is_json_safe_and_resumes_exactly(rule, warmup, ratio, lr, calls):
    kw = dict(coef_rule=rule, coef_lr=lr, warmup_steps=warmup, target_ratio=ratio, final_ratio=0.3, schedule_steps=3)
    if rule == "log":
        kw.update(coef_init=1e-3, coef_min=1e-5)
    check_resume(lambda: _reg(**kw), calls)


def test_bad_state_changes_nothing():
    reg = _reg()
    reg.coefficients(torch.tensor([1.0, 0.0]), [0, 0])
    reg.update(1.0)
    before = reg.state_dict()
    good = json.loads(json.dumps(before))
    for part, key, value in [
        ("controller", "value", 1.0),  # above coef_max: the last part checked
        ("target", "anchor", -1.0),
        ("allocator", "stats", 4),
    ]:
        bad = json.loads(json.dumps(good))
        bad[part][key] = value
        # the message names the part and the key: state['target']['anchor']
        with pytest.raises((ValueError, TypeError), match=rf"state\['{part}'\]\['{key}'\]"):
            reg.load_state_dict(bad)
        assert reg.state_dict() == before
    with pytest.raises(ValueError, match="last_entropy"):
        reg.load_state_dict({**good, "last_entropy": float("nan")})
    with pytest.raises(ValueError, match="missing"):
        reg.load_state_dict({"target": good["target"]})
    assert reg.state_dict() == before


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(target_ratio=0.0), "target_ratio"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(coef_rule="pid"), "coef_rule"),
        (dict(coef_min=1.0, coef_max=0.1), "coef_min"),
        (dict(coef_lr=-1.0), "coef_lr"),
        (dict(coef_init=0.5), "coef_init"),
        (dict(coef_damping=-1.0), "coef_damping"),
        (dict(coef_smoothing=1.0), "coef_smoothing"),
        (dict(coef_max=float("inf")), "coef_max"),
        (dict(difficulty_rule="cubic"), "difficulty_rule"),
        (dict(difficulty_threshold=2.0), "difficulty_threshold"),
        (dict(success_threshold=float("nan")), "success_threshold"),
    ],
)
def test_bad_config_errors_name_the_field_the_user_typed(kwargs, name):
    """The message starts with AERConfig's field, never the component's own argument name."""
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _reg(**kwargs)


def test_config_names_leave_quoted_values_alone():
    with pytest.raises(ValueError, match="'threshold'") as info:
        _reg(difficulty_rule="cubic")  # the rule named 'threshold' is a value, not the field
    assert "'difficulty_threshold'" not in str(info.value)


def test_bad_loss_inputs():
    reg = AdaptiveEntropyRegularizer()
    ent, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="coefficients"):
        reg.loss(ent, mask, torch.ones(3))
    with pytest.raises(ValueError, match="entropy"):
        reg.loss(torch.ones(6), torch.ones(6), 1.0)
    with pytest.raises(ValueError, match="coefficients"):
        reg.loss(ent, mask, float("nan"))
    with pytest.raises(ValueError, match="mode"):
        reg.loss(ent, mask, 1.0, agg="sum")
    with pytest.raises(TypeError, match="config"):
        AdaptiveEntropyRegularizer({"target_ratio": 0.5})  # type: ignore[arg-type]


def test_config_to_dict_is_json_safe():
    cfg = AERConfig(difficulty_rule=lambda acc: 1 - acc)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["target_ratio"] == 0.5 and "lambda" in d["difficulty_rule"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_end_to_end():
    from entropy_reg.distributed import masked_mean

    reg = _reg(coef_init=1e-3)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0], device="cuda")
    coefs = reg.coefficients(scores, np.array(["a", "a", "b", "b"], dtype=object))
    assert coefs.device.type == "cuda"
    ent = torch.rand(4, 5, device="cuda", requires_grad=True)
    mask = torch.rand(4, 5, device="cuda") < 0.7
    mask[:, 0] = True
    loss = reg.loss(ent, mask, coefs, agg="token-mean", dp_size=1, batch_num_tokens=torch.tensor(float(mask.sum())))
    loss.backward()
    want = -(coefs.cpu()[:, None] * ent.detach().cpu() * mask.cpu()).sum() / mask.sum().cpu()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    h = masked_mean(ent.detach(), mask)
    assert h.device.type == "cuda"
    reg.update(h)


def test_resolved_fills_each_none_with_the_rules_default():
    # The documented defaults by rule (entropy_reg.controller's docstring).
    log = AERConfig().resolved()
    assert (log.coef_rule, log.coef_lr, log.coef_damping, log.coef_smoothing) == ("log", 0.05, 1.0, 0.9)
    assert log.coef_init == log.coef_min == 1e-4 and log.coef_max == 1e-2
    add = AERConfig(coef_rule="proportional", coef_min=1e-3).resolved()
    assert (add.coef_lr, add.coef_damping, add.coef_init, add.coef_min) == (1e-4, 0.0, 1e-3, 1e-3)
    # Already resolved: unchanged; and a regularizer built from either holds the same controller.
    assert log.resolved() == log
    a, b = AdaptiveEntropyRegularizer(AERConfig()), AdaptiveEntropyRegularizer(log)
    for h in (1.0, 0.4, 0.3, 0.2):
        assert a.update(h) == b.update(h)
    assert a.state_dict() == b.state_dict()
    # A bad setting fails in resolved() as it would in the regularizer, naming the argument.
    with pytest.raises(ValueError, match="coef_min"):
        AERConfig(coef_min=0.0).resolved()


# ---------------------------------------------------------------- state format versions

FIXTURE_0_1_0 = Path(__file__).parent / "fixtures" / "state_0_1_0.json"
# The 0.1 controller's behaviour in today's settings: integral rule alone, no smoothing, 0.1's range.
SETTINGS_0_1 = dict(coef_rule="proportional", coef_init=0.0, coef_min=0.0, coef_damping=0.0, coef_smoothing=0.0)


def test_state_written_by_0_1_0_resumes_as_0_1_0_continued():
    """tests/fixtures/state_0_1_0.json was written by the 0.1.0 code (make_state_0_1_0.py)."""
    fixture = json.loads(FIXTURE_0_1_0.read_text())
    assert fixture["version"] == "0.1.0" and "format_version" not in fixture["state"]
    reg = AdaptiveEntropyRegularizer(AERConfig(**{**SETTINGS_0_1, **fixture["settings"]}))
    reg.load_state_dict(fixture["state"])
    assert reg.state_dict()["format_version"] == 2
    assert reg.controller.integral == fixture["state"]["controller"]["value"]
    assert reg.controller.smoothed is None
    alphas = []
    for h in fixture["after"]:
        reg.update(h)
        alphas.append(reg.value)
    assert alphas == pytest.approx(fixture["alphas_after"], rel=1e-12, abs=0.0)


def test_state_of_an_unknown_format_version_is_refused_and_changes_nothing():
    reg = _reg()
    reg.update(1.0)
    before = reg.state_dict()
    with pytest.raises(ValueError, match=r"state\['format_version'\]"):
        reg.load_state_dict({**before, "format_version": 3})
    assert reg.state_dict() == before
