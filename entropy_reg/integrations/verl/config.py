"""The verl adapter's settings: the ``aer`` section of verl's config, checked before anything starts.

:func:`prepare_config` runs in the launcher before Ray starts and again when an AER trainer is built.
"""

from __future__ import annotations

import logging
from typing import Any

from ...regularizer import AERConfig
from .. import checked_regularizer

logger = logging.getLogger(__name__)

COEF_KEY = "aer_coef"
METRIC_PREFIX = "actor/aer/"
# v1 trainer modes this adapter is tested with. The async modes update the policy on
# rollouts of older weights and (separate_async) once per mini-batch; not covered.
SUPPORTED_V1_MODES = ("sync",)
# The per-sample correctness verl's DAPO reward managers keep in reward_extra_info, before their overlong
# penalty is added to the scores (a right answer that runs long must not count as a failure).
CORRECTNESS_FIELD = "acc"
# +aer.score_field value naming the summed token scores themselves (rm_scores / token_level_scores).
SCORES = "scores"
# Settings of the config's aer section that are this adapter's, not AERConfig fields.
VERL_SETTINGS = ("score_field",)
RESUME_SETTING = "+aer.reanchor_on_missing_state=true"


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
    - the ``aer`` section (``+aer.<field>=...``) must be a mapping of
      :class:`AERConfig` fields, plus this adapter's ``score_field`` (see
      :class:`VerlAER`); unknown or bad values raise, naming ``+aer.<field>``,
      before anything starts.
    """
    from omegaconf import open_dict

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
    settings = aer_section(config)
    known = set(AERConfig.__dataclass_fields__) | set(VERL_SETTINGS)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"AER: unknown setting(s) +aer.{', +aer.'.join(unknown)}; known: {', '.join(sorted(known))}")
    score_field = settings.pop("score_field", None)
    if score_field is not None and (not isinstance(score_field, str) or not score_field):
        raise TypeError(f"AER: +aer.score_field must be a field name (or {SCORES!r}), got {score_field!r}")
    aer_config = AERConfig(**settings)
    # Builds the controllers: bad values raise here, before any rollout, naming the +aer.* setting.
    checked_regularizer(aer_config, lambda field: f"+aer.{field}")
    if not actor.calculate_entropy:
        with open_dict(actor):
            actor.calculate_entropy = True
        logger.warning(
            "AER: set actor_rollout_ref.actor.calculate_entropy=True (the AER term needs the token entropy in the "
            "actor update)"
        )
    return aer_config


def aer_section(config: Any) -> dict[str, Any]:
    """The config's ``aer`` section as a plain dict ({} when absent); anything but a mapping raises TypeError."""
    from omegaconf import OmegaConf

    section = config.get("aer", None)
    if section is None:
        return {}
    if not OmegaConf.is_dict(section):  # e.g. +aer=5: the settings go one by one, +aer.<field>=<value>
        given = OmegaConf.to_container(section) if OmegaConf.is_config(section) else section
        raise TypeError(
            "AER: the config's aer section must hold settings, given as +aer.<field>=<value> "
            f"(e.g. +aer.target_ratio=0.5), got aer={given!r}"
        )
    return OmegaConf.to_container(section, resolve=True)
