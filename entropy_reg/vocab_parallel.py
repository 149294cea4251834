"""Entropy and log-probs over a vocabulary split into disjoint parts (blocks of one rank, or ranks).

Each part k covers a contiguous range of vocabulary ids ``[offset_k, offset_k + V_k)``
and yields, per row, its own log-sum-exp and entropy of the softmax restricted
to it (nats, z = logits / T):

    lse_k = log sum_{j in k} exp(z_j)         H_k = lse_k - E_k[z]

The full-vocabulary values follow from these alone. With M = max_k lse_k,
e_k = exp(lse_k - M) and S = sum_k e_k (the part weights are w_k = e_k / S):

    lse = M + log S
    H   = sum_k w_k (H_k + lse - lse_k) = sum_k e_k (H_k - (lse_k - M)) / S + log S
    log p_y = z_y - lse = (z_y - M) - log S          (z_y read by the one part owning y)

Across ranks this is two collectives: a MAX of lse_k, then one SUM of the
stacked (e_k, e_k (H_k - (lse_k - M)), owner's z_y - M). The backward needs no
collective: every part's gradient is the single-part kernel's backward fed the
global lse and H, because dH/dz_j = -p_j (log p_j + H) and
d log p_y / dz_j = 1[j = y] - p_j involve only z_j, lse and H.

The layout across ranks is Megatron's: rank r of the group holds ids
``[r * V_local, (r + 1) * V_local)`` (equal shards, in rank order); labels are
global ids, replicated on every rank, as are mask and the output gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .kernels.torch_chunked import _LOG_FLOOR


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
    """(lse_k, H_k) of one part's logits ``x3[b, t, V_k]`` (float32, 0 on inactive rows).

    A row whose part is all ``-inf`` (legal: a masked slice of the vocabulary)
    gets lse_k = -inf, H_k = 0, i.e. weight 0 in the merge; single-part kernels
    call such a row NaN, since on its own it has no distribution. Only rows the
    kernel returned as non-finite are re-read; ``may_be_empty=False`` (no -inf
    can occur) skips that check and its device synchronization.
    """
    _, entropy, lse = kernels.load(backend).forward(x3, None, active, inv_temp)
    if not may_be_empty:
        return lse, entropy
    suspect = (~(lse.isfinite() & entropy.isfinite())).nonzero().squeeze(1)
    if suspect.numel():
        t = x3.shape[1]
        empty = suspect[x3[suspect // t, suspect % t].amax(-1) == float("-inf")]
        lse[empty] = float("-inf")
        entropy[empty] = 0.0
    return lse, entropy


def label_logits(x3: Tensor, local: Tensor, owned: Tensor, inv_temp: float) -> Tensor:
    """z_y = x_y / T (float32) on the rows this part owns, 0 elsewhere (one gather, no sync)."""
    b, t, _ = x3.shape
    z = x3.gather(2, local.view(b, t, 1)).view(-1).float() * inv_temp
    return torch.where(owned, z, 0.0)


def _terms(lse_k: Tensor, entropy_k: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """(e_k, e_k (H_k - (lse_k - M))), with exactly 0 for empty parts (lse_k = -inf, so e_k = 0)."""
    shift = lse_k - m
    e = shift.exp()
    return e, torch.where(e > 0, e * (entropy_k - shift), 0.0)


def _finish(m: Tensor, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    log_s = s.log()
    return m + log_s, a / s + log_s


def merge_parts(lse_parts: Tensor, entropy_parts: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, H) over the union of the parts stacked on dim 0 (``[P, n]`` float32 each)."""
    m = lse_parts.amax(0)
    e, a = _terms(lse_parts, entropy_parts, m)
    return _finish(m, e.sum(0), a.sum(0))


