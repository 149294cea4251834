"""token_entropy / token_logprobs_and_entropy on every backend against float64 references.

The "triton" backend runs under TRITON_INTERPRET=1 (set in conftest.py); every
property below holds for both backends.
"""

from __future__ import annotations

import math
from unittest import mock

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import entropy_reg as er
from entropy_reg.kernels import torch_chunked, triton_entropy
from tests.reference import entropy_f64, logprob_f64

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 math on the given input values: outputs agree with float64 on the same values to 1e-5
# relative, or 1e-6 nats where H is near 0 (ln s with s = 1 + eps carries float32's absolute error).
FWD_RTOL = 1e-5
FWD_ATOL = 1e-6
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # the gradient is stored in the dtype


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def logits_strategy(max_rows: int = 6, max_vocab: int = 300):
    return st.tuples(
        st.integers(1, max_rows),
        st.integers(1, max_vocab),
        st.floats(0.1, 8.0),
        st.integers(0, 2**31 - 1),
    )


def draw_logits(rows: int, vocab: int, scale: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=logits_strategy())
def test_bounds_zero_to_log_v(backend, case):
    x = draw_logits(*case)
    h = er.token_entropy(x, backend=backend)
    vocab = x.shape[-1]
    assert h.dtype == torch.float32
    assert (h >= -1e-6).all()
    assert (h <= math.log(vocab) + 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=logits_strategy(), shift=st.floats(-50, 50))
def test_shift_invariance(backend, case, shift):
    x = draw_logits(*case, dtype=torch.float64)
    shifts = torch.linspace(-1, 1, x.shape[0], dtype=torch.float64).unsqueeze(1) * shift
    h = er.token_entropy(x.float(), backend=backend)
    h_shift = er.token_entropy((x + shifts).float(), backend=backend)
    # the shifted logits are rounded to float32 at a larger magnitude: allow that rounding
    torch.testing.assert_close(h, h_shift, atol=1e-5 * (1 + abs(shift)), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=logits_strategy())
def test_permutation_invariance(backend, case):
    x = draw_logits(*case)
    perm = torch.randperm(x.shape[-1], generator=torch.Generator().manual_seed(case[-1]))
    h = er.token_entropy(x, backend=backend)
    torch.testing.assert_close(er.token_entropy(x[:, perm], backend=backend), h, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=logits_strategy(), temperature=st.floats(0.2, 3.0))
def test_gradient_rows_sum_to_zero(backend, case, temperature):
    x = draw_logits(*case).requires_grad_()
    labels = torch.randint(0, x.shape[-1], x.shape[:-1])
    lp, h = er.token_logprobs_and_entropy(x, labels, temperature=temperature, backend=backend)
    g = torch.randn(2, x.shape[0])
    (lp * g[0] + h * g[1]).sum().backward()
    # float32 rounding of terms of size |g| * |log p| / T
    z = x.detach().abs().amax(-1) / temperature
    tol = 1e-6 * (g[0].abs() + g[1].abs()) * (1 + 2 * z + math.log(x.shape[-1])) / temperature
    assert (x.grad.sum(-1).abs() <= tol).all()


