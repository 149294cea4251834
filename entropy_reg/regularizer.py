"""Adaptive Entropy Regularization in one object: allocator, anchored target, global coefficient.

The loss term for response ``i``, token ``t`` (AER, arXiv 2510.10959; the
component forms are this library's defaults, see each module):

    L_ent = - agg_{i,t}( alpha * w_i * H_it )

``alpha`` is the global coefficient (:class:`GlobalCoefficientController`),
``w_i`` the difficulty weight of response ``i``'s prompt
(:class:`DifficultyAllocator`), ``H_it`` the token entropy in nats, and
``agg`` one of verl's aggregation modes (:func:`aggregate`). Adding ``L_ent``
to the policy loss maximizes the weighted entropy.

Call order in a training step::

    coefs = reg.coefficients(scores, group_ids)         # once per rollout batch, alpha of this step
    for micro_batch in batch:                            # inside the loss function
        H = token_entropy(logits, temperature=T)         # [B, T] nats, differentiable
        loss = pg_loss + reg.loss(H, mask, coefs[idx], agg=mode)
        loss.backward()
    optimizer.step()
    h = masked_mean(H_all.detach(), mask_all)            # token mean over all ranks
    logger.log(reg.update(h))                            # once per optimizer step: target, then alpha
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .aggregation import aggregate
from .controller import DEFAULT_MAX_VALUE, DEFAULT_RULE, DEFAULT_SMOOTHING, GlobalCoefficientController
from .difficulty import DifficultyAllocator, GroupIds
from .checks import as_flag, as_scalar, as_state
from .target import AnchoredTarget

__all__ = ["AERConfig", "AdaptiveEntropyRegularizer", "STATE_FORMAT_VERSION", "migrate_state"]


# The components' argument names as AERConfig's fields, for error messages (fields not listed
# keep their component's name).
_ALLOCATOR_FIELDS = {"rule": "difficulty_rule", "threshold": "difficulty_threshold", "normalize": "normalize_weights"}
_TARGET_FIELDS = {"ratio": "target_ratio"}
_CONTROLLER_FIELDS = {
    "initial": "coef_init", "lr": "coef_lr", "min_value": "coef_min", "max_value": "coef_max",
    "rule": "coef_rule", "damping": "coef_damping", "smoothing": "coef_smoothing",
}


def renamed(message: str, names: dict[str, str]) -> str:
    """``message`` with each key of ``names`` replaced by its value, as a whole word outside quotes
    (a quoted name is a value: the difficulty rule ``'threshold'``)."""
    pattern = r"(?<!['\w.])(" + "|".join(sorted(names, key=len, reverse=True)) + r")(?!['\w])"
    return re.sub(pattern, lambda m: names[m.group(1)], message)


@contextmanager
def config_names(names: dict[str, str]) -> Iterator[None]:
    """Re-raise a TypeError / ValueError raised inside with the argument names of ``names`` replaced."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise type(err)(renamed(str(err), names)) from None


# Version of AdaptiveEntropyRegularizer.state_dict()'s layout; 0.1 states carry none (version 1).
STATE_FORMAT_VERSION = 2


def migrate_state(state: Any) -> Any:
    """``state`` in the current layout (a new dict; ``state`` itself is not changed).

    Version 1 (entropy-reg 0.1, no ``format_version`` key): the controller had no
    ``integral`` and no ``smoothed`` entropy. Its alpha was the integral (the pure
    integral rule), so ``integral = value``; the moving average restarts from the next
    entropy, as on a fresh controller (``smoothed = None``). With the 0.1 settings
    (``coef_damping=0``, ``coef_smoothing=0``) the run continues exactly as 0.1 would.
    """
    if not isinstance(state, dict) or "format_version" in state:
        if isinstance(state, dict) and state["format_version"] != STATE_FORMAT_VERSION:
            raise ValueError(
                f"state['format_version'] is {state['format_version']!r}; this entropy-reg reads "
                f"{STATE_FORMAT_VERSION} (and 0.1 states, which have none)"
            )
        return state
    controller = state.get("controller")
    if isinstance(controller, dict) and "value" in controller:
        controller = {"integral": controller["value"], "smoothed": None, **controller}
    return {**state, "format_version": STATE_FORMAT_VERSION, "controller": controller}


