"""The verl launcher: ``python -m entropy_reg.integrations.verl <verl overrides> +aer.<field>=...``.

Against verl 0.9.1's own Hydra config tree (``verl/trainer/config/ppo_trainer.yaml``), its
``validate_config`` and task runners. No Ray cluster starts: ``run_ppo`` (which would start Ray
and send the task runner its ``run``) is replaced by a recorder, and the task-runner actor by an
object with the two parts of Ray's actor contract the launcher uses (``.remote()`` and
``__ray_call__``, which runs a function on the actor instance in its process).
"""

from __future__ import annotations

import copy
import logging
import sys

import pytest

pytest.importorskip("verl", reason="install the extra: pip install 'entropy-reg[verl]'")

import yaml  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

import entropy_reg.integrations.verl as aer_verl  # noqa: E402
from entropy_reg.integrations.verl.driver import verl_aer  # noqa: E402
from entropy_reg import AERConfig  # noqa: E402


@pytest.fixture
def hydra_module():
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        yield


GRPO = [
    "algorithm.adv_estimator=grpo", "data.train_batch_size=8", "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2", "trainer.n_gpus_per_node=1",
    "actor_rollout_ref.actor.use_kl_loss=False",
]


_BASE: list = []


def cfg(*overrides: str):
    """verl's composition of ppo_trainer.yaml with GRPO (composed once: it takes seconds), then
    ``key=value`` / ``+key=value`` overrides applied with OmegaConf as Hydra would."""
    from omegaconf import OmegaConf

    if not _BASE:
        _BASE.append(compose(config_name="ppo_trainer", overrides=GRPO))
    config = copy.deepcopy(_BASE[0])
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(config, key.lstrip("+"), yaml.safe_load(value), force_add=key.startswith("+"))
    return config


def test_prepare_config_turns_entropy_on_and_reads_the_aer_section(hydra_module, caplog):
    config = cfg("+aer.target_ratio=0.4", "+aer.coef_max=0.003")
    assert config.actor_rollout_ref.actor.calculate_entropy is False  # verl's default
    with caplog.at_level(logging.WARNING, logger="entropy_reg.integrations.verl"):
        settings = aer_verl.prepare_config(config)
    assert settings == AERConfig(target_ratio=0.4, coef_max=0.003)
    assert config.actor_rollout_ref.actor.calculate_entropy is True
    assert "calculate_entropy=True" in caplog.text
    assert aer_verl.prepare_config(cfg()) == AERConfig()  # no aer section: the defaults


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("actor_rollout_ref.actor.entropy_coeff=0.001", "entropy_coeff must be 0"),
        ("algorithm.rollout_correction.bypass_mode=True", "bypass_mode=True skips the old-log-prob pass"),
        ("trainer.v1.trainer_mode=colocate_async", "trainer_mode=colocate_async is not supported"),
        ("trainer.v1.trainer_mode=separate_async", "trainer_mode=separate_async is not supported"),
        ("+aer.no_such_setting=1", "unknown setting.*aer.no_such_setting"),
        ("+aer.target_ratio=-0.5", "ratio"),
    ],
)
def test_prepare_config_refuses_what_aer_cannot_work_with(hydra_module, override, match):
    config = cfg(override)
    with pytest.raises(ValueError, match=match):
        aer_verl.prepare_config(config)
    assert config.actor_rollout_ref.actor.calculate_entropy is False  # nothing changed


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        # Issue 22 item 5: OmegaConf's own "Input cfg is not an OmegaConf config object" before.
        ("+aer=5", TypeError, r"aer section must hold settings, given as \+aer\.<field>=<value>.*got aer=5"),
        ("+aer=[1,2]", TypeError, r"\+aer\.<field>=<value>.*got aer=\[1, 2\]"),
        # The setting as the user typed it, not the component's parameter (max_value, ratio).
        ("+aer.coef_max=-1.0", ValueError, r"^\+aer\.coef_max must be >= 0\.0, got -1\.0$"),
        ("+aer.target_ratio=-0.5", ValueError, r"^\+aer\.target_ratio must be > 0"),
        ("+aer.coef_min=0.5", ValueError, r"^\+aer\.coef_min \(0\.5\) must be <= \+aer\.coef_max \(0\.01\)$"),
        ("+aer.score_field=3", TypeError, r"\+aer\.score_field must be a field name"),
    ],
)
def test_a_malformed_aer_section_names_the_aer_setting(hydra_module, override, error, match):
    config = cfg(override)
    with pytest.raises(error, match=match):
        aer_verl.prepare_config(config)
    assert config.actor_rollout_ref.actor.calculate_entropy is False  # nothing changed


