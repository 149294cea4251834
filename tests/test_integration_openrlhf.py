"""AER in OpenRLHF 0.11.2, tested on OpenRLHF's own modules on the CPU.

OpenRLHF does not install without CUDA (it pins flash-attn and DeepSpeed), so
``make test`` downloads its wheel (no dependencies) into ``.cache/openrlhf`` and
:func:`openrlhf` imports the real modules from it: the experience maker and
its split, balancing, length penalties, the replay buffer, ``PolicyLoss`` and
``ActorPPOTrainer`` (``training_step`` and ``ppo_train``).

Stubbed, because they need CUDA: the ``deepspeed``, ``flash_attn`` and
``vllm`` packages (empty modules, present only while OpenRLHF's modules load;
nothing in these tests calls into them), OpenRLHF's ``Actor`` (a Hugging Face
model under DeepSpeed; :class:`TinyActor` takes its call and returns its
outputs), the DeepSpeed strategy (:class:`CPUStrategy`: backward,
all-reduce over gloo, no optimizer step so the reference sees the same
weights), ``torch.cuda.current_device`` and OpenRLHF's barrier-and-CUDA-sync.
"""

from __future__ import annotations

import glob
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from entropy_reg.difficulty import DifficultyAllocator
from entropy_reg.integrations.openrlhf import (
    CONFIG_ENV,
    STATE_KEY,
    WEIGHT_KEY,
    OpenRLHFAER,
    attach_weights,
    check_entropy_coef,
    config_from_env,
    config_to_env,
    prompt_groups,
    verifier_scores,
)
from entropy_reg.regularizer import AdaptiveEntropyRegularizer, AERConfig
from tests.ranks import run_ranks

N_SAMPLES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- references (float64, from the formulas)


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def linear_weights64(scores: torch.Tensor, group: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """AER's default rule: w = 1 - group accuracy (solved: score > threshold), scaled to mean 1."""
    solved = (scores.double() > threshold).double()
    acc = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, solved)
    acc = acc / torch.bincount(group).double()
    w = 1 - acc[group]
    return w / w.mean()


def aer_term64(h, mask, w, alpha, token_level, *, dp=1, tokens=None, seqs=None):
    """-alpha * agg(w_i * H_it): OpenRLHF's token reduction (sum / tokens * dp) or sequence
    reduction (sum over non-empty rows of the row's token mean / sequences * dp)."""
    m = mask.double()
    x = alpha * w.double()[:, None] * h.double() * m
    if token_level:
        return -(x.sum() / (m.sum() if tokens is None else tokens) * dp)
    n = m.sum(-1)
    per_seq = torch.where(n > 0, x.sum(-1) / n.clamp(min=1), torch.zeros_like(n))
    return -(per_seq.sum() / ((n > 0).sum() if seqs is None else seqs) * dp)


# ---------------------------------------------------------------- tensor-level pieces


@dataclass
class Exp:
    """The fields of OpenRLHF's ``Experience`` that the driver side reads."""

    rewards: torch.Tensor
    index: list
    scores: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def test_weights_come_from_verifier_scores_not_penalised_rewards():
    # Regression (issue 17, defect 1): prompt 0 is solved 4/4, but two answers were too long and
    # their rewards were length-penalised to 0.4, under the 0.5 threshold.
    scores = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32)
    rewards = scores.clone()
    rewards[[1, 3]] = 0.4
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    exps = [Exp(rewards[p].clone(), list(p), scores[p].clone()) for p in (order[:5], order[5:])]
    metrics = attach_weights(exps, N_SAMPLES, DifficultyAllocator())
    ref = linear_weights64(scores, torch.arange(12) // N_SAMPLES)
    for e in exps:
        torch.testing.assert_close(e.info[WEIGHT_KEY].double(), ref[e.index], rtol=1e-6, atol=0)
    assert ref[:4].eq(0).all()  # the solved group gets no bonus
    assert metrics["aer/difficulty/solved_groups"] == pytest.approx(1 / 3)
    # Without scores, info["reward"] (the reward before OpenRLHF's penalties) is the score.
    exps = [Exp(rewards[p].clone(), list(p), None, {"reward": scores[p].clone()}) for p in (order[:5], order[5:])]
    attach_weights(exps, N_SAMPLES, AdaptiveEntropyRegularizer())
    for e in exps:
        torch.testing.assert_close(e.info[WEIGHT_KEY].double(), ref[e.index], rtol=1e-6, atol=0)
    with pytest.raises(KeyError, match="scores"):
        verifier_scores(Exp(rewards, list(range(12))))
    with pytest.raises(TypeError, match="allocator"):
        attach_weights(exps, N_SAMPLES, AERConfig())
    with pytest.raises(ValueError, match=r"experiences\[0\] has 5 scores but its index has 4"):
        attach_weights([Exp(rewards[:5], [0, 1, 2, 3], scores[:5])], N_SAMPLES, DifficultyAllocator())
    assert prompt_groups([0, 3, 4, 11], 4).tolist() == [0, 0, 1, 2]


def make_micro_batch(seed: int = 1, b: int = 3, s: int = 10, a: int = 6, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, s - 1, v, generator=g) * 2).requires_grad_(True)  # output.entropy covers S-1 positions
    mask = torch.zeros(b, a, dtype=torch.bool)
    for i, n in enumerate([6, 2, 0][:b]):  # the last sample is fully masked
        mask[i, :n] = True
    weights = [torch.tensor(x) for x in (0.5, 2.0, 1.0)[:b]]  # as make_experience_batch re-batches info
    return logits, mask, weights


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("global_info", [False, True])
def test_loss_matches_reference_and_reaches_logits(token_level, global_info):
    logits, mask, weights = make_micro_batch()
    aer = OpenRLHFAER(AERConfig(coef_init=0.003), token_level_loss=token_level)
    info, kw = None, {}
    if global_info:  # this rank's share of a 2-rank step, as OpenRLHF's loss_batch_info gives it
        info = {"dp_size": 2, "batch_num_tokens": torch.tensor(20.0), "global_batch_size": torch.tensor(5.0)}
        kw = {"dp": 2, "tokens": 20.0, "seqs": 5.0}
    w = torch.tensor([float(x) for x in weights])
    term = aer.loss(entropy64(logits).float(), mask, weights, info)
    ref = aer_term64(entropy64(logits.detach())[:, -6:], mask, w, 0.003, token_level, **kw)
    assert term.item() == pytest.approx(ref.item(), rel=1e-5)
    (g,) = torch.autograd.grad(term, logits)
    leaf = logits.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(aer_term64(entropy64(leaf)[:, -6:], mask, w, 0.003, token_level, **kw), leaf)
    assert g.abs().sum() > 0 and g[2].abs().sum() == 0  # the fully masked sample gets no gradient
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-10)


