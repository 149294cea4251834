"""Sensitivity study: fixed entropy coefficients vs AER, across tasks and policy sizes.

    python benchmarks/aer_study.py --tune               # the study as published in benchmarks/results
    python benchmarks/aer_study.py --quick --out DIR    # a seconds-long smoke run (the tests use it)
    python benchmarks/aer_study.py --setting mypkg.tasks:make_task small --setting addition large
    python benchmarks/aer_study.py --task addition --task digitsum --size small --size large  # cross product
    python benchmarks/aer_study.py --task addition --width 96 --layers 3                     # a custom size

A grid of settings (task x policy size) x arms x seeds; by default :data:`SETTINGS`.
Every run is the demo's
GRPO loop (:mod:`entropy_reg.demo`) from a supervised warm start cached per
(task, size, seed); every finished run is cached as JSON under a key of its
full configuration, so a second invocation runs only what is missing, and an
interrupted one loses only the runs in flight. Runs go to ``--jobs`` worker
processes with one torch thread each.

Arms (each setting): no entropy term; fixed coefficients on a log grid
(:data:`FIXED_GRID`, from no effect to blow-up); "AER", the library's
defaults as they are (``AERConfig()``, alpha in the LLM range [1e-4, 1e-2]);
"AER (toy range)", the same with alpha in [1e-3, 1], this policy's range
(:data:`entropy_reg.demo.arms.TOY_RANGE`); and the sign rule on the raw
entropy with an absolute 0.2-nat target and uniform weights (Skywork-OR1 / TRL
style). The first setting is the tuning one: only there, "AER (toy range)"
minus each component (uniform allocation, an absolute 0.2-nat target, a frozen
coefficient) and, with ``--tune``, the controller candidates of
:data:`TUNING_ARMS` (whose winner became the library's default controller);
the other settings are confirmation, never tuned on.

Metrics per run (held-out prompts fixed per task): final pass@1; pass@k for
k = 1..64 from 64 samples per prompt (unbiased estimator); AUC = the mean
held-out pass@1 over training (trapezoid over the evaluation steps, divided by
the steps); late and minimum entropy (moving average over 5% of the run) as a
fraction of H0; alpha's mean, its mean absolute step-to-step change, that
change over alpha's mean ("jitter", dimensionless: the chatter a user sees in
alpha's plot) and its coefficient of variation over the second half of the
run (slow swings). Each
is reported as the mean over seeds with a 95% Student-t interval, and for
pass@1, pass@64 and AUC also as the per-seed difference to the no-entropy arm
(same warm start and data: the spread between warm starts cancels).

Outputs in ``--out``: ``aer_study.json`` (every run and the summaries),
``aer_study.md`` (tables and the goal check) and ``aer_study.png`` (each
metric against the fixed coefficient, one row per setting, each AER arm as a band).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package next to this script, installed or not

from entropy_reg.demo.arms import TOY_RANGE, ArmSpec, CoefficientSource  # noqa: E402
from entropy_reg.demo.grpo import GRPOConfig, train_arm  # noqa: E402
from entropy_reg.demo.policy import SIZES, PolicyConfig, TinyTransformer  # noqa: E402
from entropy_reg.demo.report import COLLAPSE_FRACTION, moving_average, smoothing_window  # noqa: E402
from entropy_reg.demo.task import BUILTIN_TASKS, Task  # noqa: E402
from entropy_reg.demo.warmstart import WarmStartConfig, warm_start  # noqa: E402
from entropy_reg.regularizer import AERConfig  # noqa: E402

MAX_K = 64
FIXED_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
# The sign rule's step (alpha units per step): reaches the grid's 0.1 in 20 steps.
SIGN_LR = 5e-3
SIGN_ARM = "sign rule (0.2-nat target)"
# The demo's GRPO (16 prompts x 8 samples; half that batch barely learns) for 150 steps:
# sized so the whole grid fits in about an hour on 2 cores.
GRPO = GRPOConfig(steps=150, eval_every=15, eval_prompts_per_bucket=16, eval_samples=4,
                  final_eval_samples=MAX_K, pass_k=tuple(range(1, MAX_K + 1)))
WARM = WarmStartConfig()
SEEDS = 10
QUICK_GRPO = replace(GRPO, steps=3, prompts_per_step=4, group_size=4, eval_every=1, eval_prompts_per_bucket=2,
                     eval_samples=2, final_eval_samples=8, pass_k=tuple(range(1, 9)))
QUICK_WARM = WarmStartConfig(steps=3, batch_size=16)
# (task, named size): the first is the tuning setting (the one where entropy collapses within the
# run, so the controller has something to do); the others are confirmation: the same task at the
# other size, and the other task at both sizes.
SETTINGS = (("digitsum", "small"), ("digitsum", "large"), ("addition", "small"), ("addition", "large"))
QUICK_SETTINGS = (("addition", "small"), ("digitsum", "small"))
# Held-out prompts: one fixed set per task, the same for every seed and arm.
EVAL_SEED = 1_000_003
# Every controller candidate below pins each controller setting, so that it runs the same
# controller whatever the library's defaults are (the cache key holds the resolved settings).
# Alpha's range is TOY_RANGE throughout, the one scale-dependent setting (see entropy_reg.demo.arms).
_RAW = {"coef_rule": "log", "coef_damping": 1.0, "coef_smoothing": 0.0, **TOY_RANGE}
# Controller candidates (AERConfig overrides), run with --tune on the tuning setting only. The
# first two are the controllers before this study, kept to measure alpha's chatter before and after.
# Selection: the highest mean AUC (the rule fixed before the first eight ran picked "lr 0.1,
# smoothing 0.9", 0.680); that one cycles on a plant answering 10 steps late
# (tests/test_study_controller.py), so "lr 0.05, smoothing 0.9" was added and the rule became the
# highest AUC among the candidates that hold that plant. It won (0.682 +/- 0.025; it would also
# have won on AUC alone) and is AERConfig()'s controller: the "AER (toy range)" arm runs it.
TUNING_ARMS: dict[str, dict[str, Any]] = {
    "before: integral, lr 0.02, max 0.3": {"coef_rule": "proportional", "coef_lr": 0.02, "coef_init": 0.0,
                                           "coef_min": 0.0, "coef_max": 0.3, "coef_damping": 0.0,
                                           "coef_smoothing": 0.0},
    "before: log PI, lr 0.1, target 0.75": {**_RAW, "coef_lr": 0.1, "target_ratio": 0.75},
    "log PI, lr 0.1, smoothing 0.9": {**_RAW, "coef_lr": 0.1, "coef_smoothing": 0.9},
    "log PI, lr 0.05, smoothing 0.9": {**_RAW, "coef_lr": 0.05, "coef_smoothing": 0.9},
    "log PI, lr 0.3": {**_RAW, "coef_lr": 0.3},
    "log PI, lr 0.3, smoothing 0.9": {**_RAW, "coef_lr": 0.3, "coef_smoothing": 0.9},
    "log PI, lr 0.3, target 0.25": {**_RAW, "coef_lr": 0.3, "target_ratio": 0.25},
    "log PI, lr 0.3, smoothing 0.9, target 0.25": {**_RAW, "coef_lr": 0.3, "coef_smoothing": 0.9,
                                                   "target_ratio": 0.25},
    "log I, lr 0.3, smoothing 0.9, target 0.25": {**_RAW, "coef_lr": 0.3, "coef_damping": 0.0,
                                                  "coef_smoothing": 0.9, "target_ratio": 0.25},
}
AER_TOY = "AER (toy range)"


def core_arms(ablations: bool) -> list[ArmSpec]:
    """The arms of a setting (see the module docstring); the ablations only where ``ablations``."""
    arms = [
        ArmSpec("no entropy", "none"),
        *(ArmSpec(f"fixed {c:g}", "fixed", c) for c in FIXED_GRID),
        ArmSpec("AER", "aer"),
        ArmSpec(AER_TOY, "aer", aer=TOY_RANGE),
        ArmSpec(SIGN_ARM, "aer", allocation=False, anchored=False,
                aer={"coef_rule": "sign", "coef_lr": SIGN_LR, "coef_init": 0.0, "coef_min": 0.0, "coef_max": 1.0,
                     "coef_damping": 0.0, "coef_smoothing": 0.0}),
    ]
    if ablations:
        arms += [
            ArmSpec(f"{AER_TOY} - difficulty", "aer", allocation=False, aer=TOY_RANGE),
            ArmSpec(f"{AER_TOY} - anchor", "aer", anchored=False, aer=TOY_RANGE),
            # frozen at the grid's value nearest the mean alpha AER chose on the tuning setting (0.013)
            ArmSpec(f"{AER_TOY} - controller", "aer", coef=FIXED_GRID[0], adaptive=False, aer=TOY_RANGE),
        ]
    return arms


def load_task(spec: str) -> Task:
    """A built-in task by name, or ``module:factory`` (a callable returning a task, or a class)."""
    if ":" not in spec:
        if spec not in BUILTIN_TASKS:
            raise ValueError(f"--task: unknown task {spec!r}; built-in: {sorted(BUILTIN_TASKS)}, or module:factory")
        return BUILTIN_TASKS[spec]()
    module, _, attr = spec.partition(":")
    task = getattr(importlib.import_module(module), attr)()
    missing = [m for m in ("name", "vocab_size", "eos", "prompt_len", "answer_len", "buckets",
                           "warm_difficulty_probs", "key", "sample", "make", "answers", "response_mask", "reward")
               if not hasattr(task, m)]
    if missing:
        raise TypeError(f"--task {spec}: the task lacks {missing} (see entropy_reg.demo.task.Task)")
    return task


@dataclass(frozen=True)
class Job:
    """One run: everything that determines its result (the cache key hashes all of it)."""

    task: str
    size: tuple[int, int]
    arm: ArmSpec
    seed: int
    grpo: GRPOConfig
    warm: WarmStartConfig

    @property
    def setting(self) -> str:
        return f"{self.task} / {size_name(self.size)}"

    def key(self) -> str:
        """What the run computes, not what it is called: an arm whose AER settings equal another
        arm's (e.g. a tuning candidate that became the default) shares its cached result."""
        task = load_task(self.task)
        payload = {"task": self.task, "task_key": task.key(), "size": list(self.size), "kind": self.arm.kind,
                   "coef": self.arm.coef if self.arm.kind == "fixed" else None,
                   "aer": self.arm.aer_config(AERConfig()).resolved().to_dict() if self.arm.kind == "aer" else None,
                   "seed": self.seed, "grpo": asdict(self.grpo), "warm": asdict(self.warm),
                   "eval_seed": EVAL_SEED, "torch": torch.__version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def size_name(size: tuple[int, int]) -> str:
    named = {v: k for k, v in SIZES.items()}
    return named.get(size, f"d{size[0]}-l{size[1]}")


def _policy_config(task: Task, size: tuple[int, int]) -> PolicyConfig:
    return PolicyConfig(task.vocab_size, task.prompt_len + task.answer_len, d_model=size[0], n_layers=size[1])


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def warm_job(task_spec: str, size: tuple[int, int], seed: int, warm: WarmStartConfig, cache: Path) -> float:
    """Warm-start one (task, size, seed) into the cache; returns the seconds it took (0 if cached)."""
    t0 = time.perf_counter()
    task = load_task(task_spec)
    _, cached = warm_start(task, _policy_config(task, size), warm, seed, cache)
    return 0.0 if cached else time.perf_counter() - t0


def run_job(job: Job, cache: Path) -> tuple[dict[str, Any], bool]:
    """Train one run, or load it from the cache; returns its record (see :func:`run_metrics`)
    and whether it came from the cache."""
    path = cache / f"run-{job.key()}.json"
    if path.exists():
        record = json.loads(path.read_text())
        record.update(setting=job.setting, arm=job.arm.name)
        return record, True
    task = load_task(job.task)
    policy_config = _policy_config(task, job.size)
    state, _ = warm_start(task, policy_config, job.warm, job.seed, cache)
    eval_prompts = task.make(torch.tensor(task.buckets).repeat_interleave(job.grpo.eval_prompts_per_bucket),
                             torch.Generator().manual_seed(EVAL_SEED))
    history, final, wall = train_arm(CoefficientSource(job.arm, AERConfig()), state,
                                     lambda: TinyTransformer(policy_config), task, job.grpo, eval_prompts,
                                     job.seed, torch.device("cpu"))
    # The raw numbers, not the metrics: a metric added later needs no rerun.
    record = {"setting": job.setting, "task": job.task, "size": list(job.size), "arm": job.arm.name,
              "seed": job.seed, "wall_s": wall, "final": final,
              "history": {k: asdict(history)[k] for k in ("step", "entropy", "coef", "eval_step", "eval_pass1")}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, allow_nan=False))
    tmp.replace(path)  # atomic: a killed run leaves no half-written record
    return record, False