def test_score_field_is_the_adapters_setting(hydra_module):
    """+aer.score_field is read by the adapter, not passed to AERConfig (which has no such field)."""
    config = cfg("+aer.score_field=acc", "+aer.coef_max=0.02")
    assert aer_verl.prepare_config(config) == AERConfig(coef_max=0.02)
    assert verl_aer(config, None).score_field == "acc"
    assert verl_aer(cfg(), None).score_field is None


def test_async_mode_name_is_irrelevant_on_the_legacy_trainer(hydra_module):
    aer_verl.prepare_config(cfg("trainer.use_v1=False", "trainer.v1.trainer_mode=colocate_async"))


def test_install_puts_aer_in_the_registry_and_the_legacy_runner(registry):
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    cls = aer_verl.install(True, "sync")
    assert get_trainer_cls("sync") is cls and issubclass(cls, PPOTrainerSync)
    assert issubclass(cls, aer_verl.AERPPOTrainerMixin)
    assert aer_verl.install(True, "sync") is cls  # idempotent: a second install changes nothing
    assert get_trainer_cls("colocate_async").__name__ == "PPOTrainerColocateAsync"  # other modes untouched
    legacy = aer_verl.install(False)
    assert main_ppo_v0.RayPPOTrainer is legacy and issubclass(legacy, RayPPOTrainer)
    assert issubclass(legacy, aer_verl.AERTrainerMixin) and aer_verl.install(False) is legacy


class FakeActor:
    """Ray's actor contract as the launcher uses it (Ray stubbed): methods behind ``.remote``."""

    log: list[str] = []

    def __init__(self) -> None:
        outer = self

        class _Call:
            @staticmethod
            def remote(fn, *args):
                FakeActor.log.append("install")
                return fn(outer, *args)

        class _Run:
            @staticmethod
            def remote(config):
                from verl.trainer.ppo.v1 import get_trainer_cls

                FakeActor.log.append(f"run:{get_trainer_cls('sync').__name__}")

        self.__ray_call__ = _Call()
        self.run = _Run()


class FakeActorClass:
    def __init__(self) -> None:
        self.options_seen: dict = {}

    def options(self, **kwargs):
        self.options_seen.update(kwargs)
        return self

    def remote(self):
        FakeActor.log.append("start")
        return FakeActor()


