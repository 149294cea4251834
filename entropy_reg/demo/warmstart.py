"""Supervised warm start ("the base model"), cached so every arm starts from the same weights.

A short run of teacher-forced cross-entropy on instances skewed towards easy
ones (or a pool task's own warm-start data, ``warm_sample``) gives the policy
what a pretrained LLM brings to RL: competence that falls
with difficulty and a measurable, non-trivial initial entropy. The weights are
saved under the output folder, keyed by everything that determines them, so a
second run (or a second arm) loads instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..entropy import token_logprobs_and_entropy
from .policy import PolicyConfig, TinyTransformer, response_logits
from .task import PoolTask, Task


@dataclass(frozen=True)
class WarmStartConfig:
    """``steps`` AdamW steps (lr ``lr``) on batches of ``batch_size`` instances drawn
    with the task's ``warm_difficulty_probs`` (mostly easy: competence then falls with difficulty)."""

    steps: int = 250
    batch_size: int = 128
    lr: float = 3e-3


def warm_start(
    task: Task,
    policy_config: PolicyConfig,
    config: WarmStartConfig,
    seed: int,
    cache_dir: Path | None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Weights of the warm-started policy (on the CPU) and whether they came from the cache."""
    key = json.dumps(
        {"task": task.key(), "probs": list(task.warm_difficulty_probs), "policy": asdict(policy_config),
         "warm": asdict(config), "seed": seed,
         "torch": torch.__version__},
        sort_keys=True,
    )
    path = None
    if cache_dir is not None:
        path = cache_dir / f"warmstart-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True), True
    # Always on the CPU with its own generator: the cached weights do not depend on --device.
    torch.manual_seed(seed)
    policy = TinyTransformer(policy_config)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.steps):
        batch = (task.warm_sample(config.batch_size, generator) if isinstance(task, PoolTask)
                 else task.sample(config.batch_size, list(task.warm_difficulty_probs), generator))
        targets, mask = task.answers(batch)
        logp, _ = token_logprobs_and_entropy(response_logits(policy, batch.prompts, targets), targets, mask=mask)
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache
    return state, False
