"""The one-pass log-prob + entropy inside verl 0.9.1's actor forward (``entropy_reg.integrations.verl.fused``).

Runs verl's own ``FSDPEngineWithLMHead.forward_step``, ``prepare_model_inputs`` and
``prepare_model_outputs`` (remove-padding and padded paths, scalar and per-sample temperature,
verl's static packed pad, its chunked / checkpointed entropy settings), with swap on and off.
Stubbed: the model body (``module`` returns ``W[input_ids]``, a logits table, instead of an
FSDP-wrapped LLM) and the device (``get_device_id`` / ``get_device_name`` return "cpu").
References are float64, from the logits table.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl", reason="install the extra: pip install 'entropy-reg[verl]'")

from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils import torch_functional as verl_F  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl as fsdp_impl  # noqa: E402

from entropy_reg.integrations.verl import fused  # noqa: E402
from entropy_reg.integrations.verl.fused import FusedEntropyLoss  # noqa: E402
from tests.test_integration_verl_trainers import gloo, hydra_module  # noqa: E402,F401  (fixtures)

V = 11
LENS = [5, 3, 7, 1, 4]


@pytest.fixture(autouse=True)
def cpu_and_clean(monkeypatch):
    monkeypatch.setattr(fsdp_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(fsdp_impl, "get_device_name", lambda: "cpu")
    fused.install()
    yield
    fused.uninstall()


class LogitsTable(torch.nn.Module):
    """The model body stub: logits of position t = W[token t]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **_):
        return SimpleNamespace(logits=self.W[input_ids])


def engine(module: LogitsTable, *, pad_to_length: bool = False, chunking: bool = False, checkpointing: bool = False):
    """verl's FSDPEngineWithLMHead without its __init__ (which builds the FSDP model): the attributes
    its forward reads, set as its __init__ sets them from the engine config."""
    e = object.__new__(fsdp_impl.FSDPEngineWithLMHead)
    e.module = module
    e.use_ulysses_sp = False
    e.pad_to_length, e.pad_to_length_bucket = pad_to_length, 8
    e._autocast_dtype = torch.float32
    e.engine_config = SimpleNamespace(
        entropy_from_logits_with_chunking=chunking, entropy_checkpointing=checkpointing,
        entropy_from_logits_chunk_size=3,
    )
    e.compute_entropy_from_logits = (
        verl_F.entropy_from_logits_with_chunking if chunking else verl_F.entropy_from_logits
    )
    e.get_data_parallel_group = lambda: None
    return e


def micro_batch(temperature, remove_padding: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, V, (n,), generator=g) for n in LENS]
    td = tu.get_tensordict({
        "input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged),
        "position_ids": torch.nested.as_nested_tensor([torch.arange(n) for n in LENS], layout=torch.jagged),
    })
    if isinstance(temperature, torch.Tensor):
        td["temperature"] = temperature
    else:
        tu.assign_non_tensor(td, temperature=temperature)
    tu.assign_non_tensor(td, use_remove_padding=remove_padding, calculate_entropy=True)
    return td, ids


