"""GPU check and benchmark of the Triton entropy kernels against float64 references and the peers.

One run does everything a lent GPU is for, in order of value, inside a time budget:

1. the card, driver, torch and triton versions, and the measured copy bandwidth;
2. the contract tests (tests/test_contract.py) on the GPU under real Triton: confident tokens at
   large |x| / T, strided / expanded / offset views of every tensor argument, float64, the
   in-place backward's overlap check, linear_token_entropy's block merge;
3. the host time per call on a tiny input (forward, forward+backward), and whether a call syncs;
4. correctness under real Triton against float64 references on fresh random inputs
   (every dtype, masked rows, ignored labels, -inf entries, temperature, split rows,
   non-contiguous views, N*V past 2**31, the in-place backward);
5. timings (triton.testing.do_bench medians) of token_entropy and
   token_logprobs_and_entropy (forward, forward+backward, in-place backward) against
   the naive formula (eager and torch.compile), its chunked variant and TRL 1.16's fused
   log-prob + entropy kernel (when trl imports), with peak
   extra memory, at N in {4096, 8192, 16384} x V in {32000, 151936, 262144} x {bf16, fp32};
6. the fused lm_head benchmark (benchmarks/bench_linear.py), when present.

Full results go to OUT/gpu_bench.json and OUT/gpu_bench.md; a short table is printed last.

    python benchmarks/bench_gpu.py --out benchmarks/results            # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --quick --out /tmp/x   # proves the script on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import entropy_reg as er  # noqa: E402
from benchmarks.peers import naive, naive_chunked  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def bench(fn: Callable[[], Any], quick: bool) -> float:
    """Median milliseconds of fn()."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100 if not quick else 20, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra(fn: Callable[[], Any]) -> float | None:
    """Peak bytes allocated by fn() above what was allocated before it (CUDA only)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def environment() -> dict[str, Any]:
    import triton

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        env.update(sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def copy_bandwidth(quick: bool) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy."""
    n = (1 << 28) if CUDA else (1 << 20)  # 1 GiB of float32 on the GPU
    a = torch.randn(n, device=DEV)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), quick)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


# ---------------------------------------------------------------- correctness


def ref_logprobs_entropy(x: torch.Tensor, labels: torch.Tensor | None, temperature: float):
    logp = torch.log_softmax(x.double() / temperature, -1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) if labels is not None else None
    return lp, ent


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(out)):
        return float("inf")
    num = (out[fin] - ref[fin]).norm()
    den = ref[fin].norm().clamp_min(1e-30)
    return float(num / den)


def make_case(n: int, v: int, dtype: torch.dtype, gen: torch.Generator):
    x = (torch.randn(n, v, device=DEV, generator=gen) * 4).to(dtype)
    ninf = torch.rand(n, v, device=DEV, generator=gen) < 0.05
    ninf[::2] = False  # half the rows keep every entry finite
    x = x.masked_fill(ninf, float("-inf"))
    labels = torch.randint(0, v, (n,), device=DEV, generator=gen)
    labels = torch.where(ninf.gather(1, labels[:, None]).squeeze(1), 0, labels)  # labels on finite entries
    x[:, 0] = x[:, 0].nan_to_num(neginf=0.0)
    labels[1::7] = -100
    mask = torch.rand(n, device=DEV, generator=gen) > 0.25
    mask[0] = True  # at least one active row
    return x, labels, mask


