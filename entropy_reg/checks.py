"""Argument checks shared by every public entry point: one rule for each kind of argument.

- A *number* is any real number: a Python int or float, a numpy scalar, or a
  tensor / array holding exactly one real element. Bools are not numbers.
  Values too large for a float (``10**400``) are "not finite", never an
  OverflowError.
- A *count* is an integral number (Python or numpy int, or a one-element integer
  tensor / array); ``2.0`` is not a count.
- A *flag* is ``True`` or ``False`` (Python or numpy bool); ``"no"`` and ``1`` are not.
- A *sequence* is anything registered as ``collections.abc.Sequence`` (list,
  tuple, ``range``, ...) except text (``str``, ``bytes``); tensors and arrays are
  handled by the callers, which keep them vectorized.
- A *state* (``load_state_dict``'s argument) is a dict with exactly the expected
  keys: a missing key and an unknown one are both errors (torch's strict rule).

Each check returns a plain Python value or raises TypeError (wrong kind) or
ValueError (right kind, out of range) with a message that names the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_scalar", "as_count", "as_flag", "as_sequence", "as_state"]


def _unwrap(value: Any, name: str) -> Any:
    """A tensor / array with one element becomes its Python item; anything else is returned as is."""
    if isinstance(value, (Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, Tensor) else value.size
        if size != 1:
            raise ValueError(f"{name} must hold exactly one number, got shape {tuple(value.shape)}")
        if (value.dtype == torch.bool or value.is_complex()) if isinstance(value, Tensor) else value.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a real number, got dtype {value.dtype}")
        return value.item()
    return value


def as_scalar(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    high: float | None = None,
) -> float:
    """``value`` as a finite Python float in ``[low, high]`` (``(low, high]`` if not ``low_inclusive``).

    Raises TypeError for anything that is not a number (bools included) and
    ValueError, naming ``name``, when it is NaN, infinite, too large for a float
    or out of range.
    """
    value = _unwrap(value, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf if value > 0 else -math.inf
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value if isinstance(value, numbers.Integral) else out}")
    if low is not None and (out < low or (out == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {out}")
    if high is not None and out > high:
        raise ValueError(f"{name} must be <= {high}, got {out}")
    return out


def as_count(value: Any, name: str, *, low: int | None = 0) -> int:
    """``value`` as a Python int >= ``low`` (no lower bound when ``low`` is None); integral kinds only."""
    value = _unwrap(value, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def as_flag(value: Any, name: str) -> bool:
    """``value`` as a Python bool; only ``True`` / ``False`` (Python or numpy) are flags."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def as_sequence(value: Any, name: str) -> list[Any]:
    """The elements of ``value`` as a list; any ``collections.abc.Sequence`` but text qualifies."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence (list, tuple, range, ...), got {type(value).__name__}")
    return list(value)


def as_state(state: Any, keys: Iterable[str], name: str = "state") -> dict[str, Any]:
    """``state`` itself once it is a dict with exactly ``keys`` (TypeError / ValueError otherwise)."""
    if not isinstance(state, dict):
        raise TypeError(f"{name} must be a dict, got {type(state).__name__}")
    expected = set(keys)
    missing, unknown = expected - set(state), set(state) - expected
    if missing or unknown:
        raise ValueError(
            f"{name} must have exactly the keys {sorted(expected)}: missing {sorted(missing)}, "
            f"unknown {sorted(map(str, unknown))}"
        )
    return state