def merge_over_group(
    lse_k: Tensor,
    entropy_k: Tensor,
    zy: Tensor | None,
    owned: Tensor | None,
    vocab_local: int,
    group: dist.ProcessGroup,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(lse, H, log p_y or None) of the full vocabulary from each rank's (lse_k, H_k, z_y).

    Two collectives: MAX of lse_k (with the shard sizes' max and min riding
    along, to reject unequal shards), then SUM of the stacked terms. Every
    rank receives the same values.
    """
    size = torch.tensor([vocab_local, -vocab_local], dtype=torch.float32, device=lse_k.device)
    top = torch.cat([lse_k, size])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # A host sync every call, on purpose: caching "already checked" per rank lets one rank skip the
    # check while another raises, and the next collective then hangs (seen in the 2-rank tests).
    m, (v_max, v_min_neg) = top[:-2], top[-2:].tolist()
    if v_max != -v_min_neg:
        raise ValueError(
            f"process_group: every rank must hold an equal vocabulary shard, got sizes from {int(-v_min_neg)} to {int(v_max)}"
        )
    e, a = _terms(lse_k, entropy_k, m)
    parts = [e, a]
    if zy is not None:
        parts.append(torch.where(owned, zy - m, 0.0))
    sums = torch.stack(parts)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    lse, entropy = _finish(m, sums[0], sums[1])
    logp = sums[2] - sums[0].log() if zy is not None else None
    return lse, entropy, logp


def part_backward(
    backend: str,
    x3: Tensor,
    local: Tensor | None,
    owned: Tensor | None,
    active: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    inv_temp: float,
    out: Tensor,
) -> None:
    """Write one part's dL/dx into ``out`` (may be x3 itself) from the full-vocabulary lse and H.

    The kernel's backward adds g_lp at the row's label column; rows whose label
    lies in another part were given column 0, so that element is recomputed here
    from the formula without the indicator (O(rows) work, read before ``out``
    is written, in case it aliases x3):

        dL/dx_0 = -(1/T) p_0 (g_H (log p_0 + H) + g_lp),   log p_0 = x_0 / T - lse
    """
    be = kernels.load(backend)
    if local is None or grad_logp is None:
        be.backward(x3, None, active, lse, entropy, None, grad_entropy, inv_temp, out)
        return
    b, t, _ = x3.shape
    foreign = (~owned if active is None else active & ~owned).view(b, t)
    # Dense over rows (no nonzero, so no device sync); other rows keep the kernel's value.
    log_p0 = (x3[:, :, 0].float() * inv_temp - lse.view(b, t)).clamp(min=_LOG_FLOOR)
    be.backward(x3, local, active, lse, entropy, grad_logp, grad_entropy, inv_temp, out)
    coef = grad_logp.float().view(b, t)
    if grad_entropy is not None:
        coef = coef + grad_entropy.float().view(b, t) * (log_p0 + entropy.view(b, t))
    col = out[:, :, 0]
    col.copy_(torch.where(foreign, (-inv_temp * log_p0.exp() * coef).to(out.dtype), col))


def group_layout(group: dist.ProcessGroup) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialized")
    return dist.get_rank(group), dist.get_world_size(group)


class _ShardedLogprobsEntropy(torch.autograd.Function):
    """Autograd of the vocabulary-parallel op on materialized logit shards."""

    @staticmethod
    def forward(ctx, x3, labels, active, inv_temp, backend, inplace_backward, group):
        rank, _ = group_layout(group)
        vocab_local = x3.shape[-1]
        local = owned = zy = None
        if labels is not None:
            local, owned = localize(labels, rank * vocab_local, vocab_local, active)
            zy = label_logits(x3, local, owned, inv_temp)
        lse_k, entropy_k = part_stats(backend, x3, active, inv_temp)
        lse, entropy, logp = merge_over_group(lse_k, entropy_k, zy, owned, vocab_local, group)
        if active is not None:
            entropy = torch.where(active, entropy, 0.0)
            logp = torch.where(active, logp, 0.0) if logp is not None else None
        if logp is None:
            logp = entropy.new_empty(0)
        ctx.save_for_backward(x3, local, owned, active, lse, entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ctx.inv_temp, ctx.backend, ctx.inplace = inv_temp, backend, inplace_backward
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        x3, local, owned, active, lse, entropy = ctx.saved_tensors
        out = x3 if ctx.inplace else torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        part_backward(
            ctx.backend, x3, local, owned, active, lse, entropy, grad_logp, grad_entropy, ctx.inv_temp, out
        )
        return out, None, None, None, None, None, None


def sharded_logprobs_entropy(
    x3: Tensor,
    labels: Tensor | None,
    active: Tensor | None,
    inv_temp: float,
    backend: str,
    inplace_backward: bool,
    group: dist.ProcessGroup,
) -> tuple[Tensor, Tensor]:
    """(log p_y[n] or empty, H[n]) float32 of the full vocabulary from this rank's logit shard x3[b, t, V_local].

    Arguments as the backends' ``forward`` (already validated; labels are global
    ids). Eager only: the collectives run in Python, outside a custom op.
    """
    return _ShardedLogprobsEntropy.apply(x3, labels, active, inv_temp, backend, inplace_backward, group)
