"""The verl adapter's trainers: AER subclasses of verl's legacy and v1 PPO trainers."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor
from verl import DataProto

from ...regularizer import AERConfig
from .checkpoint import load_on_resume, save_before_verl
from .config import COEF_KEY
from .driver import VerlAER, final_outputs, padded, reward_extra_info, verl_aer


def _step_controller(trainer: Any) -> dict[str, float]:
    """The controller's one step for this actor update, from the entropy its old-log-prob pass measured.

    The pass runs for every batch, the actor update only once the critic has
    warmed up: stepping here keeps one controller update per actor update and
    the anchor's warm-up counting actor updates.
    """
    pending, trainer._aer_entropy = trainer._aer_entropy, None
    if pending is None:
        raise RuntimeError("AER: the actor update came without an old-log-prob pass, where AER measures the entropy")
    return trainer.aer.update(*pending)


def _install_loss(trainer: Any) -> None:
    """The AER loss on the trainer's actor workers, once verl has built them (and set its own loss)."""
    from verl.utils.config import omega_conf_to_dataclass

    actor_config = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    trainer.actor_rollout_wg.set_loss_fn(trainer.aer.loss_fn(actor_config, trainer.config.get("distillation")))


class _AERCheckpoints:
    """What both trainer mixins do around verl's checkpoints: ``aer_state.json`` in ``global_step_N/``,
    written before verl's own save and read back after verl's own load."""

    def _save_checkpoint(self) -> None:
        save_before_verl(self)
        super()._save_checkpoint()

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        load_on_resume(self)
        return result


class AERTrainerMixin(_AERCheckpoints):
    """AER for verl's legacy ``RayPPOTrainer`` (``trainer.use_v1=False``).

    ``class Trainer(AERTrainerMixin, RayPPOTrainer): ...``; the launcher builds
    one. Pass ``aer=`` (a :class:`VerlAER` or an :class:`AERConfig`), or leave
    it to the config's ``aer`` section. The mixin checks the config
    (:func:`prepare_config`) and extends five methods:

    - ``init_workers``: installs :func:`make_loss_fn` on the actor workers;
    - ``_compute_old_log_prob``: keeps the batch's entropy for the actor update;
    - ``_update_actor``: :meth:`VerlAER.update` with it, :meth:`VerlAER.attach`
      before the update, metrics after;
    - ``_save_checkpoint`` / ``_load_checkpoint``: ``aer_state.json`` in ``global_step_N/``.
    """

    def __init__(self, *args: Any, aer: VerlAER | AERConfig | None = None, **kwargs: Any) -> None:
        config = kwargs["config"] if "config" in kwargs else args[0]
        self.aer = verl_aer(config, aer)  # before verl's __init__: a bad config fails before anything is built
        super().__init__(*args, **kwargs)
        self._aer_entropy: tuple[Tensor, Tensor] | None = None  # the old-log-prob pass's, for the actor update

    def init_workers(self) -> None:
        super().init_workers()
        _install_loss(self)

    def _compute_old_log_prob(self, batch: DataProto):
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        self._aer_entropy = (old_log_prob.batch["entropys"], batch.batch["response_mask"])
        return old_log_prob, mfu

    def _update_actor(self, batch: DataProto) -> DataProto:
        metrics = {**_step_controller(self), **self.aer.attach(batch)}
        output = super()._update_actor(batch)
        output.meta_info["metrics"].update(metrics)
        return output


