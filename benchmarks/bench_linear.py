"""Fused lm_head log-prob + entropy: ``linear_token_entropy`` against two ways of doing without it.

Methods (each gives (log p_y, H) per token from hidden[M, H], weight[V, H], labels[M]):

- ``fused``: ``entropy_reg.linear_token_entropy`` (tiles of logits, recomputed in the backward).
- ``materialized``: ``logits = hidden @ weight.T`` then ``token_logprobs_and_entropy``.
- ``chunked_torch``: row chunks in plain PyTorch from the formulas, the approach of verl's
  ``FusedLinearForPPO`` (float32 log-softmax per chunk, recompute in the backward).

CPU (default): small sizes, one subprocess per method; peak RSS above the inputs
(``ru_maxrss``), median wall time. CUDA (``--device cuda --dtype bfloat16 --M 8192
--H 4096 --V 131072``, or ``run_cuda(out_dir)`` from a script): median time of
``triton.testing.do_bench``, ``torch.cuda.max_memory_allocated`` above the inputs.
Writes ``linear_<device>.json`` and ``linear_<device>.md`` to ``benchmarks/results/``.

    python benchmarks/bench_linear.py                 # CPU, ~30 s on 2 cores
    python benchmarks/bench_linear.py --device cuda --dtype bfloat16 --M 8192 --H 4096 --V 131072
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from entropy_reg import token_logprobs_and_entropy
from entropy_reg.linear import linear_token_entropy

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fused", "materialized", "chunked_torch")
MIB = 1 << 20
# Published H100 bf16 numbers at M=8192, H=4096, V=131072 (ms): best fused, and chunked PyTorch.
PUBLISHED = {"best": {"fwd_ms": 12.3, "fwd_bwd_ms": 50.2}, "chunked_torch": {"fwd_ms": 45.6, "fwd_bwd_ms": 165.6}}


class ChunkedTorch(torch.autograd.Function):
    """Row-chunked (log p_y, H) in PyTorch ops, float32 math per chunk; backward recomputes each chunk.

    Per chunk: z = (h @ W.T) / T in float32, log p = log_softmax(z), H = -sum p log p;
    dz = -p (g_H (log p + H) + g_lp) + g_lp 1[j = y]; dlogits = dz / T;
    grad_h = dlogits @ W; grad_W += dlogits.T @ h (float32).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk: int):
        logp, ent = [], []
        for r in range(0, hidden.shape[0], chunk):
            log_p = ((hidden[r : r + chunk] @ weight.T).float() / temperature).log_softmax(-1)
            ent.append(-(log_p.exp() * log_p).sum(-1))
            logp.append(log_p.gather(1, labels[r : r + chunk, None]).squeeze(1))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.temperature, ctx.chunk = temperature, chunk
        return torch.cat(logp), torch.cat(ent)

    @staticmethod
    def backward(ctx, g_lp: Tensor, g_h: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for r in range(0, hidden.shape[0], chunk):
            h_c = hidden[r : r + chunk]
            log_p = ((h_c @ weight.T).float() / t).log_softmax(-1)
            p = log_p.exp()
            ent = -(p * log_p).sum(-1, keepdim=True)
            gl, gh = g_lp[r : r + chunk, None], g_h[r : r + chunk, None]
            dz = -p * (gh * (log_p + ent) + gl)
            dz.scatter_add_(1, labels[r : r + chunk, None], gl)
            d = (dz / t).to(hidden.dtype)
            grad_h[r : r + chunk] = d @ weight
            grad_w += (d.T @ h_c).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None


def method_fn(name: str) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    if name == "fused":
        return lambda h, w, y: linear_token_entropy(h, w, y)
    if name == "materialized":
        return lambda h, w, y: token_logprobs_and_entropy(h @ w.T, y)
    if name == "chunked_torch":
        return lambda h, w, y: ChunkedTorch.apply(h, w, y, 1.0, 512)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


def make_inputs(m: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (m,), generator=g, device=device)
    g_lp = torch.randn(m, generator=g, device=device)
    g_h = torch.randn(m, generator=g, device=device)
    return hidden, weight, labels, g_lp, g_h


def fwd_bwd(fn, hidden, weight, labels, g_lp, g_h) -> None:
    logp, ent = fn(hidden, weight, labels)
    torch.autograd.backward([logp, ent], [g_lp, g_h])


# ---------------------------------------------------------------- CPU: one process per method


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_worker(name: str, m: int, h: int, v: int, repeats: int) -> dict:
    torch.manual_seed(0)
    hidden, weight, labels, g_lp, g_h = make_inputs(m, h, v, torch.float32, "cpu")
    fn = method_fn(name)
    fwd_bwd(fn, *make_inputs(4, h, 8, torch.float32, "cpu"))  # one-time costs (lazy imports, dispatch) out of the peak
    base = _rss_mib()
    with torch.no_grad():
        fn(hidden, weight, labels)
    fwd_peak = _rss_mib() - base
    fwd_bwd(fn, hidden, weight, labels, g_lp, g_h)
    grads_mib = (hidden.numel() + weight.numel()) * 4 / MIB
    both_peak = _rss_mib() - base

    def timed(step: Callable[[], None]) -> float:
        times = []
        for _ in range(repeats):
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def fwd() -> None:
        with torch.no_grad():
            fn(hidden, weight, labels)

    return {
        "method": name,
        "fwd_ms": timed(fwd),
        "fwd_bwd_ms": timed(lambda: fwd_bwd(fn, hidden, weight, labels, g_lp, g_h)),
        "fwd_peak_mib": fwd_peak,
        "fwd_bwd_peak_mib": both_peak,
        "grads_mib": grads_mib,
    }


def run_cpu(m: int, h: int, v: int, repeats: int) -> dict:
    rows = []
    for name in METHODS:
        cmd = [sys.executable, __file__, "--worker", name, "--M", str(m), "--H", str(h), "--V", str(v), "--repeats", str(repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "shape": {"M": m, "H": h, "V": v, "dtype": "float32"},
        "logits_mib": m * v * 4 / MIB,
        "memory": "peak RSS above the inputs (includes the gradients of hidden and weight for fwd+bwd)",
        "results": rows,
    }


# ---------------------------------------------------------------- CUDA


def run_cuda(
    out_dir: str | Path | None = None,
    m: int = 8192,
    h: int = 4096,
    v: int = 131072,
    dtype: torch.dtype = torch.bfloat16,
    methods: tuple[str, ...] = METHODS,
) -> dict:
    """Benchmark on the current CUDA device; write JSON + markdown to ``out_dir`` and return the dict."""
    import triton.testing

    hidden, weight, labels, g_lp, g_h = make_inputs(m, h, v, dtype, "cuda")
    grads_mib = (hidden.numel() + weight.numel()) * hidden.element_size() / MIB
    rows = []
    for name in methods:
        fn = method_fn(name)

        def fwd() -> None:
            with torch.no_grad():
                fn(hidden, weight, labels)

        def both() -> None:
            fwd_bwd(fn, hidden, weight, labels, g_lp, g_h)

        row = {"method": name, "grads_mib": grads_mib}
        for key, step in (("fwd", fwd), ("fwd_bwd", both)):
            hidden.grad = weight.grad = None
            step()  # warm-up: autotuning, allocator
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[f"{key}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
            row[f"{key}_ms"] = triton.testing.do_bench(step, grad_to_none=[hidden, weight], rep=300, return_mode="median")
        hidden.grad = weight.grad = None
        rows.append(row)
        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": {"M": m, "H": h, "V": v, "dtype": str(dtype).removeprefix("torch.")},
        "logits_mib": m * v * torch.empty(0, dtype=dtype).element_size() / MIB,
        "memory": "torch.cuda.max_memory_allocated above the inputs (includes the gradients of hidden and weight for fwd+bwd)",
        "published_h100_ms": PUBLISHED,
        "results": rows,
    }
    if out_dir is not None:
        write(result, Path(out_dir), "cuda")
    return result


def profile_cuda(m: int = 8192, h: int = 4096, v: int = 131072, dtype: torch.dtype = torch.bfloat16) -> str:
    """Kernel-time table of one fused forward + backward (where the time goes, for tuning)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(m, h, v, dtype, "cuda")
    fn = method_fn("fused")
    fwd_bwd(fn, *inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(fn, *inputs)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"### linear log-prob + entropy, {result['device']}, M={s['M']} H={s['H']} V={s['V']} {s['dtype']}",
        "",
        f"Logits would be {result['logits_mib']:.0f} MiB. Memory: {result['memory']}.",
        "",
        "| method | forward ms | fwd+bwd ms | peak fwd MiB | peak fwd+bwd MiB | of which gradients MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['method']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['fwd_peak_mib']:.0f} "
            f"| {r['fwd_bwd_peak_mib']:.0f} | {r['grads_mib']:.0f} |"
        )
    if "published_h100_ms" in result:
        p = result["published_h100_ms"]
        lines += [
            "",
            f"Published (H100): best {p['best']['fwd_ms']} / {p['best']['fwd_bwd_ms']} ms, "
            f"chunked PyTorch {p['chunked_torch']['fwd_ms']} / {p['chunked_torch']['fwd_bwd_ms']} ms.",
        ]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path, tag: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"linear_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"linear_{tag}.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    ap.add_argument("--M", type=int, default=None, help="tokens (default 512 on CPU, 8192 on CUDA)")
    ap.add_argument("--H", type=int, default=None, help="hidden size (default 256 / 4096)")
    ap.add_argument("--V", type=int, default=None, help="vocabulary (default 16384 / 131072)")
    ap.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (median)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--profile", action="store_true", help="CUDA: also print where the fused method's time goes")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    m, h, v = a.M or (8192 if cuda else 512), a.H or (4096 if cuda else 256), a.V or (131072 if cuda else 16384)
    if a.worker:
        print(json.dumps(cpu_worker(a.worker, m, h, v, a.repeats)))
        return
    if cuda:
        dtype = getattr(torch, a.dtype or "bfloat16")
        result = run_cuda(a.out, m, h, v, dtype)
        if a.profile:
            print(profile_cuda(m, h, v, dtype))
    else:
        if a.dtype not in (None, "float32"):
            ap.error("the CPU benchmark runs in float32")
        result = run_cpu(m, h, v, a.repeats)
        write(result, a.out, "cpu")
    print(markdown(result))


if __name__ == "__main__":
    main()
