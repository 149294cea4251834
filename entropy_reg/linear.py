"""Per-token entropy and log-probs straight from the lm_head input, never holding the logits.

``linear_token_entropy(hidden, weight)`` equals ``token_entropy(hidden @ weight.T + bias)``
(and its log-prob variant), with the logits formed one tile at a time. Shapes: N rows (tokens),
D the hidden size, V the vocabulary; H is the entropy and T the temperature throughout.

    tile = hidden[rows] @ weight[block].T + bias[block]          [rows, V_b], in hidden's dtype

The forward gives each tile's per-row statistics (raw max m_b, c_b = ln sum exp((x - m_b) / T),
H_b) with the entropy kernel of the chosen backend (Triton on CUDA, torch on CPU) and merges the
vocabulary blocks exactly (``entropy_reg.partials.merge_parts``: M = max m_b,
a_b = (m_b - M) / T + c_b, c = ln sum exp(a_b), H = sum_b e^a_b (H_b - a_b) / e^c + c,
log p_y = (x_y - M) / T - c); it saves three numbers per row (M, c, H).
The backward recomputes each tile, turns it into dL/dlogits (a second tile-sized
buffer) with the fused kernel fed the full-vocabulary (M, c) and H, and accumulates

    grad_hidden[rows]   += dlogits @ weight[block]    (float32, summed over blocks)
    grad_weight[block]  += dlogits.T @ hidden[rows]   (float32, summed over row chunks)
    grad_bias[block]    += dlogits.sum(0)             (float32)

Loop order: vocabulary blocks outside, row chunks inside, so the float32
weight-gradient accumulator is one block (V_b x D), not V x D; the
hidden-gradient accumulator is N x D float32 (for a 16-bit ``hidden``: D / V of
the logits' size), the output itself for float32. Extra memory is therefore
two logits tiles, plus for 16-bit inputs one float32 weight block and that
accumulator: independent of V and, apart from the N x D accumulator, of the
number of tokens.

Default tile (``default_tiles``), from a logits budget B of 2**27 elements on
GPUs (256 MiB in bfloat16) and 2**20 on CPU (4 MiB in float32, cache-sized):
V_b = min(V, 2**26 / D, B / 256) vocabulary ids (a float32 weight-gradient
block of at most 256 MiB; at least 256 rows per tile, since each tile's GEMM
reads a whole weight block) and rows = B / V_b. At D = 4096 on a GPU: V_b =
16384 and 8192 rows; on CPU: V_b = 4096 and 256 rows. When one row chunk
covers every active row, the weight gradient of a block is a single GEMM
written in weight's dtype (its float32 accumulation happens inside the GEMM)
and no weight block is allocated. On CUDA the float32 accumulations are GEMMs
with float32 output (``addmm(out_dtype=torch.float32)``, where torch has it).

The approach (chunked recompute with GEMMs for the linear layer) is the one of
fused linear cross-entropy losses (Liger-Kernel, verl's ``FusedLinearForPPO``);
the vocabulary-blocked loop order and the exact block merge are this library's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels
from .checks import as_count, check_float_tensor, flat_rows, inverse_temperature
from .kernels import compute_dtype, scaled_gap
from .partials import label_logits, localize, merge_parts, part_backward, part_stats
from .vocab_parallel import group_layout, merge_over_group

_WEIGHT_BLOCK_BYTES = 256 << 20  # float32 weight-gradient block
_TILE_ELEMS = {"cpu": 1 << 20}  # logits per tile: 4 MiB float32 on CPU, cache-sized
_TILE_ELEMS_DEFAULT = 1 << 27  # GPUs: 8192-wide blocks ran the GEMMs ~4% slower than 16384 (H200)
# Each tile's GEMM reads a whole weight block: fewer rows than this and it is bound by that read.
_MIN_TILE_ROWS = 256


def default_tiles(num_rows: int, vocab: int, dim: int, device: torch.device, chunk_size: int | None) -> tuple[int, int]:
    """(rows per chunk, vocabulary ids per block) of the logits tile; see the module docstring."""
    budget = _TILE_ELEMS.get(device.type, _TILE_ELEMS_DEFAULT)
    block = max(1, min(vocab, _WEIGHT_BLOCK_BYTES // (4 * dim), budget // _MIN_TILE_ROWS))
    rows = chunk_size if chunk_size is not None else budget // block
    return max(1, min(rows, num_rows)), block


def linear_token_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    process_group: dist.ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Entropy H (nats) of softmax((hidden @ weight.T + bias) / T) per row, or (log p_y, H) with labels.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16 (the lm_head input); float64
            computes and returns float64 (for gradcheck and references).
        weight: ``[V, D]`` same dtype and device (``nn.Linear`` layout).
        labels: optional ``[...]`` integer vocabulary ids; ``ignore_index`` rows
            behave as masked rows for both outputs.
        temperature: T in ``[1e-30, 1e30]`` (as ``token_entropy``); gradients include the 1/T factor.
        mask: optional bool ``[...]``; False rows cost nothing, give 0 and get
            gradient 0.
        bias: optional ``[V]``, same dtype; -inf entries are legal.
        chunk_size: rows per tile (default from V and D, see ``default_tiles``);
            extra memory grows with it, speed up to the point GEMMs saturate.
        backend: entropy kernel: "torch", "triton" or "auto", as ``token_entropy``.
        process_group: vocabulary parallelism: ``weight`` (and ``bias``) are this
            rank's contiguous shard (rank r holds ids ``[r * V, (r + 1) * V)``),
            labels are global ids, ``hidden`` is replicated. The outputs are the
            full vocabulary's, and so are the gradients: the weight and bias
            gradients are this rank's rows, the hidden gradient is summed over
            the group (do not add another all-reduce for it). Three collectives
            per forward + backward. Eager only.

    Returns:
        float32 entropy ``[...]``, or ``(logprobs, entropy)`` when labels are given;
        differentiable with respect to hidden, weight and bias.

    Under autocast, hidden, weight and bias are cast to the autocast dtype first, as
    autocast would cast the inputs of the ``nn.Linear`` this replaces (float64 stays float64).
    """
    hidden, weight, bias = _autocast(hidden, weight, bias)
    _check_linear(hidden, weight, bias)
    inv_temp = inverse_temperature(temperature)
    ignore_index = as_count(ignore_index, "ignore_index", low=None)
    if chunk_size is not None:
        chunk_size = as_count(chunk_size, "chunk_size", low=1)
    backend = kernels.resolve(backend, hidden.device, hidden.dtype)
    world = group_layout(process_group)[1] if process_group is not None else 1
    lead = hidden.shape[:-1]
    # Always range-checked: one host sync is small beside the GEMMs, and tiles index labels directly.
    flat_labels, active = flat_rows(labels, mask, hidden, "hidden", weight.shape[0] * world, ignore_index, True)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chunk, block = default_tiles(h2.shape[0], weight.shape[0], h2.shape[1], hidden.device, chunk_size)
    if process_group is None:
        logp, entropy, _ = linear_logprobs_entropy(h2, weight, bias, flat_labels, active, inv_temp, backend, chunk, block)
    else:
        rows = kernels.Rows(flat_labels, active, inv_temp)
        logp, entropy = _ShardedLinear.apply(h2, weight, bias, rows, backend, (chunk, block), process_group)
    return (logp.view(lead), entropy.view(lead)) if labels is not None else entropy.view(lead)


