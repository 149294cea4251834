"""``python -m entropy_reg.integrations.verl``: verl's ``main_ppo`` pipeline with AER in the task runner."""

from __future__ import annotations

import logging
from typing import Any

from .config import prepare_config
from .trainers import install

logger = logging.getLogger(__name__)


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
