"""AER on verl 0.9.1's REAL trainers and worker code, on the CPU.

Runs verl's own classes and methods:

- config: verl's Hydra composition of ``verl/trainer/config/ppo_trainer.yaml``;
- v1: ``PPOTrainerSync`` (through :func:`install` and ``get_trainer_cls("sync")``), its real
  ``__init__``, ``init``, ``fit``, ``step``/``_step_once``, ``_balance_batch`` (with verl's
  synthetic padding samples), ``_compute_old_log_prob``, ``_compute_advantage`` (GRPO),
  ``_update_actor``, ``_save_checkpoint`` (and its checkpoint callback), ``_load_checkpoint``;
- legacy: ``RayPPOTrainer``'s real ``__init__``, ``_compute_old_log_prob`` (DataProto to
  no-padding TensorDict), ``_update_actor``, ``_save_checkpoint``, ``_load_checkpoint``;
- worker: ``TrainingWorker.train_mini_batch`` / ``train_batch`` / ``infer_batch`` (mini-batch
  iterator with verl's shuffle, metrics), ``BaseEngine.train_batch``, and the FSDP engine's
  ``forward_backward_batch`` (global token count all-reduced over a gloo group, ``dp_size``,
  verl's micro-batch split, backward per micro-batch) calling the installed loss exactly as
  verl's ``forward_step`` does.

Stubbed, because they need a GPU, a rollout server or a Ray cluster:

- the model: one ``[V, V]`` logits table (``TinyPolicy``) instead of the FSDP-wrapped LLM, and
  ``get_device_id`` returning "cpu";
- the rollout: ``prepare_step`` puts finished samples into the store the way verl's agent loop
  does (fields and tags), and ``replay_buffer.sample`` hands them out;
- TransferQueue's storage (Ray actors, which do not start on this 2-core machine within a test's
  time): an in-process store with ``kv_batch_put`` / ``kv_batch_get`` / ``kv_clear``'s contract
  (fields merged per key, missing fields skipped, nested fields returned nested, the put
  returning the keys' tags and fields);
- the worker group's RPC fan-out (Ray), the weight sync to the rollout (``checkpoint_manager``)
  and the model checkpoint files (``save_checkpoint`` writes the logits table).

No Ray cluster starts: the task runner's part (installing AER in its process) is called directly.
References are float64 and computed from the logits table, never by the code under test.
"""

from __future__ import annotations

import contextlib
import copy
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="install the extra: pip install 'entropy-reg[verl]'")

import torch.distributed as dist  # noqa: E402
import transfer_queue  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from tensordict import NonTensorStack, TensorDict  # noqa: E402
from transfer_queue import KVBatchMeta  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine.base import BaseEngine  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl as fsdp_impl  # noqa: E402
from verl.workers.engine_workers import TrainingWorker  # noqa: E402

from entropy_reg.integrations import STATE_FILE  # noqa: E402
from entropy_reg.integrations.verl import COEF_KEY, AERLoss, install  # noqa: E402

V = 9  # vocabulary
N_ROLLOUT = 4  # responses per prompt (actor_rollout_ref.rollout.n)
PROMPTS = 3  # data.train_batch_size: 12 samples, padded by verl to 16 (mini-batch 2 x 4 = 8)


# ----------------------------------------------------------------------------------------------
# stubs: TransferQueue's storage, the model, the engine's device


