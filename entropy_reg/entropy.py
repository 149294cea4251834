"""Exact per-token entropy and log-probs of softmax(logits / T), fused and memory-light.

Public functions validate their arguments and dispatch to a backend
(``entropy_reg.kernels``) through the custom op of ``entropy_reg.ops``, or,
with ``process_group``, through the vocabulary-parallel autograd function of
``entropy_reg.vocab_parallel``. Units are nats. Outputs are float32 for
float32 / bfloat16 / float16 logits, float64 for float64 logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, vocab_parallel
from .checks import as_count, as_flag, check_float_tensor, flat_rows, inverse_temperature
from .ops import logprobs_entropy


def token_entropy(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """Entropy H = -sum_j p_j log p_j (nats) of p = softmax(logits / temperature), per row.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float32 math), or
            float64 (float64 math on the torch backend, whatever ``backend`` says:
            for gradcheck and references); any strides (a copy is made only when
            the last dimension is not contiguous or the leading dimensions cannot
            be read as at most two strided dimensions).
        temperature: T in ``[1e-30, 1e30]`` (``checks.TEMPERATURE_RANGE``; others raise
            ValueError), any real number (Python, numpy or one-element tensor not
            requiring grad: T is a constant); the gradient includes the 1/T factor.
        mask: optional bool ``[...]``; False rows are never read, give 0 and get
            gradient 0.
        backend: "torch", "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            "auto" (triton on CUDA when it imports, else torch).
        inplace_backward: write the gradient over the logits buffer in the backward
            (no extra memory). The logits are destroyed: use it only when nothing
            else reads them after this op's backward. Logits whose rows share
            memory (e.g. ``row.expand(n, V)``) raise ValueError: the gradient of one
            row would overwrite another's logits.
        process_group: vocabulary parallelism: ``logits`` is this rank's contiguous
            shard (rank r holds ids ``[r * V, (r + 1) * V)``), the result is the full
            vocabulary's on every rank (see ``entropy_reg.vocab_parallel``). Eager only.

    Returns:
        float32 ``[...]`` (float64 for float64 logits). A row with a NaN (or +inf,
        or only -inf) gives NaN; -inf entries are legal and contribute 0.
    """
    _, entropy = _logprobs_entropy(
        logits, None, mask, temperature, backend=backend, inplace_backward=inplace_backward, process_group=process_group
    )
    return entropy


def token_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """(log p_y, H) per row from one pass over the logits, p = softmax(logits / temperature).

    ``labels[...]`` holds vocabulary ids; rows whose label is ``ignore_index``
    (an int) behave as masked rows for both outputs (0, gradient 0, never read,
    their label not checked). An id outside ``[0, V)`` on an active row raises
    ValueError on the CPU and the torch backend (under ``torch.compile``, a
    RuntimeError from an in-graph ``torch._assert_async``); the
    Triton backend on CUDA returns NaN for that row's log-prob instead (checking
    would cost a host sync every call). When both
    outputs carry gradients, one backward pass forms the combined gradient
    ``g_lp * (1[y] - p) - g_H * p * (log p + H)``. With ``process_group``, labels
    are global vocabulary ids. Other arguments as :func:`token_entropy`.
    """
    return _logprobs_entropy(
        logits,
        labels,
        mask,
        temperature,
        ignore_index=ignore_index,
        backend=backend,
        inplace_backward=inplace_backward,
        process_group=process_group,
    )


def _logprobs_entropy(
    logits: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    *,
    ignore_index: int = -100,
    backend: str,
    inplace_backward: bool,
    process_group: torch.distributed.ProcessGroup | None,
) -> tuple[Tensor, Tensor]:
    _check_logits(logits)
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    if process_group is not None:
        vocab *= vocab_parallel.group_layout(process_group)[1]  # labels are global ids
    inv_temp = inverse_temperature(temperature)
    ignore_index = as_count(ignore_index, "ignore_index", low=None)
    inplace_backward = as_flag(inplace_backward, "inplace_backward") and logits.requires_grad
    backend = kernels.resolve(backend, logits.device, logits.dtype)
    # The Triton kernels turn an id outside [0, V) into a NaN log-prob without a host sync.
    check_range = backend == "torch" or logits.device.type == "cpu"
    flat_labels, active = flat_rows(labels, mask, logits, "logits", vocab, ignore_index, check_range)
    x3 = _as_3d(logits)
    if inplace_backward and _rows_overlap(x3):
        raise ValueError(
            "inplace_backward=True needs logits whose rows do not share memory (got strides "
            f"{tuple(logits.stride())} for shape {tuple(logits.shape)}); pass a copy or use inplace_backward=False"
        )
    if process_group is not None:
        rows = kernels.Rows(flat_labels, active, inv_temp)
        logp, entropy = vocab_parallel.sharded_logprobs_entropy(x3, rows, backend, inplace_backward, process_group)
    else:
        logp, entropy, _ = logprobs_entropy(x3, flat_labels, active, inv_temp, backend, inplace_backward)
    return (logp.view(lead) if labels is not None else logp), entropy.view(lead)


def _rows_overlap(x3: Tensor) -> bool:
    """Whether two rows of the ``[b, t, V]`` view (last stride 1) may share an element.

    Rows are disjoint when, taking the row dimensions by increasing stride, each
    stride is at least the span of the rows below it (the standard sufficient
    test; the views ``_as_3d`` makes of real tensors either pass it or overlap).
    """
    span = x3.shape[2]
    dims = sorted(((size, stride) for size, stride in zip(x3.shape[:2], x3.stride()[:2]) if size > 1), key=lambda d: d[1])
    for size, stride in dims:
        if stride < span:
            return True
        span = stride * (size - 1) + span
    return False


def _as_3d(logits: Tensor) -> Tensor:
    """View ``[..., V]`` as ``[b, t, V]`` with last stride 1, copying only when no such view exists.

    Leading dimensions are merged where their strides allow, so slices such as
    ``logits[:, :-1]`` of a contiguous ``[B, S, V]`` stay views.
    """
    vocab = logits.shape[-1]
    if logits.is_contiguous():
        return logits.view(1, -1, vocab)
    if logits.stride(-1) != 1 and vocab > 1:
        return logits.contiguous().view(1, -1, vocab)
    dims: list[list[int]] = []
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        return logits.contiguous().view(1, -1, vocab)
    while len(dims) < 2:
        dims.insert(0, [1, dims[0][0] * dims[0][1] if dims else vocab])
    (b, sb), (t, st) = dims
    return logits.as_strided((b, t, vocab), (sb, st, 1))


def _check_logits(logits: Tensor) -> None:
    check_float_tensor(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
