"""AER's settings on their way to OpenRLHF's Ray workers, and the entropy-bonus guard.

The launcher turns ``--aer.*`` flags into one :class:`AERConfig`, checks it,
and puts it in the environment variable :data:`CONFIG_ENV` of the Ray job's
``runtime_env``; every worker (the trainer actor that makes experiences, each
actor rank) builds its controllers from that one value, so the driver's
allocator and the actors' target and coefficient cannot disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any

from ...regularizer import AERConfig
from .. import checked_regularizer

__all__ = ["CONFIG_ENV", "config_to_env", "config_from_env", "check_entropy_coef"]

CONFIG_ENV = "ENTROPY_REG_OPENRLHF_AER"


def config_to_env(config: AERConfig) -> str:
    """``config`` as the JSON string :func:`config_from_env` reads back; checks it first."""
    if not isinstance(config, AERConfig):
        raise TypeError(f"config must be an AERConfig, got {type(config).__name__}")
    if callable(config.difficulty_rule):
        raise TypeError("config.difficulty_rule must be a rule name here: a callable cannot travel to Ray workers")
    # every setting checked before any worker starts, errors naming the launcher's flags
    checked_regularizer(config, lambda field: f"--aer.{field}")
    return json.dumps({f.name: getattr(config, f.name) for f in fields(AERConfig)}, allow_nan=False)


def config_from_env(environ: Any = None) -> AERConfig:
    """The :class:`AERConfig` in ``environ[CONFIG_ENV]`` (default ``os.environ``).

    Unset, it raises RuntimeError: a worker with AER's classes but without the
    launcher's settings would otherwise run on defaults nobody chose.
    """
    env = os.environ if environ is None else environ
    raw = env.get(CONFIG_ENV)
    if raw is None:
        raise RuntimeError(
            f"AER: this process has AER's OpenRLHF classes but not AER's settings ({CONFIG_ENV} is unset): "
            "OpenRLHF was not started by AER's launcher. Launch with python -m entropy_reg.integrations.openrlhf "
            "<train_ppo_ray flags> --aer.<setting> <value> ..."
        )
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_ENV} is not JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{CONFIG_ENV} must hold a JSON object, got {type(settings).__name__}")
    unknown = set(settings) - {f.name for f in fields(AERConfig)}
    if unknown:
        raise ValueError(f"{CONFIG_ENV} has unknown AERConfig fields {sorted(unknown)}")
    return AERConfig(**settings)


def check_entropy_coef(args: Any) -> None:
    """Refuse OpenRLHF's own entropy bonus beside AER; turn entropy on when it is off.

    ``args.actor.entropy_coef`` (``--actor.entropy_coef``): a nonzero value
    would add OpenRLHF's bonus on top of AER's term, so it raises ValueError.
    None (OpenRLHF's default) becomes 0.0: with None the actor does not return
    ``output.entropy``; with 0 it does, and adds no bonus of its own.
    """
    coef = args.actor.entropy_coef
    if coef is None:
        args.actor.entropy_coef = 0.0
    elif coef != 0:
        raise ValueError(
            f"--actor.entropy_coef is {coef}: AER replaces OpenRLHF's entropy bonus; "
            "set it to 0 or leave it out, and tune AER with the --aer.* flags"
        )