def _autocast(*ts: Tensor | None) -> tuple[Tensor | None, ...]:
    dev = ts[0].device.type if isinstance(ts[0], Tensor) else "cpu"
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    # autocast casts an nn.Linear's float32 / float16 / bfloat16 inputs and leaves float64 alone
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t for t in ts)


def _check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float_tensor(t, name)
        if t is not hidden and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"{name} must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), got {t.dtype}, {t.device}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with V > 0 and D = hidden.shape[-1]; got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _row_chunks(h2: Tensor, active: Tensor | None, step: int) -> list[Tensor | slice]:
    """Row selectors of the chunks: slices when every row is active, else index tensors of active rows."""
    if active is None or bool(active.all()):
        return [slice(r, r + step) for r in range(0, h2.shape[0], step)]
    idx = active.nonzero().squeeze(1)
    return [idx[r : r + step] for r in range(0, idx.numel(), step)]


def _tiles(
    h2: Tensor, weight: Tensor, bias: Tensor | None, chunks: list[Tensor | slice], block: int
) -> Iterator[tuple[int, int, int, Tensor | slice, Tensor]]:
    """Yield (block index, first id, chunk index, rows, logits tile[rows, V_b]), vocabulary blocks outside."""
    for bi, v0 in enumerate(range(0, weight.shape[0], block)):
        w_b = weight[v0 : v0 + block]
        b_b = bias[v0 : v0 + block] if bias is not None else None
        for ci, rows in enumerate(chunks):
            # not bound to a local: a tile the caller has dropped is freed before the next is made
            yield bi, v0, ci, rows, (torch.mm(h2[rows], w_b.t()) if b_b is None else torch.addmm(b_b, h2[rows], w_b.t()))


