"""The one-pass log-prob + entropy inside OpenRLHF 0.11.2's actor update (``entropy_reg.integrations.openrlhf.fused``).

Runs OpenRLHF's own ``Actor.forward`` (``openrlhf.models.actor``: float32 cast, in-place
temperature, ``compute_entropy``, ``log_probs_from_logits``) inside AER's ``ActorPPOTrainer``
subclass (OpenRLHF's ``training_step``, ``PolicyLoss``), loaded from the wheel as
tests/test_integration_openrlhf.py does. Stubbed: the Hugging Face model inside ``Actor``
(:class:`TinyLM`, embedding then head), the DeepSpeed strategy (``CPUStrategy``; its optimizer
step is plain SGD here) and the CUDA-only packages. References are float64.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from entropy_reg.integrations.openrlhf import CONFIG_ENV, WEIGHT_KEY, config_to_env
from entropy_reg.regularizer import AERConfig
from tests.test_integration_openrlhf import VOCAB, CPUStrategy, aer_term64, make_args, o, one_micro_batch  # noqa: F401

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]


class TinyLM(torch.nn.Module):
    """The model inside OpenRLHF's Actor: logits = emb[tokens] @ head (float32, as a CPU model returns)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, 6, generator=g))
        self.head = torch.nn.Parameter(torch.randn(6, VOCAB, generator=g))

    def forward(self, sequences, attention_mask=None, position_ids=None, **_):
        return CausalLMOutput(logits=self.emb[sequences] @ self.head)


def real_actor(temperature: float):
    actor = sys.modules["openrlhf.models.actor"].Actor(TinyLM(), temperature=temperature)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads a model by name
    return actor


