"""verl's actor forward with log-probs and entropy from one kernel pass (``+aer.fused_entropy``, default on).

What verl 0.9.1 runs in the actor update when the entropy is needed:

- FSDP engine (``FSDPEngineWithLMHead.prepare_model_outputs``): ``entropy_from_logits``
  (a softmax kept for the backward; or its chunked / checkpointed variants), then a
  second pass ``logprobs_from_logits`` whose in-place backward verl turns off because
  the entropy still reads the logits.
- Megatron engine (``MegatronEngineWithLMHead._lm_head_logits_processor``): a clone of
  the logit shard, ``vocab_parallel_entropy`` (softmax kept) on one copy and
  ``vocab_parallel_log_probs_from_logits`` on the other.

:func:`install` wraps those two methods. When the loss verl hands them (the engines
pass the loss function down as ``logits_processor_func``) has a true
``fused_entropy`` attribute (:class:`~entropy_reg.integrations.verl.AERLoss` with the
setting on, or :class:`FusedEntropyLoss` around any loss), the method runs verl's own
code with ``calculate_entropy`` off, so verl computes only the log-probs, and its
log-prob function is served by a :class:`~entropy_reg.integrations.fused.PairedPass`
that computes the entropy in the same pass (Megatron: over the tensor-parallel group,
the ``process_group=`` path). The entropy then takes the log-probs' way out
(FSDP: the Ulysses gather and unpad, then the jagged layout). Consequences:

- verl's entropy functions are never called, so ``entropy_from_logits_with_chunking``,
  ``entropy_checkpointing`` and ``use_torch_compile`` (which compiles only that
  function) no longer matter: the pass keeps two floats per row, never a softmax;
- per-token temperature, remove-padding, Ulysses slicing, the static packed pad and
  DTensor logits stay verl's (they happen before the log-prob call);
- in-place backward (the gradient written over the logits) exactly where verl's own
  code would use it without entropy, except beside distillation's top-k processor and
  ``calculate_sum_pi_squared``, which read the same logits;
- ``use_fused_kernels`` (verl's fused lm_head, which never builds the logits) and
  ``distillation_only`` (no log-probs) are left to verl unchanged;
- forward-only calls (old log-probs, reference) pass no loss, so they stay verl's.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp import transformer_impl as fsdp_impl

from ..fused import PairedPass, Rebinding, active, use

__all__ = ["FUSED_ATTR", "FusedEntropyLoss", "install", "installed", "uninstall", "wants_fused", "megatron_logprobs"]

FUSED_ATTR = "fused_entropy"
_rebound = Rebinding()


def wants_fused(loss_fn: Any) -> bool:
    """Whether the loss verl passes down asks for the one-pass log-prob + entropy."""
    return bool(getattr(loss_fn, FUSED_ATTR, False))


class FusedEntropyLoss:
    """Any verl actor loss, marked so that the engine serves its log-probs and entropy in one pass.

    For the swap without AER (verl's own ``entropy_coeff``, or entropy for monitoring):
    ``actor_rollout_wg.set_loss_fn(FusedEntropyLoss(loss))`` in the driver. Picklable;
    unpickling it in a worker installs the swap there.
    """

    fused_entropy = True

    def __init__(self, loss_fn: Callable[..., Any]) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        install()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        install()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.loss_fn(*args, **kwargs)


def _flags(micro_batch: Any, *keys: str) -> dict[str, bool]:
    return {k: bool(tu.get_non_tensor_data(data=micro_batch, key=k, default=False)) for k in keys}


def _fsdp_logprobs(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``logprobs_from_logits`` as the FSDP engine module calls it; the pair's output inside a fused forward."""
    pair = active()
    if pair is None:
        return _rebound.originals["fsdp_logprobs"](logits=logits, labels=labels, inplace_backward=inplace_backward)
    return pair.logprobs_of(logits, labels, inplace_backward=inplace_backward)


def _fsdp_prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    original = _rebound.originals["fsdp_prepare"]
    f = _flags(micro_batch, "calculate_entropy", "use_fused_kernels", "distillation_only", "distillation_use_topk",
               "calculate_sum_pi_squared")
    if not wants_fused(logits_processor_func) or not f["calculate_entropy"] or f["use_fused_kernels"] \
            or f["distillation_only"]:
        return original(self, output, output_args, micro_batch, logits_processor_func)
    # verl's own code without entropy: it then computes only the log-probs, through the pair.
    batch = micro_batch.copy()
    tu.assign_non_tensor(batch, calculate_entropy=False)
    pair = PairedPass(inplace_backward=not (f["distillation_use_topk"] or f["calculate_sum_pi_squared"]))
    with use(pair):
        model_output = original(self, output, output_args, batch, logits_processor_func)
    if pair.entropy is None:
        raise RuntimeError("fused_entropy: verl's actor forward computed no log-probs; this verl path is not supported")
    entropy = pair.entropy
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        entropy = self._gather_and_unpad_packed(entropy, output_args["pad_size"])  # as verl treats its log-probs
    model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, micro_batch["input_ids"].offsets())
    return model_output


def megatron_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``vocab_parallel_log_probs_from_logits`` as the Megatron engine calls it; the pair's in a fused forward."""
    pair = active()
    if pair is None:
        return _rebound.originals["megatron_logprobs"](logits, labels)
    return pair.logprobs_of(logits, labels)


def _megatron_logits_processor(self, logits, label, temperature, **kwargs):
    original = _rebound.originals["megatron_processor"]
    if not (kwargs["calculate_entropy"] and wants_fused(kwargs["logits_processor_func"])) \
            or kwargs["distillation_only"]:
        return original(self, logits, label, temperature, **kwargs)
    from megatron.core import parallel_state as mpu

    # Without entropy verl hands the logit shard itself (no clone) to the log-prob function, which may destroy it.
    inplace = not (kwargs["distillation_use_topk"] or kwargs["calculate_sum_pi_squared"])
    pair = PairedPass(inplace_backward=inplace, process_group=mpu.get_tensor_model_parallel_group())
    with use(pair):
        ret = original(self, logits, label, temperature, **{**kwargs, "calculate_entropy": False})
    ret["entropy"] = pair.entropy
    return ret


def installed() -> bool:
    """True once :func:`install` has wrapped verl's engine in this process."""
    return bool(_rebound)


def install() -> None:
    """Wrap verl's FSDP engine (and the Megatron engine where megatron-core imports) in this process.

    Inert until a loss with ``fused_entropy = True`` reaches the engine; idempotent.
    Called when :class:`~entropy_reg.integrations.verl.AERLoss` (setting on) or
    :class:`FusedEntropyLoss` is built or unpickled, i.e. in every actor worker.
    """
    if installed():
        return
    fsdp = fsdp_impl.FSDPEngineWithLMHead
    _rebound.swap("fsdp_logprobs", fsdp_impl, "logprobs_from_logits", _fsdp_logprobs)
    _rebound.swap("fsdp_prepare", fsdp, "prepare_model_outputs",
                  functools.wraps(fsdp.prepare_model_outputs)(_fsdp_prepare_model_outputs))
    try:
        from verl.workers.engine.megatron import transformer_impl as megatron_impl
    except ImportError:  # no megatron-core in this environment: no Megatron engine to wrap
        return
    mcls = megatron_impl.MegatronEngineWithLMHead
    _rebound.swap("megatron_logprobs", megatron_impl, "vocab_parallel_log_probs_from_logits", megatron_logprobs)
    _rebound.swap("megatron_processor", mcls, "_lm_head_logits_processor",
                  functools.wraps(mcls._lm_head_logits_processor)(_megatron_logits_processor))


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    _rebound.undo()