def check_forward_backward(n: int, v: int, dtype: torch.dtype, temperature: float, gen, name: str) -> dict[str, Any]:
    x, labels, mask = make_case(n, v, dtype, gen)
    active = mask & (labels != -100)
    g_lp = torch.randn(n, device=DEV, generator=gen)
    g_h = torch.randn(n, device=DEV, generator=gen)
    xx = x.clone().requires_grad_()
    lp, h = er.token_logprobs_and_entropy(xx, labels, mask=mask, temperature=temperature, backend="triton")
    (lp * g_lp + h * g_h).sum().backward()
    xr = x.double().requires_grad_()
    rlp, rh = ref_logprobs_entropy(xr, labels, temperature)
    rlp = torch.where(active, rlp, 0.0)
    rh = torch.where(active, rh, 0.0)
    (rlp * g_lp + rh * g_h).sum().backward()
    # in-place backward must give the same gradient
    xi = x.clone().requires_grad_()
    xi2 = xi * 1
    lpi, hi = er.token_logprobs_and_entropy(
        xi2, labels, mask=mask, temperature=temperature, backend="triton", inplace_backward=True
    )
    (lpi * g_lp + hi * g_h).sum().backward()
    res = {
        "check": name,
        "n": n,
        "V": v,
        "dtype": str(dtype).split(".")[-1],
        "logp_rel": rel_err(lp, rlp),
        "entropy_rel": rel_err(h, rh),
        "grad_rel": rel_err(xx.grad, xr.grad.to(dtype)),
        "inplace_grad_rel": rel_err(xi.grad, xx.grad),
        "masked_rows_zero": bool((xx.grad[~active] == 0).all()),
        "grad_finite": bool(torch.isfinite(xx.grad).all()),
    }
    # Outputs are float32 math on the exact input values; only the gradient is rounded to the dtype.
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    res["ok"] = (
        res["logp_rel"] < 1e-5
        and res["entropy_rel"] < 1e-5
        and res["grad_rel"] < grad_tol
        and res["inplace_grad_rel"] < 1e-6
        and res["masked_rows_zero"]
        and res["grad_finite"]
    )
    return res


def check_large(n: int, v: int, gen) -> dict[str, Any]:
    """N*V past 2**31, read through a non-contiguous [B, T-1, V] slice: int64 offsets and strides."""
    b = 4
    t = n // b + 1
    full = torch.randn(b, t, v, device=DEV, dtype=torch.bfloat16, generator=gen)
    x = full[:, 1:]  # not viewable as one matrix: rows are not evenly spaced
    h = er.token_entropy(x, backend="triton")
    err = 0.0
    for i in range(b):  # float64 reference, one batch row at a time
        _, rh = ref_logprobs_entropy(x[i], None, 1.0)
        err = max(err, rel_err(h[i], rh))
    # gradient of the last rows only, against float64 autograd of those rows
    xg = x.detach().requires_grad_()
    hg = er.token_entropy(xg, backend="triton")
    g = torch.zeros_like(hg)
    g[-1, -4:] = 1.0
    hg.backward(g)
    tail = x[-1, -4:].double().requires_grad_()
    _, rt = ref_logprobs_entropy(tail, None, 1.0)
    rt.sum().backward()
    grad_err = rel_err(xg.grad[-1, -4:], tail.grad)
    res = {
        "check": "int64 offsets, strided slice",
        "n": b * (t - 1),
        "V": v,
        "elements": b * t * v,
        "dtype": "bfloat16",
        "entropy_rel": err,
        "grad_rel": grad_err,
        "untouched_rows_zero": bool((xg.grad[0, :8] == 0).all()),
    }
    res["ok"] = err < 1e-2 and grad_err < 1e-1 and res["untouched_rows_zero"]
    return res


def check_label_out_of_range() -> dict[str, Any]:
    """On CUDA the kernel answers an id outside [0, V) with NaN (no host sync), never a stray read."""
    x = torch.randn(4, 1000, device=DEV)
    labels = torch.tensor([3, 1000, -7, 999], device=DEV)
    lp, h = er.token_logprobs_and_entropy(x, labels, backend="triton") if CUDA else (None, None)
    if lp is None:
        return {"check": "label out of range gives NaN", "ok": True, "note": "CUDA only"}
    ok = bool(torch.isnan(lp[1:3]).all() and torch.isfinite(lp[[0, 3]]).all() and torch.isfinite(h).all())
    return {"check": "label out of range gives NaN", "ok": ok}


def contract_tests() -> dict[str, Any]:
    """tests/test_contract.py on this machine's GPU under real Triton (a subprocess: pytest owns its process)."""
    if not CUDA:
        return {"check": "contract tests on the GPU", "ok": True, "note": "CUDA only"}
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ENTROPY_REG_TEST_DEVICE="cuda", TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"check": "contract tests on the GPU (tests/test_contract.py)", "ok": proc.returncode == 0, "tail": tail}


