"""Row-chunked entropy / log-prob kernels written with PyTorch ops.

The "torch" backend: runs on any device, and is the CPU path. Each chunk of
rows is small enough (``_CHUNK_ELEMS`` values on CPU, about 4 MB of float32)
that the work buffers stay in cache, so every pass after the first read of the
logits is cheap; nothing of size N x V is ever allocated except the one
gradient tensor of the backward. The math runs in float32 (float64 for float64
logits).

Math, per row, with T the temperature and m = max_j x_j the raw row maximum:

    d_j = (x_j - m) * log2(e) / T     e_j = 2 ** d_j      (exp2 is ~2x faster than exp on CPU)
    s = sum_j e_j                     u = sum_j e_j d_j
    q = sum_{d_j < 0} e_j             n_0 = round(s - q)  (the entries at the max, each exactly 1)
    c = ln s = log1p(q + n_0 - 1)     H = c - ln2 * u / s
    log p_y = (x_y - m) / T - c

q leaves the max's exact 1s out, so a confident row (s = 1 + tiny) keeps the digits of c: the
float32 sum s rounds them to float32's spacing near 1 (1.2e-7). n_0 is exact because both sums
err by far less than 1/2 (s <= V). (An argmax would find the max's position too, but on CPU it
costs more than the rest of the pass; q is two in-place passes and a sum.)

The row's statistics for the backward are (m, c), never lse = m / T + c: with
|x| / T large, lse rounds to a multiple of ulp(m / T) and x / T - lse loses every
digit of a log-probability near 0. ``x - m`` is exact where the mass is (near the
max), so log p_j = (x_j - m) / T - c is accurate for every j.

Backward, from (m, c) and H:

    log p_j = (x_j - m) / T - c       p_j = exp(log p_j)
    dL/dx_j = (1/T) * ( -p_j * (g_H * (log p_j + H) + g_lp) + g_lp * 1[j = y] )

At the label the two g_lp terms are merged into g_lp * (1 - p_y) = -g_lp * expm1(log p_y),
which stays accurate when p_y is near 1.

``-inf`` logits: d_j and log p_j are clamped at ``LOG_FLOOR``; any value under
it already gives 0 (even in float64), so the clamp changes no result but keeps
``0 * -inf`` from turning into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from . import Rows, Upstream, compute_dtype, scaled_gap

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
# exp(-1100) and 2**-1100 are exactly 0 in float32 and float64 (the smallest subnormals are
# 2**-149 and 2**-1074).
LOG_FLOOR = -1100.0
# Elements per work buffer: ~4 MB of float32 on CPU (cache-resident), larger on GPUs.
_CHUNK_ELEMS = {"cpu": 1 << 20}
_CHUNK_ELEMS_DEFAULT = 1 << 24


def chunk_rows(num_rows: int, vocab: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMS.get(device.type, _CHUNK_ELEMS_DEFAULT)
    return max(1, min(num_rows, budget // max(vocab, 1)))


def _as_matrix(x3: Tensor) -> Tensor | None:
    """The [b*t, V] strided view of x3, or None when its rows are not evenly spaced."""
    b, t, v = x3.shape
    if t == 1:
        return x3.as_strided((b, v), (x3.stride(0), 1))
    if b == 1 or x3.stride(0) == t * x3.stride(1):
        return x3.as_strided((b * t, v), (x3.stride(1), 1))
    return None


def _row_blocks(x3: Tensor, active: Tensor | None) -> Iterator[tuple[Tensor | slice, Tensor]]:
    """Yield (rows, block[r, V]) over the rows to compute, in chunks.

    ``rows`` is a slice of the flattened row index when the logits read as a
    strided matrix and every row is active (the block is then a view), else an
    index tensor of active rows (the block is then a chunk-sized gathered copy).
    Masked rows are never read.
    """
    b, t, v = x3.shape
    step = chunk_rows(b * t, v, x3.device)
    if active is not None and bool(active.all()):
        active = None
    x2 = _as_matrix(x3)
    if active is None and x2 is not None:
        for r0 in range(0, b * t, step):
            yield slice(r0, r0 + step), x2[r0 : r0 + step]
        return
    idx = active.nonzero().squeeze(1) if active is not None else torch.arange(b * t, device=x3.device)
    for r0 in range(0, idx.numel(), step):
        rows = idx[r0 : r0 + step]
        yield rows, x3[rows // t, rows % t]


def _write_rows(out3: Tensor, rows: Tensor | slice, values: Tensor) -> None:
    """out[rows] = values, for the rows of ``_row_blocks`` (out3 laid out as the blocks' source)."""
    if isinstance(rows, slice):
        out2 = _as_matrix(out3)
        assert out2 is not None
        out2[rows] = values
    else:
        t = out3.shape[1]
        out3[rows // t, rows % t] = values.to(out3.dtype)


def forward(x3: Tensor, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
    """Return (logprobs[n] or empty, entropy[n], stats[2, n] = (m, c)); inactive rows give 0."""
    labels, active, inv_temp = rows.labels, rows.active, rows.inv_temp
    b, t, v = x3.shape
    n = b * t
    acc = dict(device=x3.device, dtype=compute_dtype(x3))
    entropy = torch.zeros(n, **acc)
    stats = torch.zeros(2, n, **acc)
    logp = torch.zeros(n if labels is not None else 0, **acc)
    step = chunk_rows(n, v, x3.device)
    d_buf = torch.empty(step, v, **acc)
    e_buf = torch.empty(step, v, **acc)
    scale = inv_temp * LOG2E
    for sel, xc in _row_blocks(x3, active):
        r = xc.shape[0]
        d, e = d_buf[:r], e_buf[:r]
        m = xc.amax(-1, keepdim=True).to(d.dtype)
        torch.sub(xc, m, out=d)
        d.mul_(scale).clamp_(min=LOG_FLOOR)
        torch.exp2(d, out=e)
        s = e.sum(-1)
        u = torch.linalg.vecdot(e, d)
        # q: the sum without the entries at the max; threshold_ keeps -e_j > -1, zeroes the 1s
        q = -torch.nn.functional.threshold_(e.neg_(), -1.0, 0.0).sum(-1)
        c = (q + ((s - q).round() - 1.0)).log1p()
        entropy[sel] = c - LN2 * u / s
        stats[0, sel] = m.squeeze(1)
        stats[1, sel] = c
        if labels is not None:
            y = labels[sel].unsqueeze(1)
            logp[sel] = scaled_gap(xc.gather(1, y).to(d.dtype), m, inv_temp).squeeze(1) - c
    return logp, entropy, stats


def backward(x3: Tensor, rows: Rows, up: Upstream, out: Tensor) -> None:
    """Write dL/dx into ``out`` (shape of x3, logits dtype); inactive rows get 0.

    ``out`` may be x3 itself (in-place backward): each chunk is read completely
    before its gradient is written over it.
    """
    labels, active, inv_temp = rows.labels, rows.active, rows.inv_temp
    stats, entropy, grad_logp, grad_entropy = up.stats, up.entropy, up.grad_logp, up.grad_entropy
    b, t, v = x3.shape
    n = b * t
    acc = dict(device=x3.device, dtype=compute_dtype(x3))
    if active is not None:
        idle = (~active).nonzero().squeeze(1)
        out[idle // t, idle % t] = 0
    g_h = grad_entropy.to(acc["dtype"]) if grad_entropy is not None else torch.zeros(n, **acc)
    g_lp = grad_logp.to(acc["dtype"]) if grad_logp is not None and labels is not None else None
    step = chunk_rows(n, v, x3.device)
    lp_buf = torch.empty(step, v, **acc)
    p_buf = torch.empty(step, v, **acc)
    for sel, xc in _row_blocks(x3, active):
        r = xc.shape[0]
        lp, p = lp_buf[:r], p_buf[:r]
        gh = g_h[sel].unsqueeze(1)
        h = entropy[sel].unsqueeze(1)
        # log p = (x - m) / T - c, exact near the max (see the module docstring)
        torch.sub(xc, stats[0, sel].unsqueeze(1), out=lp)
        torch.add(stats[1, sel].unsqueeze(1).neg(), lp, alpha=inv_temp, out=lp)  # -c + (x - m) / T
        lp.clamp_(min=LOG_FLOOR)
        torch.mul(lp, LOG2E, out=p)
        p.exp2_()
        # coefficient of -p_j: g_H * (log p_j + H) + g_lp
        offset = gh * h
        if g_lp is not None:
            glp = g_lp[sel].unsqueeze(1)
            offset = offset + glp
            y = labels[sel].unsqueeze(1)
            lp_y = lp.gather(1, y)
            # at the label: g_lp (1 - p_y) - g_H p_y (log p_y + H), with 1 - p_y = -expm1(log p_y)
            at_y = -glp * torch.expm1(lp_y) - gh * p.gather(1, y) * (lp_y + h)
        torch.addcmul(offset, lp, gh, out=lp)
        lp.mul_(p).neg_()
        if g_lp is not None:
            lp.scatter_(1, y, at_y)
        lp.mul_(inv_temp)
        _write_rows(out, sel, lp)
