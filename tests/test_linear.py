"""linear_token_entropy against materialized float64 logits, written from the formulas."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entropy_reg.linear as linear_mod
from entropy_reg.linear import default_tiles, linear_token_entropy
from tests.reference import entropy_f64, logprob_f64

F64 = torch.float64


def reference(h, w, b, labels, mask, temperature, ignore_index=-100):
    """(log p_y or None, H) in float64 of softmax((h @ w.T + b) / T); masked and ignored rows 0."""
    z = h.double() @ w.double().T + (b.double() if b is not None else 0.0)
    keep = torch.ones(h.shape[:-1], dtype=torch.bool) if mask is None else mask.clone()
    logp = None
    if labels is not None:
        keep &= labels != ignore_index
        logp = torch.where(keep, logprob_f64(z, labels, temperature), 0.0)
    return logp, torch.where(keep, entropy_f64(z, temperature), 0.0)


def grads(outputs, inputs, weights):
    loss = sum((o * g).sum() for o, g in zip(outputs, weights) if o is not None)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None], allow_unused=True)


def leaves(*ts, dtype=torch.float32):
    return [t.to(dtype).requires_grad_() if t is not None else None for t in ts]


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of `block` ids, so small test vocabularies span several blocks."""

    def set_block(block: int, hidden: int) -> None:
        monkeypatch.setattr(linear_mod, "_WEIGHT_BLOCK_BYTES", block * 4 * hidden)

    return set_block


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 23),
    hidden=st.integers(1, 12),
    vocab=st.integers(1, 70),
    block=st.integers(1, 40),
    chunk=st.one_of(st.none(), st.integers(1, 9)),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    use_labels=st.booleans(),
    use_mask=st.booleans(),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(rows, hidden, vocab, block, chunk, temperature, use_labels, use_mask, use_bias, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=F64)
    w = torch.randn(vocab, hidden, generator=g, dtype=F64)
    b = torch.randn(vocab, generator=g, dtype=F64) if use_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g) if use_labels else None
    if labels is not None and rows:
        labels[torch.rand(rows, generator=g) < 0.2] = -100
    mask = torch.rand(rows, generator=g) < 0.7 if use_mask else None
    gw = [torch.randn(rows, generator=g, dtype=F64) for _ in range(2)]

    saved = linear_mod._WEIGHT_BLOCK_BYTES
    linear_mod._WEIGHT_BLOCK_BYTES = block * 4 * hidden
    try:
        h32, w32, b32 = leaves(h, w, b)
        out = linear_token_entropy(h32, w32, labels, temperature=temperature, mask=mask, bias=b32, chunk_size=chunk)
    finally:
        linear_mod._WEIGHT_BLOCK_BYTES = saved
    logp, ent = out if use_labels else (None, out)
    assert ent.dtype == torch.float32 and ent.shape == (rows,)
    h64, w64, b64 = leaves(h, w, b, dtype=F64)
    ref_logp, ref_ent = reference(h64, w64, b64, labels, mask, temperature)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    if use_labels:
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=2e-5)
    if rows == 0:
        return
    got = grads([logp, ent], [h32, w32, b32], [gw[0].float(), gw[1].float()])
    want = grads([ref_logp, ref_ent], [h64, w64, b64], gw)
    for a, r in zip(got, want):
        scale = 1.0 + r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=2e-5 * scale)