def host_overhead(quick: bool) -> dict[str, Any]:
    """Host microseconds per call on a tiny input (64 x 1024 bf16), and whether a call syncs the device.

    The loop enqueues `reps` calls and syncs once at the end: the host's cost per call is the
    loop's wall time over `reps` while the GPU keeps up (it does: the kernels take a few us).
    """
    if not CUDA:
        return {"check": "host time per call", "ok": True, "note": "CUDA only"}
    x = torch.randn(64, 1024, device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, 1024, (64,), device=DEV)
    g = torch.randn(64, device=DEV)
    xg = x.clone().requires_grad_()

    def fwd() -> None:
        with torch.no_grad():
            er.token_logprobs_and_entropy(x, y, backend="triton")

    def fwdbwd() -> None:
        lp, h = er.token_logprobs_and_entropy(xg, y, backend="triton")
        torch.autograd.backward([lp, h], [g, g])
        xg.grad = None

    out: dict[str, Any] = {"check": "host time per call (64 x 1024 bf16)", "ok": True}
    reps = 50 if quick else 500
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device sync inside a call raises
        try:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            host = (time.perf_counter() - t0) / reps
            syncs = False
        except RuntimeError:
            host, syncs = float("nan"), True
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        out[f"{name}_host_us"] = host * 1e6
        out[f"{name}_syncs"] = syncs
        out["ok"] = out["ok"] and not syncs
    return out


def autotune_choices() -> dict[str, str]:
    """The configs the autotuner picked, per (V, num_splits, dtypes) key."""
    from entropy_reg.kernels import triton_entropy as te

    out = {}
    for name, kernel in (("forward", te._fwd_kernel), ("backward", te._bwd_tuned)):
        for key, cfg in getattr(kernel, "cache", {}).items():
            out[f"{name} {key}"] = str(cfg)
    return out


def check_compile() -> dict[str, Any]:
    x = torch.randn(64, 1000, device=DEV, requires_grad=True)
    y = torch.randint(0, 1000, (64,), device=DEV)

    def loss(x, y):
        lp, h = er.token_logprobs_and_entropy(x, y, backend="triton")
        return (lp + 0.01 * h).mean()

    compiled = torch.compile(loss, fullgraph=True)
    out = compiled(x, y)
    out.backward()
    g = x.grad.clone()
    x.grad = None
    loss(x, y).backward()
    err = rel_err(g, x.grad)
    return {"check": "torch.compile(fullgraph=True)", "grad_rel": err, "ok": err < 1e-6}


# ---------------------------------------------------------------- timings