def _forward(
    h2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: kernels.Rows,
    backend: str,
    tiles: tuple[int, int],
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp[n] or empty, H[n], stats[2, n]) of the full vocabulary (all ranks' shards when grouped).

    ``tiles`` is (rows per chunk, vocabulary ids per block) of the logits tile.
    """
    labels, active, inv_temp = rows.labels, rows.active, rows.inv_temp
    chunk, block = tiles
    n, vocab = h2.shape[0], weight.shape[0]
    offset = group_layout(group)[0] * vocab if group is not None else 0
    acc = dict(dtype=compute_dtype(h2), device=h2.device)
    n_blocks = -(-vocab // block)
    stats_parts = torch.zeros(n_blocks, 2, n, **acc)
    ent_parts = torch.zeros(n_blocks, n, **acc)
    x_y = torch.zeros(n, **acc) if labels is not None else None
    owned = torch.zeros(n, dtype=torch.bool, device=h2.device) if labels is not None else None
    chunks = _row_chunks(h2, active, chunk)
    for bi, v0, _, r, tile in _tiles(h2, weight, bias, chunks, block):
        x3 = tile.unsqueeze(0)
        stats_parts[bi, :, r], ent_parts[bi, r] = part_stats(backend, x3, None, inv_temp, may_be_empty=bias is not None)
        if labels is not None:
            local, own = localize(labels[r], offset + v0, tile.shape[1], None)
            x_y[r] += label_logits(x3, local, own)
            owned[r] |= own
        del tile, x3
    stats, entropy = merge_parts(stats_parts, ent_parts, inv_temp)
    if group is not None:
        stats, entropy, logp = merge_over_group(stats, entropy, x_y, owned, vocab, inv_temp, group)
    else:
        logp = scaled_gap(x_y, stats[0], inv_temp) - stats[1] if labels is not None else None
    if active is not None:
        entropy = torch.where(active, entropy, 0.0)
        logp = torch.where(active, logp, 0.0) if logp is not None else None
    return (logp if logp is not None else entropy.new_empty(0)), entropy, stats


@functools.cache
def _f32_out_gemm(device: torch.device) -> bool:
    """Whether GEMMs on ``device`` write float32 from 16-bit factors (``addmm(out_dtype=)``: CUDA, recent torch)."""
    if device.type != "cuda":
        return False
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    c = torch.ones(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool((c == 3).all())


def _add_product(dst: Tensor, a: Tensor, b: Tensor, overwrite: bool = False) -> None:
    """dst = a @ b (``overwrite``) or dst += a @ b, in dst's dtype.

    A float32 ``dst`` with 16-bit factors gets the GEMM's float32 sums directly
    where the device can (CUDA), else their product rounded once to the factors'
    dtype and then added in float32.
    """
    beta = 0 if overwrite else 1
    if dst.dtype == a.dtype:
        torch.addmm(dst, a, b, beta=beta, out=dst)
    elif _f32_out_gemm(dst.device):
        torch.addmm(dst, a, b, beta=beta, out_dtype=torch.float32, out=dst)
    elif overwrite:
        dst.copy_(torch.mm(a, b))
    else:
        dst += torch.mm(a, b)


class _InputGrads:
    """The gradients of hidden, weight and bias, accumulated tile by tile (see the module docstring).

    A distinct empty tensor stands for each gradient not needed (custom-op outputs may not alias).
    """

    def __init__(self, h2: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool], n_chunks: int, block: int):
        self.h2, self.weight, self.bias, self.n_chunks = h2, weight, bias, n_chunks
        self.need_h, self.need_w, self.need_b = needs
        acc = dict(dtype=compute_dtype(h2), device=h2.device)  # float32 sums (float64 for float64 inputs)
        self.g_h = torch.zeros(h2.shape[0], h2.shape[1], **acc) if self.need_h else h2.new_empty(0)
        self.g_w = (torch.empty_like(weight) if n_chunks else torch.zeros_like(weight)) if self.need_w else h2.new_empty(0)
        self.g_b = torch.zeros(weight.shape[0], **acc) if self.need_b else h2.new_empty(0)
        # 16-bit weight and several row chunks: the block's gradient sums in float32 before its one cast.
        self.w_block = None
        if self.need_w and n_chunks > 1 and weight.dtype.itemsize == 2:
            self.w_block = torch.empty(min(block, weight.shape[0]), h2.shape[1], **acc)

    def add(self, d: Tensor, r: Tensor | slice, v0: int, ci: int) -> None:
        """Add the contribution of dL/dlogits ``d`` of the tile (rows ``r``, ids from ``v0``, chunk ``ci``)."""
        v1 = v0 + d.shape[1]
        if self.need_h:
            if isinstance(r, slice):
                _add_product(self.g_h[r], d, self.weight[v0:v1])
            else:
                self.g_h.index_add_(0, r, torch.mm(d, self.weight[v0:v1]).to(self.g_h.dtype))
        if self.need_b:
            self.g_b[v0:v1] += d.sum(0, dtype=self.g_b.dtype)
        if self.need_w:
            dst = self.g_w[v0:v1] if self.w_block is None else self.w_block[: v1 - v0]
            _add_product(dst, d.t(), self.h2[r], overwrite=ci == 0)
            if self.w_block is not None and ci == self.n_chunks - 1:
                self.g_w[v0:v1] = dst

    def result(self, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.need_h and group is not None:
            dist.all_reduce(self.g_h, op=dist.ReduceOp.SUM, group=group)
        g_b = self.g_b.to(self.bias.dtype) if self.need_b else self.g_b
        return self.g_h.to(self.h2.dtype), self.g_w, g_b


def _backward(
    h2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: kernels.Rows,
    up: kernels.Upstream,
    backend: str,
    tiles: tuple[int, int],
    needs: tuple[bool, bool, bool],
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden2, grad_weight, grad_bias), an empty tensor for each gradient not in ``needs``."""
    chunk, block = tiles
    offset = group_layout(group)[0] * weight.shape[0] if group is not None else 0
    chunks = _row_chunks(h2, rows.active, chunk)
    grads = _InputGrads(h2, weight, bias, needs, len(chunks), block)
    with_labels = rows.labels is not None and up.grad_logp is not None
    # dL/dlogits goes to its own buffer, not over the tile: the kernel's tuned out-of-place form
    scratch = None
    for _, v0, ci, r, tile in _tiles(h2, weight, bias, chunks, block):
        if scratch is None:
            scratch = torch.empty(tile.numel(), dtype=tile.dtype, device=tile.device)  # the first tile is the largest
        d = scratch[: tile.numel()].view(tile.shape)
        local = own = None
        if with_labels:
            local, own = localize(rows.labels[r], offset + v0, tile.shape[1], None)
        tile_up = kernels.Upstream(
            up.stats[:, r],
            up.entropy[r],
            up.grad_logp[r] if with_labels else None,
            up.grad_entropy[r] if up.grad_entropy is not None else None,
        )
        part_backward(backend, tile.unsqueeze(0), kernels.Rows(local, None, rows.inv_temp), own, tile_up, d.unsqueeze(0))
        del tile
        grads.add(d, r, v0, ci)
    return grads.result(group)


@torch.library.custom_op("entropy_reg::linear_logprobs_entropy", mutates_args=())
def linear_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor | None,
    active: Tensor | None,
    inv_temp: float,
    backend: str,
    chunk: int,
    block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs[n] or empty when labels is None, entropy[n], stats[2, n]) from hidden[n, D], weight[V, D]."""
    with torch.autocast(hidden.device.type, enabled=False):  # the inputs' dtypes are the compute dtypes
        return _forward(hidden, weight, bias, kernels.Rows(labels, active, inv_temp), backend, (chunk, block), None)


@linear_logprobs_entropy.register_fake
def _(hidden, weight, bias, labels, active, inv_temp, backend, chunk, block):
    n = hidden.shape[0]
    acc = compute_dtype(hidden)
    return hidden.new_empty(n if labels is not None else 0, dtype=acc), hidden.new_empty(n, dtype=acc), hidden.new_empty(2, n, dtype=acc)


@torch.library.custom_op("entropy_reg::linear_logprobs_entropy_backward", mutates_args=())
def linear_logprobs_entropy_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None, active: Tensor | None,
    stats: Tensor, entropy: Tensor, grad_logp: Tensor | None, grad_entropy: Tensor | None, inv_temp: float,
    backend: str, chunk: int, block: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias); an empty tensor for each one not needed."""
    rows = kernels.Rows(labels, active, inv_temp)
    up = kernels.Upstream(stats, entropy, grad_logp, grad_entropy)
    needs = (need_hidden, need_weight, need_bias)
    with torch.autocast(hidden.device.type, enabled=False):
        return _backward(hidden, weight, bias, rows, up, backend, (chunk, block), needs, None)


