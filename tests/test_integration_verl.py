"""AER in verl: against the real ``verl`` package (ppo_loss, agg_loss, DataProto, GRPO), on the CPU.

References are float64 and written from the formulas: the entropy of response
token t of sample i is the entropy of the logits row that predicts it (row
``prompt_len_i - 1 + t`` of that sample's packed sequence).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="install the extra: pip install 'entropy-reg[verl]'")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from entropy_reg.integrations import STATE_FILE  # noqa: E402
from entropy_reg.integrations.verl import (  # noqa: E402
    COEF_KEY,
    AERLoss,
    VerlAER,
    make_loss_fn,
)
from entropy_reg.regularizer import AERConfig  # noqa: E402

V = 13  # vocabulary
P, R = 4, 6  # padded prompt and response lengths
PROMPT_LENS = [4, 2, 3, 4, 1, 4]
RESP_LENS = [6, 3, 1, 5, 6, 2]
B = len(PROMPT_LENS)
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, float64, per row (nats)."""
    z = logits.double()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def actor_config(mode: str, **kw) -> ActorConfig:
    kw.setdefault("calculate_entropy", True)
    return ActorConfig(
        strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=2,
        loss_agg_mode=mode, **kw,
    )


def make_inputs(padding: str, seed: int = 0, rows: list[int] | None = None):
    """verl's worker inputs for samples ``rows``: (data TensorDict, per-sample logits, coef, mask).

    padding="dense": prompts/responses/attention_mask padded (left_right_2_no_padding of a DataProto,
    the RayPPOTrainer path); "nested": prompts/responses/response_mask as jagged tensors (the
    TransferQueue trainer path).
    """
    g = torch.Generator().manual_seed(seed)
    rows = list(range(B)) if rows is None else rows
    plen = [PROMPT_LENS[i] for i in rows]
    rlen = [RESP_LENS[i] for i in rows]
    n = len(rows)
    all_logits = [torch.randn(PROMPT_LENS[i] + RESP_LENS[i], V, generator=g) * 2 for i in range(B)]
    all_coef = torch.rand(B, generator=g) * 0.01
    logits = [all_logits[i].clone().requires_grad_(True) for i in rows]
    coef = all_coef[rows]
    resp_mask = torch.zeros(n, R, dtype=torch.long)
    for k, r in enumerate(rlen):
        resp_mask[k, :r] = 1
    old = torch.randn(n, R, generator=g)
    adv = torch.randn(n, R, generator=g)
    if padding == "dense":
        prompts = torch.zeros(n, P, dtype=torch.long)
        attn = torch.zeros(n, P + R, dtype=torch.long)
        responses = torch.zeros(n, R, dtype=torch.long)
        for k, (p, r) in enumerate(zip(plen, rlen)):
            prompts[k, P - p:] = torch.randint(1, V, (p,), generator=g)
            responses[k, :r] = torch.randint(1, V, (r,), generator=g)
            attn[k, P - p:P + r] = 1
        pos = torch.clamp(attn.cumsum(-1) - 1, min=0)
        batch = DataProto.from_single_dict({
            "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attn, "position_ids": pos, "response_mask": resp_mask,
            "old_log_probs": old, "advantages": adv, COEF_KEY: coef,
        })
        data = left_right_2_no_padding(batch.to_tensordict())
        offsets = data["input_ids"].offsets()
    else:
        def jag(ts):
            return torch.nested.as_nested_tensor(ts, layout=torch.jagged)

        prompts = jag([torch.randint(1, V, (p,), generator=g) for p in plen])
        responses = jag([torch.randint(1, V, (r,), generator=g) for r in rlen])
        input_ids = jag([torch.cat([a, b]) for a, b in zip(prompts.unbind(), responses.unbind())])
        data = tu.get_tensordict({
            "prompts": prompts, "responses": responses, "input_ids": input_ids,
            "response_mask": jag([torch.ones(r, dtype=torch.long) for r in rlen]),
            "old_log_probs": jag([old[k, :r] for k, r in enumerate(rlen)]),
            "advantages": jag([adv[k, :r] for k, r in enumerate(rlen)]),
            COEF_KEY: coef,
        })
        offsets = input_ids.offsets()
    return data, logits, coef, resp_mask.bool(), offsets


