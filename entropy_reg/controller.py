"""One global entropy coefficient, moved every step so measured entropy tracks the target.

AER's idea (arXiv 2510.10959, abstract): "dynamic global coefficient
adjustment". The update law is not public, so the rule is a parameter. With
``e = (target - H_bar) / target`` (relative error, dimensionless; ``H_bar`` the
smoothed entropy below; entropies in nats):

- ``"log"`` (default): ``log alpha += lr * e``, multiplicative like SAC's
  temperature update. Both the error and the step are relative, so no setting
  depends on the loss's scale or the model's entropy; it needs
  ``initial > 0`` and ``min_value > 0``.
- ``"proportional"``: ``alpha += lr * e``, an integral controller whose ``lr``
  is in alpha's units.
- ``"sign"``: ``alpha += lr * sign(e)``, the fixed-step rule of Skywork-OR1 and TRL.

After every update alpha is clipped to ``[min_value, max_value]``. A smoothed
entropy below the target never lowers the integral and one above it never
raises it (the updates are written so that floating-point rounding keeps this too).

``damping`` adds a proportional term, making the rule a PI controller: the
rule above moves an integral ``I`` (clipped to the same bounds, so it never
winds up past them), and

- ``"log"``: ``alpha = clip(I * exp(damping * e))`` (relative, like ``lr``);
- ``"proportional"``: ``alpha = clip(I + damping * e)``.

An integral alone on a plant that responds with a lag (entropy moves several
steps after alpha does) overshoots and cycles; the proportional term damps the
loop. With ``damping > 0`` alpha also falls while entropy, still below the
target, climbs towards it.

``smoothing`` is the weight ``beta`` of an exponential moving average of the
measured entropy, and the error is taken on that average:

    H_bar_k = beta * H_bar_{k-1} + (1 - beta) * H_k,   H_bar_1 = H_1

A per-step entropy measured on a few hundred responses moves by 10-30% from
step to step on its own; fed to the proportional term, that noise becomes
alpha's step-to-step jitter. The average cuts the noise by
``sqrt((1 - beta) / (1 + beta))`` (0.23 for 0.9) and delays the signal by about
``beta / (1 - beta)`` steps (9 for 0.9). That delay is lag in the loop: on a
plant that itself answers late, a large ``lr`` on the average cycles slowly
(``lr = 0.1`` does on a plant answering 10 steps late; see the defaults below).

Defaults. The rule, ``lr``, ``damping`` and ``smoothing`` were chosen by
``benchmarks/aer_study.py`` on its tuning setting (digitsum task, small policy,
150 GRPO steps, 10 seeds) among nine candidates: the highest mean AUC of
held-out pass@1 among those whose alpha jitters less than 10% a step and that
hold a plant answering 10 steps late (``tests/test_study_controller.py``). That is the log rule, ``lr = 0.05``,
``damping = 1``, ``smoothing = 0.9``: AUC 0.682 +/- 0.025 (no entropy term:
0.683 +/- 0.020), alpha's mean relative step-to-step change 0.025, against
0.22-0.37 for the same rule on the raw entropy and 0.13 for the additive
integral rule the demo used before. ``lr = 0.1`` on the average scored 0.680
but cycles on the lagged plant (alpha's coefficient of variation 0.6-1.0).
On that setting the chosen controller moves slowly: it left alpha near 0.003
and let entropy fall as far as no entropy term does, and no candidate and no
fixed coefficient beat the no-entropy AUC (README, "Does AER help?"). The
range is the one setting that carries a scale, and it is the user's to check:

- ``max_value = 1e-2``: the ceiling of AReaL's adaptive entropy coefficient
  (clipped to [1e-5, 1e-2]); Skywork-OR1 caps at 5e-3, TRL at 1. Entropy
  coefficients used in practice for LLM RL lie between 1e-4 and 1e-2.
- ``min_value`` (and ``initial``) ``= 1e-4`` for the log rule, the low end of
  that practice (0 for the additive rules).
- ``lr`` for ``"proportional"`` and ``"sign"``: 1e-4, Skywork-OR1's per-step
  increment (not tuned here).

A model whose useful coefficients lie elsewhere (the demo's 100k-parameter
policy blows its entropy up only above 0.1) needs its own range: the fixed
coefficient that barely moves entropy as ``min_value``, and one below the one
that blows it up as ``max_value``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from .checks import as_count, as_scalar, as_state

__all__ = [
    "GlobalCoefficientController", "COEF_RULES", "DEFAULT_DAMPING", "DEFAULT_LR", "DEFAULT_MAX_VALUE",
    "DEFAULT_MIN_VALUE", "DEFAULT_RULE", "DEFAULT_SMOOTHING",
]


def _additive(x: float, gain: float, err: float) -> float:
    return x + gain * err


def _signed(x: float, gain: float, err: float) -> float:
    return x + gain * float((err > 0) - (err < 0))


def _multiplicative(x: float, gain: float, err: float) -> float:
    # x * exp(.) rather than exp(log x + .): exp(y) >= 1 for y >= 0, so rounding can
    # never move x against the error's sign.
    return x * math.exp(min(gain * err, 700.0))


# The registered rules: each moves x (alpha, or its integral) by a gain times the relative error e.
# One source of truth for the names; a new rule is one entry here and one in each DEFAULT_* by rule.
COEF_RULES: dict[str, Callable[[float, float, float], float]] = {
    "proportional": _additive,
    "sign": _signed,
    "log": _multiplicative,
}
DEFAULT_RULE = "log"
DEFAULT_LR = {"proportional": 1e-4, "sign": 1e-4, "log": 0.05}
DEFAULT_DAMPING = {"proportional": 0.0, "sign": 0.0, "log": 1.0}
DEFAULT_MIN_VALUE = {"proportional": 0.0, "sign": 0.0, "log": 1e-4}
DEFAULT_MAX_VALUE = 1e-2
DEFAULT_SMOOTHING = 0.9


class GlobalCoefficientController:
    """The global entropy coefficient alpha (dimensionless weight of the entropy bonus).

    Every argument left at None takes the rule's default (see the module docstring).

    Args:
        initial: alpha before the first update, within ``[min_value, max_value]``; None: ``min_value``.
        lr: step size, >= 0 (0 freezes the integral); None: ``DEFAULT_LR[rule]``.
        min_value, max_value: clip range, ``0 <= min_value <= max_value``; None for
            ``min_value``: ``DEFAULT_MIN_VALUE[rule]``.
        rule: "log", "proportional" or "sign".
        damping: proportional gain, >= 0, relative for "log" and in alpha units for
            "proportional"; must be 0 for "sign"; None: ``DEFAULT_DAMPING[rule]``.
        smoothing: the moving average's weight ``beta``, in ``[0, 1)`` (0: the raw entropy).

    Attributes:
        value: the current coefficient.
        integral: the integral term ``I`` (equal to ``value`` when ``damping`` is 0).
        smoothed: the averaged entropy ``H_bar`` (nats) the last error came from; None before
            the first update.
    """

    def __init__(
        self,
        initial: float | None = None,
        *,
        lr: float | None = None,
        min_value: float | None = None,
        max_value: float = DEFAULT_MAX_VALUE,
        rule: str = DEFAULT_RULE,
        damping: float | None = None,
        smoothing: float = DEFAULT_SMOOTHING,
    ) -> None:
        if not isinstance(rule, str):
            raise TypeError(f"rule must be a str, got {type(rule).__name__}")
        if rule not in COEF_RULES:
            raise ValueError(f"rule must be one of {tuple(COEF_RULES)}, got {rule!r}")
        self.rule = rule
        self.lr = DEFAULT_LR[rule] if lr is None else as_scalar(lr, "lr", low=0.0)
        self.min_value = DEFAULT_MIN_VALUE[rule] if min_value is None else as_scalar(min_value, "min_value", low=0.0)
        self.max_value = as_scalar(max_value, "max_value", low=0.0)
        if self.min_value > self.max_value:
            raise ValueError(f"min_value ({self.min_value}) must be <= max_value ({self.max_value})")
        if rule == "log" and self.min_value <= 0.0:
            raise ValueError("min_value must be > 0 for rule='log' (alpha moves multiplicatively)")
        self.damping = DEFAULT_DAMPING[rule] if damping is None else as_scalar(damping, "damping", low=0.0)
        if rule == "sign" and self.damping > 0.0:
            raise ValueError("damping must be 0 for rule='sign' (its steps do not depend on the error's size)")
        self.smoothing = as_scalar(smoothing, "smoothing", low=0.0)
        if self.smoothing >= 1.0:
            raise ValueError(f"smoothing must be < 1 (1 would never move the average), got {self.smoothing}")
        self.value = self.min_value if initial is None else self._check_value(initial, "initial")
        self.integral = self.value
        self.steps = 0
        self.last_error: float | None = None
        self.smoothed: float | None = None

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
        if self.smoothed is not None:
            # a convex combination of finite non-negative numbers: finite and >= 0 again
            h = self.smoothing * self.smoothed + (1.0 - self.smoothing) * h
        # e <= 1 always (h >= 0), but h / t overflows for a tiny target (H = 1, t = 1e-310);
        # -float max is the same full step down and keeps the state finite (JSON-safe).
        err = max((t - h) / t, -sys.float_info.max)
        self.integral = self._clip(self._move(self.integral, self.lr, err))
        self.value = self._clip(self._move(self.integral, self.damping, err))
        self.last_error = err
        self.smoothed = h
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
        """JSON-safe state: ``{"value", "integral", "steps", "last_error", "smoothed"}``."""
        return {"value": self.value, "integral": self.integral, "steps": self.steps, "last_error": self.last_error,
                "smoothed": self.smoothed}

    def _parse_state(self, state: dict[str, Any], name: str = "state") -> dict[str, Any]:
        state = as_state(state, ("value", "integral", "steps", "last_error", "smoothed"), name)
        last, smoothed = state["last_error"], state["smoothed"]
        return {
            "value": self._check_value(state["value"], f"{name}['value']"),
            "integral": self._check_value(state["integral"], f"{name}['integral']"),
            "steps": as_count(state["steps"], f"{name}['steps']"),
            "last_error": None if last is None else as_scalar(last, f"{name}['last_error']", high=1.0),
            "smoothed": None if smoothed is None else as_scalar(smoothed, f"{name}['smoothed']", low=0.0),
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
        self.smoothed = parsed["smoothed"]

    def metrics(self, prefix: str = "aer/") -> dict[str, float]:
        """``{prefix}coef`` and, after the first update, ``{prefix}rel_error`` = (target - H_bar) / target
        and ``{prefix}entropy_smoothed`` = H_bar (nats), the average the error came from."""
        out = {f"{prefix}coef": self.value}
        if self.last_error is not None:
            out[f"{prefix}rel_error"] = self.last_error
        if self.smoothed is not None:
            out[f"{prefix}entropy_smoothed"] = self.smoothed
        return out
