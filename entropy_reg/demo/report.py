"""The demo's outputs: the summary table, the JSON of every plotted number, the figure.

Summary numbers per arm, averaged over seeds (entropies in nats per token):

- pass@1 and pass@k on the held-out prompts, per difficulty bucket and overall;
- entropy after a trailing moving average over ``W = smoothing_window(steps)``
  steps (so one noisy batch does not count; the figure draws the same curve):
  ``H late`` is its value at the last step (the mean of the last ``W`` steps),
  ``H min`` its minimum, and ``collapse`` the first step at which it falls
  below ``COLLAPSE_FRACTION * H0`` ("-" if never), ``H0`` being the entropy of
  the warm-started policy at step 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Any

COLLAPSE_FRACTION = 0.25
# The figure's target band: within a factor 1.5 of AER's target.
TARGET_BAND = 1.5


def smoothing_window(steps: int) -> int:
    """5% of the run, at least 10 steps."""
    return max(10, steps // 20)


def moving_average(xs: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (same length as ``xs``)."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from an arm's runs (one per seed): see the module docstring."""
    rows = []
    for run in runs:
        h = run["history"]["entropy"]
        smooth = moving_average(h, smoothing_window(len(h)))
        h0 = h[0]
        collapse = next((s for s, v in zip(run["history"]["step"], smooth) if v < COLLAPSE_FRACTION * h0), None)
        rows.append({"H0": h0, "H_late": smooth[-1], "H_min": min(smooth), "collapse_step": collapse,
                     "wall_s": run["wall_s"], "final": run["final"]})
    metrics = [m for m in rows[0]["final"] if m.startswith("pass@")]
    # The last target of each seed (anchored to that seed's own H0), averaged; None for arms without one.
    targets = [run["history"]["target"][-1] for run in runs]
    collapsed = [r["collapse_step"] for r in rows if r["collapse_step"] is not None]
    return {
        "H0": mean(r["H0"] for r in rows),
        "H_late": mean(r["H_late"] for r in rows),
        "H_min": mean(r["H_min"] for r in rows),
        # Collapse step: the mean over the seeds that collapsed, with how many did.
        "collapse_step": mean(collapsed) if collapsed else None,
        "collapsed_seeds": len(collapsed),
        "wall_s": mean(r["wall_s"] for r in rows),
        "final": {m: {b: mean(r["final"][m][b] for r in rows) for b in rows[0]["final"][m]} for m in metrics},
        # Pool tasks: the share of the pool solved at least once in training, and pass@k on the pool.
        "coverage": mean(r["final"]["coverage"] for r in rows) if "coverage" in rows[0]["final"] else None,
        "pool": ({m: mean(r["final"]["pool"][m]["all"] for r in rows) for m in metrics}
                 if "pool" in rows[0]["final"] else None),
        "target": None if None in targets else mean(targets),
    }


