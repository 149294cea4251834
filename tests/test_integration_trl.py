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


def make_trainer(tmp_path, *, max_steps, aer, prompts=None, eval_prompts=None, reward=reward_has_a,
                 **overrides) -> AERGRPOTrainer:
    tok = tokenizer()
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=GROUP,
        gradient_accumulation_steps=2, num_generations=GROUP, max_completion_length=6, learning_rate=1e-2,
        logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, bf16=False,
        seed=0, beta=0.0, temperature=1.0, disable_tqdm=True, dataloader_num_workers=0,
        **overrides,
    )
    data = Dataset.from_dict({"prompt": prompts or ["b c", "d e", "f g", "h b", "c d", "e f"] * 4})
    eval_data = None if eval_prompts is None else Dataset.from_dict({"prompt": eval_prompts})
    return AERGRPOTrainer(model=model(tok), reward_funcs=reward, args=args, train_dataset=data,
                          eval_dataset=eval_data, processing_class=tok, aer=aer)


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


def test_resume_without_aer_state_is_refused_unless_asked(run, tmp_path):
    """Issue 22's resume policy (as verl's and OpenRLHF's): a checkpoint without aer_state.json (saved
    without AER) used to restart alpha and the anchor silently on the trained policy."""
    import shutil

    out, _, _ = run
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(os.path.join(out, "checkpoint-2"), ckpt)
    (ckpt / STATE_FILE).unlink()
    trainer = make_trainer(tmp_path, max_steps=3, aer=AERConfig(coef_init=1e-3))
    with pytest.raises(RuntimeError, match=r"holds no AER state.*AERConfig\(reanchor_on_missing_state=True\)"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    trainer = make_trainer(tmp_path, max_steps=3, aer=AERConfig(coef_init=1e-3, reanchor_on_missing_state=True))
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.aer.state_dict()["controller"]["steps"] == 1  # started anew at step 3, as asked


def test_refuses_trl_entropy_bonus(tmp_path):
    with pytest.raises(ValueError, match="entropy_coef"):
        make_trainer(tmp_path, max_steps=1, aer=None, entropy_coef=0.01)
    with pytest.raises(ValueError, match="use_adaptive_entropy"):
        make_trainer(tmp_path, max_steps=1, aer=None, use_adaptive_entropy=True)


EVAL_PROMPT = "a a"


def train_counting_accuracy_entries(trainer: AERGRPOTrainer) -> list[tuple[str, int]]:
    """Train; return (mode, entries of aer/difficulty/accuracy) at each log() call (log() averages them)."""
    counts = []
    orig_log = trainer.log

    def log_spy(logs, start_time=None):
        mode = "train" if trainer.model.training else "eval"
        counts.append((mode, len(trainer._metrics[mode].get("aer/difficulty/accuracy", []))))
        orig_log(logs, start_time)

    trainer.log = log_spy
    trainer.train()
    return counts


def test_training_logs_describe_the_batches_trained_on(tmp_path):
    """Issue 16: 4 training prompts make one generation batch (16 completions) that steps 1 and 2 both train on
    (steps_per_generation 4, accumulation 2); an evaluation runs after each step. Each step's log must carry that
    training batch's accuracy, once; evaluation's goes under eval_ only. Nothing is stubbed."""
    rewards = []  # (the prompts scored, their rewards), in call order

    def reward(prompts, completions, **kwargs):
        # The evaluation prompt always counts as solved, so its accuracy (1.0) differs from the training batch's.
        out = [1.0 if p == EVAL_PROMPT or "a" in c.split() else 0.0 for p, c in zip(prompts, completions)]
        rewards.append((list(prompts), out))
        return out

    trainer = make_trainer(
        tmp_path, max_steps=2, aer=AERConfig(coef_init=1e-3), prompts=["b c", "d e", "f g", "h b"],
        eval_prompts=[EVAL_PROMPT], reward=reward, steps_per_generation=4, eval_strategy="steps", eval_steps=1,
        per_device_eval_batch_size=GROUP,
    )
    counts = train_counting_accuracy_entries(trainer)

    train_calls = [r for p, r in rewards if EVAL_PROMPT not in p]
    assert len(train_calls) == 1 and len(train_calls[0]) == 4 * GROUP  # one generation served both steps
    assert len(rewards) == 3  # and two evaluations
    # Groups of equal size: the mean group accuracy is the mean reward.
    train_accuracy = sum(train_calls[0]) / len(train_calls[0])
    assert train_accuracy < 1.0
    train_logs = [e for e in trainer.state.log_history if "aer/coef" in e]
    eval_logs = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2] and [e["step"] for e in eval_logs] == [1, 2]
    for entry in train_logs:
        assert entry["aer/difficulty/accuracy"] == pytest.approx(train_accuracy)
        assert entry["aer/difficulty/num_groups"] == 4
    for entry in eval_logs:
        assert entry["eval_aer/difficulty/accuracy"] == 1.0
        assert entry["eval_aer/difficulty/num_groups"] == 1
        assert not any(key.startswith("aer/") for key in entry)
    # Once per step (the log averages, so a duplicate would not show in the values).
    assert [c for mode, c in counts if mode == "train" and c] == [1, 1]
    # The state saved in checkpoints describes the last training batch, not the evaluation's.
    assert trainer.aer.allocator.stats["accuracy"] == pytest.approx(train_accuracy)


