"""aggregate(): verl's five loss_agg_modes against float64 loop references and verl 0.9.1's own
agg_loss, gradients, dp splits, all-masked micro-batches."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_reg.aggregation import AGG_MODES, aggregate

SETTINGS = settings(max_examples=30, deadline=None)


def reference(v, m, mode, dp=1, tokens=None, seqs=None, scale=None):
    """Loop reference in float64, written from verl's formulas."""
    v, m = np.asarray(v, dtype=np.float64), np.asarray(m, dtype=np.float64)
    rows = range(v.shape[0])
    if mode == "token-mean":
        num = sum(v[i, t] * m[i, t] for i in rows for t in range(v.shape[1]) if m[i, t] != 0)
        n = m.sum() if tokens is None else tokens
        return 0.0 if n == 0 else num / n * dp
    if mode == "token-sum":
        return sum(v[i, t] * m[i, t] for i in rows for t in range(v.shape[1]) if m[i, t] != 0) * dp
    per_seq = []
    for i in rows:
        n_i = m[i].sum()
        if n_i == 0:
            continue
        s = sum(v[i, t] * m[i, t] for t in range(v.shape[1]) if m[i, t] != 0)
        per_seq.append(s / n_i if mode == "seq-mean-token-mean" else s)
    b = len(per_seq) if seqs is None else seqs
    loss = 0.0 if b == 0 else sum(per_seq) / b * dp
    if mode == "seq-mean-token-sum-norm":
        loss /= v.shape[1] if scale is None else scale
    return loss


@st.composite
def problems(draw):
    b = draw(st.integers(min_value=1, max_value=6))
    t = draw(st.integers(min_value=1, max_value=9))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < draw(st.floats(min_value=0.0, max_value=1.0))
    return values, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@SETTINGS
@given(problem=problems())
def test_matches_reference_and_gradient(mode, problem):
    values, mask = problem
    v = values.clone().requires_grad_(True)
    out = aggregate(v, mask, mode)
    assert out.dim() == 0 and out.dtype == torch.float64
    assert out.item() == pytest.approx(reference(values, mask, mode), rel=1e-12, abs=1e-12)
    out.backward()
    # The aggregate is linear in v: its gradient is the reference applied to unit vectors.
    want = np.zeros(values.shape)
    for i in range(values.shape[0]):
        for t in range(values.shape[1]):
            e = np.zeros(values.shape)
            e[i, t] = 1.0
            want[i, t] = reference(e, mask, mode)
    np.testing.assert_allclose(v.grad.numpy(), want, rtol=1e-12, atol=1e-15)


def test_hand_example():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(v, m, "token-mean").item() == pytest.approx(7.0 / 3)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx((3.0 + 4.0) / 2)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4.0) / 2)
    assert aggregate(v, m, "seq-mean-token-sum-norm").item() == pytest.approx((3.0 + 4.0) / 2 / 3)
    assert aggregate(v, m, "seq-mean-token-sum-norm", loss_scale_factor=10).item() == pytest.approx(0.35)


