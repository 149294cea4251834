"""The kernels' accuracy and input contract, as README "Accuracy" states it, on both backends.

Accuracy (float32 math on the input's values, against float64 on the same values):

- forward: |H - ref| <= 1e-5 H and |log p_y - ref| <= 1e-5 |log p_y| + LOGP_ULPS H (plus REF_ATOL,
  the float64 reference's own limit): relative, however close to 0 (a confident token's log p of
  -1e-12 keeps its digits);
- gradient, per entry j of a row with upstream (g_lp, g_H), p = softmax(x / T):
  |g_j - ref_j| <= 1e-5 S_j + (REF_ATOL + LOGP_ULPS (|log p_j| + H)) p_j G_j + 2^-126 G_j, then the
  rounding to the logits' dtype (plus 2^-126 absolute: a result below float32's normal range may
  be flushed to 0, as GPUs do), with
  S_j = (|g_lp| |1[j = y] - p_j| + |g_H| p_j (|log p_j| + H)) / T   (the size of the terms)
  G_j = (|g_lp| + |g_H| (1 + |log p_j| + H)) / T                  (their sensitivity to log p_j).

LOGP_ULPS (|log p_j| + H) bounds the float32 roundings that form log p_j and its exponential
((x_j - m), / T, - c, to base 2, exp2; eight half-ulps each): those of log p_j itself, and those of
c = log s, which inherits sum_{j != max} p_j |log p_j| <= H of its terms' roundings. And 2^-126 the float32 subnormal range of p_j: what float32 can hold, and far below the
error of the x / T - lse form that these tests catch (a multiple of ulp(|x| / T)).

The per-row tensors (labels, mask, upstream gradients) and the logits are drawn as contiguous,
strided, offset, transposed and expanded (stride 0) views. The Triton backend runs under the
interpreter (conftest.py); on a CUDA machine, ``ENTROPY_REG_TEST_DEVICE=cuda TRITON_INTERPRET=0``
runs the same checks on the GPU under real Triton (benchmarks/bench_gpu.py does).
"""

from __future__ import annotations

import math
import os

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import entropy_reg as er
from tests.reference import entropy_f64, logprob_f64, softmax_terms_f64

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = 1e-5
# float64's rounding of a normalizer near 1 (the torch backend sums it in float64, and so does the
# reference): log-probabilities are checked to this absolute level, 1e-15 nats, and no further
REF_ATOL = 1e-15
LOGP_ULPS = 8 * 2.0**-24  # the roundings that form log p_j and exp of it, relative: 4.8e-7
# the gradient is stored in the logits' dtype: within one ulp (relative 2**-7 for bfloat16, 2**-10 for float16)
STORE_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Below the smallest normal number of the math (float32) or of the stored dtype, rounding is absolute.
TINY = {torch.float32: 2.0**-126, torch.bfloat16: 2.0**-126, torch.float16: 2.0**-14}
VIEWS = ["contiguous", "strided", "offset", "transposed", "expanded"]
DEVICE = torch.device(os.environ.get("ENTROPY_REG_TEST_DEVICE", "cpu"))


# ---------------------------------------------------------------- helpers


def as_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of the 2-D ``t`` (expanded: its first element everywhere) in a layout of ``kind``."""
    if kind == "contiguous":
        return t.clone()
    if kind == "strided":
        big = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    if kind == "offset":
        big = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
        big[3:] = t.reshape(-1)
        return big[3:].view(t.shape)
    if kind == "transposed":
        return t.t().contiguous().t()
    assert kind == "expanded"
    return t.reshape(-1)[:1].view(1, 1).expand(t.shape)


def view_logits(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``x[b, t, V]`` in a layout of ``kind`` (expanded: row 0 everywhere)."""
    if kind == "contiguous":
        return x.clone()
    if kind == "strided":  # rows of a larger buffer: what logits[:, :-1] looks like
        big = torch.empty(x.shape[0], x.shape[1] + 1, x.shape[2], dtype=x.dtype, device=x.device)
        big[:, :-1] = x
        return big[:, :-1]
    if kind == "offset":
        big = torch.empty(x.numel() + 5, dtype=x.dtype, device=x.device)
        big[5:] = x.reshape(-1)
        return big[5:].view(x.shape)
    if kind == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    assert kind == "expanded"
    return x[:1, :1].expand(x.shape)


