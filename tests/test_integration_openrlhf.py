"""AER for OpenRLHF on tensors shaped as OpenRLHF's ``Experience``; against its real ``aggregate_loss``
when the OpenRLHF 0.11.2 wheel is in ``.cache/openrlhf/`` (``make test`` downloads it, no dependencies)."""

from __future__ import annotations

import glob
import os
import sys
import types
import zipfile
from dataclasses import dataclass, field

import pytest
import torch

from entropy_reg.integrations.openrlhf import (
    STATE_KEY,
    WEIGHT_KEY,
    OpenRLHFAER,
    attach_weights,
    prompt_groups,
)
from entropy_reg.difficulty import DifficultyAllocator
from entropy_reg.regularizer import AdaptiveEntropyRegularizer, AERConfig

N_SAMPLES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Experience:
    """The fields of OpenRLHF's ``Experience`` that AER reads (same shapes and meaning)."""

    sequences: torch.Tensor  # (B, S) prompt + response token ids
    action_mask: torch.Tensor  # (B, A) bool, response tokens
    rewards: torch.Tensor  # (B,)
    index: list[int]  # each sample's position in prompt order
    info: dict = field(default_factory=dict)


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def rollout(seed: int = 0):
    """3 prompts x 4 samples, shuffled across two experiences as OpenRLHF's dynamic batching leaves them."""
    g = torch.Generator().manual_seed(seed)
    solved = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32)  # by prompt order
    order = torch.randperm(12, generator=g).tolist()
    exps = []
    for part in (order[:5], order[5:]):
        b, s, a = len(part), 9, 5
        exps.append(Experience(
            sequences=torch.randint(0, 50, (b, s), generator=g),
            action_mask=torch.ones(b, a, dtype=torch.bool),
            rewards=solved[part].clone(),
            index=list(part),
        ))
    return exps, solved


def test_weights_group_by_n_samples_per_prompt():
    exps, solved = rollout()
    metrics = attach_weights(exps, N_SAMPLES, DifficultyAllocator())
    # Reference in prompt order: OpenRLHF's rewards.reshape(-1, n) groups, linear rule, mean-1 normalization.
    acc = solved.double().reshape(-1, N_SAMPLES).mean(-1)
    w_prompt_order = (1 - acc).repeat_interleave(N_SAMPLES)
    w_prompt_order = w_prompt_order * w_prompt_order.numel() / w_prompt_order.sum()
    for e in exps:
        torch.testing.assert_close(e.info[WEIGHT_KEY].double(), w_prompt_order[e.index], rtol=1e-6, atol=0)
    assert metrics["aer/difficulty/accuracy"] == pytest.approx(acc.mean().item())
    assert prompt_groups([0, 3, 4, 11], 4).tolist() == [0, 0, 1, 2]
    # A regularizer's allocator serves as well; anything else is refused.
    attach_weights(exps, N_SAMPLES, AdaptiveEntropyRegularizer(AERConfig(difficulty_rule="uniform")))
    assert all(torch.equal(e.info[WEIGHT_KEY], torch.ones(len(e.index))) for e in exps)
    with pytest.raises(TypeError, match="allocator"):
        attach_weights(exps, N_SAMPLES, AERConfig())


def make_micro_batch(seed: int = 1, b: int = 3, s: int = 10, a: int = 6, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, s - 1, v, generator=g) * 2).requires_grad_(True)  # output.entropy covers S-1 positions
    mask = torch.zeros(b, a, dtype=torch.bool)
    for i, n in enumerate([6, 2, 0][:b]):  # the last sample is fully masked
        mask[i, :n] = True
    weights = [torch.tensor(x) for x in (0.5, 2.0, 1.0)[:b]]  # as make_experience_batch re-batches info
    return logits, mask, weights


def reference(logits, mask, weights, alpha, token_level, *, dp=1, tokens=None, seqs=None):
    a = mask.shape[1]
    h = entropy64(logits)[:, -a:]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)[:, None]
    x = alpha * w * h * mask
    if token_level:
        return -(x.sum() / (mask.sum() if tokens is None else tokens) * dp)
    n = mask.sum(-1).double()
    per_seq = torch.where(n > 0, x.sum(-1) / n.clamp(min=1), torch.zeros_like(n))
    return -(per_seq.sum() / ((n > 0).sum() if seqs is None else seqs) * dp)


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("global_info", [False, True])
def test_loss_matches_reference_and_reaches_logits(token_level, global_info):
    logits, mask, weights = make_micro_batch()
    aer = OpenRLHFAER(AERConfig(coef_init=0.003), token_level_loss=token_level)
    info = None
    kw = {}
    if global_info:  # this rank's share of a 2-rank step, as OpenRLHF's get_loss_batch_info gives it
        info = {"dp_size": 2, "batch_num_tokens": torch.tensor(20.0), "global_batch_size": torch.tensor(5.0)}
        kw = {"dp": 2, "tokens": 20.0, "seqs": 5.0}
    h = entropy64(logits).float()
    term = aer.loss(h, mask, weights, info)
    ref = reference(logits.detach(), mask, weights, 0.003, token_level, **kw)
    assert term.item() == pytest.approx(ref.item(), rel=1e-5)
    (g,) = torch.autograd.grad(term, logits)
    leaf = logits.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(reference(leaf, mask, weights, 0.003, token_level, **kw), leaf)
    assert g.abs().sum() > 0 and g[2].abs().sum() == 0  # the fully masked sample gets no gradient
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-10)


