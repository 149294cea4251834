"""The demo's synthetic task: multi-digit addition with a verifiable 0/1 reward.

A prompt is ``a + b =`` with both operands written least-significant digit
first and zero-padded to ``max_digits`` digits, so every prompt has the same
length; the answer is the sum, also least-significant digit first, without
leading zeros, then an end token. Difficulty is the number of digits of the
operands (bucket ``n``: ``a, b < 10**n``): more digits mean more carries to
get right and a longer answer. Reversed digits make the carry causal, so a tiny
transformer can learn it; the end token makes answers variable-length, so the
response mask matters as it does with a real LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PLUS = 10
EQUALS = 11
EOS = 12
VOCAB_SIZE = 13


@dataclass(frozen=True)
class Batch:
    """Prompts of one difficulty mix: ``prompts[B, prompt_len]`` token ids, the
    operands ``a[B]``, ``b[B]`` (int64) and each prompt's ``difficulty[B]`` (digits)."""

    prompts: Tensor
    a: Tensor
    b: Tensor
    difficulty: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.prompts.to(device), self.a.to(device), self.b.to(device), self.difficulty.to(device))

    def repeat(self, n: int) -> Batch:
        """Each prompt ``n`` times in a row (a GRPO group is ``n`` consecutive rows)."""
        return Batch(*(t.repeat_interleave(n, dim=0) for t in (self.prompts, self.a, self.b, self.difficulty)))


class AdditionTask:
    """Sampler, supervised targets and verifier for reversed-digit addition.

    Args:
        max_digits: operands have at most this many digits (difficulty buckets
            ``1..max_digits``).
    """

    def __init__(self, max_digits: int = 4) -> None:
        if isinstance(max_digits, bool) or not isinstance(max_digits, int):
            raise TypeError(f"max_digits must be an int, got {type(max_digits).__name__}")
        if max_digits < 1:
            raise ValueError(f"max_digits must be >= 1, got {max_digits}")
        self.max_digits = max_digits
        self.prompt_len = 2 * max_digits + 2
        self.answer_len = max_digits + 2  # the sum has at most max_digits + 1 digits, then EOS
        self._powers = 10 ** torch.arange(max_digits + 1)

    @property
    def buckets(self) -> list[int]:
        return list(range(1, self.max_digits + 1))

    def sample(self, n: int, difficulty_probs: list[float] | None, generator: torch.Generator) -> Batch:
        """``n`` prompts whose difficulty is drawn from ``difficulty_probs`` (uniform when None)."""
        probs = torch.ones(self.max_digits) if difficulty_probs is None else torch.tensor(difficulty_probs)
        difficulty = torch.multinomial(probs, n, replacement=True, generator=generator) + 1
        return self.make(difficulty, generator)

    def make(self, difficulty: Tensor, generator: torch.Generator) -> Batch:
        """Prompts with the given per-prompt digit counts.

        One operand (either, at random) has exactly ``n`` digits so the bucket
        really is that hard; the other is uniform below ``10**n``.
        """
        high = 10 ** difficulty
        low = 10 ** (difficulty - 1) * (difficulty > 1)
        u = torch.rand(2, difficulty.numel(), generator=generator, dtype=torch.float64)
        a = (u[0] * high).long()
        b = low + (u[1] * (high - low)).long()
        swap = torch.rand(difficulty.numel(), generator=generator) < 0.5
        a, b = torch.where(swap, b, a), torch.where(swap, a, b)
        prompts = torch.cat(
            [self._digits(a, self.max_digits), torch.full_like(a, PLUS)[:, None],
             self._digits(b, self.max_digits), torch.full_like(a, EQUALS)[:, None]],
            dim=1,
        )
        return Batch(prompts=prompts, a=a, b=b, difficulty=difficulty)

    def answers(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Supervised targets: ``tokens[B, answer_len]`` and the bool ``mask`` of real tokens (digits + EOS)."""
        total = batch.a + batch.b
        digits = self._digits(total, self.max_digits + 1)
        n_digits = self._num_digits(total)
        pos = torch.arange(self.answer_len, device=total.device)[None, :]
        tokens = torch.cat([digits, torch.zeros_like(total)[:, None]], dim=1)
        tokens = torch.where(pos == n_digits[:, None], torch.full_like(tokens, EOS), tokens)
        return tokens, pos <= n_digits[:, None]

    def response_mask(self, responses: Tensor) -> Tensor:
        """True up to and including the first EOS (the whole row when there is none)."""
        is_eos = responses == EOS
        before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        return before == 0

    def reward(self, batch: Batch, responses: Tensor) -> Tensor:
        """1.0 where the response is exactly the answer's digits followed by EOS, else 0.0 (float32 ``[B]``)."""
        target, target_mask = self.answers(batch)
        match = (responses == target) | ~target_mask
        return match.all(dim=1).float()

    def _digits(self, x: Tensor, width: int) -> Tensor:
        return (x[:, None] // self._powers[:width].to(x.device)) % 10

    @staticmethod
    def _num_digits(x: Tensor) -> Tensor:
        # Number of decimal digits of x >= 0 (0 has one digit).
        count = torch.ones_like(x)
        rest = x // 10
        while bool((rest > 0).any()):
            count = count + (rest > 0).long()
            rest = rest // 10
        return count
