"""GRPO on a demo task, with the entropy bonus an arm prescribes.

One step, as an LLM RLVR trainer does it:

1. draw ``prompts_per_step`` prompts (the data order is the same for every arm)
   and sample ``group_size`` responses per prompt from the current policy;
2. score them (0/1 verifiable reward), and form group-normalized advantages
   ``A_i = (r_i - mean_g r) / (std_g r + 1e-6)``;
3. the rollout policy's log-probs and entropy come from the logits that
   sampled the responses (same weights and numerics as a recomputation, to
   ~1e-6, so no second pass); the masked, token-weighted mean entropy
   (:func:`entropy_reg.masked_mean`) is the statistic the arm's controllers see;
4. per-response coefficients from the arm, then ``minibatches`` optimizer steps
   on the clipped-ratio loss minus the coefficient-weighted entropy, both
   token-mean aggregated;
5. the arm's controllers update once from that step's entropy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..aggregation import aggregate
from ..distributed import masked_mean
from ..entropy import token_logprobs_and_entropy
from .arms import CoefficientSource
from .policy import TinyTransformer, response_logits
from .task import Batch, Task


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings: ``steps`` rollout batches of ``prompts_per_step`` x ``group_size``
    responses, each used for ``minibatches`` AdamW steps (lr ``lr`` after a linear
    warm-up of ``warmup_steps`` GRPO steps, PPO clip ``clip_eps``); held-out pass@1
    every ``eval_every`` steps (``eval_samples`` per prompt), pass@1 and pass@k for each
    k of ``pass_k`` at the end (``final_eval_samples`` per prompt, >= max k).

    The learning rate is near the largest at which this policy's GRPO stays
    stable (1e-3 and above degrade it within a few dozen steps here)."""

    steps: int = 400
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 8e-4
    warmup_steps: int = 10  # linear learning-rate warm-up: Adam's first steps are lr-sized whatever the gradient
    clip_eps: float = 0.2
    minibatches: int = 2
    eval_every: int = 25
    eval_prompts_per_bucket: int = 32
    eval_samples: int = 4  # per prompt, for the curves during training
    final_eval_samples: int = 16  # per prompt, for pass@1 and pass@k at the end
    pass_k: tuple[int, ...] = (8,)


@dataclass
class ArmHistory:
    """Every per-step number an arm produces (plain floats, JSON-ready)."""

    step: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    coef: list[float] = field(default_factory=list)  # global alpha used in this step's loss
    target: list[float | None] = field(default_factory=list)
    train_reward: list[float] = field(default_factory=list)
    coef_by_bucket: dict[str, list[float | None]] = field(default_factory=dict)
    eval_step: list[int] = field(default_factory=list)
    eval_pass1: list[float] = field(default_factory=list)