class FakeStore:
    """In-process TransferQueue storage with the kv_* contract verl's trainer relies on."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, Any]]] = {}
        self.tags: dict[str, dict[str, dict]] = {}
        self.kind: dict[str, str] = {}
        self.history: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # rollout key -> prompt, response, id
        self.by_idx: dict[int, str] = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None, **_):
        part = self.data.setdefault(partition_id, {})
        ptags = self.tags.setdefault(partition_id, {})
        for i, key in enumerate(keys):
            part.setdefault(key, {})
            ptags.setdefault(key, {})
            if tags is not None:
                ptags[key].update(copy.deepcopy(tags[i]))
        if fields is not None:
            assert fields.batch_size[0] == len(keys)
            for name in fields.keys():
                value = fields.get(name)
                # A field once put as jagged comes back jagged (TransferQueue keeps its schema).
                if isinstance(value, torch.Tensor) and value.is_nested:
                    self.kind[name], rows = "nested", list(value.unbind())
                elif isinstance(value, torch.Tensor):
                    self.kind.setdefault(name, "tensor")
                    rows = list(value.unbind(0))
                else:
                    self.kind[name], rows = "object", list(value.tolist())
                for key, row in zip(keys, rows):
                    part[key][name] = row.clone() if isinstance(row, torch.Tensor) else row
        return KVBatchMeta(
            keys=list(keys), tags=[ptags[k] for k in keys], partition_id=partition_id,
            fields=sorted(set.intersection(*(set(part[k]) for k in keys))),
        )

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        part = self.data[partition_id]
        names = sorted(set.intersection(*(set(part[k]) for k in keys)))
        if select_fields is not None:
            names = [n for n in ([select_fields] if isinstance(select_fields, str) else select_fields) if n in names]
        out = {}
        for name in names:
            rows = [part[k][name] for k in keys]
            if self.kind[name] == "nested":
                out[name] = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
            elif self.kind[name] == "tensor":
                out[name] = torch.stack(rows)
            else:
                out[name] = NonTensorStack(*rows)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_clear(self, keys, partition_id):
        for k in [keys] if isinstance(keys, str) else keys:
            self.data.get(partition_id, {}).pop(k, None)
            self.tags.get(partition_id, {}).pop(k, None)


class TinyPolicy:
    """The model stub: logits of the next token = ``W[current token]`` (float32, as the engine computes)."""

    def __init__(self, seed: int = 0) -> None:
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 1.5)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = input_ids.values()
        logp_all = torch.log_softmax(self.W[flat].float(), -1)
        labels = torch.roll(flat, -1)  # position t predicts token t + 1 (the last row is never read)
        logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        off = input_ids.offsets()
        return {
            "log_probs": torch.nested.nested_tensor_from_jagged(logp, off),
            "entropy": torch.nested.nested_tensor_from_jagged(ent, off),
        }

    def entropy64(self, token: int) -> float:
        """Reference entropy (nats) of the row that follows ``token``, in float64."""
        z = self.W.detach()[token].double()
        p = torch.softmax(z, -1)
        return float(torch.logsumexp(z, -1) - (p * z).sum())


class CPUEngine:
    """verl's engine code on the CPU: ``BaseEngine.train_batch`` / ``infer_batch`` and the FSDP engine's
    ``forward_backward_batch`` run unchanged; the model forward is the stub."""

    forward_backward_batch = fsdp_impl.FSDPEngine.forward_backward_batch
    train_batch = BaseEngine.train_batch
    infer_batch = BaseEngine.infer_batch
    ulysses_sequence_parallel_size = 1
    scaler = None

    def __init__(self, policy: TinyPolicy, group: Any = None) -> None:
        self.policy = policy
        self.group = group
        self.micro_batches: list[dict] = []  # what each loss call saw (training only)
        self.grads: list[torch.Tensor] = []

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_size(self) -> int:
        return dist.get_world_size(self.group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def is_mp_src_rank_with_outputs(self) -> bool:
        return True

    def train_mode(self, **_):
        return contextlib.nullcontext()

    eval_mode = train_mode

    def _gradient_sync_context(self, **_):
        return contextlib.nullcontext()

    def optimizer_zero_grad(self) -> None:
        self.policy.W.grad = None

    def optimizer_step(self) -> float:
        grad = self.policy.W.grad.detach().clone()
        if self.group is not None or dist.get_world_size() > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=self.group)  # what FSDP's reduce-scatter does
        self.grads.append(grad)
        return float(grad.norm())

    def lr_scheduler_step(self) -> float:
        return 0.0

    def forward_step(self, micro_batch, loss_function, forward_only):
        # As verl's FSDP forward_step: model output, then loss_function(model_output=, data=, dp_group=).
        model_output = self.policy.forward(micro_batch["input_ids"])
        if loss_function is None:
            loss, metrics = torch.tensor(1.0), {}
        else:
            loss, metrics = loss_function(model_output=model_output, data=micro_batch, dp_group=self.group)
            if not forward_only:
                self.micro_batches.append({
                    "sample_idx": micro_batch["sample_idx"].clone(), COEF_KEY: micro_batch[COEF_KEY].clone(),
                    "mask_sum": [int(r.sum()) for r in micro_batch["response_mask"].unbind()],
                    "metrics": metrics, "global": {k: micro_batch[k] for k in
                                                   ("dp_size", "batch_num_tokens", "global_batch_size")},
                })
        detached = {k: v.detach() for k, v in model_output.items()}
        return loss, {"model_output": detached, "loss": loss.detach().item(), "metrics": metrics}


class _Profiler:
    rank = 0

    def step(self) -> None:
        pass

    def check_enable(self) -> bool:
        return False


class _Flops:
    def estimate_flops(self, tokens, seconds, **_):
        return 1.0, 1.0


def cpu_worker(policy: TinyPolicy, actor_cfg: Any, group: Any = None) -> TrainingWorker:
    """verl's ``TrainingWorker`` (methods unchanged) around the CPU engine; verl's worker config values."""
    worker = object.__new__(TrainingWorker)
    worker.engine = CPUEngine(policy, group)
    worker.profiler = _Profiler()
    worker.flops_counter = _Flops()
    worker.device_name = "cpu"
    worker.model_config = {"use_remove_padding": True}
    worker.engine_config = SimpleNamespace(
        forward_only=False, use_dynamic_bsz=False, use_fused_kernels=False,
        micro_batch_size_per_gpu=actor_cfg.ppo_micro_batch_size_per_gpu, max_token_len_per_gpu=10**6,
        infer_micro_batch_size_per_gpu=4, infer_max_token_len_per_gpu=10**6,
    )
    worker.loss_fn = None
    return worker


def meta_to_data(store: FakeStore, meta: KVBatchMeta) -> TensorDict:
    """What verl's TransferQueue bridge hands a worker: the meta's fields, extra_info as non-tensor data."""
    td = store.kv_batch_get(meta.keys, meta.partition_id, select_fields=meta.fields)
    for key, val in copy.deepcopy(meta.extra_info).items():
        tu.assign_non_tensor_data(td, key, val)
    return td


class ActorWorkerGroup:
    """The actor worker group's RPCs, run in this process on one data-parallel rank (Ray stubbed)."""

    def __init__(self, worker: TrainingWorker, store: FakeStore | None = None) -> None:
        self.worker = worker
        self.store = store
        self._dispatch_info = {"actor": [0]}  # dp size 1
        self.loss_fns: list[Any] = []

    def set_loss_fn(self, fn) -> None:
        self.loss_fns.append(fn)
        self.worker.loss_fn = fn

    def compute_log_prob(self, batch):
        data = meta_to_data(self.store, batch) if isinstance(batch, KVBatchMeta) else batch
        out = TrainingWorker.infer_batch(self.worker, data)
        if not isinstance(batch, KVBatchMeta):
            return out
        fields = TensorDict({"log_probs": out["log_probs"], "entropy": out["entropy"]}, batch_size=len(batch))
        return self.store.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)

    def update_actor(self, batch):
        data = meta_to_data(self.store, batch) if isinstance(batch, KVBatchMeta) else batch
        return TrainingWorker.train_mini_batch(self.worker, data)

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        torch.save(self.worker.engine.policy.W.detach(), os.path.join(local_path, "W.pt"))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        with torch.no_grad():
            self.worker.engine.policy.W.copy_(torch.load(os.path.join(local_path, "W.pt")))


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True)
def cpu_device(monkeypatch):
    """verl's engine moves the token count to the accelerator (``get_device_id``): the CPU here."""
    monkeypatch.setattr(fsdp_impl, "get_device_id", lambda: "cpu")


