"""AER for verl (PyPI ``verl``, tested with 0.9.1; extra ``entropy-reg[verl]``).

verl splits a step between a driver, which holds the whole batch as a
``DataProto`` and computes rewards and advantages, and workers, which run the
loss on micro-batches as ``TensorDict`` s. The adapter follows that split:

- driver (:class:`VerlAER`): once per step, feed the batch's token-mean
  entropy (``entropys`` from the old-log-prob pass, temperature-scaled as the
  rollout sampled) to the anchored target and the global coefficient, then
  write per-response coefficients ``c_i = alpha * w_i`` into
  ``batch.batch["aer_coef"]``. ``w_i`` comes from the group accuracy of
  ``token_level_scores.sum(-1)`` over ``non_tensor_batch["uid"]``. ``ActorConfig``
  is frozen, so the coefficients must travel as batch data: a ``[N]`` tensor in
  ``batch.batch`` follows every sample through ``to_tensordict()``,
  ``left_right_2_no_padding``, balancing, mini- and micro-batch splits.
- worker (:func:`aer_ppo_loss`, installed with the worker group's
  ``set_loss_fn``): verl's own ``ppo_loss`` plus

      L_aer = - agg_loss(c_i * H_it, response_mask, loss_agg_mode, **config.global_batch_info)

  with verl's ``agg_loss`` and the ``global_batch_info`` that ``ppo_loss`` has
  just filled (``dp_size``, global ``batch_num_tokens``, ``global_batch_size``,
  ``loss_scale_factor``), so the term is normalized exactly like the policy
  loss, e.g. token-mean over all DP ranks' tokens.
- checkpoint: :meth:`VerlAER.save` / :meth:`VerlAER.load` write and read
  ``aer_state.json`` in ``global_step_N/`` (verl saves no controller state).

Config it needs: ``actor_rollout_ref.actor.entropy_coeff=0`` (verl's own
constant-coefficient bonus would otherwise be added on top; :func:`make_loss_fn`
refuses a nonzero one) and ``actor_rollout_ref.actor.calculate_entropy=True``
(with ``entropy_coeff=0`` verl skips computing entropy in the update).

:class:`AERTrainerMixin` wires all of it into ``RayPPOTrainer`` (the
``DataProto`` trainer, ``trainer.use_v1=False``); ``docs/integrations.md`` shows
the lines for the TransferQueue trainer as well.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from ..distributed import masked_mean
from ..regularizer import AdaptiveEntropyRegularizer, AERConfig
from . import as_regularizer, load_state, save_state

__all__ = ["COEF_KEY", "METRIC_PREFIX", "VerlAER", "aer_ppo_loss", "make_loss_fn", "AERTrainerMixin"]

COEF_KEY = "aer_coef"
METRIC_PREFIX = "actor/aer/"


def response_scores(batch: DataProto) -> Tensor:
    """One verifiable score per response: ``token_level_scores`` summed over tokens, as GRPO does."""
    scores = batch.batch["token_level_scores"]
    return scores.sum(dim=-1) if scores.dim() == 2 else scores


class VerlAER:
    """Driver-side AER state for verl: one object in the trainer process.

    Args:
        regularizer: an :class:`AdaptiveEntropyRegularizer`, an :class:`AERConfig`,
            or None for the defaults.
        prefix: metric name prefix, verl's ``actor/`` naming by default.
    """

    def __init__(
        self, regularizer: AdaptiveEntropyRegularizer | AERConfig | None = None, *, prefix: str = METRIC_PREFIX
    ) -> None:
        self.regularizer = as_regularizer(regularizer)
        self.prefix = prefix

    def update(self, entropys: Tensor, response_mask: Tensor) -> dict[str, float]:
        """Once per step, before :meth:`attach`: the batch's token-mean entropy to the controllers.

        ``entropys[N, T]`` (nats) and ``response_mask[N, T]`` of the whole batch,
        which the driver holds, so the mean is exact without any reduction.
        Returns the metrics.
        """
        entropy = masked_mean(entropys, response_mask)
        return self.regularizer.update(entropy, prefix=self.prefix)

    def attach(self, batch: DataProto) -> dict[str, float]:
        """Write ``batch.batch["aer_coef"]`` (``[N]`` float32, ``alpha * w_i``); returns the metrics."""
        uid = batch.non_tensor_batch.get("uid")
        if uid is None:
            raise KeyError("batch.non_tensor_batch has no 'uid': AER groups responses by prompt uid")
        coef = self.regularizer.coefficients(response_scores(batch), np.asarray(uid))
        batch.batch[COEF_KEY] = coef.to(torch.float32)
        out = self.regularizer.metrics(self.prefix)
        out[f"{self.prefix}coef_mean"] = float(coef.mean()) if coef.numel() else 0.0
        return out

    def save(self, global_step_folder: str | os.PathLike[str]) -> str:
        """Save the state as ``global_step_folder/aer_state.json``."""
        return save_state(self.regularizer, global_step_folder)

    def load(self, global_step_folder: str | os.PathLike[str], *, missing_ok: bool = False) -> bool:
        """Restore the state saved by :meth:`save`; see :func:`entropy_reg.integrations.load_state`."""
        return load_state(self.regularizer, global_step_folder, missing_ok=missing_ok)


def aer_ppo_loss(config: Any, model_output: dict[str, Any], data: TensorDict, dp_group: Any = None):
    """verl's ``ppo_loss`` plus the AER term; same signature and return value ``(loss, metrics)``.

    ``data[COEF_KEY]`` holds the per-response coefficients written by
    :meth:`VerlAER.attach`; ``model_output["entropy"]`` the token entropy
    (nested over prompt + response, or packed), which ``no_padding_2_padding``
    turns into ``[B, T_response]`` as ``ppo_loss`` does.
    """
    loss, metrics = ppo_loss(config, model_output, data, dp_group=dp_group)
    entropy = model_output.get("entropy")
    if entropy is None:
        raise ValueError("model_output has no 'entropy': set actor_rollout_ref.actor.calculate_entropy=True")
    if COEF_KEY not in data.keys():
        raise KeyError(f"data has no {COEF_KEY!r}: call VerlAER.attach(batch) on the driver before update_actor")
    entropy = no_padding_2_padding(entropy, data)
    fields = data.select("response_mask", COEF_KEY).to_padded_tensor()
    coef = fields[COEF_KEY].to(device=entropy.device, dtype=entropy.dtype)
    bonus = agg_loss(
        loss_mat=entropy * coef.unsqueeze(-1),
        loss_mask=fields["response_mask"].to(torch.bool),
        loss_agg_mode=config.loss_agg_mode,
        **config.global_batch_info,
    )
    # Same aggregation as verl chose for pg_loss (SUM when normalized by global counts).
    metrics[f"{METRIC_PREFIX}bonus"] = Metric(value=bonus.detach(), aggregation=metrics["actor/pg_loss"].aggregation)
    return loss - bonus, metrics


def make_loss_fn(actor_config: Any) -> Callable[..., Any]:
    """The worker loss for ``actor_rollout_wg.set_loss_fn``: ``aer_ppo_loss`` bound to the actor config.

    Refuses ``entropy_coeff != 0`` (verl would add its own constant bonus on
    top of AER's).
    """
    if float(actor_config.entropy_coeff) != 0.0:
        raise ValueError(
            f"actor_config.entropy_coeff must be 0 with AER (got {actor_config.entropy_coeff}); "
            "set actor_rollout_ref.actor.entropy_coeff=0 and calculate_entropy=True"
        )
    # A partial of a module-level function pickles, so Ray can ship it to every worker.
    return partial(aer_ppo_loss, config=actor_config)


class AERTrainerMixin:
    """AER for verl's ``RayPPOTrainer``: ``class Trainer(AERTrainerMixin, RayPPOTrainer): ...``.

    Pass ``aer=`` (a :class:`VerlAER` or an :class:`AERConfig`) to the
    constructor; without it the settings come from the trainer config's
    ``aer`` section (Hydra: ``+aer.target_ratio=0.5 +aer.coef_max=0.005``, the
    fields of :class:`AERConfig`), else the defaults. The mixin extends five of
    the trainer's methods:

    - ``init_workers``: installs :func:`make_loss_fn` on the actor workers;
    - ``_compute_old_log_prob``: feeds the step's entropy to :meth:`VerlAER.update`;
    - ``_update_actor``: :meth:`VerlAER.attach` before the update, metrics after;
    - ``_save_checkpoint`` / ``_load_checkpoint``: ``aer_state.json`` in ``global_step_N/``.
    """

    def __init__(self, *args: Any, aer: VerlAER | AERConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if aer is None and self.config.get("aer") is not None:
            from omegaconf import OmegaConf

            aer = AERConfig(**OmegaConf.to_container(self.config.aer, resolve=True))
        self.aer = aer if isinstance(aer, VerlAER) else VerlAER(aer)
        self._aer_metrics: dict[str, float] = {}

    def init_workers(self) -> None:
        from verl.utils.config import omega_conf_to_dataclass

        super().init_workers()
        self.actor_rollout_wg.set_loss_fn(make_loss_fn(omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)))

    def _compute_old_log_prob(self, batch: DataProto):
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        self._aer_metrics = self.aer.update(old_log_prob.batch["entropys"], batch.batch["response_mask"])
        return old_log_prob, mfu

    def _update_actor(self, batch: DataProto) -> DataProto:
        metrics = {**self._aer_metrics, **self.aer.attach(batch)}
        output = super()._update_actor(batch)
        output.meta_info["metrics"].update(metrics)
        return output

    def _global_step_folder(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    def _save_checkpoint(self) -> None:
        super()._save_checkpoint()
        self.aer.save(self._global_step_folder())

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        if self.global_steps > 0:  # resumed: verl has set global_steps from the folder name
            trainer_cfg = self.config.trainer
            folder = trainer_cfg.get("resume_from_path") if trainer_cfg.resume_mode == "resume_path" else None
            self.aer.load(folder or self._global_step_folder(), missing_ok=True)
        return result
