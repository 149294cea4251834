"""AER for OpenRLHF 0.11.2: launch ``train_ppo_ray`` as usual, with AER in it.

    python -m entropy_reg.integrations.openrlhf <train_ppo_ray flags> --aer.target_ratio 0.5 ...

The launcher (:mod:`.__main__`) takes the ``--aer.*`` flags (the fields of
:class:`~entropy_reg.AERConfig`), hands every other flag to OpenRLHF's own
``openrlhf.cli.train_ppo_ray``, and adds to the Ray job's ``runtime_env`` the
settings (:mod:`.config`) and a ``worker_process_setup_hook`` (:mod:`.hook`)
that swaps three OpenRLHF classes for subclasses in every worker:

- :class:`~.maker.AERExperienceMaker` (driver, where prompt groups are whole):
  difficulty weights from the verifier's scores into ``experience.info``;
- :class:`~.actor.AERActorPPOTrainer` (each actor rank): the AER term added
  to the policy loss with its own normalization, and one collective-safe
  update of target and alpha per RL step, reported in OpenRLHF's status;
- :data:`~.actor.AERPolicyModelActor`: AER's state in DeepSpeed's
  ``client_states``, restored on ``--ckpt.load_enable``.

This package imports nothing from OpenRLHF; :mod:`.maker` and :mod:`.actor` do.
The tensor-level pieces (:func:`attach_weights`, :class:`OpenRLHFAER`) are
usable on their own.

Temperature: OpenRLHF 0.11.2's ``Actor.forward`` divides the logits by
``rollout.temperature`` before computing the entropy (earlier releases used
the raw logits). AER's target is anchored to the first entropy it measures,
so the controller is consistent either way; only the quantity controlled
differs (sampling policy vs raw policy).
"""

from __future__ import annotations

from .config import CONFIG_ENV, check_entropy_coef, config_from_env, config_to_env
from .core import METRIC_PREFIX, STATE_KEY, WEIGHT_KEY, OpenRLHFAER, attach_weights, prompt_groups, verifier_scores
from .hook import HOOK, install, uninstall

__all__ = [
    "WEIGHT_KEY",
    "STATE_KEY",
    "METRIC_PREFIX",
    "CONFIG_ENV",
    "HOOK",
    "prompt_groups",
    "verifier_scores",
    "attach_weights",
    "OpenRLHFAER",
    "config_to_env",
    "config_from_env",
    "check_entropy_coef",
    "install",
    "uninstall",
]