def model_output(logits: list[torch.Tensor], offsets: torch.Tensor) -> dict:
    """What verl's engine returns: log_probs and entropy as jagged tensors over prompt + response."""
    flat = torch.cat(logits)
    labels = torch.randint(0, V, (flat.shape[0],), generator=torch.Generator().manual_seed(7))
    logp = torch.log_softmax(flat.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    ent = entropy64(flat).float()
    return {
        "log_probs": torch.nested.nested_tensor_from_jagged(logp, offsets),
        "entropy": torch.nested.nested_tensor_from_jagged(ent, offsets),
    }


def reference_term(mode, logits, coef, mask, rows, *, dp=1, tokens=None, seqs=None, scale=None):
    """-agg(c_i H_it) in float64, from the formulas of each loss_agg_mode."""
    h = torch.zeros(len(rows), R, dtype=torch.float64)
    for k, i in enumerate(rows):
        p, r = PROMPT_LENS[i], RESP_LENS[i]
        h[k, :r] = entropy64(logits[k][p - 1:p - 1 + r])
    x = coef.double()[:, None] * h * mask
    n_i = mask.sum(-1).double()
    tokens = mask.sum() if tokens is None else tokens
    seqs = (n_i > 0).sum() if seqs is None else seqs
    if mode == "token-mean":
        agg = x.sum() / tokens * dp
    elif mode == "token-sum":
        agg = x.sum() * dp
    elif mode == "seq-mean-token-mean":
        agg = (x.sum(-1) / n_i).sum() / seqs * dp
    else:
        agg = x.sum() / seqs * dp
        if mode == "seq-mean-token-sum-norm":
            agg = agg / (R if scale is None else scale)
    return -agg


def set_global(data, *, dp, tokens, seqs):
    tu.assign_non_tensor(data, dp_size=dp, batch_num_tokens=tokens, global_batch_size=seqs)


@pytest.mark.parametrize("padding", ["dense", "nested"])
@pytest.mark.parametrize("mode", MODES)
def test_aer_term_equals_reference_and_reaches_logits(padding, mode):
    rows = list(range(B))
    data, logits, coef, mask, offsets = make_inputs(padding)
    set_global(data, dp=1, tokens=None, seqs=None)
    cfg = actor_config(mode, loss_scale_factor=None)
    out = model_output(logits, offsets)
    total, metrics = make_loss_fn(cfg, fused_entropy=False)(model_output=out, data=data)
    base, _ = ppo_loss(cfg, model_output(logits, offsets), data)
    term = total - base
    ref = reference_term(mode, [l.detach() for l in logits], coef, mask, rows)
    assert term.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-9)
    assert metrics["actor/aer/bonus"].aggregate() == pytest.approx(-ref.item(), rel=1e-5, abs=1e-9)
    # The gradient of the AER term reaches every logits row it reads, as the float64 reference's does.
    (g,) = torch.autograd.grad(term, logits[0], retain_graph=True)
    leaf = logits[0].detach().double().requires_grad_(True)
    ref_lg = [leaf] + [l.detach() for l in logits[1:]]
    (g_ref,) = torch.autograd.grad(reference_term(mode, ref_lg, coef, mask, rows), leaf)
    assert g.abs().sum() > 0
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_average_to_the_full_batch(mode):
    """With dp_size=2 and verl's global counts, the mean of the ranks' terms (what gradient
    averaging sees) is the single-process term over the whole batch: token-mean stays exact."""
    halves = [[0, 4], [1, 2, 3, 5]]  # uneven, as dynamic batching makes them
    _, all_logits, all_coef, all_mask, _ = make_inputs("dense")
    full = reference_term(mode, [l.detach() for l in all_logits], all_coef, all_mask, list(range(B)), scale=R)
    tokens = float(sum(RESP_LENS))
    ranks = []
    for rows in halves:
        data, logits, coef, mask, offsets = make_inputs("dense", rows=rows)
        set_global(data, dp=2, tokens=tokens, seqs=B)
        cfg = actor_config(mode, loss_scale_factor=R)
        total, _ = make_loss_fn(cfg, fused_entropy=False)(model_output=model_output(logits, offsets), data=data)
        base, _ = ppo_loss(cfg, model_output(logits, offsets), data)
        ranks.append((total - base).item())
    assert sum(ranks) / 2 == pytest.approx(full.item(), rel=1e-5, abs=1e-9)