def check_forward(out: torch.Tensor, ref: torch.Tensor, what: str, entropy: torch.Tensor | None = None) -> None:
    """|out - ref| <= 1e-5 |ref| (+ LOGP_ULPS H for a log-prob, given the row's entropy H)."""
    out, ref = out.cpu(), ref.cpu()
    entropy = entropy.cpu() if entropy is not None else None
    err = (out.double() - ref).abs()
    bound = RTOL * ref.abs() + REF_ATOL + (LOGP_ULPS * entropy.abs() if entropy is not None else 0.0)
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"{what}: entry {worst}, error {float(err.flatten()[worst]):.3g} > {float(bound.flatten()[worst]):.3g} (ref {float(ref.flatten()[worst]):.9g})"


def reference_gradient(x, labels, active, temperature, g_lp, g_h):
    """(ref gradient, bound) per entry, from the float64 softmax terms; 0 and exact on inactive rows."""
    logp, p, h = softmax_terms_f64(x, temperature)
    h = h.unsqueeze(-1)
    gl = (g_lp.double() if g_lp is not None else torch.zeros(x.shape[:-1], dtype=torch.float64)).unsqueeze(-1)
    gh = (g_h.double() if g_h is not None else torch.zeros(x.shape[:-1], dtype=torch.float64)).unsqueeze(-1)
    onehot = torch.zeros_like(p)
    if labels is not None:
        onehot.scatter_(-1, labels.clamp_min(0).unsqueeze(-1), 1.0)
    # 1 - p_y formed as -expm1(log p_y): float64 keeps its digits when p_y is near 1
    one_minus = torch.where(onehot > 0, -torch.expm1(logp), -p)
    lp_safe = torch.where(p > 0, logp, 0.0)
    ref = (gl * one_minus - gh * p * (lp_safe + h)) / temperature
    size = (gl.abs() * one_minus.abs() + gh.abs() * p * (lp_safe.abs() + h)) / temperature
    coef = (gl.abs() + gh.abs() * (1 + lp_safe.abs() + h)) / temperature
    keep = active.unsqueeze(-1)
    # p_j below float32's normal range carries an absolute error of about its spacing
    bound = RTOL * size + (REF_ATOL + LOGP_ULPS * (lp_safe.abs() + h)) * p * coef + TINY[torch.float32] * coef
    return torch.where(keep, ref, 0.0), torch.where(keep, bound, 0.0)