class AERPPOTrainerMixin(_AERCheckpoints):
    """AER for verl's v1 trainers (``verl.trainer.ppo.v1``, TransferQueue batches as ``KVBatchMeta``).

    ``aer_trainer_class(PPOTrainerSync)`` builds the class; :func:`install`
    registers it under the trainer mode. The mixin checks the config
    (:func:`prepare_config`) and extends:

    - ``_setup``: installs :func:`make_loss_fn` on the actor workers;
    - ``_compute_old_log_prob``: keeps the entropy of the real samples (not
      ``is_padding``) for the actor update;
    - ``_update_actor``: :meth:`VerlAER.update` with it, then writes ``aer_coef``
      for every sample key before the update;
    - ``_save_checkpoint`` / ``_load_checkpoint``: ``aer_state.json`` in ``global_step_N/``.
    """

    def __init__(self, config: Any, *args: Any, aer: VerlAER | AERConfig | None = None, **kwargs: Any) -> None:
        self.aer = verl_aer(config, aer)
        self._aer_entropy: tuple[Tensor, Tensor] | None = None  # the old-log-prob pass's, for the actor update
        super().__init__(config, *args, **kwargs)

    def _setup(self) -> None:
        super()._setup()
        _install_loss(self)

    @staticmethod
    def _real_samples(batch: Any) -> np.ndarray:
        """``[N]`` bool: the samples that are not verl's synthetic padding (``padding_utils``)."""
        return np.array([not tag.get("is_padding", False) for tag in batch.tags], dtype=bool)

    def _compute_old_log_prob(self, batch: Any, metrics: dict) -> Any:
        import transfer_queue as tq

        batch = super()._compute_old_log_prob(batch, metrics=metrics)
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy", "response_mask"]
        )
        real = torch.from_numpy(self._real_samples(batch))
        self._aer_entropy = (padded(data["entropy"])[real], padded(data["response_mask"])[real])
        return batch

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        import transfer_queue as tq

        metrics.update(_step_controller(self))
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "rm_scores", "extra_fields"]
        )
        # A non-tensor field comes back as a list, a LinkedList, a NonTensorStack or an array: list() takes all.
        extra = reward_extra_info(list(data["extra_fields"])) if "extra_fields" in data.keys() else {}
        scores = self.aer.difficulty_scores(padded(data["rm_scores"]).sum(-1), extra)
        uid = np.array(list(data["uid"]), dtype=object)
        coef, out = self.aer.coefficients(scores, uid, self._real_samples(batch), final_outputs(batch.keys))
        metrics.update(out)
        # The put returns the batch's metadata with aer_coef among its fields, so the update fetches it.
        batch = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict({COEF_KEY: coef}, batch_size=len(batch))
        )
        return super()._update_actor(batch, metrics=metrics)


@lru_cache(maxsize=None)
def aer_trainer_class(base: type) -> type:
    """``AER<base>``: the AER subclass of a verl trainer class (one class per base).

    ``base`` is a v1 ``PPOTrainer`` subclass (e.g. ``PPOTrainerSync``) or the
    legacy ``RayPPOTrainer``.
    """
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    mixin = AERTrainerMixin if issubclass(base, RayPPOTrainer) else AERPPOTrainerMixin
    return type(f"AER{base.__name__}", (mixin, base), {"__module__": __name__, "__doc__": mixin.__doc__})


def install(use_v1: bool = True, trainer_mode: str = "sync") -> type:
    """Make verl's task runner, in this process, build the AER trainer; returns the class it will build.

    v1: the registry entry ``trainer_mode`` (what ``TaskRunnerV1.run`` looks up
    with ``get_trainer_cls``) becomes ``aer_trainer_class`` of the registered
    class. The mode's name stays (verl reads it for the replay buffer and the
    checkpoint contents) and ``register_trainer`` refuses to rebind a name, so
    the entry is dropped and registered anew. Legacy: ``main_ppo_v0.TaskRunner.run``
    builds ``RayPPOTrainer`` by its module-level name, which is rebound to the
    AER subclass. The launcher runs this inside the Ray task-runner actor
    (``__ray_call__``), the only process that builds the trainer. Idempotent.
    """
    if use_v1:
        from verl.trainer.ppo.v1 import trainer_base

        current = trainer_base.get_trainer_cls(trainer_mode)
        if issubclass(current, AERPPOTrainerMixin):
            return current
        cls = aer_trainer_class(current)
        del trainer_base.TRAINER_REGISTRY[trainer_mode]
        trainer_base.register_trainer(trainer_mode)(cls)
        return cls
    from verl.trainer import main_ppo_v0

    if not issubclass(main_ppo_v0.RayPPOTrainer, AERTrainerMixin):
        main_ppo_v0.RayPPOTrainer = aer_trainer_class(main_ppo_v0.RayPPOTrainer)
    return main_ppo_v0.RayPPOTrainer