@pytest.fixture
def gloo(tmp_path):
    """A one-process gloo group: verl's engine all-reduces the token count over it. Torn down after
    each test, so no group is live when the two-rank test forks."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'gloo1'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def hydra_module():
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        yield


def verl_config(tmp_path, *extra: str):
    """verl's own Hydra composition of ppo_trainer.yaml, with a GRPO user's overrides."""
    return compose(config_name="ppo_trainer", overrides=[
        "algorithm.adv_estimator=grpo", f"data.train_batch_size={PROMPTS}",
        f"actor_rollout_ref.rollout.n={N_ROLLOUT}", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.shuffle=True",
        "actor_rollout_ref.actor.use_kl_loss=False", "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", "actor_rollout_ref.model.path=none",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}", "trainer.logger=[console]",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=1",
        "trainer.total_training_steps=2", "trainer.n_gpus_per_node=1",
        "+aer.coef_init=0.002", "+aer.target_ratio=0.9", "+aer.coef_max=0.05", *extra,
    ])


@pytest.fixture
def store(monkeypatch):
    s = FakeStore()
    for name in ("kv_batch_put", "kv_batch_get", "kv_clear"):
        monkeypatch.setattr(transfer_queue, name, getattr(s, name))
    return s


# ----------------------------------------------------------------------------------------------
# the rollout stub


def solved(uid: str, session: int) -> float:
    """Deterministic 0/1 verifier outcome: prompt 0 all solved, prompt 1 half, prompt 2 none."""
    k = int(uid.split("-")[1])
    return float(session < [N_ROLLOUT, N_ROLLOUT // 2, 0][k % 3])


OVERLONG = 3  # DAPO stub: a response of this many tokens or more is overlong
PENALTY = 0.6  # ... and its reward loses this (verl's overlong_buffer penalty)


def rollout(store: FakeStore, step: int, seed: int, policy: TinyPolicy, *, dapo: bool = False,
            outputs: dict[tuple[int, int], int] | None = None) -> list[str]:
    """Put PROMPTS x N_ROLLOUT finished samples into the store as verl's agent loop does; their keys.

    ``dapo``: as verl's DAPO reward manager, the overlong penalty is added into ``rm_scores`` and the
    plain correctness kept in ``extra_fields["reward_extra_info"]["acc"]``. ``outputs``: (prompt,
    session) -> number of agent-loop outputs of that session (default 1), keys ``{uid}_{session}_{i}``,
    each output carrying the final reward, as verl's ``_agent_loop_postprocess`` puts them.
    """
    g = torch.Generator().manual_seed(1000 * seed + step)
    keys, fields, tags = [], [], []
    for p in range(PROMPTS):
        uid = f"s{step}-{p}"
        prompt = torch.randint(1, V, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        for session in range(N_ROLLOUT):
            for index in range((outputs or {}).get((p, session), 1)):
                resp = torch.randint(1, V, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
                ids = torch.cat([prompt, resp])
                with torch.no_grad():  # the rollout's own log-probs of its tokens (rollout.calculate_log_probs)
                    logp = policy.forward(torch.nested.as_nested_tensor([ids], layout=torch.jagged))["log_probs"]
                score = torch.zeros(len(resp))
                score[-1] = solved(uid, session)
                extra = {}
                if dapo:
                    score[-1] -= PENALTY * (len(resp) >= OVERLONG)
                    extra = {"extra_fields": {"reward_extra_info": {"acc": solved(uid, session),
                                                                    "overlong": len(resp) >= OVERLONG}}}
                keys.append(f"{uid}_{session}_{index}")
                store.history[keys[-1]] = (prompt, resp, len(keys) - 1 + 100 * step)
                store.by_idx[len(keys) - 1 + 100 * step] = keys[-1]
                fields.append({
                    "prompts": prompt, "responses": resp, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(len(ids)), "response_mask": torch.ones_like(resp),
                    "loss_mask": torch.ones_like(resp), "rm_scores": score,
                    "rollout_log_probs": logp.values()[len(prompt) - 1:-1].clone(), "uid": uid, "num_turns": 2,
                    "sample_idx": torch.tensor(len(keys) - 1 + 100 * step), **extra,
                })
                tags.append({"status": "success", "prompt_len": len(prompt), "response_len": len(resp),
                             "seq_len": len(ids), "global_steps": step, "min_global_steps": step - 1,
                             "max_global_steps": step - 1})
    store.kv_batch_put(keys=keys, partition_id="train", fields=tu.list_of_dict_to_tensordict(fields), tags=tags)
    return keys


def token_entropies(policy: TinyPolicy, store: FakeStore, key: str) -> list[float]:
    """float64 entropy of each response token of sample ``key`` (the row predicting it)."""
    prompt, resp, _ = store.history[key]
    ids = torch.cat([prompt, resp])
    return [policy.entropy64(int(ids[len(prompt) - 1 + t])) for t in range(len(resp))]


def entropy_reference(policy: TinyPolicy, store: FakeStore, keys: list[str]) -> float:
    h = [x for k in keys for x in token_entropies(policy, store, k)]
    return sum(h) / len(h)


def check_micro_batches(policy, store, records, coefs_by_step, mode, micro_per_mini=4, minis_per_step=2):
    """Every micro-batch's coefficients belong to its samples; each mini-batch's summed bonus metric
    equals the float64 aggregate over that mini-batch's samples (padding rows contribute nothing)."""
    assert len(records) == micro_per_mini * minis_per_step * len(coefs_by_step)
    minis = [records[i:i + micro_per_mini] for i in range(0, len(records), micro_per_mini)]
    shuffled = False
    for m, mini in enumerate(minis):
        coefs = coefs_by_step[m // minis_per_step]
        rows, bonus = [], 0.0
        for rec in mini:
            for idx, c, n in zip(rec["sample_idx"].tolist(), rec[COEF_KEY].tolist(), rec["mask_sum"]):
                if n == 0:  # verl's padding sample (a copy of the first sample's fields, response_mask 0)
                    assert c == 0.0
                    continue
                key = store.by_idx[idx]
                assert c == coefs[key]
                rows.append((key, c))
            bonus += float(rec["metrics"]["actor/aer/bonus"].aggregate())
        shuffled |= [r[0] for r in rows] != sorted(r[0] for r in rows)
        tokens = sum(len(store.history[k][1]) for k, _ in rows)
        assert mini[0]["global"]["batch_num_tokens"] == tokens  # verl's global count: real response tokens
        if mode == "token-mean":
            ref = sum(c * sum(token_entropies(policy, store, k)) for k, c in rows) / tokens
        assert bonus == pytest.approx(ref, rel=1e-5, abs=1e-12)
    assert shuffled  # verl's balancing and shuffle did reorder the samples


# ----------------------------------------------------------------------------------------------
# v1: PPOTrainerSync


def build_v1(cfg, store, policy, monkeypatch, *, seed=0, **rollout_kw):
    """``get_trainer_cls("sync")`` after install(), built and initialized by verl's own ``init``."""
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    install(True, "sync")
    cls = get_trainer_cls("sync")
    actor_cfg = SimpleNamespace(ppo_micro_batch_size_per_gpu=cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu)
    wg = ActorWorkerGroup(cpu_worker(policy, actor_cfg), store)

    def setup_stub(self):
        # verl's _setup builds the tokenizer, datasets, Ray worker groups (GPU), rollout servers and
        # the weight-sync manager, then calls _load_checkpoint. Here: their CPU stand-ins.
        self.tokenizer = SimpleNamespace(eos_token_id=V - 1, pad_token_id=0)
        self.train_dataloader = StatefulDataLoader(list(range(8)), batch_size=2)
        self.steps_per_epoch, self.total_training_steps = 4, cfg.trainer.total_training_steps
        self._init_dump_executor()
        self.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
        self.actor_rollout_wg = wg
        self.reward_loop_manager = SimpleNamespace(reward_loop_worker_handles=["rollout-side reward"])
        self.checkpoint_manager = SimpleNamespace(update_weights=lambda *a, **k: None,
                                                  sleep_replicas=lambda: None)
        self._load_checkpoint()

    monkeypatch.setattr(PPOTrainer, "_setup", setup_stub)
    trainer = cls(config=cfg)
    trainer.init()
    sampled: list[KVBatchMeta] = []

    def prepare_step():
        keys = rollout(store, trainer.global_steps, seed, policy, **rollout_kw)
        meta = KVBatchMeta(keys=keys, tags=[store.tags["train"][k] for k in keys], partition_id="train")
        sampled.append(meta)
        return {}

    trainer.prepare_step = prepare_step
    trainer.replay_buffer.sample = lambda **kw: (sampled[-1], {})
    return trainer, wg


def test_v1_sync_trainer_runs_aer_end_to_end(tmp_path, gloo, hydra_module, store, registry, monkeypatch):
    """verl's own fit() on PPOTrainerSync (AER installed): two steps with checkpoints. Checked against
    float64 references: the entropy fed to the controller (real samples only, verl's padding left
    out), each sample's coefficient (by its key, through verl's balancing, shuffle and splits),
    each mini-batch's bonus, and the state file saved by the checkpoint callback."""
    from entropy_reg import AERConfig
    from entropy_reg.regularizer import AdaptiveEntropyRegularizer

    cfg = verl_config(tmp_path)
    assert not cfg.actor_rollout_ref.actor.calculate_entropy  # verl's default; AER turns it on
    policy = TinyPolicy()
    logged: list[dict] = []
    monkeypatch.setattr("verl.utils.tracking.Tracking.log", lambda self, data, step: logged.append(dict(data)))
    trainer, wg = build_v1(cfg, store, policy, monkeypatch)
    assert type(trainer).__name__ == "AERPPOTrainerSync" and cfg.actor_rollout_ref.actor.calculate_entropy
    assert isinstance(wg.worker.loss_fn, AERLoss) and wg.worker.loss_fn.base.func.__name__ == "ppo_loss"

    # Mirror of the controller, fed with float64 references computed here.
    mirror = AdaptiveEntropyRegularizer(AERConfig(coef_init=0.002, target_ratio=0.9, coef_max=0.05))
    seen_steps = spy_coefficients(store, monkeypatch)
    trainer.fit(agent_loop_manager=None)

    assert len(seen_steps) == 2 and len(logged) == 2
    for step, coefs in enumerate(seen_steps, start=1):
        real = [k for k in coefs if not k.startswith("pad")]
        pads = [k for k in coefs if k.startswith("pad")]
        assert len(real) == PROMPTS * N_ROLLOUT and len(pads) == 4  # 12 samples padded to a multiple of 8
        assert all(coefs[k] == 0.0 for k in pads)
        # The entropy statistic: float64 token mean over the real samples' response tokens.
        metrics = logged[step - 1]
        assert metrics["actor/aer/entropy"] == pytest.approx(entropy_reference(policy, store, real), rel=1e-5)
        mirror.update(metrics["actor/aer/entropy"])
        alpha = mirror.value
        assert metrics["actor/aer/coef"] == pytest.approx(alpha, rel=1e-12)
        # Coefficient per sample: alpha * (1 - group accuracy), normalized to mean 1 over real samples.
        acc = {p: np.mean([solved(f"s{step}-{p}", s) for s in range(N_ROLLOUT)]) for p in range(PROMPTS)}
        w = {k: 1.0 - acc[int(k.split("_")[0].split("-")[1])] for k in real}
        mean_w = np.mean(list(w.values()))
        for k in real:
            assert coefs[k] == pytest.approx(alpha * w[k] / mean_w, rel=1e-6, abs=1e-12)
    # Each micro-batch the loss saw: its coefficients belong to its samples (by sample_idx), after
    # verl's balancing reorder, shuffle and mini/micro split; the per-mini-batch bonus is the float64 one.
    check_micro_batches(policy, store, wg.worker.engine.micro_batches, seen_steps, "token-mean")
    # Checkpoints: verl's callback hook wrote AER's state next to the model, step by step.
    for step in (1, 2):
        assert (tmp_path / "ckpt" / f"global_step_{step}" / STATE_FILE).exists()


def run_v1(tmp_path, name, store, monkeypatch, *overrides):
    """verl's fit() for the configured steps; the metrics it logged."""
    cfg = verl_config(tmp_path, f"trainer.default_local_dir={tmp_path / name}", *overrides)
    logged: list[dict] = []
    monkeypatch.setattr("verl.utils.tracking.Tracking.log", lambda self, data, step: logged.append(dict(data)))
    trainer, _ = build_v1(cfg, store, TinyPolicy(), monkeypatch)
    trainer.fit(agent_loop_manager=None)
    return trainer, logged


def test_v1_resume_continues_the_controller_bit_for_bit(tmp_path, gloo, hydra_module, store, registry,
                                                         monkeypatch):
    """Three steps straight, against one step, then a new trainer resuming from global_step_1
    through verl's _load_checkpoint: the same coefficient at every later step, the same state
    file byte for byte."""
    full, full_log = run_v1(tmp_path, "full", store, monkeypatch, "trainer.total_training_steps=3")
    resumed, resumed_log = run_v1(
        tmp_path, "resumed", store, monkeypatch, "trainer.total_training_steps=3", "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={tmp_path / 'full' / 'global_step_1'}",
    )
    assert len(full_log) == 3 and len(resumed_log) == 2  # steps 2 and 3
    for a, b in zip(full_log[1:], resumed_log):
        assert a["actor/aer/coef"] == b["actor/aer/coef"] and a["actor/aer/target"] == b["actor/aer/target"]
    state = (tmp_path / "full" / "global_step_3" / STATE_FILE).read_bytes()
    assert (tmp_path / "resumed" / "global_step_3" / STATE_FILE).read_bytes() == state
    assert resumed.aer.regularizer.state_dict() == full.aer.regularizer.state_dict()
    # The resumed run did read global_step_1's state: its step-2 target is the one anchored at
    # step 1's entropy, which a fresh controller (anchoring at step 2) would not have.
    assert resumed_log[0]["actor/aer/anchor"] == full_log[0]["actor/aer/entropy"]
    assert resumed_log[0]["actor/aer/entropy"] != full_log[0]["actor/aer/entropy"]


def spy_state_at_save(wg) -> list[bool]:
    """For each actor checkpoint save, whether aer_state.json already sat in its global_step_N folder."""
    at_save: list[bool] = []
    actor_save = wg.save_checkpoint

    def spy_save(local_path, *args, **kwargs):
        at_save.append(os.path.exists(os.path.join(os.path.dirname(local_path), STATE_FILE)))
        return actor_save(local_path, *args, **kwargs)

    wg.save_checkpoint = spy_save
    return at_save


def spy_coefficients(store: FakeStore, monkeypatch) -> list[dict[str, float]]:
    """Each aer_coef put to TransferQueue, as {sample key: coefficient}."""
    seen: list[dict[str, float]] = []
    orig_put = store.kv_batch_put

    def spy_put(keys, partition_id, fields=None, tags=None, **kw):
        if fields is not None and COEF_KEY in fields.keys():
            seen.append({k: float(c) for k, c in zip(keys, fields[COEF_KEY])})
        return orig_put(keys, partition_id, fields=fields, tags=tags, **kw)

    monkeypatch.setattr(transfer_queue, "kv_batch_put", spy_put)
    return seen


def expected_coefficients(keys, alpha: float, success) -> dict[str, float]:
    """float64 reference: alpha * (1 - accuracy of the prompt's sessions) / mean over sessions, every
    output of a session taking its session's value. ``success(uid, session, key)``: 0 or 1."""
    sessions: dict[tuple[str, str], list[str]] = {}
    for k in keys:
        uid, session, _ = k.split("_")
        sessions.setdefault((uid, session), []).append(k)
    final = {s: max(ks, key=lambda k: int(k.split("_")[2])) for s, ks in sessions.items()}
    uids = {uid for uid, _ in sessions}
    acc = {u: np.mean([success(u, s, final[(u, s)]) for (v, s) in sessions if v == u]) for u in uids}
    mean_w = np.mean([1.0 - acc[u] for u, _ in sessions])
    return {k: alpha * (1.0 - acc[u]) / mean_w for (u, s), ks in sessions.items() for k in ks}


@pytest.mark.parametrize("score_field", [None, "acc", "scores"])
def test_v1_difficulty_comes_from_dapo_correctness(tmp_path, gloo, hydra_module, store, registry, monkeypatch,
                                                   score_field):
    """Issue 22 item 1: verl's DAPO reward manager adds its overlong penalty into rm_scores and keeps
    the correctness in reward_extra_info["acc"]. By default (and with +aer.score_field=acc) the group
    accuracy comes from acc, so the all-solved prompt gets no bonus although some of its right answers
    ran long; +aer.score_field=scores takes the penalised scores on purpose."""
    extra = [] if score_field is None else [f"+aer.score_field={score_field}"]
    cfg = verl_config(tmp_path, "trainer.total_training_steps=1", *extra)
    trainer, _ = build_v1(cfg, store, TinyPolicy(), monkeypatch, dapo=True)
    seen = spy_coefficients(store, monkeypatch)
    trainer.fit(agent_loop_manager=None)
    (coefs,) = seen
    real = [k for k in coefs if not k.startswith("pad")]

    def success(uid, session, key):
        score = solved(uid, int(session))
        if score_field == "scores":
            score -= PENALTY * (len(store.history[key][1]) >= OVERLONG)
        return float(score > 0.5)

    # The scenario: right answers of the all-solved prompt that ran long, scored 0.4 < 0.5.
    assert any(solved(k.split("_")[0], 0) and len(store.history[k][1]) >= OVERLONG for k in real if "-0_" in k)
    ref = expected_coefficients(real, trainer.aer.regularizer.value, success)
    for k in real:
        assert coefs[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-12)
    solved_prompt = [coefs[k] for k in real if "-0_" in k]
    assert (max(solved_prompt) == 0.0) == (score_field != "scores")


def test_v1_a_score_field_the_reward_manager_did_not_write_is_an_error(tmp_path, gloo, hydra_module, store,
                                                                      registry, monkeypatch):
    cfg = verl_config(tmp_path, "trainer.total_training_steps=1", "+aer.score_field=correct")
    trainer, _ = build_v1(cfg, store, TinyPolicy(), monkeypatch, dapo=True)
    with pytest.raises(KeyError, match=r"\+aer.score_field=correct.*wrote: acc, overlong"):
        trainer.fit(agent_loop_manager=None)


def test_v1_an_agent_loop_session_counts_once(tmp_path, gloo, hydra_module, store, registry, monkeypatch):
    """Issue 22 item 2: an agent loop whose session puts several outputs ({uid}_{session}_{i}, each
    with the final reward). verl's GRPO counts the session once (its final output); so must the group
    accuracy and the mean-1 normalization. Prompt 1's solved session 0 has 3 outputs (counted per row,
    its accuracy would read 4/6, not 2/4), prompt 2's session 1 has 2."""
    cfg = verl_config(tmp_path, "trainer.total_training_steps=1")
    trainer, _ = build_v1(cfg, store, TinyPolicy(), monkeypatch, outputs={(1, 0): 3, (2, 1): 2})
    seen = spy_coefficients(store, monkeypatch)
    trainer.fit(agent_loop_manager=None)
    (coefs,) = seen
    real = [k for k in coefs if not k.startswith("pad")]
    assert len(real) == PROMPTS * N_ROLLOUT + 3
    ref = expected_coefficients(real, trainer.aer.regularizer.value, lambda u, s, k: solved(u, int(s)))
    for k in real:
        assert coefs[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-12)
    assert {coefs[f"s1-1_0_{i}"] for i in range(3)} == {coefs["s1-1_0_0"]}  # one session, one coefficient


@pytest.mark.parametrize(("overrides", "actor_updates"), [
    (("trainer.critic_warmup=2", "trainer.total_training_steps=3"), 2),  # step 1 trains no actor
    (("+trainer.v1.sync.parameter_sync_step=2", "data.train_batch_size=4", "trainer.total_training_steps=1"), 2),
], ids=["critic_warmup", "parameter_sync_step"])
def test_v1_one_controller_update_per_actor_update(tmp_path, gloo, hydra_module, store, registry, monkeypatch,
                                                   overrides, actor_updates):
    """Issue 22 item 4: the old-log-prob pass runs for every batch, the actor update only after the
    critic's warm-up (and parameter_sync_step times per step). The controller steps once per actor
    update, from the entropy of the batch that update trains on, and anchors on the first of them."""
    cfg = verl_config(tmp_path, *overrides)
    policy = TinyPolicy()
    trainer, wg = build_v1(cfg, store, policy, monkeypatch)
    if trainer.parameter_sync_step > 1:  # the replay buffer hands each local update its own prompts
        sample_all, calls = trainer.replay_buffer.sample, []

        def sample(**kw):
            meta, m = sample_all(**kw)
            part = len(calls) % trainer.parameter_sync_step
            calls.append(part)
            keys = [k for k in meta.keys if int(k.split("_")[0].split("-")[1]) % trainer.parameter_sync_step == part]
            return KVBatchMeta(keys=keys, tags=[store.tags["train"][k] for k in keys], partition_id="train"), m

        trainer.replay_buffer.sample = sample
    fed, refs = [], []
    aer_update = trainer.aer.update
    monkeypatch.setattr(trainer.aer, "update", lambda e, m: fed.append(masked64(e, m)) or aer_update(e, m))
    actor_update = wg.update_actor

    def spy_update_actor(batch):
        real = [k for k, tag in zip(batch.keys, batch.tags) if not tag.get("is_padding", False)]
        refs.append(entropy_reference(policy, store, real))  # the weights the old-log-prob pass saw
        return actor_update(batch)

    wg.update_actor = spy_update_actor
    trainer.fit(agent_loop_manager=None)
    assert len(refs) == actor_updates and len(fed) == actor_updates
    assert fed == pytest.approx(refs, rel=1e-5)
    assert trainer.aer.regularizer.controller.steps == actor_updates
    assert trainer.aer.regularizer.target.anchor == pytest.approx(refs[0], rel=1e-5)


def masked64(entropy: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.double()
    return float((entropy.double() * m).sum() / m.sum())


def test_v1_state_is_written_before_verl_marks_the_checkpoint_and_required_on_resume(
        tmp_path, gloo, hydra_module, store, registry, monkeypatch):
    """Issue 22 item 3: aer_state.json exists before verl's _save_checkpoint saves the actor (and then
    writes latest_checkpointed_iteration.txt); resuming from a checkpoint without it is an error naming
    +aer.reanchor_on_missing_state, which starts AER anew on purpose."""
    cfg = verl_config(tmp_path, f"trainer.default_local_dir={tmp_path / 'full'}", "trainer.total_training_steps=1")
    trainer, wg = build_v1(cfg, store, TinyPolicy(), monkeypatch)
    at_save = spy_state_at_save(wg)
    trainer.fit(agent_loop_manager=None)
    assert at_save == [True]
    ckpt = tmp_path / "full" / "global_step_1"
    assert (tmp_path / "full" / "latest_checkpointed_iteration.txt").read_text() == "1"
    (ckpt / STATE_FILE).unlink()  # a checkpoint saved without AER
    resume = ("trainer.total_training_steps=2", "trainer.resume_mode=resume_path", f"trainer.resume_from_path={ckpt}")
    with pytest.raises(RuntimeError, match=r"holds no AER state.*\+aer\.reanchor_on_missing_state=true"):
        run_v1(tmp_path, "resumed", store, monkeypatch, *resume)
    resumed, log = run_v1(tmp_path, "reanchored", store, monkeypatch, *resume, "+aer.reanchor_on_missing_state=true")
    assert len(log) == 1 and resumed.aer.regularizer.target.anchor == log[0]["actor/aer/entropy"]


# ----------------------------------------------------------------------------------------------
# legacy: RayPPOTrainer (trainer.use_v1=False)


def legacy_batch(store: FakeStore, policy: TinyPolicy, step: int):
    """The DataProto RayPPOTrainer.fit holds after generation and reward: left-padded prompts,
    right-padded responses, token-level scores, prompt uids (rollout stub, as for v1)."""
    from verl import DataProto

    keys = rollout(store, step, 0, policy)
    rows = [store.data["train"][k] for k in keys]
    P = max(len(r["prompts"]) for r in rows)
    R = max(len(r["responses"]) for r in rows)
    n = len(rows)
    prompts, responses = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, R, dtype=torch.long)
    attn, scores = torch.zeros(n, P + R, dtype=torch.long), torch.zeros(n, R)
    for i, r in enumerate(rows):
        p, q = len(r["prompts"]), len(r["responses"])
        prompts[i, P - p:], responses[i, :q] = r["prompts"], r["responses"]
        attn[i, P - p:P + q] = 1
        scores[i, :q] = r["rm_scores"]
    batch = DataProto.from_single_dict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attn, "position_ids": torch.clamp(attn.cumsum(-1) - 1, min=0),
        "response_mask": attn[:, P:], "token_level_scores": scores, "token_level_rewards": scores,
        "sample_idx": torch.stack([r["sample_idx"] for r in rows]),
    })
    batch.non_tensor_batch["uid"] = np.array([r["uid"] for r in rows], dtype=object)
    batch.meta_info["global_token_num"] = attn.sum(-1).tolist()  # as fit sets it
    return keys, batch


