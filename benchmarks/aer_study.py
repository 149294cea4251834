"""AER study: where entropy collapse costs, against the paper's baselines, with AER's knobs tuned by a rule.

    python benchmarks/aer_study.py --tune               # the study as published in benchmarks/results
    python benchmarks/aer_study.py --quick --out DIR    # a seconds-long smoke run (the tests use it)
    python benchmarks/aer_study.py --setting mypkg.tasks:make_task small --setting modes large
    python benchmarks/aer_study.py --task modes --task digitsum --size small --size large  # cross product
    python benchmarks/aer_study.py --task modes --width 96 --layers 3                      # a custom size

A grid of settings (task x policy size) x arms x seeds; by default :data:`SETTINGS`, all on
the ``modes`` task (:class:`entropy_reg.demo.task.OrderedSumTask`): a finite training pool
iterated in epochs, a disjoint test split, and a rare answer mode (descending order) that
the warm start sees 10% of the time, so that what a collapsed policy never samples is never
reinforced. Every run is the demo's GRPO loop (:mod:`entropy_reg.demo`) from a supervised
warm start cached per (task, size, seed); every finished run is cached as JSON under a key
of its full configuration, so a second invocation runs only what is missing, and an
interrupted one loses only the runs in flight. Runs go to ``--jobs`` worker processes
with one torch thread each.

Arms (each setting), all in the demo's GRPO: no entropy term (GRPO); Clip-Higher (DAPO's
decoupled clip, 0.2 / 0.28); Clip-Cov and KL-Cov (Cui et al. 2025, with verl's constants:
:mod:`entropy_reg.demo.losses`); fixed coefficients on a log grid (:data:`FIXED_GRID`);
the sign rule on the raw entropy with an absolute 0.2-nat target and uniform weights
(Skywork-OR1 / TRL style); and "AER", the library's controller with alpha in this
policy's range [1e-3, 1] (:data:`entropy_reg.demo.arms.TOY_RANGE`). With ``--tune``, the
first (tuning) setting also runs AER's candidates (:data:`TUNING_ARMS`: target ratio,
difficulty rule, alpha's range); :func:`select_candidate` applies the rule written in
docs/controllers.md before they ran, and the winner runs unchanged on every setting as
"AER (tuned)". The other settings are confirmation, never tuned on.

Metrics per run: test pass@1 and pass@k for k = 1..64 from 64 samples per prompt
(unbiased estimator); pool coverage (share of the training pool solved at least once
during training) and pool pass@64 at the end; AUC = the mean test pass@1 over training
(trapezoid over the evaluation steps, divided by the steps); late and minimum entropy
(moving average over 5% of the run) as a fraction of H0; alpha's mean, its mean absolute
step-to-step change, that change over alpha's mean ("jitter") and its coefficient of
variation over the second half of the run. Each is reported as the mean over seeds with
a 95% Student-t interval, and as the per-seed difference to the no-entropy arm (same warm
start and data: the spread between warm starts cancels). Per setting, the premise check
(:func:`premise_check`): does the no-entropy arm collapse, and does some fixed
coefficient beat it, paired? Then the goal check (:func:`goal_verdicts`).

Outputs in ``--out``: ``aer_study.json`` (every run and the summaries),
``aer_study.md`` (premise, goal, selection and paper-style tables) and ``aer_study.png``
(test pass@k curves and pass@64 / coverage / pass@1 per arm, one row per setting).
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
from entropy_reg.demo.runner import EVAL_SEED, held_out  # noqa: E402
from entropy_reg.demo.task import BUILTIN_TASKS, Task  # noqa: E402
from entropy_reg.demo.warmstart import WarmStartConfig, warm_start  # noqa: E402
from entropy_reg.regularizer import AERConfig  # noqa: E402

MAX_K = 64
FIXED_GRID = (0.01, 0.03, 0.1, 0.3)  # 1.0 drops out: it blows entropy up on every setting of the former study
# The sign rule's step (alpha units per step): reaches the grid's 0.1 in 20 steps.
SIGN_LR = 5e-3
SIGN_ARM = "sign rule (0.2-nat target)"
NONE = "no entropy"  # GRPO as it is: the baseline every paired difference is taken against
# The demo's GRPO (16 prompts x 8 samples) for 150 steps, about 14 epochs of the modes task's pool.
GRPO = GRPOConfig(steps=150, eval_every=15, eval_prompts_per_bucket=16, eval_samples=4,
                  final_eval_samples=MAX_K, pass_k=tuple(range(1, MAX_K + 1)))
WARM = WarmStartConfig()
SEEDS = 5
QUICK_GRPO = replace(GRPO, steps=3, prompts_per_step=4, group_size=4, eval_every=1, eval_prompts_per_bucket=2,
                     eval_samples=2, final_eval_samples=8, pass_k=tuple(range(1, 9)))
QUICK_WARM = WarmStartConfig(steps=3, batch_size=16)
# (task, named size): the first is the tuning setting; the others are confirmation, never tuned on.
# All three are the modes task (entropy_reg.demo.task.OrderedSumTask), built so that collapse costs:
# a finite pool, a test split, and a rare answer mode the warm start sees 10% of the time.
SETTINGS = (("modes", "small"), ("modes", "large"), ("modes-long", "small"))
QUICK_SETTINGS = (("modes", "small"), ("digitsum", "small"))
AER = "AER"
TUNED = "AER (tuned)"
# AER's candidates on the tuning setting (AERConfig overrides of the "AER" arm, the demo's
# configuration: the library's controller with alpha in TOY_RANGE). The selection rule, fixed
# before they ran, is in docs/controllers.md ("How the target and the difficulty rule were
# chosen") and in select_candidate(); the winner runs unchanged on the other settings as TUNED.
TUNING_ARMS: dict[str, dict[str, Any]] = {
    "target 0.2": {"target_ratio": 0.2},
    "target 0.3": {"target_ratio": 0.3},
    "target 0.4": {"target_ratio": 0.4},
    "target 0.6": {"target_ratio": 0.6},
    "threshold 0.5": {"difficulty_rule": "threshold", "difficulty_threshold": 0.5},
    "threshold 0.25": {"difficulty_rule": "threshold", "difficulty_threshold": 0.25},
    "uniform": {"difficulty_rule": "uniform"},
    "alpha in [0.01, 1]": {"coef_init": 0.01, "coef_min": 0.01},
}
TUNE_PREFIX = "tune: "
# Premise: the no-entropy arm's late entropy (5%-of-run moving average) below this share of H0.
PREMISE_COLLAPSE = 0.5


def core_arms() -> list[ArmSpec]:
    """The arms of every setting (see the module docstring)."""
    return [
        ArmSpec(NONE, "none"),
        ArmSpec("Clip-Higher", "none", pg="clip-higher"),
        ArmSpec("Clip-Cov", "none", pg="clip-cov"),
        ArmSpec("KL-Cov", "none", pg="kl-cov"),
        *(ArmSpec(f"fixed {c:g}", "fixed", c) for c in FIXED_GRID),
        ArmSpec(SIGN_ARM, "aer", allocation=False, anchored=False,
                aer={"coef_rule": "sign", "coef_lr": SIGN_LR, "coef_init": 0.0, "coef_min": 0.0, "coef_max": 1.0,
                     "coef_damping": 0.0, "coef_smoothing": 0.0}),
        ArmSpec(AER, "aer", aer=TOY_RANGE),
    ]


def tuning_arm(name: str) -> ArmSpec:
    return ArmSpec(TUNE_PREFIX + name, "aer", aer={**TOY_RANGE, **TUNING_ARMS[name]})


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
                   "pg": self.arm.pg,
                   "coef": self.arm.coef if self.arm.kind == "fixed" else None,
                   "aer": _aer_key(self.arm) if self.arm.kind == "aer" else None,
                   "seed": self.seed, "grpo": asdict(self.grpo), "warm": asdict(self.warm),
                   "eval_seed": EVAL_SEED, "torch": torch.__version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# AERConfig's fields when this study's cache was filled. A field added later (e.g. a trainer
# adapter's flag) leaves the keys, and so the cached runs, as they are; one that changes what
# the demo's GRPO computes must be added here.
KEY_FIELDS = ("coef_damping", "coef_init", "coef_lr", "coef_max", "coef_min", "coef_rule", "coef_smoothing",
              "difficulty_rule", "difficulty_threshold", "final_ratio", "fused_entropy", "initial_entropy",
              "normalize_weights", "reanchor_on_missing_state", "schedule_steps", "success_threshold",
              "target_ratio", "warmup_steps")


def _aer_key(arm: ArmSpec) -> dict[str, Any]:
    cfg = arm.aer_config(AERConfig()).resolved().to_dict()
    return {k: cfg[k] for k in KEY_FIELDS if k in cfg}


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
    history, final, wall = train_arm(CoefficientSource(job.arm, AERConfig()), state,
                                     lambda: TinyTransformer(policy_config), task, job.grpo,
                                     held_out(task, job.grpo.eval_prompts_per_bucket),
                                     job.seed, torch.device("cpu"))
    # The raw numbers, not the metrics: a metric added later needs no rerun.
    record = {"setting": job.setting, "task": job.task, "size": list(job.size), "arm": job.arm.name,
              "seed": job.seed, "wall_s": wall, "final": final,
              "history": {k: asdict(history)[k]
                          for k in ("step", "entropy", "coef", "target", "eval_step", "eval_pass1", "eval_coverage")}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, allow_nan=False))
    tmp.replace(path)  # atomic: a killed run leaves no half-written record
    return record, False


def run_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The study's per-run numbers from a run's record (its history and final evaluation)."""
    history, final = record["history"], record["final"]
    kmax = max(int(m.split("@")[1]) for m in final if m.startswith("pass@"))
    h = history["entropy"]
    smooth = moving_average(h, smoothing_window(len(h)))
    h0 = h[0]
    collapse = next((s for s, v in zip(history["step"], smooth) if v < COLLAPSE_FRACTION * h0), None)
    coef = history["coef"]
    alpha_mean = mean(coef)
    alpha_step = mean(abs(b - a) for a, b in zip(coef, coef[1:])) if len(coef) > 1 else 0.0
    steps, p1 = history["eval_step"], history["eval_pass1"]
    auc = sum((steps[i + 1] - steps[i]) * (p1[i] + p1[i + 1]) / 2 for i in range(len(steps) - 1)) / steps[-1]
    pool = final.get("pool")
    return {
        "pass@1": final["pass@1"]["all"],
        "pass@k": [final[f"pass@{k}"]["all"] for k in range(1, kmax + 1)],
        "pass@8": final[f"pass@{min(8, kmax)}"]["all"],
        "pass@kmax": final[f"pass@{kmax}"]["all"],
        # Pool tasks: the share of the training pool solved at least once, and pass@kmax on the pool
        # at the end (None without a pool).
        "coverage": final.get("coverage"),
        "pool_pass@kmax": None if pool is None else pool[f"pass@{kmax}"]["all"],
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


PAIRED = ("pass@1", "pass@8", "pass@kmax", "auc", "coverage", "pool_pass@kmax", "H_late/H0")
SCALARS = ("pass@1", "pass@8", "pass@kmax", "auc", "coverage", "pool_pass@kmax", "H_late/H0", "H_min/H0",
           "alpha_mean", "alpha_step", "alpha_jitter", "alpha_cv_late")


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
            row: dict[str, Any] = {m: list(mean_ci([x[m] for x in ms])) if ms[0][m] is not None else None
                                   for m in SCALARS}
            row["pass@k"] = [mean(v) for v in zip(*(x["pass@k"] for x in ms))]
            row["collapsed"] = sum(x["collapsed"] for x in ms)
            row["seeds"] = len(ms)
            summary[setting][arm] = row
        # Paired by seed (same warm start, data and sampling streams): the seed-to-seed spread of
        # the warm starts cancels, which the unpaired intervals above carry in full.
        if NONE in arms:
            base = {r["seed"]: run_metrics(r) for r in arms[NONE]}
            for arm, runs in arms.items():
                pairs = [(run_metrics(r), base[r["seed"]]) for r in runs if r["seed"] in base]
                if pairs:
                    summary[setting][arm]["vs_none"] = {
                        m: list(mean_ci([x[m] - b[m] for x, b in pairs])) for m in PAIRED if pairs[0][0][m] is not None}
    return summary


BASELINES = (NONE, "Clip-Higher", "Clip-Cov", "KL-Cov", SIGN_ARM)  # with every "fixed ..." arm
NAMES = {"pass@1": "pass@1", "pass@8": "pass@8", "pass@kmax": "pass@{k}", "auc": "AUC", "coverage": "coverage",
         "pool_pass@kmax": "pool pass@{k}", "H_late/H0": "H late/H0"}


def _label(metric: str, kmax: int) -> str:
    return NAMES.get(metric, metric).format(k=kmax)


def _fmt(cell: list[float] | None, digits: int = 3, sign: bool = False) -> str:
    return "-" if cell is None else f"{cell[0]:{'+' if sign else ''}.{digits}f} ± {cell[1]:.{digits}f}"


def baselines(rows: dict[str, Any]) -> list[str]:
    return [a for a in rows if a in BASELINES or a.startswith("fixed ")]


def best_of(rows: dict[str, Any], arms: list[str], metric: str) -> tuple[str, float] | None:
    """The arm of ``arms`` with the highest mean ``metric`` and the lower end of its 95% interval."""
    arms = [a for a in arms if rows[a].get(metric) is not None]
    if not arms:
        return None
    best = max(arms, key=lambda f: rows[f][metric][0])
    return best, rows[best][metric][0] - rows[best][metric][1]


def best_fixed(rows: dict[str, Any], metric: str) -> tuple[str, float] | None:
    """The fixed arm with the highest mean ``metric`` and the lower end of its 95% interval."""
    return best_of(rows, [a for a in rows if a.startswith("fixed ")], metric)


def goal_verdicts(rows: dict[str, Any], aer: str) -> list[tuple[str, str, float, str, float, bool]]:
    """The issue's goal for arm ``aer``, one tuple per condition: ``(metric, versus, aer mean, best arm,
    its interval's lower end, met)``: test pass@kmax and coverage at or above the lower end of every
    baseline's interval, pass@1 at or above the lower end of the best fixed coefficient's."""
    out = []
    for metric, pool in (("pass@kmax", baselines(rows)), ("coverage", baselines(rows)),
                         ("pass@1", [a for a in rows if a.startswith("fixed ")])):
        best = best_of(rows, pool, metric)
        if best is None or rows[aer].get(metric) is None:
            continue
        mean_aer = rows[aer][metric][0]
        out.append((metric, "every baseline" if metric != "pass@1" else "best fixed", mean_aer, best[0], best[1],
                    mean_aer >= best[1]))
    return out


def goal_table(summary: dict[str, dict[str, Any]], kmax: int, aer: str) -> list[str]:
    """One markdown row per setting: ``aer`` against the goal's comparisons ("below by x": below the
    lower end of that arm's 95% interval by x) and the per-seed difference to no entropy."""
    lines = [f"| setting | pass@{kmax} vs every baseline | coverage vs every baseline | pass@1 vs best fixed "
             f"| pass@{kmax} - no entropy | coverage - no entropy |", "|---" * 6 + "|"]
    for setting, rows in summary.items():
        verdicts = goal_verdicts(rows, aer) if aer in rows else []
        if not verdicts:
            continue
        cells = [f"{m_aer:.3f} vs {rows[best][metric][0]:.3f} ({best}): "
                 + ("within or above" if ok else f"below by {lo - m_aer:.3f}")
                 for metric, _, m_aer, best, lo, ok in verdicts]
        vs = rows[aer].get("vs_none", {})
        cells += [_fmt(vs.get(m), sign=True) for m in ("pass@kmax", "coverage")]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def premise_check(rows: dict[str, Any], kmax: int) -> tuple[bool, list[str]]:
    """Does collapse cost on this setting? Holds when the no-entropy arm's late entropy is below
    :data:`PREMISE_COLLAPSE` x H0 (seed mean) AND some fixed coefficient beats it on test pass@kmax
    or pool coverage, paired over seeds, with the 95% interval of the difference above 0."""
    if NONE not in rows:
        return False, ["- premise: no no-entropy arm"]
    h = rows[NONE]["H_late/H0"]
    collapsed = h[0] < PREMISE_COLLAPSE
    lines = [f"- no entropy: late entropy {h[0]:.2f} ± {h[1]:.2f} of H0 "
             f"({'collapsed' if collapsed else 'NOT collapsed'}: below {PREMISE_COLLAPSE:g} H0 required)"]
    wins = []
    for arm in (a for a in rows if a.startswith("fixed ")):
        for m in ("pass@kmax", "coverage"):
            d = rows[arm].get("vs_none", {}).get(m)
            if d is not None and d[0] - d[1] > 0:
                wins.append(f"{arm} {_label(m, kmax)} {_fmt(d, sign=True)}")
    lines.append("- fixed coefficients above no entropy (paired, interval above 0): "
                 + (", ".join(wins) if wins else "none"))
    holds = collapsed and bool(wins)
    lines.insert(0, f"**Premise {'HOLDS' if holds else 'DOES NOT HOLD'}** (collapse, and it costs):")
    return holds, lines


def candidate_score(row: dict[str, Any]) -> float:
    """The selection score: the mean of test pass@kmax and pool coverage (seed means)."""
    return (row["pass@kmax"][0] + row["coverage"][0]) / 2


def select_candidate(rows: dict[str, Any], candidates: list[str]) -> tuple[str, list[str]]:
    """docs/controllers.md's rule, fixed before the candidates ran: eligible are the candidates
    whose mean test pass@1 is at or above the lower end of the best fixed coefficient's 95%
    interval; the winner is the eligible one with the highest :func:`candidate_score` (all
    candidates if none is eligible, which the lines say); a candidate within 0.005 of the best
    score loses to the plain "AER" arm when that one is among them (no change without evidence)."""
    best = best_fixed(rows, "pass@1")
    floor = -math.inf if best is None else best[1]
    eligible = [c for c in candidates if rows[c]["pass@1"][0] >= floor]
    pool = eligible or candidates
    top = max(candidate_score(rows[c]) for c in pool)
    winner = AER if AER in pool and candidate_score(rows[AER]) >= top - 0.005 else \
        max(pool, key=lambda c: candidate_score(rows[c]))
    lines = [f"- {c}: score {candidate_score(rows[c]):.3f}, pass@1 {rows[c]['pass@1'][0]:.3f}"
             + ("" if c in eligible else " (pass@1 below the best fixed coefficient's interval)")
             + (" **<- selected**" if c == winner else "") for c in candidates]
    if not eligible:
        lines.append("- no candidate met the pass@1 condition: the highest score was taken")
    return winner, lines


# alpha itself is often a few 1e-3 (the controller near its floor): more digits than the rates.
_DIGITS = {"alpha_mean": 4, "alpha_step": 4}
PAPER_COLS = ("pass@1", "pass@8", "pass@kmax", "auc", "coverage", "pool_pass@kmax", "H_late/H0")
DETAIL_COLS = ("H_min/H0", "alpha_mean", "alpha_step", "alpha_jitter", "alpha_cv_late")


def format_markdown(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    kmax = meta["grpo"]["pass_k"][-1]
    lines = ["# AER study: where entropy collapse costs", "", f"`{meta['command']}`", "",
             f"{meta['steps']} GRPO steps per run, {meta['seeds']} seeds, mean ± 95% t-interval over seeds; "
             "\"- no entropy\" columns are per-seed (paired) differences to GRPO without an entropy term. "
             f"Machine: {meta['machine']}. The runs took {meta['run_wall_s_total']:.0f} s of wall time "
             f"in all (summed over runs, one torch thread each, as they ran when first computed).",
             "Tuning setting: " + meta["tuning_setting"] + "; the others are confirmation.", ""]
    for aer in (AER, TUNED):
        table = goal_table(summary, kmax, aer)
        if len(table) > 2:
            lines += [f"## Goal check: {aer}", "", *table, ""]
    if meta.get("selection"):
        lines += ["## Selection on the tuning setting (rule: docs/controllers.md)", "", *meta["selection"], ""]
    for setting, rows in summary.items():
        lines += [f"## {setting}", "", *premise_check(rows, kmax)[1], ""]
        head = [_label(m, kmax) for m in PAPER_COLS] + [f"{_label(m, kmax)} - no entropy"
                                                         for m in ("pass@kmax", "coverage")]
        lines += ["| arm | " + " | ".join(head) + " | collapsed |", "|---" * (len(head) + 2) + "|"]
        for arm, r in rows.items():
            vs = r.get("vs_none", {})
            cells = [_fmt(r[m]) for m in PAPER_COLS] + [_fmt(vs.get(m), sign=True) for m in ("pass@kmax", "coverage")]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {r['collapsed']}/{r['seeds']} |")
        lines += ["", "<details><summary>entropy and alpha</summary>", "",
                  "| arm | " + " | ".join(_label(m, kmax) for m in DETAIL_COLS) + " |",
                  "|---" * (len(DETAIL_COLS) + 1) + "|"]
        for arm, r in rows.items():
            lines.append(f"| {arm} | " + " | ".join(_fmt(r[m], _DIGITS.get(m, 3)) for m in DETAIL_COLS) + " |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot(path: Path, summary: dict[str, dict[str, Any]], kmax: int) -> None:
    """One row per setting: test pass@k against k (log x) for each non-tuning arm, then test
    pass@kmax, pool coverage and pass@1 per arm as mean ± 95% interval (no entropy dashed)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    settings = list(summary)
    metrics = ("pass@kmax", "coverage", "pass@1")
    fig = Figure(figsize=(19, 3.6 * len(settings) + 0.6), layout="constrained")
    axes = fig.subplots(len(settings), 1 + len(metrics), squeeze=False)
    colors = colormaps["tab20"]
    for i, setting in enumerate(settings):
        rows = {a: r for a, r in summary[setting].items() if not a.startswith(TUNE_PREFIX)}
        arms = list(rows)
        ax = axes[i][0]
        for j, arm in enumerate(arms):
            ks = range(1, len(rows[arm]["pass@k"]) + 1)
            ax.plot(ks, rows[arm]["pass@k"], color=colors(j % 20), lw=2.2 if arm.startswith(AER) else 1.2,
                    ls="--" if arm == NONE else "-", label=arm)
        ax.set(xscale="log", title=f"{setting}: test pass@k", xlabel="k", ylabel="pass@k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for col, m in enumerate(metrics, start=1):
            ax = axes[i][col]
            present = [a for a in arms if rows[a].get(m) is not None]
            ax.errorbar(range(len(present)), [rows[a][m][0] for a in present], yerr=[rows[a][m][1] for a in present],
                        fmt="none", ecolor="grey", capsize=3)
            ax.scatter(range(len(present)), [rows[a][m][0] for a in present],
                       c=[colors(arms.index(a) % 20) for a in present], zorder=3)
            if NONE in present:
                ax.axhline(rows[NONE][m][0], color="black", ls="--", lw=1)
            ax.set_xticks(range(len(present)), present, rotation=60, ha="right", fontsize=7)
            ax.set(title=f"{setting}: {_label(m, kmax)}")
            ax.grid(alpha=0.3)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


def build_jobs(settings: list[tuple[str, tuple[int, int]]], seeds: list[int], grpo: GRPOConfig,
               warm: WarmStartConfig, tune: bool, only: list[str] | None = None) -> list[Job]:
    """Every (setting, arm, seed). The first setting is the tuning one: with ``tune`` it alone runs
    the candidates of :data:`TUNING_ARMS`. ``only`` keeps the arms of those names."""
    jobs = []
    for i, (task, size) in enumerate(settings):
        arms = core_arms()
        if tune and i == 0:
            arms += [tuning_arm(name) for name in TUNING_ARMS]
        if only is not None:
            arms = [a for a in arms if a.name in only]
        jobs += [Job(task, size, arm, seed, grpo, warm) for arm in arms for seed in seeds]
    if only is not None:
        unknown = set(only) - {j.arm.name for j in jobs}
        if unknown:
            raise ValueError(f"--arm: unknown arms {sorted(unknown)}")
    # Seed-major: an interrupted study has every arm on its first seeds, not some arms on all.
    return sorted(jobs, key=lambda j: j.seed)


def confirmation_jobs(winner: ArmSpec, settings: list[tuple[str, tuple[int, int]]], seeds: list[int],
                      grpo: GRPOConfig, warm: WarmStartConfig) -> list[Job]:
    """The selected candidate, unchanged, as :data:`TUNED` on every setting (the tuning one
    included, where it reuses the candidate's cached runs)."""
    arm = replace(winner, name=TUNED)
    return sorted((Job(t, s, arm, seed, grpo, warm) for t, s in settings for seed in seeds), key=lambda j: j.seed)


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
    p.add_argument("--tune", action="store_true",
                   help="also run AER's candidates on the first setting, select one by the documented rule "
                        "and run it on every setting")
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
            "fixed_grid": list(FIXED_GRID), "aer": AERConfig(**TOY_RANGE).resolved().to_dict(),
            "tuning_arms": TUNING_ARMS, "selection": None, "premise": {}}

    def write() -> None:
        records.sort(key=lambda r: order[(r["setting"], r["arm"], r["seed"])])
        summary = summarize(records)
        kmax = grpo.pass_k[-1]
        meta["premise"] = {setting: premise_check(rows, kmax)[0] for setting, rows in summary.items()}
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
        if args.tune and only is None:
            # Phase 2: the rule picks the winner on the tuning setting; it then runs, unchanged, everywhere.
            rows = summarize(records)[jobs[0].setting]
            names = [AER] + [TUNE_PREFIX + n for n in TUNING_ARMS]
            winner, meta["selection"] = select_candidate(rows, names)
            spec = next(j.arm for j in jobs if j.arm.name == winner)
            more = confirmation_jobs(spec, settings, seeds, grpo, warm)
            order.update({(j.setting, j.arm.name, j.seed): len(order) + i for i, j in enumerate(more)})
            jobs += more
            print(f"selected on {jobs[0].setting}: {winner}; {len(more)} confirmation runs", flush=True)
            execute(more, cache, args.jobs, args.threads, on_done)
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are cached in {cache}", file=sys.stderr)
        return 130
    plot(out / "aer_study.png", summarize(records), grpo.pass_k[-1])
    print(format_markdown(summarize(records), meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
