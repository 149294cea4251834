"""Entropy and log-probs over a vocabulary split into disjoint parts (blocks of one rank, or ranks).

Each part k covers a contiguous range of vocabulary ids ``[offset_k, offset_k + V_k)``
and yields, per row, the statistics of the softmax restricted to it (nats,
T the temperature): its raw maximum m_k = max_{j in k} x_j, c_k = ln sum_{j in k}
exp((x_j - m_k) / T) and its entropy H_k.

The full-vocabulary values follow from these alone. With M = max_k m_k,
a_k = (m_k - M) / T + c_k (the part's log-mass relative to exp(M / T), at most
ln V_k, so exp(a_k) cannot overflow), e_k = exp(a_k), S = sum_k e_k:

    c = ln S                       (so lse = M / T + c, never formed)
    H = sum_k (e_k / S) (H_k + c - a_k) = sum_k e_k (H_k - a_k) / S + c
    log p_y = (x_y - M) / T - c    (x_y read by the one part owning y)

S - 1 is summed without the 1 of the max, as the kernels do: the n_M parts whose
m_k = M give expm1(c_k) = e_k - 1 each, the others e_k, and R = sum + n_M - 1;
then c = log1p(R), S = 1 + R. A confident row (S near 1) keeps the digits of c.

Every difference of large numbers is taken between raw logits (x_y - M,
m_k - M), which is exact near the max, before dividing by T: a log-probability
near 0 keeps its digits however large |x| / T is.

The backward of a part needs only the full-vocabulary (M, c) and H: every
part's gradient is the single-part kernel's backward fed them, because
dH/dz_j = -p_j (log p_j + H) and d log p_y / dz_j = 1[j = y] - p_j involve only
x_j, (M, c) and H. Used by ``linear_token_entropy`` (vocabulary blocks of one
device) and by ``entropy_reg.vocab_parallel`` (shards across ranks) alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from . import kernels
from .kernels import compute_dtype
from .kernels.torch_chunked import LOG_FLOOR


def localize(labels: Tensor, offset: int, width: int, active: Tensor | None) -> tuple[Tensor, Tensor]:
    """(local label ids, owned) for the part ``[offset, offset + width)``.

    ``owned[i]``: row i is active and its label lies in this part. Rows not owned
    get local id 0, a valid column whose gradient :func:`part_backward` repairs.
    """
    local = labels - offset
    owned = (local >= 0) & (local < width)
    if active is not None:
        owned &= active
    return torch.where(owned, local, 0), owned


def part_stats(
    backend: str, x3: Tensor, active: Tensor | None, inv_temp: float, may_be_empty: bool = True
) -> tuple[Tensor, Tensor]:
    """(stats_k[2, n] = (m_k, c_k), H_k[n]) of one part's logits ``x3[b, t, V_k]`` (0 on inactive rows).

    A row whose part is all ``-inf`` (legal: a masked slice of the vocabulary)
    gets m_k = -inf, c_k = 0, H_k = 0, i.e. weight 0 in the merge; single-part
    kernels call such a row NaN, since on its own it has no distribution. Only
    rows the kernel returned as non-finite are re-read; ``may_be_empty=False``
    (no -inf can occur) skips that check and its device synchronization.
    """
    _, entropy, stats = kernels.load(backend).forward(x3, kernels.Rows(None, active, inv_temp))
    if not may_be_empty:
        return stats, entropy
    suspect = (~(stats[1].isfinite() & entropy.isfinite())).nonzero().squeeze(1)
    if suspect.numel():
        t = x3.shape[1]
        empty = suspect[x3[suspect // t, suspect % t].amax(-1) == float("-inf")]
        stats[0, empty] = float("-inf")
        stats[1, empty] = 0.0
        entropy[empty] = 0.0
    return stats, entropy


def label_logits(x3: Tensor, local: Tensor, owned: Tensor) -> Tensor:
    """The raw logit x_y (float32, float64 for float64 logits) on the rows this part owns, 0 elsewhere."""
    b, t, _ = x3.shape
    x_y = x3.gather(2, local.view(b, t, 1)).view(-1)
    return torch.where(owned, x_y.to(compute_dtype(x3)), 0.0)


def merge_terms(stats_k: Tensor, entropy_k: Tensor, m: Tensor, inv_temp: float) -> tuple[Tensor, Tensor, Tensor]:
    """(rest_k, e_k (H_k - a_k), [m_k = M]) with a_k = (m_k - M) / T + c_k, e_k = exp(a_k).

    rest_k is e_k without the max's 1 where the part holds the max (expm1(c_k)), else e_k;
    exactly 0 for empty parts (m_k = -inf).
    """
    a = (stats_k[..., 0, :] - m) * inv_temp + stats_k[..., 1, :]
    e = a.exp()
    # a is NaN when every part is empty (M = -inf): such a row stays NaN, as in the kernels
    holds_max = (stats_k[..., 0, :] == m) & ~a.isnan()
    rest = torch.where(holds_max, torch.expm1(stats_k[..., 1, :]), e)
    return rest, torch.where(e > 0, e * (entropy_k - a), 0.0), holds_max.to(e.dtype)


def finish_merge(m: Tensor, rest: Tensor, weighted: Tensor, n_max: Tensor) -> tuple[Tensor, Tensor]:
    """(stats[2, n] = (M, c), H) from M and the sums over parts of rest_k, e_k (H_k - a_k), [m_k = M]."""
    r = rest + (n_max - 1.0)
    c = r.log1p()
    return torch.stack([m, c]), weighted / (1.0 + r) + c


def merge_parts(stats_parts: Tensor, entropy_parts: Tensor, inv_temp: float) -> tuple[Tensor, Tensor]:
    """(stats[2, n], H[n]) over the union of the parts stacked on dim 0 (``[P, 2, n]`` and ``[P, n]``)."""
    m = stats_parts[:, 0].amax(0)
    return finish_merge(m, *(t.sum(0) for t in merge_terms(stats_parts, entropy_parts, m, inv_temp)))


def part_backward(backend: str, x3: Tensor, rows: kernels.Rows, owned: Tensor | None, up: kernels.Upstream, out: Tensor) -> None:
    """Write one part's dL/dx into ``out`` (may be x3 itself) from the full-vocabulary (M, c) and H.

    ``rows.labels`` are this part's local ids (:func:`localize`), ``owned`` says
    which rows' labels lie in this part, ``up.stats`` and ``up.entropy`` are the
    full vocabulary's. The kernel's backward adds g_lp at the row's label column;
    rows whose label lies in another part were given column 0, so that element is
    recomputed here from the formula without the indicator (O(rows) work, read
    before ``out`` is written, in case it aliases x3):

        dL/dx_0 = -(1/T) p_0 (g_H (log p_0 + H) + g_lp),   log p_0 = (x_0 - M) / T - c
    """
    be = kernels.load(backend)
    if rows.labels is None or up.grad_logp is None:
        be.backward(x3, kernels.Rows(None, rows.active, rows.inv_temp), replace(up, grad_logp=None), out)
        return
    b, t, _ = x3.shape
    stats, inv_temp = up.stats, rows.inv_temp
    foreign = (~owned if rows.active is None else rows.active & ~owned).view(b, t)
    # Dense over rows (no nonzero, so no device sync); other rows keep the kernel's value.
    x0 = x3[:, :, 0].to(stats.dtype)
    log_p0 = ((x0 - stats[0].view(b, t)) * inv_temp - stats[1].view(b, t)).clamp(min=LOG_FLOOR)
    be.backward(x3, rows, up, out)
    coef = up.grad_logp.to(stats.dtype).view(b, t)
    if up.grad_entropy is not None:
        coef = coef + up.grad_entropy.to(stats.dtype).view(b, t) * (log_p0 + up.entropy.view(b, t))
    col = out[:, :, 0]
    col.copy_(torch.where(foreign, (-inv_temp * log_p0.exp() * coef).to(out.dtype), col))
