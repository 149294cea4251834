"""``python -m entropy_reg.integrations.openrlhf``: OpenRLHF's ``train_ppo_ray`` with AER.

Every flag that is not ``--aer.<field>`` goes to ``openrlhf.cli.train_ppo_ray``
unchanged, which parses and checks it as usual. Before OpenRLHF starts Ray,
the launcher checks the AER settings and ``--actor.entropy_coef``, swaps the
classes in this process (:func:`~.hook.install`) and adds to the
``runtime_env`` of OpenRLHF's own ``ray.init`` the settings
(``env_vars[CONFIG_ENV]``) and the ``worker_process_setup_hook`` that swaps
them in every worker. Also works as the entrypoint of ``ray job submit``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import runpy
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Iterator, Sequence

from ...regularizer import AERConfig
from .config import CONFIG_ENV, config_to_env
from .hook import HOOK, install

__all__ = ["parse_args", "check_difficulty_signal", "runtime_env_with_aer", "main"]

OPENRLHF_MAIN = "openrlhf.cli.train_ppo_ray"
_PREFIX = "--aer."


def _flag_type(hint: Any) -> Any:
    """argparse ``type`` for one AERConfig field: its scalar type (None never comes from the command line)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if bool in options:
        return _as_bool
    for kind in (int, float):
        if kind in options:
            return kind
    return str


def _as_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _aer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m entropy_reg.integrations.openrlhf",
        description="OpenRLHF's train_ppo_ray with Adaptive Entropy Regularization. Flags other than --aer.* "
        f"go to {OPENRLHF_MAIN} (see its --help). --actor.entropy_coef must be 0 or left out.",
        add_help=False,
        allow_abbrev=False,  # a prefix of an AER flag must not swallow one of OpenRLHF's
    )
    parser.add_argument("--aer.help", action="help", help="show the AER flags and exit")
    hints = typing.get_type_hints(AERConfig)
    for f in fields(AERConfig):
        default = None if f.default is MISSING else f.default
        parser.add_argument(
            f"{_PREFIX}{f.name}", dest=f.name, type=_flag_type(hints[f.name]), default=default,
            metavar=f.name.upper(), help=f"AERConfig.{f.name} (default: {default})",
        )
    return parser


def parse_args(argv: Sequence[str]) -> tuple[AERConfig, list[str]]:
    """Split ``argv`` into the :class:`AERConfig` of its ``--aer.*`` flags and OpenRLHF's flags.

    Raises SystemExit (argparse's usage error) for a malformed or unknown
    ``--aer.*`` flag, ValueError for ``--actor.entropy_coef`` other than 0 and
    for a run whose rewards cannot tell solved from unsolved
    (:func:`check_difficulty_signal`); adds ``--actor.entropy_coef 0`` when
    absent (AER needs OpenRLHF to compute the entropy, and 0 adds no bonus of its own).
    """
    parser = _aer_parser()
    ours, rest = parser.parse_known_args(list(argv))
    stray = [a for a in rest if a.startswith(_PREFIX)]
    if stray:
        parser.error(f"unknown AER flag {stray[0]} (see --aer.help)")
    config = AERConfig(**vars(ours))
    threshold_given = any(a.split("=", 1)[0] == f"{_PREFIX}success_threshold" for a in argv)
    check_difficulty_signal(config, rest, threshold_given=threshold_given)
    coef = argparse.ArgumentParser(add_help=False)
    coef.add_argument("--actor.entropy_coef", dest="entropy_coef", type=float, default=None)
    given = coef.parse_known_args(rest)[0].entropy_coef
    if given is None:
        rest += ["--actor.entropy_coef", "0"]
    elif given != 0:
        raise ValueError(f"--actor.entropy_coef is {given}: AER replaces OpenRLHF's entropy bonus; set it to 0")
    return config, rest


