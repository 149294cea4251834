"""Argument checks shared by every public entry point: one rule for each kind of argument.

- A *number* is any real number: a Python int or float, a numpy scalar, or a
  tensor / array holding exactly one real element. Bools are not numbers.
  Values too large for a float (``10**400``) are "not finite", never an
  OverflowError.
- A *count* is an integral number (Python or numpy int, or a one-element integer
  tensor / array) that fits int64; ``2.0`` is not a count, ``10**30`` is out of range.
- A *flag* is ``True`` or ``False`` (Python or numpy bool); ``"no"`` and ``1`` are not.
- A *sequence* is anything registered as ``collections.abc.Sequence`` (list,
  tuple, ``range``, ...) except text (``str``, ``bytes``); tensors and arrays are
  handled by the callers, which keep them vectorized.
- A *state* (``load_state_dict``'s argument) is a dict with exactly the expected
  keys: a missing key and an unknown one are both errors (torch's strict rule).
- The kernels' tensors: logits, hidden and weight are float tensors of a dtype in
  ``LOGIT_DTYPES``; per-row labels and masks match their leading shape and device,
  and :func:`flat_rows` returns them flat and contiguous.

Each check returns a plain Python value or raises TypeError (wrong kind) or
ValueError (right kind, out of range) with a message that names the argument.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_scalar", "as_count", "inverse_temperature", "as_flag", "as_sequence", "as_state", "check_float_tensor", "check_mask_like", "flat_rows"]

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    # Comparisons, not math.isfinite: under torch.compile a varying float argument is a symbolic
    # float, which comparisons guard on and math.* cannot trace (a graph break).
    if not abs(out) <= sys.float_info.max:
        raise ValueError(f"{name} must be finite, got {_shown(value if isinstance(value, numbers.Integral) else out)}")
    if low is not None and (out < low or (out == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {_shown(out)}")
    if high is not None and out > high:
        raise ValueError(f"{name} must be <= {high}, got {_shown(out)}")
    return out


def _shown(value: Any) -> str:
    # A symbolic float (torch.compile) cannot be formatted while tracing.
    return "a traced value" if torch.compiler.is_compiling() else str(value)


# The temperatures every kernel serves: 1 / T and log2(e) / T stay normal float32 numbers, and a
# row spread past float32's range (x - max x overflows) holds only probabilities that are exactly
# 0 at T <= 1e30 (exp(-3.4e38 / 1e30) underflows even float64).
TEMPERATURE_RANGE = (1e-30, 1e30)


def inverse_temperature(temperature: Any) -> float:
    """1 / T for a temperature ``T`` in ``TEMPERATURE_RANGE`` (a number; a constant, never learned).

    Raises ValueError naming ``temperature`` outside the range, and for a tensor that
    requires grad: the kernels take T as a constant and return no gradient for it.
    """
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError(
            "temperature must be a constant: got a tensor that requires grad, and no gradient flows to it "
            "(pass temperature.detach() or a float)"
        )
    low, high = TEMPERATURE_RANGE
    return 1.0 / as_scalar(temperature, "temperature", low=low, high=high)


INT64_RANGE = (-(2**63), 2**63 - 1)


def as_count(value: Any, name: str, *, low: int | None = 0) -> int:
    """``value`` as a Python int >= ``low`` (no lower bound when ``low`` is None) that fits int64.

    Integral kinds only; every count meets tensors, so one outside int64 is a ValueError.
    """
    value = _unwrap(value, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"{name} must fit in int64 [{INT64_RANGE[0]}, {INT64_RANGE[1]}], got {value}")
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


def check_float_tensor(t: Any, name: str) -> None:
    """``t`` must be a tensor of a dtype the kernels take (float32, bfloat16, float16, float64)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_mask_like(mask: Any, values: Tensor) -> None:
    """``mask`` must be a bool or real tensor of ``values``' shape and device (a token mask)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    if mask.device != values.device:
        raise ValueError(f"mask is on {mask.device} but values are on {values.device}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real, got {mask.dtype}")


LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def flat_rows(
    labels: Tensor | None,
    mask: Tensor | None,
    like: Tensor,
    like_name: str,
    vocab: int,
    ignore_index: int,
    check_range: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Check per-row ``labels`` / ``mask`` against ``like[..., X]``; return them flat.

    Returns (labels as contiguous int64 [n] or None, active rows as contiguous
    bool [n] or None when every row is active): the kernels index them as flat
    arrays, so strided and expanded views are copied here (O(n), never O(n V)).
    A row is active when its mask is True and its label is not ``ignore_index``.
    ``check_range`` also checks the active rows' ids against ``[0, vocab)`` (a
    host sync); inactive rows are never read, so their labels may hold anything.
    """
    active = None
    if mask is not None:
        _check_rows_tensor("mask", mask, like, like_name, (torch.bool,))
        active = mask.reshape(-1).contiguous()
    if labels is None:
        return None, active
    _check_rows_tensor("labels", labels, like, like_name, LABEL_DTYPES)
    flat = labels.reshape(-1).long().contiguous()
    active = flat != ignore_index if active is None else active & (flat != ignore_index)
    if check_range:
        _check_label_range(flat, active, vocab, ignore_index)
    return flat, active


def _check_rows_tensor(name: str, t: Tensor, like: Tensor, like_name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.shape != like.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(like.shape[:-1])} ({like_name} without the last dim), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def _check_label_range(labels: Tensor, valid: Tensor, vocab: int, ignore_index: int) -> None:
    message = f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}"
    bad = valid & ((labels < 0) | (labels >= vocab))
    if torch.compiler.is_compiling():
        # In the graph: reading the result on the host would break it. torch raises a RuntimeError
        # with this message when the graph runs (on CUDA, a device-side assert).
        torch._assert_async(~bad.any(), message)
        return
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"{message}, found {int(labels[bad][0])}")
