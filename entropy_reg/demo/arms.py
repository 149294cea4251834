"""The demo's arms: where each one's entropy coefficients come from.

- ``none``: no entropy term (the baseline whose entropy collapses);
- ``fixed``: one constant coefficient for every token (``low`` and ``high``
  show that the right constant is fragile);
- ``aer``: :class:`~entropy_reg.regularizer.AdaptiveEntropyRegularizer`, wired
  as a trainer wires it: per-response coefficients alpha * w_i from the
  difficulty allocator, the term from :meth:`~AdaptiveEntropyRegularizer.loss`,
  and :meth:`~AdaptiveEntropyRegularizer.update` once per step with the global
  mean token entropy.

The ablations (``--ablate``) remove one AER component each, through
:class:`~entropy_reg.regularizer.AERConfig` alone:

- no difficulty allocation: ``difficulty_rule="uniform"``;
- no anchor: an absolute target of 0.2 nats (TRL's default), written as
  ``initial_entropy=0.2, target_ratio=1.0``;
- no controller: ``coef_lr=0`` and no damping freeze alpha at ``coef_init`` = the
  arm's ``coef``, so that arm differs from the fixed arm of that constant only by
  the allocation.

The AER arm runs the library's defaults (``AERConfig()``) with one setting
changed, the range alpha may take (:data:`SELECTED_RANGE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..aggregation import aggregate
from ..regularizer import AdaptiveEntropyRegularizer, AERConfig
from .losses import POLICY_LOSSES

# TRL's default absolute target (GRPOConfig), the "no anchor" ablation's target.
ABSOLUTE_TARGET_NATS = 0.2

# The library's controller steps are relative (alpha moves by a factor exp(0.05 e) per step, and
# exp(e) from the damping), so the only scale it carries is the range alpha may take. The default
# range, [1e-4, 1e-2], is LLM practice; this 100k-parameter policy's entropy hardly moves below a
# coefficient of 1e-3 and blows up above 0.1-0.3 (benchmarks/aer_study.py's fixed grid), so the
# study's "AER" arm gives it [1e-3, 1] ...
TOY_RANGE = {"coef_init": 1e-3, "coef_min": 1e-3, "coef_max": 1.0}
# ... and the demo runs the range the study selected on its tuning setting by its stated rule
# (docs/controllers.md): [1e-2, 1]. From 1e-3, alpha needs ~150 steps per decade at the default
# step, longer than the 150-step run.
SELECTED_RANGE = {"coef_init": 1e-2, "coef_min": 1e-2, "coef_max": 1.0}
DEMO_AER = AERConfig(**SELECTED_RANGE)


@dataclass(frozen=True)
class ArmSpec:
    """One arm. ``kind`` is "none", "fixed" or "aer"; ``coef`` is the constant of a
    fixed arm (or the frozen alpha of the no-controller ablation); ``aer`` holds
    :class:`AERConfig` fields that override the base configuration; the three
    flags switch AER's components on or off; ``pg`` is the policy-gradient loss
    (one of :data:`entropy_reg.demo.losses.POLICY_LOSSES`: GRPO's clip, Clip-Higher,
    Clip-Cov, KL-Cov)."""

    name: str
    kind: str
    coef: float = 0.0
    allocation: bool = True
    anchored: bool = True
    adaptive: bool = True
    aer: dict[str, Any] = field(default_factory=dict)
    pg: str = "grpo"

    def aer_config(self, base: AERConfig) -> AERConfig:
        """``base`` with this arm's overrides applied and its components removed."""
        cfg = replace(base, **self.aer)
        if not self.allocation:
            cfg = replace(cfg, difficulty_rule="uniform")
        if not self.anchored:
            cfg = replace(cfg, initial_entropy=ABSOLUTE_TARGET_NATS, target_ratio=1.0)
        if not self.adaptive:
            cfg = cfg.resolved()
            cfg = replace(cfg, coef_lr=0.0, coef_damping=0.0, coef_init=self.coef,
                          coef_min=min(cfg.coef_min, self.coef), coef_max=max(cfg.coef_max, self.coef))
        return cfg


class CoefficientSource:
    """Per-response entropy coefficients for one arm, the loss term, and the per-step update.

    Call order, per GRPO step: :meth:`coefficients` on the rollout batch, then
    :meth:`loss` in each minibatch (added to the policy loss), then
    :meth:`update` once after the optimizer steps, with the step's global mean
    token entropy (nats). ``alpha`` is the global coefficient that the last
    :meth:`coefficients` call used and ``target`` the current target entropy
    (None when the arm has none, or before the anchor is measured).
    """

    def __init__(self, spec: ArmSpec, base: AERConfig = DEMO_AER) -> None:
        if spec.kind not in ("none", "fixed", "aer"):
            raise ValueError(f"spec.kind must be 'none', 'fixed' or 'aer', got {spec.kind!r}")
        if spec.pg not in POLICY_LOSSES:
            raise ValueError(f"spec.pg must be one of {POLICY_LOSSES}, got {spec.pg!r}")
        self.spec = spec
        self.active = spec.kind != "none"
        self.reg = AdaptiveEntropyRegularizer(spec.aer_config(base)) if spec.kind == "aer" else None
        self.alpha = self.reg.value if self.reg is not None else spec.coef

    @property
    def target(self) -> float | None:
        return self.reg.target.value if self.reg is not None else None

    def coefficients(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """``[N]`` float32: alpha times the allocator's weight (the constant for fixed arms)."""
        if self.reg is None:
            return torch.full_like(rewards, self.alpha)
        self.alpha = self.reg.value
        return self.reg.coefficients(rewards, group_ids)

    def loss(self, entropy: Tensor, mask: Tensor, coefficients: Tensor) -> Tensor:
        """The term to add to the policy loss: ``-token_mean(c_i * H_it)`` (0 for the no-entropy arm)."""
        if self.reg is not None:
            return self.reg.loss(entropy, mask, coefficients, agg="token-mean")
        if not self.active:
            return entropy.new_zeros(())
        return -aggregate(coefficients[:, None] * entropy, mask, "token-mean")

    def update(self, entropy: Tensor) -> None:
        if self.reg is not None:
            self.reg.update(entropy)
