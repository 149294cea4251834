"""One kernel pass serving a trainer's two per-token functions: log-probs and entropy.

verl (FSDP and Megatron engines) and OpenRLHF compute, in the actor forward,
``log p_y`` and ``H = -sum_j p_j log p_j`` (nats) with two functions, each a full
pass over the ``[N, V]`` logits, the entropy one keeping a softmax-sized buffer
for its backward. A :class:`PairedPass` stands in for both while it is
:func:`active`: the first of the two calls runs
:func:`entropy_reg.token_logprobs_and_entropy` once (both outputs, one backward
that forms the combined gradient, two float32 per row kept for it) and the
other call is handed the output already computed.

Each trainer module rebinds the trainer's own function names to dispatchers
that ask :func:`active`: outside :func:`use` they call the trainer's function
unchanged, so a process can hold the swap without it acting anywhere else
(experience making, reference passes).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..entropy import token_logprobs_and_entropy

__all__ = ["PairedPass", "Rebinding", "active", "use"]

_ACTIVE: contextvars.ContextVar[PairedPass | None] = contextvars.ContextVar("entropy_reg_paired_pass", default=None)


class PairedPass:
    """Log-probs and entropy of one logits tensor from one call of ``token_logprobs_and_entropy``.

    Args:
        labels: the token ids, when the trainer's entropy function is called
            first (it takes no labels); else None, and the log-prob call brings them.
        mask: optional bool rows to compute (others give 0 and gradient 0, are
            never read): the positions the loss never reads.
        inplace_backward: allow the gradient to be written over the logits; only
            where the trainer's own code lets its log-prob function destroy them.
        process_group: the vocabulary-parallel group (Megatron's tensor-parallel
            group): the logits are this rank's shard, labels global ids.

    After the pass, ``logprobs`` and ``entropy`` hold the float32 outputs
    (``[...]``, the logits' leading shape) and ``passes`` counts kernel calls.
    """

    def __init__(
        self,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        inplace_backward: bool = False,
        process_group: Any = None,
    ) -> None:
        self.labels = labels
        self.mask = mask
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.logits: Tensor | None = None
        self.logprobs: Tensor | None = None
        self.entropy: Tensor | None = None
        self.passes = 0

    def run(self, logits: Tensor, labels: Tensor | None = None, *, inplace_backward: bool = True) -> None:
        """One kernel pass over ``logits``; ``inplace_backward`` narrows the pair's own permission."""
        labels = self.labels if labels is None else labels
        if labels is None:
            raise ValueError("PairedPass: the entropy call came first and no labels were given to the pair")
        self.logprobs, self.entropy = token_logprobs_and_entropy(
            logits,
            labels.to(logits.device),
            mask=self.mask,
            inplace_backward=self.inplace_backward and inplace_backward,
            process_group=self.process_group,
        )
        self.logits, self.labels = logits, labels
        self.passes += 1

    def logprobs_of(self, logits: Tensor, labels: Tensor, *, inplace_backward: bool = True) -> Tensor:
        """Stands in for the trainer's log-prob function: the pass's log-probs (running it if not yet run)."""
        if self.logits is not logits:
            self.run(logits, labels, inplace_backward=inplace_backward)
        elif labels is not self.labels:
            # The entropy call ran the pass with labels derived from the batch: they must be the trainer's.
            # Checked on the device (no host sync in the actor update): a RuntimeError when it runs.
            same = labels.shape == self.labels.shape and (labels.to(self.labels.device) == self.labels).all()
            message = "PairedPass: the trainer's log-prob labels differ from the pair's; layout not supported"
            torch._assert_async(torch.as_tensor(same), message)
        return self.logprobs

    def entropy_of(self, logits: Tensor) -> Tensor:
        """Stands in for the trainer's entropy function: the pass's entropy (running it if not yet run)."""
        if self.logits is not logits:
            self.run(logits)
        return self.entropy


def active() -> PairedPass | None:
    """The pair of the actor forward in progress, or None (the trainer's own functions run)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use(pair: PairedPass) -> Iterator[PairedPass]:
    """Make ``pair`` serve the dispatchers' calls inside the block."""
    if not isinstance(pair, PairedPass):
        raise TypeError(f"pair must be a PairedPass, got {type(pair).__name__}")
    token = _ACTIVE.set(pair)
    try:
        yield pair
    finally:
        _ACTIVE.reset(token)


class Rebinding:
    """Names of a trainer's modules rebound to this package's dispatchers, undoably.

    ``originals[key]`` keeps each replaced object (the dispatchers call it when no
    pass is :func:`active`); :meth:`undo` puts them all back. True while any is rebound.
    """

    def __init__(self) -> None:
        self.originals: dict[str, Any] = {}
        self._homes: dict[str, tuple[Any, str]] = {}

    def __bool__(self) -> bool:
        return bool(self.originals)

    def swap(self, key: str, owner: Any, name: str, new: Any) -> None:
        """``owner.name = new``, keeping the original as ``originals[key]``."""
        self.originals[key] = getattr(owner, name)
        self._homes[key] = (owner, name)
        setattr(owner, name, new)

    def undo(self) -> None:
        for key, (owner, name) in self._homes.items():
            setattr(owner, name, self.originals.pop(key))
        self._homes.clear()
