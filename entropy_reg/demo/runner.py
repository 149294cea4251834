"""Command line of the demo: ``python -m entropy_reg.demo`` / ``entropy-reg demo`` / ``make demo``.

Warm-starts (or loads) the policy once per seed, trains every arm from it with
the same seeds, data order and step budget, and after each finished run writes
``results.json``, ``table.md`` and ``entropy_demo.png`` to the output folder,
so an interrupted run keeps the arms that finished.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .arms import DEMO_AER, ArmSpec, CoefficientSource
from .grpo import GRPOConfig, train_arm
from .policy import PolicyConfig, TinyTransformer
from .report import COLLAPSE_FRACTION, format_table, plot, summarize, write_json
from .task import BUILTIN_TASKS, Batch, PoolTask, Task
from .warmstart import WarmStartConfig, warm_start

# The demo's default run: the study's tuning setting (benchmarks/aer_study.py: the modes task, where
# entropy collapse costs; small policy, 150 steps), three seeds so that no single seed's luck
# decides the table; pass@k for k = 1..64 on the test split at the end.
DEMO_TASK = "modes"
DEMO_STEPS = 150
DEMO_EVAL_EVERY = 15
DEMO_SEEDS = 3
MAX_K = 64
# Constants of the fixed-coefficient arms (from the study's grid on that setting): "low" keeps
# exploring, "high" blows entropy up.
LOW_COEF = 0.03
HIGH_COEF = 0.3
DEMO = {"steps": DEMO_STEPS, "eval_every": DEMO_EVAL_EVERY, "final_eval_samples": MAX_K,
        "pass_k": tuple(range(1, MAX_K + 1))}
QUICK = {"steps": 40, "eval_every": 10, "eval_prompts_per_bucket": 16, "final_eval_samples": 8,
         "pass_k": tuple(range(1, 9))}
# Held-out prompts come from their own fixed seed, identical for every seed and arm. (The
# 1-digit bucket has only 100 distinct problems, so those also occur in training.)
EVAL_SEED = 1_000_003


def held_out(task: Task, per_bucket: int) -> Batch:
    """A pool task's test split, else ``per_bucket`` prompts per bucket from :data:`EVAL_SEED`."""
    if isinstance(task, PoolTask):
        return task.split("test")
    return task.make(torch.tensor(task.buckets).repeat_interleave(per_bucket), torch.Generator().manual_seed(EVAL_SEED))


