"""Vocabulary parallelism: each rank holds a contiguous shard of the vocabulary (Megatron's layout).

Rank r of the group holds ids ``[r * V_local, (r + 1) * V_local)`` (equal shards, in
rank order); labels are global ids, replicated on every rank, as are mask and the
output gradients. Each rank computes its shard's partial statistics (raw max m_k,
c_k, H_k; see ``entropy_reg.partials``) and the full vocabulary's follow from two
collectives: a MAX of m_k, then one SUM of the stacked merge terms (rest_k,
e_k (H_k - a_k), [m_k = M], and the owner's (x_y - M) / T). The backward needs no
collective: each rank's gradient is the single-part backward fed the global (M, c) and H.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .kernels import scaled_gap
from .partials import finish_merge, label_logits, localize, merge_terms, part_backward, part_stats


def merge_over_group(
    stats_k: Tensor,
    entropy_k: Tensor,
    x_y: Tensor | None,
    owned: Tensor | None,
    vocab_local: int,
    inv_temp: float,
    group: dist.ProcessGroup,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(stats[2, n], H, log p_y or None) of the full vocabulary from each rank's (m_k, c_k, H_k, x_y).

    Two collectives: MAX of m_k (with the shard sizes' max and min riding
    along, to reject unequal shards), then SUM of the stacked terms. Every
    rank receives the same values.
    """
    size = torch.tensor([vocab_local, -vocab_local], dtype=stats_k.dtype, device=stats_k.device)
    top = torch.cat([stats_k[0], size])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # A host sync every call, on purpose: caching "already checked" per rank lets one rank skip the
    # check while another raises, and the next collective then hangs (seen in the 2-rank tests).
    m, (v_max, v_min_neg) = top[:-2], top[-2:].tolist()
    if v_max != -v_min_neg:
        raise ValueError(
            f"process_group: every rank must hold an equal vocabulary shard, got sizes from {int(-v_min_neg)} to {int(v_max)}"
        )
    parts = list(merge_terms(stats_k, entropy_k, m, inv_temp))
    if x_y is not None:
        parts.append(torch.where(owned, scaled_gap(x_y, m, inv_temp), 0.0))
    sums = torch.stack(parts)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    stats, entropy = finish_merge(m, sums[0], sums[1], sums[2])
    logp = sums[3] - stats[1] if x_y is not None else None
    return stats, entropy, logp


def group_layout(group: dist.ProcessGroup) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.get_rank(group), dist.get_world_size(group)


class _ShardedLogprobsEntropy(torch.autograd.Function):
    """Autograd of the vocabulary-parallel op on materialized logit shards."""

    @staticmethod
    def forward(ctx, x3, labels, active, inv_temp, backend, inplace_backward, group):
        rank, _ = group_layout(group)
        vocab_local = x3.shape[-1]
        local = owned = x_y = None
        if labels is not None:
            local, owned = localize(labels, rank * vocab_local, vocab_local, active)
            x_y = label_logits(x3, local, owned)
        stats_k, entropy_k = part_stats(backend, x3, active, inv_temp)
        stats, entropy, logp = merge_over_group(stats_k, entropy_k, x_y, owned, vocab_local, inv_temp, group)
        if active is not None:
            entropy = torch.where(active, entropy, 0.0)
            logp = torch.where(active, logp, 0.0) if logp is not None else None
        if logp is None:
            logp = entropy.new_empty(0)
        ctx.save_for_backward(x3, local, owned, active, stats, entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ctx.inv_temp, ctx.backend, ctx.inplace = inv_temp, backend, inplace_backward
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        x3, local, owned, active, stats, entropy = ctx.saved_tensors
        out = x3 if ctx.inplace else torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        rows = kernels.Rows(local, active, ctx.inv_temp)
        part_backward(ctx.backend, x3, rows, owned, kernels.Upstream(stats, entropy, grad_logp, grad_entropy), out)
        return out, None, None, None, None, None, None


def sharded_logprobs_entropy(
    x3: Tensor, rows: kernels.Rows, backend: str, inplace_backward: bool, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor]:
    """(log p_y[n] or empty, H[n]) float32 of the full vocabulary from this rank's logit shard x3[b, t, V_local].

    ``rows`` as the backends take it (already validated; labels are global ids).
    Eager only: the collectives run in Python, outside a custom op.
    """
    return _ShardedLogprobsEntropy.apply(x3, rows.labels, rows.active, rows.inv_temp, backend, inplace_backward, group)
