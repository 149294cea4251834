"""AER on the tensors OpenRLHF 0.11.2 passes around; imports nothing from OpenRLHF.

Driver (the experience maker, where prompt groups are still whole):
:func:`attach_weights` reads each sample's verifier score (:func:`verifier_scores`)
and writes its difficulty weight ``w_i`` to ``experience.info["aer_weight"]``;
``info`` entries follow every sample through OpenRLHF's split, balancing,
replay buffer and re-batching.

Actor ranks (:class:`OpenRLHFAER`): :meth:`~OpenRLHFAER.loss` is the term added
to the actor loss of each micro-batch,

    L_aer = - aggregate(alpha * w_i * H_it, action_mask)

with OpenRLHF's two reductions (``token_level_loss`` True: ``dp * sum / batch_num_tokens``;
False: ``dp * sum_i mean_t / global_batch_size``) and its ``loss_batch_info``;
:meth:`~OpenRLHFAER.update` reduces the step's entropy over the data-parallel
ranks and moves the target and alpha once per RL step;
:meth:`~OpenRLHFAER.save` / :meth:`~OpenRLHFAER.load` keep the state in
DeepSpeed's ``client_states``.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ...checks import as_count, as_flag
from ...difficulty import DifficultyAllocator
from ...regularizer import AdaptiveEntropyRegularizer, AERConfig
from .. import EntropyWindow, as_regularizer

__all__ = [
    "WEIGHT_KEY",
    "STATE_KEY",
    "METRIC_PREFIX",
    "prompt_groups",
    "verifier_scores",
    "attach_weights",
    "OpenRLHFAER",
]

WEIGHT_KEY = "aer_weight"
STATE_KEY = "aer"
METRIC_PREFIX = "aer/"


def prompt_groups(index: Sequence[int] | Tensor, n_samples_per_prompt: int) -> Tensor:
    """The prompt of each sample, ``index // n_samples_per_prompt``.

    ``index`` is ``experience.index``: each sample's position in the rollout
    batch, whose ``n_samples_per_prompt`` consecutive samples answer one prompt
    (OpenRLHF groups rewards with ``reshape(-1, n_samples_per_prompt)`` in that order).
    """
    n = as_count(n_samples_per_prompt, "n_samples_per_prompt", low=1)
    idx = torch.as_tensor(index)
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"index must be 1-D integers, got dtype {idx.dtype} and shape {tuple(idx.shape)}")
    return idx.long() // n


def verifier_scores(experience: Any) -> Tensor:
    """The verifier's score of each sample, ``[B]`` float32 on the CPU.

    ``experience.scores`` when the reward function returned scores, else
    ``experience.info["reward"]``. Never ``experience.rewards``: OpenRLHF's
    ``apply_length_penalties`` (inside ``compute_advantages_and_returns``)
    rewrites it in place, so an overlong correct answer scored 1.0 with a 0.6
    penalty reads 0.4, under a 0.5 success threshold; it then copies the
    penalised rewards into ``info["reward"]``, so call this before
    ``compute_advantages_and_returns``.
    """
    scores = getattr(experience, "scores", None)
    if scores is None:
        scores = getattr(experience, "info", {}).get("reward")
    if scores is None:
        raise KeyError("experience has neither scores nor info['reward']: AER needs the verifier's score per sample")
    if isinstance(scores, Tensor):
        return scores.detach().reshape(-1).float().cpu()
    return torch.stack([torch.as_tensor(s).reshape(()) for s in scores]).float()


def attach_weights(
    experiences: Sequence[Any],
    n_samples_per_prompt: int,
    allocator: DifficultyAllocator | AdaptiveEntropyRegularizer,
) -> dict[str, float]:
    """Write ``experience.info["aer_weight"]`` (``[B]`` float32) for each experience; returns the metrics.

    Takes the whole rollout batch, so groups split across experiences are whole;
    scores from :func:`verifier_scores`, prompts from :func:`prompt_groups`.
    ``allocator``: a :class:`DifficultyAllocator`, or the regularizer whose
    allocator (built from its :class:`AERConfig`) to use.
    """
    if isinstance(allocator, AdaptiveEntropyRegularizer):
        allocator = allocator.allocator
    if not isinstance(allocator, DifficultyAllocator):
        raise TypeError(f"allocator must be a DifficultyAllocator, got {type(allocator).__name__}")
    if not experiences:
        raise ValueError("experiences must not be empty")
    scores = [verifier_scores(e) for e in experiences]
    for i, (e, s) in enumerate(zip(experiences, scores)):
        if e.index is None or len(e.index) != s.numel():
            n = None if e.index is None else len(e.index)
            raise ValueError(f"experiences[{i}] has {s.numel()} scores but its index has {n} entries")
    index = [i for e in experiences for i in e.index]
    weights = allocator.alloc(torch.cat(scores), prompt_groups(index, n_samples_per_prompt))
    for experience, w in zip(experiences, weights.split([s.numel() for s in scores])):
        experience.info[WEIGHT_KEY] = w
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
        token_level_loss: the policy loss's own ``token_level_loss`` (OpenRLHF's
            ``PolicyLoss.token_level_loss``: False for ``seq-mean-token-mean`` and
            always for GSPO), so the term is normalized like the loss it joins.
    """

    def __init__(
        self, regularizer: AdaptiveEntropyRegularizer | AERConfig | None = None, *, token_level_loss: bool = True
    ) -> None:
        token_level = as_flag(token_level_loss, "token_level_loss")
        self.regularizer = as_regularizer(regularizer)
        self.mode = "token-mean" if token_level else "seq-mean-token-mean"
        self.window = EntropyWindow()
        # The RL step's first optimizer step, trained on the policy before this step's updates: the anchor's entropy.
        self.first_window = EntropyWindow()
        self._first_open = True

    def loss(
        self,
        entropy: Tensor,
        action_mask: Tensor,
        weights: Tensor | Sequence[Any],
        loss_batch_info: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """The term to ADD to the actor loss of one micro-batch.

        ``entropy``: ``output.entropy`` ``[B, S-1]`` (nats, logits already divided
        by the rollout temperature), of which the last ``action_mask.shape[1]``
        columns line up with ``action_mask`` (OpenRLHF's own
        ``output.entropy[:, -num_actions:]``; in 0.11.2 ``action_mask`` is
        ``[B, S-1]`` over the whole shifted sequence, prompt positions masked);
        ``weights``: ``experience.info["aer_weight"]``; ``loss_batch_info``: the
        dict OpenRLHF passes to its policy loss (None: this micro-batch alone).
        The micro-batch's entropy also goes into the step's window, and into the
        first optimizer step's until :meth:`end_optimizer_step`.
        """
        if not isinstance(entropy, Tensor) or entropy.dim() != 2:
            raise ValueError("entropy must be a [batch, tokens] tensor")
        if not isinstance(action_mask, Tensor) or action_mask.dim() != 2:
            raise ValueError("action_mask must be a [batch, actions] tensor")
        num_actions = action_mask.shape[1]
        if entropy.shape[0] != action_mask.shape[0] or entropy.shape[1] < num_actions:
            raise ValueError(f"entropy {tuple(entropy.shape)} does not cover action_mask {tuple(action_mask.shape)}")
        h = entropy[:, entropy.shape[1] - num_actions :]
        w = _as_weights(weights, action_mask.shape[0], h.device)
        info = dict(loss_batch_info or {})
        term = self.regularizer.loss(h, action_mask, w * self.regularizer.value, agg=self.mode, **info)
        self.window.add(h, action_mask)
        if self._first_open:
            self.first_window.add(h, action_mask)
        return term

    def end_optimizer_step(self) -> None:
        """Called after the micro-batch that completes an optimizer step: the RL step's later
        micro-batches train a policy this step already updated, so they stay out of the anchor."""
        self._first_open = False

    def update(self, *, group: Any = None) -> dict[str, float]:
        """Once per RL step on every actor rank (end of ``ppo_train``); returns the metrics.

        One all-reduce of the entropy gathered by :meth:`loss` over ``group``
        (the data-parallel ranks), then the target and alpha move once. While the
        target is not anchored, the entropy is that of the first optimizer step's
        micro-batches only (the policy before any update of this RL step, as the
        other adapters measure it), not of every epoch and optimizer step. A rank
        that ran no micro-batch still joins the all-reduce with nothing to add;
        when no rank saw a token, every rank skips the update together
        (``aer/update_skipped`` = 1) and alpha stays where it is.
        """
        # The same choice on every rank: all hold the same state.
        window = self.first_window if self.regularizer.target.anchor is None else self.window
        self.window, self.first_window, self._first_open = EntropyWindow(), EntropyWindow(), True
        if window.empty:
            # An empty contribution keeps this rank in the collective: reduce first, then decide.
            window.add(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        try:
            entropy = window.reduce(group=group)
        except ValueError:
            # Raised after the all-reduce, on every rank alike: no token on any rank.
            out = self.regularizer.metrics(METRIC_PREFIX)
            out[f"{METRIC_PREFIX}update_skipped"] = 1.0
            return out
        out = self.regularizer.update(entropy, prefix=METRIC_PREFIX)
        out[f"{METRIC_PREFIX}update_skipped"] = 0.0
        return out

    def save(self, client_states: dict[str, Any]) -> dict[str, Any]:
        """Put the state in DeepSpeed's ``client_states`` (under ``"aer"``); returns the dict."""
        if not isinstance(client_states, dict):
            raise TypeError(f"client_states must be a dict, got {type(client_states).__name__}")
        client_states[STATE_KEY] = self.regularizer.state_dict()
        return client_states

    def load(self, client_states: Mapping[str, Any] | None) -> bool:
        """Restore from the ``client_states`` DeepSpeed returned on load; False when it holds none."""
        if not client_states or STATE_KEY not in client_states:
            return False
        self.regularizer.load_state_dict(client_states[STATE_KEY])
        return True

    # Names before the adapters shared one vocabulary (verl's update / save / load).
    def step(self, *, group: Any = None) -> dict[str, float]:
        """Deprecated alias of :meth:`update`."""
        warnings.warn("OpenRLHFAER.step is deprecated, use update", DeprecationWarning, stacklevel=2)
        return self.update(group=group)

    def save_to(self, client_states: dict[str, Any]) -> dict[str, Any]:
        """Deprecated alias of :meth:`save`."""
        warnings.warn("OpenRLHFAER.save_to is deprecated, use save", DeprecationWarning, stacklevel=2)
        return self.save(client_states)

    def load_from(self, client_states: Mapping[str, Any] | None) -> bool:
        """Deprecated alias of :meth:`load`."""
        warnings.warn("OpenRLHFAER.load_from is deprecated, use load", DeprecationWarning, stacklevel=2)
        return self.load(client_states)
