"""``python -m entropy_reg.integrations.openrlhf``: OpenRLHF's own command plus the ``--aer.*`` flags.

:func:`test_launch_runs_openrlhf_main_with_the_hook` runs OpenRLHF 0.11.2's real
``train_ppo_ray`` as ``__main__`` (loaded from the wheel, see
``test_integration_openrlhf``): its own argparse flags, checks and ``train()``,
up to its ``ray.init``, which is replaced by a recorder that stops the run
(no Ray cluster starts, no model loads). :func:`test_ray_runs_the_hook_in_its_workers`
is the cheap Ray check: a real one-CPU local Ray, a task in a worker started
with the launcher's ``runtime_env``.
"""

from __future__ import annotations

import os
import sys

import pytest

from entropy_reg.integrations.openrlhf import CONFIG_ENV, HOOK, config_from_env, hook
from entropy_reg.integrations.openrlhf.__main__ import main, parse_args, runtime_env_with_aer
from entropy_reg.regularizer import AERConfig
from tests.test_integration_openrlhf import openrlhf

# Loading OpenRLHF's modules: a torch.jit deprecation (its utils) and an invalid escape (its math_utils).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]

OPENRLHF_FLAGS = [
    "--actor.model_name_or_path", "Qwen/Qwen2.5-0.5B", "--reward.remote_url", "http://localhost:5000/get_reward",
    "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
    "--rollout.batch_size", "8", "--actor.num_gpus_per_node", "1", "--reward.overlong_buffer_len", "512",
]


def test_parse_splits_aer_flags_from_openrlhf_flags():
    cfg, rest = parse_args([*OPENRLHF_FLAGS, "--aer.coef_max", "0.02", "--aer.difficulty_rule=threshold",
                            "--aer.normalize_weights", "false", "--aer.initial_entropy", "1.5"])
    assert cfg == AERConfig(coef_max=0.02, difficulty_rule="threshold", normalize_weights=False, initial_entropy=1.5)
    # AER needs OpenRLHF to compute the entropy: --actor.entropy_coef 0 (not its default None) is added.
    assert rest == [*OPENRLHF_FLAGS, "--actor.entropy_coef", "0"]
    cfg, rest = parse_args([*OPENRLHF_FLAGS, "--actor.entropy_coef=0"])
    assert cfg == AERConfig() and rest == [*OPENRLHF_FLAGS, "--actor.entropy_coef=0"]


def test_parse_refuses_what_it_cannot_honour(capsys):
    # Regression (issue 17, defect 3): both entropy bonuses used to apply silently.
    with pytest.raises(ValueError, match="entropy_coef is 0.001"):
        parse_args([*OPENRLHF_FLAGS, "--actor.entropy_coef", "0.001"])
    with pytest.raises(SystemExit):
        parse_args(["--aer.coef_maxx", "1"])  # a typo must not reach OpenRLHF as an unknown flag
    assert "unknown AER flag --aer.coef_maxx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--aer.warmup_steps", "2.5"])
    with pytest.raises(SystemExit, match="--aer.target_ratio must be > 0"):
        main([*OPENRLHF_FLAGS, "--aer.target_ratio", "-1"])  # checked before OpenRLHF or Ray start


@pytest.mark.parametrize(("flags", "match"), [
    # Issue 22 item 10: the message named the component's parameter (max_value), not the flag typed.
    (["--aer.coef_max", "-1"], r"error: --aer.coef_max must be >= 0.0, got -1.0$"),
    (["--aer.coef_min", "0.5"], r"--aer.coef_min \(0.5\) must be <= --aer.coef_max \(0.01\)$"),
    (["--aer.difficulty_threshold", "2"], r"--aer.difficulty_threshold must be <= 1.0"),
    (["--aer.final_ratio", "0.2"], r"--aer.schedule_steps must be >= 1 when --aer.final_ratio is given"),
])
def test_errors_name_the_flag_typed(flags, match):
    with pytest.raises(SystemExit, match=match):
        main([*OPENRLHF_FLAGS, *flags])


def _without(flags: list[str], name: str) -> list[str]:
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