def check_gradient(grad: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    grad, ref, bound = grad.cpu(), ref.cpu(), bound.cpu()
    dtype = grad.dtype
    # the store's rounding: relative, and below the normal range the dtype's subnormal spacing; and
    # a float32 result below the normal range may be flushed to 0 (GPUs flush subnormals)
    bound = bound + STORE_RTOL[dtype] * ref.abs() + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps + TINY[torch.float32]
    err = (grad.double() - ref).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"gradient: error {float(err.flatten()[worst]):.3g} > {float(bound.flatten()[worst]):.3g} (ref {float(ref.flatten()[worst]):.6g}, entry {worst})"


def run(backend, x, labels, mask, temperature, g_lp, g_h, **kw):
    """(logp, H, dL/dx) on the CPU for L = sum(g_lp * logp + g_H * H), computed on DEVICE."""
    leaf = x.detach().clone().to(DEVICE).requires_grad_()
    logits = leaf * 1 if kw.get("inplace_backward") else leaf
    mask = mask.to(DEVICE) if mask is not None else None
    lp, h = er.token_logprobs_and_entropy(logits, labels.to(DEVICE), temperature=temperature, mask=mask, backend=backend, **kw)
    pairs = [(out, g.to(DEVICE)) for out, g in ((lp, g_lp), (h, g_h)) if g is not None]
    torch.autograd.backward([out for out, _ in pairs], [g for _, g in pairs])
    return lp.cpu(), h.cpu(), leaf.grad.cpu()


# ---------------------------------------------------------------- near-zero log-probs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=25)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 200),
    spread=st.floats(0.05, 3.0),
    offset=st.sampled_from([0.0, 30.0, 1000.0, 30000.0, -3e4]),
    margin=st.floats(0.0, 80.0),
    log_t=st.floats(math.log(1e-3), math.log(2.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_confident_tokens_keep_their_digits(backend, dtype, rows, vocab, spread, offset, margin, log_t, seed):
    """Large |x| / T with a dominant label (log p near 0): outputs and gradient within the contract."""
    temperature = math.exp(log_t)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * spread + offset
    labels = torch.randint(0, vocab, (rows,), generator=g)
    x[torch.arange(rows), labels] += margin * temperature
    x = x.to(dtype)
    g_lp, g_h = torch.randn(2, rows, generator=g)
    lp, h, grad = run(backend, x, labels, None, temperature, g_lp, g_h)
    ref_h = entropy_f64(x, temperature).detach()
    check_forward(lp, logprob_f64(x, labels, temperature).detach(), "log p", ref_h)
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(x, labels, torch.ones(rows, dtype=torch.bool), temperature, g_lp, g_h)
    check_gradient(grad, ref, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "values, label, temperature",
    [
        ([65504.0, 65504.0, 65472.0], 0, 1.0),
        ([65504.0, 65504.0, 65472.0], 0, 1e-3),
        ([65504.0, 65504.0, 65472.0, 65440.0], 0, 1e-3),
        ([-3e38, -3e38, -3e38], 1, 1.0),
        ([3e38, 3e38 - 2e31, 1e38], 0, 1e-3),  # |x| / T overflows float32: the gradient stays finite
    ],
)
def test_issue_examples_at_the_float_limits(backend, values, label, temperature):
    dtype = torch.float16 if max(abs(v) for v in values) < 65505 else torch.float32
    x = torch.tensor([values], dtype=dtype)
    labels = torch.tensor([label])
    g_lp, g_h = torch.tensor([1.0]), torch.tensor([0.5])
    lp, h, grad = run(backend, x, labels, None, temperature, g_lp, g_h)
    ref_h = entropy_f64(x, temperature).detach()
    check_forward(lp, logprob_f64(x, labels, temperature).detach(), "log p", ref_h)
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(x, labels, torch.ones(1, dtype=torch.bool), temperature, g_lp, g_h)
    assert torch.isfinite(grad).all()
    check_gradient(grad, ref, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_label_gradient_is_relatively_exact(backend):
    """The issue's case: logits ~38, a dominant label, T = 0.6: d log p_y / dx_y = (1 - p_y) / T ~ 1e-5, to 1e-4."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g) * 0.3 + 28.0
    labels = torch.tensor([5, 9, 40])
    x[torch.arange(3), labels] = 38.0 + torch.tensor([0.0, 0.05, 0.2])
    _, _, grad = run(backend, x, labels, None, 0.6, torch.ones(3), None)
    ref, _ = reference_gradient(x, labels, torch.ones(3, dtype=torch.bool), 0.6, torch.ones(3), None)
    at_label = grad[torch.arange(3), labels].double()
    ref_label = ref[torch.arange(3), labels]
    assert (ref_label > 1e-6).all() and (ref_label < 1e-4).all()
    assert ((at_label - ref_label).abs() <= 1e-4 * ref_label).all(), (at_label, ref_label)


# ---------------------------------------------------------------- views of every tensor argument


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    vocab=st.integers(1, 90),
    kinds=st.tuples(*[st.sampled_from(VIEWS)] * 5),
    temperature=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_views_of_every_argument(backend, b, t, vocab, kinds, temperature, seed):
    k_logits, k_labels, k_mask, k_glp, k_gh = kinds
    g = torch.Generator().manual_seed(seed)
    x = view_logits((torch.randn(b, t, vocab, generator=g) * 3).to(DEVICE), k_logits)
    labels = as_view(torch.randint(0, vocab, (b, t), generator=g).to(DEVICE), k_labels)
    mask = as_view((torch.rand(b, t, generator=g) < 0.7).to(DEVICE), k_mask)
    g_lp = as_view(torch.randn(b, t, generator=g).to(DEVICE), k_glp)
    g_h = as_view(torch.randn(b, t, generator=g).to(DEVICE), k_gh)
    leaf = torch.randn(b, t, vocab, device=DEVICE, requires_grad=True)  # the logits' gradient through the view
    with torch.no_grad():
        leaf.copy_(x)
    logits = view_logits(leaf, k_logits) if k_logits != "contiguous" else leaf
    lp, h = er.token_logprobs_and_entropy(logits, labels, temperature=temperature, mask=mask, backend=backend)
    torch.autograd.backward([lp, h], [g_lp, g_h])
    xr, labels, mask, g_lp, g_h = (u.cpu() for u in (logits.detach(), labels, mask, g_lp, g_h))
    ref_h = torch.where(mask, entropy_f64(xr, temperature).detach(), 0.0)
    check_forward(lp, torch.where(mask, logprob_f64(xr, labels, temperature).detach(), 0.0), "log p", ref_h)
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(xr, labels, mask, temperature, g_lp, g_h)
    if k_logits == "expanded":  # every position reads row 0: its gradient is the sum over them
        ref, bound = ref.sum((0, 1), keepdim=True), bound.sum((0, 1), keepdim=True)
        check_gradient(leaf.grad[:1, :1], ref, bound)
        assert (leaf.grad.reshape(-1, vocab)[1:] == 0).all()
    else:
        check_gradient(leaf.grad, ref, bound)


def test_issue_strided_examples_on_triton():
    x = torch.randn(4, 3, 23, device=DEVICE)
    lab = torch.randint(0, 23, (4, 6), device=DEVICE)[:, ::2]
    xc, labc = x.cpu(), lab.cpu()
    for backend in BACKENDS:
        lp = er.token_logprobs_and_entropy(x, lab, backend=backend)[0]
        check_forward(lp, logprob_f64(xc, labc).detach(), "log p", entropy_f64(xc))
        lp = er.token_logprobs_and_entropy(x[0], torch.tensor(3, device=DEVICE).expand(3), backend=backend)[0]
        check_forward(lp, logprob_f64(xc[0], torch.full((3,), 3)).detach(), "log p", entropy_f64(xc[0]))
        h = er.token_entropy(x[0], mask=torch.tensor(False, device=DEVICE).expand(3), backend=backend)
        assert torch.equal(h.cpu(), torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "offset", "transposed", "expanded"])
def test_linear_token_entropy_views_of_per_row_tensors(backend, kind):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = as_view(torch.randint(0, 40, (3, 4), generator=g).to(DEVICE), kind)
    mask = as_view((torch.rand(3, 4, generator=g) < 0.7).to(DEVICE), "contiguous" if kind == "expanded" else kind)
    h32, w32 = hidden.float().to(DEVICE).requires_grad_(), weight.float().to(DEVICE).requires_grad_()
    g_lp = as_view(torch.randn(3, 4, generator=g).to(DEVICE), kind)
    g_h = as_view(torch.randn(3, 4, generator=g).to(DEVICE), kind)
    lp, h = er.linear_token_entropy(h32, w32, labels, mask=mask, temperature=0.8, chunk_size=5, backend=backend)
    torch.autograd.backward([lp, h], [g_lp, g_h])
    labels, mask, g_lp, g_h = (u.cpu() for u in (labels, mask, g_lp, g_h))
    z = h32.detach().cpu().double() @ w32.detach().cpu().double().T
    ref_h = torch.where(mask, entropy_f64(z, 0.8).detach(), 0.0)
    check_forward(lp, torch.where(mask, logprob_f64(z, labels, 0.8).detach(), 0.0), "log p", ref_h)
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(z, labels, mask, 0.8, g_lp, g_h)
    ref_hidden = ref @ w32.detach().cpu().double()
    torch.testing.assert_close(h32.grad.cpu().double(), ref_hidden, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- linear_token_entropy's block merge


@pytest.mark.parametrize(
    "bias_level, peak, temperature",
    [(30.0, 50.0, 0.6), (1000.0, 1000.5, 1e-3)],
)
def test_linear_block_merge_keeps_confident_digits(bias_level, peak, temperature):
    """Many vocabulary blocks, a large common offset: the merge works in raw logits, not x / T - lse.

    hidden = 0 makes the logits exactly the bias, so the float64 reference sees the kernel's values.
    """
    g = torch.Generator().manual_seed(2)
    hidden = torch.zeros(6, 16)
    weight = torch.randn(300, 16, generator=g)
    bias = torch.full((300,), bias_level) + torch.randn(300, generator=g) * 0.01
    bias[137] = peak
    labels = torch.tensor([137, 137, 3, 137, 299, 137])
    lp, h = er.linear_token_entropy(hidden, weight, labels, bias=bias, temperature=temperature, chunk_size=4)
    z = hidden.double() @ weight.double().T + bias.double()
    ref_h = entropy_f64(z, temperature).detach()
    check_forward(lp, logprob_f64(z, labels, temperature).detach(), "log p", ref_h)
    check_forward(h, ref_h, "H")


# ---------------------------------------------------------------- in place on shared memory


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda r: r.expand(5, -1), lambda r: r.view(1, 1, -1).expand(2, 3, -1)])
def test_inplace_backward_refuses_rows_that_share_memory(backend, make):
    row = torch.randn(1, 30, device=DEVICE, requires_grad=True)
    logits = make(row * 1)
    with pytest.raises(ValueError, match="inplace_backward"):
        er.token_entropy(logits, backend=backend, inplace_backward=True)
    # out of place it is fine, and the gradient sums over the copies
    (er.token_entropy(logits, backend=backend) * 2).sum().backward()
    assert torch.isfinite(row.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_disjoint_strided_rows_is_allowed(backend):
    base = torch.randn(4, 6, 30)
    leaf = base.clone().to(DEVICE).requires_grad_()
    er.token_entropy((leaf * 1)[:, :-1], backend=backend, inplace_backward=True).sum().backward()
    ref = base.double().requires_grad_()
    entropy_f64(ref[:, :-1]).sum().backward()
    torch.testing.assert_close(leaf.grad.cpu().double(), ref.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_logits_compute_in_float64_and_pass_gradcheck(backend):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 7, generator=g, dtype=torch.float64) * 2).to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 6, 3], device=DEVICE)
    lp, h = er.token_logprobs_and_entropy(x, labels, temperature=0.7, backend=backend)
    assert lp.dtype == h.dtype == torch.float64
    torch.testing.assert_close(h.cpu(), entropy_f64(x.detach().cpu(), 0.7), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(lp.cpu(), logprob_f64(x.detach().cpu(), labels.cpu(), 0.7), rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(
        lambda t: er.token_logprobs_and_entropy(t, labels, temperature=0.7, backend=backend), (x,)
    )


def test_float64_linear_token_entropy_passes_gradcheck():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 8, 0, 4])
    lp, h = er.linear_token_entropy(hidden, weight, labels, bias=bias, chunk_size=3)
    assert lp.dtype == h.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda a, w, c: er.linear_token_entropy(a, w, labels, bias=c, temperature=1.3, chunk_size=3), (hidden, weight, bias)
    )


# ---------------------------------------------------------------- argument strictness


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(temperature=10**400), ValueError, "temperature"),
        (dict(temperature=True), TypeError, "temperature"),
        (dict(ignore_index=None), TypeError, "ignore_index"),
        (dict(ignore_index="pad"), TypeError, "ignore_index"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"),
        (dict(inplace_backward="no"), TypeError, "inplace_backward"),
        (dict(inplace_backward=1), TypeError, "inplace_backward"),
        (dict(backend=["torch"]), ValueError, "backend"),
        (dict(ignore_index=10**30), ValueError, "ignore_index"),
        (dict(ignore_index=-(2**63) - 1), ValueError, "ignore_index"),
        (dict(temperature=torch.tensor(0.7, requires_grad=True)), ValueError, "temperature"),
        (dict(process_group=123), ValueError, "process_group"),  # no process group here: not initialized
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, words):
    x = torch.randn(3, 10, requires_grad=True)
    with pytest.raises(error, match=words):
        er.token_logprobs_and_entropy(x, torch.tensor([0, 1, 2]), **kwargs)


@pytest.mark.parametrize("temperature", [np.float32(0.7), np.float64(0.7), torch.tensor(0.7), 7 * 10**-1])
def test_any_real_number_is_a_temperature(temperature):
    x = torch.randn(3, 10)
    expected = entropy_f64(x, float(np.float32(0.7)) if isinstance(temperature, np.float32) else 0.7)
    torch.testing.assert_close(er.token_entropy(x, temperature=temperature).double(), expected, rtol=1e-5, atol=1e-6)
    assert er.linear_token_entropy(torch.randn(2, 4), torch.randn(6, 4), temperature=temperature).shape == (2,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_of_masked_and_ignored_rows_are_not_checked(backend):
    x = torch.randn(4, 10)
    labels = torch.tensor([3, 10**6, -7, 2])  # rows 1 and 2 are padding with arbitrary ids
    mask = torch.tensor([True, False, True, True])
    lp, h = er.token_logprobs_and_entropy(
        x.to(DEVICE), labels.to(DEVICE), mask=mask.to(DEVICE), ignore_index=-7, backend=backend
    )
    lp, h = lp.cpu(), h.cpu()
    assert lp[1] == 0 and lp[2] == 0 and h[1] == 0 and h[2] == 0
    check_forward(lp[[0, 3]], logprob_f64(x[[0, 3]], labels[[0, 3]]).detach(), "log p", entropy_f64(x[[0, 3]]))
    lp, _ = er.linear_token_entropy(torch.randn(4, 5), torch.randn(10, 5), labels, mask=mask, ignore_index=-7)
    assert lp[1] == 0 and lp[2] == 0
    with pytest.raises(ValueError, match="labels"):
        er.token_logprobs_and_entropy(x, labels, ignore_index=-7, backend="torch")  # row 1 is active now


# ---------------------------------------------------------------- contract, round 2


@pytest.mark.parametrize("peak, vocab", [(30.0, 65536), (20.0, 16384), (40.0, 32768)])
def test_split_rows_keep_a_confident_rows_mass(peak, vocab):
    """One row, V > MIN_SPLIT: Triton splits the row across programs and merges the slices.

    The merge must add the slices' small mass to n_M - 1 = 0, not to the top's 1 and then take 1
    away: (s + 1) - 1 rounds s (here 6e-9) to 0.
    """
    from entropy_reg.kernels import triton_entropy

    assert triton_entropy._num_splits(1, vocab, torch.device(DEVICE)) > 1, "the row must be split"
    x = torch.zeros(1, vocab)
    x[0, 5] = peak
    labels = torch.tensor([5])
    lp, h, grad = run("triton", x, labels, None, 1.0, torch.tensor([1.0]), torch.tensor([0.5]))
    ref_h = entropy_f64(x).detach()
    check_forward(lp, logprob_f64(x, labels).detach(), "log p", ref_h)
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(x, labels, torch.ones(1, dtype=torch.bool), 1.0, torch.tensor([1.0]), torch.tensor([0.5]))
    check_gradient(grad, ref, bound)


def _compiled_call(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, h, w, y: er.token_logprobs_and_entropy(x, y, backend="torch")[0],
        lambda x, h, w, y: er.linear_token_entropy(h, w, y)[0],
    ],
    ids=["logits", "linear"],
)
def test_compiled_label_range_is_checked_in_the_graph(call):
    """Under torch.compile the range check runs in the graph: torch raises a RuntimeError with the message."""
    g = torch.Generator().manual_seed(0)
    x, h, w = torch.randn(3, 5, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    f = _compiled_call(call)
    good = torch.tensor([0, 4, 2])
    torch.testing.assert_close(f(x, h, w, good), call(x, h, w, good))
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 5\)"):
        f(x, h, w, torch.tensor([0, 7, 2]))
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 5\)"):
        f(x, h, w, torch.tensor([0, -1, 2]))


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_temperature_may_vary_between_calls(dynamic):
    """T as an argument of the compiled function: a symbolic float on the second call (first, dynamic)."""
    x = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    f = torch.compile(lambda a, t: er.token_entropy(a, temperature=t), fullgraph=True, dynamic=dynamic)
    lin = torch.compile(lambda a, t: er.linear_token_entropy(a, torch.eye(11), temperature=t), fullgraph=True, dynamic=dynamic)
    for t in (0.7, 0.9, 1.6):
        check_forward(f(x, t), entropy_f64(x, t).detach(), f"H at T={t}")
        check_forward(lin(x, t), entropy_f64(x, t).detach(), f"linear H at T={t}")


EXTREME_T = [1e-39, 2e-39, 1e-31, 1.01e30, 1e31, 1e46, 1e-310, 1e300]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", EXTREME_T)
def test_temperatures_outside_the_served_range_are_refused(dtype, temperature):
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=dtype)
    with pytest.raises(ValueError, match="temperature"):
        er.token_entropy(x, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        er.linear_token_entropy(x, torch.eye(3, dtype=dtype), temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1e-30, 1e30])
def test_temperatures_at_the_edges_of_the_range_are_exact(backend, dtype, temperature):
    """At T = 1e-30 and 1e30 outputs and gradients meet the contract (float64 math: to float64 rounding)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 40, generator=g, dtype=torch.float64) * temperature * 10).to(dtype)  # x / T of order 10
    labels = torch.tensor([0, 17, 39])
    g_lp, g_h = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.5, 1.0, -1.0])
    lp, h, grad = run(backend, x, labels, None, temperature, g_lp, g_h)
    ref_h = entropy_f64(x, temperature).detach()
    check_forward(lp, logprob_f64(x, labels, temperature).detach(), "log p", ref_h)
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(x, labels, torch.ones(3, dtype=torch.bool), temperature, g_lp, g_h)
    if dtype == torch.float64:
        torch.testing.assert_close(grad, ref, rtol=1e-12, atol=0.0)
    else:
        check_gradient(grad.float() if dtype == torch.float32 else grad, ref, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e30, 1e6, 1.0e2])
