"""AER for TRL's ``GRPOTrainer`` (PyPI ``trl``, tested with 1.16.0; extra ``entropy-reg[trl]``).

:class:`AERGRPOTrainer` is ``GRPOTrainer`` with three hooks, each calling
TRL's own method first:

- ``_calculate_rewards``: TRL gathers every process's rewards there (groups of
  ``num_generations`` consecutive completions); the weighted reward sum TRL
  uses for advantages gives the group accuracies and the per-completion
  difficulty weights ``w_i``, stored with the batch as ``inputs["aer_weights"]``
  (this process's slice) by ``_generate_and_score_completions``. Weights, not
  coefficients: one generation batch serves ``steps_per_generation`` optimizer
  steps, and alpha may move in between.
- ``_compute_loss``: adds the AER term. With ``m = completion_mask`` (times
  ``tool_mask``), ``H`` the entropy (nats) TRL already computes for its metric
  (temperature-scaled logits, fused LM head; captured from
  ``_get_per_token_logps_and_entropies``: no second forward pass) and ``G`` =
  ``current_gradient_accumulation_steps`` in training (the micro-batches of
  this optimizer step, fewer in an epoch's last window) or 1 in evaluation,
  the term added to each micro-batch's loss is, for EVERY ``loss_type``
  (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo):

      L_aer = - alpha * sum_{i,t} w_i * H_it * m_it / max(sum_{i,t} m_it, 1) / G

  the micro-batch's token mean, TRL's own ``entropy_coef`` normalization. Not
  the loss type's policy normalization, on purpose: ``alpha`` is what the
  controller sets from the token-mean entropy it measures, and with a fixed
  normalization one ``alpha`` is one strength of bonus per token whatever
  ``loss_type`` is (TRL documents the same for ``entropy_coef``), so AER's
  coefficient bounds compare with TRL's and Skywork-OR1's. Following the loss
  type instead would couple the bonus to response lengths: under dr_grpo's
  ``sum / (B * max_completion_length)`` the term shrinks by ``mean length /
  max_completion_length`` and the controller would chase length changes.
  The cost: under dapo / cispo / vespo (one token count for the whole
  accumulation window) a token of a micro-batch with fewer tokens weighs more
  in the AER term than in the policy term. ``top_entropy_quantile < 1``
  restricts TRL's policy loss (and TRL's bonus) to high-entropy tokens; the
  AER term keeps every completion token, the tokens whose entropy the
  controller measures.
  On each optimizer step boundary (``accelerator.sync_gradients``) the
  window's token-mean entropy is all-reduced across processes and fed once to
  :meth:`AdaptiveEntropyRegularizer.update`.
- ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: ``aer_state.json``
  in each ``checkpoint-N`` folder, restored by ``resume_from_checkpoint``; a
  checkpoint without it raises unless ``AERConfig(reanchor_on_missing_state=True)``.

``AERConfig.fused_entropy`` has no effect here: TRL 1.16's GRPO already computes
the log-probs and the entropy in one pass of its own fused LM head, without the
logits; ``benchmarks/bench_integrations.py`` compares it with ours (see
``docs/integrations.md``, "The entropy kernel inside the actor update").

Metrics go through TRL's ``_metrics`` to whatever logger the run reports to.
Training: ``aer/coef``, ``aer/target``, ``aer/entropy`` once per optimizer
step, ``aer/bonus`` per micro-batch, and ``aer/difficulty/*`` (accuracy, group
shares, mean raw weight) of each generation batch the step trains on, once per
step: a batch TRL reuses over ``steps_per_generation`` optimizer steps is
reported with each of them. Evaluation batches log ``aer/bonus`` and
``aer/difficulty/*`` under TRL's ``eval_`` prefix only, and leave
``aer.allocator.stats`` (saved in checkpoints) on the last training batch.

How this differs from TRL's ``use_adaptive_entropy``: TRL's controller
(Skywork-OR1 style) steps a single coefficient by ``entropy_coef_delta`` toward
an absolute ``entropy_target`` (0.2 nats by default) and applies it only while
entropy is below that target, the same for every prompt. AER anchors the target
to the policy's own initial entropy (``target_ratio * H0``), so it means the
same thing for models whose entropies differ tenfold, and splits the bonus
across prompts by difficulty. The two must not be stacked: the trainer refuses
``entropy_coef != 0`` and ``use_adaptive_entropy=True``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from ..regularizer import AdaptiveEntropyRegularizer, AERConfig
from . import EntropyWindow, as_regularizer, check_resumed, load_state, save_state

__all__ = ["AERGRPOTrainer", "WEIGHTS_KEY", "METRIC_PREFIX"]

WEIGHTS_KEY = "aer_weights"
METRIC_PREFIX = "aer/"


class AERGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with Adaptive Entropy Regularization.

    Takes every argument of ``GRPOTrainer``, plus ``aer``: an
    :class:`AdaptiveEntropyRegularizer`, an :class:`AERConfig`, or None for the
    defaults. The regularizer is ``trainer.aer``. ``args.entropy_coef`` must be
    0 and ``args.use_adaptive_entropy`` False (AER replaces TRL's bonus).
    """

    def __init__(self, *args: Any, aer: AdaptiveEntropyRegularizer | AERConfig | None = None, **kwargs: Any) -> None:
        regularizer = as_regularizer(aer)
        super().__init__(*args, **kwargs)
        if self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy:
            raise ValueError(
                "args.entropy_coef must be 0 and args.use_adaptive_entropy False with AERGRPOTrainer "
                f"(got entropy_coef={self.args.entropy_coef}, use_adaptive_entropy={self.args.use_adaptive_entropy}): "
                "AER replaces TRL's entropy bonus"
            )
        self.aer = regularizer
        self._aer_window = EntropyWindow()
        self._aer_all_weights: Tensor | None = None
        self._aer_batch_metrics: dict[str, float] = {}  # difficulty metrics of the batch just scored
        self._aer_train_metrics: dict[str, float] | None = None  # those of the latest training generation batch
        self._aer_step_metrics: list[dict[str, float]] = []  # those of the batches this optimizer step trains on
        self._aer_capture = False
        self._aer_entropies: Tensor | None = None

    # -- weights from the group rewards -------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # The reward TRL's advantages use; a completion no reward function scored (all NaN) counts as unsolved.
        scores = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        training = self.model.training
        group_size = self.num_generations if training else self.num_generations_eval
        groups = torch.arange(scores.numel(), device=scores.device) // group_size
        allocator = self.aer.allocator
        # Evaluation must leave the allocator's statistics on the last training batch: they are saved in checkpoints.
        saved = None if training else allocator.state_dict()
        self._aer_all_weights = allocator.alloc(scores, groups)
        self._aer_batch_metrics = allocator.metrics(METRIC_PREFIX)
        if saved is not None:
            allocator.load_state_dict(saved)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        n = output["advantages"].shape[0]
        # TRL keeps this process's rows of the gathered batch (process_slice); so do we.
        start = self.accelerator.process_index * n
        output[WEIGHTS_KEY] = self._aer_all_weights[start:start + n]
        if self.model.training:
            # Logged by each optimizer step that trains on this batch (_compute_loss), not here: TRL reuses one
            # generation batch for steps_per_generation * num_iterations micro-batches.
            self._aer_train_metrics = self._aer_batch_metrics
        else:
            for key, value in self._aer_batch_metrics.items():
                self._metrics["eval"][key].append(value)  # TRL's log() prefixes them with eval_
        return output

    # -- the loss term and the controller update ----------------------------------------------

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._aer_capture and kwargs.get("compute_entropy", False):
            self._aer_entropies = entropies
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        self._aer_capture, self._aer_entropies = True, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._aer_capture = False
        entropies, self._aer_entropies = self._aer_entropies, None
        if entropies is None:
            raise RuntimeError("GRPOTrainer._compute_loss computed no entropy; this TRL version is not supported")
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        coefficients = inputs[WEIGHTS_KEY] * self.aer.value
        # The same token mean for every loss_type (see the module docstring for why).
        term = self.aer.loss(entropies, mask, coefficients, agg="token-mean")
        self._metrics[mode][f"{METRIC_PREFIX}bonus"].append(-term.item())
        loss = loss + term / accumulation
        if mode == "train":
            self._aer_window.add(entropies, mask)
            # In training, a micro-batch is a slice of the latest generation batch (TRL's _prepare_inputs);
            # None only for a batch that did not come from _generate_and_score_completions.
            batch = self._aer_train_metrics
            if batch is not None and not any(seen is batch for seen in self._aer_step_metrics):
                self._aer_step_metrics.append(batch)
            if self.accelerator.sync_gradients:
                # Every process reaches this boundary together: the all-reduce inside reduce() is collective.
                metrics = self.aer.update(self._aer_window.reduce(), prefix=METRIC_PREFIX)
                # The allocator's entries describe one batch; the step logs those of each batch it trained on, once.
                for key in self.aer.allocator.metrics(METRIC_PREFIX):
                    metrics.pop(key)
                for entries in [metrics, *self._aer_step_metrics]:
                    for key, value in entries.items():
                        self._metrics[mode][key].append(value)
                self._aer_step_metrics = []
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # the folder TRL just wrote
            save_state(self.aer, os.path.join(self._get_output_dir(trial=trial), checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            restored = load_state(self.aer, checkpoint, missing_ok=True)
            check_resumed(self.aer, restored, checkpoint, "AERConfig(reanchor_on_missing_state=True)")
