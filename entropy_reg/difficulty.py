"""Difficulty-aware allocation of the entropy bonus across prompts.

AER's idea (arXiv 2510.10959, abstract): hard prompts get more exploration
than easy ones, judged by the current policy's own success on each prompt's
group of rollouts. The functional form is not public; this library offers it
as the ``rule`` parameter. With ``acc_g`` the solved fraction of group ``g``
(a response is solved when its score is above ``success_threshold``):

- ``"linear"`` (default): ``w_g = 1 - acc_g``;
- ``"threshold"``: ``w_g = 1 if acc_g < threshold else 0``;
- ``"uniform"``: ``w_g = 1`` (plain entropy regularization, for ablations);
- any callable mapping a float64 tensor of group accuracies ``[G]`` to
  non-negative finite weights ``[G]``.

With ``normalize=True`` the per-response weights are rescaled to average 1 over
the batch, ``w_i <- w_i * N / sum_j w_j``, so the global coefficient keeps its
meaning whatever the batch's difficulty mix (this library's default; an
all-zero batch stays all-zero). Weights are dimensionless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checks import as_count, as_flag, as_scalar, as_sequence, as_state

__all__ = ["DifficultyAllocator", "DIFFICULTY_RULES", "GroupIds", "group_index"]

DIFFICULTY_RULES = ("linear", "threshold", "uniform")
GroupIds = Tensor | np.ndarray | Sequence[Any]
WeightRule = Callable[[Tensor], Any]

_STAT_KEYS = ("accuracy", "solved_groups", "unsolved_groups", "mixed_groups", "weight_mean", "num_groups")


def group_index(group_ids: GroupIds, n: int) -> tuple[Tensor, int]:
    """Map ``n`` group ids to ``(inverse[n] int64 on CPU, number of groups)``, ``inverse[i]`` in ``[0, G)``.

    Ids are integers or strings, all of one kind: an integer tensor, an integer or
    string numpy array, or any sequence (list, tuple, ``range``, an object array)
    of Python / numpy ints, one-element integer tensors or strings. Floats and
    bools are not ids (``1.0`` and ``True`` would silently merge with ``1``).
    """
    if isinstance(group_ids, (Tensor, np.ndarray)) and group_ids.ndim != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    if isinstance(group_ids, Tensor):
        if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids must hold integers or strings, got dtype {group_ids.dtype}")
        _check_length(len(group_ids), n)
        uniques, inverse = torch.unique(group_ids.detach().cpu(), return_inverse=True)
        return inverse.long(), uniques.numel()
    if isinstance(group_ids, np.ndarray) and group_ids.dtype.kind in "iuU":
        ids = group_ids
    elif isinstance(group_ids, np.ndarray) and group_ids.dtype.kind != "O":
        raise TypeError(f"group_ids must hold integers or strings, got dtype {group_ids.dtype}")
    else:  # any sequence, or an object array: element by element
        items = list(group_ids) if isinstance(group_ids, np.ndarray) else as_sequence(group_ids, "group_ids")
        # type(), not isinstance(): a bool is an int subclass but not an id; plain ints skip the check
        items = [
            x if type(x) is int or isinstance(x, str) else as_count(x, f"group_ids[{i}]", low=None)
            for i, x in enumerate(items)
        ]
        if len({isinstance(x, str) for x in items}) > 1:
            raise TypeError("group_ids must be all integers or all strings, not a mix")
        # An object array, not np.asarray: 1 and "1" are never merged, ints beyond int64 (hashes) stay exact.
        ids = np.empty(len(items), dtype=object)
        ids[:] = items
    _check_length(len(ids), n)
    uniques, inverse = np.unique(ids, return_inverse=True)
    return torch.from_numpy(np.asarray(inverse).reshape(-1).astype(np.int64)), len(uniques)


def _check_length(length: int, n: int) -> None:
    if length != n:
        raise ValueError(f"group_ids has {length} entries but scores has {n}")


class DifficultyAllocator:
    """Per-response weights of the entropy bonus from each prompt group's accuracy.

    Args:
        rule: "linear", "threshold", "uniform", or a callable (see the module docstring).
        threshold: for rule="threshold", groups with accuracy below it get weight 1; in (0, 1].
        success_threshold: a response counts as solved when its score is above it
            (0.5 for 0/1 rewards, 0.0 for +1/-1 rewards).
        normalize: rescale weights to average 1 over the responses.

    Attributes:
        stats: the last batch's statistics (the equivalent of ``.value``): mean
            group accuracy, shares of solved / unsolved / mixed groups, mean weight
            before normalization, number of groups. Empty before the first call.
    """

    def __init__(
        self,
        rule: str | WeightRule = "linear",
        *,
        threshold: float = 0.5,
        success_threshold: float = 0.5,
        normalize: bool = True,
    ) -> None:
        if isinstance(rule, str):
            if rule not in DIFFICULTY_RULES:
                raise ValueError(f"rule must be one of {DIFFICULTY_RULES} or a callable, got {rule!r}")
        elif not callable(rule):
            raise TypeError(f"rule must be a str or a callable, got {type(rule).__name__}")
        self.rule = rule
        self.threshold = as_scalar(threshold, "threshold", low=0.0, low_inclusive=False, high=1.0)
        self.success_threshold = as_scalar(success_threshold, "success_threshold")
        self.normalize = as_flag(normalize, "normalize")
        self.stats: dict[str, float] = {}

    def __call__(self, scores: Tensor | Sequence[float], group_ids: GroupIds) -> Tensor:
        return self.alloc(scores, group_ids)

    def _accuracies(self, scores: Tensor | Sequence[float], group_ids: GroupIds) -> tuple[Tensor, Tensor, torch.device]:
        """(accuracy per group [G] float64, group index per response [N], scores' device)."""
        if isinstance(scores, Tensor):
            s = scores
        elif isinstance(scores, np.ndarray) and scores.dtype.kind in "iuf":
            s = torch.from_numpy(scores.astype(np.float64))
        elif isinstance(scores, np.ndarray) and scores.dtype.kind != "O":
            raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
        else:  # any sequence of numbers (an object array counts as one), each checked as a number
            items = list(scores) if isinstance(scores, np.ndarray) else as_sequence(scores, "scores")
            # plain floats go straight in (NaN / inf are caught below); anything else is checked as a number
            if not all(type(x) is float for x in items):
                items = [as_scalar(x, f"scores[{i}]") for i, x in enumerate(items)]
            s = torch.tensor(items, dtype=torch.float64)
        if s.dim() != 1:
            raise ValueError(f"scores must be 1-D (one score per response), got shape {tuple(s.shape)}")
        if s.numel() == 0:
            raise ValueError("scores is empty: need at least one response")
        if s.dtype == torch.bool or s.is_complex():
            raise TypeError(f"scores must be real numbers, got dtype {s.dtype}")
        device = s.device
        s = s.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("scores must be finite (found NaN or inf)")
        inverse, num_groups = group_index(group_ids, s.numel())
        solved = (s > self.success_threshold).to(torch.float64)
        counts = torch.bincount(inverse, minlength=num_groups).to(torch.float64)
        acc = torch.bincount(inverse, weights=solved, minlength=num_groups) / counts
        return acc, inverse, device

    def group_accuracy(self, scores: Tensor | Sequence[float], group_ids: GroupIds) -> Tensor:
        """Solved fraction of each response's group, ``[N]`` float32 on the scores' device."""
        acc, inverse, device = self._accuracies(scores, group_ids)
        return acc[inverse].to(device, torch.float32)

    def _group_weights(self, acc: Tensor) -> Tensor:
        if self.rule == "linear":
            return 1.0 - acc
        if self.rule == "threshold":
            return (acc < self.threshold).to(torch.float64)
        if self.rule == "uniform":
            return torch.ones_like(acc)
        out = self.rule(acc.clone())  # type: ignore[operator]
        try:
            w = torch.as_tensor(out, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"rule returned {type(out).__name__}, which is not a tensor of weights: {exc}") from None
        if w.shape != acc.shape:
            raise ValueError(
                f"rule must map accuracies of shape {tuple(acc.shape)} to weights of the same shape, got {tuple(w.shape)}"
            )
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("rule must return finite, non-negative weights")
        return w

    def alloc(self, scores: Tensor | Sequence[float], group_ids: GroupIds) -> Tensor:
        """Weights ``[N]`` float32 on the scores' device, one per response.

        ``scores[N]``: one verifiable reward per response (a tensor, an array, or
        any sequence of real numbers); ``group_ids[N]``: the prompt each response
        answers (integers or strings, see :func:`group_index`). Vectorized over
        responses and groups, and equivariant under any permutation of the
        responses. Bad input raises and leaves :attr:`stats` as they were.
        """
        acc, inverse, device = self._accuracies(scores, group_ids)
        weights = self._group_weights(acc)[inverse]
        raw_mean = float(weights.mean())
        if raw_mean == math.inf:  # finite weights near the float maximum: their sum overflows
            raise ValueError("rule returned weights whose mean overflows a float; scale them down")
        if self.normalize and raw_mean > 0.0:
            weights = weights / raw_mean
        self.stats = {
            "accuracy": float(acc.mean()),
            "solved_groups": float((acc == 1.0).to(torch.float64).mean()),
            "unsolved_groups": float((acc == 0.0).to(torch.float64).mean()),
            "mixed_groups": float(((acc > 0.0) & (acc < 1.0)).to(torch.float64).mean()),
            "weight_mean": raw_mean,
            "num_groups": float(acc.numel()),
        }
        return weights.to(device, torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: the last batch's statistics (weights depend on nothing else)."""
        return {"stats": dict(self.stats)}

    def _parse_state(self, state: dict[str, Any], name: str = "state") -> dict[str, Any]:
        stats = as_state(state, ("stats",), name)["stats"]
        if not isinstance(stats, dict):
            raise TypeError(f"{name}['stats'] must be a dict, got {type(stats).__name__}")
        if stats:
            as_state(stats, _STAT_KEYS, f"{name}['stats']")
        return {"stats": {k: as_scalar(v, f"{name}['stats'][{k!r}]", low=0.0) for k, v in stats.items()}}

    def load_state_dict(self, state: dict[str, Any], *, name: str = "state") -> None:
        """Restore :meth:`state_dict` output; validates everything before changing anything.

        ``name`` is how error messages call ``state`` (e.g. ``"state['target']"``).
        """
        self._apply(self._parse_state(state, name))

    def _apply(self, parsed: dict[str, Any]) -> None:
        self.stats = dict(parsed["stats"])

    def metrics(self, prefix: str = "aer/") -> dict[str, float]:
        """``{prefix}difficulty/<stat>`` for each entry of :attr:`stats`."""
        return {f"{prefix}difficulty/{k}": v for k, v in self.stats.items()}
