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


def _row(pass1: float, hw: float, auc: float, passk: float) -> dict[str, list[float]]:
    return {"pass@1": [pass1, hw], "pass@kmax": [passk, hw], "auc": [auc, hw]}


def test_goal_check_says_where_aer_loses() -> None:
    rows = {
        "no entropy": _row(0.5, 0.01, 0.40, 0.80),
        "fixed 0.01": _row(0.6, 0.02, 0.50, 0.90),
        "fixed 0.1": _row(0.7, 0.05, 0.45, 0.85),
        "AER": _row(0.64, 0.02, 0.38, 0.95),
    }
    lines = aer_study.goal_check(rows, 64)
    assert lines[0].startswith("- pass@1: AER 0.640 vs best fixed (fixed 0.1)")
    assert "BELOW its interval by 0.010" in lines[0]
    assert "fixed 0.01" in lines[1] and "within or above" in lines[1]
    assert "fixed 0.01" in lines[2] and "BELOW its interval by 0.100" in lines[2]
    assert "pass@64: AER above no entropy by +0.150" in lines[3]
    assert "AUC: AER NOT above no entropy by -0.020" in lines[4]
    # The same verdicts in the cross-setting table (no per-seed pairs here: "-").
    table = aer_study.goal_table({"t / small": rows, "u / large": {"no entropy": rows["no entropy"]}}, 64, "AER")
    assert len(table) == 3  # header, rule, one setting (the other has no AER row)
    assert table[2] == ("| t / small | 0.640 vs 0.700 (fixed 0.1): below by 0.010 | 0.950 vs 0.900 (fixed 0.01): within "
                        "| 0.380 vs 0.500 (fixed 0.01): below by 0.100 | - | - |")


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
    assert row["seeds"] == 2
    assert row["pass@1"] == pytest.approx([0.6, 12.706 * math.sqrt(0.18) / math.sqrt(2)])
    assert row["vs_none"]["pass@1"] == pytest.approx([0.1, 0.0], abs=1e-12)
    # AUC differences: seed 0 (0.25 + 0.25) / 2 = 0.25, seed 1: 0.
    assert row["vs_none"]["auc"] == pytest.approx([0.125, 12.706 * math.sqrt(0.03125) / math.sqrt(2)])
    assert "per-seed difference +0.125" in "\n".join(
        aer_study.goal_check({**aer_study.summarize(records)["t / small"],
                              "fixed 0.1": _row(0.5, 0.1, 0.5, 0.5)}, 2))


def test_the_library_default_is_the_chosen_candidate_and_the_demo_differs_only_in_range() -> None:
    from entropy_reg.demo.arms import DEMO_AER, TOY_RANGE
    from entropy_reg.regularizer import AERConfig

    chosen = AERConfig(**aer_study.TUNING_ARMS["log PI, lr 0.05, smoothing 0.9"]).resolved()
    assert AERConfig(**TOY_RANGE).resolved() == chosen == DEMO_AER.resolved()
    # Outside the range, the library's defaults are the chosen controller.
    assert AERConfig().resolved() == AERConfig(**{**chosen.to_dict(), "coef_init": 1e-4, "coef_min": 1e-4,
                                                  "coef_max": 1e-2})
    # Every candidate pins the whole controller, so a change of the defaults cannot change it.
    for cfg in aer_study.TUNING_ARMS.values():
        assert {"coef_rule", "coef_lr", "coef_init", "coef_min", "coef_max", "coef_damping", "coef_smoothing"} <= set(cfg)


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
            "--task", "addition", "--task", "entropy_reg.demo.task:DigitSumTask"]
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
    assert settings == ["addition / small", "entropy_reg.demo.task:DigitSumTask / small"]
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
    assert "## addition / small" in (tmp_path / "aer_study.md").read_text()