def test_leading_dims_and_one_output_gradient(small_blocks):
    small_blocks(7, 6)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 6, generator=g, dtype=F64)
    w = torch.randn(19, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 19, (2, 5), generator=g)
    h32, w32 = leaves(h, w)
    logp, ent = linear_token_entropy(h32, w32, labels, chunk_size=3)
    assert logp.shape == ent.shape == (2, 5)
    h64, w64 = leaves(h, w, dtype=F64)
    ref_logp, ref_ent = reference(h64, w64, None, labels, None, 1.0)
    # log-prob gradient alone: every block but the label's needs the indicator-free repair
    got = torch.autograd.grad(logp.sum(), [h32, w32])
    want = torch.autograd.grad(ref_logp.sum(), [h64, w64], retain_graph=True)
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)
    ent2 = linear_token_entropy(h32, w32, chunk_size=4)
    torch.testing.assert_close(ent2.double(), ref_ent, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(ent2.sum(), [h32])[0]
    want = torch.autograd.grad(ref_ent.sum(), [h64])[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_only_hidden_requires_grad():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 4, generator=g, dtype=F64)
    w = torch.randn(11, 4, generator=g, dtype=F64)
    (h32,) = leaves(h)
    ent = linear_token_entropy(h32, w.float())
    (h64,) = leaves(h, dtype=F64)
    _, ref = reference(h64, w, None, None, None, 1.0)
    got = torch.autograd.grad(ent.sum(), h32)[0]
    want = torch.autograd.grad(ref.sum(), h64)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_masked_rows_are_never_read(small_blocks):
    small_blocks(5, 3)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(8, 3, generator=g)
    h[[1, 6]] = float("nan")
    mask = torch.ones(8, dtype=torch.bool)
    mask[[1, 6]] = False
    labels = torch.randint(0, 13, (8,), generator=g)
    labels[4] = -100
    h[4] = float("nan")  # ignore_index rows are masked rows too
    h32, w32 = leaves(h, torch.randn(13, 3, generator=g))
    logp, ent = linear_token_entropy(h32, w32, labels, mask=mask, chunk_size=2)
    (logp.sum() + ent.sum()).backward()
    for r in (1, 4, 6):
        assert logp[r] == 0 and ent[r] == 0
        assert torch.all(h32.grad[r] == 0)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(h32.grad).all() and torch.isfinite(w32.grad).all()


def test_nan_hidden_row_gives_nan():
    h = torch.randn(3, 4)
    h[1, 2] = float("nan")
    ent = linear_token_entropy(h, torch.randn(6, 4))
    assert torch.isnan(ent[1]) and torch.isfinite(ent[[0, 2]]).all()


def test_minus_inf_bias_including_a_whole_block(small_blocks):
    small_blocks(4, 5)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 5, generator=g, dtype=F64)
    w = torch.randn(12, 5, generator=g, dtype=F64)
    b = torch.randn(12, generator=g, dtype=F64)
    b[4:8] = float("-inf")  # the second block entirely
    b[10] = float("-inf")
    labels = torch.tensor([0, 3, 9, 11, 2, 8])
    h32, w32, b32 = leaves(h, w, b)
    logp, ent = linear_token_entropy(h32, w32, labels, bias=b32, temperature=0.9)
    h64, w64, b64 = leaves(h, w, b, dtype=F64)
    ref_logp, ref_ent = reference(h64, w64, b64, labels, None, 0.9)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), [h32, w32])
    want = torch.autograd.grad(ref_logp.sum() + 0.5 * ref_ent.sum(), [h64, w64])
    for a, r in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_float64():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(16, 32, generator=g).bfloat16()
    w = (torch.randn(50, 32, generator=g) / 4).bfloat16()
    labels = torch.randint(0, 50, (16,), generator=g)
    h16, w16 = leaves(h, w, dtype=torch.bfloat16)
    logp, ent = linear_token_entropy(h16, w16, labels, chunk_size=5)
    assert logp.dtype == ent.dtype == torch.float32
    h64, w64 = leaves(h, w, dtype=F64)
    ref_logp, ref_ent = reference(h64, w64, None, labels, None, 1.0)
    # logits rounded to bfloat16 (8 bits): errors ~ |z| * 2**-9
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=3e-2)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=3e-2)
    got = torch.autograd.grad(logp.sum() + ent.sum(), [h16, w16])
    want = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), [h64, w64])
    for a, r in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


