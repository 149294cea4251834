"""Reduce a per-token loss matrix ``[B, S]`` to a scalar, with verl's five ``loss_agg_mode`` s.

Semantics follow ``verl.trainer.ppo.core_algos.agg_loss`` of verl 0.9.1 (with
``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` /
``loss_scale_factor``), so a term aggregated here adds to verl's policy loss
with the same weighting. With ``m`` the mask, ``n_i = sum_t m_it`` and
``S = {i : n_i > 0}`` the non-empty sequences:

- ``token-mean``: ``dp * sum_{i,t} m_it v_it / N``, ``N`` = ``batch_num_tokens``
  (default: this micro-batch's ``sum m``);
- ``token-sum``: ``dp * sum_{i,t} m_it v_it`` (no denominator: the gradient
  averaged over ranks is that of the global token sum);
- ``seq-mean-token-sum``: ``dp * sum_{i in S} sum_t m_it v_it / B``, ``B`` =
  ``global_batch_size`` (default: ``|S|``);
- ``seq-mean-token-mean``: ``dp * sum_{i in S} (sum_t m_it v_it / n_i) / B``;
- ``seq-mean-token-sum-norm`` (Dr. GRPO): ``seq-mean-token-sum / L``, ``L`` =
  ``loss_scale_factor`` (default: the padded length ``T``; pass a constant, e.g.
  the maximum response length, so the scale does not change with each batch's
  padding). Older verl releases computed ``sum_i sum_t m v / T`` here, without
  dividing by the number of sequences; this module follows the current one.

``dp`` = ``dp_size``: data-parallel trainers average gradients over ranks, so
each rank scales its share of the global numerator by ``dp`` and divides by the
global denominator; the average over ranks is then the global aggregate. With
``dp_size > 1`` the global denominator is required (a local one would be wrong).

An all-masked micro-batch gives 0 in every mode, connected to the graph with
gradient 0. verl 0.9.1 differs in the value only: where the denominator is the
local one (``batch_num_tokens`` / ``global_batch_size`` not given) its
``agg_loss`` divides 0 by 0 and returns NaN (``token-sum`` and the modes given a
global denominator return 0); its gradient is 0 as well. For an additive bonus
0 is the right value: a micro-batch without tokens adds nothing to the
objective, and a NaN term would turn ``policy_loss + bonus`` (and every log and
NaN guard that reads it) into NaN although no token is affected.
Entries outside the mask are never read into the sum, so NaN padding cannot
leak in. Units: those of ``values``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .checks import as_count, as_scalar, check_mask_like

__all__ = ["aggregate", "AGG_MODES"]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: float | Tensor | None = None,
    global_batch_size: float | Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Aggregate ``values[B, S]`` over ``mask[B, S]`` (bool, or numeric weights) with ``mode``.

    Returns a 0-d tensor (float32, or float64 for float64 values) that carries
    gradients to ``values``. See the module docstring for the formulas.
    """
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    if mode not in AGG_MODES:
        raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")
    v, m = _check_inputs(values, mask)
    dp = as_count(dp_size, "dp_size", low=1)
    weights = m.to(v.dtype)
    # where() rather than v * m: 0 * NaN in padding would be NaN.
    masked = torch.where(m != 0, v, torch.zeros((), dtype=v.dtype, device=v.device)) * weights
    if mode == "token-mean":
        denom = _denominator(batch_num_tokens, "batch_num_tokens", weights.sum(), dp)
        return masked.sum() / denom * dp
    if mode == "token-sum":
        return masked.sum() * dp
    seq_tokens = weights.sum(dim=-1)
    nonempty = seq_tokens > 0
    seq = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq = seq / torch.where(nonempty, seq_tokens, torch.ones_like(seq_tokens))
    denom = _denominator(global_batch_size, "global_batch_size", nonempty.sum().to(v.dtype), dp)
    loss = seq.sum() / denom * dp
    if mode == "seq-mean-token-sum-norm":
        if loss_scale_factor is None:
            scale = float(v.shape[-1]) if v.shape[-1] > 0 else 1.0
        else:
            scale = as_scalar(loss_scale_factor, "loss_scale_factor", low=0.0, low_inclusive=False)
        loss = loss / scale
    return loss


def _check_inputs(values: Any, mask: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
    if values.dim() != 2:
        raise ValueError(f"values must be [batch, tokens], got shape {tuple(values.shape)}")
    check_mask_like(mask, values)
    v = values if values.dtype in (torch.float32, torch.float64) else values.float()
    return v, mask


def _denominator(given: float | Tensor | None, name: str, local: Tensor, dp: int) -> Tensor | float:
    """The global denominator, or the local one; a zero denominator becomes 1 (the numerator is then 0)."""
    if given is None:
        if dp > 1:
            raise ValueError(f"{name} (over the global batch) is required when dp_size > 1")
        return torch.where(local > 0, local, torch.ones_like(local))
    if isinstance(given, Tensor):
        # A tensor stays on its device (no host sync); it is not range-checked for the same reason.
        if given.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(given.shape)}")
        if given.dtype == torch.bool or given.is_complex():
            raise TypeError(f"{name} must be real, got {given.dtype}")
        g = given.detach().reshape(()).to(local.dtype)
        return torch.where(g > 0, g, torch.ones_like(g))
    g = as_scalar(given, name, low=0.0)
    return g if g > 0 else 1.0