def trainer_of(monkeypatch, o, actor, config: AERConfig, args):  # noqa: F811
    monkeypatch.setenv(CONFIG_ENV, config_to_env(config))
    monkeypatch.setattr(o.ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    strategy = CPUStrategy(args)
    trainer = o.actor.AERActorPPOTrainer(
        strategy, actor, ema_model=None, actor_optim=None,
        actor_scheduler=SimpleNamespace(get_last_lr=lambda: [0.0]), micro_train_batch_size=2,
        dataloader_pin_memory=False,
    )

    def sgd(*_, **__):
        with torch.no_grad():
            for p in actor.parameters():
                p -= 0.5 * p.grad
                p.grad = None

    strategy.optimizer_step = sgd
    return trainer


def reference(o, batch, temperature, alpha, agg, token_level):  # noqa: F811
    """float64 (policy loss + AER term, d/d(emb, head)) from the formulas, on TinyLM's weights."""
    lm = TinyLM().double()
    z = (lm.emb[batch.sequences] @ lm.head) / temperature
    logp_all = z.log_softmax(-1)
    logp = logp_all[:, :-1].gather(-1, batch.sequences[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    mask = batch.action_mask
    lp = logp[:, -mask.shape[1]:] * mask.double()
    policy = o.loss.PolicyLoss(token_level_loss=token_level)
    info = o.ppo_actor.get_loss_batch_info(SimpleNamespace(args=make_args(actor__loss_agg_mode=agg)), mask)
    pl = policy(lp, batch.action_log_probs.double(), batch.advantages.double(), action_mask=mask, **info)[0]
    term = aer_term64(ent, mask, torch.stack(batch.info[WEIGHT_KEY]), alpha, token_level)
    return pl, term, torch.autograd.grad(pl + term, [lm.emb, lm.head])


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("agg,token_level", [("token-mean", True), ("seq-mean-token-mean", False)])
def test_training_step_matches_float64(monkeypatch, o, swap, temperature, agg, token_level):  # noqa: F811
    """OpenRLHF's training_step through its real Actor.forward, swap on and off: the gradient reaching
    the model, OpenRLHF's policy_loss and AER's term equal the float64 reference."""
    alpha = 0.05
    actor = real_actor(temperature)
    args = make_args(actor__loss_agg_mode=agg)
    trainer = trainer_of(monkeypatch, o, actor, AERConfig(coef_init=alpha, coef_max=0.1, fused_entropy=swap), args)
    trainer.strategy.optimizer_step = lambda *a, **k: None  # keep the gradients to compare
    batch = one_micro_batch(o)
    status = trainer.training_step(batch, 0.0, 0, None)
    pl, term, ref_grads = reference(o, batch, temperature, alpha, agg, token_level)
    for p, r in zip([actor.model.emb, actor.model.head], ref_grads):
        torch.testing.assert_close(p.grad.double(), r, rtol=1e-4, atol=1e-7)
    assert status["metrics"]["policy_loss"].item() == pytest.approx(pl.item(), rel=1e-5, abs=1e-7)
    assert status["metrics"]["aer/loss"].item() == pytest.approx(term.item(), rel=1e-5)


def test_openrlhfs_entropy_function_is_not_called_with_the_swap(monkeypatch, o):  # noqa: F811
    """With the swap on, OpenRLHF's compute_entropy and log_probs_from_logits are not called in the
    actor update, and one kernel pass serves both; with it off they are (so this can fail)."""
    from entropy_reg.integrations import fused as shared
    from entropy_reg.integrations.openrlhf import fused

    calls: list[str] = []
    fused.install()
    for name in ("compute_entropy", "log_probs_from_logits"):
        original = fused._rebound.originals[name]
        monkeypatch.setitem(fused._rebound.originals, name, lambda *a, _n=name, _f=original: (calls.append(_n), _f(*a))[1])
    passes: list[int] = []
    run = shared.PairedPass.run
    monkeypatch.setattr(shared.PairedPass, "run", lambda self, *a, **k: (passes.append(1), run(self, *a, **k))[1])
    for swap in (True, False):
        calls.clear()
        passes.clear()
        trainer = trainer_of(monkeypatch, o, real_actor(0.7), AERConfig(fused_entropy=swap), make_args())
        trainer.training_step(one_micro_batch(o), 0.0, 0, None)
        if swap:
            assert calls == [] and passes == [1]
        else:
            assert calls == ["compute_entropy", "log_probs_from_logits"] and passes == []


def test_prompt_and_padding_rows_are_never_read(monkeypatch, o):  # noqa: F811
    """The pass computes only the response rows under action_mask: a NaN planted in the logits of a
    prompt or padding row changes nothing (OpenRLHF's own path would turn the loss NaN)."""
    batch = one_micro_batch(o)
    # Row 0 of sample 0 is a prompt row (action_mask[0, 0] is False); sample 1's last rows are padding.
    assert not batch.action_mask[0, 0] and not batch.action_mask[1, -1]
    actor = real_actor(1.0)
    original = actor.model.forward

    def forward(sequences, **kw):
        out = original(sequences, **kw)
        logits = out.logits.clone()
        logits[0, 0, 3] = float("nan")
        logits[1, -2, 5] = float("nan")
        return CausalLMOutput(logits=logits)

    actor.model.forward = forward
    trainer = trainer_of(monkeypatch, o, actor, AERConfig(coef_init=0.05, coef_max=0.1), make_args())
    trainer.strategy.optimizer_step = lambda *a, **k: None
    status = trainer.training_step(batch, 0.0, 0, None)
    pl, term, ref_grads = reference(o, batch, 1.0, 0.05, "token-mean", True)
    assert status["metrics"]["aer/loss"].item() == pytest.approx(term.item(), rel=1e-5)
    for p, r in zip([actor.model.emb, actor.model.head], ref_grads):
        torch.testing.assert_close(p.grad.double(), r, rtol=1e-4, atol=1e-7)


def test_three_steps_give_equal_parameters_on_and_off(monkeypatch, o):  # noqa: F811
    """Three training steps (SGD between them) through OpenRLHF's training_step: the parameters agree
    with --aer.fused_entropy true and false, and moved."""
    params = {}
    for swap in (True, False):
        actor = real_actor(0.7)
        trainer = trainer_of(monkeypatch, o, actor, AERConfig(coef_init=0.05, coef_max=0.1, fused_entropy=swap),
                             make_args())
        for step in range(3):
            trainer.training_step(one_micro_batch(o, seed=step), 0.0, step, None)
        params[swap] = [p.detach().clone() for p in actor.parameters()]
    start = list(TinyLM().parameters())
    assert not torch.equal(params[True][1], start[1].detach())
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_response_rows_checks_the_layout():
    from entropy_reg.integrations.openrlhf.fused import response_rows

    seq = torch.arange(12).view(2, 6)
    labels, rows = response_rows(seq, torch.tensor([[True, False, True], [True, True, True]]))
    assert labels.tolist() == torch.roll(seq, -1, 1).tolist()
    assert rows.tolist() == [[False, False, True, False, True, False], [False, False, True, True, True, False]]
    with pytest.raises(ValueError, match="action_mask"):
        response_rows(seq, torch.ones(2, 6, dtype=torch.bool))


def test_pair_refuses_labels_other_than_its_own():
    """The entropy call runs the pass with the labels derived from the batch; a log-prob call with
    other labels on the same logits raises instead of returning the wrong log-probs."""
    from entropy_reg.integrations.fused import PairedPass

    logits = torch.randn(2, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 5))
    pair = PairedPass(labels=labels)
    pair.entropy_of(logits)
    assert pair.logprobs_of(logits, labels.clone()) is pair.logprobs and pair.passes == 1
    with pytest.raises(RuntimeError, match="labels differ"):
        pair.logprobs_of(logits, (labels + 1) % VOCAB)


def test_the_switch_is_one_flag_and_checked():
    from entropy_reg.integrations.openrlhf.__main__ import parse_args
    from entropy_reg.regularizer import AdaptiveEntropyRegularizer

    flags = ["--rollout.n_samples_per_prompt", "4"]
    assert parse_args(flags)[0].fused_entropy is True  # on by default with AER
    assert parse_args(flags + ["--aer.fused_entropy", "false"])[0].fused_entropy is False
    with pytest.raises(TypeError, match="fused_entropy"):
        AdaptiveEntropyRegularizer(AERConfig(fused_entropy="no"))
