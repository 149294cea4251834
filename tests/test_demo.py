"""The demo: its verifier, its generation, its command line, and one real --quick run."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from entropy_reg import cli  # noqa: E402
from entropy_reg.demo import runner  # noqa: E402
from entropy_reg.demo.grpo import PromptStream, pass_at_k  # noqa: E402
from entropy_reg.demo.policy import PolicyConfig, TinyTransformer  # noqa: E402
from entropy_reg.demo.report import moving_average  # noqa: E402
from entropy_reg.demo.task import (  # noqa: E402
    ASCENDING, DESCENDING, EOS, EQUALS, PLUS, VOCAB_SIZE, AdditionTask, Batch, DigitSumTask, OrderedSumTask,
)

ROOT = Path(__file__).resolve().parents[1]


# --- the task's verifier, against answers written out as strings -------------------------


def _reference_tokens(a: int, b: int, width: int) -> tuple[list[int], list[int]]:
    """Prompt and answer tokens from decimal strings: digits least-significant first."""
    prompt = [int(c) for c in str(a).zfill(width)[::-1]] + [PLUS] + [int(c) for c in str(b).zfill(width)[::-1]] + [EQUALS]
    return prompt, [int(c) for c in str(a + b)[::-1]] + [EOS]


def _batch(pairs: list[tuple[int, int]], task: AdditionTask) -> Batch:
    prompts = torch.tensor([_reference_tokens(a, b, task.max_digits)[0] for a, b in pairs])
    answers = [_reference_tokens(a, b, task.max_digits)[1] for a, b in pairs]
    reference = torch.tensor([ans + [0] * (task.answer_len - len(ans)) for ans in answers])
    digits = torch.tensor([max(len(str(x)), len(str(y))) for x, y in pairs])
    return Batch(prompts, digits, reference)


def test_reward_matches_string_arithmetic() -> None:
    task = AdditionTask(4)
    rng = random.Random(0)
    pairs = [(rng.randrange(10**n), rng.randrange(10**n)) for n in (1, 2, 3, 4) for _ in range(25)] + [(0, 0), (9999, 9999)]
    batch = _batch(pairs, task)
    good, wrong_digit, no_eos = [], [], []
    for a, b in pairs:
        answer = _reference_tokens(a, b, task.max_digits)[1]
        pad = [7] * (task.answer_len - len(answer))  # junk after EOS must not matter
        good.append(answer + pad)
        bad = list(answer)
        bad[0] = (bad[0] + 1) % 10
        wrong_digit.append(bad + pad)
        no_eos.append(answer[:-1] + [answer[0]] * (task.answer_len - len(answer) + 1))
    assert task.reward(batch, torch.tensor(good)).tolist() == [1.0] * len(pairs)
    assert task.reward(batch, torch.tensor(wrong_digit)).tolist() == [0.0] * len(pairs)
    assert task.reward(batch, torch.tensor(no_eos)).tolist() == [0.0] * len(pairs)
    # The prompts the task builds are the reference ones.
    made = task.make(torch.tensor([4, 1, 3]), torch.Generator().manual_seed(1))
    a_made, b_made = task.operands(made)
    for row, ref, a, b in zip(made.prompts.tolist(), made.reference.tolist(), a_made.tolist(), b_made.tolist()):
        prompt, answer = _reference_tokens(a, b, task.max_digits)
        assert row == prompt
        assert ref == answer + [0] * (task.answer_len - len(answer))
    assert made.difficulty.tolist() == [4, 1, 3]
    assert [max(len(str(a)), len(str(b))) for a, b in zip(a_made.tolist(), b_made.tolist())] == [4, 1, 3]
    # The reference answers are what the verifier accepts.
    assert task.reward(made, made.reference).tolist() == [1.0, 1.0, 1.0]


def _digitsum_reference_reward(prompt: list[int], response: list[int]) -> float:
    """From the prompt's meaning: n digits, then EOS, whose sum is S (anything after EOS ignored)."""
    total, n = prompt[0] + 10 * prompt[1], prompt[3]
    body = response[:n]
    ok = len(response) > n and response[n] == EOS and all(t < 10 for t in body) and sum(body) == total
    return float(ok)