@pytest.mark.parametrize(("flags", "match"), [
    # Issue 22 item 7: accuracy of one sample is 0 or 1; OpenRLHF's default n_samples_per_prompt is 1.
    ([*_without(OPENRLHF_FLAGS, "--rollout.n_samples_per_prompt")], "n_samples_per_prompt is 1"),
    ([*_without(OPENRLHF_FLAGS, "--rollout.n_samples_per_prompt"), "--rollout.n_samples_per_prompt=1",
      "--aer.success_threshold", "0.3"], "n_samples_per_prompt is 1"),
    # A reward model's scores: no natural success line, so the threshold must be the user's.
    ([*_without(OPENRLHF_FLAGS, "--reward.remote_url"), "--reward.model_name_or_path", "rm"],
     "rewards come from a reward model.*--aer.success_threshold"),
])
def test_refuses_rewards_that_cannot_tell_solved_from_unsolved(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_args(flags)
    with pytest.raises(SystemExit, match=match):  # before OpenRLHF parses anything or Ray starts
        main(flags)
    cfg, _ = parse_args([*flags, "--aer.difficulty_rule", "uniform"])  # no difficulty: nothing to tell
    assert cfg.difficulty_rule == "uniform"


def test_a_reward_model_runs_with_an_explicit_threshold():
    rm = [*_without(OPENRLHF_FLAGS, "--reward.remote_url"), "--reward.model_name_or_path", "rm"]
    cfg, _ = parse_args([*rm, "--aer.success_threshold=0.5"])  # the default's value, but chosen
    assert cfg.success_threshold == 0.5
    cfg, _ = parse_args([*rm, "--train.agent_func_path", "agent.py"])  # an agent's reward: verifier scores
    assert cfg == AERConfig()


def test_runtime_env_keeps_openrlhf_env_vars():
    env = runtime_env_with_aer({"env_vars": {"NCCL_DEBUG": "WARN"}}, '{"coef_max": 0.02}')
    assert env == {"env_vars": {"NCCL_DEBUG": "WARN", CONFIG_ENV: '{"coef_max": 0.02}'},
                   "worker_process_setup_hook": HOOK}
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        runtime_env_with_aer({"worker_process_setup_hook": "mine.setup"}, "{}")


class _RayInitCalled(Exception):
    pass


def test_launch_runs_openrlhf_main_with_the_hook(monkeypatch):
    o = openrlhf()
    import ray

    seen = {}

    def fake_init(*args, runtime_env=None, **kwargs):
        seen.update(runtime_env=runtime_env, argv=list(sys.argv), policy_actor=o.ppo_actor.PolicyModelActor)
        raise _RayInitCalled

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    try:
        with pytest.raises(_RayInitCalled):
            main([*OPENRLHF_FLAGS, "--aer.coef_max", "0.02", "--aer.target_ratio", "0.4"])
        # Driver side: train_ppo_ray's PolicyModelActor is AER's, and the settings are in this process.
        assert seen["policy_actor"] is o.actor.AERPolicyModelActor
        assert config_from_env() == AERConfig(coef_max=0.02, target_ratio=0.4)
    finally:
        hook.uninstall()
        monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert ray.init is fake_init  # the wrapper is gone once OpenRLHF's main returns
    # OpenRLHF parsed its own flags (an --aer.* flag would have stopped its argparse) ...
    assert seen["argv"][0].endswith("openrlhf/cli/train_ppo_ray.py")  # runpy's argv[0]: the module's file
    assert seen["argv"][1:] == [*OPENRLHF_FLAGS, "--actor.entropy_coef", "0"]
    # ... and its ray.init got its own env_vars plus AER's settings and the setup hook for every worker.
    env = seen["runtime_env"]
    assert env["worker_process_setup_hook"] == HOOK
    assert {"TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"} <= set(env["env_vars"])
    assert config_from_env(env["env_vars"]) == AERConfig(coef_max=0.02, target_ratio=0.4)


def _probe():
    """In the Ray worker: was the hook run, with which settings, and what do OpenRLHF's names hold
    once its modules are imported (by this worker, for the first time, from the wheel)?"""
    from entropy_reg.integrations.openrlhf import config_from_env, hook
    from tests.test_integration_openrlhf import load_openrlhf_modules

    before = hook.installed(), "openrlhf" in sys.modules, config_from_env().coef_max
    load_openrlhf_modules()
    trainer, actor = sys.modules["openrlhf.trainer.ppo_trainer"], sys.modules["openrlhf.trainer.ray.ppo_actor"]
    return before, (trainer.RemoteExperienceMaker.__name__, actor.ActorPPOTrainer.__name__,
                    actor.PolicyModelActor.__ray_actor_class__.__name__)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, when it starts
def test_ray_runs_the_hook_in_its_workers():
    """A real (local, one CPU) Ray: a worker started with the launcher's runtime_env runs the hook,
    and OpenRLHF's modules imported there afterwards hold AER's classes."""
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    env = runtime_env_with_aer(None, '{"coef_max": 0.03}')
    env["env_vars"]["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    ray.init(num_cpus=1, include_dashboard=False, runtime_env=env, log_to_driver=False)
    try:
        before, names = ray.get(ray.remote(_probe).remote(), timeout=300)
    finally:
        ray.shutdown()
    assert before == (True, False, 0.03)  # installed, and OpenRLHF not imported by the hook
    assert names == ("AERExperienceMaker", "AERActorPPOTrainer", "_AERPolicyModelActor")
