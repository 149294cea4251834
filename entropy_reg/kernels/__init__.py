"""Backends of the entropy / log-prob op. Each exposes the same two functions:

    forward(x3, rows: Rows) -> (logprobs[n] or empty, entropy[n], stats[2, n])
    backward(x3, rows: Rows, up: Upstream, out) -> None

``stats[0]`` is each row's raw maximum m = max_j x_j and ``stats[1]`` is
c = ln sum_j exp((x_j - m) / T), so log p_j = (x_j - m) / T - c (nats); the
outputs and stats are float32 (the torch backend: float64 for float64 logits).

``x3`` is the logits as a [b, t, V] strided view (last dim contiguous, n = b*t
rows), :class:`Rows` holds the per-row inputs, :class:`Upstream` what the
backward needs per row, and ``out`` receives the gradient with respect to x3
(it may be x3 itself for the in-place backward).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Rows:
    """The per-row inputs of a backend call besides the logits (n rows).

    labels: int64 [n] vocabulary ids, contiguous, or None (entropy only).
    active: bool [n], contiguous, or None (every row); inactive rows are never read.
    inv_temp: 1 / T.
    """

    labels: Tensor | None
    active: Tensor | None
    inv_temp: float


@dataclass(frozen=True)
class Upstream:
    """What a backward needs per row: the forward's stats [2, n] and entropy [n], and the outputs' gradients [n]."""

    stats: Tensor
    entropy: Tensor
    grad_logp: Tensor | None
    grad_entropy: Tensor | None


def triton_available() -> bool:
    """True when triton imports (on CPU it only runs under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compute_dtype(x: Tensor) -> torch.dtype:
    """The math and output dtype for logits ``x``: float64 for float64, float32 for every other dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def scaled_gap(x: Tensor, m: Tensor, inv_temp: float) -> Tensor:
    """(x - m) / T, also where x and m are finite but x - m overflows (a row spread past float range).

    Halving both first is exact for such magnitudes and cannot overflow; elsewhere x - m is kept, as
    it is exact near the max (where a log-probability's digits are).
    """
    gap = (x - m) * inv_temp
    return torch.where(gap.isinf() & x.isfinite() & m.isfinite(), (x * 0.5 - m * 0.5) * (2.0 * inv_temp), gap)


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map a user's ``backend`` choice to "torch" or "triton" for ``dtype`` tensors on ``device``.

    float64 always runs the torch backend's float64 math: float64 logits are for
    gradcheck and references, and the Triton kernels compute in float32.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'entropy-reg[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); "
                "on CPU it runs only under TRITON_INTERPRET=1"
            )
    return "torch" if dtype == torch.float64 else backend


def load(name: str) -> ModuleType:
    return importlib.import_module({"torch": ".torch_chunked", "triton": ".triton_entropy"}[name], __name__)
