"""Target entropy anchored to the policy's own initial entropy.

AER's idea (arXiv 2510.10959, abstract): the target is a fraction of the
policy's initial entropy rather than an absolute number of nats, so one
setting serves models whose entropies differ tenfold (an absolute target such
as TRL's 0.2 nats rarely triggers on some models and always on others).

This library's defaults and extensions:

- the anchor ``H0`` is the mean of the first ``warmup_steps`` entropy values
  fed to :meth:`AnchoredTarget.update` (default 1: the first step's entropy),
  or ``initial_entropy`` when the caller measured it, e.g. on the reference
  policy;
- ``ratio=0.5``: the target is half the initial entropy (a moderate band below
  the initial level; the paper's value is not public);
- an optional linear schedule of the ratio from ``ratio`` to ``final_ratio``
  over ``schedule_steps`` updates after anchoring.

    target_k = r_k * H0,   r_k = ratio + (final_ratio - ratio) * min(k / schedule_steps, 1)

where ``k`` counts the updates after the one that fixed the anchor (``k = 0``
on that update; with ``initial_entropy``, on the first update). Entropies are
in nats.
"""

from __future__ import annotations

import math
from typing import Any

from .checks import as_count, as_scalar, as_state

__all__ = ["AnchoredTarget"]


class AnchoredTarget:
    """``ratio * H0``, with ``H0`` the policy's initial entropy (nats).

    Args:
        ratio: target / initial entropy, > 0 (default 0.5).
        warmup_steps: number of entropy values averaged into the anchor, >= 1.
        initial_entropy: the anchor itself (> 0 nats), skipping the warm-up.
        final_ratio: when given (> 0), the ratio moves linearly to it over
            ``schedule_steps`` (>= 1) updates after anchoring (this library's
            extension; the paper keeps a fixed ratio as far as the abstract says).
        schedule_steps: length of that schedule; 0 when ``final_ratio`` is None.

    Attributes:
        value: the current target in nats, None until anchored.
        anchor: ``H0`` in nats, None until anchored; never moves afterwards.
    """

    def __init__(
        self,
        ratio: float = 0.5,
        *,
        warmup_steps: int = 1,
        initial_entropy: float | None = None,
        final_ratio: float | None = None,
        schedule_steps: int = 0,
    ) -> None:
        self.ratio = as_scalar(ratio, "ratio", low=0.0, low_inclusive=False)
        self.warmup_steps = as_count(warmup_steps, "warmup_steps", low=1)
        self.final_ratio = None if final_ratio is None else as_scalar(final_ratio, "final_ratio", low=0.0, low_inclusive=False)
        self.schedule_steps = as_count(schedule_steps, "schedule_steps", low=0)
        if self.final_ratio is not None and self.schedule_steps == 0:
            raise ValueError("schedule_steps must be >= 1 when final_ratio is given")
        if self.final_ratio is None and self.schedule_steps != 0:
            raise ValueError("schedule_steps needs final_ratio (the ratio to move to)")
        self._initial: float | None = None
        if initial_entropy is not None:
            h0 = as_scalar(initial_entropy, "initial_entropy", low=0.0, low_inclusive=False)
            self._initial = self._check_anchor(h0, "initial_entropy")
        self.anchor: float | None = self._initial
        self._warmup_sum = 0.0
        self._warmup_count = 0
        self._anchored_updates = 0  # updates seen since (and including) the anchoring one

    @property
    def current_ratio(self) -> float:
        """The ratio that the next target uses (moves only with the optional schedule)."""
        return self._ratio_at(max(self._anchored_updates - 1, 0))

    @property
    def value(self) -> float | None:
        """Current target in nats (None before the anchor exists)."""
        if self.anchor is None:
            return None
        return self.current_ratio * self.anchor

    def _check_anchor(self, anchor: float, name: str) -> float:
        """``anchor`` (nats) once every target it gives over the schedule is > 0 and finite.

        ``r_k`` is monotone in ``k`` (so is each rounded operation of it), so the
        extreme targets are those at the two ends of the schedule.
        """
        for ratio in (self._ratio_at(0), self._ratio_at(self.schedule_steps)):
            target = ratio * anchor
            if not 0.0 < target < math.inf:
                raise ValueError(
                    f"{name}: an anchor of {anchor} nats gives a target of {target} nats at ratio {ratio}; "
                    "the target must be > 0 and finite"
                )
        return anchor

    def _ratio_at(self, k: int) -> float:
        if self.final_ratio is None:
            return self.ratio
        frac = min(k / self.schedule_steps, 1.0)
        return self.ratio + (self.final_ratio - self.ratio) * frac

    def update(self, entropy: float) -> float | None:
        """Feed this step's mean token entropy (nats, already reduced across ranks).

        Returns the target for this step, or None while the anchor is still
        being measured. The call that completes the warm-up returns a target.
        An entropy that would make the warm-up sum overflow, or an anchor whose
        target rounds to 0 or overflows anywhere on the schedule, raises
        ValueError and changes nothing: the target is always positive and finite.
        """
        h = as_scalar(entropy, "entropy", low=0.0)
        if self.anchor is None:
            total = self._warmup_sum + h
            if total == math.inf:
                raise ValueError(f"entropy: {h} nats makes the warm-up sum of entropies overflow a float")
            count = self._warmup_count + 1
            if count < self.warmup_steps:
                self._warmup_sum, self._warmup_count = total, count
                return None
            anchor = total / count
            if anchor <= 0.0:
                raise ValueError("entropy: the warm-up entropies average to 0, an anchor must be > 0 nats")
            self._check_anchor(anchor, "entropy")
            self._warmup_sum, self._warmup_count, self.anchor = total, count, anchor
        self._anchored_updates += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (plain floats and ints); constructor arguments are not part of it."""
        return {
            "anchor": self.anchor,
            "warmup_sum": self._warmup_sum,
            "warmup_count": self._warmup_count,
            "anchored_updates": self._anchored_updates,
        }

    def _parse_state(self, state: dict[str, Any], name: str = "state") -> dict[str, Any]:
        """Check ``state`` against this object's settings; returns it normalized, changes nothing."""
        state = as_state(state, ("anchor", "warmup_sum", "warmup_count", "anchored_updates"), name)
        anchor = state["anchor"]
        if anchor is not None:
            key = f"{name}['anchor']"
            anchor = self._check_anchor(as_scalar(anchor, key, low=0.0, low_inclusive=False), key)
        parsed = {
            "anchor": anchor,
            "warmup_sum": as_scalar(state["warmup_sum"], f"{name}['warmup_sum']", low=0.0),
            "warmup_count": as_count(state["warmup_count"], f"{name}['warmup_count']"),
            "anchored_updates": as_count(state["anchored_updates"], f"{name}['anchored_updates']"),
        }
        if anchor is None and (parsed["anchored_updates"] or parsed["warmup_count"] >= self.warmup_steps):
            raise ValueError(f"{name}['anchor'] is None but the state says the warm-up is over")
        if anchor is None and self._initial is not None:
            raise ValueError(f"{name}['anchor'] is None but this target was built with initial_entropy")
        return parsed

    def load_state_dict(self, state: dict[str, Any], *, name: str = "state") -> None:
        """Restore :meth:`state_dict` output; validates everything before changing anything.

        ``name`` is how error messages call ``state`` (e.g. ``"state['target']"``).
        """
        self._apply(self._parse_state(state, name))

    def _apply(self, parsed: dict[str, Any]) -> None:
        self.anchor = parsed["anchor"]
        self._warmup_sum = parsed["warmup_sum"]
        self._warmup_count = parsed["warmup_count"]
        self._anchored_updates = parsed["anchored_updates"]

    def metrics(self, prefix: str = "aer/") -> dict[str, float]:
        """``{prefix}target``, ``{prefix}anchor`` (nats) and ``{prefix}target_ratio`` once anchored;
        ``{prefix}warmup_remaining`` before."""
        if self.anchor is None:
            return {f"{prefix}warmup_remaining": float(self.warmup_steps - self._warmup_count)}
        return {
            f"{prefix}target": float(self.value),  # type: ignore[arg-type]
            f"{prefix}anchor": float(self.anchor),
            f"{prefix}target_ratio": self.current_ratio,
        }