def test_update_once_from_all_micro_batches_then_skips_an_empty_step():
    aer = OpenRLHFAER(AERConfig(coef_init=0.001, target_ratio=0.5))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    aer.loss(torch.tensor([[9.0, 1.0, 2.0, 99.0], [9.0, 4.0, 99.0, 99.0]]), mask, torch.ones(2))
    aer.loss(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), [1.0])
    m = aer.update()
    # token mean over both micro-batches: (1 + 2 + 4 + 1 + 1 + 1) / 6, prompt columns and padding excluded
    assert m["aer/entropy"] == pytest.approx(10 / 6) and m["aer/anchor"] == pytest.approx(10 / 6)
    assert m["aer/update_skipped"] == 0.0
    # Regression (defect 7): a step with no micro-batch (OpenRLHF allows it) raised; now alpha stays.
    before = aer.regularizer.state_dict()
    m = aer.update()
    assert m["aer/update_skipped"] == 1.0 and aer.regularizer.state_dict() == before and aer.window.empty
    with pytest.warns(DeprecationWarning, match="use update"):
        aer.step()


def test_client_states_round_trip_and_old_names():
    aer = OpenRLHFAER(AERConfig(coef_init=0.001))
    for h in (2.0, 0.3):
        aer.loss(torch.full((2, 4), h), torch.ones(2, 3, dtype=torch.bool), torch.ones(2))
        aer.update()
    client_states = aer.save({"consumed_samples": 64})
    assert client_states["consumed_samples"] == 64 and STATE_KEY in client_states
    resumed = OpenRLHFAER(AERConfig(coef_init=0.001))
    assert resumed.load(json.loads(json.dumps(client_states)))  # plain JSON: DeepSpeed pickles it as is
    assert resumed.regularizer.state_dict() == aer.regularizer.state_dict()
    assert not OpenRLHFAER().load({}) and not OpenRLHFAER().load(None)
    with pytest.warns(DeprecationWarning, match="use save"):
        assert STATE_KEY in aer.save_to({})
    with pytest.warns(DeprecationWarning, match="use load"):
        assert resumed.load_from(client_states)
    with pytest.raises(TypeError, match="client_states"):
        aer.save(None)


def test_bad_inputs_name_the_argument():
    aer = OpenRLHFAER()
    with pytest.raises(ValueError, match="weights"):
        aer.loss(torch.ones(2, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(3))
    with pytest.raises(ValueError, match="action_mask"):
        aer.loss(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.bool), torch.ones(2))
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        prompt_groups([0, 1], 0)
    with pytest.raises(TypeError, match="token_level_loss"):
        OpenRLHFAER(token_level_loss="token-mean")
    assert aer.window.empty  # nothing half-added by the failed calls


def test_config_travels_as_one_value():
    cfg = AERConfig(difficulty_rule="threshold", success_threshold=0.0, target_ratio=0.3, coef_lr=0.5)
    assert config_from_env({CONFIG_ENV: config_to_env(cfg)}) == cfg
    # Issue 22 item 8: without the launcher's settings a worker used to run on AERConfig() silently.
    with pytest.raises(RuntimeError, match=r"not started by AER's launcher.*python -m entropy_reg.integrations"):
        config_from_env({})
    with pytest.raises(ValueError, match="ratio must be > 0"):
        config_to_env(AERConfig(target_ratio=-1.0))  # checked before any worker starts
    with pytest.raises(TypeError, match="callable"):
        config_to_env(AERConfig(difficulty_rule=lambda acc: 1 - acc))
    with pytest.raises(ValueError, match="unknown AERConfig fields"):
        config_from_env({CONFIG_ENV: '{"coef_maxx": 1}'})


def test_entropy_coef_guard():
    # Regression (defect 3): a nonzero --actor.entropy_coef went through, adding both bonuses.
    args = SimpleNamespace(actor=SimpleNamespace(entropy_coef=0.01))
    with pytest.raises(ValueError, match="entropy_coef"):
        check_entropy_coef(args)
    args.actor.entropy_coef = None  # OpenRLHF's default: no output.entropy; 0 asks for it, adds nothing
    check_entropy_coef(args)
    assert args.actor.entropy_coef == 0.0