def test_a_step_logs_each_batch_it_trains_on(tmp_path):
    """steps_per_generation 1 < accumulation 2: one optimizer step trains on two generation batches, one prompt
    each, one always solved and one never; the step logs both accuracies (1 and 0), once each. Nothing is stubbed."""

    def reward(prompts, completions, **kwargs):
        return [1.0 if p == "b c" else 0.0 for p in prompts]

    trainer = make_trainer(tmp_path, max_steps=1, aer=AERConfig(coef_init=1e-3), prompts=["b c", "d e"],
                           reward=reward, steps_per_generation=1)
    counts = train_counting_accuracy_entries(trainer)
    (entry,) = [e for e in trainer.state.log_history if "aer/coef" in e]
    assert entry["aer/difficulty/accuracy"] == 0.5
    assert [c for mode, c in counts if mode == "train" and c] == [2]


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize(
    ("loss_type", "overrides"),
    [(lt, {"importance_sampling_level": "sequence"} if lt == "luspo" else {}) for lt in LOSS_TYPES]
    + [("dapo", {"top_entropy_quantile": 0.2})],
    ids=[*LOSS_TYPES, "dapo-top_entropy_quantile"],
)
def test_loss_term_is_the_token_mean_for_every_loss_type(run, tmp_path, loss_type, overrides):
    """In training, for every loss_type: AER loss - TRL loss = -alpha * sum w_i H_it m_it / sum m / G, G the
    accumulation steps; the loss type's own normalization (dapo's window token count, dr_grpo's
    B * max_completion_length, grpo's per-sequence mean) does not apply, nor does top_entropy_quantile.
    Stubbed: current_gradient_accumulation_steps, which the training loop sets."""
    inputs = dict(run[2][0])  # a real generated micro-batch (with num_items_in_batch, old log-probs, ...)
    trainer = make_trainer(tmp_path, max_steps=1, aer=AERConfig(coef_init=0.01), loss_type=loss_type, **overrides)
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():  # a sharper LM head than the near-uniform initial one: entropies differ by token
        trainer.model.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    n = inputs["completion_ids"].shape[1]
    assert n >= 4
    # Completions of different lengths (right padding), so that token, sequence and constant normalizations differ.
    lengths = torch.tensor([n, 3, 1, 2])
    inputs["completion_mask"] = (torch.arange(n)[None, :] < lengths[:, None]).to(inputs["completion_mask"].dtype)
    inputs[WEIGHTS_KEY] = torch.tensor([0.25, 2.0, 1.0, 0.75])
    alpha = trainer.aer.value
    trainer.model.train()
    total = trainer._compute_loss(trainer.model, inputs)
    base = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logits = trainer.model(input_ids=ids, attention_mask=att).logits[:, -n - 1:-1] / trainer.args.temperature
    m = inputs["completion_mask"].double()
    h = entropy64(logits)
    ref = -(alpha * inputs[WEIGHTS_KEY].double()[:, None] * h * m).sum() / m.sum() / 2
    assert (total - base).item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-9)
