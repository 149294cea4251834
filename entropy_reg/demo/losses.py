"""The policy-gradient losses of the demo's arms: PPO/GRPO clipping and the paper's baselines.

Every function returns the per-token loss ``[B, T]`` (to be aggregated with the
response mask, token-mean in the demo) from the current and rollout log-probs
``logp``, ``old_logp`` ``[B, T]`` and the per-token advantages ``adv`` ``[B, T]``:

- :func:`clipped`: PPO's clipped surrogate with a decoupled range
  ``[1 - eps_low, 1 + eps_high]``; GRPO uses ``0.2 / 0.2`` and **Clip-Higher**
  (DAPO, Yu et al. 2025, arXiv 2503.14476) ``0.2 / 0.28``: a higher upper bound lets
  low-probability tokens with positive advantage grow, which keeps entropy up.
- :func:`clip_cov` and :func:`kl_cov`: **Clip-Cov** and **KL-Cov** (Cui et al. 2025,
  "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
  arXiv 2505.22617). Their idea: entropy falls through tokens whose log-prob and
  advantage covary strongly, so restrain the few tokens of highest covariance
  ``cov_t = (A_t - mean A) (logp_t - mean logp)`` (means over the valid tokens). Clip-Cov
  detaches a random ``ratio`` share of the tokens whose covariance lies in
  ``(low, high)``; KL-Cov adds ``kl_coef * |logp - old_logp|`` to the ``ratio`` share
  of highest covariance and clips nothing. Written here from the paper's description;
  the constants are verl 0.9.1's code defaults for them (``trainer/ppo/core_algos.py``:
  Clip-Cov share ``2e-4``, bounds 1 and 5; KL-Cov share ``2e-4``, coefficient 1.0; its
  ``actor.yaml`` sets the coefficient to 0.1). As in verl, at least one token is selected
  per (mini)batch: on this demo's ~300 tokens per minibatch any share below 1/300
  selects exactly one, so the paper's other shares (e.g. KL-Cov's 2e-3) would too.
"""

from __future__ import annotations

import torch
from torch import Tensor

CLIP_HIGH = 0.28  # DAPO's eps_high (its eps_low is GRPO's 0.2)
CLIP_COV = {"ratio": 2e-4, "low": 1.0, "high": 5.0}
KL_COV = {"ratio": 2e-4, "kl_coef": 1.0}


def clipped(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 0.2, eps_high: float = 0.2) -> Tensor:
    """``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with ``rho = exp(logp - old_logp)``."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def token_covariance(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """``(A_t - mean A) (logp_t - mean logp)`` per token (means over ``mask``; no gradient),
    ``-inf`` outside the mask so that no selection picks padding."""
    m = mask.bool()
    lp = logp.detach()
    cov = (adv - adv[m].mean()) * (lp - lp[m].mean())
    return cov.masked_fill(~m, float("-inf"))


def _count(ratio: float, mask: Tensor) -> int:
    return max(1, int(ratio * int(mask.sum())))


def clip_cov(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, generator: torch.Generator,
             ratio: float = CLIP_COV["ratio"], low: float = CLIP_COV["low"], high: float = CLIP_COV["high"],
             eps: float = 0.2) -> Tensor:
    """Clip-Cov: the clipped loss, with the gradient of ``ratio`` x (valid tokens) tokens drawn at
    random among those not already clipped whose covariance is in ``(low, high)`` cut to zero."""
    loss = clipped(logp, old_logp, adv, eps, eps)
    rho = torch.exp(logp - old_logp).detach()
    already = (rho.clamp(1 - eps, 1 + eps) * adv > rho * adv) & mask.bool()  # the clip is active there
    cov = token_covariance(logp, adv, mask)
    candidates = torch.nonzero(((cov > low) & (cov < high) & ~already).flatten()).squeeze(1)
    keep = torch.ones(loss.numel(), device=loss.device)
    if candidates.numel():
        pick = torch.randperm(candidates.numel(), generator=generator)[: _count(ratio, mask)]
        keep[candidates[pick.to(candidates.device)]] = 0.0
    return loss * keep.view_as(loss)


def kl_cov(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
           ratio: float = KL_COV["ratio"], kl_coef: float = KL_COV["kl_coef"]) -> Tensor:
    """KL-Cov: ``-rho A`` (no clipping), plus ``kl_coef |logp - old_logp|`` on the ``ratio`` x
    (valid tokens) tokens of highest covariance."""
    loss = -torch.exp(logp - old_logp) * adv
    cov = token_covariance(logp, adv, mask).flatten()
    top = torch.topk(cov, min(_count(ratio, mask), int(mask.sum()))).indices
    penalty = torch.zeros(loss.numel(), device=loss.device)
    penalty[top] = kl_coef
    return loss + penalty.view_as(loss) * (logp - old_logp).abs()


POLICY_LOSSES = ("grpo", "clip-higher", "clip-cov", "kl-cov")


def policy_loss(kind: str, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                generator: torch.Generator, eps: float = 0.2) -> Tensor:
    """The per-token loss of arm kind ``kind`` (one of :data:`POLICY_LOSSES`); ``eps`` is
    GRPO's clip range (Clip-Higher's lower one)."""
    if kind == "grpo":
        return clipped(logp, old_logp, adv, eps, eps)
    if kind == "clip-higher":
        return clipped(logp, old_logp, adv, eps, CLIP_HIGH)
    if kind == "clip-cov":
        return clip_cov(logp, old_logp, adv, mask, generator, eps=eps)
    if kind == "kl-cov":
        return kl_cov(logp, old_logp, adv, mask)
    raise ValueError(f"policy loss must be one of {POLICY_LOSSES}, got {kind!r}")