def check_difficulty_signal(config: AERConfig, openrlhf_argv: Sequence[str], *, threshold_given: bool) -> None:
    """Refuse, before Ray starts, rewards from which AER's difficulty weights would mean nothing.

    - ``--rollout.n_samples_per_prompt 1`` (OpenRLHF's default): each prompt's
      accuracy is 0 or 1, so a difficulty rule puts the whole bonus on the
      failed samples; only ``--aer.difficulty_rule uniform`` (no difficulty) runs.
    - rewards from a reward model (``--reward.model_name_or_path`` with neither
      ``--reward.remote_url`` nor ``--train.agent_func_path``): a score has no
      natural line between solved and unsolved, so ``--aer.success_threshold``
      must be given on the command line (or the rule be ``uniform``). A remote
      reward function is taken to return verifier scores.

    ValueError with the reason and the fix.
    """
    if config.difficulty_rule == "uniform":
        return
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--rollout.n_samples_per_prompt", dest="n", type=int, default=1)
    for flag in ("--reward.model_name_or_path", "--reward.remote_url", "--train.agent_func_path"):
        parser.add_argument(flag, dest=flag[2:].replace(".", "_"), default=None)
    args = parser.parse_known_args(list(openrlhf_argv))[0]
    if args.n == 1:
        raise ValueError(
            "--rollout.n_samples_per_prompt is 1: each prompt's accuracy is then 0 or 1, so AER's difficulty "
            f"rule ({config.difficulty_rule}) puts the whole bonus on the failed samples. Sample several responses "
            "per prompt (e.g. --rollout.n_samples_per_prompt 8), or pass --aer.difficulty_rule uniform"
        )
    reward_model = args.reward_model_name_or_path and not (args.reward_remote_url or args.train_agent_func_path)
    if reward_model and not threshold_given:
        raise ValueError(
            "the rewards come from a reward model (--reward.model_name_or_path), whose scores have no natural line "
            "between solved and unsolved, and AER counts a sample as solved when its reward is above "
            f"--aer.success_threshold (default {config.success_threshold}). Pass --aer.success_threshold <the reward "
            "that means success>, or --aer.difficulty_rule uniform"
        )


def runtime_env_with_aer(runtime_env: dict[str, Any] | None, config_json: str) -> dict[str, Any]:
    """A copy of ``runtime_env`` plus AER's settings in ``env_vars`` and AER's setup hook."""
    env = dict(runtime_env or {})
    hook = env.get("worker_process_setup_hook")
    if hook not in (None, HOOK):
        raise ValueError(f"runtime_env already has a worker_process_setup_hook ({hook!r}); AER needs {HOOK!r}")
    env["env_vars"] = {**(env.get("env_vars") or {}), CONFIG_ENV: config_json}
    env["worker_process_setup_hook"] = HOOK
    return env


@contextlib.contextmanager
def _ray_init_with_aer(config_json: str) -> Iterator[None]:
    """OpenRLHF calls ``ray.init(runtime_env=...)`` itself: extend that call's runtime_env."""
    import ray

    original = ray.init

    @functools.wraps(original)
    def init(*args: Any, runtime_env: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return original(*args, runtime_env=runtime_env_with_aer(runtime_env, config_json), **kwargs)

    ray.init = init
    try:
        yield
    finally:
        ray.init = original


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``train_ppo_ray`` as ``__main__`` with ``argv`` (default ``sys.argv[1:]``) and AER."""
    try:
        config, rest = parse_args(sys.argv[1:] if argv is None else argv)
        config_json = config_to_env(config)  # checks every setting, named as typed
    except (TypeError, ValueError) as e:
        raise SystemExit(f"python -m entropy_reg.integrations.openrlhf: error: {e}") from None
    os.environ[CONFIG_ENV] = config_json  # the driver's own copy (a Ray worker gets the runtime_env's)
    install()  # train_ppo_ray imports PolicyModelActor by name: swap it here too
    sys.argv = [OPENRLHF_MAIN, *rest]
    with _ray_init_with_aer(config_json):
        runpy.run_module(OPENRLHF_MAIN, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
