"""The paper's baselines (entropy_reg/demo/losses.py) against float64 computations written from
their published descriptions: PPO's decoupled clip (GRPO, Clip-Higher), the token covariance,
Clip-Cov's detached tokens and KL-Cov's penalty."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entropy_reg.demo.losses as losses
from entropy_reg.demo.losses import (
    CLIP_HIGH, clip_cov, clipped, kl_cov, policy_loss, token_covariance,
)


def _example(seed: int, b: int = 6, t: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[:, 0] = True
    return logp, old, adv, mask


def _ppo(lp: float, old: float, a: float, lo: float, hi: float) -> float:
    r = math.exp(lp - old)
    return -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_clipped_matches_scalar_ppo(seed: int) -> None:
    logp, old, adv, _ = _example(seed)
    for kind, lo, hi in (("grpo", 0.2, 0.2), ("clip-higher", 0.2, CLIP_HIGH)):
        got = policy_loss(kind, logp, old, adv, torch.ones_like(logp, dtype=torch.bool), torch.Generator())
        want = [[_ppo(*x, lo, hi) for x in zip(r1, r2, r3)]
                for r1, r2, r3 in zip(logp.tolist(), old.tolist(), adv.tolist())]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    # Clip-Higher lets a positive-advantage ratio grow further before the clip: 1.25 is inside it only.
    one = torch.tensor([[0.0]], dtype=torch.float64)
    up = torch.log(torch.tensor([[1.25]], dtype=torch.float64))
    assert clipped(up, one, one + 1, 0.2, 0.2).item() == pytest.approx(-1.2)
    assert clipped(up, one, one + 1, 0.2, CLIP_HIGH).item() == pytest.approx(-1.25)


def test_token_covariance_against_loops() -> None:
    logp, _, adv, mask = _example(3)
    cells = [(i, j) for i in range(6) for j in range(5) if mask[i, j]]
    mean_a = sum(adv[i, j].item() for i, j in cells) / len(cells)
    mean_l = sum(logp[i, j].item() for i, j in cells) / len(cells)
    cov = token_covariance(logp, adv, mask)
    for i in range(6):
        for j in range(5):
            if mask[i, j]:
                assert cov[i, j].item() == pytest.approx((adv[i, j].item() - mean_a) * (logp[i, j].item() - mean_l),
                                                         abs=1e-12)
            else:
                assert cov[i, j].item() == -math.inf


def test_clip_cov_detaches_one_in_band_token_and_keeps_the_rest() -> None:
    # Two tokens of covariance in (1, 5); the ratio is 1 so no token is clipped by PPO.
    logp = torch.tensor([[0.0, -4.0], [-2.0, -2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[2.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    cov = token_covariance(logp, adv, mask)
    # mean adv 0, mean logp -2: cov = adv * (logp + 2) -> [[4, -4], [0, 0]]: one token in (1, 5).
    assert cov.tolist() == [[4.0, -4.0], [0.0, 0.0]]
    loss = clip_cov(logp, logp.detach(), adv, mask, torch.Generator().manual_seed(0))
    loss.sum().backward()
    # d(-rho A)/d logp = -A at rho = 1; the in-band token's gradient is cut.
    assert logp.grad.tolist() == [[0.0, -2.0], [2.0, 2.0]]
    assert loss.detach().tolist() == [[0.0, -2.0], [2.0, 2.0]]


def test_clip_cov_selects_the_published_share_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1000 valid tokens, all in band: ratio 0.003 -> 3 tokens detached; 2e-4 -> 1 (the floor).
    logp = torch.zeros(1000, 1, dtype=torch.float64, requires_grad=True)
    adv = torch.ones(1000, 1, dtype=torch.float64)
    mask = torch.ones(1000, 1, dtype=torch.bool)
    cov = torch.full((1000, 1), 2.0, dtype=torch.float64)
    monkeypatch.setattr(losses, "token_covariance", lambda *a: cov)  # every token in (1, 5)
    for ratio, n in ((3e-3, 3), (2e-4, 1)):
        out = clip_cov(logp, logp.detach(), adv, mask, torch.Generator().manual_seed(1), ratio=ratio)
        assert int((out == 0).sum()) == n


def test_kl_cov_penalizes_the_top_covariance_tokens_without_clipping() -> None:
    logp, old, adv, mask = _example(7, b=20, t=5)
    logp.requires_grad_(True)
    out = kl_cov(logp, old, adv, mask, ratio=0.05, kl_coef=1.0)
    cov = token_covariance(logp, adv, mask).flatten()
    k = max(1, int(0.05 * int(mask.sum())))
    top = set(torch.topk(cov, k).indices.tolist())
    rho = torch.exp(logp.detach() - old)
    for idx in range(out.numel()):
        i, j = divmod(idx, 5)
        want = -rho[i, j].item() * adv[i, j].item()  # no clipping anywhere
        if idx in top:
            want += abs(logp[i, j].item() - old[i, j].item())
        assert out[i, j].item() == pytest.approx(want, abs=1e-12)
    assert all(mask.flatten()[i] for i in top)  # padding is never selected


def test_unknown_policy_loss_is_rejected() -> None:
    logp, old, adv, mask = _example(0)
    with pytest.raises(ValueError, match="policy loss must be one of"):
        policy_loss("ppo2", logp, old, adv, mask, torch.Generator())
