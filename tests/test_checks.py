"""checks.py: one rule per kind of argument (number, count, flag, sequence, state)."""

from __future__ import annotations

import collections
import math
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from entropy_reg.checks import as_count, as_flag, as_scalar, as_sequence, as_state

REALS = [
    0.7,
    3,
    np.float16(0.7),
    np.float32(0.7),
    np.float64(0.7),
    np.int8(3),
    np.uint64(3),
    torch.tensor(0.7),
    torch.tensor([0.7], dtype=torch.bfloat16),
    torch.tensor(3, dtype=torch.int32),
    np.array(0.7),
    np.array([[3]]),
]


@pytest.mark.parametrize("value", REALS, ids=lambda v: f"{type(v).__name__}")
def test_every_real_number_is_a_number(value):
    out = as_scalar(value, "x")
    assert type(out) is float
    # the value as its own type holds it (bf16 0.7 is 0.69921875, float32 0.7 is 0.699999988...)
    assert out == float(np.asarray(value.float() if isinstance(value, torch.Tensor) else value).reshape(()))


@pytest.mark.parametrize("value", [True, np.bool_(False), torch.tensor(True), "0.7", None, [0.7], 1j, torch.tensor(1j)])
def test_what_is_not_a_number(value):
    with pytest.raises(TypeError, match="temperature"):
        as_scalar(value, "temperature")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, -(10**400), np.float64("nan"), torch.tensor(math.inf)])
def test_not_finite_is_a_value_error_never_an_overflow(value):
    with pytest.raises(ValueError, match="temperature must be finite"):
        as_scalar(value, "temperature")


def test_multi_element_tensors_are_not_numbers():
    for value in (torch.ones(2), np.ones((1, 2)), torch.ones(0)):
        with pytest.raises(ValueError, match="x must hold exactly one number"):
            as_scalar(value, "x")


@given(x=st.floats(allow_nan=False, allow_infinity=False), low=st.floats(allow_nan=False, allow_infinity=False))
def test_bounds(x, low):
    if x >= low:
        assert as_scalar(x, "x", low=low) == x
    else:
        with pytest.raises(ValueError, match=re.escape(f"x must be >= {low}, got {x}")):
            as_scalar(x, "x", low=low)
    if x > low:
        assert as_scalar(x, "x", low=low, low_inclusive=False) == x
    else:
        with pytest.raises(ValueError, match=re.escape(f"x must be > {low}, got {x}")):
            as_scalar(x, "x", low=low, low_inclusive=False)
    if x <= low:
        assert as_scalar(x, "x", high=low) == x
    else:
        with pytest.raises(ValueError, match=re.escape(f"x must be <= {low}, got {x}")):
            as_scalar(x, "x", high=low)


def test_counts():
    for value in (3, np.int64(3), np.uint8(3), torch.tensor(3), torch.tensor([3]), np.array(3)):
        out = as_count(value, "n")
        assert type(out) is int and out == 3
    assert as_count(2**63 - 1, "n") == 2**63 - 1  # no float round trip
    assert as_count(-(2**63), "n", low=None) == -(2**63)
    for value in (2**63, 2**70, -(2**63) - 1):  # counts meet tensors: int64 or a named error
        with pytest.raises(ValueError, match="n must fit in int64"):
            as_count(value, "n", low=None)
    assert as_count(-5, "n", low=None) == -5
    for value in (3.0, np.float32(3), True, np.bool_(True), "3", torch.tensor(3.0)):
        with pytest.raises(TypeError, match="n must be an int"):
            as_count(value, "n")
    with pytest.raises(ValueError, match="n must be >= 1"):
        as_count(0, "n", low=1)


def test_flags():
    assert as_flag(True, "f") is True and as_flag(np.bool_(False), "f") is False
    for value in ("no", 0, 1, None, torch.tensor(True), np.array(True)):
        with pytest.raises(TypeError, match="f must be True or False"):
            as_flag(value, "f")


def test_any_sequence_is_a_sequence():
    for value in ([1, 2], (1, 2), range(1, 3), collections.deque([1, 2]), collections.UserList([1, 2])):
        assert as_sequence(value, "ids") == [1, 2]
    for value in ("12", b"12", bytearray(b"12"), {1, 2}, {1: 0, 2: 0}, iter([1, 2]), 12, None):
        with pytest.raises(TypeError, match="ids must be a sequence"):
            as_sequence(value, "ids")


def test_states_are_strict():
    state = {"a": 1, "b": None}
    assert as_state(state, ("a", "b")) is state
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \[\]"):
        as_state({"a": 1}, ("a", "b"))
    with pytest.raises(ValueError, match=r"state\['x'\] must have exactly .* unknown \['c'\]"):
        as_state({"a": 1, "b": 2, "c": 3}, ("a", "b"), "state['x']")
    with pytest.raises(ValueError, match=r"unknown \['0'\]"):
        as_state({"a": 1, "b": 2, 0: 3}, ("a", "b"))  # non-str keys are named too
    with pytest.raises(TypeError, match="state must be a dict"):
        as_state([("a", 1)], ("a",))


def test_float_max_is_finite():
    assert as_scalar(sys.float_info.max, "x") == sys.float_info.max
    assert as_scalar(5e-324, "x", low=0.0, low_inclusive=False) == 5e-324
