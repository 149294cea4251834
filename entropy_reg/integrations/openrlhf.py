"""AER for OpenRLHF, on the tensors it passes around (checked against OpenRLHF 0.11.2's code).

OpenRLHF does not install on a CPU-only machine (it builds flash-attn), so
this module imports nothing from it; ``docs/integrations.md`` shows the lines
to add to OpenRLHF itself. Three places:

- driver, experience maker (:func:`attach_weights`): next to
  ``compute_advantages_and_returns``, which restores prompt order with
  ``experience.index`` and groups rewards with
  ``reshape(-1, n_samples_per_prompt)``. The same grouping (prompt of sample
  ``k`` = ``k // n_samples_per_prompt``) gives each sample's difficulty weight
  ``w_i``, stored in ``experience.info["aer_weight"]``: ``info`` entries
  follow every sample through the replay buffer's split and re-batching.
  Weights, not coefficients: alpha lives on the actor ranks.
- actor, ``ActorPPOTrainer.training_step`` (:meth:`OpenRLHFAER.loss`): with
  ``H = output.entropy[:, -num_actions:]`` and OpenRLHF's
  ``loss_batch_info`` (``dp_size``, global ``batch_num_tokens`` /
  ``global_batch_size``),

      L_aer = - aggregate(alpha * w_i * H_it, action_mask)

  token-level (``loss_agg_mode == "token-mean"``: ``dp * sum / batch_num_tokens``)
  or sequence-level (``dp * sum_i mean_t / global_batch_size``), the two
  reductions of OpenRLHF's ``aggregate_loss``; the micro-batch's entropy also
  goes into an :class:`~entropy_reg.integrations.EntropyWindow`.
  :meth:`OpenRLHFAER.step`, called on every rank at the end of ``ppo_train``,
  all-reduces that window and updates the target and alpha once per RL step,
  so every rank holds the same alpha.
- checkpoint: :meth:`OpenRLHFAER.save_to` / :meth:`OpenRLHFAER.load_from` put the
  state in DeepSpeed's ``client_states`` dict (``client_states["aer"]``).

Temperature: OpenRLHF 0.11.2's ``Actor.forward`` divides the logits by
``rollout.temperature`` before ``compute_entropy``; earlier releases computed
the entropy of the raw logits, i.e. at temperature 1 whatever the sampling
temperature. AER's target is anchored to the first entropy it sees, so the
controller stays self-consistent either way; only the meaning of "entropy"
changes (raw-policy vs sampling-policy).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..difficulty import DifficultyAllocator
from ..regularizer import AdaptiveEntropyRegularizer, AERConfig
from . import EntropyWindow, as_regularizer

__all__ = ["WEIGHT_KEY", "STATE_KEY", "METRIC_PREFIX", "prompt_groups", "attach_weights", "OpenRLHFAER"]

WEIGHT_KEY = "aer_weight"
STATE_KEY = "aer"
METRIC_PREFIX = "aer/"


def prompt_groups(index: Sequence[int] | Tensor, n_samples_per_prompt: int) -> Tensor:
    """The prompt of each sample, ``index // n_samples_per_prompt`` (OpenRLHF's reshape grouping)."""
    if isinstance(n_samples_per_prompt, bool) or not isinstance(n_samples_per_prompt, int) or n_samples_per_prompt < 1:
        raise ValueError(f"n_samples_per_prompt must be an int >= 1, got {n_samples_per_prompt!r}")
    idx = torch.as_tensor(index)
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"index must be 1-D integers, got dtype {idx.dtype} and shape {tuple(idx.shape)}")
    return idx.long() // n_samples_per_prompt


def attach_weights(
    experiences: Sequence[Any],
    n_samples_per_prompt: int,
    allocator: DifficultyAllocator | AdaptiveEntropyRegularizer,
) -> dict[str, float]:
    """Driver side: ``experience.info["aer_weight"] = w`` (``[B]`` float32) for each experience.

    Reads ``experience.rewards`` (``[B]``, one verifiable reward per sample)
    and ``experience.index`` (each sample's position in prompt order) of the
    whole rollout batch, so groups split across experiences are whole.
    ``allocator``: a :class:`DifficultyAllocator` (the driver needs nothing
    else), or a regularizer whose allocator to use. Returns its metrics.
    """
    if isinstance(allocator, AdaptiveEntropyRegularizer):
        allocator = allocator.allocator
    if not isinstance(allocator, DifficultyAllocator):
        raise TypeError(f"allocator must be a DifficultyAllocator, got {type(allocator).__name__}")
    if not experiences:
        raise ValueError("experiences must not be empty")
    rewards = torch.cat([torch.as_tensor(e.rewards).reshape(-1).float().cpu() for e in experiences])
    index = [i for e in experiences for i in e.index]
    if len(index) != rewards.numel():
        raise ValueError(f"experience.index has {len(index)} entries in all but rewards has {rewards.numel()}")
    weights = allocator.alloc(rewards, prompt_groups(index, n_samples_per_prompt))
    for experience, w in zip(experiences, weights.split([len(e.index) for e in experiences])):
        experience.info[WEIGHT_KEY] = w.to(torch.as_tensor(experience.rewards).device)
    return allocator.metrics(METRIC_PREFIX)


