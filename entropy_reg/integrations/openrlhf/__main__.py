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

__all__ = ["parse_args", "runtime_env_with_aer", "main"]

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
    ``--aer.*`` flag and ValueError for ``--actor.entropy_coef`` other than 0;
    adds ``--actor.entropy_coef 0`` when absent (AER needs OpenRLHF to compute
    the entropy, and 0 adds no bonus of its own).
    """
    parser = _aer_parser()
    ours, rest = parser.parse_known_args(list(argv))
    stray = [a for a in rest if a.startswith(_PREFIX)]
    if stray:
        parser.error(f"unknown AER flag {stray[0]} (see --aer.help)")
    config = AERConfig(**vars(ours))
    coef = argparse.ArgumentParser(add_help=False)
    coef.add_argument("--actor.entropy_coef", dest="entropy_coef", type=float, default=None)
    given = coef.parse_known_args(rest)[0].entropy_coef
    if given is None:
        rest += ["--actor.entropy_coef", "0"]
    elif given != 0:
        raise ValueError(f"--actor.entropy_coef is {given}: AER replaces OpenRLHF's entropy bonus; set it to 0")
    return config, rest


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
        config_json = config_to_env(config)  # checks every setting before anything starts
    except (TypeError, ValueError) as e:
        raise SystemExit(f"python -m entropy_reg.integrations.openrlhf: error: {e}") from None
    os.environ[CONFIG_ENV] = config_json  # the driver's own copy (a Ray worker gets the runtime_env's)
    install()  # train_ppo_ray imports PolicyModelActor by name: swap it here too
    sys.argv = [OPENRLHF_MAIN, *rest]
    with _ray_init_with_aer(config_json):
        runpy.run_module(OPENRLHF_MAIN, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