def test_with_aer_installs_inside_the_task_runner_before_run(registry, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    FakeActor.log = []
    actor_cls = FakeActorClass()
    runner = aer_verl.WithAER(actor_cls, True, "sync").options(runtime_env={"nsight": {}})
    actor = runner.remote()
    actor.run.remote(None)
    assert FakeActor.log == ["start", "install", "run:AERPPOTrainerSync"]
    assert actor_cls.options_seen == {"runtime_env": {"nsight": {}}}


def test_run_hands_verls_task_runner_to_run_ppo(hydra_module, monkeypatch):
    import verl.trainer.main_ppo as main_ppo
    from verl.trainer.main_ppo_v0 import TaskRunner

    calls = []
    monkeypatch.setattr(main_ppo, "run_ppo", lambda config, task_runner_class: calls.append(task_runner_class))
    config = cfg()
    aer_verl.run(config)
    assert config.actor_rollout_ref.actor.calculate_entropy is True
    (runner,) = calls
    assert runner.runner_cls is main_ppo.TaskRunnerV1 and (runner.use_v1, runner.trainer_mode) == (True, "sync")
    aer_verl.run(cfg("trainer.use_v1=False"))
    assert calls[1].runner_cls is TaskRunner and calls[1].use_v1 is False
    with pytest.raises(ValueError, match="bypass_mode"):
        aer_verl.run(cfg("algorithm.rollout_correction.bypass_mode=True"))
    assert len(calls) == 2  # refused before run_ppo: no Ray, no rollout


def test_command_line_composes_verls_config_and_fails_fast(monkeypatch, capsys, tmp_path):
    """``python -m entropy_reg.integrations.verl ...`` in-process: Hydra on verl's config tree."""
    import verl.trainer.main_ppo as main_ppo

    monkeypatch.chdir(tmp_path)  # Hydra's run directory

    monkeypatch.setattr(main_ppo, "run_ppo", lambda config, task_runner_class: print("RUN_PPO", task_runner_class))
    monkeypatch.setattr(sys, "argv", ["entropy_reg.integrations.verl", *GRPO, "+aer.target_ratio=0.5",
                                      "hydra.run.dir=.", "hydra.output_subdir=null",
                                      "hydra/job_logging=disabled"])
    aer_verl.main()
    assert "RUN_PPO" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["entropy_reg.integrations.verl", *GRPO, "hydra.run.dir=.",
                                      "hydra.output_subdir=null", "hydra/job_logging=disabled",
                                      "actor_rollout_ref.actor.entropy_coeff=0.01"])
    with pytest.raises(SystemExit):
        aer_verl.main()
    assert "entropy_coeff must be 0" in capsys.readouterr().err


def example_overrides() -> list[str]:
    """The overrides examples/verl_qwen3_grpo_aer.sh passes, its shell variables at their defaults."""
    import pathlib
    import shlex

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "verl_qwen3_grpo_aer.sh"
    text = script.read_text()
    command = text[text.index("python -m entropy_reg.integrations.verl"):text.index('"$@"')]
    env = {"MODEL": "Qwen/Qwen3-1.7B", "DATA": "/data/gsm8k", "NGPUS": "8"}
    words = shlex.split(command.replace("\\\n", " "))[3:]  # after "python -m <module>"
    return [_expand(w, env) for w in words]


def _expand(word: str, env: dict[str, str]) -> str:
    for key, value in env.items():
        word = word.replace(f"${key}", value)
    return word


def test_example_script_is_a_valid_verl_command(hydra_module):
    """Every override of the example composes in verl's config tree, passes AER's checks and
    verl's own validate_config."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    overrides = example_overrides()
    assert "actor_rollout_ref.model.path=Qwen/Qwen3-1.7B" in overrides and "+aer.target_ratio=0.5" in overrides
    config = compose(config_name="ppo_trainer", overrides=overrides)
    assert aer_verl.prepare_config(config) == AERConfig(target_ratio=0.5, coef_max=0.005)
    assert config.actor_rollout_ref.rollout.name == "vllm" and config.trainer.use_v1
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def test_distillation_on_keeps_verls_distillation_loss(hydra_module):
    """With distillation on, the AER loss wraps distillation_ppo_loss bound to verl's own
    DistillationConfig (converted from the config's section, as the worker does); off, ppo_loss."""
    from verl.trainer.distillation import distillation_ppo_loss
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import DistillationConfig

    config = cfg("distillation.enabled=True", "distillation.teacher_models.teacher_model.model_path=/teacher")
    aer_verl.prepare_config(config)  # turns calculate_entropy on, as the launcher does
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    fn = aer_verl.VerlAER().loss_fn(actor, config.distillation)
    assert fn.base.func is distillation_ppo_loss and fn.base.keywords["config"] is actor
    distill = fn.base.keywords["distillation_config"]
    assert isinstance(distill, DistillationConfig) and distill.enabled
    assert distill.distillation_loss.loss_mode == config.distillation.distillation_loss.loss_mode
    assert aer_verl.VerlAER().loss_fn(actor, cfg().distillation).base.func.__name__ == "ppo_loss"