def _as_weights(weights: Tensor | Sequence[Any], rows: int, device: torch.device) -> Tensor:
    """``info["aer_weight"]`` as ``[rows]`` float32: a tensor, or the list of 0-d tensors that
    OpenRLHF's ``make_experience_batch`` builds when it re-batches single samples."""
    w = weights if isinstance(weights, Tensor) else torch.stack([torch.as_tensor(x) for x in weights])
    w = w.reshape(-1).to(device=device, dtype=torch.float32)
    if w.numel() != rows:
        raise ValueError(f"weights has {w.numel()} entries but action_mask has {rows} rows")
    return w


class OpenRLHFAER:
    """Actor-side AER state for OpenRLHF: one object per actor rank, identical on all of them.

    Args:
        regularizer: an :class:`AdaptiveEntropyRegularizer`, an :class:`AERConfig`, or None.
        token_level_loss: OpenRLHF's ``actor.loss_agg_mode == "token-mean"``
            (False: its per-sequence reduction).
    """

    def __init__(
        self, regularizer: AdaptiveEntropyRegularizer | AERConfig | None = None, *, token_level_loss: bool = True
    ) -> None:
        if not isinstance(token_level_loss, bool):
            raise TypeError(f"token_level_loss must be a bool, got {type(token_level_loss).__name__}")
        self.regularizer = as_regularizer(regularizer)
        self.mode = "token-mean" if token_level_loss else "seq-mean-token-mean"
        self.window = EntropyWindow()

    def loss(
        self,
        entropy: Tensor,
        action_mask: Tensor,
        weights: Tensor | Sequence[Any],
        loss_batch_info: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """The term to ADD to the actor loss in ``training_step``.

        ``entropy``: ``output.entropy`` ``[B, S-1]`` over the whole sequence (its last
        ``num_actions = action_mask.shape[1]`` columns are the response) or
        already ``[B, A]``; ``action_mask[B, A]``; ``weights``:
        ``experience.info["aer_weight"]``; ``loss_batch_info``: the dict
        OpenRLHF passes to its ``aggregate_loss`` (None: this micro-batch alone).
        """
        if not isinstance(entropy, Tensor) or entropy.dim() != 2:
            raise ValueError("entropy must be a [batch, tokens] tensor")
        if not isinstance(action_mask, Tensor) or action_mask.dim() != 2:
            raise ValueError("action_mask must be a [batch, actions] tensor")
        num_actions = action_mask.shape[1]
        if entropy.shape[0] != action_mask.shape[0] or entropy.shape[1] < num_actions:
            raise ValueError(
                f"entropy {tuple(entropy.shape)} does not cover action_mask {tuple(action_mask.shape)}"
            )
        h = entropy[:, -num_actions:]
        w = _as_weights(weights, action_mask.shape[0], h.device)
        info = dict(loss_batch_info or {})
        term = self.regularizer.loss(h, action_mask, w * self.regularizer.value, agg=self.mode, **info)
        self.window.add(h, action_mask)
        return term

    def step(self, *, group: Any = None) -> dict[str, float]:
        """Once per RL step on every actor rank (end of ``ppo_train``): all-reduce the
        entropy seen by :meth:`loss`, update target and alpha; returns the metrics."""
        return self.regularizer.update(self.window.reduce(group=group), prefix=METRIC_PREFIX)

    def save_to(self, client_states: dict[str, Any]) -> dict[str, Any]:
        """Put the state in DeepSpeed's ``client_states`` (under ``"aer"``); returns the dict."""
        client_states[STATE_KEY] = self.regularizer.state_dict()
        return client_states

    def load_from(self, client_states: Mapping[str, Any] | None) -> bool:
        """Restore from the ``client_states`` DeepSpeed returned on load; False when it holds none."""
        if not client_states or STATE_KEY not in client_states:
            return False
        self.regularizer.load_state_dict(client_states[STATE_KEY])
        return True
