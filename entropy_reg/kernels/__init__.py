"""Backends of the entropy / log-prob op. Each exposes the same two functions:

    forward(x3, labels, active, inv_temp) -> (logprobs[n] or empty, entropy[n], stats[2, n])
    backward(x3, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, out) -> None

``stats[0]`` is each row's raw maximum m = max_j x_j and ``stats[1]`` is
c = ln sum_j exp((x_j - m) / T), so log p_j = (x_j - m) / T - c (nats); the
outputs and stats are float32 (the torch backend: float64 for float64 logits).

``x3`` is the logits as a [b, t, V] strided view (last dim contiguous, n = b*t
rows), ``labels``/``active`` are flat [n] tensors or None, ``out`` receives the
gradient with respect to x3 (it may be x3 itself for the in-place backward).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when triton imports (on CPU it only runs under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
