"""AER for verl (PyPI ``verl``, tested with 0.9.1; extra ``entropy-reg[verl]``).

Launch it with verl's own config tree and overrides, plus AER's settings::

    python -m entropy_reg.integrations.verl <your verl overrides> +aer.target_ratio=0.5

That runs ``python -m verl.trainer.main_ppo``'s pipeline (``run_ppo``, verl's
task runner) with AER installed inside the task-runner process: for the v1
trainer (``trainer.use_v1=true``, the default; ``trainer.v1.trainer_mode=sync``)
the registry entry of the mode (``get_trainer_cls``) becomes an AER subclass of
``PPOTrainerSync``; for the legacy trainer (``trainer.use_v1=False``) the task
runner builds an AER subclass of ``RayPPOTrainer``.

verl splits a step between a driver, which holds the whole batch, and workers,
which run the loss on micro-batches. The adapter follows that split:

- driver (:class:`VerlAER`): once per actor update (none while the critic
  warms up; ``parameter_sync_step`` updates per step in v1), the token-mean
  entropy of the batch's old-log-prob pass (temperature-scaled as the rollout
  sampled) goes to the anchored target and the global coefficient; then
  per-response coefficients ``c_i = alpha * w_i`` (``w_i`` from the group
  accuracy over the prompt ``uid`` of the reward manager's correctness,
  ``reward_extra_info["acc"]``, else of the summed token scores; an agent-loop
  session with several outputs counts once, as verl's GRPO counts it) are written as
  the batch field ``aer_coef``: a ``[N]`` tensor that travels with every sample
  through verl's padding removal, balancing, shuffles and mini/micro-batch
  splits (``ActorConfig`` is frozen: per-sample data must travel as batch data).
  v1's synthetic padding samples (tag ``is_padding``) are left out of both the
  entropy statistic and the allocation, and get coefficient 0.
- worker (:class:`AERLoss`, installed with the actor worker group's
  ``set_loss_fn``): the loss verl's worker would have chosen (``ppo_loss``, or
  ``distillation_ppo_loss`` when distillation is on) plus

      L_aer = - agg_loss(c_i * H_it, response_mask, loss_agg_mode, dp_size, batch_num_tokens,
                         global_batch_size, loss_scale_factor)

  with verl's ``agg_loss`` and the global counts verl's engine puts in the
  micro-batch, so the term is normalized exactly like the policy loss (e.g.
  token-mean over all DP ranks' tokens of the mini-batch).
- checkpoint: ``aer_state.json`` in ``global_step_N/`` (verl saves no
  controller state), written before verl's ``_save_checkpoint`` (which ends by
  marking the step complete in ``latest_checkpointed_iteration.txt``) and read
  back when verl resumes from that folder; a resume that finds none raises
  unless ``+aer.reanchor_on_missing_state=true``.

:func:`prepare_config` checks the configuration before Ray starts and before
any rollout, and is called again when an AER trainer is built.
"""

from __future__ import annotations

import importlib
from typing import Any

# The package face re-exports the public names lazily: a Ray worker that unpickles the loss imports
# .loss (and .config) only, not the driver, trainers or launcher.
_EXPORTS = {
    "COEF_KEY": "config", "CORRECTNESS_FIELD": "config", "SCORES": "config", "METRIC_PREFIX": "config",
    "SUPPORTED_V1_MODES": "config", "prepare_config": "config",
    "AERLoss": "loss", "aer_term": "loss", "make_loss_fn": "loss",
    "VerlAER": "driver", "reward_extra_info": "driver", "final_outputs": "driver",
    "AERCheckpointCallback": "checkpoint",
    "AERTrainerMixin": "trainers", "AERPPOTrainerMixin": "trainers", "aer_trainer_class": "trainers",
    "install": "trainers",
    "WithAER": "launcher", "run": "launcher", "main": "launcher",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