def build_legacy(cfg, policy, monkeypatch):
    from torch.utils.data import Dataset
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.utils import Role

    class Prompts(Dataset):  # the dataset RayPPOTrainer's dataloader iterates (prompts only)
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([i + 1]), "raw_prompt": f"prompt {i}"}

    install(False)
    from verl.trainer import main_ppo_v0

    cls = main_ppo_v0.RayPPOTrainer  # what main_ppo_v0.TaskRunner.run builds
    wg = ActorWorkerGroup(cpu_worker(policy, cfg.actor_rollout_ref.actor))

    def init_workers_stub(self):
        # verl's init_workers creates the Ray worker groups (GPU) and rollout servers.
        self.actor_rollout_wg = wg
        self.distillation_config = None

    monkeypatch.setattr(RayPPOTrainer, "init_workers", init_workers_stub)
    trainer = cls(config=cfg, tokenizer=None, role_worker_mapping={Role.ActorRollout: object},
                  resource_pool_manager=None, train_dataset=Prompts(), val_dataset=Prompts())
    trainer.init_workers()
    return trainer, wg


def test_legacy_ray_trainer_runs_aer(tmp_path, gloo, hydra_module, store, registry, monkeypatch):
    """RayPPOTrainer (trainer.use_v1=False) as main_ppo_v0's task runner builds it after install():
    entropy from verl's old-log-prob pass, coefficients per sample through verl's DataProto ->
    no-padding conversion, shuffle and micro-batches, float64 bonus, checkpoint save and resume."""
    from verl.trainer.ppo.ray_trainer import compute_advantage

    cfg = verl_config(tmp_path, "trainer.use_v1=False", "actor_rollout_ref.actor.ppo_mini_batch_size=3")
    policy = TinyPolicy()
    trainer, wg = build_legacy(cfg, policy, monkeypatch)
    assert type(trainer).__name__ == "AERRayPPOTrainer"
    assert isinstance(wg.worker.loss_fn, AERLoss) and wg.worker.loss_fn.base.func.__name__ == "ppo_loss"
    keys, batch = legacy_batch(store, policy, step=1)
    trainer.global_steps = 1
    old_log_prob, _ = trainer._compute_old_log_prob(batch)
    assert trainer.aer.regularizer.last_entropy is None  # measured here, fed to the controller with the actor update
    batch = batch.union(old_log_prob.pop(batch_keys=["old_log_probs"]))
    batch = compute_advantage(batch, adv_estimator=cfg.algorithm.adv_estimator, num_repeat=N_ROLLOUT)
    out = trainer._update_actor(batch)
    metrics = out.meta_info["metrics"]
    assert metrics["actor/aer/entropy"] == pytest.approx(entropy_reference(policy, store, keys), rel=1e-5)
    alpha = trainer.aer.regularizer.value
    assert metrics["actor/aer/coef"] == alpha and alpha > 0
    coefs = {k: float(c) for k, c in zip(keys, batch.batch[COEF_KEY])}
    check_micro_batches(policy, store, wg.worker.engine.micro_batches, [coefs], "token-mean",
                        micro_per_mini=6, minis_per_step=1)

    trainer._save_checkpoint()
    assert (tmp_path / "ckpt" / "global_step_1" / STATE_FILE).exists()
    resumed, _ = build_legacy(verl_config(tmp_path, "trainer.use_v1=False"), TinyPolicy(seed=5), monkeypatch)
    assert resumed.aer.regularizer.state_dict() != trainer.aer.regularizer.state_dict()
    resumed._load_checkpoint()  # resume_mode=auto: verl finds global_step_1
    assert resumed.global_steps == 1
    assert resumed.aer.regularizer.state_dict() == trainer.aer.regularizer.state_dict()
    assert torch.equal(resumed.actor_rollout_wg.worker.engine.policy.W, policy.W)


