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

- driver (:class:`VerlAER`): once per step, after the old-log-prob pass, the
  batch's token-mean entropy (temperature-scaled as the rollout sampled) goes
  to the anchored target and the global coefficient; before the actor update,
  per-response coefficients ``c_i = alpha * w_i`` (``w_i`` from the group
  accuracy of the summed token scores over the prompt ``uid``) are written as
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
  controller state), written by :class:`AERCheckpointCallback` (v1: verl's
  ``on_save`` hook; legacy: after ``_save_checkpoint``) and read back when verl
  resumes from that folder.

:func:`prepare_config` checks the configuration before Ray starts and before
any rollout, and is called again when an AER trainer is built.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from ...distributed import masked_mean
from ...regularizer import AdaptiveEntropyRegularizer, AERConfig
from .. import as_regularizer, load_state, save_state

__all__ = [
    "COEF_KEY",
    "METRIC_PREFIX",
    "SUPPORTED_V1_MODES",
    "VerlAER",
    "AERLoss",
    "aer_term",
    "aer_ppo_loss",
    "make_loss_fn",
    "prepare_config",
    "AERCheckpointCallback",
    "AERTrainerMixin",
    "AERPPOTrainerMixin",
    "aer_trainer_class",
    "install",
    "WithAER",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

COEF_KEY = "aer_coef"
METRIC_PREFIX = "actor/aer/"
# v1 trainer modes this adapter is tested with. The async modes update the policy on
# rollouts of older weights and (separate_async) once per mini-batch; not covered.
SUPPORTED_V1_MODES = ("sync",)


# ----------------------------------------------------------------------------------------------
# configuration


def prepare_config(config: Any) -> AERConfig:
    """Check a verl ``ppo_trainer`` config for AER, fix what is safe to fix; return the AER settings.

    Called by the launcher before Ray starts, and by the AER trainers when they
    are built, so a configuration AER cannot work with fails before any rollout.

    - ``actor_rollout_ref.actor.calculate_entropy=False`` (verl's default) is
      turned on, with a log line: the AER term needs the entropy in the actor update.
    - ``actor_rollout_ref.actor.entropy_coeff != 0``: ValueError (verl would add
      its own constant-coefficient bonus on top of AER's).
    - ``algorithm.rollout_correction.bypass_mode=True``: ValueError (verl then
      skips the old-log-prob pass, where AER measures the step's entropy).
    - v1 trainer mode other than :data:`SUPPORTED_V1_MODES`: ValueError.
    - the ``aer`` section (``+aer.<field>=...``) must hold :class:`AERConfig`
      fields; unknown or bad values raise before anything starts.
    """
    from omegaconf import OmegaConf, open_dict

    actor = config.actor_rollout_ref.actor
    if float(actor.entropy_coeff) != 0.0:
        raise ValueError(
            f"AER: actor_rollout_ref.actor.entropy_coeff must be 0 (got {actor.entropy_coeff}): verl would add its "
            "own constant entropy bonus on top of AER's. Set actor_rollout_ref.actor.entropy_coeff=0."
        )
    correction = config.algorithm.get("rollout_correction", None)
    if correction is not None and correction.get("bypass_mode", False):
        raise ValueError(
            "AER: algorithm.rollout_correction.bypass_mode=True skips the old-log-prob pass, where AER measures "
            "each step's entropy, so the coefficient would never move. Set "
            "algorithm.rollout_correction.bypass_mode=False."
        )
    trainer = config.trainer
    mode = trainer.get("v1", {}).get("trainer_mode", "sync")
    if trainer.get("use_v1", True) and mode not in SUPPORTED_V1_MODES:
        raise ValueError(
            f"AER: trainer.v1.trainer_mode={mode} is not supported (supported: {', '.join(SUPPORTED_V1_MODES)}); "
            "set trainer.v1.trainer_mode=sync, or trainer.use_v1=False for the legacy trainer."
        )
    section = config.get("aer", None)
    settings = {} if section is None else OmegaConf.to_container(section, resolve=True)
    if not isinstance(settings, dict):
        raise TypeError(f"AER: the config's aer section must be a mapping of AERConfig fields, got {settings!r}")
    known = set(AERConfig.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"AER: unknown setting(s) aer.{', aer.'.join(unknown)}; known: {', '.join(sorted(known))}")
    aer_config = AERConfig(**settings)
    as_regularizer(aer_config)  # builds the controllers: bad values raise here, before any rollout
    if not actor.calculate_entropy:
        with open_dict(actor):
            actor.calculate_entropy = True
        logger.warning(
            "AER: set actor_rollout_ref.actor.calculate_entropy=True (the AER term needs the token entropy in the "
            "actor update)"
        )
    return aer_config


# ----------------------------------------------------------------------------------------------
# driver side


def response_scores(batch: DataProto) -> Tensor:
    """One verifiable score per response: ``token_level_scores`` summed over tokens, as GRPO does."""
    scores = batch.batch["token_level_scores"]
    return scores.sum(dim=-1) if scores.dim() == 2 else scores


class VerlAER:
    """Driver-side AER state for verl: one object in the trainer process.

    Args:
        regularizer: an :class:`AdaptiveEntropyRegularizer`, an :class:`AERConfig`,
            or None for the defaults.
        prefix: metric name prefix (driver metrics and the worker's ``bonus``),
            verl's ``actor/`` naming by default.
    """

    def __init__(
        self, regularizer: AdaptiveEntropyRegularizer | AERConfig | None = None, *, prefix: str = METRIC_PREFIX
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.regularizer = as_regularizer(regularizer)
        self.prefix = prefix

    def update(self, entropys: Tensor, response_mask: Tensor) -> dict[str, float]:
        """Once per step, before the coefficients: the batch's token-mean entropy to the controllers.

        ``entropys[N, T]`` (nats) and ``response_mask[N, T]`` of the whole batch,
        which the driver holds, so the mean is exact without any reduction.
        Returns the metrics.
        """
        entropy = masked_mean(entropys, response_mask)
        return self.regularizer.update(entropy, prefix=self.prefix)

    def coefficients(
        self, scores: Tensor, uid: np.ndarray, valid: np.ndarray | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Per-response coefficients ``[N]`` float32 (``alpha * w_i``) and the metrics.

        ``scores[N]``: one verifiable score per response; ``uid[N]``: its prompt.
        ``valid[N]`` (bool, default all): rows left out (v1's padding samples) get
        coefficient 0 and take no part in the allocation (so they do not shift
        the mean-1 normalization of the weights).
        """
        n = len(uid)
        valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if valid.shape != (n,) or scores.shape != (n,):
            raise ValueError(
                f"scores {tuple(scores.shape)}, uid ({n},) and valid {valid.shape} must all be one per response"
            )
        coef = torch.zeros(n, dtype=torch.float32, device=scores.device)
        if valid.any():
            index = torch.from_numpy(np.flatnonzero(valid)).to(scores.device)
            coef[index] = self.regularizer.coefficients(scores[index], np.asarray(uid, dtype=object)[valid]).float()
        out = self.regularizer.metrics(self.prefix)
        out[f"{self.prefix}coef_mean"] = float(coef[torch.from_numpy(valid)].mean()) if valid.any() else 0.0
        return coef, out

    def attach(self, batch: DataProto) -> dict[str, float]:
        """Write ``batch.batch["aer_coef"]`` (``[N]`` float32, ``alpha * w_i``); returns the metrics."""
        uid = batch.non_tensor_batch.get("uid")
        if uid is None:
            raise KeyError("batch.non_tensor_batch has no 'uid': AER groups responses by prompt uid")
        coef, out = self.coefficients(response_scores(batch), np.asarray(uid, dtype=object))
        batch.batch[COEF_KEY] = coef
        return out

    def loss_fn(self, actor_config: Any, distillation_config: Any = None) -> AERLoss:
        """The worker loss for ``actor_rollout_wg.set_loss_fn``; see :func:`make_loss_fn`."""
        return make_loss_fn(actor_config, distillation_config, prefix=self.prefix)

    def save(self, global_step_folder: str | os.PathLike[str]) -> str:
        """Save the state as ``global_step_folder/aer_state.json``."""
        return save_state(self.regularizer, global_step_folder)

    def load(self, global_step_folder: str | os.PathLike[str], *, missing_ok: bool = False) -> bool:
        """Restore the state saved by :meth:`save`; see :func:`entropy_reg.integrations.load_state`."""
        return load_state(self.regularizer, global_step_folder, missing_ok=missing_ok)


def _aer_of(config: Any, aer: VerlAER | AERConfig | None) -> VerlAER:
    """The trainer's :class:`VerlAER`: the one given, else from the config's checked ``aer`` section."""
    settings = prepare_config(config)
    if isinstance(aer, VerlAER):
        return aer
    return VerlAER(settings if aer is None else aer)


def _resume_folder(trainer_config: Any, global_steps: int) -> str:
    """The ``global_step_N`` folder verl resumed from (relative paths are taken from the cwd, as verl does)."""
    if trainer_config.resume_mode == "resume_path":
        return os.path.abspath(trainer_config.resume_from_path)
    return os.path.join(os.path.abspath(trainer_config.default_local_dir), f"global_step_{global_steps}")


def _load_on_resume(trainer: Any) -> None:
    """After verl's ``_load_checkpoint``: restore AER's state when verl resumed (``global_steps > 0``)."""
    if trainer.global_steps > 0:
        folder = _resume_folder(trainer.config.trainer, trainer.global_steps)
        if not trainer.aer.load(folder, missing_ok=True):
            logger.warning("AER: %s has no AER state (saved without AER?); the target is measured anew", folder)


def _install_loss(trainer: Any) -> None:
    """The AER loss on the trainer's actor workers, once verl has built them (and set its own loss)."""
    from verl.utils.config import omega_conf_to_dataclass

    actor_config = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    trainer.actor_rollout_wg.set_loss_fn(trainer.aer.loss_fn(actor_config, trainer.config.get("distillation")))


class AERCheckpointCallback:
    """verl checkpoint callback (``trainer.checkpoint_callback_class``) that saves the trainer's AER state.

    ``on_save`` writes ``checkpoint_dir/aer_state.json`` from ``trainer.aer``,
    then calls ``inner`` (the callback verl built from the user's
    ``trainer.checkpoint_callback_class``, if any), so both run.
    """

    def __init__(self, config: Any = None, inner: Any = None) -> None:
        self.config = config
        self.inner = inner

    def on_save(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs: Any):
        aer = getattr(trainer, "aer", None)
        if not isinstance(aer, VerlAER):
            raise TypeError(f"AERCheckpointCallback: the trainer has no VerlAER at .aer ({type(trainer).__name__})")
        aer.save(checkpoint_dir)
        if self.inner is not None:
            self.inner.on_save(
                trainer=trainer, global_step=global_step, checkpoint_dir=checkpoint_dir, async_save=async_save,
                **kwargs,
            )


# ----------------------------------------------------------------------------------------------
# worker side


def _global_batch_info(config: Any, data: TensorDict) -> dict[str, Any]:
    """The four numbers verl's ``ppo_loss`` normalizes by: from the micro-batch (set by the engine) and the config."""
    return {
        "dp_size": data["dp_size"],
        "batch_num_tokens": data["batch_num_tokens"],
        "global_batch_size": data["global_batch_size"],
        "loss_scale_factor": config.loss_scale_factor,
    }


def aer_term(
    config: Any, model_output: dict[str, Any], data: TensorDict, *, prefix: str = METRIC_PREFIX
) -> tuple[Tensor, dict[str, Metric]]:
    """The AER term to ADD to verl's actor loss, ``-agg_loss(c_i * H_it)``, and its metric ``{prefix}bonus``.

    ``data[COEF_KEY]`` holds the per-response coefficients written on the
    driver; ``model_output["entropy"]`` the token entropy (nested over prompt +
    response, or packed), which ``no_padding_2_padding`` turns into
    ``[B, T_response]`` as ``ppo_loss`` does.
    """
    entropy = model_output.get("entropy")
    if entropy is None:
        raise ValueError(
            "AER: model_output has no 'entropy': set actor_rollout_ref.actor.calculate_entropy=True "
            "(prepare_config does this)"
        )
    if COEF_KEY not in data.keys():
        raise KeyError(
            f"AER: the actor batch has no {COEF_KEY!r}: the driver must write it before update_actor "
            "(launch with python -m entropy_reg.integrations.verl, or call VerlAER.attach)"
        )
    info = _global_batch_info(config, data)
    entropy = no_padding_2_padding(entropy, data)
    fields = data.select("response_mask", COEF_KEY).to_padded_tensor()
    coef = fields[COEF_KEY].to(device=entropy.device, dtype=entropy.dtype)
    bonus = agg_loss(
        loss_mat=entropy * coef.unsqueeze(-1),
        loss_mask=fields["response_mask"].to(torch.bool),
        loss_agg_mode=config.loss_agg_mode,
        **info,
    )
    # verl's rule for its loss metrics: SUM when the loss is normalized by global counts.
    global_norm = info["dp_size"] > 1 or any(
        info[k] is not None for k in ("batch_num_tokens", "global_batch_size", "loss_scale_factor")
    )
    aggregation = AggregationType.SUM if global_norm else AggregationType.MEAN
    return -bonus, {f"{prefix}bonus": Metric(value=bonus.detach(), aggregation=aggregation)}


def aer_ppo_loss(
    config: Any, model_output: dict[str, Any], data: TensorDict, dp_group: Any = None, *, prefix: str = METRIC_PREFIX
):
    """verl's ``ppo_loss`` plus :func:`aer_term`; same signature and return value ``(loss, metrics)``."""
    loss, metrics = ppo_loss(config, model_output, data, dp_group=dp_group)
    term, term_metrics = aer_term(config, model_output, data, prefix=prefix)
    metrics.update(term_metrics)
    return loss + term, metrics


class AERLoss:
    """A verl worker loss: ``base`` (the loss verl's worker would use) plus :func:`aer_term`.

    Called as verl's engines call a loss, ``(model_output=, data=, dp_group=)``.
    A call with ``student_logits`` (distillation's top-k logits processor) goes
    to ``base`` unchanged. Picklable, so Ray ships it to every worker.
    """

    def __init__(self, base: Callable[..., Any], config: Any, *, prefix: str = METRIC_PREFIX) -> None:
        self.base = base
        self.config = config
        self.prefix = prefix

    def __call__(self, model_output: Any = None, data: Any = None, dp_group: Any = None, **kwargs: Any):
        if kwargs.get("student_logits") is not None:
            return self.base(model_output=model_output, data=data, dp_group=dp_group, **kwargs)
        loss, metrics = self.base(model_output=model_output, data=data, dp_group=dp_group, **kwargs)
        term, term_metrics = aer_term(self.config, model_output, data, prefix=self.prefix)
        metrics.update(term_metrics)
        return loss + term, metrics


def make_loss_fn(actor_config: Any, distillation_config: Any = None, *, prefix: str = METRIC_PREFIX) -> AERLoss:
    """The worker loss for ``actor_rollout_wg.set_loss_fn``: verl's choice of actor loss plus the AER term.

    Chooses as verl's ``ActorRolloutRefWorker.init_model`` does:
    ``distillation_ppo_loss`` when ``distillation_config`` (the config's
    ``distillation`` section) is enabled, else ``ppo_loss``, both bound to
    ``actor_config``. Refuses ``entropy_coeff != 0`` (verl would add its own
    constant bonus on top of AER's) and ``calculate_entropy=False``.
    """
    from functools import partial

    if float(actor_config.entropy_coeff) != 0.0:
        raise ValueError(
            f"AER: actor_config.entropy_coeff must be 0 (got {actor_config.entropy_coeff}); "
            "set actor_rollout_ref.actor.entropy_coeff=0"
        )
    if not actor_config.calculate_entropy:  # else the first actor update fails, after a whole rollout
        raise ValueError(
            "AER: actor_config.calculate_entropy must be True (the AER term needs the entropy in the actor "
            "update); set actor_rollout_ref.actor.calculate_entropy=True, or call prepare_config(config) first"
        )
    from verl.trainer.distillation import distillation_ppo_loss, is_distillation_enabled

    if is_distillation_enabled(distillation_config):
        from omegaconf import DictConfig
        from verl.utils.config import omega_conf_to_dataclass

        # The worker converts the config's section itself; a DistillationConfig is taken as is.
        if isinstance(distillation_config, DictConfig):
            distillation_config = omega_conf_to_dataclass(distillation_config)
        base = partial(distillation_ppo_loss, config=actor_config, distillation_config=distillation_config)
    else:
        base = partial(ppo_loss, config=actor_config)
    return AERLoss(base, actor_config, prefix=prefix)


# ----------------------------------------------------------------------------------------------
# the trainers


class AERTrainerMixin:
    """AER for verl's legacy ``RayPPOTrainer`` (``trainer.use_v1=False``).

    ``class Trainer(AERTrainerMixin, RayPPOTrainer): ...``; the launcher builds
    one. Pass ``aer=`` (a :class:`VerlAER` or an :class:`AERConfig`), or leave
    it to the config's ``aer`` section. The mixin checks the config
    (:func:`prepare_config`) and extends five methods:

    - ``init_workers``: installs :func:`make_loss_fn` on the actor workers;
    - ``_compute_old_log_prob``: feeds the step's entropy to :meth:`VerlAER.update`;
    - ``_update_actor``: :meth:`VerlAER.attach` before the update, metrics after;
    - ``_save_checkpoint`` / ``_load_checkpoint``: ``aer_state.json`` in ``global_step_N/``.
    """

    def __init__(self, *args: Any, aer: VerlAER | AERConfig | None = None, **kwargs: Any) -> None:
        config = kwargs["config"] if "config" in kwargs else args[0]
        self.aer = _aer_of(config, aer)  # before verl's __init__: a bad config fails before anything is built
        super().__init__(*args, **kwargs)
        self.aer_checkpoint_callback = AERCheckpointCallback(config)
        self._aer_metrics: dict[str, float] = {}

    def init_workers(self) -> None:
        super().init_workers()
        _install_loss(self)

    def _compute_old_log_prob(self, batch: DataProto):
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        self._aer_metrics = self.aer.update(old_log_prob.batch["entropys"], batch.batch["response_mask"])
        return old_log_prob, mfu

    def _update_actor(self, batch: DataProto) -> DataProto:
        metrics = {**self._aer_metrics, **self.aer.attach(batch)}
        output = super()._update_actor(batch)
        output.meta_info["metrics"].update(metrics)
        return output

    def _save_checkpoint(self) -> None:
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        self.aer_checkpoint_callback.on_save(trainer=self, global_step=self.global_steps, checkpoint_dir=folder)

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        _load_on_resume(self)
        return result


class AERPPOTrainerMixin:
    """AER for verl's v1 trainers (``verl.trainer.ppo.v1``, TransferQueue batches as ``KVBatchMeta``).

    ``aer_trainer_class(PPOTrainerSync)`` builds the class; :func:`install`
    registers it under the trainer mode. The mixin checks the config
    (:func:`prepare_config`), wraps verl's checkpoint callback with
    :class:`AERCheckpointCallback`, and extends:

    - ``_setup``: installs :func:`make_loss_fn` on the actor workers;
    - ``_compute_old_log_prob``: the step's token-mean entropy over the real
      samples (not ``is_padding``) to :meth:`VerlAER.update`;
    - ``_update_actor``: writes ``aer_coef`` for every sample key before the update;
    - ``_load_checkpoint``: restores ``aer_state.json`` when verl resumes.
    """

    def __init__(self, config: Any, *args: Any, aer: VerlAER | AERConfig | None = None, **kwargs: Any) -> None:
        self.aer = _aer_of(config, aer)
        super().__init__(config, *args, **kwargs)
        self.checkpoint_callback = AERCheckpointCallback(config, inner=self.checkpoint_callback)

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
        entropy = _padded(data["entropy"])[real]
        mask = _padded(data["response_mask"])[real]
        metrics.update(self.aer.update(entropy, mask))
        return batch

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "rm_scores"])
        scores = _padded(data["rm_scores"]).sum(-1)
        # A non-tensor field comes back as a list, a LinkedList, a NonTensorStack or an array: list() takes all.
        uid = np.array(list(data["uid"]), dtype=object)
        coef, out = self.aer.coefficients(scores, uid, self._real_samples(batch))
        metrics.update(out)
        # The put returns the batch's metadata with aer_coef among its fields, so the update fetches it.
        batch = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict({COEF_KEY: coef}, batch_size=len(batch))
        )
        return super()._update_actor(batch, metrics=metrics)

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        _load_on_resume(self)
        return result


def _padded(values: Tensor) -> Tensor:
    """``[N, T]`` from a jagged ``[N, j]`` tensor (zeros after each row's end), or the tensor as is."""
    return values.to_padded_tensor(0) if values.is_nested else values


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


# ----------------------------------------------------------------------------------------------
# the launcher


def _install_in_actor(actor: Any, use_v1: bool, trainer_mode: str) -> str:
    """Run by ``__ray_call__`` inside the task-runner actor (``actor`` is the actor instance)."""
    return install(use_v1, trainer_mode).__name__


class WithAER:
    """Stands in for verl's task-runner class in ``run_ppo``: ``.remote()`` starts verl's own task
    runner, then installs AER inside its process (Ray's ``__ray_call__``) before ``run`` is sent."""

    def __init__(self, runner_cls: Any, use_v1: bool, trainer_mode: str) -> None:
        self.runner_cls = runner_cls
        self.use_v1 = use_v1
        self.trainer_mode = trainer_mode

    def options(self, **kwargs: Any) -> WithAER:
        return WithAER(self.runner_cls.options(**kwargs), self.use_v1, self.trainer_mode)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        import ray

        actor = self.runner_cls.remote(*args, **kwargs)
        name = ray.get(actor.__ray_call__.remote(_install_in_actor, self.use_v1, self.trainer_mode))
        logger.info("AER: the task runner will build %s", name)
        return actor


def run(config: Any) -> None:
    """What ``python -m entropy_reg.integrations.verl`` runs on verl's composed config.

    The steps of ``verl.trainer.main_ppo.main`` (device, ``validate_config``,
    ``run_ppo`` with the v1 or the legacy task runner), with :func:`prepare_config`
    first and AER installed in the task runner.
    """
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    prepare_config(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    use_v1 = bool(config.trainer.use_v1)
    if use_v1:
        runner = TaskRunnerV1
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner as runner
    run_ppo(config, task_runner_class=WithAER(runner, use_v1, str(config.trainer.v1.trainer_mode)))


def main() -> None:
    """Console entry: verl's Hydra config tree (``verl/trainer/config/ppo_trainer.yaml``) and overrides."""
    import hydra

    hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)(run)()
