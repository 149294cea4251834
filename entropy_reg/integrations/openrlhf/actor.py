"""Actor side: OpenRLHF's actor trainer and policy actor, plus AER (imports OpenRLHF and Ray).

:func:`~.hook.install` binds :class:`AERActorPPOTrainer` to ``ActorPPOTrainer``
and :data:`AERPolicyModelActor` to ``PolicyModelActor`` in
``openrlhf.trainer.ray.ppo_actor``.

Where the term goes: OpenRLHF's ``training_step`` computes the actor loss with
``self.actor_loss_fn(log_probs, old_log_probs, advantages, action_mask=...,
**loss_batch_info)`` and subtracts its own entropy bonus before the backward.
AER's term is added to that policy loss, computed from the same
``action_mask`` and ``loss_batch_info`` and with the policy loss's own
``token_level_loss`` (False for ``seq-mean-token-mean`` and for GSPO), on
``output.entropy`` of the same forward pass (kept by a forward hook on the
actor).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import ray
from openrlhf.trainer.ray import ppo_actor
from torch import Tensor

from .. import check_resumed
from .config import check_entropy_coef, config_from_env
from .core import METRIC_PREFIX, WEIGHT_KEY, OpenRLHFAER
from .fused import actor_pass
from .fused import install as install_fused
from .hook import apply_if_installed

__all__ = ["AERActorPPOTrainer", "AERPolicyModelActor", "LOSS_METRIC"]

LOSS_METRIC = f"{METRIC_PREFIX}loss"
# The keyword arguments of OpenRLHF's PolicyLoss that carry its normalization (loss_batch_info).
_LOSS_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size")


@dataclass
class _MicroBatch:
    """What one ``training_step`` hands from the actor's forward to the policy loss."""

    experience: Any
    entropy: Tensor | None = None
    term: Tensor | None = None


class _PolicyLossWithAER:
    """OpenRLHF's ``PolicyLoss`` whose first output also carries AER's term."""

    def __init__(self, policy_loss: Any, trainer: AERActorPPOTrainer) -> None:
        self.policy_loss = policy_loss
        self.trainer = trainer

    @property
    def token_level_loss(self) -> bool:
        return self.policy_loss.token_level_loss

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        out = self.policy_loss(*args, **kwargs)
        info = {k: kwargs[k] for k in _LOSS_BATCH_KEYS if k in kwargs}
        term = self.trainer.aer_term(kwargs["action_mask"], info)
        # term - term.detach() is exactly 0: OpenRLHF's logged policy_loss keeps its value,
        # the gradient gains AER's term (its value is logged as aer/loss).
        return (out[0] + (term - term.detach()),) + tuple(out[1:])


def _dp_group(strategy: Any) -> Any:
    """The data-parallel group of OpenRLHF's device mesh (None: the world)."""
    mesh = getattr(strategy, "ds_device_mesh", None)
    return None if mesh is None else mesh["dp"].get_group()


