"""masked_mean / all_reduce_sum on real processes (gloo over loopback), plus single-process behaviour."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_reg.distributed import all_reduce_sum, as_count, as_scalar, masked_mean
from tests.ranks import run_ranks

WORLD = 3
STEPS = 4


def rank_data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's entropies and mask; shapes differ per rank, rank 2 has no valid token at step 0."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    shape = [(2, 5), (3, 4), (1, 7)][rank]
    values = torch.rand(shape, generator=g) * 3.0
    mask = torch.rand(shape, generator=g) < 0.7
    mask[0, 0] = rank != 2 or step != 0
    if rank == 2 and step == 0:
        mask[:] = False
        values[0, 1] = float("nan")  # padding NaN must not leak
    return values, mask


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    result: dict = {}
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        from entropy_reg.regularizer import AdaptiveEntropyRegularizer, AERConfig

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result["sum"] = all_reduce_sum(torch.tensor([rank + 1.0, 1.0])).tolist()
        reg = AdaptiveEntropyRegularizer(AERConfig(coef_lr=1e-3, warmup_steps=2, target_ratio=0.95))
        result["means"], result["coefs"] = [], []
        for step in range(STEPS):
            values, mask = rank_data(rank, step)
            h = masked_mean(values, mask)
            result["means"].append(h.item())
            reg.update(h)
            result["coefs"].append(reg.value)
        sub = dist.new_group([0, 1])
        if rank in (0, 1):
            values, mask = rank_data(rank, 1)
            result["sub"] = masked_mean(values, mask, group=sub).item()
        try:
            masked_mean(torch.ones(2), torch.zeros(2, dtype=torch.bool))
            result["empty"] = "no error"
        except ValueError as exc:
            result["empty"] = str(exc)
        dist.destroy_process_group()
    except Exception:  # report to the parent instead of hanging it
        result["error"] = traceback.format_exc()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def _reference_mean(ranks, step) -> float:
    total, count = 0.0, 0
    for r in ranks:
        v, m = rank_data(r, step)
        v, m = v.double().numpy(), m.numpy()
        total += float(v[m].sum())
        count += int(m.sum())
    return total / count


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(_worker, WORLD, [str(out)], ["torch", "entropy_reg.regularizer", "entropy_reg.distributed"], timeout=60)
    res = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)]
    for r in res:
        assert "error" not in r, r["error"]
    return res


def test_all_reduce_sum(results):
    for r in results:
        assert r["sum"] == [1.0 + 2.0 + 3.0, 3.0]


def test_masked_mean_is_global_and_identical(results):
    for step in range(STEPS):
        want = _reference_mean(range(WORLD), step)
        got = [r["means"][step] for r in results]
        assert got[0] == got[1] == got[2]  # bit-identical on every rank
        assert got[0] == pytest.approx(want, rel=1e-6)


def test_coefficients_identical_across_ranks(results):
    coefs = [r["coefs"] for r in results]
    assert coefs[0] == coefs[1] == coefs[2]
    assert coefs[0][-1] > 0.0  # the loop did move alpha (entropy fell below target at some step)


def test_subgroup(results):
    want = _reference_mean([0, 1], 1)
    assert results[0]["sub"] == results[1]["sub"] == pytest.approx(want, rel=1e-6)
    assert "sub" not in results[2]


def test_empty_everywhere_raises_on_every_rank(results):
    for r in results:
        assert "mask" in r["empty"] and "no valid" in r["empty"]


def test_single_process_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 9, generator=g)
    m = torch.rand(4, 9, generator=g) < 0.5
    want = v.double().numpy()[m.numpy()].mean()
    out = masked_mean(v, m)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(want, rel=1e-6)
    assert masked_mean(v).item() == pytest.approx(v.double().mean().item(), rel=1e-6)
    assert masked_mean(v, m.int()).item() == pytest.approx(want, rel=1e-6)


def test_single_process_no_grad_and_nan_propagates():
    v = torch.tensor([1.0, float("nan")], requires_grad=True)
    assert not masked_mean(v, torch.tensor([True, False])).requires_grad
    assert masked_mean(v, torch.tensor([True, False])).item() == 1.0
    assert np.isnan(masked_mean(v).item())  # NaN in a valid entry is not hidden


@pytest.mark.parametrize(
    "values, mask, name, error",
    [
        ([1.0], None, "values", TypeError),
        (torch.ones(3), torch.ones(2, dtype=torch.bool), "mask", ValueError),
        (torch.ones(3), [True, True, True], "mask", TypeError),
        (torch.ones(3), torch.zeros(3, dtype=torch.bool), "mask", ValueError),
        (torch.ones(0), None, "mask", ValueError),
    ],
)
def test_masked_mean_bad_input(values, mask, name, error):
    with pytest.raises(error, match=name):
        masked_mean(values, mask)


def test_scalar_helpers():
    assert as_scalar(torch.tensor([2.5]), "x") == 2.5
    assert as_scalar(np.float32(0.5), "x") == 0.5
    assert as_scalar(np.array(3), "x") == 3.0
    assert as_count(np.int64(3), "n") == 3
    bad_inputs = [
        (True, TypeError),
        (torch.tensor(True), TypeError),
        ("1", TypeError),
        (np.ones(2), ValueError),
        (float("nan"), ValueError),
    ]
    for bad, error in bad_inputs:
        with pytest.raises(error, match="x"):
            as_scalar(bad, "x")
    with pytest.raises(ValueError, match="x"):
        as_scalar(0.0, "x", low=0.0, low_inclusive=False)
    with pytest.raises(ValueError, match="x"):
        as_scalar(2.0, "x", high=1.0)
    with pytest.raises(TypeError, match="n"):
        as_count(2.0, "n")