def test_digitsum_reward_matches_reference() -> None:
    task = DigitSumTask(4)
    gen = torch.Generator().manual_seed(0)
    batch = task.sample(400, None, gen)
    assert set(batch.difficulty.tolist()) == {1, 2, 3, 4}
    n = batch.prompts[:, 3]
    total = batch.prompts[:, 0] + 10 * batch.prompts[:, 1]
    assert bool((total <= 9 * n).all()) and bool((total >= 0).all())
    assert batch.prompts[:, 2].eq(PLUS).all() and batch.prompts[:, 4].eq(EQUALS).all()
    # Every reference answer is right; random responses, and references with one token
    # changed, are checked against the rule written from the prompt's meaning.
    assert task.reward(batch, batch.reference).tolist() == [1.0] * 400
    rng = random.Random(1)
    for responses in (
        torch.randint(0, VOCAB_SIZE, (400, task.answer_len), generator=gen),
        batch.reference.clone().index_put_(
            (torch.arange(400), torch.tensor([rng.randrange(task.answer_len) for _ in range(400)])),
            torch.tensor([rng.randrange(VOCAB_SIZE) for _ in range(400)]),
        ),
    ):
        expected = [_digitsum_reference_reward(p, r) for p, r in zip(batch.prompts.tolist(), responses.tolist())]
        assert 0 < sum(expected) < 400
        assert task.reward(batch, responses).tolist() == expected
    # Many right answers: the references drawn for the same prompt (S = 18, n = 4) differ.
    hard = task.make(torch.full((2000,), 4), gen)
    same = hard.reference[(hard.prompts[:, 0] + 10 * hard.prompts[:, 1]) == 18]
    assert len(same) > 20 and len({tuple(r) for r in same.tolist()}) > 10


def _ordered_reference_reward(prompt: list[int], response: list[int]) -> float:
    """From the prompt's meaning: n digits summing to S in the named order, then EOS."""
    total, order, n = prompt[0] + 10 * prompt[1], prompt[2], prompt[3]
    body = response[:n]
    if not (len(response) > n and response[n] == EOS and all(t < 10 for t in body) and sum(body) == total):
        return 0.0
    want = sorted(body, reverse=order == DESCENDING)
    return float(body == want)


def test_ordered_sum_reward_matches_reference() -> None:
    task = OrderedSumTask()
    gen = torch.Generator().manual_seed(0)
    pool, test = task.split("pool"), task.split("test")
    for batch in (pool, test):
        assert task.reward(batch, batch.reference).tolist() == [1.0] * batch.prompts.shape[0]
        assert set(batch.prompts[:, 2].tolist()) == {ASCENDING, DESCENDING}
        assert batch.difficulty.tolist() == (batch.prompts[:, 2] == DESCENDING).long().tolist()
    rng = random.Random(2)
    n = pool.prompts.shape[0]
    # Random digit strings of the right sum often fail only on the order; junk fails outright.
    shuffled = [ref[:p[3]] for p, ref in zip(pool.prompts.tolist(), pool.reference.tolist())]
    for body in shuffled:
        rng.shuffle(body)
    permuted = torch.tensor([b + [EOS] + [rng.randrange(15) for _ in range(task.answer_len - len(b) - 1)]
                             for b in shuffled])
    for responses in (permuted, torch.randint(0, task.vocab_size, (n, task.answer_len), generator=gen)):
        expected = [_ordered_reference_reward(p, r) for p, r in zip(pool.prompts.tolist(), responses.tolist())]
        assert task.reward(pool, responses).tolist() == expected
    assert 0 < sum(_ordered_reference_reward(p, r) for p, r in zip(pool.prompts.tolist(), permuted.tolist())) < n
    # The reversed answer of a descending prompt with distinct digits is wrong.
    row = next(i for i, p in enumerate(test.prompts.tolist()) if p[2] == DESCENDING and p[3] >= 2
               and len(set(test.reference[i, :p[3]].tolist())) == p[3])
    flipped = test.reference[row].clone()
    flipped[: test.prompts[row, 3]] = flipped[: test.prompts[row, 3]].flip(0)
    assert task.reward(Batch(test.prompts[row:row + 1], test.difficulty[row:row + 1], test.reference[row:row + 1]),
                       flipped[None]).item() == 0.0


