"""OpenRLHF's actor forward with log-probs and entropy from one kernel pass (``--aer.fused_entropy``, default on).

OpenRLHF 0.11.2's ``Actor.forward`` (``models/actor.py``) casts the logits to a
float32 copy, divides them by the temperature in place, then calls
``compute_entropy`` (softmax and ``softmax * logits`` over EVERY position, prompt
included, both kept for the backward) and ``log_probs_from_logits`` (a second pass).

:func:`install` rebinds those two names in ``openrlhf.models.actor`` to
dispatchers. Inside :func:`actor_pass` (which ``AERActorPPOTrainer.training_step``
opens around OpenRLHF's own ``training_step``) the entropy call runs one
:func:`entropy_reg.token_logprobs_and_entropy` pass over the rows the actor loss
reads, the response positions under ``action_mask`` (prompt and padding rows give
0 and are never read), and the log-prob call gets that pass's log-probs. Outside
it (experience making, the reference model) OpenRLHF's functions run unchanged.

- In-place backward: on. After the forward nothing reads the logits (OpenRLHF's
  float32 copy, or the model's own float32 output, whose matmul backward does not
  need it), so the gradient is written over them.
- The float32 copy stays: it is made inside ``Actor.forward``, before these calls;
  removing it would mean replacing OpenRLHF's forward. The kernel would read bf16
  itself (float32 math).
- ``--ds.packing_samples``: the swap steps aside (OpenRLHF's own functions run),
  because the packed layout comes from flash-attn's unpadding, which cannot run
  in this project's CPU tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from openrlhf.models import actor as actor_module
from torch import Tensor

from ..fused import PairedPass, Rebinding, active, use

__all__ = ["install", "installed", "uninstall", "response_rows", "actor_pass"]

_rebound = Rebinding()


def _compute_entropy(logits: Tensor) -> Tensor:
    pair = active()
    return _rebound.originals["compute_entropy"](logits) if pair is None else pair.entropy_of(logits)


def _log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    pair = active()
    if pair is None or temperature != 1.0:  # Actor.forward scales before and passes 1.0
        return _rebound.originals["log_probs_from_logits"](logits, labels, temperature)
    return pair.logprobs_of(logits, labels)


def response_rows(sequences: Tensor, action_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(labels, rows) of OpenRLHF's unpacked ``[B, S]`` layout.

    Row t predicts token t + 1 (labels = sequences rolled by one, as ``Actor.forward``
    rolls them); the loss reads rows ``S - 1 - A + j`` where ``action_mask[:, j]``
    (``action_mask`` is ``[B, A]`` over the shifted sequence's last A positions).
    """
    b, s = sequences.shape
    a = action_mask.shape[1]
    if action_mask.shape[0] != b or not 0 < a < s:
        raise ValueError(
            f"action_mask must be [B, A] with 0 < A < S for sequences {tuple(sequences.shape)}, "
            f"got {tuple(action_mask.shape)}"
        )
    rows = torch.zeros(b, s, dtype=torch.bool, device=sequences.device)
    rows[:, s - 1 - a : s - 1] = action_mask.to(device=sequences.device, dtype=torch.bool)
    return torch.roll(sequences, shifts=-1, dims=1), rows


@contextlib.contextmanager
def actor_pass(sequences: Tensor, action_mask: Tensor, *, packing_samples: bool) -> Iterator[PairedPass | None]:
    """The actor forward inside the block gets its entropy and log-probs from one pass (None: steps aside)."""
    if packing_samples:
        yield None
        return
    labels, rows = response_rows(sequences, action_mask)
    with use(PairedPass(labels=labels, mask=rows, inplace_backward=True)) as pair:
        yield pair


def installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return bool(_rebound)


def install() -> None:
    """Rebind ``compute_entropy`` / ``log_probs_from_logits`` in ``openrlhf.models.actor``.

    Idempotent; inert outside :func:`actor_pass`.
    """
    if installed():
        return
    _rebound.swap("compute_entropy", actor_module, "compute_entropy", _compute_entropy)
    _rebound.swap("log_probs_from_logits", actor_module, "log_probs_from_logits", _log_probs_from_logits)


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    _rebound.undo()