def test_legacy_dapo_correctness_state_before_verl_and_resume_policy(tmp_path, gloo, hydra_module, store, registry,
                                                                     monkeypatch):
    """Issue 22 items 1, 3, 4 on RayPPOTrainer: the coefficients come from non_tensor_batch["acc"]
    (where fit puts the reward manager's reward_extra_info) rather than the penalised
    token_level_scores; the controller steps with the actor update, not the old-log-prob pass; the
    state is on disk before verl saves the actor and writes its tracker; a resume without it fails."""
    from verl.trainer.ppo.ray_trainer import compute_advantage

    cfg = verl_config(tmp_path, "trainer.use_v1=False", "actor_rollout_ref.actor.ppo_mini_batch_size=3")
    policy = TinyPolicy()
    trainer, wg = build_legacy(cfg, policy, monkeypatch)
    keys, batch = legacy_batch(store, policy, step=1)
    acc = np.array([solved(k.split("_")[0], int(k.split("_")[1])) for k in keys])
    long = batch.batch["response_mask"].sum(-1).numpy() >= OVERLONG
    assert (acc.astype(bool) & long).any()  # right answers that ran long
    last = batch.batch["response_mask"].sum(-1) - 1
    batch.batch["token_level_scores"][torch.arange(len(keys)), last] -= torch.from_numpy(PENALTY * long).float()
    batch.non_tensor_batch["acc"] = acc.astype(bool)  # math_dapo's compute_score returns acc as a bool
    trainer.global_steps = 1
    old_log_prob, _ = trainer._compute_old_log_prob(batch)
    assert trainer.aer.regularizer.controller.steps == 0  # a critic warm-up step would stop here
    batch = batch.union(old_log_prob.pop(batch_keys=["old_log_probs"]))
    batch = compute_advantage(batch, adv_estimator=cfg.algorithm.adv_estimator, num_repeat=N_ROLLOUT)
    trainer._update_actor(batch)
    assert trainer.aer.regularizer.controller.steps == 1
    ref = expected_coefficients(keys, trainer.aer.regularizer.value, lambda u, s, k: solved(u, int(s)))
    for k, c in zip(keys, batch.batch[COEF_KEY].tolist()):
        assert c == pytest.approx(ref[k], rel=1e-6, abs=1e-12)

    at_save = spy_state_at_save(wg)
    trainer._save_checkpoint()
    assert at_save == [True] and (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "1"
    (tmp_path / "ckpt" / "global_step_1" / STATE_FILE).unlink()
    resumed, _ = build_legacy(verl_config(tmp_path, "trainer.use_v1=False"), TinyPolicy(seed=5), monkeypatch)
    with pytest.raises(RuntimeError, match=r"global_step_1, which holds no AER state"):
        resumed._load_checkpoint()


# ----------------------------------------------------------------------------------------------
# two gloo data-parallel ranks, every loss_agg_mode

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
DP_N, DP_SCALE = 8, 6  # samples in the global mini-batch; loss_scale_factor


def dp_samples():
    """The global mini-batch: (prompt, response, coefficient) per sample, uneven lengths."""
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(DP_N):
        prompt = torch.randint(1, V, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
        resp = torch.randint(1, V, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        out.append((prompt, resp, float(torch.rand(1, generator=g)) * 0.01 + 0.001 * i))
    return out


def dp_shard(rank: int) -> TensorDict:
    """Rank ``rank``'s contiguous half, as verl's DP dispatch splits a batch; zero advantages, so the
    policy-gradient term has no gradient and the gradient is the AER term's alone."""
    def jag(ts):
        return torch.nested.as_nested_tensor(ts, layout=torch.jagged)

    rows = dp_samples()[rank * DP_N // 2:(rank + 1) * DP_N // 2]
    ids = [torch.cat([p, r]) for p, r, _ in rows]
    td = tu.get_tensordict({
        "prompts": jag([p for p, _, _ in rows]), "responses": jag([r for _, r, _ in rows]), "input_ids": jag(ids),
        "position_ids": jag([torch.arange(len(x)) for x in ids]),
        "response_mask": jag([torch.ones_like(r) for _, r, _ in rows]),
        "loss_mask": jag([torch.ones_like(r) for _, r, _ in rows]),
        "old_log_probs": jag([torch.zeros(len(r)) for _, r, _ in rows]),
        "advantages": jag([torch.zeros(len(r)) for _, r, _ in rows]),
        COEF_KEY: torch.tensor([c for _, _, c in rows]),
        "sample_idx": torch.arange(len(rows)) + rank * DP_N // 2,
    })
    tu.assign_non_tensor(td, global_batch_size=DP_N, mini_batch_size=DP_N, epochs=1, seed=3,
                         dataloader_kwargs={"shuffle": True}, calculate_entropy=True)
    return td


def dp_reference(mode: str) -> tuple[float, torch.Tensor]:
    """float64 -agg(c_i H_it) over the global mini-batch from each mode's formula, and its gradient in W."""
    W = TinyPolicy().W.detach().double().requires_grad_(True)
    seq_sums, seq_means, tokens = [], [], 0
    for prompt, resp, c in dp_samples():
        ids = torch.cat([prompt, resp])
        z = W[ids[len(prompt) - 1:len(prompt) - 1 + len(resp)]]
        p = torch.softmax(z, -1)
        h = torch.logsumexp(z, -1) - (p * z).sum(-1)
        seq_sums.append(c * h.sum())
        seq_means.append(c * h.mean())
        tokens += len(resp)
    total = torch.stack(seq_sums).sum()
    agg = {
        "token-mean": total / tokens,
        "token-sum": total,
        "seq-mean-token-sum": total / DP_N,
        "seq-mean-token-mean": torch.stack(seq_means).sum() / DP_N,
        "seq-mean-token-sum-norm": total / DP_N / DP_SCALE,
    }[mode]
    (grad,) = torch.autograd.grad(-agg, W)
    return float(-agg.detach()), grad


def _dp_rank(rank: int, init_file: str, queue) -> None:
    from verl.workers.config import ActorConfig

    from entropy_reg.integrations.verl import make_loss_fn

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        results = {}
        for mode in MODES:
            cfg = ActorConfig(strategy="fsdp", ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2, rollout_n=4,
                              loss_agg_mode=mode, loss_scale_factor=DP_SCALE, calculate_entropy=True)
            worker = cpu_worker(TinyPolicy(), cfg)
            worker.loss_fn = make_loss_fn(cfg)
            TrainingWorker.train_mini_batch(worker, dp_shard(rank))
            records = worker.engine.micro_batches
            results[mode] = {
                # averaged over the 2 ranks, as FSDP does; as a list (a tensor would travel as a shared fd)
                "grad": worker.engine.grads[0].tolist(),
                "bonus": sum(float(r["metrics"]["actor/aer/bonus"].aggregate()) for r in records),
                "global": records[0]["global"], "seen": sorted(i for r in records for i in r["sample_idx"].tolist()),
            }
        queue.put((rank, results))
    except BaseException as exc:  # report, never hang the parent
        queue.put((rank, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_give_the_float64_bonus_in_every_mode(tmp_path):
    """Two data-parallel ranks (forked processes, gloo) run verl's train_mini_batch on their halves:
    verl's engine all-reduces the token count, the AER term is normalized by the global counts, and
    the rank-averaged gradient and the mean of the ranks' bonus equal the float64 reference over
    the whole mini-batch, for every loss_agg_mode."""
    import multiprocessing as mp

    assert not dist.is_initialized()  # a group copied by fork would hang the children
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dp_rank, args=(r, str(tmp_path / "gloo"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    assert all(isinstance(results[r], dict) for r in (0, 1)), results
    tokens = sum(len(r) for _, r, _ in dp_samples())
    for mode in MODES:
        ref_value, ref_grad = dp_reference(mode)
        r0, r1 = results[0][mode], results[1][mode]
        assert r0["global"] == {"dp_size": 2, "batch_num_tokens": tokens, "global_batch_size": DP_N}
        assert r0["seen"] == [0, 1, 2, 3] and r1["seen"] == [4, 5, 6, 7]
        assert r0["grad"] == r1["grad"]  # the all-reduced gradient
        assert ref_grad.abs().sum() > 0
        torch.testing.assert_close(torch.tensor(r0["grad"], dtype=torch.float64), ref_grad, rtol=2e-4, atol=1e-8)
        assert (r0["bonus"] + r1["bonus"]) / 2 == pytest.approx(-ref_value, rel=1e-5)