def grpo_batch(seed: int = 0):
    """A DataProto after rewards: 4 prompts x 4 responses, 0/1 score on the last response token."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array([f"prompt-{k}" for k in (3, 0, 2, 1) for _ in range(4)], dtype=object)
    solved = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1], dtype=torch.float32)
    n, t = len(uids), 5
    lens = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lens[:, None]).long()
    scores = torch.zeros(n, t)
    scores[torch.arange(n), lens - 1] = solved
    perm = torch.randperm(n, generator=g)  # responses of a prompt need not be adjacent
    batch = DataProto.from_single_dict({"token_level_scores": scores[perm], "response_mask": mask[perm]})
    batch.non_tensor_batch["uid"] = uids[perm.numpy()]
    return batch


def test_coefficients_follow_grpo_groups():
    batch = grpo_batch()
    aer = VerlAER(AERConfig(coef_init=0.004))
    metrics = aer.attach(batch)
    coef = batch.batch[COEF_KEY].double()
    # Group accuracy recovered from verl's own GRPO advantages (no std normalization): adv = score - group mean.
    adv, _ = compute_grpo_outcome_advantage(
        token_level_rewards=batch.batch["token_level_scores"], response_mask=batch.batch["response_mask"],
        index=batch.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=False,
    )
    score = batch.batch["token_level_scores"].sum(-1).double()
    acc = score - adv[:, 0].double()
    w = 1.0 - acc  # the "linear" rule, normalized to mean 1 over the responses
    expected = 0.004 * w * len(w) / w.sum()
    torch.testing.assert_close(coef, expected, rtol=1e-6, atol=1e-9)
    assert metrics["actor/aer/coef"] == pytest.approx(0.004)
    assert metrics["actor/aer/difficulty/solved_groups"] == pytest.approx(0.25)
    assert metrics["actor/aer/coef_mean"] == pytest.approx(0.004, rel=1e-6)
    # The key survives verl's conversion to the workers' TensorDict, sample for sample.
    td = left_right_2_no_padding(_with_sequences(batch).to_tensordict())
    torch.testing.assert_close(td[COEF_KEY], batch.batch[COEF_KEY])


def _with_sequences(batch: DataProto) -> DataProto:
    n, t = batch.batch["response_mask"].shape
    batch.batch["input_ids"] = torch.ones(n, 2 + t, dtype=torch.long)
    batch.batch["attention_mask"] = torch.cat([torch.ones(n, 2, dtype=torch.long), batch.batch["response_mask"]], 1)
    batch.batch["position_ids"] = torch.arange(2 + t).expand(n, -1).clone()
    return batch


def test_update_moves_coefficient_toward_target():
    aer = VerlAER(AERConfig(coef_init=0.001, target_ratio=0.5))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    high = torch.tensor([[2.0, 2.0, 99.0], [2.0, 2.0, 2.0]])  # padding (99) must not count
    m1 = aer.update(high, mask)
    assert m1["actor/aer/anchor"] == pytest.approx(2.0)
    low = torch.full((2, 3), 0.2)
    m2 = aer.update(low, mask)
    assert m2["actor/aer/coef"] > m1["actor/aer/coef"]  # 0.2 nats is below the 1.0 target: more bonus
    assert m2["actor/aer/entropy"] == pytest.approx(0.2, rel=1e-6)


def test_checkpoint_beside_global_step(tmp_path):
    aer = VerlAER(AERConfig(coef_init=0.001))
    mask = torch.ones(2, 3)
    aer.update(torch.full((2, 3), 1.5), mask)
    aer.update(torch.full((2, 3), 0.4), mask)
    folder = tmp_path / "global_step_2"
    path = aer.save(folder)
    assert path == str(folder / STATE_FILE)
    resumed = VerlAER(AERConfig(coef_init=0.001))
    assert resumed.load(folder)
    assert resumed.regularizer.state_dict() == aer.regularizer.state_dict()
    nxt = torch.full((2, 3), 0.5)
    assert resumed.update(nxt, mask) == aer.update(nxt, mask)
    assert VerlAER().load(tmp_path / "global_step_9", missing_ok=True) is False
    with pytest.raises(FileNotFoundError):
        VerlAER().load(tmp_path / "global_step_9")


def test_loss_fn_refuses_double_bonus_and_missing_inputs():
    with pytest.raises(ValueError, match="entropy_coeff"):
        make_loss_fn(actor_config("token-mean", entropy_coeff=0.001))
    with pytest.raises(ValueError, match="calculate_entropy must be True"):
        make_loss_fn(actor_config("token-mean", calculate_entropy=False))
    fn = make_loss_fn(actor_config("token-mean"))
    data, logits, _, _, offsets = make_inputs("dense")
    set_global(data, dp=1, tokens=None, seqs=None)
    out = model_output(logits, offsets)
    no_entropy = {"log_probs": out["log_probs"]}
    with pytest.raises(ValueError, match="calculate_entropy"):
        fn(model_output=no_entropy, data=data)
    with pytest.raises(KeyError, match=COEF_KEY):
        fn(model_output=out, data=data.exclude(COEF_KEY))
    with pytest.raises(KeyError, match="uid"):
        VerlAER().attach(DataProto.from_single_dict({"token_level_scores": torch.ones(2, 3)}))


def test_prefix_names_the_worker_metric():
    """VerlAER(prefix=...) names the driver metrics and the worker's bonus metric alike."""
    data, logits, _, _, offsets = make_inputs("nested")
    set_global(data, dp=1, tokens=None, seqs=None)
    cfg = actor_config("token-mean")
    fn = VerlAER(prefix="run7/aer/").loss_fn(cfg)
    _, metrics = fn(model_output=model_output(logits, offsets), data=data)
    assert "run7/aer/bonus" in metrics and "actor/aer/bonus" not in metrics
    _, metrics = make_loss_fn(cfg, prefix="p/", fused_entropy=False)(model_output=model_output(logits, offsets), data=data)
    assert "p/bonus" in metrics
    assert "run7/aer/coef" in VerlAER(prefix="run7/aer/").update(torch.ones(1, 2), torch.ones(1, 2))


