"""CPU benchmark: token_entropy against the formulas users run today, time and peak memory.

Every case (implementation x forward / forward+backward x N x V) runs in its own
process, so one case's allocations never pollute another's peak. In the child:
the logits are made, the case is warmed up on four rows, the peak-RSS counter
is reset (/proc/self/clear_refs), the case runs once (its peak memory above the logits is read from VmHWM), then it
is timed (median of --reps runs).

    python benchmarks/bench_cpu.py                      # the target case N=2048, V=151936, float32
    python benchmarks/bench_cpu.py --grid               # plus N in {1024, 4096, 16384} x V in {32000, 151936, 262144}
    python benchmarks/bench_cpu.py --n 64 --v 1000 --reps 1 --out /tmp/b   # a smoke run

Results: OUT/cpu_bench.json and OUT/cpu_bench.md.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("entropy_reg", "naive", "naive_chunked", "logsoftmax_chunked", "categorical")
# Rough peak memory of each case in units of the logits' size, to skip cases the machine cannot hold.
FOOTPRINT = {"fwd": {"naive": 3.0, "categorical": 4.0}, "fwdbwd": {"naive": 6.0, "categorical": 6.0}}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(impl: str, mode: str, n: int, v: int, dtype: str, reps: int) -> dict[str, Any]:
    """Runs in the child process."""
    import torch

    sys.path.insert(0, str(ROOT))
    import entropy_reg as er
    from benchmarks.peers import PEERS

    fn = (lambda x: er.token_entropy(x, backend="torch")) if impl == "entropy_reg" else PEERS[impl]
    torch.manual_seed(0)
    x = (torch.randn(n, v) * 3).to(getattr(torch, dtype))
    g = torch.randn(n)
    if mode == "fwdbwd":
        x.requires_grad_()

    def once(x: torch.Tensor = x, g: torch.Tensor = g) -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            x.grad = None
            fn(x).backward(g.to(x.dtype))

    # warm up lazily initialized libraries (thread pools, kernels) on a few rows, outside the measurement
    once(x.detach()[:4].clone().requires_grad_(mode == "fwdbwd"), g[:4])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") - base
    times = [first]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    logits_kib = x.numel() * x.element_size() / 1024
    return {
        "impl": impl,
        "mode": mode,
        "N": n,
        "V": v,
        "dtype": dtype,
        "seconds": statistics.median(times[1:] if len(times) > 1 else times),
        "all_seconds": times,
        "peak_extra_bytes": peak * 1024,
        "peak_extra_over_logits": peak / logits_kib,
        "threads": torch.get_num_threads(),
    }


def spawn(impl: str, mode: str, n: int, v: int, dtype: str, reps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", impl, mode, str(n), str(v), dtype, str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"impl": impl, "mode": mode, "N": n, "V": v, "dtype": dtype, "error": out.stderr[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"CPU: {env['cpu']}, {env['cores']} cores ({env['cpu_capability']}), torch {env['torch']}, {env['date']}.",
        "Time: median seconds; memory: peak RSS above the logits, in units of the logits' size.",
        "",
        "| N | V | dtype | impl | fwd s | fwd mem | fwd+bwd s | fwd+bwd mem | fwd speed-up | fwd+bwd speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["N"], r["V"], r["dtype"]), {}).setdefault(r["impl"], {})[r["mode"]] = r
    for (n, v, dtype), impls in groups.items():
        ours = impls.get("entropy_reg", {})
        for impl in IMPLS:
            if impl not in impls:
                continue
            cells = []
            for mode in ("fwd", "fwdbwd"):
                r = impls[impl].get(mode)
                if r is None or "error" in r:
                    cells += ["skipped" if r is None else "error", "-"]
                else:
                    cells += [f"{r['seconds']:.3f}", f"{r['peak_extra_over_logits']:.2f}x"]
            ratios = []
            for mode in ("fwd", "fwdbwd"):
                r, o = impls[impl].get(mode), ours.get(mode)
                ok = r and o and "error" not in r and "error" not in o
                ratios.append(f"{r['seconds'] / o['seconds']:.1f}x" if ok and impl != "entropy_reg" else "-")
            lines.append(f"| {n} | {v} | {dtype} | {impl} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3, help="runs per case; the first is the memory run")
    ap.add_argument("--grid", action="store_true", help="also N in {1024,4096,16384} x V in {32000,151936,262144}")
    ap.add_argument("--max-gib", type=float, default=16.0, help="skip cases whose estimated peak exceeds this")
    ap.add_argument("--name", default="cpu_bench", help="output file stem")
    args = ap.parse_args()

    sizes = [(args.n, args.v)]
    if args.grid:
        sizes += [(n, v) for n in (1024, 4096, 16384) for v in (32000, 151936, 262144) if (n, v) != sizes[0]]
    env = machine()
    rows = []
    elem = 4 if args.dtype == "float32" else 2
    for n, v in sizes:
        for impl in IMPLS:
            for mode in ("fwd", "fwdbwd"):
                need = n * v * elem * (1 + FOOTPRINT[mode].get(impl, 2.5 if mode == "fwdbwd" else 1.5)) / 2**30
                if need > args.max_gib:
                    print(f"skip {impl} {mode} N={n} V={v}: ~{need:.0f} GiB", flush=True)
                    continue
                reps = args.reps if n * v <= 2048 * 151936 else max(2, args.reps - 1)
                r = spawn(impl, mode, n, v, args.dtype, reps)
                rows.append(r)
                print(json.dumps({k: r.get(k) for k in ("impl", "mode", "N", "V", "seconds", "peak_extra_over_logits", "error")}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"machine": env, "results": rows}, indent=1))
    md = markdown(env, rows)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, mode, n, v, dtype, reps = sys.argv[2:8]
        print(json.dumps(run_case(impl, mode, int(n), int(v), dtype, int(reps))))
    else:
        main()