def format_table(summary: dict[str, dict[str, Any]], buckets: list[int], n_seeds: int) -> str:
    """A Markdown table (readable in a terminal too) of the summary rows."""
    first = next(iter(summary.values()))
    k_metric = max((m for m in first["final"] if m != "pass@1"), key=lambda m: int(m.split("@")[1]))
    names = "/".join(str(b) for b in buckets)
    pool = first.get("coverage") is not None
    header = ["arm", f"pass@1 by bucket {names}", "pass@1", f"{k_metric} by bucket {names}", k_metric,
              *(["pool coverage", f"pool {k_metric}"] if pool else []), "H late", "H min", "collapse step", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, row in summary.items():
        f = row["final"]
        collapse = "-" if row["collapse_step"] is None else f"{row['collapse_step']:.0f}"
        if n_seeds > 1 and row["collapse_step"] is not None:
            collapse += f" ({row['collapsed_seeds']}/{n_seeds})"
        cells = [
            name,
            " / ".join(f"{f['pass@1'][str(b)]:.2f}" for b in buckets),
            f"{f['pass@1']['all']:.3f}",
            " / ".join(f"{f[k_metric][str(b)]:.2f}" for b in buckets),
            f"{f[k_metric]['all']:.3f}",
            *([f"{row['coverage']:.3f}", f"{row['pool'][k_metric]:.3f}"] if pool else []),
            f"{row['H_late']:.3f}",
            f"{row['H_min']:.3f}",
            collapse,
            f"{row['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write, so an interrupted run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    tmp.replace(path)


def plot(path: Path, results: dict[str, list[dict[str, Any]]], summary: dict[str, dict[str, Any]],
         aer_arm: str | None, buckets: list[int], title: str, bucket_names: dict[int, str] | None = None) -> None:
    """Six panels: entropy (with H0 and AER's target band), the global coefficient (log axis),
    held-out pass@1 during training, held-out pass@k at the end (k = 1 .. the largest k), the
    pool's coverage during training (pool tasks) and the AER arm's mean coefficient per
    difficulty bucket. Curves are seed means; entropy and per-difficulty coefficients are
    drawn after the moving average of :func:`smoothing_window` steps."""
    # The object API renders with Agg and leaves pyplot's global backend alone.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 9), layout="constrained")
    ax_h, ax_c, ax_a, ax_k, ax_v, ax_d = fig.subplots(2, 3).flat
    colors = colormaps["tab10"]
    for i, (name, runs) in enumerate(results.items()):
        color = colors(i % 10)
        steps = runs[0]["history"]["step"]
        window = smoothing_window(len(steps))
        h = _seed_mean([r["history"]["entropy"] for r in runs])
        ax_h.plot(steps, h, color=color, alpha=0.18, lw=0.8)
        ax_h.plot(steps, moving_average(h, window), color=color, lw=2, label=name)
        coef = _seed_mean([r["history"]["coef"] for r in runs])
        if max(coef) > 0:  # a log axis has no 0: arms without a coefficient are left out
            ax_c.plot(steps, coef, color=color, lw=2, label=name)
        ax_a.plot(runs[0]["history"]["eval_step"], _seed_mean([r["history"]["eval_pass1"] for r in runs]),
                  color=color, lw=2, marker="o", ms=3, label=name)
        ks = sorted(int(m.split("@")[1]) for m in summary[name]["final"])
        ax_k.plot(ks, [summary[name]["final"][f"pass@{k}"]["all"] for k in ks], color=color, lw=2, label=name)
        coverage = runs[0]["history"].get("eval_coverage") or [None]
        if coverage[0] is not None:
            ax_v.plot(runs[0]["history"]["eval_step"], _seed_mean([r["history"]["eval_coverage"] for r in runs]),
                      color=color, lw=2, marker="o", ms=3, label=name)
    h0 = mean(row["H0"] for row in summary.values())
    seed_mean = " (seed mean)" if len(next(iter(results.values()))) > 1 else ""
    ax_h.axhline(h0, color="black", ls=":", lw=1.2, label=f"H0 = {h0:.2f}{seed_mean} (warm start)")
    if aer_arm is not None and summary[aer_arm]["target"] is not None:
        target = summary[aer_arm]["target"]
        ax_h.axhline(target, color="black", ls="--", lw=1.5, label=f"AER target = {target:.2f}{seed_mean}")
        ax_h.axhspan(target / TARGET_BAND, target * TARGET_BAND, color="black", alpha=0.06,
                     label=f"target band (x/÷ {TARGET_BAND:g})")
    ax_h.axhline(COLLAPSE_FRACTION * h0, color="grey", ls="-.", lw=1, label=f"collapse line ({COLLAPSE_FRACTION:g} H0)")
    # Log scale: collapse (towards 0) and blow-up (towards log V) are both visible.
    ax_h.set(title="Policy entropy on its own rollouts (log scale)", xlabel="GRPO step",
             ylabel="mean token entropy (nats)", yscale="log")
    ax_c.set(title="Global entropy coefficient alpha (log scale; none: not drawn)", xlabel="GRPO step", ylabel="alpha",
             yscale="log")
    ax_a.set(title="Held-out pass@1, all difficulties (arm colors as above)", xlabel="GRPO step", ylabel="pass@1")
    ax_k.set(title="Held-out pass@k at the end", xlabel="k (log scale)", ylabel="pass@k", xscale="log")
    ax_k.set_xticks([k for k in (1, 2, 4, 8, 16, 32, 64) if k <= ks[-1]], [str(k) for k in (1, 2, 4, 8, 16, 32, 64)
                                                                          if k <= ks[-1]])
    if ax_v.lines:
        ax_v.set(title="Pool coverage: share of training prompts solved at least once", xlabel="GRPO step",
                 ylabel="coverage")
    else:
        ax_v.text(0.5, 0.5, "no training pool in this task", ha="center", va="center", transform=ax_v.transAxes)
        ax_v.set_axis_off()
    if aer_arm is not None:
        runs = results[aer_arm]
        steps = runs[0]["history"]["step"]
        shades = colormaps["viridis"]
        for j, b in enumerate(buckets):
            series = _seed_mean([_forward_fill(r["history"]["coef_by_bucket"][str(b)]) for r in runs])
            ax_d.plot(steps, moving_average(series, smoothing_window(len(steps))),
                      color=shades(j / max(1, len(buckets) - 1)), lw=2,
                      label=(bucket_names or {}).get(b, f"{b} digits"))
        ax_d.set(title=f"{aer_arm}: mean coefficient per difficulty (alpha x weight)", xlabel="GRPO step",
                 ylabel="coefficient")
    else:
        ax_d.text(0.5, 0.5, "no AER arm in this run", ha="center", va="center", transform=ax_d.transAxes)
        ax_d.set_axis_off()
    # Room below the lowest curve for the legend, so it never hides one.
    low, high = ax_h.get_ylim()
    ax_h.set_ylim(low * 0.12, high)
    ax_h.legend(fontsize=8, ncol=3, loc="lower center")
    # One legend for the arms (the entropy panel's): the same colors in every panel.
    for ax in (ax_h, ax_c, ax_a, ax_k, ax_v, ax_d):
        ax.grid(alpha=0.3)
    if aer_arm is not None:
        ax_d.legend(fontsize=8)
    fig.suptitle(title)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def _forward_fill(values: list[float | None]) -> list[float]:
    """Steps whose batch had no prompt of a bucket (None) repeat the previous value (0 at the start)."""
    out, last = [], 0.0
    for v in values:
        last = last if v is None else v
        out.append(last)
    return out


def _seed_mean(series: list[list[float]]) -> list[float]:
    return [math.fsum(vals) / len(vals) for vals in zip(*series)]