def test_step_updates_once_from_all_micro_batches():
    aer = OpenRLHFAER(AERConfig(coef_init=0.001, target_ratio=0.5))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    aer.loss(torch.tensor([[9.0, 1.0, 2.0, 99.0], [9.0, 4.0, 99.0, 99.0]]), mask, torch.ones(2))
    aer.loss(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), [1.0])
    m = aer.step()
    # token mean over both micro-batches: (1 + 2 + 4 + 1 + 1 + 1) / 6, prompt columns and padding excluded
    assert m["aer/entropy"] == pytest.approx(10 / 6)
    assert m["aer/anchor"] == pytest.approx(10 / 6)
    with pytest.raises(ValueError, match="nothing was added"):
        aer.step()  # each step needs its own entropy


def test_client_states_round_trip():
    aer = OpenRLHFAER(AERConfig(coef_init=0.001))
    for h in (2.0, 0.3):
        aer.loss(torch.full((2, 4), h), torch.ones(2, 3, dtype=torch.bool), torch.ones(2))
        aer.step()
    client_states = aer.save_to({"consumed_samples": 64})
    assert client_states["consumed_samples"] == 64 and STATE_KEY in client_states
    resumed = OpenRLHFAER(AERConfig(coef_init=0.001))
    assert resumed.load_from(client_states)
    assert resumed.regularizer.state_dict() == aer.regularizer.state_dict()
    assert not OpenRLHFAER().load_from({})


def test_bad_inputs_name_the_argument():
    aer = OpenRLHFAER()
    with pytest.raises(ValueError, match="weights"):
        aer.loss(torch.ones(2, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(3))
    with pytest.raises(ValueError, match="action_mask"):
        aer.loss(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.bool), torch.ones(2))
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        prompt_groups([0, 1], 0)
    with pytest.raises(TypeError, match="token_level_loss"):
        OpenRLHFAER(token_level_loss="token-mean")
    assert aer.window.empty  # nothing half-added by the failed calls


def _openrlhf_loss_module():
    """OpenRLHF 0.11.2's real ``openrlhf/models/loss.py`` (and the ``utils.py`` it imports), read from
    the wheel; ``deepspeed`` is stubbed, as OpenRLHF's own CPU tests do (utils imports it at the top)."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".cache", "openrlhf", "openrlhf-0.11.2-*.whl")))
    if not wheels:
        pytest.skip("OpenRLHF wheel not in .cache/openrlhf (make test downloads it)")
    pkg_name = "_openrlhf_models"
    if f"{pkg_name}.loss" in sys.modules:
        return sys.modules[f"{pkg_name}.loss"]
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = []
    sys.modules[pkg_name] = pkg
    # The stub is visible only while the two modules execute: left in sys.modules it would break
    # libraries that probe for deepspeed later in the session (transformers' find_spec).
    stub = "deepspeed" not in sys.modules
    if stub:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in ("utils", "loss"):
                src = zf.read(f"openrlhf-0.11.2.data/purelib/openrlhf/models/{name}.py").decode()
                mod = types.ModuleType(f"{pkg_name}.{name}")
                mod.__package__ = pkg_name
                sys.modules[mod.__name__] = mod
                exec(compile(src, f"openrlhf/models/{name}.py", "exec"), mod.__dict__)
    finally:
        if stub:
            del sys.modules["deepspeed"]
    return sys.modules[f"{pkg_name}.loss"]


# OpenRLHF's utils.py decorates compute_entropy with torch.compile, whose import warns about torch.jit.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("token_level", [True, False])
def test_matches_openrlhf_aggregate_loss(token_level):
    loss_mod = _openrlhf_loss_module()
    logits, mask, weights = make_micro_batch(seed=3)
    h = entropy64(logits).float()
    info = {"dp_size": 2, "batch_num_tokens": torch.tensor(17.0), "global_batch_size": torch.tensor(4.0)}
    aer = OpenRLHFAER(AERConfig(coef_init=0.002), token_level_loss=token_level)
    ours = aer.loss(h, mask, weights, info)
    c = 0.002 * torch.stack(weights).float()[:, None]
    theirs = -loss_mod.aggregate_loss(h[:, -mask.shape[1]:] * c, mask, token_level_loss=token_level, **info)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def _rank_step(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        aer = OpenRLHFAER(AERConfig(coef_init=0.001, initial_entropy=2.0))
        # Rank 0 sees 1 token of entropy 0.5, rank 1 sees 3 tokens of entropy 1.5: global mean 1.25.
        n, h = (1, 0.5) if rank == 0 else (3, 1.5)
        aer.loss(torch.full((1, n), h), torch.ones(1, n, dtype=torch.bool), [1.0])
        m = aer.step()
        torch.save({"entropy": m["aer/entropy"], "coef": m["aer/coef"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_step_all_reduces_so_every_rank_holds_the_same_coefficient(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (spawn would re-import torch in each).
    mp.start_processes(_rank_step, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["entropy"] == pytest.approx(1.25) and r1["entropy"] == r0["entropy"]
    assert r0["coef"] == r1["coef"] and r0["coef"] != 0.001  # target 1.0 < 1.25: alpha moved, identically