def trl_peer(labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """TRL 1.16's fused Triton log-prob + entropy kernel (``trl.kernels.selective_log_softmax_and_entropy``)
    as log p + H, the quantity ``logp_entropy`` times; None without CUDA or TRL."""
    if not CUDA:
        return None
    try:
        from trl.kernels import selective_log_softmax_and_entropy as trl_kernel
    except ImportError:
        return None
    return lambda t: sum(trl_kernel(t, labels))


def time_case(n: int, v: int, dtype: torch.dtype, quick: bool, budget: Budget, compiled: dict) -> dict[str, Any]:
    x = (torch.randn(n, v, device=DEV) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=DEV)
    g = torch.randn(n, device=DEV)
    row: dict[str, Any] = {"N": n, "V": v, "dtype": str(dtype).split(".")[-1], "logits_bytes": x.numel() * x.element_size()}
    xg = x.detach().requires_grad_()

    def fwd_bwd(f):
        def run():
            xg.grad = None
            f(xg).backward(g)

        return run

    ours = {
        "entropy": lambda t: er.token_entropy(t, backend="triton"),
        "logp_entropy": lambda t: sum(er.token_logprobs_and_entropy(t, labels, backend="triton")),
    }
    cases: dict[str, Callable[[], Any]] = {
        "fwd_entropy": lambda: ours["entropy"](x),
        "fwd_logp_entropy": lambda: ours["logp_entropy"](x),
    }
    cases["fwdbwd_entropy"] = fwd_bwd(ours["entropy"])
    cases["fwdbwd_logp_entropy"] = fwd_bwd(ours["logp_entropy"])
    xi = x.detach().clone().requires_grad_()

    def inplace():  # the logits' values become gradients after the first call; timing does not depend on them
        xi.grad = None
        er.token_entropy(xi, backend="triton", inplace_backward=True).backward(g)

    cases["fwdbwd_inplace"] = inplace
    peers = {"naive": naive, "naive_chunked": naive_chunked}
    if "naive_compiled" in compiled:
        peers["naive_compiled"] = compiled["naive_compiled"]
    trl = trl_peer(labels)
    if trl is not None:
        peers["trl_logp_entropy"] = trl
    for name, f in peers.items():
        cases[f"fwd_{name}"] = (lambda f=f: f(x))
        cases[f"fwdbwd_{name}"] = fwd_bwd(f)
    for name, fn in cases.items():
        if budget.left() < 20:
            row[name + "_ms"] = None
            row.setdefault("skipped", []).append(name)
            continue
        try:
            if name.startswith("fwd_"):
                with torch.no_grad():
                    row[name + "_ms"] = bench(fn, quick)
                    row[name + "_peak_extra"] = peak_extra(fn)
            else:
                row[name + "_ms"] = bench(fn, quick)
                xg.grad = xi.grad = None  # measure a backward that allocates its gradient
                row[name + "_peak_extra"] = peak_extra(fn)
        except torch.OutOfMemoryError:
            row[name + "_ms"] = None
            row[name + "_peak_extra"] = "OOM"
        if CUDA:
            torch.cuda.empty_cache()
    del x, xg, xi
    return row


def summarize(row: dict[str, Any], bw: float) -> dict[str, Any]:
    read_ms = row["logits_bytes"] / bw * 1e3
    out = {"read_once_ms": read_ms}
    if row.get("fwd_entropy_ms"):
        out["fwd_over_read"] = row["fwd_entropy_ms"] / read_ms
    if row.get("fwdbwd_entropy_ms"):
        out["fwdbwd_over_2r1w"] = row["fwdbwd_entropy_ms"] / (3 * read_ms)
    if row.get("fwd_logp_entropy_ms") and row.get("fwd_entropy_ms"):
        out["logp_overhead"] = row["fwd_logp_entropy_ms"] / row["fwd_entropy_ms"] - 1
    best_fwd = min((row[k] for k in ("fwd_naive_ms", "fwd_naive_chunked_ms", "fwd_naive_compiled_ms") if row.get(k)), default=None)
    best_fb = min(
        (row[k] for k in ("fwdbwd_naive_ms", "fwdbwd_naive_chunked_ms", "fwdbwd_naive_compiled_ms") if row.get(k)), default=None
    )
    if best_fwd and row.get("fwd_entropy_ms"):
        out["fwd_speedup_vs_best_peer"] = best_fwd / row["fwd_entropy_ms"]
    if best_fb and row.get("fwdbwd_entropy_ms"):
        out["fwdbwd_speedup_vs_best_peer"] = best_fb / row["fwdbwd_entropy_ms"]
    return out


def markdown(env: dict, bw: float, checks: list, rows: list) -> str:
    lines = [
        f"# GPU benchmark: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, driver {env.get('driver')}, {env['date']}; "
        f"measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write).",
        "",
        "## Checks against float64 (real Triton)",
        "",
        "| check | N | V | dtype | entropy rel | logp rel | grad rel | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        fmt = lambda k: f"{c[k]:.1e}" if isinstance(c.get(k), float) else "-"  # noqa: E731
        lines.append(
            f"| {c['check']} | {c.get('n', '-')} | {c.get('V', '-')} | {c.get('dtype', '-')} | "
            f"{fmt('entropy_rel')} | {fmt('logp_rel')} | {fmt('grad_rel')} | {c['ok']} |"
        )
    lines += [
        "",
        "## Timings (median ms) and ratios",
        "",
        "| N | V | dtype | fwd | fwd / 1 read | lp+H fwd | fwd+bwd | fwd+bwd / (2R+1W) | in-place | naive fwd | naive fwd+bwd | compiled fwd+bwd | chunked fwd+bwd | fwd peak extra | fwd+bwd peak extra |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        f = lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), float) else ("OOM" if r.get(k.replace("_ms", "_peak_extra")) == "OOM" else "-")  # noqa: E731
        mib = lambda k: f"{r[k] / 2**20:.1f} MiB" if isinstance(r.get(k), float) else "-"  # noqa: E731
        lines.append(
            f"| {r['N']} | {r['V']} | {r['dtype']} | {f('fwd_entropy_ms')} | {s.get('fwd_over_read', 0):.2f} | "
            f"{f('fwd_logp_entropy_ms')} | {f('fwdbwd_entropy_ms')} | {s.get('fwdbwd_over_2r1w', 0):.2f} | "
            f"{f('fwdbwd_inplace_ms')} | {f('fwd_naive_ms')} | {f('fwdbwd_naive_ms')} | {f('fwdbwd_naive_compiled_ms')} | "
            f"{f('fwdbwd_naive_chunked_ms')} | {mib('fwd_entropy_peak_extra')} | {mib('fwdbwd_entropy_peak_extra')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (proves the script, e.g. on CPU)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later items are skipped past it")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--no-linear", action="store_true", help="skip the fused lm_head benchmark")
    ap.add_argument("--sizes", default=None, help="NxV,NxV,... instead of the full grid (e.g. 16384x151936)")
    args = ap.parse_args()
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=DEV).manual_seed(0)

    env = environment()
    bw = copy_bandwidth(args.quick)
    print(f"{env['device']}: copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    result: dict[str, Any] = {"env": env, "copy_bandwidth_Bps": bw, "checks": [], "timings": []}

    def save() -> None:
        (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=1))

    for check in (contract_tests, lambda: host_overhead(args.quick)):
        try:
            r = check()
        except Exception as exc:  # report, do not stop the run
            r = {"check": getattr(check, "__name__", "host time per call"), "ok": False, "error": repr(exc)[:500]}
        result["checks"].append(r)
        print(json.dumps(r), flush=True)
    save()

    vocabs = (32000, 151936, 262144) if not args.quick else (1000, 3001)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for v in vocabs:
            for n, label in ((64, "rows"), (4, "split rows")):
                r = check_forward_backward(n, v, dtype, 0.7 if n == 4 else 1.0, gen, label)
                result["checks"].append(r)
                print(json.dumps(r), flush=True)
    if not args.quick:
        r = check_large(16384, 151936, gen)
        result["checks"].append(r)
        print(json.dumps(r), flush=True)
    r = check_label_out_of_range()
    result["checks"].append(r)
    print(json.dumps(r), flush=True)
    try:
        r = check_compile()
    except Exception as exc:  # report, do not stop the run
        r = {"check": "torch.compile(fullgraph=True)", "ok": False, "error": repr(exc)[:500]}
    result["checks"].append(r)
    print(json.dumps(r), flush=True)
    save()

    compiled: dict[str, Callable] = {}
    if CUDA and not args.no_compile:
        compiled["naive_compiled"] = torch.compile(naive, dynamic=True)
    sizes = [(n, v) for n in (4096, 8192, 16384) for v in (32000, 151936, 262144)] if not args.quick else [(16, 1000)]
    if args.sizes:
        sizes = [tuple(int(a) for a in nv.split("x")) for nv in args.sizes.split(",")]
    for dtype in (torch.bfloat16, torch.float32):
        for n, v in sizes:
            if budget.left() < 30:
                break
            row = time_case(n, v, dtype, args.quick, budget, compiled)
            row["summary"] = summarize(row, bw)
            result["timings"].append(row)
            print(json.dumps({k: row[k] for k in ("N", "V", "dtype")} | row["summary"]), flush=True)
            save()

    result["autotune"] = autotune_choices()
    save()
    if not args.no_linear and CUDA and budget.left() > 60:
        try:
            from benchmarks import bench_linear

            result["linear"] = bench_linear.run_cuda(args.out)
        except Exception as exc:
            result["linear"] = {"error": repr(exc)[:1000]}
        print(json.dumps(result["linear"])[:2000], flush=True)
    save()
    md = markdown(env, bw, result["checks"], result["timings"])
    (args.out / "gpu_bench.md").write_text(md)
    print(md)
    bad = [c["check"] for c in result["checks"] if not c["ok"]]
    print("FAILED CHECKS:", bad if bad else "none")


if __name__ == "__main__":
    main()
