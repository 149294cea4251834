"""Float64 references written from the textbook formulas (independent of entropy_reg)."""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_f64(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H = -sum p log p with p = softmax(x / T), 0 log 0 = 0, in float64 (differentiable)."""
    z = logits.double() / temperature
    z = z - z.amax(-1, keepdim=True).detach()
    e = z.exp()
    s = e.sum(-1, keepdim=True)
    p = e / s
    # where() before the product, so no 0 * -inf reaches the value or its gradient
    logp = torch.where(p > 0, z - s.log(), torch.zeros_like(p))
    return -(p * logp).sum(-1)


def logprob_f64(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p_y in float64 (differentiable); labels outside [0, V) read as 0 (callers mask them)."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, -1)
    y = labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
    return z.gather(-1, y).squeeze(-1) - lse
