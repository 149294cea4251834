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
from .checks import as_count, as_flag, as_scalar
from .ops import logprobs_entropy

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
        temperature: T > 0, any real number (Python, numpy or one-element
            tensor); the gradient includes the 1/T factor.
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
    ValueError on the CPU and the torch backend; the
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
    inv_temp = 1.0 / as_scalar(temperature, "temperature", low=0.0, low_inclusive=False)
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
        logp, entropy = vocab_parallel.sharded_logprobs_entropy(
            x3, flat_labels, active, inv_temp, backend, inplace_backward, process_group
        )
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
    ``logits[:, :-1]`` of a contiguous ``[B, T, V]`` stay views.
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
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")


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
    # A data-dependent check; skipped while torch.compile traces (it would break the graph).
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, found {first}")
