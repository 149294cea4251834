"""Statistics for control: reduce across data-parallel ranks, hand controllers checked plain floats.

Every data-parallel rank must feed its controllers the same number, or the
ranks' coefficients drift apart. :func:`masked_mean` therefore all-reduces the
masked sum and the token count together (one collective) whenever
``torch.distributed`` is initialized, so the result is the token-weighted mean
over the global batch, identical on every rank.

:func:`as_scalar` and :func:`as_count` are the argument checks shared by the
controllers: a number, a 0-d tensor or a one-element tensor becomes a Python
float (or int) that is finite and in range, else a ValueError/TypeError that
names the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

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
        values: float tensor of any shape (e.g. per-token entropy ``[B, T]``, nats).
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
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    if mask.device != values.device:
        raise ValueError(f"mask is on {mask.device} but values are on {values.device}")
    return mask if mask.dtype == torch.bool else mask != 0


def as_scalar(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    high: float | None = None,
) -> float:
    """``value`` (a real number, or a tensor/array with one element) as a finite Python float.

    Raises TypeError for anything else (bools included) and ValueError, naming
    ``name``, when the number is NaN, infinite, or outside ``[low, high]``
    (``(low, high]`` when ``low_inclusive`` is False).
    """
    if isinstance(value, (Tensor, np.ndarray)):
        real = (
            not (value.dtype == torch.bool or value.is_complex())
            if isinstance(value, Tensor)
            else value.dtype.kind in "iuf"
        )
        if not real:
            raise TypeError(f"{name} must be a real number, got dtype {value.dtype}")
        if (value.numel() if isinstance(value, Tensor) else value.size) != 1:
            raise ValueError(f"{name} must hold exactly one number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    if low is not None and (out < low or (out == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {out}")
    if high is not None and out > high:
        raise ValueError(f"{name} must be <= {high}, got {out}")
    return out


def as_count(value: Any, name: str, *, low: int = 0) -> int:
    """``value`` as a Python int >= ``low`` (integral types only: 2.0 is a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)