@dataclass(frozen=True)
class AERConfig:
    """Settings of :class:`AdaptiveEntropyRegularizer` (checked when the regularizer is built).

    Difficulty (:class:`DifficultyAllocator`): ``difficulty_rule``,
    ``difficulty_threshold``, ``success_threshold``, ``normalize_weights``.
    Target (:class:`AnchoredTarget`): ``target_ratio``, ``warmup_steps``,
    ``initial_entropy``, ``final_ratio``, ``schedule_steps``.
    Coefficient (:class:`GlobalCoefficientController`): ``coef_rule``,
    ``coef_init``, ``coef_lr``, ``coef_min``, ``coef_max``, ``coef_damping``,
    ``coef_smoothing``; None takes the rule's default. The defaults are the
    controller's: the damped log rule on a 0.9 moving average of the entropy,
    alpha in [1e-4, 1e-2] (:mod:`entropy_reg.controller` says where they come from).
    Trainer adapters: ``fused_entropy`` (default True) serves the actor update's
    log-prob and entropy from one :func:`entropy_reg.token_logprobs_and_entropy`
    pass (see ``docs/integrations.md``); the controllers ignore it.
    ``reanchor_on_missing_state`` (default False): a trainer adapter that resumes
    from a checkpoint holding no AER state raises, since AER would start anew and
    anchor its target on the already-trained policy; True starts AER anew on purpose.
    """

    difficulty_rule: str | Callable[[Tensor], Any] = "linear"
    difficulty_threshold: float = 0.5
    success_threshold: float = 0.5
    normalize_weights: bool = True
    target_ratio: float = 0.5
    warmup_steps: int = 1
    initial_entropy: float | None = None
    final_ratio: float | None = None
    schedule_steps: int = 0
    coef_rule: str = DEFAULT_RULE
    coef_init: float | None = None
    coef_lr: float | None = None
    coef_min: float | None = None
    coef_max: float = DEFAULT_MAX_VALUE
    coef_damping: float | None = None
    coef_smoothing: float = DEFAULT_SMOOTHING
    fused_entropy: bool = True
    reanchor_on_missing_state: bool = False

    def make_controller(self) -> GlobalCoefficientController:
        """A new :class:`GlobalCoefficientController` with these settings."""
        with config_names(_CONTROLLER_FIELDS):
            return GlobalCoefficientController(
                self.coef_init, lr=self.coef_lr, min_value=self.coef_min, max_value=self.coef_max, rule=self.coef_rule,
                damping=self.coef_damping, smoothing=self.coef_smoothing,
            )

    def resolved(self) -> AERConfig:
        """These settings with each None replaced by the value the controller takes for it."""
        c = self.make_controller()
        return replace(self, coef_init=c.value, coef_lr=c.lr, coef_min=c.min_value, coef_damping=c.damping)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python settings (a callable rule appears by its qualified name)."""
        out = asdict(self)
        if callable(self.difficulty_rule):
            out["difficulty_rule"] = getattr(self.difficulty_rule, "__qualname__", repr(self.difficulty_rule))
        return out


class AdaptiveEntropyRegularizer:
    """The three AER controllers behind one object (see the module docstring for the call order).

    Attributes:
        config: the :class:`AERConfig`.
        allocator, target, controller: the components, usable on their own.
        value: the current global coefficient alpha.
    """

    def __init__(self, config: AERConfig | None = None) -> None:
        cfg = AERConfig() if config is None else config
        if not isinstance(cfg, AERConfig):
            raise TypeError(f"config must be an AERConfig, got {type(cfg).__name__}")
        as_flag(cfg.fused_entropy, "fused_entropy")
        as_flag(cfg.reanchor_on_missing_state, "reanchor_on_missing_state")
        self.config = cfg
        with config_names(_ALLOCATOR_FIELDS):
            self.allocator = DifficultyAllocator(
                cfg.difficulty_rule, threshold=cfg.difficulty_threshold, success_threshold=cfg.success_threshold,
                normalize=cfg.normalize_weights,
            )
        with config_names(_TARGET_FIELDS):
            self.target = AnchoredTarget(
                cfg.target_ratio, warmup_steps=cfg.warmup_steps, initial_entropy=cfg.initial_entropy,
                final_ratio=cfg.final_ratio, schedule_steps=cfg.schedule_steps,
            )
        self.controller = cfg.make_controller()
        self.last_entropy: float | None = None

    @property
    def value(self) -> float:
        """The global coefficient alpha."""
        return self.controller.value

    def coefficients(self, scores: Tensor | Sequence[float], group_ids: GroupIds) -> Tensor:
        """Per-response coefficients ``alpha * w_i``, ``[N]`` float32 on the scores' device."""
        return self.allocator.alloc(scores, group_ids) * self.controller.value

    def loss(
        self,
        entropy: Tensor,
        mask: Tensor,
        coefficients: Tensor | float,
        agg: str = "token-mean",
        **agg_kwargs: Any,
    ) -> Tensor:
        """The term to ADD to the policy loss: ``-aggregate(c_i * H_it, mask, agg)``.

        Args:
            entropy: ``[B, T]`` per-token entropy (nats), carrying gradients.
            mask: ``[B, T]`` response mask (bool or 0/1).
            coefficients: ``[B]`` from :meth:`coefficients` (rows of this micro-batch),
                or one number for all rows. Treated as constants (detached).
            agg: verl's ``loss_agg_mode``; ``agg_kwargs`` (``dp_size``,
                ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``)
                go to :func:`entropy_reg.aggregation.aggregate`, so the term is
                normalized exactly like the policy loss it joins.
        """
        if not isinstance(entropy, Tensor):
            raise TypeError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
        if entropy.dim() != 2:
            raise ValueError(f"entropy must be [batch, tokens], got shape {tuple(entropy.shape)}")
        if isinstance(coefficients, Tensor):
            if coefficients.shape not in ((entropy.shape[0],), ()):
                raise ValueError(
                    f"coefficients must have shape ({entropy.shape[0]},) (one per row of entropy) or (), "
                    f"got {tuple(coefficients.shape)}"
                )
            if coefficients.is_complex() or coefficients.dtype == torch.bool:
                raise TypeError(f"coefficients must be real, got {coefficients.dtype}")
            c = coefficients.detach().to(entropy.device)
            c = c.unsqueeze(-1) if c.dim() == 1 else c
        else:
            c = as_scalar(coefficients, "coefficients")
        return -aggregate(entropy * c, mask, agg, **agg_kwargs)

    def update(self, entropy: float | Tensor, *, prefix: str = "aer/") -> dict[str, float]:
        """Once per optimizer step: feed the step's mean token entropy (nats, reduced across
        ranks with :func:`entropy_reg.masked_mean`) to the target, then the coefficient.

        Returns :meth:`metrics`. While the target's anchor is still being measured,
        alpha stays where it is. Bad input raises and changes nothing.
        """
        h = as_scalar(entropy, "entropy", low=0.0)
        saved = self.target.state_dict()
        try:
            target = self.target.update(h)
            if target is not None:
                self.controller.update(h, target)
        except Exception:
            self.target.load_state_dict(saved)  # the controller validates before it changes anything
            raise
        self.last_entropy = h
        return self.metrics(prefix)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state of all three components, the last entropy fed in, and ``format_version``."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "allocator": self.allocator.state_dict(),
            "target": self.target.state_dict(),
            "controller": self.controller.state_dict(),
            "last_entropy": self.last_entropy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; every part is validated before any is applied.

        A state without ``format_version`` was written by entropy-reg 0.1 and loads through
        :func:`migrate_state`.
        """
        parts = ("allocator", "target", "controller")
        state = as_state(migrate_state(state), ("format_version",) + parts + ("last_entropy",))
        last = state["last_entropy"]
        last = None if last is None else as_scalar(last, "state['last_entropy']", low=0.0)
        for part in parts:  # a throwaway copy checks each part before any part changes
            copy.deepcopy(getattr(self, part)).load_state_dict(state[part], name=f"state[{part!r}]")
        for part in parts:
            getattr(self, part).load_state_dict(state[part])
        self.last_entropy = last

    def metrics(self, prefix: str = "aer/") -> dict[str, float]:
        """All components' metrics, plus ``{prefix}entropy`` (the last value fed to :meth:`update`)."""
        out: dict[str, float] = {}
        out.update(self.allocator.metrics(prefix))
        out.update(self.target.metrics(prefix))
        out.update(self.controller.metrics(prefix))
        if self.last_entropy is not None:
            out[f"{prefix}entropy"] = self.last_entropy
        return out
