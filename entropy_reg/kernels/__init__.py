"""Backends of the entropy / log-prob op. Each exposes the same two functions:

    forward(x3, labels, active, inv_temp) -> (logprobs[n] or empty, entropy[n], lse[n])
    backward(x3, labels, active, lse, entropy, grad_logp, grad_entropy, inv_temp, out) -> None

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


def resolve(backend: str, device: torch.device) -> str:
    """Map a user's ``backend`` choice to "torch" or "triton" for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'entropy-reg[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); "
                "on CPU it runs only under TRITON_INTERPRET=1"
            )
    return backend


def load(name: str) -> ModuleType:
    return importlib.import_module({"torch": ".torch_chunked", "triton": ".triton_entropy"}[name], __name__)