def test_default_mode_is_token_mean_and_float_mask_weights():
    v = torch.tensor([[1.0, 3.0]])
    assert aggregate(v, torch.tensor([[True, True]])).item() == pytest.approx(2.0)
    # numeric masks weight tokens, as verl's loss_mat * loss_mask does
    assert aggregate(v, torch.tensor([[1.0, 0.5]])).item() == pytest.approx((1.0 + 1.5) / 1.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_data_parallel_split_averages_to_global(mode):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    m = torch.rand(6, 5, generator=g) < 0.6
    m[2] = False  # an empty sequence
    full = aggregate(v, m, mode)
    tokens = m.sum().item()
    seqs = int((m.sum(-1) > 0).sum())
    shards = [slice(0, 2), slice(2, 5), slice(5, 6)]
    per_rank = [
        aggregate(v[s], m[s], mode, dp_size=3, batch_num_tokens=tokens, global_batch_size=seqs, loss_scale_factor=5)
        for s in shards
    ]
    # data-parallel gradient averaging = mean of the ranks' losses
    assert (sum(per_rank) / 3).item() == pytest.approx(full.item(), rel=1e-12)
    # tensor denominators (no host sync) give the same
    t_rank = aggregate(
        v[:2],
        m[:2],
        mode,
        dp_size=3,
        batch_num_tokens=torch.tensor(tokens),
        global_batch_size=torch.tensor(seqs),
        loss_scale_factor=5,
    )
    assert t_rank.item() == pytest.approx(per_rank[0].item(), rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_nan_padding_does_not_leak_and_empty_is_zero(mode):
    v = torch.tensor([[1.0, float("nan")], [float("nan"), float("inf")]], requires_grad=True)
    m = torch.tensor([[True, False], [False, False]])
    out = aggregate(v, m, mode)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(v.grad).all() and v.grad[0, 1] == 0 and (v.grad[1] == 0).all()
    empty = aggregate(v, torch.zeros_like(m), mode)
    assert empty.item() == 0.0 and empty.requires_grad


def test_low_precision_values_aggregate_in_float32():
    v = torch.full((2, 300), 1.01, dtype=torch.bfloat16)
    out = aggregate(v, torch.ones(2, 300, dtype=torch.bool), "seq-mean-token-sum")
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(300 * float(v[0, 0]), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, name, error",
    [
        (dict(mode="mean"), "mode", ValueError),
        (dict(mode=None), "mode", TypeError),
        (dict(mode="token-mean", dp_size=2), "batch_num_tokens", ValueError),
        (dict(mode="seq-mean-token-sum", dp_size=2), "global_batch_size", ValueError),
        (dict(mode="seq-mean-token-mean", dp_size=2, batch_num_tokens=3), "global_batch_size", ValueError),
        (dict(mode="token-mean", dp_size=0), "dp_size", ValueError),
        (dict(mode="token-mean", batch_num_tokens=float("nan")), "batch_num_tokens", ValueError),
        (dict(mode="token-mean", batch_num_tokens=-1), "batch_num_tokens", ValueError),
        (dict(mode="token-mean", batch_num_tokens=torch.ones(2)), "batch_num_tokens", ValueError),
        (dict(mode="seq-mean-token-sum-norm", loss_scale_factor=0.0), "loss_scale_factor", ValueError),
        (dict(mode="seq-mean-token-sum-norm", loss_scale_factor=float("inf")), "loss_scale_factor", ValueError),
    ],
)
def test_bad_arguments(kwargs, name, error):
    v, m = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(error, match=name):
        aggregate(v, m, **kwargs)


@pytest.mark.parametrize(
    "values, mask, name, error",
    [
        ([[1.0]], torch.ones(1, 1), "values", TypeError),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), "values", TypeError),
        (torch.ones(6), torch.ones(6), "values", ValueError),
        (torch.ones(2, 3), torch.ones(3, 2), "mask", ValueError),
        (torch.ones(2, 3), None, "mask", TypeError),
    ],
)
def test_bad_tensors(values, mask, name, error):
    with pytest.raises(error, match=name):
        aggregate(values, mask)


verl_agg_loss = pytest.importorskip("verl.trainer.ppo.core_algos").agg_loss  # installed by `make test`


def test_modes_are_those_verl_accepts():
    # verl 0.9.1's ActorConfig checks loss_agg_mode against a literal list inside a method.
    import verl
    from verl.workers.config.actor import ActorConfig

    listed = re.search(r"valid_loss_agg_modes = \[(.*?)\]", inspect.getsource(ActorConfig), re.S)
    assert verl.__version__ == "0.9.1" and listed is not None
    assert sorted(re.findall(r'"([a-z-]+)"', listed.group(1))) == sorted(AGG_MODES)


@pytest.mark.parametrize("mode", AGG_MODES)
@SETTINGS
@given(problem=problems(), dp=st.integers(min_value=1, max_value=4), float_mask=st.booleans())
def test_matches_verl_agg_loss(mode, problem, dp, float_mask):
    """Same value and gradient as verl's own agg_loss wherever verl's value is a number."""
    values, mask = problem
    mask = mask.to(torch.float64) if float_mask else mask
    kwargs = dict(batch_num_tokens=7, global_batch_size=3, loss_scale_factor=5) if dp > 1 else {}
    ours_v = values.clone().requires_grad_(True)
    theirs_v = values.clone().requires_grad_(True)
    ours = aggregate(ours_v, mask, mode, dp_size=dp, **kwargs)
    theirs = verl_agg_loss(theirs_v, mask, mode, dp_size=dp, **kwargs)
    ours.backward()
    theirs.backward()
    if torch.isnan(theirs):  # only an all-masked micro-batch with local denominators: see below
        assert not mask.any() and dp == 1 and ours.item() == 0.0
    else:
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-7, abs=1e-12)  # verl adds 1e-8 to n_i
    np.testing.assert_allclose(ours_v.grad.numpy(), theirs_v.grad.numpy(), rtol=1e-7, atol=1e-15)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_denominators", [False, True])
def test_all_masked_micro_batch_against_verl(mode, global_denominators):
    # What aggregation.py's docstring says verl 0.9.1 does: NaN where it divides 0 by a local 0,
    # 0 for token-sum and with global denominators; gradient 0 either way. Ours is always 0.
    kwargs = dict(dp_size=2, batch_num_tokens=10, global_batch_size=4) if global_denominators else {}
    for mask in (torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3)):
        v = torch.randn(2, 3, requires_grad=True)
        theirs = verl_agg_loss(v, mask, mode, **kwargs)
        theirs.backward()
        verl_nan = not global_denominators and mode != "token-sum"
        assert bool(torch.isnan(theirs)) == verl_nan
        assert (v.grad == 0).all()
        w = v.detach().clone().requires_grad_(True)
        ours = aggregate(w, mask, mode, **kwargs)
        ours.backward()
        assert ours.item() == 0.0 and (w.grad == 0).all()
