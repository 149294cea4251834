"""Vocabulary-parallel entropy / log-probs: the merge formula in-process, then 2 and 4 gloo ranks.

Every rank builds the same full problem from one seed, keeps its Megatron shard
(ids [r * V, (r + 1) * V)), and compares outputs and gradients with float64
references over the full vocabulary, written from the formulas.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_reg import token_entropy, token_logprobs_and_entropy
from entropy_reg.linear import linear_token_entropy
from entropy_reg.partials import merge_parts
from tests.ranks import free_port
from tests.reference import entropy_f64, logprob_f64

F64 = torch.float64
NEG_INF = float("-inf")


def reference(z, labels=None, mask=None, ignore_index=-100):
    """(log p_y or None, H) in float64 of softmax(z) over the full vocabulary; masked and ignored rows 0."""
    keep = torch.ones(z.shape[:-1], dtype=torch.bool) if mask is None else mask.clone()
    logp = None
    if labels is not None:
        keep &= labels != ignore_index
        logp = torch.where(keep, logprob_f64(z, labels), 0.0)
    return logp, torch.where(keep, entropy_f64(z), 0.0)


def part_stats64(z):
    """((m_k, c_k) [2, n], H_k) of each part from the formulas (T = 1): m = max z, c = log sum exp(z - m), H = lse - E[z]."""
    m = z.amax(-1)
    c = torch.logsumexp(z - m.unsqueeze(-1), -1)
    lse = m + c
    p = (z - lse.unsqueeze(-1)).exp()
    return torch.stack([m, c]), lse - (p * torch.where(p > 0, z, 0.0)).sum(-1)


@settings(max_examples=50, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    rows=st.integers(1, 6),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_parts_equals_full_vocabulary(cuts, rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, sum(cuts), generator=g, dtype=F64) * scale
    stats = [part_stats64(part) for part in z.split(cuts, dim=-1)]
    merged, ent = merge_parts(torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]), 1.0)
    _, ref_ent = reference(z)
    torch.testing.assert_close(merged[0], z.amax(-1))
    torch.testing.assert_close(merged[0] + merged[1], torch.logsumexp(z, -1))
    torch.testing.assert_close(ent, ref_ent)


def test_merge_parts_empty_part_has_weight_zero():
    z = torch.tensor([[0.5, -1.0, NEG_INF, NEG_INF, 2.0]], dtype=F64)
    first, h_first = part_stats64(z[:, :2])
    empty = torch.tensor([[NEG_INF], [0.0]], dtype=F64)  # what part_stats gives an all -inf part
    stats_parts = torch.stack([first, empty, torch.tensor([[2.0], [0.0]], dtype=F64)])
    ent_parts = torch.stack([h_first, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64)])
    _, ent = merge_parts(stats_parts, ent_parts, 1.0)
    torch.testing.assert_close(ent, reference(z)[1])
    all_empty = merge_parts(torch.stack([empty, empty]), torch.zeros(2, 1, dtype=F64), 1.0)[1]
    assert torch.isnan(all_empty).all()


# ---------------------------------------------------------------- multi-process


class _CountCollectives:
    """Counts torch.distributed.all_reduce calls (the module under test calls it through `dist`)."""

    def __init__(self):
        self.count = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _close(got, want, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def _check_logits_path(rank, world, seed, dtype, inplace):
    g = torch.Generator().manual_seed(seed)
    vl = int(torch.randint(1, 9, (1,), generator=g))
    b, t, vocab = 2, 5, vl * world
    z = torch.randn(b, t, vocab, generator=g, dtype=F64) * 3
    z[0, 1, : vl * (world - 1)] = NEG_INF  # only the last shard is finite on this row
    z[1, 2, vl:] = NEG_INF  # only the first shard
    z[1, 4, 0] = NEG_INF
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, 1] = vocab - 1
    labels[1, 2] = 0
    labels[0, 3] = -100
    mask = torch.rand(b, t, generator=g) < 0.8
    temp = 0.7
    gw = [torch.randn(b, t, generator=g, dtype=F64) for _ in range(2)]
    z = z.to(dtype).double()  # the reference sees the logits the shards hold

    full = z.clone().requires_grad_()
    ref_logp, ref_ent = reference(full / temp, labels, mask)
    ref_g = torch.autograd.grad((ref_logp * gw[0]).sum() + (ref_ent * gw[1]).sum(), full)[0]

    shard = z[..., rank * vl : (rank + 1) * vl].to(dtype).clone().requires_grad_()
    with _CountCollectives() as c:
        logp, ent = token_logprobs_and_entropy(
            shard * 1 if inplace else shard, labels, temperature=temp, mask=mask, process_group=dist.group.WORLD,
            inplace_backward=inplace,
        )
    assert c.count == 2, f"forward used {c.count} all_reduce calls"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    _close(logp, ref_logp, **tol)
    _close(ent, ref_ent, **tol)
    with _CountCollectives() as c:
        ((logp * gw[0].float()).sum() + (ent * gw[1].float()).sum()).backward()
    assert c.count == 0
    _close(shard.grad, ref_g[..., rank * vl : (rank + 1) * vl], **tol)

    # log-prob gradient alone (the entropy output unused), then entropy alone without labels
    shard2 = shard.detach().clone().requires_grad_()
    lp_only, _ = token_logprobs_and_entropy(shard2, labels, temperature=temp, mask=mask, process_group=dist.group.WORLD)
    lp_only.sum().backward()
    full2 = z.clone().requires_grad_()
    want = torch.autograd.grad(reference(full2 / temp, labels, mask)[0].sum(), full2)[0]
    _close(shard2.grad, want[..., rank * vl : (rank + 1) * vl], **tol)

    shard3 = shard.detach().clone().requires_grad_()
    ent_only = token_entropy(shard3, temperature=temp, process_group=dist.group.WORLD)
    ent_only.sum().backward()
    full3 = z.clone().requires_grad_()
    ref3 = reference(full3 / temp)[1]
    _close(ent_only, ref3, **tol)
    want = torch.autograd.grad(ref3.sum(), full3)[0]
    _close(shard3.grad, want[..., rank * vl : (rank + 1) * vl], **tol)


def _check_linear_path(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    vl = int(torch.randint(3, 12, (1,), generator=g))
    n, hid, vocab = 7, 5, vl * world
    h = torch.randn(n, hid, generator=g, dtype=F64)
    w = torch.randn(vocab, hid, generator=g, dtype=F64)
    bias = torch.randn(vocab, generator=g, dtype=F64)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[5] = False
    gw = [torch.randn(n, generator=g, dtype=F64) for _ in range(2)]
    temp = 1.3

    h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, bias))
    ref_logp, ref_ent = reference((h64 @ w64.T + b64) / temp, labels, mask)
    ref_grads = torch.autograd.grad((ref_logp * gw[0]).sum() + (ref_ent * gw[1]).sum(), [h64, w64, b64])

    sl = slice(rank * vl, (rank + 1) * vl)
    h32 = h.float().requires_grad_()
    w32 = w[sl].float().requires_grad_()
    b32 = bias[sl].float().requires_grad_()
    with _CountCollectives() as c:
        logp, ent = linear_token_entropy(
            h32, w32, labels, temperature=temp, mask=mask, bias=b32, chunk_size=3, process_group=dist.group.WORLD
        )
        ((logp * gw[0].float()).sum() + (ent * gw[1].float()).sum()).backward()
    assert c.count == 3, f"forward + backward used {c.count} all_reduce calls"
    _close(logp, ref_logp)
    _close(ent, ref_ent)
    _close(h32.grad, ref_grads[0], rtol=1e-4, atol=1e-4)
    _close(w32.grad, ref_grads[1][sl], rtol=1e-4, atol=1e-4)
    _close(b32.grad, ref_grads[2][sl], rtol=1e-4, atol=1e-4)


def _check_unequal_shards_raise(rank, world):
    shard = torch.randn(3, 4 + (rank == 0))
    try:
        token_entropy(shard, process_group=dist.group.WORLD)
    except ValueError as e:
        assert "process_group" in str(e)
    else:
        raise AssertionError("unequal shards were accepted")


def _check_row_spread_past_float_range(rank, world):
    """A row spanning +-3e38 (x - max x overflows float32): the label's log p is still float64's."""
    z = torch.tensor([[3e38, -3e38, 0.0, 1e38] * world], dtype=F64)
    vl = z.shape[1] // world
    labels = torch.tensor([1])
    for temp in (1e30, 1e6):
        shard = z[:, rank * vl : (rank + 1) * vl].float()
        logp, ent = token_logprobs_and_entropy(shard, labels, temperature=temp, process_group=dist.group.WORLD)
        ref_logp, ref_ent = reference(z / temp, labels)
        _close(logp, ref_logp, rtol=1e-5, atol=0.0)
        _close(ent, ref_ent, rtol=1e-5, atol=0.0)
        h = torch.ones(1, 1)
        logp, ent = linear_token_entropy(h, shard.T.contiguous(), labels, temperature=temp, process_group=dist.group.WORLD)
        _close(logp, ref_logp, rtol=1e-5, atol=0.0)


def _check_process_group_type_is_named(rank, world):
    try:
        token_entropy(torch.randn(2, 3), process_group=123)
    except TypeError as e:
        assert "process_group" in str(e), e
    else:
        raise AssertionError("process_group=123 was accepted")


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for i, (dtype, inplace) in enumerate([(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]):
            _check_logits_path(rank, world, seed=100 * world + i, dtype=dtype, inplace=inplace)
        for seed in range(3):
            _check_linear_path(rank, world, seed=1000 * world + seed)
        _check_unequal_shards_raise(rank, world)
        _check_row_spread_past_float_range(rank, world)
        _check_process_group_type_is_named(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_full_vocabulary(world):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork: the children inherit the imported modules (spawn re-imports torch: ~10x slower); they
    # set one intra-op thread before any work, which keeps OpenMP fork-safe. Not once CUDA is
    # initialized here: autograd's device threads make a forked child's backward fail.
    fork = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    method = "fork" if fork else "spawn"
    mp.start_processes(_worker, args=(world, free_port()), nprocs=world, join=True, start_method=method)


def test_process_group_needs_initialized_distributed():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="process_group"):
        token_entropy(torch.randn(2, 3), process_group=object())