def test_default_tiles():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_tiles(8192, 131072, 4096, cuda, None) == (8192, 16384)
    assert default_tiles(100_000, 131072, 4096, cuda, None) == (8192, 16384)
    assert default_tiles(8192, 131072, 4096, cpu, None) == (256, 4096)
    assert default_tiles(8192, 32768, 256, cpu, None) == (256, 4096)
    assert default_tiles(10, 100, 4096, cpu, None) == (10, 100)
    assert default_tiles(1000, 151936, 8192, cuda, 64) == (64, 8192)


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        (dict(hidden=torch.randn(3, 4, dtype=F64)), TypeError, "hidden"),
        (dict(weight=torch.randn(5, 4).bfloat16()), TypeError, "weight"),
        (dict(weight=torch.randn(5, 3)), ValueError, "weight"),
        (dict(weight=torch.randn(5)), ValueError, "weight"),
        (dict(bias=torch.randn(4)), ValueError, "bias"),
        (dict(bias=[0.0] * 5), TypeError, "bias"),
        (dict(labels=torch.tensor([0, 1, 5])), ValueError, "labels"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
        (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
        (dict(mask=torch.ones(3)), TypeError, "mask"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), labels=None)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        linear_token_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_custom_op_registration():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(5, 3, generator=g, requires_grad=True)
    w = torch.randn(7, 3, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    labels = torch.tensor([0, 6, 2, 3, 1])
    active = torch.tensor([True, True, False, True, True])
    torch.library.opcheck(
        linear_mod.linear_logprobs_entropy,
        (h, w, b, labels, active, 1.25, "torch", 2, 4),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_entropy_is_log_vocab_for_zero_weight():
    # Uniform logits: H = log V exactly, log p_y = -log V.
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.zeros(37, 3, requires_grad=True)
    logp, ent = linear_token_entropy(h, w, torch.tensor([0, 5, 36, 1]))
    torch.testing.assert_close(ent, torch.full((4,), math.log(37)))
    torch.testing.assert_close(logp, torch.full((4,), -math.log(37)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64(small_blocks, backend, dtype):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter (conftest's default) cannot run CUDA tensors: run with TRITON_INTERPRET=0")
    small_blocks(1000, 64)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(300, 64, generator=g).to(dtype)
    w = (torch.randn(2500, 64, generator=g) / 8).to(dtype)
    b = (torch.randn(2500, generator=g) / 8).to(dtype)
    labels = torch.randint(0, 2500, (300,), generator=g)
    labels[::7] = -100
    mask = torch.rand(300, generator=g) < 0.9
    h_d, w_d, b_d = (t.cuda().requires_grad_() for t in (h, w, b))
    logp, ent = linear_token_entropy(
        h_d, w_d, labels.cuda(), mask=mask.cuda(), bias=b_d, temperature=0.8, chunk_size=128, backend=backend
    )
    h64, w64, b64 = leaves(h, w, b, dtype=F64)
    ref_logp, ref_ent = reference(h64, w64, b64, labels, mask, 0.8)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=5e-2)
    torch.testing.assert_close(ent.cpu().double(), ref_ent, **tol)
    torch.testing.assert_close(logp.cpu().double(), ref_logp, **tol)
    got = torch.autograd.grad(logp.sum() + ent.sum(), [h_d, w_d, b_d])
    want = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), [h64, w64, b64])
    for a, r in zip(got, want):
        assert a.dtype == dtype
        rel = 1e-3 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(a.cpu().double(), r, rtol=rel, atol=rel * r.abs().max().item())


def test_autocast_casts_inputs_like_linear():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ent = linear_token_entropy(h, w)
    ent.sum().backward()
    assert ent.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    h64, w64 = leaves(h.detach().bfloat16(), w.detach().bfloat16(), dtype=F64)
    ref = reference(h64, w64, None, None, None, 1.0)[1]
    torch.testing.assert_close(ent.double(), ref, rtol=0, atol=3e-2)
    assert not torch.allclose(ent.double(), reference(h.double(), w.double(), None, None, None, 1.0)[1], rtol=0, atol=1e-6)
    want_h = torch.autograd.grad(ref.sum(), h64)[0]
    torch.testing.assert_close(h.grad.double(), want_h, rtol=5e-2, atol=5e-2 * want_h.abs().max().item())
