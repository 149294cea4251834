"""Statistics for control: reduce across data-parallel ranks, hand controllers checked plain floats.

Every data-parallel rank must feed its controllers the same number, or the
ranks' coefficients drift apart. :func:`masked_mean` therefore all-reduces the
masked sum and the token count together (one collective) whenever
``torch.distributed`` is initialized, so the result is the token-weighted mean
over the global batch, identical on every rank.

``as_scalar`` and ``as_count`` are re-exported from :mod:`entropy_reg.checks`,
where they live, for code that imported them from here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import as_count, as_scalar, check_mask_like

__all__ = ["masked_mean", "all_reduce_sum", "dist_active", "as_scalar", "as_count"]


def dist_active() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor, *, group: Any = None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (default: the world); returns a new tensor.

    Without an initialized process group it returns a copy: single-process code
    needs no special case. Under an NCCL group a CPU tensor travels through the
    current CUDA device and comes back to its own device.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    out = tensor.detach().clone()
    if not dist_active():
        return out
    device = out.device
    if "nccl" in str(dist.get_backend(group)) and device.type != "cuda":
        out = out.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(device)


@torch.no_grad()
def masked_mean(values: Tensor, mask: Tensor | None = None, *, group: Any = None) -> Tensor:
    """Token-weighted mean of ``values`` over the entries where ``mask`` is set, across ranks.

    ``mean = sum_ranks sum_i [mask_i] * values_i / sum_ranks sum_i [mask_i]``

    Args:
        values: float tensor of any shape (e.g. per-token entropy ``[B, S]``, nats).
        mask: same shape, bool or numeric (nonzero counts as one valid token);
            None means every entry. Entries outside the mask are never added, so
            NaN padding does not leak in.
        group: process group for the all-reduce (default: the world). Ignored
            when ``torch.distributed`` is not initialized.

    Returns:
        0-d float32 tensor on ``values``' device, the same on every rank; no
        gradient (a statistic for logging and control, not a loss term: use
        :func:`entropy_reg.aggregation.aggregate` for losses). NaN in a valid
        entry gives NaN, which the controllers reject.

    Raises:
        ValueError: when no entry is valid on any rank (checked after the
            reduction, so every rank raises together). This reads the two
            reduced numbers back to the host: one sync per call.
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.is_complex():
        raise TypeError(f"values must be a real tensor, got {values.dtype}")
    valid = _valid_mask(values, mask)
    # float64 accumulation: per-rank sums of ~1e7 tokens keep full float32 precision.
    total = torch.where(valid, values.detach().to(torch.float64), 0.0).sum()
    count = valid.sum(dtype=torch.float64)
    reduced = all_reduce_sum(torch.stack([total, count]), group=group)
    if float(reduced[1]) == 0.0:
        raise ValueError("mask: no valid entry on any rank, the mean is undefined")
    return (reduced[0] / reduced[1]).to(torch.float32)


def _valid_mask(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    check_mask_like(mask, values)
    return mask if mask.dtype == torch.bool else mask != 0
