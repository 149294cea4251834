"""Driver side: OpenRLHF's experience maker, plus AER's difficulty weights (imports OpenRLHF).

:func:`~.hook.install` binds :class:`AERExperienceMaker` to the name
``RemoteExperienceMaker`` of ``openrlhf.trainer.ppo_trainer``, which is where
``BasePPOTrainer`` (sync and async trainers alike) looks it up.
"""

from __future__ import annotations

from typing import Any

import torch
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from ...regularizer import AdaptiveEntropyRegularizer
from .config import check_entropy_coef, config_from_env
from .core import attach_weights
from .hook import apply_if_installed

__all__ = ["AERExperienceMaker"]


class AERExperienceMaker(RemoteExperienceMaker):
    """``RemoteExperienceMaker`` that also writes ``experience.info["aer_weight"]``.

    The allocator comes from the job's :class:`AERConfig`
    (:func:`~.config.config_from_env`): its rule, ``difficulty_threshold``,
    ``success_threshold`` and normalization, nothing hard-coded. Built in the
    trainer actor's ``__init__``, before the first rollout, it refuses a
    nonzero ``--actor.entropy_coef``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_entropy_coef(self.args)
        # The regularizer is built for its allocator: alpha lives on the actor ranks.
        self.aer_allocator = AdaptiveEntropyRegularizer(config_from_env()).allocator

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: list[Any]) -> list[Any]:
        """Weights first, from the verifier's scores: OpenRLHF's own step then length-penalises
        ``rewards`` in place. The allocator's metrics ride along as per-sample ``info`` entries
        (the same value for every sample), so OpenRLHF's sample-weighted status logs them as is."""
        metrics = attach_weights(experiences, self.args.rollout.n_samples_per_prompt, self.aer_allocator)
        for experience in experiences:
            rows = len(experience.index)
            for key, value in metrics.items():
                experience.info[key] = torch.full((rows,), value, dtype=torch.float32)
        return super().compute_advantages_and_returns(experiences)


REPLACES = {"RemoteExperienceMaker": AERExperienceMaker}
apply_if_installed(__name__)
