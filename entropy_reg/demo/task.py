"""The demo's synthetic tasks and the protocol any task plugged into the demo or the study follows.

Both built-in tasks share one vocabulary (digits 0-9, ``+``, ``=``, end token)
and a 0/1 verifiable reward, and bucket their prompts by difficulty:

- :class:`AdditionTask` (``addition``): ``a + b =`` with both operands written
  least-significant digit first and zero-padded to ``max_digits`` digits; the
  answer is the sum, also least-significant digit first, without leading
  zeros, then the end token. One right answer per prompt. Difficulty is the
  number of digits (bucket ``n``: ``a, b < 10**n``): more carries to chain and
  a longer answer. Reversed digits make the carry causal, so a tiny
  transformer can learn it.
- :class:`DigitSumTask` (``digitsum``): ``S + n =`` asks for ``n`` digits that
  sum to ``S`` (``S`` uniform in ``0..9n``), then the end token. Many right
  answers per prompt (one for ``n = 1``, up to 670 for ``n = 4``), so a good
  policy may keep a high entropy; the difficulty is planning a whole answer
  under a global constraint (every prefix must leave a reachable remainder),
  not chaining carries. Bucket ``n`` is the number of digits.

In both, the end token makes answers variable-length, so the response mask
matters as it does with a real LLM.

A task for :mod:`entropy_reg.demo` or ``benchmarks/aer_study.py`` is any object
with the members of :class:`Task` (subclassing :class:`DigitTask` gives
``sample``, ``answers`` and ``response_mask``); ``--task module:factory``
plugs one in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

PLUS = 10
EQUALS = 11
EOS = 12
VOCAB_SIZE = 13


@dataclass(frozen=True)
class Batch:
    """Prompts of one difficulty mix: ``prompts[B, prompt_len]`` token ids, each
    prompt's ``difficulty[B]`` (its bucket, int64) and ``reference[B, answer_len]``,
    one right answer (ending with the end token, zeros after it), the supervised
    target of the warm start."""

    prompts: Tensor
    difficulty: Tensor
    reference: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.prompts.to(device), self.difficulty.to(device), self.reference.to(device))

    def repeat(self, n: int) -> Batch:
        """Each prompt ``n`` times in a row (a GRPO group is ``n`` consecutive rows)."""
        return Batch(*(t.repeat_interleave(n, dim=0) for t in (self.prompts, self.difficulty, self.reference)))


@runtime_checkable
class Task(Protocol):
    """What the demo and the study need from a task.

    Attributes:
        name: short identifier, part of every cache key.
        vocab_size: token ids are in ``[0, vocab_size)``; ``eos`` ends an answer.
        prompt_len, answer_len: every prompt has ``prompt_len`` tokens; the policy
            samples ``answer_len`` tokens (the reward reads them up to the first ``eos``).
        buckets: the difficulty buckets, easiest first (what ``Batch.difficulty`` holds).
        warm_difficulty_probs: bucket mix of the supervised warm start (mostly easy
            prompts: the warm-started policy's competence then falls with difficulty).
    """

    name: str
    vocab_size: int
    eos: int
    prompt_len: int
    answer_len: int
    buckets: list[int]
    warm_difficulty_probs: tuple[float, ...]

    def key(self) -> dict[str, Any]:
        """Everything that defines the task (JSON-safe), for cache keys."""

    def sample(self, n: int, difficulty_probs: list[float] | None, generator: torch.Generator) -> Batch:
        """``n`` prompts with buckets drawn from ``difficulty_probs`` (uniform when None)."""

    def make(self, difficulty: Tensor, generator: torch.Generator) -> Batch:
        """One prompt per entry of ``difficulty`` (bucket values), from ``generator`` only."""

    def answers(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Supervised targets ``tokens[B, answer_len]`` and the bool mask of their real tokens."""

    def response_mask(self, responses: Tensor) -> Tensor:
        """Bool ``[B, answer_len]``: the tokens of each response that count (up to its end token)."""

    def reward(self, batch: Batch, responses: Tensor) -> Tensor:
        """Float32 ``[B]`` verifiable reward of each response to the matching prompt."""


class DigitTask:
    """Shared parts of the built-in tasks: the vocabulary, bucket sampling, the
    end-token mask and reference answers as supervised targets. Subclasses set
    ``name``, ``prompt_len``, ``answer_len``, ``buckets`` and implement ``make``,
    ``reward`` and ``key``."""

    vocab_size = VOCAB_SIZE
    eos = EOS
    warm_difficulty_probs: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
    buckets: list[int]

    def sample(self, n: int, difficulty_probs: list[float] | None, generator: torch.Generator) -> Batch:
        probs = torch.ones(len(self.buckets)) if difficulty_probs is None else torch.tensor(difficulty_probs)
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
        return self.make(torch.tensor(self.buckets)[index], generator)

    def make(self, difficulty: Tensor, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def answers(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return batch.reference, self.response_mask(batch.reference)

    def response_mask(self, responses: Tensor) -> Tensor:
        """True up to and including the first EOS (the whole row when there is none)."""
        is_eos = responses == EOS
        before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        return before == 0


def _check_size(value: int, name: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= high:
        raise ValueError(f"{name} must be in [1, {high}], got {value}")
    return value


def digits_of(x: Tensor, width: int) -> Tensor:
    """``[B, width]``: the decimal digits of ``x >= 0``, least-significant first."""
    powers = 10 ** torch.arange(width, device=x.device)
    return (x[:, None] // powers) % 10


def _end_at(tokens: Tensor, length: Tensor, width: int) -> Tensor:
    """``tokens[:, :length]`` then EOS, zero-padded to ``width`` columns."""
    pos = torch.arange(width, device=tokens.device)[None, :]
    padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], width - tokens.shape[1])], dim=1)
    padded = torch.where(pos < length[:, None], padded, torch.zeros_like(padded))
    return torch.where(pos == length[:, None], torch.full_like(padded, EOS), padded)


class AdditionTask(DigitTask):
    """Sampler, reference answers and verifier for reversed-digit addition.

    Args:
        max_digits: operands have at most this many digits (buckets ``1..max_digits``), at most 15.
    """

    name = "addition"

    def __init__(self, max_digits: int = 4) -> None:
        self.max_digits = _check_size(max_digits, "max_digits", 15)
        self.prompt_len = 2 * max_digits + 2
        self.answer_len = max_digits + 2  # the sum has at most max_digits + 1 digits, then EOS
        self.buckets = list(range(1, max_digits + 1))

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "max_digits": self.max_digits}

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
            [digits_of(a, self.max_digits), torch.full_like(a, PLUS)[:, None],
             digits_of(b, self.max_digits), torch.full_like(a, EQUALS)[:, None]],
            dim=1,
        )
        total = a + b
        n_digits = torch.ones_like(total) + sum((total >= 10**i).long() for i in range(1, self.max_digits + 1))
        reference = _end_at(digits_of(total, self.max_digits + 1), n_digits, self.answer_len)
        return Batch(prompts=prompts, difficulty=difficulty, reference=reference)

    def operands(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(a, b)`` read back from the prompts."""
        powers = 10 ** torch.arange(self.max_digits, device=batch.prompts.device)
        a = (batch.prompts[:, : self.max_digits] * powers).sum(dim=1)
        b = (batch.prompts[:, self.max_digits + 1: 2 * self.max_digits + 1] * powers).sum(dim=1)
        return a, b

    def reward(self, batch: Batch, responses: Tensor) -> Tensor:
        """1.0 where the response is exactly the answer's digits followed by EOS, else 0.0 (float32 ``[B]``)."""
        target, target_mask = self.answers(batch)
        match = (responses == target) | ~target_mask
        return match.all(dim=1).float()


class DigitSumTask(DigitTask):
    """``S + n =``: write ``n`` digits whose sum is ``S``, then EOS.

    The prompt is ``[S mod 10, S div 10, +, n, =]``; ``S`` is uniform in ``0..9n``.
    The reference answer (the warm start's target) draws each digit uniformly
    among those that leave a reachable remainder, so supervised learning teaches
    a spread-out policy over the many right answers.

    Args:
        max_len: answers have at most this many digits (buckets ``1..max_len``), at most 9.
    """

    name = "digitsum"

    def __init__(self, max_len: int = 4) -> None:
        self.max_len = _check_size(max_len, "max_len", 9)
        self.prompt_len = 5
        self.answer_len = max_len + 1
        self.buckets = list(range(1, max_len + 1))

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "max_len": self.max_len}

    def make(self, difficulty: Tensor, generator: torch.Generator) -> Batch:
        n = difficulty.long()
        total = (torch.rand(n.numel(), generator=generator, dtype=torch.float64) * (9 * n + 1)).long()
        rest = total.clone()
        digits = []
        for i in range(self.max_len):
            left = (n - i - 1).clamp(min=0)  # digits still to write after this one
            lo = (rest - 9 * left).clamp(min=0)
            hi = rest.clamp(max=9)
            u = torch.rand(n.numel(), generator=generator, dtype=torch.float64)
            d = torch.where(i < n, lo + (u * (hi - lo + 1)).long(), torch.zeros_like(n))
            digits.append(d)
            rest = rest - d
        prompts = torch.stack(
            [total % 10, total // 10, torch.full_like(n, PLUS), n, torch.full_like(n, EQUALS)], dim=1
        )
        return Batch(prompts=prompts, difficulty=n, reference=_end_at(torch.stack(digits, dim=1), n, self.answer_len))

    def reward(self, batch: Batch, responses: Tensor) -> Tensor:
        """1.0 where the response is ``n`` digits summing to ``S`` followed by EOS, else 0.0."""
        total = batch.prompts[:, 0] + 10 * batch.prompts[:, 1]
        n = batch.prompts[:, 3]
        pos = torch.arange(responses.shape[1], device=responses.device)[None, :]
        body = pos < n[:, None]
        digits_ok = ((responses < 10) | ~body).all(dim=1)
        ends = responses.gather(1, n[:, None]).squeeze(1) == EOS
        sums = torch.where(body, responses, torch.zeros_like(responses)).sum(dim=1) == total
        return (digits_ok & ends & sums).float()


BUILTIN_TASKS = {"addition": AdditionTask, "digitsum": DigitSumTask}