def run_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The study's per-run numbers from a run's record (its history and final evaluation)."""
    history, final = record["history"], record["final"]
    kmax = max(int(m.split("@")[1]) for m in final)
    h = history["entropy"]
    smooth = moving_average(h, smoothing_window(len(h)))
    h0 = h[0]
    collapse = next((s for s, v in zip(history["step"], smooth) if v < COLLAPSE_FRACTION * h0), None)
    coef = history["coef"]
    alpha_mean = mean(coef)
    alpha_step = mean(abs(b - a) for a, b in zip(coef, coef[1:])) if len(coef) > 1 else 0.0
    steps, p1 = history["eval_step"], history["eval_pass1"]
    auc = sum((steps[i + 1] - steps[i]) * (p1[i] + p1[i + 1]) / 2 for i in range(len(steps) - 1)) / steps[-1]
    return {
        "pass@1": final["pass@1"]["all"],
        "pass@k": [final[f"pass@{k}"]["all"] for k in range(1, kmax + 1)],
        "pass@kmax": final[f"pass@{kmax}"]["all"],
        "auc": auc,
        "H0": h0,
        "H_late/H0": smooth[-1] / h0,
        "H_min/H0": min(smooth) / h0,
        "collapsed": collapse is not None,
        "alpha_mean": alpha_mean,
        "alpha_step": alpha_step,
        # the step over the mean: dimensionless, so arms whose alpha differs tenfold compare
        "alpha_jitter": alpha_step / alpha_mean if alpha_mean > 0.0 else 0.0,
        "alpha_cv_late": _cv(coef[len(coef) // 2:]),
    }


def _cv(xs: list[float]) -> float:
    """Coefficient of variation (population std / mean) of ``xs``; 0 when the mean is 0."""
    m = math.fsum(xs) / len(xs)
    return 0.0 if m == 0.0 else math.sqrt(math.fsum((x - m) ** 2 for x in xs) / len(xs)) / m


# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables); 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    m = math.fsum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return m, t * stdev(values) / math.sqrt(len(values))


PAIRED = ("pass@1", "pass@kmax", "auc")
SCALARS = ("pass@1", "pass@kmax", "auc", "H_late/H0", "H_min/H0", "alpha_mean", "alpha_step", "alpha_jitter",
           "alpha_cv_late")


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{setting: {arm: {metric: [mean, half-width], "collapsed": n, "seeds": n, "pass@k": [means],
    "vs_none": {metric: [mean, half-width]}}}}``; ``pass@kmax`` is pass@k at the largest k (64 in
    the full study); ``vs_none`` is the per-seed difference to the no-entropy arm."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out.setdefault(r["setting"], {}).setdefault(r["arm"], []).append(r)
    summary: dict[str, dict[str, Any]] = {}
    for setting, arms in out.items():
        summary[setting] = {}
        for arm, runs in arms.items():
            ms = [run_metrics(r) for r in runs]
            row: dict[str, Any] = {m: list(mean_ci([x[m] for x in ms])) for m in SCALARS}
            row["pass@k"] = [mean(v) for v in zip(*(x["pass@k"] for x in ms))]
            row["collapsed"] = sum(x["collapsed"] for x in ms)
            row["seeds"] = len(ms)
            summary[setting][arm] = row
        # Paired by seed (same warm start, data and sampling streams): the seed-to-seed spread of
        # the warm starts cancels, which the unpaired intervals above carry in full.
        if "no entropy" in arms:
            base = {r["seed"]: run_metrics(r) for r in arms["no entropy"]}
            for arm, runs in arms.items():
                pairs = [(run_metrics(r), base[r["seed"]]) for r in runs if r["seed"] in base]
                if pairs:
                    summary[setting][arm]["vs_none"] = {
                        m: list(mean_ci([x[m] - b[m] for x, b in pairs])) for m in PAIRED}
    return summary


GOAL_METRICS = ("pass@1", "pass@kmax", "auc")


def best_fixed(rows: dict[str, Any], metric: str) -> tuple[str, float] | None:
    """The fixed arm with the highest mean ``metric`` and the lower end of its 95% interval."""
    fixed = [a for a in rows if a.startswith("fixed ")]
    if not fixed:
        return None
    best = max(fixed, key=lambda f: rows[f][metric][0])
    return best, rows[best][metric][0] - rows[best][metric][1]


def goal_check(rows: dict[str, Any], kmax: int, aer: str = "AER") -> list[str]:
    """Lines saying where ``aer`` stands against the best fixed coefficient (unpaired intervals)
    and against no entropy term (the per-seed difference, when the rows have it)."""
    if aer not in rows or best_fixed(rows, "auc") is None:
        return []
    a = rows[aer]
    lines = []
    names = {"pass@1": "pass@1", "pass@kmax": f"pass@{kmax}", "auc": "AUC"}
    for m in GOAL_METRICS:
        best, lo = best_fixed(rows, m)  # type: ignore[misc]
        ok = a[m][0] >= lo
        verdict = "within or above its interval" if ok else f"BELOW its interval by {lo - a[m][0]:.3f}"
        lines.append(f"- {names[m]}: {aer} {a[m][0]:.3f} vs best fixed ({best}) {rows[best][m][0]:.3f} "
                     f"± {rows[best][m][1]:.3f}: {verdict}")
    if "no entropy" in rows:
        n = rows["no entropy"]
        for m in ("pass@kmax", "auc"):
            d = a[m][0] - n[m][0]
            paired = ""
            if "vs_none" in a:
                paired = f"; per-seed difference {a['vs_none'][m][0]:+.3f} ± {a['vs_none'][m][1]:.3f}"
            lines.append(f"- {names[m]}: {aer} {'above' if d > 0 else 'NOT above'} no entropy by {d:+.3f} "
                         f"({aer} {a[m][0]:.3f} ± {a[m][1]:.3f}, no entropy {n[m][0]:.3f} ± {n[m][1]:.3f}{paired})")
    return lines


def goal_table(summary: dict[str, dict[str, Any]], kmax: int, aer: str) -> list[str]:
    """One markdown row per setting: ``aer`` against the best fixed coefficient of each metric
    ("by x": below that arm's 95% interval by x) and the per-seed difference to no entropy."""
    names = {"pass@1": "pass@1", "pass@kmax": f"pass@{kmax}", "auc": "AUC"}
    lines = [f"| setting | {' | '.join(f'{names[m]} vs best fixed' for m in GOAL_METRICS)} "
             f"| pass@{kmax} - no entropy | AUC - no entropy |", "|---" * 6 + "|"]
    for setting, rows in summary.items():
        if aer not in rows or best_fixed(rows, "auc") is None:
            continue
        a, cells = rows[aer], []
        for m in GOAL_METRICS:
            best, lo = best_fixed(rows, m)  # type: ignore[misc]
            verdict = "within" if a[m][0] >= lo else f"below by {lo - a[m][0]:.3f}"
            cells.append(f"{a[m][0]:.3f} vs {rows[best][m][0]:.3f} ({best}): {verdict}")
        for m in ("pass@kmax", "auc"):
            cells.append(f"{a['vs_none'][m][0]:+.3f} ± {a['vs_none'][m][1]:.3f}" if "vs_none" in a else "-")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


# alpha itself is often a few 1e-3 (the controller near its floor): more digits than the rates.
_DIGITS = {"alpha_mean": 4, "alpha_step": 4}


def format_markdown(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    kmax = meta["grpo"]["pass_k"][-1]
    cols = [("pass@1", "pass@1"), ("pass@kmax", f"pass@{kmax}"), ("auc", "AUC"), ("H_late/H0", "H late/H0"),
            ("H_min/H0", "H min/H0"), ("alpha_mean", "alpha mean"), ("alpha_step", "alpha step"),
            ("alpha_jitter", "alpha jitter"), ("alpha_cv_late", "alpha CV late")]
    lines = ["# AER sensitivity study", "", f"`{meta['command']}`", "",
             f"{meta['steps']} GRPO steps per run, {meta['seeds']} seeds, mean ± 95% t-interval over seeds. "
             f"Machine: {meta['machine']}. The runs took {meta['run_wall_s_total']:.0f} s of wall time "
             f"in all (summed over runs, one torch thread each, as they ran when first computed).",
             "Tuning setting (defaults chosen here): " + meta["tuning_setting"] + "; the others are confirmation.", ""]
    for aer in (AER_TOY, "AER"):
        table = goal_table(summary, kmax, aer)
        if len(table) > 2:
            lines += [f"## Goal check: {aer}", "", *table, ""]
    for setting, rows in summary.items():
        lines += [f"## {setting}", "", "| arm | " + " | ".join(c[1] for c in cols)
                  + " | AUC - no entropy, paired | collapsed |", "|---" * (len(cols) + 3) + "|"]
        for arm, r in rows.items():
            cells = [f"{r[m][0]:.{_DIGITS.get(m, 3)}f} ± {r[m][1]:.{_DIGITS.get(m, 3)}f}" for m, _ in cols]
            paired = f"{r['vs_none']['auc'][0]:+.3f} ± {r['vs_none']['auc'][1]:.3f}" if "vs_none" in r else "-"
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {paired} | {r['collapsed']}/{r['seeds']} |")
        lines.append("")
        for aer in (a for a in rows if a.startswith("AER") and " - " not in a):
            lines += goal_check(rows, kmax, aer)
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, summary: dict[str, dict[str, Any]], kmax: int) -> None:
    """Each metric against the fixed coefficient (log x), one row per setting; each AER arm is a
    band (mean ± 95% interval), no entropy a dashed line."""
    from matplotlib.figure import Figure

    metrics = [("pass@1", "final pass@1"), ("pass@kmax", f"pass@{kmax}"), ("auc", "AUC (mean pass@1 in training)"),
               ("H_late/H0", "late entropy / H0")]
    settings = list(summary)
    fig = Figure(figsize=(4.2 * len(metrics), 3.2 * len(settings) + 0.6), layout="constrained")
    axes = fig.subplots(len(settings), len(metrics), squeeze=False)
    for i, setting in enumerate(settings):
        rows = summary[setting]
        fixed = sorted((float(a.split()[1]), r) for a, r in rows.items() if a.startswith("fixed "))
        for j, (m, label) in enumerate(metrics):
            ax = axes[i][j]
            if fixed:
                xs = [c for c, _ in fixed]
                ax.errorbar(xs, [r[m][0] for _, r in fixed], yerr=[r[m][1] for _, r in fixed], marker="o",
                            color="tab:blue", capsize=3, label="fixed coefficient")
                ax.set_xscale("log")
            for aer, color in (("AER", "tab:red"), (AER_TOY, "tab:green")):
                if aer in rows:
                    mu, hw = rows[aer][m]
                    ax.axhspan(mu - hw, mu + hw, color=color, alpha=0.2, label=f"{aer} (95% interval)")
                    ax.axhline(mu, color=color, lw=1.5)
            if "no entropy" in rows:
                ax.axhline(rows["no entropy"][m][0], color="black", ls="--", lw=1.2, label="no entropy")
            if SIGN_ARM in rows:
                ax.axhline(rows[SIGN_ARM][m][0], color="tab:purple", ls=":", lw=1.5, label=SIGN_ARM)
            if m == "H_late/H0":
                ax.set_yscale("log")
            ax.set(title=f"{setting}: {label}", xlabel="fixed entropy coefficient")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def build_jobs(settings: list[tuple[str, tuple[int, int]]], seeds: list[int], grpo: GRPOConfig,
               warm: WarmStartConfig, tune: bool, only: list[str] | None = None) -> list[Job]:
    """Every (setting, arm, seed). The first setting is the tuning one: it alone runs the
    ablations and, with ``tune``, the candidates. ``only`` keeps the arms of those names."""
    jobs = []
    for i, (task, size) in enumerate(settings):
        arms = core_arms(ablations=i == 0)
        if tune and i == 0:
            arms += [ArmSpec(f"tune: {name}", "aer", aer=cfg) for name, cfg in TUNING_ARMS.items()]
        if only is not None:
            arms = [a for a in arms if a.name in only]
        jobs += [Job(task, size, arm, seed, grpo, warm) for arm in arms for seed in seeds]
    if only is not None:
        unknown = set(only) - {j.arm.name for j in jobs}
        if unknown:
            raise ValueError(f"--arm: unknown arms {sorted(unknown)}")
    # Seed-major: an interrupted study has every arm on its first seeds, not some arms on all.
    return sorted(jobs, key=lambda j: j.seed)


def execute(jobs: list[Job], cache: Path, n_jobs: int, threads: int,
            on_done: Callable[[tuple[dict[str, Any], bool]], None]) -> None:
    """Warm starts first, then the runs, ``n_jobs`` at a time; ``on_done`` gets each
    :func:`run_job` result in order of completion."""
    warm_keys = sorted({(j.task, j.size, j.seed, j.warm) for j in jobs}, key=repr)
    if n_jobs == 1:
        _init_worker(threads)
        for t, s, seed, w in warm_keys:
            warm_job(t, s, seed, w, cache)
        for job in jobs:
            on_done(run_job(job, cache))
        return
    with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        _drain([pool.submit(warm_job, t, s, seed, w, cache) for t, s, seed, w in warm_keys], lambda _: None)
        _drain([pool.submit(run_job, job, cache) for job in jobs], on_done)


def _drain(futures: Iterable[Future], on_done: Callable[[Any], None]) -> None:
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            on_done(f.result())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _size(text: str) -> tuple[int, int]:
    if text in SIZES:
        return SIZES[text]
    raise argparse.ArgumentTypeError(f"unknown size {text!r}; named sizes: {sorted(SIZES)} (or --width/--layers)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aer_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", nargs=2, metavar=("TASK", "SIZE"),
                   help="one task x size setting (repeat; the first is the tuning setting); default: "
                        + ", ".join(f"{t} {s}" for t, s in SETTINGS))
    p.add_argument("--task", action="append",
                   help="built-in task name or module:factory (repeat; with --size: their cross product)")
    p.add_argument("--size", action="append", type=_size, help=f"named policy size {sorted(SIZES)} (repeat)")
    p.add_argument("--width", type=_positive, help="with --layers: one custom policy size instead of --size")
    p.add_argument("--layers", type=_positive, help="with --width")
    p.add_argument("--seeds", type=_positive, help=f"seeds 0..N-1 (default {SEEDS}; --quick 2)")
    p.add_argument("--steps", type=_positive, help=f"GRPO steps per run (default {GRPO.steps})")
    p.add_argument("--lr", type=float, help=f"GRPO learning rate (default {GRPO.lr:g})")
    p.add_argument("--jobs", type=_positive, default=os.cpu_count() or 1,
                   help="worker processes (default: the core count)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--arm", action="append", help="run only the arms of these names (repeat; default: all)")
    p.add_argument("--tune", action="store_true", help="also run the controller candidates on the first setting")
    p.add_argument("--quick", action="store_true", help="a few steps on tiny batches: checks the machinery, not AER")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "aer_study",
                   help="run and warm-start cache (default .cache/aer_study)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.width is None) != (args.layers is None):
        build_parser().error("--width and --layers go together")
    if args.setting:
        try:
            settings = [(t, _size(s)) for t, s in args.setting]
        except argparse.ArgumentTypeError as exc:
            build_parser().error(f"--setting: {exc}")
    elif args.task or args.size or args.width:
        sizes = [(args.width, args.layers)] if args.width else (args.size or [SIZES["small"]])
        settings = [(t, s) for t in (args.task or ["addition"]) for s in sizes]
    else:
        settings = [(t, SIZES[s]) for t, s in (QUICK_SETTINGS if args.quick else SETTINGS)]
    for t, _ in settings:
        try:
            load_task(t)  # a bad task fails before any run starts
        except (ValueError, TypeError, ImportError, AttributeError) as exc:
            build_parser().error(f"--task: {exc}")
    grpo, warm = (QUICK_GRPO, QUICK_WARM) if args.quick else (GRPO, WARM)
    if args.steps:
        grpo = replace(grpo, steps=args.steps, eval_every=min(grpo.eval_every, args.steps))
    if args.lr is not None:
        if not (math.isfinite(args.lr) and args.lr > 0):
            build_parser().error(f"--lr must be a positive number, got {args.lr}")
        grpo = replace(grpo, lr=args.lr)
    seeds = list(range(args.seeds or (2 if args.quick else SEEDS)))
    out: Path = args.out
    cache: Path = args.cache
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    only = args.arm
    try:
        jobs = build_jobs(settings, seeds, grpo, warm, args.tune, only)
    except ValueError as exc:
        build_parser().error(str(exc))
    order = {(j.setting, j.arm.name, j.seed): i for i, j in enumerate(jobs)}
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    meta = {"command": shlex.join(["python", "benchmarks/aer_study.py", *(sys.argv[1:] if argv is None else argv)]),
            "steps": grpo.steps, "seeds": len(seeds), "jobs": args.jobs, "threads": args.threads,
            "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.platform()}",
            "torch": torch.__version__, "tuning_setting": jobs[0].setting, "grpo": asdict(grpo), "warm": asdict(warm),
            "fixed_grid": list(FIXED_GRID), "aer_defaults": AERConfig().resolved().to_dict(), "tuning_arms": TUNING_ARMS}

    def write() -> None:
        records.sort(key=lambda r: order[(r["setting"], r["arm"], r["seed"])])
        summary = summarize(records)
        meta["wall_s"] = time.perf_counter() - started
        meta["run_wall_s_total"] = math.fsum(r["wall_s"] for r in records)
        # Per-run numbers, not per-step histories (those stay in the cache).
        runs = [{"setting": r["setting"], "arm": r["arm"], "seed": r["seed"], "wall_s": r["wall_s"],
                 "pass@1_by_bucket": r["final"]["pass@1"], "metrics": run_metrics(r)} for r in records]
        payload = {"meta": meta, "summary": summary, "runs": runs}
        tmp = out / "aer_study.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
        tmp.replace(out / "aer_study.json")
        (out / "aer_study.md").write_text(format_markdown(summary, meta) + "\n")

    def on_done(result: tuple[dict[str, Any], bool]) -> None:
        record, cached = result
        records.append(record)
        print(f"[{len(records)}/{len(jobs)}] {record['setting']} | {record['arm']} | seed {record['seed']}: "
              f"pass@1 {record['final']['pass@1']['all']:.3f}, "
              + ("cached" if cached else f"wall {record['wall_s']:.0f} s"), flush=True)
        write()

    print(f"{len(jobs)} runs ({len(settings)} settings, {len(seeds)} seeds), --jobs {args.jobs}", flush=True)
    try:
        execute(jobs, cache, args.jobs, args.threads, on_done)
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are cached in {cache}", file=sys.stderr)
        return 130
    plot(out / "aer_study.png", summarize(records), grpo.pass_k[-1])
    print(format_markdown(summarize(records), meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
