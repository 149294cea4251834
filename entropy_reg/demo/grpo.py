"""GRPO on a demo task, with the entropy bonus an arm prescribes.

One step, as an LLM RLVR trainer does it:

1. draw ``prompts_per_step`` prompts (the data order is the same for every arm;
   a task with a finite pool is iterated in epochs, :class:`PromptStream`) and
   sample ``group_size`` responses per prompt from the current policy;
2. score them (0/1 verifiable reward), and form group-normalized advantages
   ``A_i = (r_i - mean_g r) / (std_g r + 1e-6)``;
3. the rollout policy's log-probs and entropy come from the logits that
   sampled the responses (same weights and numerics as a recomputation, to
   ~1e-6, so no second pass); the masked, token-weighted mean entropy
   (:func:`entropy_reg.masked_mean`) is the statistic the arm's controllers see;
4. per-response coefficients from the arm, then ``minibatches`` optimizer steps
   on the arm's policy loss (:mod:`entropy_reg.demo.losses`: GRPO's clip, Clip-Higher,
   Clip-Cov or KL-Cov) minus the coefficient-weighted entropy, both token-mean aggregated;
5. the arm's controllers update once from that step's entropy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..aggregation import aggregate
from ..distributed import masked_mean
from ..entropy import token_logprobs_and_entropy
from .arms import CoefficientSource
from .losses import policy_loss
from .policy import TinyTransformer, response_logits
from .task import Batch, PoolTask, Task


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
    eval_coverage: list[float | None] = field(default_factory=list)  # pool tasks: share of the pool solved so far


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


class PromptStream:
    """The prompts of each GRPO step, the same for every arm of a seed.

    A :class:`~entropy_reg.demo.task.PoolTask` is iterated in epochs over its pool
    (reshuffled each epoch; a step may straddle two epochs), and the stream keeps which
    pool prompts have been solved at least once (any response of the group right):
    :attr:`coverage` is that fraction. Any other task draws fresh prompts every step.
    """

    def __init__(self, task: Task, per_step: int, generator: torch.Generator) -> None:
        self.task, self.per_step, self.generator = task, per_step, generator
        self.pool = task.split("pool") if isinstance(task, PoolTask) else None
        self.solved = torch.zeros(0 if self.pool is None else self.pool.prompts.shape[0], dtype=torch.bool)
        self._order = torch.zeros(0, dtype=torch.long)
        self._index = torch.zeros(0, dtype=torch.long)

    def next(self) -> Batch:
        if self.pool is None:
            return self.task.sample(self.per_step, None, self.generator)
        while self._order.numel() < self.per_step:
            self._order = torch.cat([self._order, torch.randperm(self.solved.numel(), generator=self.generator)])
        self._index, self._order = self._order[: self.per_step], self._order[self.per_step:]
        return Batch(*(t[self._index] for t in (self.pool.prompts, self.pool.difficulty, self.pool.reference)))

    def mark(self, rewards: Tensor, group_size: int) -> None:
        """Record the last batch's solved prompts (``rewards`` ``[per_step * group_size]``)."""
        if self.pool is not None:
            self.solved[self._index[rewards.view(-1, group_size).amax(dim=1).cpu() > 0.5]] = True

    @property
    def coverage(self) -> float | None:
        return float(self.solved.float().mean()) if self.pool is not None else None


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
) -> tuple[ArmHistory, dict[str, Any], float]:
    """Run one arm from ``init_state``; returns its history, final metrics and wall time (s).

    The final metrics are :func:`evaluate`'s on ``eval_prompts``; for a pool task also
    ``"pool"`` (:func:`evaluate` on the training pool) and ``"coverage"`` (the share of
    pool prompts solved at least once during training)."""
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
    loss_gen = torch.Generator().manual_seed(seed + 4)  # Clip-Cov's random token choice
    stream = PromptStream(task, config.prompts_per_step, data_gen)
    group_ids = torch.arange(config.prompts_per_step, device=device).repeat_interleave(config.group_size)
    hist = ArmHistory(coef_by_bucket={str(b): [] for b in task.buckets})

    for step in range(config.steps):
        if step % config.eval_every == 0:
            _evaluate_during(policy, task, eval_prompts, config, seed, step, stream, hist)
        policy.train()
        rollout = stream.next().to(device).repeat(config.group_size)
        responses, sampler_logits = policy.generate(rollout.prompts, task.answer_len, sample_gen)
        mask = task.response_mask(responses)
        rewards = task.reward(rollout, responses)
        stream.mark(rewards, config.group_size)
        old_logp, entropy = token_logprobs_and_entropy(sampler_logits, responses, mask=mask)
        mean_entropy = masked_mean(entropy, mask)
        coefs = source.coefficients(rewards, group_ids)
        _record(hist, step, float(mean_entropy), source, coefs, rollout.difficulty, rewards, task)
        _optimize(policy, optimizer, schedule, source, rollout, responses, mask, old_logp,
                  _group_advantages(rewards, config.group_size), coefs, config, data_gen, loss_gen)
        source.update(mean_entropy)
        if on_step is not None:
            on_step({"H": hist.entropy[-1], "coef": hist.coef[-1], "reward": hist.train_reward[-1]})
    _evaluate_during(policy, task, eval_prompts, config, seed, config.steps, stream, hist)

    policy.eval()
    final: dict[str, Any] = evaluate(policy, task, eval_prompts, config.final_eval_samples, config.pass_k, seed + 3)
    if stream.pool is not None:
        final["pool"] = evaluate(policy, task, stream.pool.to(device), config.final_eval_samples, config.pass_k,
                                 seed + 5)
        final["coverage"] = stream.coverage
    return hist, final, time.perf_counter() - start


def _evaluate_during(policy: TinyTransformer, task: Task, eval_prompts: Batch, config: GRPOConfig, seed: int,
                     step: int, stream: PromptStream, hist: ArmHistory) -> None:
    """Held-out pass@1 (``eval_samples`` per prompt) and the pool's coverage so far, into ``hist``."""
    policy.eval()
    res = evaluate(policy, task, eval_prompts, config.eval_samples, (), seed + 2)
    hist.eval_step.append(step)
    hist.eval_pass1.append(res["pass@1"]["all"])
    hist.eval_coverage.append(stream.coverage)


def _optimize(policy: TinyTransformer, optimizer: torch.optim.Optimizer, schedule: Any, source: CoefficientSource,
              rollout: Batch, responses: Tensor, mask: Tensor, old_logp: Tensor, advantages: Tensor,
              coefs: Tensor, config: GRPOConfig, data_gen: torch.Generator, loss_gen: torch.Generator) -> None:
    """``config.minibatches`` AdamW steps on the arm's policy loss plus its entropy term."""
    for idx in torch.randperm(advantages.numel(), generator=data_gen).to(advantages.device).chunk(config.minibatches):
        logp, ent = token_logprobs_and_entropy(
            response_logits(policy, rollout.prompts[idx], responses[idx]), responses[idx], mask=mask[idx]
        )
        adv = advantages[idx, None].expand_as(logp)
        pg = policy_loss(source.spec.pg, logp, old_logp[idx], adv, mask[idx], loss_gen, config.clip_eps)
        loss = aggregate(pg, mask[idx], "token-mean") + source.loss(ent, mask[idx], coefs[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


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