class AERActorPPOTrainer(ppo_actor.ActorPPOTrainer):
    """``ActorPPOTrainer`` with AER: the term in each micro-batch's loss, one update per RL step.

    Attributes:
        aer: the rank's :class:`OpenRLHFAER`, built from the job's :class:`AERConfig`.
    """

    def __init__(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        check_entropy_coef(strategy.args)  # None -> 0.0 here, so the actor returns output.entropy
        super().__init__(strategy, *args, **kwargs)
        config = config_from_env()
        self.aer = OpenRLHFAER(config, token_level_loss=self.actor_loss_fn.token_level_loss)
        self.fused_entropy = config.fused_entropy  # --aer.fused_entropy: see .fused
        if self.fused_entropy:
            install_fused()
        self.actor_loss_fn = _PolicyLossWithAER(self.actor_loss_fn, self)
        self._aer_micro_batch: _MicroBatch | None = None
        self._aer_micro_batches = 0  # micro-batches trained in this ppo_train
        self.actor.register_forward_hook(self._keep_entropy)

    def _keep_entropy(self, module: Any, inputs: Any, output: Any) -> None:
        # Only the training forward of training_step; experience-making forwards pass through.
        if self._aer_micro_batch is not None and isinstance(output, tuple):
            self._aer_micro_batch.entropy = getattr(output[1], "entropy", None)

    def aer_term(self, action_mask: Tensor, loss_batch_info: dict[str, Any]) -> Tensor:
        """AER's term for the micro-batch in flight (called by the wrapped policy loss)."""
        mb = self._aer_micro_batch
        if mb is None or mb.entropy is None:
            raise RuntimeError("AER: the actor returned no entropy in this training step (--actor.entropy_coef 0?)")
        if WEIGHT_KEY not in mb.experience.info:
            raise KeyError(
                f"experience.info has no {WEIGHT_KEY!r}: the experience maker is not AER's "
                "(launch with python -m entropy_reg.integrations.openrlhf)"
            )
        mb.term = self.aer.loss(mb.entropy, action_mask, mb.experience.info[WEIGHT_KEY], loss_batch_info)
        return mb.term

    def training_step(self, experience: Any, kl_ctl: float, step: int, loss_batch_info: Any = None) -> dict:
        self._aer_micro_batch = _MicroBatch(experience)
        swap = (
            actor_pass(experience.sequences, experience.action_mask, packing_samples=self.args.ds.packing_samples)
            if self.fused_entropy
            else contextlib.nullcontext()
        )
        try:
            with swap:
                status = super().training_step(experience, kl_ctl, step, loss_batch_info)
            term = self._aer_micro_batch.term
        finally:
            self._aer_micro_batch = None
        if term is None:
            raise RuntimeError("AER: OpenRLHF's training_step did not call its policy loss; AER's term is missing")
        self._aer_micro_batches += 1
        if self._ends_optimizer_step(step):
            self.aer.end_optimizer_step()
        # Weighted like OpenRLHF's policy_loss (per micro-batch, by its tokens).
        status["metrics"][LOSS_METRIC] = term.detach()
        status["weights"][LOSS_METRIC] = "token"
        return status

    def _ends_optimizer_step(self, step: int) -> bool:
        """Whether the micro-batch just trained completed an optimizer step: OpenRLHF's dynamic batching
        says so per micro-batch; otherwise DeepSpeed steps every ``accumulated_gradient`` micro-batches."""
        if self.args.train.dynamic_batch_enable:
            return bool(self.replay_buffer.dynamic_optimizer_step[step])
        return self._aer_micro_batches % max(int(self.strategy.accumulated_gradient), 1) == 0

    def ppo_train(self, kl_ctl: float) -> dict:
        self._aer_micro_batches = 0
        status = super().ppo_train(kl_ctl)
        status.update(self.aer.update(group=_dp_group(self.strategy)))
        return status


def _trainer_aer(trainer: Any) -> OpenRLHFAER:
    aer = getattr(trainer, "aer", None)
    if not isinstance(aer, OpenRLHFAER):
        raise RuntimeError(
            "AER: this Ray worker built OpenRLHF's own ActorPPOTrainer; the worker_process_setup_hook did not "
            "run (launch with python -m entropy_reg.integrations.openrlhf)"
        )
    return aer


_NO_DS_CKPT = (
    "AER: --ckpt.disable_ds is set, so no DeepSpeed checkpoint is written and AER's state "
    "(target anchor, coefficient) is not saved: a resumed run starts AER from scratch"
)


# PolicyModelActor is a Ray ActorClass, which cannot be subclassed; __ray_actor_class__ is the
# decorated class itself (Ray Serve reads it the same way).
class _AERPolicyModelActor(ppo_actor.PolicyModelActor.__ray_actor_class__):
    """``PolicyModelActor`` that restores AER's state on load and saves it in ``client_states``."""

    def init_model_from_pretrained(self, strategy: Any, pretrain: Any, max_steps: Any = None, vllm_engines: Any = None):
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        aer = _trainer_aer(self.trainer)
        restored = aer.load(self.checkpoint_states)
        if self.checkpoint_states:  # OpenRLHF resumed from a DeepSpeed checkpoint (--ckpt.load_enable)
            checkpoint = os.path.join(strategy.args.ckpt.path, "_actor")
            check_resumed(aer.regularizer, restored, checkpoint, "--aer.reanchor_on_missing_state true")
        if self.disable_ds_ckpt:
            warnings.warn(_NO_DS_CKPT, stacklevel=2)

    def save_checkpoint(self, tag: Any, client_states: Any = None, metric_value: Any = None, metric_key: Any = None):
        if self.disable_ds_ckpt:
            warnings.warn(_NO_DS_CKPT, stacklevel=2)
        client_states = _trainer_aer(self.trainer).save(dict(client_states or {}))
        return super().save_checkpoint(tag, client_states, metric_value=metric_value, metric_key=metric_key)


# num_gpus=1 as OpenRLHF's own decorator; RayActorGroup sets the real share with .options().
AERPolicyModelActor = ray.remote(num_gpus=1)(_AERPolicyModelActor)

REPLACES = {"ActorPPOTrainer": AERActorPPOTrainer, "PolicyModelActor": AERPolicyModelActor}
apply_if_installed(__name__)
