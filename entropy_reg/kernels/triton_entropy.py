"""Triton kernels for per-token entropy and log-probs (the "triton" backend).

Same interface as ``torch_chunked`` (see ``entropy_reg.kernels``). The forward
reads each row of logits once, with an online max/rescale; the backward reads
it once more and writes the gradient once (or over the logits, in place).

Rows are read through two leading strides (``x[b, t, :]`` at ``b*stride_b +
t*stride_t``, int64), so slices of a [B, S, V] tensor need no copy. When there
are too few rows to fill the GPU, each row's vocabulary is split across
programs and the partial sums are merged by a second, tiny kernel.

Exponentials are in base 2, ``2^((x - m) log2(e) / T)``, so each is one ``exp2``
instruction; entropies and log-probs are converted back to nats.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import Rows, Upstream

# Globals read inside kernels must be tl.constexpr instances. (Keep a tensor on the left of any
# arithmetic with them: the CPU interpreter mishandles `constexpr * tensor`.)
LOG2E = tl.constexpr(1.0 / math.log(2.0))
LN2 = tl.constexpr(math.log(2.0))
# Row maxima start at -FLT_MAX (not -inf) so a block of only -inf entries never forms -inf - -inf.
NEG_BIG = tl.constexpr(-3.4028234663852886e38)
# Exponents are clamped here: 2**-1000 is exactly 0 in float32, so the clamp changes no value
# but stops 0 * -inf from making NaN. The clamp is a NaN-propagating max (one max.NaN
# instruction): a NaN logit must still turn its row's results into NaN.
FLOOR = tl.constexpr(-1000.0)
NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)
# Smallest vocabulary slice one program takes when rows are split; tests lower it to exercise splits.
MIN_SPLIT = 8192

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # the CPU interpreter gains nothing from tuning and pays for every config
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK": b}, num_warps=w)
        for b, w in ((2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))
    ]


@triton.jit
def _log1p(x):
    # ln(1 + x) without losing x when it is tiny (Kahan's trick: the rounding of 1 + x cancels in
    # the ratio); tl has no log1p, and libdevice's does not run under the CPU interpreter.
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * x / tl.where(w == 1.0, 1.0, w - 1.0))


@triton.jit
def _scaled_gap(x, m, inv_temp):
    # (x - m) / T; where finite x and m differ by more than float32's range, x - m overflows, and
    # halving both first is exact and cannot (as kernels.scaled_gap).
    gap = (x - m) * inv_temp
    spread = (tl.abs(gap) == float("inf")) & (tl.abs(x) < float("inf")) & (tl.abs(m) < float("inf"))
    return tl.where(spread, (x * 0.5 - m * 0.5) * (inv_temp * 2.0), gap)


@triton.jit
def _finish_row(m, top, r, u2, x_base, labels_ptr, V, inv_temp, row, logp_ptr, ent_ptr, m_ptr, c_ptr, HAS_LABELS: tl.constexpr):
    # From m = max x and s = top + r = sum 2^d, u2 = sum 2^d d with d = (x - m) log2(e) / T, where
    # top = 1 is one copy of the max (0 when the row has none: all -inf) and r is every other term:
    #   c = ln s = log1p(r)      H = c - ln2 u2 / s      log p_y = (x_y - m) / T - c
    # r never holds the 1, so c keeps its digits when s is near 1 (a confident row). The backward
    # gets (m, c), never lse = m / T + c: x / T - lse would lose every digit of a log-probability
    # near 0 once |x| / T is large, while x - m is exact near the max.
    s = top + r
    c = tl.where(top > 0, _log1p(r), tl.log(r))
    tl.store(ent_ptr + row, c - LN2 * u2 / s)
    tl.store(m_ptr + row, m)
    tl.store(c_ptr + row, c)
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        # An id outside [0, V) gives NaN instead of a read out of bounds (checking on the host would sync).
        x_y = tl.load(x_base + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32)
        tl.store(logp_ptr + row, _scaled_gap(x_y, m, inv_temp) - c)


@triton.jit
def _zero_row(row, logp_ptr, ent_ptr, m_ptr, c_ptr, HAS_LABELS: tl.constexpr):
    # Masked rows and ignored labels: outputs 0, logits never read.
    tl.store(ent_ptr + row, 0.0)
    tl.store(m_ptr + row, 0.0)
    tl.store(c_ptr + row, 0.0)
    if HAS_LABELS:
        tl.store(logp_ptr + row, 0.0)


@triton.jit
def _row_base(x_ptr, row, n_t, stride_b, stride_t):
    # Row `row` of a [b, n_t, V] view sits at (row // n_t) stride_b + (row % n_t) stride_t.
    return x_ptr + (row // n_t) * stride_b + (row % n_t) * stride_t


@triton.autotune(configs=_configs(), key=["V", "num_splits"])
@triton.jit
def _fwd_kernel(
    x_ptr, labels_ptr, active_ptr, part_ptr, logp_ptr, ent_ptr, m_ptr, c_ptr,
    n_t, stride_b, stride_t, V, scale, inv_temp, num_splits,
    HAS_ACTIVE: tl.constexpr, HAS_LABELS: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # Parameters (T below is the temperature):
    #   x_ptr        logits [b, n_t, V], last stride 1, rows at (stride_b, stride_t) (int64 offsets)
    #   labels_ptr   int64 [n] label ids (read only when HAS_LABELS; any float tensor otherwise)
    #   active_ptr   bool [n] rows to compute (read only when HAS_ACTIVE)
    #   part_ptr     float32 [n, num_splits, 3] partial (m, r, u) when not FINAL
    #   logp_ptr, ent_ptr, m_ptr, c_ptr   float32 [n] outputs: log p_y, H, the row max m, c = ln s
    #   V, scale = log2(e) / T, inv_temp = 1 / T, num_splits = vocabulary slices per row
    # One program: row `pid0`, vocabulary slice `pid1` of `num_splits`.
    # Online over blocks, with the running max m of the raw logits, s = top + r (see _finish_row):
    #   m' = max(m, max_block x)     delta = (m - m') scale     a = 2^delta     d_j = (x_j - m') scale
    #   u' = a (u + delta s) + sum 2^d_j d_j
    #   r' = a top + a r + sum_{d_j < 0} 2^d_j + n_0 - 1,  top' = 1    when the block brings a new max
    #   r' = r + sum_{d_j < 0} 2^d_j + n_0                          otherwise
    # with n_0 the block's entries at the max (d_j = 0: each exactly 1; one of them becomes the top).
    # FINAL (one slice per row): write H, (m, c), log p_y; else write the partial (m, r, u) for
    # _merge_kernel, m = -inf for a slice without a max (all -inf).
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    is_active = True
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0
    x_base = _row_base(x_ptr, row, n_t, stride_b, stride_t)
    if is_active:
        chunk = tl.cdiv(tl.cdiv(V, num_splits), BLOCK) * BLOCK
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        offs = tl.arange(0, BLOCK)
        m = tl.full([], NEG_BIG, tl.float32)
        top = tl.zeros([], tl.float32)
        r = tl.zeros([], tl.float32)
        u = tl.zeros([], tl.float32)
        for k in range(start, end, BLOCK):
            idx = k + offs
            x = tl.load(x_base + idx, mask=idx < end, other=float("-inf")).to(tl.float32)
            block_max = tl.max(x, 0)
            # the first finite max also promotes when it equals the starting -FLT_MAX
            promote = (block_max > m) | ((top == 0.0) & (block_max >= m))
            m_new = tl.where(promote, block_max, m)
            delta = tl.maximum((m - m_new) * scale, FLOOR, propagate_nan=NAN_ALL)
            alpha = tl.exp2(delta)
            # (x - m') first: exact in float32 near the max, where the mass is
            d = tl.maximum((x - m_new) * scale, FLOOR, propagate_nan=NAN_ALL)
            e = tl.exp2(d)
            at_max = d == 0.0
            # a NaN entry fails d == 0, so it stays in the sum and turns the row into NaN
            rest = tl.sum(tl.where(at_max, 0.0, e), 0)
            n_0 = tl.sum(at_max.to(tl.float32), 0)
            u = alpha * (u + delta * (top + r)) + tl.sum(e * d, 0)
            r = tl.where(promote, alpha * top + alpha * r + (n_0 - 1.0), r + n_0) + rest
            top = tl.where(promote, 1.0, top)
            m = m_new
        if FINAL:
            _finish_row(m, top, r, u, x_base, labels_ptr, V, inv_temp, row, logp_ptr, ent_ptr, m_ptr, c_ptr, HAS_LABELS)
        else:
            part = part_ptr + (row * num_splits + split) * 3
            tl.store(part, tl.where(top > 0, m, float("-inf")))
            tl.store(part + 1, r)
            tl.store(part + 2, u)
    elif FINAL:
        _zero_row(row, logp_ptr, ent_ptr, m_ptr, c_ptr, HAS_LABELS)


@triton.jit
def _merge_kernel(
    x_ptr, labels_ptr, active_ptr, part_ptr, logp_ptr, ent_ptr, m_ptr, c_ptr,
    n_t, stride_b, stride_t, V, scale, inv_temp, num_splits,
    HAS_ACTIVE: tl.constexpr, HAS_LABELS: tl.constexpr, SPLITS: tl.constexpr,
):
    # Parameters as _fwd_kernel's; SPLITS = num_splits rounded up to a power of two.
    # Merge the slices' (m_k, r_k, u_k) of one row (m_k = -inf: the slice has no max, r_k = u_k = 0):
    #   M = max m_k,  delta_k = (m_k - M) scale,  a_k = 2^delta_k,  s_k = 1 + r_k
    #   r = (n_M - 1) + sum_{m_k = M} r_k + sum_{m_k < M} a_k s_k      (n_M slices hold the max)
    #   u = sum a_k (u_k + delta_k s_k)
    # A row of only -inf has M = -inf, and (m_k - M) = NaN makes its results NaN.
    row = tl.program_id(0).to(tl.int64)
    is_active = True
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0
    if is_active:
        k = tl.arange(0, SPLITS)
        part = part_ptr + (row * num_splits + k) * 3
        valid = k < num_splits
        m_k = tl.load(part, mask=valid, other=float("-inf"))
        r_k = tl.load(part + 1, mask=valid, other=0.0)
        u_k = tl.load(part + 2, mask=valid, other=0.0)
        m = tl.max(m_k, 0)
        delta = tl.maximum((m_k - m) * scale, FLOOR, propagate_nan=NAN_ALL)
        a = tl.exp2(delta)
        tied = valid & (m_k == m)
        # n_M - 1 (an exact integer) first: (sum + n_M) - 1 would round a confident row's small
        # sum away against the 1 of its top.
        r = (tl.sum(tied.to(tl.float32), 0) - 1.0) + tl.sum(tl.where(tied, r_k, a + a * r_k), 0)
        u = tl.sum(tl.where(valid, a * (u_k + delta * (1.0 + r_k)), 0.0), 0)
        x_base = _row_base(x_ptr, row, n_t, stride_b, stride_t)
        _finish_row(m, tl.full([], 1.0, tl.float32), r, u, x_base, labels_ptr, V, inv_temp, row, logp_ptr, ent_ptr, m_ptr, c_ptr, HAS_LABELS)
    else:
        _zero_row(row, logp_ptr, ent_ptr, m_ptr, c_ptr, HAS_LABELS)


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0 (Kahan's trick: the rounding of exp(x) cancels in the
    # ratio); tl has no expm1, and libdevice's does not run under the CPU interpreter.
    u = tl.exp(x)
    log_u = tl.log(u)
    ratio = (u - 1.0) * x / tl.where(log_u == 0.0, 1.0, log_u)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, ratio))


@triton.jit
def _bwd_body(
    x_ptr, out_ptr, labels_ptr, active_ptr, m_ptr, c_ptr, ent_ptr, glp_ptr, gh_ptr,
    n_t, stride_b, stride_t, out_stride_b, out_stride_t, V, inv_temp, num_splits,
    HAS_ACTIVE: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, BLOCK: tl.constexpr,
):
    # Parameters (T below is the temperature):
    #   x_ptr, out_ptr   logits and gradient [b, n_t, V] (out_ptr may be x_ptr), rows at their strides
    #   labels_ptr       int64 [n] label ids (read only when HAS_GLP)
    #   active_ptr       bool [n] rows to compute (when HAS_ACTIVE); other rows get gradient 0
    #   m_ptr, c_ptr, ent_ptr   float32 [n] the forward's row max m, c = ln s, and H
    #   glp_ptr, gh_ptr  float32 [n] upstream gradients of log p_y and H (when HAS_GLP / HAS_GH)
    #   V, inv_temp = 1 / T, num_splits = vocabulary slices per row (program axis 1)
    # Per element, with log p_j = (x_j - m) / T - c and p_j = 2^(log p_j * log2 e):
    #   dL/dx_j = (1/T) * ( -p_j * (g_H * (log p_j + H) + g_lp) + g_lp * 1[j = y] )
    # At the label, g_lp (1 - p_y) is formed as -g_lp expm1(log p_y), exact when p_y is near 1.
    # One read of x, one write of the gradient (which may be x itself: each element is read before
    # the same program overwrites it).
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(V, num_splits), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    offs = tl.arange(0, BLOCK)
    x_base = _row_base(x_ptr, row, n_t, stride_b, stride_t)
    o_base = _row_base(out_ptr, row, n_t, out_stride_b, out_stride_t)
    is_active = True
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0
    if is_active:
        m = tl.load(m_ptr + row)
        c = tl.load(c_ptr + row)
        h = tl.load(ent_ptr + row)
        gh = 0.0
        if HAS_GH:
            gh = tl.load(gh_ptr + row)
        glp = 0.0
        y = -1
        at_y = 0.0
        if HAS_GLP:
            glp = tl.load(glp_ptr + row)
            y = tl.load(labels_ptr + row)
            x_y = tl.load(x_base + y, mask=(y >= start) & (y < end), other=0.0).to(tl.float32)
            lp_y = tl.maximum((x_y - m) * inv_temp - c, FLOOR, propagate_nan=NAN_ALL)
            at_y = -glp * _expm1(lp_y) - gh * tl.exp2(lp_y * LOG2E) * (lp_y + h)
        c0 = gh * h + glp
        for k in range(start, end, BLOCK):
            idx = k + offs
            inside = idx < end
            x = tl.load(x_base + idx, mask=inside, other=0.0).to(tl.float32)
            lp = tl.maximum((x - m) * inv_temp - c, FLOOR, propagate_nan=NAN_ALL)
            p = tl.exp2(lp * LOG2E)
            dz = tl.where(idx == y, at_y, -p * (gh * lp + c0))
            tl.store(o_base + idx, (dz * inv_temp).to(out_ptr.dtype.element_ty), mask=inside)
    else:
        zero = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
        for k in range(start, end, BLOCK):
            idx = k + offs
            tl.store(o_base + idx, zero, mask=idx < end)


# Tuned per vocabulary size and row split (a proxy for "few rows" versus "many").
_bwd_tuned = triton.autotune(configs=_configs(), key=["V", "num_splits"])(_bwd_body)


def _num_splits(n: int, vocab: int, device: torch.device) -> int:
    """Vocabulary slices per row: enough programs to fill the GPU when rows are few."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    if n >= target:
        return 1
    return max(1, min(triton.cdiv(target, max(n, 1)), triton.cdiv(vocab, MIN_SPLIT)))


