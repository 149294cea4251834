"""One global entropy coefficient, moved every step so measured entropy tracks the target.

AER's idea (arXiv 2510.10959, abstract): "dynamic global coefficient
adjustment". The update law is not public, so the rule is a parameter. With
``e = (target - entropy) / target`` (relative error, dimensionless; entropies
in nats):

- ``"proportional"`` (default): ``alpha += lr * e``. An integral controller on
  the relative error, so one ``lr`` serves models whose entropies differ
  tenfold. This library's default.
- ``"sign"``: ``alpha += lr * sign(target - entropy)``, the fixed-step rule of
  Skywork-OR1 and TRL.
- ``"log"``: ``log alpha += lr * e``, multiplicative like SAC's temperature
  update; scale-free in alpha, so it needs ``initial > 0`` and ``min_value > 0``.

After every update alpha is clipped to ``[min_value, max_value]``. Entropy
below the target never lowers alpha and entropy above it never raises it (the
updates are written so that floating-point rounding keeps this too).

``damping`` (default 0) adds a proportional term, making the rule a PI
controller: the rule above moves an integral ``I`` (clipped to the same
bounds, so it never winds up past them), and

- ``"proportional"``: ``alpha = clip(I + damping * e)``;
- ``"log"``: ``alpha = clip(I * exp(damping * e))`` (relative, like ``lr``).

An integral alone on a plant that responds with a lag (entropy moves several
steps after alpha does) overshoots and cycles; the proportional term damps the
loop. With ``damping > 0`` the monotone property holds for ``I``; alpha itself
also falls while entropy, still below the target, climbs towards it.

Defaults and where they come from (entropy coefficients used in practice for
LLM RL lie between 1e-4 and 1e-2):

- ``max_value = 1e-2``: the ceiling of AReaL's adaptive entropy coefficient
  (clipped to [1e-5, 1e-2]); Skywork-OR1 caps at 5e-3, TRL at 1.
- ``lr`` for ``"proportional"`` and ``"sign"``: 1e-4, Skywork-OR1's per-step
  increment; the proportional rule takes that full step when entropy has
  collapsed to 0 and proportionally smaller ones near the target.
- ``lr`` for ``"log"``: 0.05, i.e. alpha changes by at most ~5% per step
  (this library's choice; SAC's 3e-4 is an Adam learning rate, not comparable).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from .checks import as_count, as_scalar, as_state

__all__ = ["GlobalCoefficientController", "COEF_RULES", "DEFAULT_LR", "DEFAULT_MAX_VALUE"]


def _additive(x: float, gain: float, err: float) -> float:
    return x + gain * err


def _signed(x: float, gain: float, err: float) -> float:
    return x + gain * float((err > 0) - (err < 0))


def _multiplicative(x: float, gain: float, err: float) -> float:
    # x * exp(.) rather than exp(log x + .): exp(y) >= 1 for y >= 0, so rounding can
    # never move x against the error's sign.
    return x * math.exp(min(gain * err, 700.0))


# The registered rules: each moves x (alpha, or its integral) by a gain times the relative error e.
# One source of truth for the names; a new rule is one entry here and one in DEFAULT_LR.
COEF_RULES: dict[str, Callable[[float, float, float], float]] = {
    "proportional": _additive,
    "sign": _signed,
    "log": _multiplicative,
}
DEFAULT_LR = {"proportional": 1e-4, "sign": 1e-4, "log": 0.05}
DEFAULT_MAX_VALUE = 1e-2


class GlobalCoefficientController:
    """The global entropy coefficient alpha (dimensionless weight of the entropy bonus).

    Args:
        initial: alpha before the first update, within ``[min_value, max_value]``.
        lr: step size, >= 0 (0 freezes alpha); None picks ``DEFAULT_LR[rule]``.
        min_value, max_value: clip range, ``0 <= min_value <= max_value``.
        rule: "proportional", "sign" or "log" (see the module docstring).
        damping: proportional gain, >= 0, for "proportional" (alpha units) and "log"
            (relative); 0 for "sign".

    Attributes:
        value: the current coefficient.
        integral: the integral term ``I`` (equal to ``value`` when ``damping`` is 0).
    """

    def __init__(
        self,
        initial: float = 0.0,
        *,
        lr: float | None = None,
        min_value: float = 0.0,
        max_value: float = DEFAULT_MAX_VALUE,
        rule: str = "proportional",
        damping: float = 0.0,
    ) -> None:
        if not isinstance(rule, str):
            raise TypeError(f"rule must be a str, got {type(rule).__name__}")
        if rule not in COEF_RULES:
            raise ValueError(f"rule must be one of {tuple(COEF_RULES)}, got {rule!r}")
        self.rule = rule
        self.lr = DEFAULT_LR[rule] if lr is None else as_scalar(lr, "lr", low=0.0)
        self.min_value = as_scalar(min_value, "min_value", low=0.0)
        self.max_value = as_scalar(max_value, "max_value", low=0.0)
        if self.min_value > self.max_value:
            raise ValueError(f"min_value ({self.min_value}) must be <= max_value ({self.max_value})")
        if rule == "log" and self.min_value <= 0.0:
            raise ValueError("min_value must be > 0 for rule='log' (alpha moves multiplicatively)")
        self.damping = as_scalar(damping, "damping", low=0.0)
        if rule == "sign" and self.damping > 0.0:
            raise ValueError("damping must be 0 for rule='sign' (its steps do not depend on the error's size)")
        self.value = self._check_value(initial, "initial")
        self.integral = self.value
        self.steps = 0
        self.last_error: float | None = None

    def _check_value(self, value: Any, name: str) -> float:
        v = as_scalar(value, name)
        if not self.min_value <= v <= self.max_value:
            raise ValueError(f"{name} must lie in [min_value, max_value] = [{self.min_value}, {self.max_value}], got {v}")
        return v

    def update(self, entropy: float, target: float) -> float:
        """One control step from this step's entropy and target (nats); returns the new alpha.

        ``entropy`` (>= 0) should already be reduced across ranks
        (:func:`entropy_reg.masked_mean`) so every rank computes the same alpha.
        The relative error is floored at ``-sys.float_info.max`` where ``entropy / target``
        overflows a float, so the state stays finite.
        """
        h = as_scalar(entropy, "entropy", low=0.0)
        t = as_scalar(target, "target", low=0.0, low_inclusive=False)
        # e <= 1 always (h >= 0), but h / t overflows for a tiny target (H = 1, t = 1e-310);
        # -float max is the same full step down and keeps the state finite (JSON-safe).
        err = max((t - h) / t, -sys.float_info.max)
        self.integral = self._clip(self._move(self.integral, self.lr, err))
        self.value = self._clip(self._move(self.integral, self.damping, err))
        self.last_error = err
        self.steps += 1
        return self.value

    def _move(self, x: float, gain: float, err: float) -> float:
        """``x`` moved by the rule's step of ``gain`` times ``err`` (see ``COEF_RULES``)."""
        if gain == 0.0:  # 0 * inf would be NaN for a huge entropy/target ratio
            return x
        return COEF_RULES[self.rule](x, gain, err)

    def _clip(self, x: float) -> float:
        return min(max(x, self.min_value), self.max_value)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: ``{"value", "integral", "steps", "last_error"}``."""
        return {"value": self.value, "integral": self.integral, "steps": self.steps, "last_error": self.last_error}

    def _parse_state(self, state: dict[str, Any], name: str = "state") -> dict[str, Any]:
        state = as_state(state, ("value", "integral", "steps", "last_error"), name)
        last = state["last_error"]
        return {
            "value": self._check_value(state["value"], f"{name}['value']"),
            "integral": self._check_value(state["integral"], f"{name}['integral']"),
            "steps": as_count(state["steps"], f"{name}['steps']"),
            "last_error": None if last is None else as_scalar(last, f"{name}['last_error']", high=1.0),
        }

    def load_state_dict(self, state: dict[str, Any], *, name: str = "state") -> None:
        """Restore :meth:`state_dict` output; validates everything before changing anything.

        ``name`` is how error messages call ``state`` (e.g. ``"state['controller']"``).
        """
        self._apply(self._parse_state(state, name))

    def _apply(self, parsed: dict[str, Any]) -> None:
        self.value = parsed["value"]
        self.integral = parsed["integral"]
        self.steps = parsed["steps"]
        self.last_error = parsed["last_error"]

    def metrics(self, prefix: str = "aer/") -> dict[str, float]:
        """``{prefix}coef`` and, after the first update, ``{prefix}rel_error`` = (target - H) / target."""
        out = {f"{prefix}coef": self.value}
        if self.last_error is not None:
            out[f"{prefix}rel_error"] = self.last_error
        return out