def weights(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(LENS)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


def loss_of(model_output, data=None, dp_group=None, **_):
    """A loss reading both outputs at every position: sum a * log p + b * H."""
    a, b = weights()
    return (a * model_output["log_probs"].values()).sum() + (b * model_output["entropy"].values()).sum(), {}


def reference(W: torch.Tensor, ids: list[torch.Tensor], temperature) -> tuple[torch.Tensor, ...]:
    """float64 (log p, H, dL/dW) of the packed sequence, labels = the packed ids rolled by one (verl's layout)."""
    W64 = W.detach().double().requires_grad_(True)
    flat = torch.cat(ids)
    t = temperature if isinstance(temperature, torch.Tensor) else torch.full((len(ids),), float(temperature))
    t_tok = torch.cat([t[i].double().expand(n) for i, n in enumerate(LENS)])
    z = W64[flat] / t_tok[:, None]
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, torch.roll(flat, -1)[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    a, b = weights()
    ((a.double() * logp).sum() + (b.double() * ent).sum()).backward()
    return logp.detach(), ent.detach(), W64.grad


TEMPS = {"one": 1.0, "scalar": 0.7, "per-sample": torch.tensor([0.5, 1.0, 1.3, 0.8, 2.0])}


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("remove_padding", [True, False])
@pytest.mark.parametrize("temp", list(TEMPS))
@pytest.mark.parametrize("variant", ["plain", "static-pad", "chunking", "checkpointing"])
def test_forward_step_matches_float64(swap, remove_padding, temp, variant):
    """verl's forward_step with the swap on and off: log-probs, entropy and the gradient that reaches
    the model (through the logits) equal the float64 reference."""
    module = LogitsTable()
    e = engine(module, pad_to_length=variant == "static-pad", chunking=variant == "chunking",
               checkpointing=variant == "checkpointing")
    data, ids = micro_batch(TEMPS[temp], remove_padding)
    loss_fn = FusedEntropyLoss(loss_of) if swap else loss_of
    loss, out = e.forward_step(data, loss_function=loss_fn, forward_only=False)
    loss.backward()
    logp64, ent64, grad64 = reference(module.W, ids, TEMPS[temp])
    mo = out["model_output"]
    torch.testing.assert_close(mo["log_probs"].values().double(), logp64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mo["entropy"].values().double(), ent64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.W.grad.double(), grad64, rtol=1e-4, atol=1e-5)


def test_swap_never_calls_verls_entropy_or_logprob_functions(monkeypatch):
    """With the swap on, verl's entropy functions and its log-prob function are not called in the
    actor forward; one kernel pass serves both outputs. With it off they are (so this can fail)."""
    calls: list[str] = []

    def spy(name, fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(verl_F, "entropy_from_logits", spy("entropy", verl_F.entropy_from_logits))
    # verl's logprobs_from_logits ends there on the CPU (no flash-attn, no NPU).
    monkeypatch.setattr(verl_F, "logprobs_from_logits_v2", spy("logprobs", verl_F.logprobs_from_logits_v2))
    passes: list[int] = []
    original_run = fused.PairedPass.run

    def counting_run(self, *a, **k):
        passes.append(1)
        return original_run(self, *a, **k)

    monkeypatch.setattr(fused.PairedPass, "run", counting_run)
    for remove_padding in (True, False):
        module = LogitsTable()
        e = engine(module)
        e.compute_entropy_from_logits = spy("entropy", e.compute_entropy_from_logits)
        data, _ = micro_batch(0.7, remove_padding)
        loss, _ = e.forward_step(data, loss_function=FusedEntropyLoss(loss_of), forward_only=False)
        loss.backward()
        assert calls == [] and len(passes) == 1
        passes.clear()
        e.forward_step(micro_batch(0.7, remove_padding)[0], loss_function=loss_of, forward_only=False)
        assert "entropy" in calls and "logprobs" in calls and passes == []
        calls.clear()


def test_forward_only_stays_verls(monkeypatch):
    """A forward with no loss (old log-probs, reference policy) runs verl's own functions, not the pair."""
    monkeypatch.setattr(fused.PairedPass, "run", lambda *a, **k: pytest.fail("the pair ran without a fused loss"))
    module = LogitsTable()
    data, ids = micro_batch(1.0, True)
    with torch.no_grad():
        _, res = engine(module).forward_step(data, loss_function=None, forward_only=True)
    logp64, ent64, _ = reference(module.W, ids, 1.0)
    torch.testing.assert_close(res["model_output"]["entropy"].values().double(), ent64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["model_output"]["log_probs"].values().double(), logp64, rtol=1e-5, atol=1e-5)


def test_install_is_idempotent_and_uninstall_restores():
    wrapped = fsdp_impl.FSDPEngineWithLMHead.prepare_model_outputs
    fused.install()
    assert fsdp_impl.FSDPEngineWithLMHead.prepare_model_outputs is wrapped
    fused.uninstall()
    assert fsdp_impl.FSDPEngineWithLMHead.prepare_model_outputs is not wrapped
    assert fsdp_impl.logprobs_from_logits is verl_F.logprobs_from_logits
    fused.install()


def test_fused_entropy_loss_refuses_a_non_callable():
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        FusedEntropyLoss(3)


# ----------------------------------------------------------------------------------------------
# three steps of verl's own v1 trainer loop, swap on and off


def test_three_trainer_steps_give_equal_parameters_on_and_off(tmp_path, monkeypatch, hydra_module, registry, gloo):
    """verl's PPOTrainerSync.fit (as tests/test_integration_verl_trainers.py drives it, AER installed) for
    three steps, with the engine's forward_step being verl's real FSDP one (model body: the logits
    table): the parameters after the steps agree with ``+aer.fused_entropy`` true and false."""
    import transfer_queue

    from tests import test_integration_verl_trainers as vt

    class RealForwardEngine(vt.CPUEngine):
        """The adapter tests' CPU engine, but its forward is verl's FSDPEngineWithLMHead.forward_step
        and its optimizer step applies SGD."""

        use_ulysses_sp, pad_to_length, _autocast_dtype = False, False, torch.float32
        engine_config = SimpleNamespace(entropy_from_logits_with_chunking=False, entropy_checkpointing=False)
        compute_entropy_from_logits = staticmethod(verl_F.entropy_from_logits)
        _get_packed_pad_size = fsdp_impl.FSDPEngineWithLMHead._get_packed_pad_size
        _gather_and_unpad_packed = fsdp_impl.FSDPEngineWithLMHead._gather_and_unpad_packed

        def __init__(self, policy, group=None):
            super().__init__(policy, group)
            self.module = lambda input_ids, **_: SimpleNamespace(logits=policy.W[input_ids])

        def optimizer_step(self) -> float:
            norm = super().optimizer_step()
            with torch.no_grad():  # plain SGD, so the next step's rollout and update see new parameters
                self.policy.W -= 5.0 * self.grads[-1]
            return norm

        def forward_step(self, micro_batch, loss_function, forward_only):
            return fsdp_impl.FSDPEngineWithLMHead.forward_step(self, micro_batch, loss_function, forward_only)

        def prepare_model_inputs(self, micro_batch):
            return fsdp_impl.FSDPEngineWithLMHead.prepare_model_inputs(self, micro_batch)

        def prepare_model_outputs(self, *args, **kwargs):  # looked up at call time: the swap's wrapper when installed
            return fsdp_impl.FSDPEngineWithLMHead.prepare_model_outputs(self, *args, **kwargs)

    monkeypatch.setattr(vt, "CPUEngine", RealForwardEngine)
    params, passes = {}, []
    original_run = fused.PairedPass.run
    monkeypatch.setattr(fused.PairedPass, "run", lambda self, *a, **k: (passes.append(1), original_run(self, *a, **k)))
    for on in (True, False):
        store = vt.FakeStore()
        for name in ("kv_batch_put", "kv_batch_get", "kv_clear"):
            monkeypatch.setattr(transfer_queue, name, getattr(store, name))
        trainer, _ = vt.run_v1(tmp_path, f"run-{on}", store, monkeypatch, "trainer.total_training_steps=3",
                               "trainer.save_freq=-1", f"+aer.fused_entropy={str(on).lower()}")
        params[on] = trainer.actor_rollout_wg.worker.engine.policy.W.detach().clone()
        assert (len(passes) > 0) == on  # the pair served every training micro-batch only with the swap on
        passes.clear()
    assert not torch.equal(params[True], vt.TinyPolicy().W.detach())  # training moved the parameters
    torch.testing.assert_close(params[True], params[False], rtol=1e-5, atol=1e-6)