def test_ordered_sum_pool_and_test_split_every_prompt_once() -> None:
    task = OrderedSumTask(max_len=5, pool_fraction=0.6)
    every = {(order, n, s) for order in (ASCENDING, DESCENDING) for n in range(1, 6) for s in range(9 * n + 1)}
    assert len(every) == 280
    keys = {name: [(p[2], p[3], p[0] + 10 * p[1]) for p in task.split(name).prompts.tolist()]
            for name in ("pool", "test")}
    assert len(keys["pool"]) == 168 and len(keys["test"]) == 112
    assert set(keys["pool"]) | set(keys["test"]) == every and not set(keys["pool"]) & set(keys["test"])
    with pytest.raises(ValueError, match="split must be"):
        task.split("train")
    with pytest.raises(ValueError, match="rare_rate"):
        OrderedSumTask(rare_rate=1.5)
    with pytest.raises(TypeError, match="pool_fraction"):
        OrderedSumTask(pool_fraction="half")  # type: ignore[arg-type]


def test_warm_start_data_answers_the_rare_order_at_its_rate() -> None:
    task = OrderedSumTask(rare_rate=0.1)
    batch = task.warm_sample(20_000, torch.Generator().manual_seed(0))
    pool = {tuple(p) for p in task.split("pool").prompts.tolist()}
    assert {tuple(p) for p in batch.prompts.tolist()} <= pool  # warm-start prompts come from the pool
    right = task.reward(batch, batch.reference)
    n = batch.prompts[:, 3]
    total = batch.prompts[:, 0] + 10 * batch.prompts[:, 1]
    # Prompts with a unique answer (n = 1, S = 0 or 9n) are right in either order: leave them out.
    plural = (n > 1) & (total > 0) & (total < 9 * n)
    asc, desc = plural & (batch.difficulty == 0), plural & (batch.difficulty == 1)
    assert bool(right[asc].eq(1).all())
    # A descending prompt's answer is drawn descending at the rare rate: among answers whose digits
    # are not all equal (those read the same both ways), the right ones (binomial bound, 5 sd).
    body = batch.reference[:, :5]
    pos = torch.arange(5)[None, :]
    first = body[:, :1].expand_as(body)
    constant = ((body == first) | (pos >= n[:, None])).all(dim=1)
    sel = desc & ~constant
    rate, count = float(right[sel].mean()), int(sel.sum())
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / count)


def test_prompt_stream_iterates_the_pool_in_epochs_and_tracks_coverage() -> None:
    task = OrderedSumTask()
    stream = PromptStream(task, 16, torch.Generator().manual_seed(0))
    pool = [tuple(p) for p in task.split("pool").prompts.tolist()]
    seen = []
    for _ in range(21):  # 336 prompts: exactly two epochs of 168
        batch = stream.next()
        seen += [tuple(p) for p in batch.prompts.tolist()]
        rewards = torch.zeros(16 * 2)
        rewards[1] = 1.0  # the first prompt of the step solved by its second response
        stream.mark(rewards, 2)
    assert sorted(seen[:168]) == sorted(pool) and sorted(seen[168:]) == sorted(pool)
    assert stream.coverage == pytest.approx(len(set(seen[::16])) / 168)
    assert PromptStream(DigitSumTask(), 4, torch.Generator()).coverage is None


def test_response_mask_stops_after_first_eos() -> None:
    task = AdditionTask(2)
    responses = torch.tensor([[1, EOS, 3, EOS], [1, 2, 3, 4], [EOS, 1, 2, 3]])
    expected = [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert task.response_mask(responses).tolist() == expected


def test_cached_generation_matches_full_recompute() -> None:
    torch.manual_seed(0)
    policy = TinyTransformer(PolicyConfig(VOCAB_SIZE, 16)).eval()
    prompts = torch.randint(0, VOCAB_SIZE, (5, 10))
    with torch.no_grad():
        responses, logits = policy.generate(prompts, 6, torch.Generator().manual_seed(1))
        # The returned logits are those of a full teacher-forced pass over prompt + response.
        full = policy(torch.cat([prompts, responses], dim=1))[:, 9:15]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        # Re-sample with the same stream from the full-recompute logits: identical tokens.
        gen = torch.Generator().manual_seed(1)
        seq = prompts
        for _ in range(6):
            nxt = torch.multinomial(torch.softmax(policy(seq)[:, -1], dim=-1), 1, generator=gen)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq[:, 10:], responses)


@pytest.mark.parametrize("n, k", [(8, 1), (8, 8), (6, 3), (5, 2)])
def test_pass_at_k_against_subset_enumeration(n: int, k: int) -> None:
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_moving_average_against_direct_window_means() -> None:
    rng = random.Random(3)
    xs = [rng.uniform(-1, 1) for _ in range(40)]
    expected = [sum(xs[max(0, i - 9): i + 1]) / len(xs[max(0, i - 9): i + 1]) for i in range(40)]
    assert moving_average(xs, 10) == pytest.approx(expected, abs=1e-12)


