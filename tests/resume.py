"""Property check shared by the controllers' tests: every state a call sequence reaches is
JSON-safe (no NaN / inf), and an object resumed from it continues bit-for-bit.

Also the hypothesis strategies for such sequences: numbers from the float range's
edges (0, subnormals, 1e308, the float maximum), any finite float, the kinds of
number every entry point must accept (numpy scalars, 0-d tensors), and inputs
that must be rejected (negative, NaN, inf, 10**400, bools, strings, None).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

EDGES = [0.0, 5e-324, 1e-310, sys.float_info.min, 1e-300, 1e-3, 0.5, 1.0, 7.0, 1e300, 1e308, sys.float_info.max]
EXTREMES = [5e-324, 1e-310, 1e307, 1e308, sys.float_info.max]  # where sums, products and quotients leave the range
BAD = [-1.0, -5e-324, float("nan"), float("inf"), -float("inf"), 10**400, True, "1.0", None]

def _float32(x: float) -> np.float32:
    with np.errstate(over="ignore"):  # 1e308 becomes inf, on purpose
        return np.float32(x)


# Non-negative finite floats, most of them at the edges of the float range.
finite = st.one_of(
    st.sampled_from(EDGES), st.sampled_from(EXTREMES), st.floats(min_value=0.0, max_value=sys.float_info.max)
)
# The same values as other kinds of real number (a float32 tensor of 1e308 is inf: rejected).
numbers = st.one_of(finite, finite, finite, finite.map(np.float64), finite.map(_float32), finite.map(torch.tensor))
# What a caller may pass: mostly numbers, sometimes something every entry point must reject.
arguments = st.one_of(numbers, numbers, numbers, st.sampled_from(BAD))


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through strict JSON (``allow_nan=False`` raises on NaN and inf)."""
    return json.loads(json.dumps(state, allow_nan=False))


def _outcome(obj: Any, call: Callable[[Any], Any]) -> tuple[str, Any]:
    """("ok", result as plain Python) or ("error", exception type); a rejected call must change nothing."""
    before = json.dumps(obj.state_dict(), allow_nan=False)
    try:
        out = call(obj)
    except (ValueError, TypeError) as exc:
        assert json.dumps(obj.state_dict(), allow_nan=False) == before, f"rejected call changed the state: {exc}"
        return "error", type(exc)
    return "ok", out.tolist() if isinstance(out, torch.Tensor) else out


def check_resume(make: Callable[[], Any], calls: Sequence[Callable[[Any], Any]]) -> None:
    """Run ``calls`` on ``make()``; after each one, resume a fresh ``make()`` from the JSON state
    and check that it continues exactly as the uninterrupted object (results and states)."""
    ref = make()
    states = [json.dumps(ref.state_dict(), allow_nan=False)]
    outcomes = []
    for call in calls:
        outcomes.append(_outcome(ref, call))
        states.append(json.dumps(ref.state_dict(), allow_nan=False))
    for cut in range(len(calls) + 1):
        resumed = make()
        resumed.load_state_dict(json.loads(states[cut]))
        assert json.dumps(resumed.state_dict(), allow_nan=False) == states[cut]
        for k in range(cut, len(calls)):
            # repr: bit-for-bit (distinguishes -0.0 from 0.0, unlike ==)
            assert repr(_outcome(resumed, calls[k])) == repr(outcomes[k]), f"call {k} after resuming at {cut}"
            assert json.dumps(resumed.state_dict(), allow_nan=False) == states[k + 1]
