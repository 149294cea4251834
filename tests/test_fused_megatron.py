"""verl's Megatron pair swapped for one vocabulary-parallel pass, on 2 gloo ranks.

verl's Megatron engine computes ``vocab_parallel_entropy`` and
``vocab_parallel_log_probs_from_logits`` on the tensor-parallel shard of the logits. With the
swap, ``entropy_reg.integrations.verl.fused.megatron_logprobs`` inside a ``PairedPass`` over the
tensor-parallel group serves both (the ``process_group=`` path). megatron-core is not installed
here (it is not in this project's test dependencies), so:

- stubbed: ``megatron.core.parallel_state`` with the one function verl's
  ``vocab_parallel_entropy`` calls, ``get_tensor_model_parallel_group``, returning the 2-rank
  gloo group (the group the engine would pass); ``torch.compile`` is switched off in the ranks
  (verl compiles one helper inside its entropy; the CPU compile is slow, eager gives the same math);
- compared: the entropy and its gradient against verl's own ``vocab_parallel_entropy`` on the
  same shards, and log-probs, entropy and the combined gradient against a float64 reference of
  the full vocabulary (verl's log-prob function is megatron-core's cross-entropy, not installable);
- not run: ``MegatronEngineWithLMHead._lm_head_logits_processor`` (its module imports megatron-core).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("verl", reason="install the extra: pip install 'entropy-reg[verl]'")

from tests.ranks import run_ranks  # noqa: E402

F64 = torch.float64


def _stub_parallel_state(group) -> None:
    core = types.ModuleType("megatron.core")
    state = types.ModuleType("megatron.core.parallel_state")
    state.get_tensor_model_parallel_group = lambda: group
    core.parallel_state = state
    sys.modules.update({"megatron": types.ModuleType("megatron"), "megatron.core": core,
                        "megatron.core.parallel_state": state})


def _check(rank: int, world: int) -> None:
    from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy

    from entropy_reg.integrations.fused import PairedPass, use
    from entropy_reg.integrations.verl.fused import megatron_logprobs

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(3)
    b, s, vl = 2, 5, 7
    full = torch.randn(b, s, vl * world, generator=g, dtype=F64) * 3
    labels = torch.randint(0, vl * world, (b, s), generator=g)
    ga, gb = torch.randn(b, s, generator=g, dtype=F64), torch.randn(b, s, generator=g, dtype=F64)
    sl = slice(rank * vl, (rank + 1) * vl)

    # float64 reference over the full vocabulary
    z = full.clone().requires_grad_()
    logp_all = z.log_softmax(-1)
    ref_logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    (ref_grad,) = torch.autograd.grad((ga * ref_logp + gb * ref_ent).sum(), z, retain_graph=True)
    (ref_grad_ent,) = torch.autograd.grad((gb * ref_ent).sum(), z)

    # verl's own entropy on this rank's shard (float32, as the engine holds it)
    x_verl = full[..., sl].float().requires_grad_()
    h_verl = vocab_parallel_entropy(x_verl.clone())
    (gb.float() * h_verl).sum().backward()

    for inplace in (False, True):
        # the swap: verl's log-prob call inside the pair; the entropy comes from the same pass
        leaf = full[..., sl].float().requires_grad_()
        x = leaf * 1.0  # a non-leaf, as the engine's logits are (in-place backward writes over it)
        with use(PairedPass(process_group=group, inplace_backward=inplace)) as pair:
            logp = megatron_logprobs(x, labels)
        ent = pair.entropy
        assert pair.passes == 1
        (ga.float() * logp + gb.float() * ent).sum().backward()
        torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, h_verl.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), ref_grad[..., sl], rtol=1e-4, atol=1e-5)

    # entropy-only gradient: the swap's equals verl's backward on the same shard
    leaf = full[..., sl].float().requires_grad_()
    with use(PairedPass(process_group=group)) as pair:
        megatron_logprobs(leaf * 1.0, labels)
    (gb.float() * pair.entropy).sum().backward()
    torch.testing.assert_close(leaf.grad, x_verl.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref_grad_ent[..., sl], rtol=1e-4, atol=1e-5)


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _stub_parallel_state(dist.group.WORLD)
        _check(rank, world)
    finally:
        dist.destroy_process_group()


def test_megatron_pair_matches_verls_vocab_parallel_entropy_and_float64():
    codes = run_ranks(_worker, 2, (), preload=["torch", "verl"], timeout=240)
    assert codes == [0, 0]