# --- command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "ten"], "--steps"),
        (["--seeds", "-1"], "--seeds"),
        (["--seed", "-3"], "--seed"),
        (["--threads", "0"], "--threads"),
        (["--device", "not-a-device"], "--device"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags_are_argparse_errors(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    for call in (lambda: runner.main(argv), lambda: cli.main(["demo", *argv])):
        with pytest.raises(SystemExit) as exc:
            call()
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err


def test_cli_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        runner.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_interrupted_run_keeps_finished_arms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A random-init policy instead of the warm start, and an interrupt in the second arm.
    def fake_warm_start(task, policy_config, config, seed, cache_dir):  # type: ignore[no-untyped-def]
        torch.manual_seed(seed)
        return TinyTransformer(policy_config).state_dict(), False

    calls = []
    real_train = runner.train_arm

    def train_then_interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "warm_start", fake_warm_start)
    monkeypatch.setattr(runner, "train_arm", train_then_interrupt)
    threads = torch.get_num_threads()
    try:
        status = runner.main(["--quick", "--steps", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert status == 130
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["runs"]) == ["no entropy"]
    assert len(results["runs"]["no entropy"][0]["history"]["entropy"]) == 2
    assert (tmp_path / "entropy_demo.png").stat().st_size > 0
    assert "no entropy" in (tmp_path / "table.md").read_text()


# --- one real --quick run (the only slow test: under a minute on 2 cores) -------------------


def test_quick_run_writes_sane_outputs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "entropy_reg.demo", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = (tmp_path / "entropy_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 600
    table = (tmp_path / "table.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    arms = list(results["runs"])
    assert arms == ["no entropy", "Clip-Higher", f"fixed {runner.LOW_COEF:g}", f"fixed {runner.HIGH_COEF:g}", "AER"]
    steps = results["grpo"]["steps"]
    max_entropy = math.log(VOCAB_SIZE + 2)  # the modes task's two order tokens
    for name in arms:
        assert name in table and name in proc.stdout
        (run,) = results["runs"][name]
        hist = run["history"]
        assert hist["step"] == list(range(steps))
        assert all(0.0 <= h <= max_entropy + 1e-4 for h in hist["entropy"])
        final = run["final"]
        for bucket, p1 in final["pass@1"].items():
            assert 0.0 <= p1 <= final["pass@8"][bucket] <= 1.0
        # The pool's coverage only grows, and ends at the final value.
        cover = hist["eval_coverage"]
        assert cover == sorted(cover) and cover[-1] == final["coverage"] and 0.0 <= cover[0] <= cover[-1] <= 1.0
        assert 0.0 <= final["pool"]["pass@1"]["all"] <= final["pool"]["pass@8"]["all"] <= 1.0
        # The summary's entropies, recomputed from the history: the mean of the last 10 steps
        # (the window for runs up to 200 steps) and the minimum of such 10-step means.
        windows = [hist["entropy"][i - 10: i] for i in range(10, steps + 1)]
        summary = results["summary"][name]
        assert summary["H_late"] == pytest.approx(sum(windows[-1]) / 10, rel=1e-9)
        assert summary["H_min"] <= min(sum(w) / 10 for w in windows) + 1e-12
        assert summary["H_min"] <= summary["H_late"]
    # Every arm starts from the same warm-started weights, seeds and first batch.
    assert len({results["runs"][n][0]["history"]["entropy"][0] for n in arms}) == 1
    # Fixed arms keep their constant; AER's alpha stays within its clip range.
    assert set(results["runs"][f"fixed {runner.HIGH_COEF:g}"][0]["history"]["coef"]) == {runner.HIGH_COEF}
    aer = results["summary"]["AER"]
    aer_hist = results["runs"]["AER"][0]["history"]
    assert all(0.0 <= c <= results["aer"]["coef_max"] for c in aer_hist["coef"])
    # AER's target is its ratio times the initial entropy, and its late entropy is near it
    # (neither collapsed nor blown up), while the high fixed coefficient has pushed entropy above H0.
    assert aer["target"] == pytest.approx(results["aer"]["target_ratio"] * aer["H0"], rel=1e-6)
    assert 0.5 * aer["target"] <= aer["H_late"] <= 2.0 * aer["target"]
    assert results["summary"][f"fixed {runner.HIGH_COEF:g}"]["H_late"] > aer["H0"]