def evaluate(
    policy: TinyTransformer, task: Task, prompts: Batch, samples: int, ks: Sequence[int], seed: int
) -> dict[str, dict[str, float]]:
    """Held-out pass@1 and unbiased pass@k for each k of ``ks`` (each <= ``samples``), per
    difficulty bucket and overall: ``{"pass@k": {"<bucket>": p, ..., "all": p}}``.

    pass@k is :func:`pass_at_k` per prompt, averaged over prompts.
    """
    generator = torch.Generator(device=prompts.prompts.device).manual_seed(seed)
    expanded = prompts.repeat(samples)
    responses, _ = policy.generate(expanded.prompts, task.answer_len, generator)
    correct = task.reward(expanded, responses).view(-1, samples).sum(dim=1).long().cpu()
    difficulty = prompts.difficulty.cpu()
    out: dict[str, dict[str, float]] = {"pass@1": {}}
    out.update({f"pass@{k}": {} for k in ks})
    selections = [(str(b), difficulty == b) for b in task.buckets]
    for name, sel in selections + [("all", torch.ones_like(difficulty, dtype=torch.bool))]:
        c = correct[sel].tolist()
        out["pass@1"][name] = sum(c) / (samples * len(c))
        for k in ks:
            out[f"pass@{k}"][name] = sum(pass_at_k(samples, ci, k) for ci in c) / len(c)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021):
    the probability that ``k`` of them drawn without replacement hold a correct one,
    ``1 - C(n - c, k) / C(n, k)``."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def train_arm(
    source: CoefficientSource,
    init_state: dict[str, Tensor],
    policy_factory: Callable[[], TinyTransformer],
    task: Task,
    config: GRPOConfig,
    eval_prompts: Batch,
    seed: int,
    device: torch.device,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> tuple[ArmHistory, dict[str, dict[str, float]], float]:
    """Run one arm from ``init_state``; returns its history, final held-out metrics and wall time (s)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    policy = policy_factory().to(device)
    policy.load_state_dict(init_state)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    ramp = config.minibatches * config.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(1, ramp)))
    # Same seeds for every arm: the same prompts in the same order, the same sampling stream.
    data_gen = torch.Generator().manual_seed(seed)
    sample_gen = torch.Generator(device=device).manual_seed(seed + 1)
    group_ids = torch.arange(config.prompts_per_step, device=device).repeat_interleave(config.group_size)
    hist = ArmHistory(coef_by_bucket={str(b): [] for b in task.buckets})

    for step in range(config.steps + 1):
        if step % config.eval_every == 0 or step == config.steps:
            policy.eval()
            res = evaluate(policy, task, eval_prompts, config.eval_samples, (), seed + 2)
            hist.eval_step.append(step)
            hist.eval_pass1.append(res["pass@1"]["all"])
        if step == config.steps:
            break
        policy.train()
        rollout = task.sample(config.prompts_per_step, None, data_gen).to(device).repeat(config.group_size)
        responses, sampler_logits = policy.generate(rollout.prompts, task.answer_len, sample_gen)
        mask = task.response_mask(responses)
        rewards = task.reward(rollout, responses)
        advantages = _group_advantages(rewards, config.group_size)
        old_logp, entropy = token_logprobs_and_entropy(sampler_logits, responses, mask=mask)
        mean_entropy = masked_mean(entropy, mask)
        coefs = source.coefficients(rewards, group_ids)
        _record(hist, step, float(mean_entropy), source, coefs, rollout.difficulty, rewards, task)

        for idx in torch.randperm(rewards.numel(), generator=data_gen).to(device).chunk(config.minibatches):
            logp, ent = token_logprobs_and_entropy(
                response_logits(policy, rollout.prompts[idx], responses[idx]), responses[idx], mask=mask[idx]
            )
            ratio = torch.exp(logp - old_logp[idx])
            adv = advantages[idx, None]
            pg = -torch.minimum(ratio * adv, ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps) * adv)
            loss = aggregate(pg, mask[idx], "token-mean") + source.loss(ent, mask[idx], coefs[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        source.update(mean_entropy)
        if on_step is not None:
            on_step({"H": hist.entropy[-1], "coef": hist.coef[-1], "reward": hist.train_reward[-1]})

    policy.eval()
    final = evaluate(policy, task, eval_prompts, config.final_eval_samples, config.pass_k, seed + 3)
    return hist, final, time.perf_counter() - start


def _record(
    hist: ArmHistory, step: int, entropy: float, source: CoefficientSource, coefs: Tensor,
    difficulty: Tensor, rewards: Tensor, task: Task,
) -> None:
    hist.step.append(step)
    hist.entropy.append(entropy)
    hist.coef.append(source.alpha)
    hist.target.append(source.target)
    hist.train_reward.append(float(rewards.mean()))
    coefs, difficulty = coefs.cpu(), difficulty.cpu()
    for b in task.buckets:
        sel = difficulty == b
        hist.coef_by_bucket[str(b)].append(float(coefs[sel].mean()) if bool(sel.any()) else None)


def _group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """GRPO advantage: reward standardized within its group (all-equal groups get 0)."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-6)).view(-1)


