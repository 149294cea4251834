"""AER in TRL: real ``GRPOTrainer`` runs on the CPU with a tiny random causal LM and a local tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("trl", reason="install the extra: pip install 'entropy-reg[trl]'")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from entropy_reg.integrations import STATE_FILE  # noqa: E402
from entropy_reg.integrations.trl import WEIGHTS_KEY, AERGRPOTrainer  # noqa: E402
from entropy_reg.regularizer import AERConfig  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
GROUP = 4


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def reward_has_a(completions, **kwargs):
    """1 when the completion contains the word "a": some groups mix, some do not."""
    return [1.0 if "a" in c.split() else 0.0 for c in completions]


def make_trainer(tmp_path, *, max_steps, aer, **overrides) -> AERGRPOTrainer:
    tok = tokenizer()
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=GROUP,
        gradient_accumulation_steps=2, num_generations=GROUP, max_completion_length=6, learning_rate=1e-2,
        logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, bf16=False,
        seed=0, beta=0.0, temperature=1.0, disable_tqdm=True, dataloader_num_workers=0,
        **overrides,
    )
    data = Dataset.from_dict({"prompt": ["b c", "d e", "f g", "h b", "c d", "e f"] * 4})
    return AERGRPOTrainer(model=model(tok), reward_funcs=reward_has_a, args=args, train_dataset=data,
                          processing_class=tok, aer=aer)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two optimizer steps, a checkpoint at step 2; the warm-up anchors on step 1's entropy."""
    out = tmp_path_factory.mktemp("grpo")
    trainer = make_trainer(out, max_steps=2, aer=AERConfig(coef_init=1e-3, coef_lr=1e-3, target_ratio=1.5))
    seen = []
    orig = trainer._compute_loss

    def spy(model, inputs):
        seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return orig(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    return out, trainer, seen


def test_coefficient_moves_and_weights_follow_groups(run):
    _, trainer, seen = run
    state = trainer.aer.state_dict()
    assert state["controller"]["steps"] == 2  # once per optimizer step, not per micro-batch (4 of them)
    assert trainer.aer.target.anchor is not None
    # target_ratio 1.5 puts the target above the entropy: alpha must rise from 1e-3.
    assert trainer.aer.value > 1e-3
    weights = [inputs[WEIGHTS_KEY] for inputs in seen]
    assert weights and all(w.shape == (GROUP,) for w in weights)
    assert all(torch.isfinite(w).all() and (w >= 0).all() for w in weights)


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def test_loss_term_equals_reference(run):
    """Outside training (no accumulation): AER loss - TRL loss = -alpha * sum w_i H_it m_it / sum m."""
    _, trainer, seen = run
    inputs = seen[-1]
    trainer.model.eval()
    with torch.no_grad():
        total = trainer._compute_loss(trainer.model, inputs)
        base = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        n = inputs["completion_ids"].shape[1]
        logits = trainer.model(input_ids=ids, attention_mask=att).logits[:, -n - 1:-1] / trainer.args.temperature
    m = inputs["completion_mask"].double()
    h = entropy64(logits)
    ref = -(trainer.aer.value * inputs[WEIGHTS_KEY].double()[:, None] * h * m).sum() / m.sum()
    assert trainer.aer.value > 0 and inputs[WEIGHTS_KEY].sum() > 0
    assert (total - base).item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-9)


def test_metrics_reach_trl_logger(run):
    _, trainer, _ = run
    logs = [entry for entry in trainer.state.log_history if "aer/coef" in entry]
    assert len(logs) == 2
    assert logs[-1]["aer/coef"] == pytest.approx(trainer.aer.value)
    assert {"aer/target", "aer/entropy", "aer/bonus", "aer/difficulty/accuracy"} <= set(logs[-1])
    assert logs[-1]["aer/entropy"] > 0


def test_resume_restores_controller_state(run, tmp_path):
    out, trainer, _ = run
    ckpt = os.path.join(out, "checkpoint-2")
    with open(os.path.join(ckpt, STATE_FILE)) as f:
        saved = json.load(f)
    assert saved == trainer.aer.state_dict()
    # A fresh trainer with other settings' initial state resumes from the checkpoint's controller state.
    resumed = make_trainer(out, max_steps=3, aer=AERConfig(coef_init=1e-3, coef_lr=1e-3, target_ratio=1.5))
    loaded = []
    orig = resumed._load_optimizer_and_scheduler

    def spy(checkpoint):
        orig(checkpoint)
        loaded.append(resumed.aer.state_dict())

    resumed._load_optimizer_and_scheduler = spy
    resumed.train(resume_from_checkpoint=ckpt)
    assert loaded and loaded[0] == saved
    assert resumed.aer.state_dict()["controller"]["steps"] == 3


def test_refuses_trl_entropy_bonus(tmp_path):
    with pytest.raises(ValueError, match="entropy_coef"):
        make_trainer(tmp_path, max_steps=1, aer=None, entropy_coef=0.01)
    with pytest.raises(ValueError, match="use_adaptive_entropy"):
        make_trainer(tmp_path, max_steps=1, aer=None, use_adaptive_entropy=True)
