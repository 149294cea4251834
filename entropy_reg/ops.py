"""The entropy / log-prob op as torch custom ops, with autograd.

Registered through ``torch.library.custom_op`` so that ``torch.compile(fullgraph=True)``
treats each as one opaque node (no graph break) on every backend. The forward
saves three numbers per row (the row max m, c = ln sum exp((x - m) / T), and H)
besides its inputs; the backward recomputes the softmax from the logits. The
math is float32 (float64 for float64 logits), and so are the outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels


def _no_autocast(x: Tensor) -> torch.autocast:
    # The backends choose their own precision (float32 math); an enclosing autocast must not recast it.
    return torch.autocast(x.device.type, enabled=False)


@torch.library.custom_op("entropy_reg::logprobs_entropy", mutates_args=())
def logprobs_entropy(
    x3: Tensor,
    labels: Tensor | None,
    active: Tensor | None,
    inv_temp: float,
    backend: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs[n] or empty when labels is None, entropy[n], stats[2, n] = (row max m, c))."""
    with _no_autocast(x3):
        return kernels.load(backend).forward(x3, kernels.Rows(labels, active, inv_temp))


@logprobs_entropy.register_fake
def _(x3, labels, active, inv_temp, backend, inplace_backward):
    n = x3.shape[0] * x3.shape[1]
    acc = kernels.compute_dtype(x3)
    return x3.new_empty(n if labels is not None else 0, dtype=acc), x3.new_empty(n, dtype=acc), x3.new_empty(2, n, dtype=acc)


def _run_backward(x3, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, backend, out) -> None:
    # The two backward ops' body; their schemas stay flat (custom ops take no dataclasses).
    rows = kernels.Rows(labels, active, inv_temp)
    with _no_autocast(x3):
        kernels.load(backend).backward(x3, rows, kernels.Upstream(stats, entropy, grad_logp, grad_entropy), out)


@torch.library.custom_op("entropy_reg::logprobs_entropy_backward", mutates_args=())
def logprobs_entropy_backward(
    x3: Tensor, labels: Tensor | None, active: Tensor | None, stats: Tensor, entropy: Tensor,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, inv_temp: float, backend: str,
) -> Tensor:
    """dL/dx3 as a new contiguous tensor of x3's shape and dtype."""
    out = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    _run_backward(x3, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, backend, out)
    return out


@logprobs_entropy_backward.register_fake
def _(x3, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, backend):
    return torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)


@torch.library.custom_op("entropy_reg::logprobs_entropy_backward_", mutates_args=("x3",))
def logprobs_entropy_backward_(
    x3: Tensor, labels: Tensor | None, active: Tensor | None, stats: Tensor, entropy: Tensor,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, inv_temp: float, backend: str,
) -> None:
    """dL/dx3 written over x3 itself (the logits are destroyed)."""
    _run_backward(x3, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, backend, x3)


@logprobs_entropy_backward_.register_fake
def _(x3, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, backend):
    return None


def _setup_context(ctx, inputs, output) -> None:
    x3, labels, active, inv_temp, backend, inplace_backward = inputs
    _, entropy, stats = output
    ctx.save_for_backward(x3, labels, active, stats, entropy)
    ctx.inv_temp, ctx.backend, ctx.inplace = inv_temp, backend, inplace_backward
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None, _grad_stats: Tensor | None):
    x3, labels, active, stats, entropy = ctx.saved_tensors
    if labels is None:
        grad_logp = None
    args = (x3, labels, active, stats, entropy, grad_logp, grad_entropy, ctx.inv_temp, ctx.backend)
    if ctx.inplace:
        logprobs_entropy_backward_(*args)
        grad = x3
    else:
        grad = logprobs_entropy_backward(*args)
    return grad, None, None, None, None, None


torch.library.register_autograd("entropy_reg::logprobs_entropy", _backward, setup_context=_setup_context)
