"""Row-chunked entropy / log-prob kernels written with PyTorch ops.

The "torch" backend: runs on any device, and is the CPU path. Each chunk of
rows is small enough (``_CHUNK_ELEMS`` float32 values on CPU, about 4 MB) that
the float32 work buffers stay in cache, so every pass after the first read of
the logits is cheap; nothing of size N x V is ever allocated except the one
gradient tensor of the backward.

Math (DESIGN.md section 3), per row, with z = x / T, m = max x:

    d_j = (z_j - max z) * log2(e)     e_j = 2 ** d_j      (exp2 is ~2x faster than exp on CPU)
    s = sum_j e_j                     u = sum_j e_j d_j
    H = ln s - ln2 * u / s            lse = max z + ln s
    log p_y = (x_y - m) / T - ln s

Backward, from the two saved numbers per row (lse, H):

    log p_j = z_j - lse               p_j = exp(log p_j)
    dL/dz_j = -p_j * (g_H * (log p_j + H) + g_lp) + g_lp * 1[j = y]
    dL/dx_j = dL/dz_j / T

``-inf`` logits: d_j and log p_j are clamped at ``_LOG_FLOOR``; any value under
it already gives p_j = 0 in float32, so the clamp changes no result but keeps
``0 * -inf`` from turning into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
# exp(-1000) and 2**-1000 are exactly 0 in float32 (the smallest subnormal is 2**-149).
_LOG_FLOOR = -1000.0
# float32 elements per work buffer: ~4 MB on CPU (cache-resident), larger on GPUs.
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


def forward(
    x3: Tensor, labels: Tensor | None, active: Tensor | None, inv_temp: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (logprobs[n] or empty, entropy[n], lse[n]), float32; inactive rows give 0."""
    b, t, v = x3.shape
    n = b * t
    dev = x3.device
    entropy = torch.zeros(n, device=dev, dtype=torch.float32)
    lse = torch.zeros(n, device=dev, dtype=torch.float32)
    logp = torch.zeros(n if labels is not None else 0, device=dev, dtype=torch.float32)
    step = chunk_rows(n, v, dev)
    d_buf = torch.empty(step, v, device=dev, dtype=torch.float32)
    e_buf = torch.empty(step, v, device=dev, dtype=torch.float32)
    scale = inv_temp * LOG2E
    for rows, xc in _row_blocks(x3, active):
        r = xc.shape[0]
        d, e = d_buf[:r], e_buf[:r]
        m = xc.amax(-1, keepdim=True).float()
        torch.sub(xc, m, out=d)
        d.mul_(scale).clamp_(min=_LOG_FLOOR)
        torch.exp2(d, out=e)
        s = e.sum(-1)
        ln_s = s.log()
        entropy[rows] = ln_s - LN2 * torch.linalg.vecdot(e, d) / s
        lse[rows] = m.squeeze(1) * inv_temp + ln_s
        if labels is not None:
            y = labels[rows].unsqueeze(1)
            logp[rows] = (xc.gather(1, y).float() - m).squeeze(1) * inv_temp - ln_s
    return logp, entropy, lse


def backward(
    x3: Tensor,
    labels: Tensor | None,
    active: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    inv_temp: float,
    out: Tensor,
) -> None:
    """Write dL/dx into ``out`` (shape of x3, logits dtype); inactive rows get 0.

    ``out`` may be x3 itself (in-place backward): each chunk is read completely
    before its gradient is written over it.
    """
    b, t, v = x3.shape
    n = b * t
    dev = x3.device
    if active is not None:
        idle = (~active).nonzero().squeeze(1)
        out[idle // t, idle % t] = 0
    zeros = torch.zeros(n, device=dev, dtype=torch.float32)
    g_h = grad_entropy.float() if grad_entropy is not None else zeros
    g_lp = grad_logp.float() if grad_logp is not None and labels is not None else None
    step = chunk_rows(n, v, dev)
    lp_buf = torch.empty(step, v, device=dev, dtype=torch.float32)
    inv_t = torch.full((1, 1), inv_temp, device=dev, dtype=torch.float32)
    p_buf = torch.empty(step, v, device=dev, dtype=torch.float32)
    for rows, xc in _row_blocks(x3, active):
        r = xc.shape[0]
        lp, p = lp_buf[:r], p_buf[:r]
        gh = g_h[rows].unsqueeze(1)
        # log p = x/T - lse, rounded as the forward rounded lse = m/T + ln s (exact at the max)
        if inv_temp == 1.0:
            torch.sub(xc, lse[rows].unsqueeze(1), out=lp)
        else:
            torch.mul(xc, inv_t, out=lp)  # a float32 [1, 1] factor: bf16 inputs are multiplied in float32
            lp.sub_(lse[rows].unsqueeze(1))
        lp.clamp_(min=_LOG_FLOOR)
        torch.mul(lp, LOG2E, out=p)
        p.exp2_()
        # coefficient of p_j: g_H * (log p_j + H) + g_lp
        offset = gh * entropy[rows].unsqueeze(1)
        if g_lp is not None:
            glp = g_lp[rows].unsqueeze(1)
            offset = offset + glp
        torch.addcmul(offset, lp, gh, out=lp)
        lp.mul_(p)
        if g_lp is not None:
            y = labels[rows].unsqueeze(1)
            lp.scatter_add_(1, y, -glp)
        lp.mul_(-inv_temp)
        _write_rows(out, rows, lp)