@linear_logprobs_entropy_backward.register_fake
def _(hidden, weight, bias, labels, active, stats, entropy, grad_logp, grad_entropy, inv_temp, backend, chunk, block, need_hidden, need_weight, need_bias):
    def like(t: Tensor | None, need: bool) -> Tensor:
        return torch.empty_like(t) if need else hidden.new_empty(0)

    return like(hidden, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _needs(ctx: torch.autograd.function.FunctionCtx, bias: Tensor | None) -> tuple[bool, bool, bool]:
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]


def _input_grads(ctx: torch.autograd.function.FunctionCtx, grads: tuple[Tensor, Tensor, Tensor], n_inputs: int) -> tuple[Tensor | None, ...]:
    """The gradients of (hidden, weight, bias) where needed, then None for the other n_inputs - 3 inputs."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs)) + (None,) * (n_inputs - 3)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, active, inv_temp, backend, chunk, block = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, active, stats, entropy)
    ctx.args = (inv_temp, backend, chunk, block)
    ctx.needs = _needs(ctx, bias)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(stats)


def _op_backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None, _grad_stats: Tensor | None):
    hidden, weight, bias, labels, active, stats, entropy = ctx.saved_tensors
    grads = linear_logprobs_entropy_backward(
        hidden, weight, bias, labels, active, stats, entropy, grad_logp, grad_entropy, *ctx.args, *ctx.needs
    )
    return _input_grads(ctx, grads, ctx.n_inputs)


torch.library.register_autograd("entropy_reg::linear_logprobs_entropy", _op_backward, setup_context=_setup_context)


class _ShardedLinear(torch.autograd.Function):
    """Vocabulary-parallel autograd (collectives in Python, so not a custom op)."""

    @staticmethod
    def forward(ctx, *inputs):
        hidden, weight, bias, rows, backend, tiles, group = inputs  # rows: kernels.Rows, tiles: (chunk, block)
        with torch.autocast(hidden.device.type, enabled=False):
            logp, entropy, stats = _forward(hidden, weight, bias, rows, backend, tiles, group)
        ctx.save_for_backward(hidden, weight, bias, rows.labels, rows.active, stats, entropy)
        ctx.inv_temp, ctx.backend, ctx.tiles, ctx.group = rows.inv_temp, backend, tiles, group
        ctx.needs = _needs(ctx, bias)
        ctx.n_inputs = len(inputs)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, active, stats, entropy = ctx.saved_tensors
        rows = kernels.Rows(labels, active, ctx.inv_temp)
        up = kernels.Upstream(stats, entropy, grad_logp, grad_entropy)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = _backward(hidden, weight, bias, rows, up, ctx.backend, ctx.tiles, ctx.needs, ctx.group)
        return _input_grads(ctx, grads, ctx.n_inputs)