def forward(x3: Tensor, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
    labels, active, inv_temp = rows.labels, rows.active, rows.inv_temp
    b, t, v = x3.shape
    n = b * t
    f32 = dict(device=x3.device, dtype=torch.float32)
    logp = torch.empty(n if labels is not None else 0, **f32)
    entropy = torch.empty(n, **f32)
    stats = torch.empty(2, n, **f32)
    if n == 0:
        return logp, entropy, stats
    splits = _num_splits(n, v, x3.device)
    part = torch.empty((n, splits, 3) if splits > 1 else (0,), **f32)
    flags = dict(HAS_ACTIVE=active is not None, HAS_LABELS=labels is not None)
    # Pointers a disabled HAS_* flag leaves unread get any float32 tensor (entropy).
    ptrs = (
        x3,
        labels if labels is not None else entropy,
        active if active is not None else entropy,
        part,
        logp if labels is not None else entropy,
        entropy,
        stats[0],
        stats[1],
    )
    scalars = (t, x3.stride(0), x3.stride(1), v, inv_temp * LOG2E.value, inv_temp, splits)
    _fwd_kernel[(n, splits)](*ptrs, *scalars, FINAL=splits == 1, **flags)
    if splits > 1:
        _merge_kernel[(n,)](*ptrs, *scalars, SPLITS=triton.next_power_of_2(splits), **flags)
    return logp, entropy, stats


def backward(x3: Tensor, rows: Rows, up: Upstream, out: Tensor) -> None:
    labels, active, inv_temp = rows.labels, rows.active, rows.inv_temp
    stats, entropy, grad_logp, grad_entropy = up.stats, up.entropy, up.grad_logp, up.grad_entropy
    b, t, v = x3.shape
    n = b * t
    if n == 0:
        return
    has_glp = grad_logp is not None and labels is not None
    args = (
        x3,
        out,
        labels if has_glp else entropy,
        active if active is not None else entropy,
        stats[0],
        stats[1],
        entropy,
        # upstream gradients may be expanded or strided (e.g. from .sum()): the kernel reads them flat
        grad_logp.float().contiguous() if has_glp else entropy,
        grad_entropy.float().contiguous() if grad_entropy is not None else entropy,
        t, x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), v, inv_temp,
    )
    splits = _num_splits(n, v, x3.device)
    flags = dict(HAS_ACTIVE=active is not None, HAS_GLP=has_glp, HAS_GH=grad_entropy is not None)
    if out.data_ptr() != x3.data_ptr():
        _bwd_tuned[(n, splits)](*args, splits, **flags)
        return
    # In place: autotuning would run several configs over logits that the first run already
    # overwrote, so reuse the out-of-place kernel's choice when it has made one, else the second
    # config (a mid-sized block, good across vocabulary sizes).
    configs = _configs()
    cfg = getattr(_bwd_tuned, "best_config", None) or configs[min(1, len(configs) - 1)]
    _bwd_body[(n, splits)](*args, splits, **flags, **cfg.kwargs, num_warps=cfg.num_warps)
