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
- ``_compute_loss``: adds the AER term with the normalization TRL uses for its
  own entropy bonus (token mean over the micro-batch's completion tokens,
  divided by the gradient-accumulation steps, independent of ``loss_type``):

      L_aer = - sum_{i,t} alpha * w_i * H_it * m_it / sum_{i,t} m_it / accumulation_steps

  ``H`` is the entropy TRL already computes for its metric (temperature-scaled
  logits, fused LM head), captured from ``_get_per_token_logps_and_entropies``:
  no second forward pass. ``m`` is ``completion_mask`` (times ``tool_mask``).
  On each optimizer step boundary (``accelerator.sync_gradients``) the
  window's token-mean entropy is all-reduced across processes and fed once to
  :meth:`AdaptiveEntropyRegularizer.update`.
- ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: ``aer_state.json``
  in each ``checkpoint-N`` folder, restored by ``resume_from_checkpoint``.

Metrics (``aer/coef``, ``aer/target``, ``aer/entropy``, ``aer/bonus``, the
difficulty shares, ...) go through TRL's ``_metrics`` to whatever logger the
run reports to.

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
from . import EntropyWindow, as_regularizer, load_state, save_state

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
        self._aer_capture = False
        self._aer_entropies: Tensor | None = None

    # -- weights from the group rewards -------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # The reward TRL's advantages use; a completion no reward function scored (all NaN) counts as unsolved.
        scores = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        groups = torch.arange(scores.numel(), device=scores.device) // group_size
        self._aer_all_weights = self.aer.allocator.alloc(scores, groups)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        n = output["advantages"].shape[0]
        # TRL keeps this process's rows of the gathered batch (process_slice); so do we.
        start = self.accelerator.process_index * n
        output[WEIGHTS_KEY] = self._aer_all_weights[start:start + n]
        mode = "train" if self.model.training else "eval"
        for key, value in self.aer.allocator.metrics(METRIC_PREFIX).items():
            self._metrics[mode][key].append(value)
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
        term = self.aer.loss(entropies, mask, coefficients, agg="token-mean")
        self._metrics[mode][f"{METRIC_PREFIX}bonus"].append(-term.item())
        loss = loss + term / accumulation
        if mode == "train":
            self._aer_window.add(entropies, mask)
            if self.accelerator.sync_gradients:
                # Every process reaches this boundary together: the all-reduce inside reduce() is collective.
                for key, value in self.aer.update(self._aer_window.reduce(), prefix=METRIC_PREFIX).items():
                    self._metrics[mode][key].append(value)
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
            load_state(self.aer, checkpoint, missing_ok=True)
