"""Drop-in AER for the RL trainers people use: verl, TRL and OpenRLHF.

One module per trainer, each importing its framework only when it is itself
imported (``import entropy_reg.integrations`` imports none of them):

- :mod:`entropy_reg.integrations.verl`: driver-side coefficients carried as
  batch data, a worker loss function wrapping verl's ``ppo_loss``, state beside
  ``global_step_N`` (extra ``entropy-reg[verl]``);
- :mod:`entropy_reg.integrations.trl`: an ``AERGRPOTrainer`` subclass of
  TRL's ``GRPOTrainer`` (extra ``entropy-reg[trl]``);
- :mod:`entropy_reg.integrations.openrlhf`: ``python -m
  entropy_reg.integrations.openrlhf`` runs OpenRLHF's ``train_ppo_ray`` with
  AER's experience maker, actor trainer and policy actor swapped in on every
  Ray worker.

Shared here: :class:`EntropyWindow`, the token-weighted entropy of one
optimizer step gathered over its micro-batches and data-parallel ranks (the
statistic each adapter feeds to :meth:`AdaptiveEntropyRegularizer.update`),
and :func:`save_state` / :func:`load_state`, the regularizer's state as a JSON
file beside a trainer checkpoint. See ``docs/integrations.md``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import torch
from torch import Tensor

from ..distributed import all_reduce_sum
from ..regularizer import AdaptiveEntropyRegularizer, AERConfig, config_names

__all__ = [
    "EntropyWindow", "STATE_FILE", "save_state", "load_state", "as_regularizer", "checked_regularizer",
    "check_resumed",
]

logger = logging.getLogger(__name__)

STATE_FILE = "aer_state.json"


def as_regularizer(regularizer: AdaptiveEntropyRegularizer | AERConfig | None) -> AdaptiveEntropyRegularizer:
    """An :class:`AdaptiveEntropyRegularizer` from itself, its config, or None (the defaults)."""
    if isinstance(regularizer, AdaptiveEntropyRegularizer):
        return regularizer
    if regularizer is None or isinstance(regularizer, AERConfig):
        return AdaptiveEntropyRegularizer(regularizer)
    raise TypeError(
        f"regularizer must be an AdaptiveEntropyRegularizer, an AERConfig or None, got {type(regularizer).__name__}"
    )


def checked_regularizer(config: AERConfig, flag: Callable[[str], str]) -> AdaptiveEntropyRegularizer:
    """The regularizer of ``config``; a bad setting raises its error naming the setting as the user typed it.

    ``flag`` maps an :class:`AERConfig` field (which the regularizer's errors name) to the
    launcher's spelling (``--aer.coef_max``, ``+aer.coef_max``). Same exception type, same
    text otherwise.
    """
    with config_names({field: flag(field) for field in AERConfig.__dataclass_fields__}):
        return as_regularizer(config)


def check_resumed(regularizer: AdaptiveEntropyRegularizer, restored: bool, checkpoint: str, setting: str) -> None:
    """After a trainer resumed from ``checkpoint``: raise unless AER's state came with it (``restored``).

    Without the state AER would start anew, anchoring its target on the
    already-trained policy: a different run from there on, so it is refused
    (RuntimeError) unless ``regularizer.config.reanchor_on_missing_state`` asks
    for exactly that (then a warning). ``setting`` is how the user turns it on.
    """
    if restored:
        return
    if regularizer.config.reanchor_on_missing_state:
        logger.warning("AER: %s holds no AER state; AER starts anew and anchors its target on the resumed policy "
                       "(%s)", checkpoint, setting)
        return
    raise RuntimeError(
        f"AER: resuming from {checkpoint}, which holds no AER state (saved without AER, or interrupted before AER's "
        "state was written). AER would start anew and anchor its target on the already-trained policy: a different "
        f"run from here on. Resume from a checkpoint saved with AER, or set {setting} to start AER anew on purpose."
    )


class EntropyWindow:
    """Token-weighted mean entropy over the micro-batches of one optimizer step, across ranks.

        H = sum_{ranks} sum_{micro-batches} sum_{i,t} m_it H_it / sum_{ranks} sum_{micro-batches} sum_{i,t} m_it

    in nats. :meth:`add` keeps a float64 ``[sum, count]`` pair on the entropy's
    device (no host sync per micro-batch); :meth:`reduce` all-reduces the pair
    once (when ``torch.distributed`` is initialized), so every rank gets the
    same number and so the same coefficient. Every rank must call
    :meth:`reduce` at the same step: it is a collective.
    """

    def __init__(self) -> None:
        self._stats: Tensor | None = None

    @property
    def empty(self) -> bool:
        """True when nothing was added since the last :meth:`reduce`."""
        return self._stats is None

    @torch.no_grad()
    def add(self, entropy: Tensor, mask: Tensor) -> None:
        """Add one micro-batch: ``entropy[B, S]`` (nats) over ``mask[B, S]`` (bool or 0/1)."""
        if not isinstance(entropy, Tensor) or not entropy.is_floating_point():
            raise TypeError(f"entropy must be a floating-point tensor, got {type(entropy).__name__}")
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != entropy.shape:
            raise ValueError(f"mask must have the shape of entropy {tuple(entropy.shape)}, got {tuple(mask.shape)}")
        valid = mask.to(entropy.device) != 0
        # where(): NaN in padding must not leak into the sum.
        total = torch.where(valid, entropy.detach().to(torch.float64), 0.0).sum()
        stats = torch.stack([total, valid.sum(dtype=torch.float64)])
        self._stats = stats if self._stats is None else self._stats + stats

    def reduce(self, *, group: Any = None) -> float:
        """The window's mean entropy over all ranks of ``group``; then the window starts anew.

        Raises ValueError (window kept) when no token was added on any rank.
        """
        if self._stats is None:
            raise ValueError("EntropyWindow.reduce: nothing was added since the last reduce")
        reduced = all_reduce_sum(self._stats, group=group)
        if float(reduced[1]) == 0.0:
            raise ValueError("EntropyWindow.reduce: the mask selected no token on any rank")
        self._stats = None
        return float(reduced[0] / reduced[1])


def save_state(regularizer: AdaptiveEntropyRegularizer, directory: str | os.PathLike[str]) -> str:
    """Write ``regularizer.state_dict()`` to ``directory/aer_state.json`` (atomically); returns the path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        # allow_nan=False: a NaN in the state is a bug, never a value to resume from.
        json.dump(regularizer.state_dict(), f, allow_nan=False, indent=1)
    os.replace(tmp, path)
    return path


def load_state(
    regularizer: AdaptiveEntropyRegularizer, directory: str | os.PathLike[str], *, missing_ok: bool = False
) -> bool:
    """Restore ``directory/aer_state.json`` into ``regularizer``; True when a file was read.

    A missing file raises FileNotFoundError, or returns False with
    ``missing_ok=True`` (a checkpoint written before AER was turned on).
    """
    path = os.path.join(os.fspath(directory), STATE_FILE)
    if not os.path.exists(path):
        if missing_ok:
            return False
        raise FileNotFoundError(f"directory has no {STATE_FILE}: {path}")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    regularizer.load_state_dict(state)
    return True
