"""benchmarks/aer_study.py: its statistics against hand computations, its task plug-in, and one
--quick run that is resumed from its cache."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from benchmarks import aer_study  # noqa: E402
from entropy_reg.demo.task import DigitSumTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_mean_ci_against_textbook_t_values() -> None:
    # n = 2: t_{0.975, 1} = 12.706, sd = sqrt(2), half-width = 12.706 * sqrt(2) / sqrt(2).
    assert aer_study.mean_ci([0.0, 2.0]) == pytest.approx((1.0, 12.706), abs=1e-12)
    # n = 5: t_{0.975, 4} = 2.776, sd = sqrt(2.5).
    m, hw = aer_study.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0
    assert hw == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)
    assert aer_study.mean_ci([0.7]) == (0.7, 0.0)
    # Beyond the table: the normal quantile.
    assert aer_study.mean_ci([0.0, 1.0] * 20)[1] == pytest.approx(1.96 * math.sqrt(40 / 39 * 0.25) / math.sqrt(40))


def test_run_metrics_by_hand() -> None:
    entropy = [1.0] * 10 + [0.2] * 10  # smoothing window is 10 steps for runs up to 200 steps
    record = {
        "history": {"step": list(range(20)), "entropy": entropy, "coef": [0.0, 0.1, 0.3, 0.2] + [0.2] * 16,
                    "eval_step": [0, 10, 20], "eval_pass1": [0.2, 0.4, 0.8]},
        "final": {"pass@1": {"all": 0.5}, "pass@2": {"all": 0.75}},
    }
    m = aer_study.run_metrics(record)
    assert m["pass@1"] == 0.5 and m["pass@kmax"] == 0.75 and m["pass@k"] == [0.5, 0.75]
    # Trapezoid: (10 * 0.3 + 10 * 0.6) / 20.
    assert m["auc"] == pytest.approx(0.45)
    assert m["H0"] == 1.0
    assert m["H_late/H0"] == pytest.approx(0.2)
    assert m["H_min/H0"] == pytest.approx(0.2)
    # The 10-step mean first drops below 0.25 at the last step: 0.2 everywhere in the window.
    assert m["collapsed"] is True
    assert m["alpha_mean"] == pytest.approx((0.1 + 0.3 + 0.2 * 17) / 20)
    assert m["alpha_step"] == pytest.approx((0.1 + 0.2 + 0.1) / 19)
    assert m["alpha_cv_late"] == 0.0  # constant over the second half
    assert m["alpha_jitter"] == pytest.approx(((0.1 + 0.2 + 0.1) / 19) / ((0.1 + 0.3 + 0.2 * 17) / 20))
    record["history"]["coef"] = [0.0] * 10 + [0.1, 0.3] * 5
    assert aer_study.run_metrics(record)["alpha_cv_late"] == pytest.approx(0.1 / 0.2)


def _row(pass1: float, hw: float, coverage: float, passk: float) -> dict[str, list[float]]:
    return {"pass@1": [pass1, hw], "pass@kmax": [passk, hw], "coverage": [coverage, hw]}


def test_goal_says_where_aer_loses_against_every_baseline() -> None:
    rows = {
        "no entropy": _row(0.5, 0.01, 0.70, 0.80),
        "Clip-Higher": _row(0.55, 0.01, 0.80, 0.97),
        "fixed 0.01": _row(0.6, 0.02, 0.75, 0.90),
        "fixed 0.1": _row(0.7, 0.05, 0.85, 0.85),
        "AER": _row(0.64, 0.02, 0.90, 0.95),
    }
    v = {m: rest for m, *rest in aer_study.goal_verdicts(rows, "AER")}
    # pass@64: the best baseline is Clip-Higher (0.97 ± 0.01): AER 0.95 is below 0.96 by 0.01.
    assert v["pass@kmax"][2:4] == ["Clip-Higher", pytest.approx(0.96)] and v["pass@kmax"][4] is False
    # coverage: the best is fixed 0.1 (0.85 ± 0.05): AER 0.90 is above.
    assert v["coverage"][2] == "fixed 0.1" and v["coverage"][4] is True
    # pass@1 only against the fixed arms: fixed 0.1's interval starts at 0.65 > 0.64.
    assert v["pass@1"][2] == "fixed 0.1" and v["pass@1"][4] is False
    table = aer_study.goal_table({"t / small": rows, "u / large": {"no entropy": rows["no entropy"]}}, 64, "AER")
    assert len(table) == 3  # header, rule, one setting (the other has no AER row)
    assert table[2] == ("| t / small | 0.950 vs 0.970 (Clip-Higher): below by 0.010 "
                        "| 0.900 vs 0.850 (fixed 0.1): within or above | 0.640 vs 0.700 (fixed 0.1): below by 0.010 "
                        "| - | - |")


def test_premise_needs_collapse_and_a_paired_win() -> None:
    rows = {"no entropy": {"H_late/H0": [0.3, 0.05]},
            "fixed 0.03": {"vs_none": {"pass@kmax": [0.10, 0.04], "coverage": [0.02, 0.05]}},
            "fixed 0.1": {"vs_none": {"pass@kmax": [0.05, 0.06], "coverage": [0.2, 0.1]}}}
    holds, lines = aer_study.premise_check(rows, 64)
    assert holds and "fixed 0.03 pass@64 +0.100" in lines[2] and "fixed 0.1 coverage +0.200" in lines[2]
    assert "coverage +0.020" not in lines[2]  # its interval reaches 0
    rows["no entropy"]["H_late/H0"] = [0.6, 0.05]  # no collapse: the premise fails whatever the wins
    assert aer_study.premise_check(rows, 64)[0] is False
    rows["no entropy"]["H_late/H0"] = [0.3, 0.05]
    rows["fixed 0.03"]["vs_none"]["pass@kmax"] = [0.03, 0.04]
    rows["fixed 0.1"]["vs_none"]["coverage"] = [0.2, 0.25]
    holds, lines = aer_study.premise_check(rows, 64)
    assert not holds and lines[2].endswith("none")


def test_selection_rule_by_hand() -> None:
    rows = {
        "fixed 0.03": _row(0.60, 0.05, 0.80, 0.80),  # pass@1 floor 0.55
        "AER": _row(0.58, 0.02, 0.80, 0.80),  # score 0.800
        "tune: a": _row(0.50, 0.02, 0.95, 0.95),  # best score, but pass@1 below the floor
        "tune: b": _row(0.56, 0.02, 0.86, 0.80),  # 0.830
        "tune: c": _row(0.57, 0.02, 0.803, 0.80),  # 0.8015: within 0.005 of AER
    }
    winner, lines = aer_study.select_candidate(rows, ["AER", "tune: a", "tune: b", "tune: c"])
    assert winner == "tune: b" and "selected" in lines[2] and "below the best fixed" in lines[1]
    del rows["tune: b"]
    assert aer_study.select_candidate(rows, ["AER", "tune: a", "tune: c"])[0] == "AER"
    # None eligible: the highest score, said so.
    rows["fixed 0.03"]["pass@1"] = [0.9, 0.01]
    winner, lines = aer_study.select_candidate(rows, ["AER", "tune: a", "tune: c"])
    assert winner == "tune: a" and "no candidate met" in lines[-1]


def test_candidates_change_one_setting_of_the_aer_arm() -> None:
    from entropy_reg.demo.arms import DEMO_AER
    from entropy_reg.regularizer import AERConfig

    base = next(a for a in aer_study.core_arms() if a.name == aer_study.AER).aer_config(AERConfig()).resolved()
    # The demo runs the candidate the study selected (benchmarks/results/aer_study.md).
    assert aer_study.tuning_arm("alpha in [0.01, 1]").aer_config(AERConfig()).resolved() == DEMO_AER.resolved()
    for name, change in aer_study.TUNING_ARMS.items():
        cfg = aer_study.tuning_arm(name).aer_config(AERConfig()).resolved().to_dict()
        differs = {k for k, v in base.to_dict().items() if cfg[k] != v}
        assert differs and differs <= set(change), name  # one knob, and it does differ


def _record(arm: str, seed: int, pass1: float, auc_steps: list[float]) -> dict:
    return {"setting": "t / small", "arm": arm, "seed": seed,
            "history": {"step": [0, 1], "entropy": [1.0, 1.0], "coef": [0.0, 0.0], "eval_step": [0, 1, 2],
                        "eval_pass1": auc_steps},
            "final": {"pass@1": {"all": pass1}, "pass@2": {"all": pass1}}}


def test_summary_pairs_arms_with_no_entropy_by_seed() -> None:
    # Seeds differ a lot (0.2 vs 0.8) but AER is +0.1 on pass@1 on each: the paired
    # interval is tight where the unpaired one is wide.
    records = [_record("no entropy", 0, 0.2, [0.0, 0.0, 0.0]), _record("no entropy", 1, 0.8, [1.0, 1.0, 1.0]),
               _record("AER", 1, 0.9, [1.0, 1.0, 1.0]), _record("AER", 0, 0.3, [0.0, 0.5, 0.0])]
    row = aer_study.summarize(records)["t / small"]["AER"]
    assert row["coverage"] is None and "coverage" not in row["vs_none"]  # no pool in this task
    assert row["seeds"] == 2
    assert row["pass@1"] == pytest.approx([0.6, 12.706 * math.sqrt(0.18) / math.sqrt(2)])
    assert row["vs_none"]["pass@1"] == pytest.approx([0.1, 0.0], abs=1e-12)
    # AUC differences: seed 0 (0.25 + 0.25) / 2 = 0.25, seed 1: 0.
    assert row["vs_none"]["auc"] == pytest.approx([0.125, 12.706 * math.sqrt(0.03125) / math.sqrt(2)])


def test_load_task_by_name_and_by_module_factory() -> None:
    assert isinstance(aer_study.load_task("entropy_reg.demo.task:DigitSumTask"), DigitSumTask)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        aer_study.load_task("nope")
    with pytest.raises(TypeError, match="lacks"):
        aer_study.load_task("pathlib:Path")


def test_bad_arms_and_sizes_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in ((["--arm", "AER", "--arm", "bogus"], "unknown arms ['bogus']"),
                       (["--size", "huge"], "unknown size"),
                       (["--width", "32"], "--width and --layers go together"),
                       (["--setting", "addition", "huge"], "--setting: unknown size"),
                       (["--task", "nope"], "unknown task 'nope'"), (["--lr", "-1"], "--lr")):
        with pytest.raises(SystemExit) as exc:
            aer_study.main(["--quick", *argv])
        assert exc.value.code == 2
        assert text in capsys.readouterr().err


def test_quick_study_runs_and_resumes_from_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--jobs", "1", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
            "--arm", "no entropy", "--arm", "fixed 0.3", "--arm", "AER",
            "--task", "modes", "--task", "entropy_reg.demo.task:DigitSumTask"]
    threads = torch.get_num_threads()
    try:
        assert aer_study.main(argv) == 0
        first = capsys.readouterr().out
        results = json.loads((tmp_path / "aer_study.json").read_text())
        # A second invocation trains nothing: every run comes from the cache, with the same numbers.
        assert aer_study.main(argv) == 0
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert len(re.findall(r"wall \d+ s", first)) == 12
    assert second.count("cached") == 12 and re.search(r"wall \d+ s", second) is None
    assert json.loads((tmp_path / "aer_study.json").read_text())["runs"] == results["runs"]
    settings = list(results["summary"])
    assert settings == ["modes / small", "entropy_reg.demo.task:DigitSumTask / small"]
    assert len(results["runs"]) == 2 * 3 * 2  # settings x arms x seeds
    for rows in results["summary"].values():
        assert list(rows) == ["no entropy", "fixed 0.3", "AER"]
        for row in rows.values():
            assert row["seeds"] == 2
            assert all(0.0 <= p <= 1.0 for p in row["pass@k"])
            assert row["pass@k"] == sorted(row["pass@k"])  # pass@k grows with k
    fixed = [r for r in results["runs"] if r["arm"] == "fixed 0.3"]
    assert all(r["metrics"]["alpha_mean"] == 0.3 and r["metrics"]["alpha_step"] == 0.0 for r in fixed)
    png = (tmp_path / "aer_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] >= 800
    assert "## modes / small" in (tmp_path / "aer_study.md").read_text()
    # The pool task reports coverage and pool pass@k; the other has none.
    modes = [r["metrics"] for r in results["runs"] if r["setting"] == "modes / small"]
    assert all(0.0 <= m["coverage"] <= 1.0 and 0.0 <= m["pool_pass@kmax"] <= 1.0 for m in modes)
    assert all(r["metrics"]["coverage"] is None for r in results["runs"] if r["setting"] != "modes / small")


def test_quick_tune_selects_by_the_rule_and_confirms_the_winner_everywhere(tmp_path: Path) -> None:
    argv = ["--quick", "--tune", "--seeds", "2", "--jobs", "1", "--out", str(tmp_path), "--cache", str(tmp_path / "c"),
            "--setting", "modes", "small", "--setting", "digitsum", "small"]
    threads = torch.get_num_threads()
    try:
        assert aer_study.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "aer_study.json").read_text())
    tuning = results["summary"]["modes / small"]
    names = [aer_study.AER] + [aer_study.TUNE_PREFIX + n for n in aer_study.TUNING_ARMS]
    winner, lines = aer_study.select_candidate(tuning, names)
    assert results["meta"]["selection"] == lines
    # The winner's runs, renamed: the same numbers on the tuning setting (same cache key) ...
    won = sorted((r["seed"], r["metrics"]["pass@1"]) for r in results["runs"]
                 if r["setting"] == "modes / small" and r["arm"] == winner)
    tuned = sorted((r["seed"], r["metrics"]["pass@1"]) for r in results["runs"]
                   if r["setting"] == "modes / small" and r["arm"] == aer_study.TUNED)
    assert won == tuned and len(tuned) == 2
    # ... and it ran on the confirmation setting, which ran no candidate.
    other = results["summary"]["digitsum / small"]
    assert aer_study.TUNED in other and not any(a.startswith(aer_study.TUNE_PREFIX) for a in other)
    assert set(results["meta"]["premise"]) == {"modes / small", "digitsum / small"}
    assert "## Selection on the tuning setting" in (tmp_path / "aer_study.md").read_text()
