"""The verl adapter's worker side: the actor loss with the AER term (what each worker imports).

:class:`AERLoss` wraps the loss verl's worker would use and adds

    L_aer = - agg_loss(c_i * H_it, response_mask, loss_agg_mode, dp_size, batch_num_tokens,
                       global_batch_size, loss_scale_factor)

with verl's ``agg_loss`` and the global counts verl's engine puts in the micro-batch, so the term
is normalized exactly like the policy loss. ``c_i`` travels with each sample as ``aer_coef``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tensordict import TensorDict
from torch import Tensor
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from .config import COEF_KEY, METRIC_PREFIX


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


class AERLoss:
    """A verl worker loss: ``base`` (the loss verl's worker would use) plus :func:`aer_term`.

    Called as verl's engines call a loss, ``(model_output=, data=, dp_group=)``.
    A call with ``student_logits`` (distillation's top-k logits processor) goes
    to ``base`` unchanged. Picklable, so Ray ships it to every worker.
    ``fused_entropy`` (``+aer.fused_entropy``): the engine serves this loss's
    log-probs and entropy from one kernel pass (:mod:`.fused`, installed in
    the process where this object is built or unpickled).
    """

    def __init__(
        self, base: Callable[..., Any], config: Any, *, prefix: str = METRIC_PREFIX, fused_entropy: bool = True
    ) -> None:
        self.base = base
        self.config = config
        self.prefix = prefix
        self.fused_entropy = fused_entropy
        self._install_fused()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._install_fused()  # in the Ray worker that received this loss

    def _install_fused(self) -> None:
        if self.fused_entropy:
            from .fused import install

            install()

    def __call__(self, model_output: Any = None, data: Any = None, dp_group: Any = None, **kwargs: Any):
        if kwargs.get("student_logits") is not None:
            return self.base(model_output=model_output, data=data, dp_group=dp_group, **kwargs)
        loss, metrics = self.base(model_output=model_output, data=data, dp_group=dp_group, **kwargs)
        term, term_metrics = aer_term(self.config, model_output, data, prefix=self.prefix)
        metrics.update(term_metrics)
        return loss + term, metrics


def make_loss_fn(
    actor_config: Any, distillation_config: Any = None, *, prefix: str = METRIC_PREFIX, fused_entropy: bool = True
) -> AERLoss:
    """The worker loss for ``actor_rollout_wg.set_loss_fn``: verl's choice of actor loss plus the AER term.

    Chooses as verl's ``ActorRolloutRefWorker.init_model`` does:
    ``distillation_ppo_loss`` when ``distillation_config`` (the config's
    ``distillation`` section) is enabled, else ``ppo_loss``, both bound to
    ``actor_config``. Refuses ``entropy_coeff != 0`` (verl would add its own
    constant bonus on top of AER's) and ``calculate_entropy=False``. ``fused_entropy``: see
    :class:`AERLoss`.
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
    return AERLoss(base, actor_config, prefix=prefix, fused_entropy=fused_entropy)