def test_rows_spread_past_float32_range(backend, temperature):
    """x - max x overflows float32 at +-3e38: served, as the README's edge states (T <= 1e30)."""
    x = torch.tensor([[3e38, -3e38, 0.0, 1e38], [-3.4e38, 3.4e38, 1.0, -1.0]])
    labels = torch.tensor([1, 0])
    g_lp, g_h = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])
    lp, h, grad = run(backend, x, labels, None, temperature, g_lp, g_h)
    ref_lp = logprob_f64(x, labels, temperature).detach()
    ref_h = entropy_f64(x, temperature).detach()
    representable = ref_lp.abs() < torch.finfo(torch.float32).max
    check_forward(lp[representable], ref_lp[representable], "log p", ref_h[representable])
    assert bool((lp[~representable] == -math.inf).all()), "a log p beyond float32's range rounds to -inf"
    check_forward(h, ref_h, "H")
    ref, bound = reference_gradient(x, labels, torch.ones(2, dtype=torch.bool), temperature, g_lp, g_h)
    check_gradient(grad, ref, bound)
    # the lm_head path's block merge: hidden = 1, weight = the row, so the logits are exactly x
    for row, label in zip(x, labels.tolist()):
        lp_lin, h_lin = er.linear_token_entropy(torch.ones(1, 1), row.view(-1, 1), torch.tensor([label]), temperature=temperature, chunk_size=1)
        ref_row = logprob_f64(row.view(1, -1), torch.tensor([label]), temperature).detach()
        if bool(ref_row.abs() < torch.finfo(torch.float32).max):
            check_forward(lp_lin, ref_row, "linear log p", entropy_f64(row.view(1, -1), temperature).detach())
        check_forward(h_lin, entropy_f64(row.view(1, -1), temperature).detach(), "linear H")


def test_linear_token_entropy_under_autocast_keeps_float64():
    """autocast leaves an nn.Linear's float64 inputs alone, and so does linear_token_entropy."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 29, 7, 11])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(hidden, weight).dtype == torch.float64
        lp, h = er.linear_token_entropy(hidden, weight, labels)
    z = hidden @ weight.T
    assert lp.dtype == h.dtype == torch.float64
    torch.testing.assert_close(h, entropy_f64(z), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp, logprob_f64(z, labels), rtol=1e-12, atol=1e-14)