def test_install_imports_nothing_from_openrlhf():
    """The hook runs in every Ray worker, vLLM engines included: it must not import OpenRLHF or DeepSpeed."""
    import subprocess

    code = (
        "import sys\nfrom entropy_reg.integrations.openrlhf.hook import install, installed\ninstall()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('openrlhf', 'deepspeed', 'vllm'))\n"
        "assert installed() and not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_docs_openrlhf_example_lines_up_like_openrlhf():
    """docs/integrations.md's OpenRLHF example runs, with OpenRLHF 0.11.2's layout (defect 8: it sliced
    unshifted entropy against a response-only mask): output.entropy = H[:, :-1], action_mask [B, S-1]."""
    with open(os.path.join(ROOT, "docs", "integrations.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.rfind("```python", 0, readme.index("from entropy_reg.integrations.openrlhf import"))
    code = readme[start + len("```python"): readme.index("```", start + 3)]
    scope: dict = {}
    exec(compile(code, "docs/integrations.md", "exec"), scope)  # prints the update's metrics
    logits, mask, weights = scope["logits"], scope["mask"], scope["weights"]
    assert mask.shape == (8, logits.shape[1] - 1)
    h = entropy64(logits.detach())[:, :-1]  # position t predicts token t + 1, as OpenRLHF shifts
    ref = aer_term64(h, mask, weights, 1e-3, True)
    assert scope["term"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert scope["aer"].regularizer.last_entropy == pytest.approx(((h * mask).sum() / mask.sum()).item(), rel=1e-5)


# ---------------------------------------------------------------- OpenRLHF 0.11.2's own modules


_STUBBED = ("deepspeed", "flash_attn", "vllm")
_OPENRLHF_MODULES = (
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ppo_trainer",
    "openrlhf.trainer.ray.ppo_actor",
    "openrlhf.trainer.ray.ppo_critic",
    "openrlhf.utils.config",
)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for the CUDA-only packages: any attribute is a do-nothing class."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in _STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__, module.__version__ = [], "0.0"
        return module

    def exec_module(self, module):
        pass


def load_openrlhf_modules() -> None:
    """Import OpenRLHF 0.11.2's modules from the wheel (once per process), and nothing of AER's."""
    if _OPENRLHF_MODULES[-1] not in sys.modules:
        wheels = sorted(glob.glob(os.path.join(ROOT, ".cache", "openrlhf", "openrlhf-0.11.2-*.whl")))
        if not wheels:
            pytest.skip("OpenRLHF wheel not in .cache/openrlhf (make test downloads it)")
        purelib = os.path.join(wheels[0], "openrlhf-0.11.2.data", "purelib")
        finder = _StubFinder()
        sys.meta_path.insert(0, finder)
        sys.path.insert(0, purelib)
        try:
            for name in _OPENRLHF_MODULES:
                importlib.import_module(name)
        finally:
            # Stubs only while OpenRLHF loads: left behind, they would mislead libraries that probe for
            # deepspeed later in the session (transformers' find_spec). OpenRLHF's packages keep their zip paths.
            sys.meta_path.remove(finder)
            sys.path.remove(purelib)
            for name in [m for m in sys.modules if m.split(".")[0] in _STUBBED]:
                del sys.modules[name]


def openrlhf() -> SimpleNamespace:
    """OpenRLHF 0.11.2's modules from the wheel, and AER's subclasses of its classes."""
    load_openrlhf_modules()
    from entropy_reg.integrations.openrlhf import actor, maker

    m = sys.modules
    return SimpleNamespace(
        experience=m["openrlhf.trainer.ppo_utils.experience"],
        experience_maker=m["openrlhf.trainer.ppo_utils.experience_maker"],
        replay_buffer=m["openrlhf.trainer.ppo_utils.replay_buffer"],
        kl_controller=m["openrlhf.trainer.ppo_utils.kl_controller"],
        loss=m["openrlhf.models.loss"],
        ppo_actor=m["openrlhf.trainer.ray.ppo_actor"],
        config=m["openrlhf.utils.config"],
        maker=maker,
        actor=actor,
    )


def make_args(**dotted) -> SimpleNamespace:
    """OpenRLHF's nested ``args`` (its own ``hierarchize``) with the defaults of train_ppo_ray's flags used here."""
    flat = {
        "actor.eps_clip_low_high": (0.2, 0.2), "actor.dual_clip": None, "actor.loss_agg_mode": "token-mean",
        "actor.policy_loss_type": "ppo", "actor.entropy_coef": None, "actor.aux_loss_coef": 0.0,
        "actor.num_nodes": 1, "actor.num_gpus_per_node": 2,
        "algo.advantage.estimator": "group_norm", "algo.advantage.gamma": 1.0, "algo.advantage.lambd": 1.0,
        "algo.advantage.no_std_norm": False, "algo.advantage.is_correction_level": "off",
        "algo.advantage.is_correction_mode": "mask", "algo.advantage.is_correction_gating": "ratio",
        "algo.advantage.is_correction_threshold": [0.5, 5.0], "algo.kl.use_loss": False,
        "ds.packing_samples": False, "ds.tensor_parallel_size": 1, "ds.ring_attn_size": 1,
        "train.dynamic_batch_enable": False, "train.max_epochs": 1, "train.colocate_all": False,
        "train.async_enable": False, "train.batch_size": 4, "train.max_tokens_per_gpu": 64,
        "rollout.n_samples_per_prompt": N_SAMPLES, "rollout.micro_batch_size": 2, "rollout.batch_size": 3,
        "rollout.max_new_tokens": 8, "rollout.max_tokens_per_gpu": 40, "data.max_len": 16,
        "reward.overlong_buffer_len": 4.0, "reward.overlong_penalty_factor": 0.6,
        "reward.stop_properly_penalty_coef": None, "reward.clip_range": (-10, 10), "vllm.sync_backend": "nccl",
    }
    flat.update({k.replace("__", "."): v for k, v in dotted.items()})
    return openrlhf().config.hierarchize(SimpleNamespace(**flat))


# 3 prompts x 4 samples in prompt order: verifier scores, and response lengths (the overlong
# penalty of the flags above hits responses longer than 8 - 4 = 4 tokens, 0.6 at 8 tokens).
SCORES = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32)
RESPONSE_LEN = [3, 8, 2, 8, 4, 3, 6, 2, 5, 3, 4, 7]
PROMPT_LEN = [3, 3, 3, 3, 2, 2, 2, 2, 4, 4, 4, 4]
VOCAB = 13


def rollout_samples(o) -> list:
    """One OpenRLHF ``Experience`` per sample, shaped as its samples generator makes them.

    The first token is the sample's id (so any batch can be traced back); ``action_mask`` is
    ``[1, S-1]`` over the shifted sequence, prompt positions off.
    """
    g = torch.Generator().manual_seed(5)
    out = []
    for i, (p, r) in enumerate(zip(PROMPT_LEN, RESPONSE_LEN)):
        s = p + r
        seq = torch.randint(0, VOCAB, (1, s), generator=g)
        seq[0, 0] = i
        mask = torch.zeros(1, s - 1, dtype=torch.bool)
        mask[0, p - 1 :] = True
        score = SCORES[i : i + 1].clone()
        out.append(o.experience.Experience(
            sequences=seq, attention_mask=torch.ones(1, s, dtype=torch.long), action_mask=mask,
            rewards=score.clone(), scores=score.clone(), response_length=torch.tensor([float(r)]),
            truncated=torch.tensor([False]), total_length=torch.tensor([float(s)]),
            prompts=[f"p{i // N_SAMPLES}"], labels=[""], info={"reward": score.clone()},
        ))
    return out


class Tokenizer:
    pad_token_id = 0


def driver_experiences(monkeypatch, o, config: AERConfig, **args):
    """The driver's part of one RL step, on OpenRLHF's code: split, (model forwards: old log-probs
    from :class:`TinyActor`), AER's weights, length penalties, advantages, then balancing over 2 ranks."""
    monkeypatch.setenv(CONFIG_ENV, config_to_env(config))
    a = make_args(**args)
    strategy = SimpleNamespace(args=a)
    kl = o.kl_controller.FixedKLController(0.0)
    maker = o.maker.AERExperienceMaker(None, None, None, None, kl, strategy, Tokenizer())
    exps = maker.split_rollout_samples(rollout_samples(o))
    actor = TinyActor()
    with torch.no_grad():
        for e in exps:  # what make_experience attaches (the actor group's forward)
            e.action_log_probs = actor(e.sequences, e.action_mask)
            e.kl = torch.zeros_like(e.action_log_probs)
    exps = maker.compute_advantages_and_returns(exps)
    return exps, o.experience.balance_experiences(exps, a), a


class TinyActor(torch.nn.Module):
    """Stands in for OpenRLHF's ``Actor`` (a Hugging Face model under DeepSpeed): same call, same
    outputs, ``(action_log_probs [B, A], output)`` with ``output.entropy [B, S-1]`` when asked."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, 6, generator=g))
        self.head = torch.nn.Parameter(torch.randn(6, VOCAB, generator=g))
        self.asked_for_entropy: list[bool] = []

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False,
                return_entropy=False, **_):
        logits = self.emb[sequences] @ self.head  # [B, S, V]
        logp = logits.log_softmax(-1)
        token_logp = logp[:, :-1].gather(-1, sequences[:, 1:, None]).squeeze(-1)
        action_log_probs = token_logp[:, -action_mask.shape[1]:] * action_mask.float()
        if not return_output:
            return action_log_probs
        self.asked_for_entropy.append(return_entropy)
        output = SimpleNamespace()
        if return_entropy:
            output.entropy = -(logp.exp() * logp).sum(-1)[:, :-1]
        return action_log_probs, output


class CPUStrategy:
    """Stands in for OpenRLHF's DeepSpeed strategy: backward, all-reduce (gloo when initialized);
    no optimizer step, so every micro-batch sees the weights the reference sees."""

    ring_attn_group = None

    def __init__(self, args, gas: int = 1, mesh: bool = False) -> None:
        self.args, self.accumulated_gradient = args, gas
        if mesh:  # OpenRLHF's device mesh, whose "dp" group is the world here
            self.ds_device_mesh = {"dp": SimpleNamespace(get_group=lambda: None)}

    def backward(self, loss, model, optimizer):
        loss.backward()

    def optimizer_step(self, *a, **k):
        pass

    def get_grad_norm(self, model):
        return 0.0

    def is_rank_0(self):
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def all_reduce(self, data, op="mean"):
        if isinstance(data, dict):
            return {k: self.all_reduce(v, op) for k, v in data.items()}
        t = torch.as_tensor(data, dtype=torch.float64).clone()
        if torch.distributed.is_initialized():
            reduce_op = torch.distributed.ReduceOp
            torch.distributed.all_reduce(t, op=reduce_op.MAX if op == "max" else reduce_op.SUM)
            if op == "mean":
                t /= torch.distributed.get_world_size()
        return t if isinstance(data, torch.Tensor) else t.item()


def make_trainer(monkeypatch, o, config: AERConfig, args, *, gas: int = 1, mesh: bool = False):
    monkeypatch.setenv(CONFIG_ENV, config_to_env(config))
    monkeypatch.setattr(o.ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the replay buffer names cuda:0, unused
    trainer = o.actor.AERActorPPOTrainer(
        CPUStrategy(args, gas, mesh), TinyActor(), ema_model=None, actor_optim=None,
        actor_scheduler=SimpleNamespace(get_last_lr=lambda: [0.0]), micro_train_batch_size=2,
        dataloader_pin_memory=False,
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # ppo_train moves batches there
    return trainer


@pytest.fixture(scope="module")
def o():
    return openrlhf()


# Loading OpenRLHF's modules: a torch.jit deprecation (its utils) and an invalid escape (its math_utils).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]


@pytest.mark.parametrize("token_level", [True, False])
def test_matches_openrlhf_aggregate_loss(o, token_level):
    logits, mask, weights = make_micro_batch(seed=3)
    h = entropy64(logits).float()
    info = {"dp_size": 2, "batch_num_tokens": torch.tensor(17.0), "global_batch_size": torch.tensor(4.0)}
    ours = OpenRLHFAER(AERConfig(coef_init=0.002), token_level_loss=token_level).loss(h, mask, weights, info)
    c = 0.002 * torch.stack(weights).float()[:, None]
    theirs = -o.loss.aggregate_loss(h[:, -mask.shape[1]:] * c, mask, token_level_loss=token_level, **info)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_driver_weights_survive_split_balancing_and_the_replay_buffer(monkeypatch, o, dynamic):
    exps, balanced, args = driver_experiences(monkeypatch, o, AERConfig(), train__dynamic_batch_enable=dynamic)
    ref = linear_weights64(SCORES, torch.arange(12) // N_SAMPLES)
    acc = SCORES.reshape(-1, N_SAMPLES).double().mean(-1).mean().item()
    seen = []
    for e in exps:
        ids = e.sequences[:, 0]
        torch.testing.assert_close(e.info[WEIGHT_KEY].double(), ref[ids], rtol=1e-6, atol=0)
        acc_logged = e.info["aer/difficulty/accuracy"].double()
        torch.testing.assert_close(acc_logged, torch.full((len(ids),), acc, dtype=torch.float64))
        long_solved = [k for k, i in enumerate(ids.tolist()) if i < 4 and RESPONSE_LEN[i] == 8]
        seen += [e.rewards[k].item() for k in long_solved]
    # The scenario of defect 1: OpenRLHF did penalise the long correct answers of the solved prompt ...
    assert seen and all(r == pytest.approx(0.4) for r in seen)
    assert ref[:4].eq(0).all()  # ... and AER still counts that prompt as solved (no bonus).
    # Each rank's replay buffer re-batches single samples in a shuffled order: weights follow their samples.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    checked = 0
    for rank_exp in balanced:
        buf = o.replay_buffer.NaiveReplayBuffer(2, cpu_offload=False)
        buf.append(rank_exp)
        loader = torch.utils.data.DataLoader(buf, batch_size=2, shuffle=True, collate_fn=buf.collate_fn,
                                             generator=torch.Generator().manual_seed(1))
        for batch in loader:
            w = torch.stack([torch.as_tensor(x) for x in batch.info[WEIGHT_KEY]]).double()
            torch.testing.assert_close(w, ref[batch.sequences[:, 0]], rtol=1e-6, atol=0)
            checked += len(w)
    assert checked == 12


def test_driver_allocator_follows_the_config(monkeypatch, o):
    # Regression (defect 4): a hard-coded DifficultyAllocator("linear", success_threshold=0.5) ignored AERConfig.
    exps, _, _ = driver_experiences(monkeypatch, o, AERConfig(difficulty_rule="uniform"))
    assert all(torch.equal(e.info[WEIGHT_KEY], torch.ones(len(e.sequences))) for e in exps)
    exps, _, _ = driver_experiences(monkeypatch, o, AERConfig(success_threshold=0.0))  # scores > 0 solve
    ref = linear_weights64(SCORES, torch.arange(12) // N_SAMPLES, threshold=0.0)
    for e in exps:
        torch.testing.assert_close(e.info[WEIGHT_KEY].double(), ref[e.sequences[:, 0]], rtol=1e-6, atol=0)


def test_driver_refuses_openrlhf_entropy_bonus(monkeypatch, o):
    with pytest.raises(ValueError, match="entropy_coef"):
        driver_experiences(monkeypatch, o, AERConfig(), actor__entropy_coef=0.01)


def one_micro_batch(o, seed: int = 0):
    """Two samples of different lengths, right-padded as the replay buffer batches them."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 6)]
    prompt = [3, 2]
    items = []
    for i, (s, p) in enumerate(zip(seqs, prompt)):
        mask = torch.zeros(len(s) - 1, dtype=torch.bool)
        mask[p - 1 :] = True
        items.append(o.experience.Experience(
            sequences=s, attention_mask=torch.ones_like(s), action_mask=mask,
            action_log_probs=torch.zeros(len(s) - 1), advantages=torch.randn(len(s) - 1, generator=g),
            info={WEIGHT_KEY: torch.tensor([0.5, 1.5][i])},
        ))
    batch = o.experience.make_experience_batch(items)
    with torch.no_grad():
        batch.action_log_probs = TinyActor()(batch.sequences, batch.action_mask) - 0.1 * batch.action_mask
    return batch


LOSS_MODES = [("token-mean", "ppo", True), ("seq-mean-token-mean", "ppo", False), ("token-mean", "gspo", False)]


@pytest.mark.parametrize("agg,loss_type,token_level", LOSS_MODES)
@pytest.mark.parametrize("given_info", [False, True])
def test_training_step_adds_the_term_with_the_policy_loss_normalization(monkeypatch, o, agg, loss_type, token_level,
                                                                        given_info):
    """Gradient of OpenRLHF's training_step == gradient of (its PolicyLoss + AER's term in float64).

    Regression (defect 6): under seq-mean-token-mean and GSPO the recipe's term was token-level.
    """
    alpha = 0.05
    args = make_args(actor__loss_agg_mode=agg, actor__policy_loss_type=loss_type)
    trainer = make_trainer(monkeypatch, o, AERConfig(coef_init=alpha, coef_max=0.1), args)
    assert trainer.actor.asked_for_entropy == [] and args.actor.entropy_coef == 0.0
    batch = one_micro_batch(o)
    info = None
    kw = {}
    if given_info:  # this rank's share of a 2-rank optimizer step, as ppo_train computes it
        info = {"dp_size": 2, "batch_num_tokens": torch.tensor(19.0), "global_batch_size": torch.tensor(3.0)}
        kw = {"dp": 2, "tokens": 19.0, "seqs": 3.0}
    status = trainer.training_step(batch, 0.0, 0, info)
    assert trainer.actor.asked_for_entropy == [True]
    grads = [p.grad.double() for p in trainer.actor.parameters()]

    ref_actor = TinyActor().double()
    lp, out = ref_actor(batch.sequences, batch.action_mask, return_output=True, return_entropy=True)
    policy = o.loss.PolicyLoss(token_level_loss=agg == "token-mean", policy_loss_type=loss_type)
    pl = policy(lp, batch.action_log_probs.double(), batch.advantages.double(), action_mask=batch.action_mask,
                **(info or o.ppo_actor.get_loss_batch_info(trainer.strategy, batch.action_mask)))[0]
    w = torch.stack(batch.info[WEIGHT_KEY])
    term = aer_term64(out.entropy, batch.action_mask, w, alpha, token_level, **kw)
    ref_grads = torch.autograd.grad(pl + term, list(ref_actor.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    # OpenRLHF's policy_loss keeps its meaning; AER's term is logged beside it.
    assert status["metrics"]["policy_loss"].item() == pytest.approx(pl.item(), rel=1e-5, abs=1e-7)
    assert status["metrics"]["aer/loss"].item() == pytest.approx(term.item(), rel=1e-5)
    assert status["weights"]["aer/loss"] == "token"


def test_trainer_refuses_openrlhf_entropy_bonus_and_needs_the_weights(monkeypatch, o):
    with pytest.raises(ValueError, match="entropy_coef"):
        make_trainer(monkeypatch, o, AERConfig(), make_args(actor__entropy_coef=0.001))
    trainer = make_trainer(monkeypatch, o, AERConfig(), make_args())
    batch = one_micro_batch(o)
    del batch.info[WEIGHT_KEY]
    with pytest.raises(KeyError, match="experience maker is not AER's"):
        trainer.training_step(batch, 0.0, 0)


def token_mean64(batches) -> float:
    """float64 token-mean entropy of TinyActor over the action tokens of ``batches``."""
    total = count = 0.0
    for b in batches:
        h = entropy64(TinyActor().emb[b.sequences] @ TinyActor().head)[:, :-1]
        m = b.action_mask[:, -h.shape[1]:] if b.action_mask.shape[1] < h.shape[1] else b.action_mask
        total += (h[:, -m.shape[1]:] * m).sum().item()
        count += m.sum().item()
    return total / count


def record_micro_batches(trainer) -> list:
    """The micro-batches ppo_train hands training_step, in order."""
    seen = []
    step = trainer.training_step

    def spy(experience, kl_ctl, i, loss_batch_info=None):
        seen.append(experience)
        return step(experience, kl_ctl, i, loss_batch_info)

    trainer.training_step = spy
    return seen


def test_ppo_train_from_the_driver_to_the_logged_status(monkeypatch, o):
    """Driver experiences -> OpenRLHF's replay buffer, DataLoader (shuffled) and ppo_train (3 micro-batches,
    2 per optimizer step): one update, logged in the status; the anchoring update takes the
    first optimizer step's micro-batches, a later update every micro-batch."""
    _, balanced, _ = driver_experiences(monkeypatch, o, AERConfig())
    trainer = make_trainer(monkeypatch, o, AERConfig(coef_init=0.01, target_ratio=0.5), make_args(), gas=2)
    rank0 = balanced[0]
    seen = record_micro_batches(trainer)
    trainer.replay_buffer.append(rank0)
    status = trainer.ppo_train(0.0)
    assert len(seen) == 3  # 6 samples, micro-batches of 2: an optimizer step of 2, then a partial one
    h_first = token_mean64(seen[:2])
    assert status["aer/entropy"] == pytest.approx(h_first, rel=1e-5)
    assert status["aer/anchor"] == pytest.approx(h_first, rel=1e-5)  # first step: the anchor
    seen.clear()
    status = trainer.ppo_train(0.0)  # anchored: the whole RL step's tokens
    m = rank0.action_mask
    h_ref = (entropy64(TinyActor().emb[rank0.sequences] @ TinyActor().head)[:, :-1] * m).sum() / m.sum()
    assert status["aer/entropy"] == pytest.approx(h_ref.item(), rel=1e-5)
    assert status["aer/anchor"] == pytest.approx(h_first, rel=1e-5)
    assert status["aer/update_skipped"] == 0.0 and status["aer/coef"] == trainer.aer.regularizer.value
    # Driver metrics arrive through OpenRLHF's own per-sample status reduction (defect 5).
    acc = SCORES.reshape(-1, N_SAMPLES).double().mean(-1).mean().item()
    assert status["aer/difficulty/accuracy"] == pytest.approx(acc)
    assert "aer/loss" in status and "policy_loss" in status
    assert trainer.aer.window.empty


def test_checkpoint_carries_the_state_and_warns_without_deepspeed_checkpoints(monkeypatch, o):
    """AERPolicyModelActor on OpenRLHF's own save_checkpoint; the DeepSpeed engine is stubbed."""
    monkeypatch.setattr(o.ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    saved = []
    strategy = SimpleNamespace(
        args=SimpleNamespace(ckpt=SimpleNamespace(path="/ckpt", max_num=3, max_mem=1000)),
        save_ckpt=lambda model, path, tag, max_num, max_mem, client_states, **kw: saved.append(client_states),
    )
    actor_cls = o.actor.AERPolicyModelActor.__ray_actor_class__
    policy = object.__new__(actor_cls)
    aer = OpenRLHFAER(AERConfig(coef_init=0.002))
    aer.loss(torch.full((1, 3), 1.5), torch.ones(1, 3, dtype=torch.bool), [1.0])
    aer.update()
    policy.strategy, policy.actor, policy.save_hf_ckpt = strategy, SimpleNamespace(model=None), False
    policy.trainer, policy.disable_ds_ckpt = SimpleNamespace(aer=aer), False
    policy.save_checkpoint("global_step3", {"global_step": 3})
    assert saved[0]["global_step"] == 3 and saved[0][STATE_KEY] == aer.regularizer.state_dict()

    # Loading: OpenRLHF's own init (HF model + DeepSpeed) is stood in for by what it leaves behind.
    def init(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        self.trainer, self.checkpoint_states = SimpleNamespace(aer=OpenRLHFAER()), saved[0]
        self.disable_ds_ckpt = strategy.args.ckpt.disable_ds

    monkeypatch.setattr(actor_cls.__mro__[1], "init_model_from_pretrained", init)
    resumed = object.__new__(actor_cls)
    resumed.strategy, resumed.actor, resumed.save_hf_ckpt = strategy, SimpleNamespace(model=None), False
    strategy.args.ckpt.disable_ds = False
    resumed.init_model_from_pretrained(strategy, "model")
    assert resumed.trainer.aer.regularizer.state_dict() == aer.regularizer.state_dict()
    # Regression (defect 9): with --ckpt.disable_ds the state was silently never saved.
    strategy.args.ckpt.disable_ds = True
    with pytest.warns(UserWarning, match="disable_ds"):
        resumed.init_model_from_pretrained(strategy, "model")
    with pytest.warns(UserWarning, match="not saved"):
        resumed.save_checkpoint("global_step4", {})
    assert len(saved) == 1
    # OpenRLHF's own trainer in a worker (the hook did not run): said so, not an AttributeError later.
    resumed.trainer, resumed.disable_ds_ckpt = SimpleNamespace(), False
    with pytest.raises(RuntimeError, match="worker_process_setup_hook"):
        resumed.save_checkpoint("global_step5", {})


def test_anchor_is_the_first_optimizer_steps_entropy(monkeypatch, o):
    """Issue 22 item 9: with --train.max_epochs 2 the first ppo_train runs 2 epochs of 3 micro-batches,
    2 per optimizer step; the anchor (and the entropy of that update) is the token mean of the first
    optimizer step's micro-batches only, which trained the policy before any update. The stub strategy
    takes no optimizer step, so the window over both epochs differs only by its data, not by weights."""
    _, balanced, _ = driver_experiences(monkeypatch, o, AERConfig())
    trainer = make_trainer(monkeypatch, o, AERConfig(coef_init=0.01), make_args(train__max_epochs=2), gas=2)
    seen = record_micro_batches(trainer)
    trainer.replay_buffer.append(balanced[0])
    status = trainer.ppo_train(0.0)
    assert len(seen) == 6
    h_first = token_mean64(seen[:2])
    assert status["aer/anchor"] == pytest.approx(h_first, rel=1e-5)
    assert status["aer/entropy"] == pytest.approx(h_first, rel=1e-5)
    assert abs(token_mean64(seen) - h_first) > 1e-4  # the window over both epochs is another number


def test_resume_without_aer_state_is_refused_unless_asked(monkeypatch, o):
    """Issue 22 item 6: a DeepSpeed checkpoint without AER's state (saved without AER) used to restart
    alpha and the anchor silently; now an error naming --aer.reanchor_on_missing_state, which opts in."""
    monkeypatch.setattr(o.ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    actor_cls = o.actor.AERPolicyModelActor.__ray_actor_class__
    states = {}

    def init(self, strategy, pretrain, max_steps=None, vllm_engines=None):  # OpenRLHF's, with DeepSpeed stubbed
        self.trainer, self.checkpoint_states = SimpleNamespace(aer=OpenRLHFAER(config_from_env())), states
        self.disable_ds_ckpt = False

    monkeypatch.setattr(actor_cls.__mro__[1], "init_model_from_pretrained", init)
    strategy = SimpleNamespace(args=SimpleNamespace(ckpt=SimpleNamespace(path="/ckpt", disable_ds=False)))
    policy = object.__new__(actor_cls)
    monkeypatch.setenv(CONFIG_ENV, config_to_env(AERConfig()))
    policy.init_model_from_pretrained(strategy, "model")  # no checkpoint: a fresh start, nothing to restore
    states.update({"global_step": 3, "episode": 0})  # OpenRLHF's own client states, no "aer"
    with pytest.raises(RuntimeError, match=r"/ckpt/_actor, which holds no AER state.*"
                                           r"--aer.reanchor_on_missing_state true"):
        policy.init_model_from_pretrained(strategy, "model")
    monkeypatch.setenv(CONFIG_ENV, config_to_env(AERConfig(reanchor_on_missing_state=True)))
    policy.init_model_from_pretrained(strategy, "model")
    assert policy.trainer.aer.regularizer.target.anchor is None  # anew, as asked


def test_a_worker_without_the_launchers_settings_fails(monkeypatch, o):
    """Issue 22 item 8: the hook's classes without the launcher's settings ran on AERConfig()."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    strategy = SimpleNamespace(args=make_args())
    kl = o.kl_controller.FixedKLController(0.0)
    with pytest.raises(RuntimeError, match="python -m entropy_reg.integrations.openrlhf"):
        o.maker.AERExperienceMaker(None, None, None, None, kl, strategy, Tokenizer())


def test_install_swaps_the_classes_where_openrlhf_looks_them_up(o):
    from entropy_reg.integrations.openrlhf import hook

    trainer_mod = sys.modules["openrlhf.trainer.ppo_trainer"]
    originals = (trainer_mod.RemoteExperienceMaker, o.ppo_actor.ActorPPOTrainer, o.ppo_actor.PolicyModelActor)
    hook.install()
    try:
        assert trainer_mod.RemoteExperienceMaker is o.maker.AERExperienceMaker
        assert o.ppo_actor.ActorPPOTrainer is o.actor.AERActorPPOTrainer
        assert o.ppo_actor.PolicyModelActor is o.actor.AERPolicyModelActor
        # A module imported after install() is swapped when it loads (what happens in a Ray worker).
        del sys.modules["openrlhf.trainer.ppo_trainer"]
        fresh = importlib.import_module("openrlhf.trainer.ppo_trainer")
        assert fresh is not trainer_mod and fresh.RemoteExperienceMaker is o.maker.AERExperienceMaker
    finally:
        sys.modules["openrlhf.trainer.ppo_trainer"] = trainer_mod
        hook.uninstall()
    assert (trainer_mod.RemoteExperienceMaker, o.ppo_actor.ActorPPOTrainer, o.ppo_actor.PolicyModelActor) == originals


def test_swap_when_ray_unpickles_our_actor_class_first(o):
    """In a Ray worker the first import is often ours: unpickling AERPolicyModelActor imports
    .actor, which imports OpenRLHF's ppo_actor, whose import runs the hook's swap while .actor is
    half-initialized. The swap must still happen (when .actor finishes)."""
    from entropy_reg.integrations.openrlhf import hook

    names = ("entropy_reg.integrations.openrlhf.actor", "openrlhf.trainer.ray.ppo_actor")
    saved = {n: sys.modules.pop(n) for n in names}
    del sys.modules["openrlhf.trainer.ray"].ppo_actor  # as in a fresh worker: never imported
    finder = _StubFinder()  # ppo_actor imports deepspeed at its top
    sys.meta_path.insert(0, finder)
    hook.install()
    try:
        fresh = importlib.import_module(names[0])
        target = sys.modules[names[1]]
        assert target is not saved[names[1]]
        assert target.ActorPPOTrainer is fresh.AERActorPPOTrainer
        assert target.PolicyModelActor is fresh.AERPolicyModelActor
        assert issubclass(fresh.AERActorPPOTrainer, target.ActorPPOTrainer.__mro__[1])
    finally:
        hook.uninstall()
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] in _STUBBED]:
            del sys.modules[name]
        for name, module in saved.items():  # the modules and their parents' attributes, as they were
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)


def test_the_classes_are_openrlhf_0_11_2s():
    """Defect 2: the docs named ActorModelActor; 0.11.2's policy actor is PolicyModelActor."""
    o = openrlhf()
    assert issubclass(o.actor.AERPolicyModelActor.__ray_actor_class__, o.ppo_actor.PolicyModelActor.__ray_actor_class__)
    assert issubclass(o.actor.AERActorPPOTrainer, o.ppo_actor.ActorPPOTrainer)
    assert issubclass(o.maker.AERExperienceMaker, o.experience_maker.RemoteExperienceMaker)
    assert not hasattr(o.ppo_actor, "ActorModelActor")
    for doc in ("README.md", os.path.join("docs", "integrations.md")):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            assert "ActorModelActor" not in f.read()


# ---------------------------------------------------------------- two gloo ranks


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mp = pytest.MonkeyPatch()
    try:
        o = openrlhf()
        out = {}
        # 1. OpenRLHF's ppo_train on both ranks, different data: one update from the global token mean.
        trainer = make_trainer(mp, o, AERConfig(coef_init=0.01), make_args(), gas=1)
        batch = one_micro_batch(o, seed=rank)
        trainer.replay_buffer.append(batch)
        status = trainer.ppo_train(0.0)
        out["ppo_train"] = {k: status[k] for k in ("aer/entropy", "aer/coef", "aer/target", "aer/update_skipped")}
        # 2. This rank's window empty, the other's not (OpenRLHFAER alone: OpenRLHF's own per-micro-batch
        #    all-reduces need the same micro-batch count on every rank).
        aer = OpenRLHFAER(AERConfig(coef_init=0.001, initial_entropy=2.0))
        if rank == 0:
            aer.loss(torch.full((1, 3), 0.5), torch.ones(1, 3, dtype=torch.bool), [1.0])
        out["one_empty"] = aer.update()
        # 3. No micro-batch on any rank: OpenRLHF's dynamic batching with too few samples for a step.
        empty = make_trainer(mp, o, AERConfig(coef_init=0.01), make_args(train__dynamic_batch_enable=True), mesh=True)
        out["all_empty"] = empty.ppo_train(0.0)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        mp.undo()
        dist.destroy_process_group()


def test_two_gloo_ranks_one_update_and_empty_windows(tmp_path, o):
    # The heavy libraries OpenRLHF imports are preloaded once in the forkserver.
    codes = run_ranks(_rank, 2, [str(tmp_path)],
                      ["torch", "transformers", "peft", "ray", "entropy_reg.integrations.openrlhf"], timeout=240)
    assert codes == [0, 0], codes
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 1. Reference: the token mean of both ranks' micro-batches, in float64.
    total = count = 0.0
    for rank in (0, 1):
        b = one_micro_batch(o, seed=rank)
        h = entropy64(TinyActor().emb[b.sequences] @ TinyActor().head)[:, :-1]
        total += (h * b.action_mask).sum().item()
        count += b.action_mask.sum().item()
    assert r0["ppo_train"]["aer/entropy"] == pytest.approx(total / count, rel=1e-6)
    assert r0["ppo_train"] == r1["ppo_train"]
    # 2. Regression (defect 7): the empty rank raised before the all-reduce and the other hung.
    assert r0["one_empty"] == r1["one_empty"] and r0["one_empty"]["aer/entropy"] == pytest.approx(0.5)
    assert r0["one_empty"]["aer/update_skipped"] == 0.0 and r0["one_empty"]["aer/coef"] != 0.001
    # 3. Nothing anywhere: both skip together, alpha untouched.
    assert r0["all_empty"] == r1["all_empty"]
    assert r0["all_empty"]["aer/update_skipped"] == 1.0 and r0["all_empty"]["aer/coef"] == 0.01