def test_loss_keeps_the_loss_verl_would_have_chosen():
    """ppo_loss without distillation, distillation_ppo_loss with it (as ActorRolloutRefWorker.init_model
    picks); whatever the base, the result is base + the AER term, and distillation's top-k logits
    processor call (student_logits=...) reaches the base untouched."""
    import pickle
    from types import SimpleNamespace

    from verl.trainer.distillation import distillation_ppo_loss

    cfg = actor_config("seq-mean-token-mean")
    plain = make_loss_fn(cfg, SimpleNamespace(enabled=False))
    assert isinstance(plain, AERLoss) and plain.base.func is ppo_loss and plain.base.keywords["config"] is cfg
    distill = SimpleNamespace(enabled=True)
    fn = make_loss_fn(cfg, distill)
    assert fn.base.func is distillation_ppo_loss and fn.base.keywords["distillation_config"] is distill
    assert pickle.loads(pickle.dumps(plain)).base.func is ppo_loss  # Ray pickles it to the workers

    calls = []

    def base(**kwargs):
        calls.append(kwargs)
        if kwargs.get("student_logits") is not None:
            return {"topk_loss": torch.zeros(3)}
        return torch.tensor(0.25, dtype=torch.float64), {"distillation/loss": 0.25}

    data, logits, coef, mask, offsets = make_inputs("nested")
    set_global(data, dp=1, tokens=None, seqs=None)
    wrapped = AERLoss(base, cfg)
    out = wrapped(student_logits=torch.ones(1, 3, V), data=data)
    assert set(out) == {"topk_loss"} and calls[-1]["student_logits"].shape == (1, 3, V)
    total, metrics = wrapped(model_output=model_output(logits, offsets), data=data, dp_group=None)
    ref = reference_term("seq-mean-token-mean", [l.detach() for l in logits], coef, mask, list(range(B)))
    assert total.item() == pytest.approx(0.25 + ref.item(), rel=1e-6)
    assert metrics["distillation/loss"] == 0.25 and "actor/aer/bonus" in metrics
    assert calls[-1]["dp_group"] is None and "student_logits" not in calls[-1]