def arm_specs(ablate: bool) -> list[ArmSpec]:
    specs = [
        ArmSpec("no entropy", "none"),
        ArmSpec("Clip-Higher", "none", pg="clip-higher"),
        ArmSpec(f"fixed {LOW_COEF:g}", "fixed", LOW_COEF),
        ArmSpec(f"fixed {HIGH_COEF:g}", "fixed", HIGH_COEF),
        ArmSpec("AER", "aer"),
    ]
    if ablate:
        specs += [
            ArmSpec("AER - difficulty", "aer", allocation=False),
            ArmSpec("AER - anchor", "aer", anchored=False),
            ArmSpec(f"AER - controller (alpha={LOW_COEF:g})", "aer", LOW_COEF, adaptive=False),
        ]
    return specs


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else a usage error naming the expectation."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_nonnegative_int = _int_at_least(0, "non-negative")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "GRPO on a synthetic task with a tiny transformer, on the CPU: "
        "no entropy term vs fixed coefficients vs AER. Writes a table, a figure and a JSON."
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute; used by the tests)")
    parser.add_argument("--task", choices=sorted(BUILTIN_TASKS), default=DEMO_TASK,
                        help=f"the task (default {DEMO_TASK}: a finite pool and a rare answer mode, "
                             "where collapse costs)")
    parser.add_argument("--steps", type=_positive_int, help=f"GRPO steps per arm (default {DEMO_STEPS})")
    parser.add_argument("--seeds", type=_positive_int,
                        help=f"number of seeds (default {DEMO_SEEDS}; 1 with --quick)")
    parser.add_argument("--seed", type=_nonnegative_int, default=0, help="first seed (default 0)")
    parser.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--ablate", action="store_true", help="also run AER with each component removed")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads (default 1: this model is too small to gain from more)")
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run; returns the exit status."""
    return run(build_parser(prog).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments (see :func:`add_arguments`); returns the exit status."""
    device: torch.device = args.device
    try:
        from tqdm.auto import tqdm
        import matplotlib  # noqa: F401  (fail now, not after the first arm)
    except ImportError as exc:
        print(f"the demo needs matplotlib and tqdm: pip install 'entropy-reg[demo]' ({exc})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = GRPOConfig(**(QUICK if args.quick else DEMO))
    if args.steps is not None:
        config = replace(config, steps=args.steps, eval_every=min(config.eval_every, args.steps))
    task = BUILTIN_TASKS[args.task]()
    policy_config = PolicyConfig(task.vocab_size, task.prompt_len + task.answer_len)
    warm_config = WarmStartConfig()
    n_seeds = args.seeds or (1 if args.quick else DEMO_SEEDS)
    seeds = list(range(args.seed, args.seed + n_seeds))
    specs = arm_specs(args.ablate)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    eval_prompts = held_out(task, config.eval_prompts_per_bucket).to(device)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "seeds": seeds, "device": str(device), "torch": torch.__version__, "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "grpo": asdict(config), "warm_start": asdict(warm_config), "policy": asdict(policy_config),
        "aer": DEMO_AER.resolved().to_dict(), "arms": {s.name: asdict(s) for s in specs},
        "collapse_fraction": COLLAPSE_FRACTION, "runs": {}, "summary": {},
    }
    aer_name = next((s.name for s in specs if s.kind == "aer"), None)
    title = (f"GRPO on the {task.name} task (buckets {task.buckets[0]}-{task.buckets[-1]}), tiny transformer, "
             f"{config.steps} steps, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    try:
        states = {}
        for seed in seeds:
            t0 = time.perf_counter()
            states[seed], cached = warm_start(task, policy_config, warm_config, seed, out / "cache")
            print(f"warm start, seed {seed}: {'loaded from cache' if cached else f'{time.perf_counter() - t0:.1f} s'}",
                  flush=True)
        for spec in specs:
            runs = payload["runs"].setdefault(spec.name, [])
            for seed in seeds:
                with tqdm(total=config.steps, desc=f"{spec.name} (seed {seed})", unit="step") as bar:
                    history, final, wall = train_arm(
                        CoefficientSource(spec), states[seed], lambda: TinyTransformer(policy_config), task, config,
                        eval_prompts, seed, device, on_step=_progress(bar),
                    )
                runs.append({"seed": seed, "history": asdict(history), "final": final, "wall_s": wall})
                payload["summary"][spec.name] = summarize(runs)
                payload["total_wall_s"] = time.perf_counter() - started
                _write_outputs(out, payload, task, len(seeds), aer_name, title)
    except KeyboardInterrupt:
        print(f"\ninterrupted: outputs of the finished runs are in {out}/", file=sys.stderr)
        return 130
    table = format_table(payload["summary"], task.buckets, len(seeds))
    print()
    print(table)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; "
          f"figure {out / 'entropy_demo.png'}, numbers {out / 'results.json'}")
    return 0


def _progress(bar: Any) -> Callable[[dict[str, float]], None]:
    """A per-step callback that advances ``bar`` and shows entropy, alpha and the batch reward."""

    def on_step(m: dict[str, float]) -> None:
        bar.set_postfix(H=f"{m['H']:.3f}", alpha=f"{m['coef']:.4f}", reward=f"{m['reward']:.2f}", refresh=False)
        bar.update(1)

    return on_step


def _write_outputs(out: Path, payload: dict[str, Any], task: Task, n_seeds: int,
                   aer_name: str | None, title: str) -> None:
    write_json(out / "results.json", payload)
    (out / "table.md").write_text(format_table(payload["summary"], task.buckets, n_seeds) + "\n")
    aer = aer_name if aer_name in payload["runs"] else None
    plot(out / "entropy_demo.png", payload["runs"], payload["summary"], aer, task.buckets, title,
         getattr(task, "bucket_names", None))
