"""Float64 references written from the textbook formulas (independent of entropy_reg).

Every function works on z = (x - max x) / T, and takes log s = log sum_j exp(z_j) as
log1p(sum of exp(z_j) over every j but one position of the max, which adds expm1(z_max) = 0
instead, to keep its gradient): summing the max's
exp(0) = 1 in would round s = 1 + tiny to float64's spacing near 1 (2.2e-16), and with it
every digit of a confident row's log-probabilities below about 1e-13.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _shifted(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(z = (x - max x) / T, log s) in float64; differentiable, the max held constant."""
    x = logits.double()
    z = (x - x.amax(-1, keepdim=True).detach()) / temperature
    top = z.argmax(-1, keepdim=True)
    # the max's term enters as expm1(z_top): 0 in value (z_top = 0), its full exp(z_top) in gradient
    rest = z.exp().scatter(-1, top, torch.expm1(z.gather(-1, top))).sum(-1, keepdim=True)
    return z, rest.log1p()


def entropy_f64(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H = -sum p log p with p = softmax(x / T), 0 log 0 = 0, in float64 (differentiable)."""
    z, log_s = _shifted(logits, temperature)
    p = (z - log_s).exp()
    # where() before the product, so no 0 * -inf reaches the value or its gradient
    logp = torch.where(p > 0, z - log_s, torch.zeros_like(p))
    return -(p * logp).sum(-1)


def logprob_f64(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p_y in float64 (differentiable); labels outside [0, V) read as 0 (callers mask them)."""
    z, log_s = _shifted(logits, temperature)
    y = labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
    return (z.gather(-1, y) - log_s).squeeze(-1)


def softmax_terms_f64(logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(log p [.., V], p [.., V], H [..]) in float64, no gradient."""
    z, log_s = _shifted(logits.detach(), temperature)
    logp = z - log_s
    p = logp.exp()
    return logp, p, -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