def test_padding_rows_take_no_part_in_the_allocation():
    """verl v1's synthetic padding samples: coefficient 0, and the real rows get exactly what they
    would get without the padding (the mean-1 normalization is over real rows only)."""
    batch = grpo_batch()
    scores = batch.batch["token_level_scores"].sum(-1)
    uid = batch.non_tensor_batch["uid"]
    n = len(uid)
    pad = 3
    all_scores = torch.cat([scores, torch.zeros(pad)])
    all_uid = np.concatenate([uid, np.array(["pad-x"] * pad, dtype=object)])
    valid = np.array([True] * n + [False] * pad)
    aer = VerlAER(AERConfig(coef_init=0.003))
    coef, metrics = aer.coefficients(all_scores, all_uid, valid)
    alone, _ = VerlAER(AERConfig(coef_init=0.003)).coefficients(scores, uid)
    assert torch.equal(coef[:n], alone) and torch.equal(coef[n:], torch.zeros(pad))
    assert coef[:n].double().mean().item() == pytest.approx(0.003, rel=1e-6)
    assert metrics["actor/aer/coef_mean"] == pytest.approx(0.003, rel=1e-6)
    with pytest.raises(ValueError, match="one per response"):
        aer.coefficients(all_scores, all_uid, valid[:-1])


def test_checkpoint_callback_saves_then_runs_the_users_callback(tmp_path):
    """AERCheckpointCallback writes aer_state.json, then calls the callback verl built from the
    user's trainer.checkpoint_callback_class with the same arguments."""
    from types import SimpleNamespace

    from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

    from entropy_reg.integrations.verl import AERCheckpointCallback

    calls = []

    class UserCallback(CheckpointCallback):
        def on_save(self, trainer, global_step, checkpoint_dir, async_save=False, **kwargs):
            calls.append((global_step, checkpoint_dir, async_save, (tmp_path / "global_step_3" / STATE_FILE).exists()))

    trainer = SimpleNamespace(aer=VerlAER(AERConfig(coef_init=0.004)))
    callback = AERCheckpointCallback(config=None, inner=UserCallback())
    callback.on_save(trainer=trainer, global_step=3, checkpoint_dir=str(tmp_path / "global_step_3"), async_save=True)
    assert calls == [(3, str(tmp_path / "global_step_3"), True, True)]
    restored = VerlAER()
    assert restored.load(tmp_path / "global_step_3") and restored.regularizer.value == 0.004
    with pytest.raises(TypeError, match="no VerlAER"):
        callback.on_save(trainer=SimpleNamespace(), global_step=4, checkpoint_dir=str(tmp_path / "global_step_4"))
    assert not (tmp_path / "global_step_4").exists() and len(calls) == 1