@pytest.mark.parametrize("backend", BACKENDS)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 500), level=st.floats(-100, 100))
def test_uniform_logits_give_log_v(backend, rows, vocab, level):
    h = er.token_entropy(torch.full((rows, vocab), level), backend=backend)
    torch.testing.assert_close(h, torch.full((rows,), math.log(vocab)), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@given(vocab=st.integers(2, 500), gap=st.floats(60, 1e4))
def test_one_dominant_logit_gives_zero(backend, vocab, gap):
    x = torch.zeros(1, vocab)
    x[0, vocab // 2] = gap
    h = er.token_entropy(x, backend=backend)
    # H = (V-1) e^-gap (gap + 1) to first order, below 1e-20 for gap >= 60
    assert 0 <= float(h) < 1e-20


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=logits_strategy(), temperature=st.floats(0.05, 20.0))
def test_temperature_equals_scaled_logits(backend, case, temperature):
    x = draw_logits(*case, dtype=torch.float64)
    h_t = er.token_entropy(x.float(), temperature=temperature, backend=backend)
    h_scaled = er.token_entropy((x / temperature).float(), backend=backend)
    torch.testing.assert_close(h_t, h_scaled, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=logits_strategy(), temperature=st.floats(0.3, 2.0), masked=st.booleans())
def test_matches_float64_forward_and_backward(backend, dtype, case, temperature, masked):
    x = draw_logits(*case, dtype=dtype)
    rows, vocab = x.shape
    g = torch.Generator().manual_seed(case[-1])
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.2] = -100
    mask = torch.rand(rows, generator=g) < 0.8 if masked else None
    active = labels != -100 if mask is None else (labels != -100) & mask
    g_lp, g_h = torch.randn(2, rows, generator=g)

    xx = x.clone().requires_grad_()
    lp, h = er.token_logprobs_and_entropy(xx, labels, temperature=temperature, mask=mask, backend=backend)
    (lp * g_lp + h * g_h).sum().backward()

    xr = x.double().requires_grad_()
    rlp = torch.where(active, logprob_f64(xr, labels, temperature), 0.0)
    rh = torch.where(active, entropy_f64(xr, temperature), 0.0)
    (rlp * g_lp + rh * g_h).sum().backward()

    assert lp.dtype == h.dtype == torch.float32
    assert xx.grad.dtype == dtype
    torch.testing.assert_close(h.double(), rh.detach(), rtol=FWD_RTOL, atol=FWD_ATOL)
    torch.testing.assert_close(lp.double(), rlp.detach(), rtol=FWD_RTOL, atol=FWD_ATOL)
    if active.any():
        assert rel_err(xx.grad, xr.grad) < GRAD_RTOL[dtype]
    assert (h[~active] == 0).all() and (lp[~active] == 0).all()
    assert (xx.grad[~active] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient_matches_float64(backend):
    x = torch.randn(5, 333) * 3
    xx = x.clone().requires_grad_()
    g = torch.randn(5)
    (er.token_entropy(xx, temperature=0.8, backend=backend) * g).sum().backward()
    xr = x.double().requires_grad_()
    (entropy_f64(xr, 0.8) * g).sum().backward()
    assert rel_err(xx.grad, xr.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.view(2, 3, 4, -1),  # several leading dims
        lambda x: x.view(4, 6, -1)[:, 1:],  # slice of a [B, T, V] tensor: rows unevenly spaced
        lambda x: x.view(6, 4, -1).transpose(0, 1),  # transposed leading dims
        lambda x: x[:, ::2],  # strided vocabulary: needs a copy
        lambda x: x.view(24, 1, -1).expand(24, 3, -1),  # stride-0 dimension
    ],
    ids=["4d", "slice", "transpose", "vocab-stride", "expand"],
)
def test_leading_shapes_and_non_contiguous(backend, make):
    base = torch.randn(24, 64) * 2
    x = make(base)
    labels = torch.randint(0, x.shape[-1], x.shape[:-1])
    xx = x.detach().clone().requires_grad_() if x.is_contiguous() else None
    leaf = base.clone().requires_grad_()
    lp, h = er.token_logprobs_and_entropy(make(leaf), labels, backend=backend)
    assert h.shape == x.shape[:-1]
    torch.testing.assert_close(h.double(), entropy_f64(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.double(), logprob_f64(x, labels), atol=1e-5, rtol=1e-5)
    (lp.sum() + h.sum()).backward()
    ref_leaf = base.double().requires_grad_()
    xr = make(ref_leaf)
    (logprob_f64(xr, labels).sum() + entropy_f64(xr).sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-5, rtol=1e-5)
    del xx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches_and_reuses_the_logits(backend, dtype):
    base = torch.randn(6, 5, 77).to(dtype)
    labels = torch.randint(0, 77, (6, 5))
    labels[0, 0] = -100
    mask = torch.rand(6, 5) > 0.3
    g = torch.randn(2, 6, 5)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf, as an lm_head output is
        lp, h = er.token_logprobs_and_entropy(
            logits, labels, mask=mask, temperature=0.9, backend=backend, inplace_backward=inplace
        )
        logits.register_hook(lambda grad, logits=logits: grads.append((grad.data_ptr() == logits.data_ptr(), grad)))
        (lp * g[0] + h * g[1]).sum().backward()
    (same_out, out_grad), (same_in, in_grad) = grads
    assert not same_out and same_in  # in place: the gradient lives in the logits' buffer
    torch.testing.assert_close(in_grad, out_grad, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_gradient_alone(backend):
    x = torch.randn(4, 50)
    labels = torch.tensor([0, 49, 7, -100])
    xx = x.clone().requires_grad_()
    lp, _ = er.token_logprobs_and_entropy(xx, labels, backend=backend)
    lp.sum().backward()
    xr = x.double().requires_grad_()
    torch.where(labels != -100, logprob_f64(xr, labels), 0.0).sum().backward()
    assert rel_err(xx.grad, xr.grad) < 1e-6


def test_backends_agree_on_random_inputs():
    x = torch.randn(7, 3, 1500).to(torch.bfloat16)
    labels = torch.randint(0, 1500, (7, 3))
    out = {b: er.token_logprobs_and_entropy(x, labels, temperature=1.3, backend=b) for b in BACKENDS}
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------- the Triton path really runs


def test_triton_backend_really_runs_its_kernels():
    x = torch.randn(3, 100, requires_grad=True)
    with mock.patch.object(triton_entropy, "forward", wraps=triton_entropy.forward) as fwd, mock.patch.object(
        triton_entropy, "backward", wraps=triton_entropy.backward
    ) as bwd, mock.patch.object(torch_chunked, "forward") as torch_fwd:
        er.token_entropy(x, backend="triton").sum().backward()
    assert fwd.call_count == 1 and bwd.call_count == 1
    torch_fwd.assert_not_called()


def test_triton_vocabulary_split_path(monkeypatch):
    """Few rows: each row's vocabulary is split over programs and merged; same numbers."""
    monkeypatch.setattr(triton_entropy, "MIN_SPLIT", 32)
    x = torch.randn(2, 1000) * 3
    x[0, :400] = float("-inf")
    assert triton_entropy._num_splits(2, 1000, x.device) > 1
    labels = torch.tensor([500, 3])
    xx = x.clone().requires_grad_()
    lp, h = er.token_logprobs_and_entropy(xx, labels, backend="triton")
    (lp + 2 * h).sum().backward()
    xr = x.double().requires_grad_()
    (logprob_f64(xr, labels) + 2 * entropy_f64(xr)).sum().backward()
    assert rel_err(h, entropy_f64(x)) < 1e-6
    assert rel_err(lp, logprob_f64(x, labels)) < 1e-6
    assert rel_err(xx.grad, xr.grad) < 1e-5


def test_auto_backend_is_torch_on_cpu():
    x = torch.randn(2, 10)
    with mock.patch.object(torch_chunked, "forward", wraps=torch_chunked.forward) as fwd:
        er.token_entropy(x)
    assert fwd.call_count == 1


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_of_one(backend):
    x = torch.randn(3, 1, requires_grad=True)
    lp, h = er.token_logprobs_and_entropy(x, torch.zeros(3, dtype=torch.long), backend=backend)
    assert torch.equal(h, torch.zeros(3)) and torch.equal(lp, torch.zeros(3))
    (lp + h).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [2, 3, 1023, 1025, 32003])
def test_vocab_not_power_of_two(backend, vocab):
    x = torch.randn(2, vocab) * 2
    torch.testing.assert_close(er.token_entropy(x, backend=backend).double(), entropy_f64(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_entries(backend):
    x = torch.randn(4, 200) * 2
    x[:, ::3] = float("-inf")
    x[1, :] = float("-inf")
    x[1, 17] = 4.0  # a row with one finite entry: a point mass
    labels = torch.tensor([1, 17, 2, 4])
    xx = x.clone().requires_grad_()
    lp, h = er.token_logprobs_and_entropy(xx, labels, backend=backend)
    assert torch.isfinite(h).all() and torch.isfinite(lp).all()
    assert float(h[1]) == 0.0 and float(lp[1]) == 0.0
    torch.testing.assert_close(h.double(), entropy_f64(x), atol=1e-5, rtol=1e-5)
    (lp + h).sum().backward()
    assert torch.isfinite(xx.grad).all()
    assert (xx.grad[:, ::3] == 0).all()
    xr = x.double().requires_grad_()
    (logprob_f64(xr, labels) + entropy_f64(xr)).sum().backward()
    assert rel_err(xx.grad, xr.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_magnitudes(backend):
    x = torch.randn(3, 500, dtype=torch.float64) * 1e4
    x[2] = x[2] / 1e4 + 1e4  # large offset, ordinary spread
    h = er.token_entropy(x.float(), backend=backend)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), entropy_f64(x.float()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_gives_nan_not_a_number(backend):
    x = torch.randn(3, 50)
    x[1, 7] = float("nan")
    h = er.token_entropy(x, backend=backend)
    assert torch.isnan(h[1]) and torch.isfinite(h[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_never_reads(backend):
    x = torch.full((4, 3, 100), float("nan"), requires_grad=True)  # NaN would show if any row were read
    mask = torch.zeros(4, 3, dtype=torch.bool)
    lp, h = er.token_logprobs_and_entropy(x, torch.zeros(4, 3, dtype=torch.long), mask=mask, backend=backend)
    assert torch.equal(h, torch.zeros(4, 3)) and torch.equal(lp, torch.zeros(4, 3))
    (lp + h).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_and_ignored_rows_are_never_read(backend):
    x = torch.randn(4, 100)
    x[1] = float("nan")
    x[3] = float("nan")
    mask = torch.tensor([True, False, True, True])
    labels = torch.tensor([5, 5, 5, -100])
    xx = x.clone().requires_grad_()
    lp, h = er.token_logprobs_and_entropy(xx, labels, mask=mask, backend=backend)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    (lp + h).sum().backward()
    assert torch.isfinite(xx.grad).all() and (xx.grad[[1, 3]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 7, 100, requires_grad=True)
    lp, h = er.token_logprobs_and_entropy(x, torch.zeros(0, 7, dtype=torch.long), backend=backend)
    assert h.shape == (0, 7) and lp.shape == (0, 7)
    (lp.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape


def test_torch_backend_chunks_long_batches(monkeypatch):
    """Many chunks, masked rows spread across them: same numbers as one chunk."""
    monkeypatch.setitem(torch_chunked._CHUNK_ELEMS, "cpu", 64)
    x = torch.randn(37, 50)
    mask = torch.rand(37) > 0.4
    h = er.token_entropy(x, mask=mask, backend="torch")
    torch.testing.assert_close(h.double(), torch.where(mask, entropy_f64(x), 0.0), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(mask=torch.ones(3)), TypeError, "mask"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, words):
    with pytest.raises(error, match=words):
        er.token_entropy(torch.randn(3, 10), **kwargs)


def test_bad_logits_raise():
    with pytest.raises(TypeError, match="logits"):
        er.token_entropy(torch.randint(0, 5, (3, 10)))
    with pytest.raises(TypeError, match="logits"):
        er.token_entropy(torch.randn(3, 10, dtype=torch.complex64))
    with pytest.raises(TypeError, match="logits"):
        er.token_entropy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="logits"):
        er.token_entropy(torch.randn(3, 0))
    with pytest.raises(ValueError, match="logits"):
        er.token_entropy(torch.tensor(1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_labels_raise(backend):
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="labels"):
        er.token_logprobs_and_entropy(x, torch.tensor([0, 10, 1]), backend=backend)
    with pytest.raises(ValueError, match="labels"):
        er.token_logprobs_and_entropy(x, torch.tensor([0, -5, 1]), backend=backend)
    with pytest.raises(TypeError, match="labels"):
        er.token_logprobs_and_entropy(x, torch.tensor([0.0, 1.0, 2.0]), backend=backend)
    with pytest.raises(ValueError, match="labels"):
        er.token_logprobs_and_entropy(x, torch.tensor([0, 1]), backend=backend)
    # ignore_index is honoured whatever its value
    lp, _ = er.token_logprobs_and_entropy(x, torch.tensor([0, 7, 1]), ignore_index=7, backend=backend)
    assert float(lp[1]) == 0.0


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'"):
        er.token_entropy(torch.randn(2, 5), backend="triton")


# ---------------------------------------------------------------- torch.compile, autocast


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def loss(x, y):
        lp, h = er.token_logprobs_and_entropy(x, y, temperature=0.7, backend=backend)
        return -(lp.mean() + 0.01 * h.mean())

    x = torch.randn(2, 5, 64)
    y = torch.randint(0, 64, (2, 5))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_()
    compiled(xa, y).backward()
    xb = x.clone().requires_grad_()
    loss(xb, y).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()

    def loss(x):
        return -er.token_entropy(x * 2.0, backend="torch").mean()

    x = torch.randn(4, 32)
    xa = x.clone().requires_grad_()
    torch.compile(loss, fullgraph=True)(xa).backward()
    xb = x.clone().requires_grad_()
    loss(xb).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_float32_outputs(backend):
    w = torch.randn(16, 40)
    h_in = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h_in @ w
        ent = er.token_entropy(logits, backend=backend)
    assert logits.dtype == torch.bfloat16 and ent.dtype == torch.float32
    torch.testing.assert_close(ent.double(), entropy_f64(logits), atol=1e-5, rtol=1e-5)  # reference outside autocast
