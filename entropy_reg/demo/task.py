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

:class:`OrderedSumTask` (``modes``) is the task built for exploration (the regime
where entropy collapse costs): digitsum whose prompts also name an order, a
finite training pool and a disjoint test split, and a warm start that sees the
rare order's answers only at a small rate (see the class).

A task for :mod:`entropy_reg.demo` or ``benchmarks/aer_study.py`` is any object
with the members of :class:`Task` (subclassing :class:`DigitTask` gives
``sample``, ``answers`` and ``response_mask``); ``--task module:factory``
plugs one in.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

PLUS = 10
EQUALS = 11
EOS = 12
VOCAB_SIZE = 13
# The order tokens of OrderedSumTask (its vocabulary is VOCAB_SIZE + 2).
ASCENDING = 13
DESCENDING = 14


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


@runtime_checkable
class PoolTask(Task, Protocol):
    """A task with a finite training pool and a disjoint test split (as RLVR runs iterate a
    fixed data set in epochs). The demo's GRPO then draws its prompts from ``split("pool")``
    in shuffled epochs, tracks the pool's coverage, and evaluates on ``split("test")``.
    ``warm_sample`` draws the warm start's data (which may differ from the right answers)."""

    def split(self, name: str) -> Batch:
        """The fixed prompts of ``name`` ("pool" or "test"), with right reference answers."""

    def warm_sample(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` supervised examples for the warm start."""


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


def _digitsum_answers(n: Tensor, total: Tensor, width: int, generator: torch.Generator) -> Tensor:
    """``[B, width]``: ``n`` digits summing to ``total`` (zeros after them), each digit uniform among
    those that leave a reachable remainder."""
    rest = total.clone()
    digits = []
    for i in range(width):
        left = (n - i - 1).clamp(min=0)  # digits still to write after this one
        lo = (rest - 9 * left).clamp(min=0)
        hi = rest.clamp(max=9)
        u = torch.rand(n.numel(), generator=generator, dtype=torch.float64)
        d = torch.where(i < n, lo + (u * (hi - lo + 1)).long(), torch.zeros_like(n))
        digits.append(d)
        rest = rest - d
    return torch.stack(digits, dim=1)


def _sums_to_target(batch: Batch, responses: Tensor) -> tuple[Tensor, Tensor]:
    """(right [B], body [B, L]): whether each response is ``n`` digits summing to ``S`` then EOS
    (prompt ``S % 10, S // 10, _, n``), and which positions are its ``n`` digits."""
    total = batch.prompts[:, 0] + 10 * batch.prompts[:, 1]
    n = batch.prompts[:, 3]
    pos = torch.arange(responses.shape[1], device=responses.device)[None, :]
    body = pos < n[:, None]
    digits_ok = ((responses < 10) | ~body).all(dim=1)
    ends = responses.gather(1, n[:, None]).squeeze(1) == EOS
    sums = torch.where(body, responses, torch.zeros_like(responses)).sum(dim=1) == total
    return digits_ok & ends & sums, body


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
        digits = _digitsum_answers(n, total, self.max_len, generator)
        prompts = torch.stack(
            [total % 10, total // 10, torch.full_like(n, PLUS), n, torch.full_like(n, EQUALS)], dim=1
        )
        return Batch(prompts=prompts, difficulty=n, reference=_end_at(digits, n, self.answer_len))

    def reward(self, batch: Batch, responses: Tensor) -> Tensor:
        """1.0 where the response is ``n`` digits summing to ``S`` followed by EOS, else 0.0."""
        return _sums_to_target(batch, responses)[0].float()


class OrderedSumTask(DigitTask):
    """``S n ORDER =``: write ``n`` digits that sum to ``S``, in the order the prompt names, then EOS.

    The prompt is ``[S mod 10, S div 10, ORDER, n, =]`` with ``ORDER`` the token
    :data:`ASCENDING` (digits non-decreasing: the common mode) or :data:`DESCENDING`
    (non-increasing: the rare mode). Buckets: 0 = ascending prompts, 1 = descending.

    Built so that exploration decides what gets solved:

    - **finite pool, disjoint test split**: every prompt ``(S, n, ORDER)`` with
      ``1 <= n <= max_len`` (``2 * sum_n (9n + 1)`` prompts, 280 for ``max_len = 5``) goes,
      by a fixed permutation, to the training pool (``pool_fraction`` of them) or the test split;
    - **a rare answer mode**: the warm start's data (:meth:`warm_sample`) answers a
      descending prompt in descending order only with probability ``rare_rate`` and in
      ascending order otherwise (the base model's habit), so the warm-started policy
      samples right answers to descending prompts rarely. A policy whose entropy has
      collapsed onto the ascending habit never samples them, and what is never sampled is
      never reinforced.

    Prompts whose answer is unique (``S = 0`` or ``9n``, or ``n = 1``) read the same in both
    orders. Args: ``max_len`` (at most 9), ``rare_rate`` in [0, 1], ``pool_fraction`` in (0, 1).
    """

    name = "modes"
    vocab_size = VOCAB_SIZE + 2
    buckets = [0, 1]
    bucket_names = {0: "ascending (common mode)", 1: "descending (rare mode)"}
    warm_difficulty_probs = (0.5, 0.5)
    SPLIT_SEED = 20_251_012

    def __init__(self, max_len: int = 5, rare_rate: float = 0.1, pool_fraction: float = 0.6) -> None:
        self.max_len = _check_size(max_len, "max_len", 9)
        for value, name, closed in ((rare_rate, "rare_rate", True), (pool_fraction, "pool_fraction", False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0):
                raise ValueError(f"{name} must be in {'[0, 1]' if closed else '(0, 1)'}, got {value}")
        self.rare_rate = float(rare_rate)
        self.pool_fraction = float(pool_fraction)
        self.prompt_len = 5
        self.answer_len = max_len + 1
        order, n, total = [], [], []
        for mode in self.buckets:
            for length in range(1, max_len + 1):
                for s in range(9 * length + 1):
                    order.append(mode)
                    n.append(length)
                    total.append(s)
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.SPLIT_SEED))
        cut = round(self.pool_fraction * len(order))
        self._all = (torch.tensor(order)[perm], torch.tensor(n)[perm], torch.tensor(total)[perm])
        self._splits = {"pool": slice(0, cut), "test": slice(cut, len(order))}

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "max_len": self.max_len, "rare_rate": self.rare_rate,
                "pool_fraction": self.pool_fraction, "split_seed": self.SPLIT_SEED}

    def split(self, name: str) -> Batch:
        if name not in self._splits:
            raise ValueError(f"split must be 'pool' or 'test', got {name!r}")
        order, n, total = (t[self._splits[name]] for t in self._all)
        return self._batch(order, n, total, order == 1, torch.Generator().manual_seed(self.SPLIT_SEED))

    def make(self, difficulty: Tensor, generator: torch.Generator) -> Batch:
        """Prompts of the given orders (0 ascending, 1 descending), ``n`` and ``S`` uniform."""
        order = difficulty.long()
        n = 1 + (torch.rand(order.numel(), generator=generator, dtype=torch.float64) * self.max_len).long()
        total = (torch.rand(order.numel(), generator=generator, dtype=torch.float64) * (9 * n + 1)).long()
        return self._batch(order, n, total, order == 1, generator)

    def warm_sample(self, n: int, generator: torch.Generator) -> Batch:
        """Warm-start data: prompts of both orders from the pool, each answered ascending except a
        descending prompt's, answered descending with probability ``rare_rate``."""
        order, length, total = (t[self._splits["pool"]] for t in self._all)
        index = torch.randint(0, order.numel(), (n,), generator=generator)
        order, length, total = order[index], length[index], total[index]
        rare = (order == 1) & (torch.rand(n, generator=generator, dtype=torch.float64) < self.rare_rate)
        return self._batch(order, length, total, rare, generator)

    def _batch(self, order: Tensor, n: Tensor, total: Tensor, descending: Tensor,
               generator: torch.Generator) -> Batch:
        digits = _digitsum_answers(n, total, self.max_len, generator)
        # Sort the n real digits (the zeros after them sort to the end: large keys).
        pos = torch.arange(self.max_len)[None, :]
        keys = torch.where(pos < n[:, None], digits, torch.full_like(digits, 100))
        up = keys.sort(dim=1).values
        # Descending: the n real digits of ``up`` read backwards.
        down = torch.gather(up, 1, (n[:, None] - 1 - pos).clamp(min=0))
        ordered = torch.where(descending[:, None], down, up)
        ordered = torch.where(pos < n[:, None], ordered, torch.zeros_like(ordered))
        prompts = torch.stack([total % 10, total // 10, torch.where(order == 1, DESCENDING, ASCENDING), n,
                               torch.full_like(n, EQUALS)], dim=1)
        return Batch(prompts=prompts, difficulty=order, reference=_end_at(ordered, n, self.answer_len))

    def reward(self, batch: Batch, responses: Tensor) -> Tensor:
        """1.0 where the response is ``n`` digits summing to ``S`` in the prompt's order, then EOS."""
        right, body = _sums_to_target(batch, responses)
        descending = batch.prompts[:, 2] == DESCENDING
        step = responses[:, 1:] - responses[:, :-1]  # consecutive differences within the body
        ordered = torch.where(descending[:, None], step <= 0, step >= 0) | ~body[:, 1:]
        return (right & ordered.all(dim=1)).float()


def long_ordered_sum() -> OrderedSumTask:
    """``modes-long``: :class:`OrderedSumTask` with answers of up to 6 digits (a bigger pool, rarer orders)."""
    return OrderedSumTask(max_len=6)


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "addition": AdditionTask, "digitsum": DigitSumTask, "modes": OrderedSumTask, "modes-long": long_ordered_sum,
}
