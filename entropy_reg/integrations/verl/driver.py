"""The verl adapter's driver side: AER's state in the trainer process, per-response coefficients.

Once per actor update the token-mean entropy of the batch's old-log-prob pass goes to the anchored
target and the global coefficient; then each response gets ``c_i = alpha * w_i`` (``w_i`` from the
group accuracy over its prompt ``uid``), written as the batch field ``aer_coef``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from verl import DataProto

from ...distributed import masked_mean
from ...regularizer import AdaptiveEntropyRegularizer, AERConfig
from .. import as_regularizer, load_state, save_state
from .config import COEF_KEY, CORRECTNESS_FIELD, METRIC_PREFIX, SCORES, aer_section, prepare_config
from .loss import AERLoss, make_loss_fn


def response_scores(batch: DataProto) -> Tensor:
    """One verifiable score per response: ``token_level_scores`` summed over tokens, as GRPO does."""
    scores = batch.batch["token_level_scores"]
    return scores.sum(dim=-1) if scores.dim() == 2 else scores


class VerlAER:
    """Driver-side AER state for verl: one object in the trainer process.

    Args:
        regularizer: an :class:`AdaptiveEntropyRegularizer`, an :class:`AERConfig`,
            or None for the defaults.
        prefix: metric name prefix (driver metrics and the worker's ``bonus``),
            verl's ``actor/`` naming by default.
        score_field: what a response's success is judged on (``+aer.score_field``):
            None (default) takes the reward manager's per-sample correctness
            ``reward_extra_info["acc"]`` when it provides one, else the summed
            token scores; ``"scores"`` always the summed token scores; any other
            name that ``reward_extra_info`` field (it must then be there). Why:
            verl's DAPO reward managers add the overlong penalty into the scores
            and keep the plain correctness in ``acc``; a right answer that runs
            long would otherwise lower its prompt's accuracy.
    """

    def __init__(
        self,
        regularizer: AdaptiveEntropyRegularizer | AERConfig | None = None,
        *,
        prefix: str = METRIC_PREFIX,
        score_field: str | None = None,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if score_field is not None and (not isinstance(score_field, str) or not score_field):
            raise TypeError(f"score_field must be a field name, {SCORES!r} or None, got {score_field!r}")
        self.regularizer = as_regularizer(regularizer)
        self.prefix = prefix
        self.score_field = score_field

    def difficulty_scores(self, scores: Tensor, extra_info: Any) -> Tensor:
        """The per-response success signal ``[N]`` the allocator groups (see ``score_field``).

        ``scores[N]``: the summed token scores; ``extra_info``: the reward
        manager's ``reward_extra_info`` as a mapping ``field -> [N]`` values
        (legacy: ``batch.non_tensor_batch``; v1: :func:`reward_extra_info`).
        """
        field = self.score_field
        if field is None:
            field = CORRECTNESS_FIELD if CORRECTNESS_FIELD in extra_info else SCORES
        if field == SCORES:
            return scores
        if field not in extra_info:
            raise KeyError(
                f"AER: +aer.score_field={field}, but the reward manager wrote no reward_extra_info[{field!r}] "
                f"(it wrote: {', '.join(sorted(map(str, extra_info))) or 'nothing'})"
            )
        values = list(extra_info[field])
        if len(values) != scores.shape[0]:
            raise ValueError(
                f"AER: reward_extra_info[{field!r}] has {len(values)} values for {scores.shape[0]} responses"
            )
        missing = sum(v is None for v in values)
        if missing:
            raise ValueError(f"AER: reward_extra_info[{field!r}] is missing for {missing} of {len(values)} responses")
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float64, device=scores.device)
        except (TypeError, ValueError):
            raise TypeError(f"AER: reward_extra_info[{field!r}] must hold one number per response") from None

    def update(self, entropys: Tensor, response_mask: Tensor) -> dict[str, float]:
        """Once per step, before the coefficients: the batch's token-mean entropy to the controllers.

        ``entropys[N, T]`` (nats) and ``response_mask[N, T]`` of the whole batch,
        which the driver holds, so the mean is exact without any reduction.
        Returns the metrics.
        """
        entropy = masked_mean(entropys, response_mask)
        return self.regularizer.update(entropy, prefix=self.prefix)

    def coefficients(
        self, scores: Tensor, uid: np.ndarray, valid: np.ndarray | None = None, final: np.ndarray | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Per-response coefficients ``[N]`` float32 (``alpha * w_i``) and the metrics.

        ``scores[N]``: one verifiable score per response; ``uid[N]``: its prompt.
        ``valid[N]`` (bool, default all): rows left out (v1's padding samples) get
        coefficient 0 and take no part in the allocation (so they do not shift
        the mean-1 normalization of the weights). ``final[N]`` (default: each
        row itself): the row whose outcome a row shares, the final output of its
        agent-loop session (:func:`final_outputs`); only those rows enter the
        group accuracy and the normalization, so a session counts once however
        many outputs it has (as verl's GRPO counts it), and every output of a
        session gets its final output's coefficient.
        """
        n = len(uid)
        valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        final = np.arange(n) if final is None else np.asarray(final, dtype=np.int64)
        if valid.shape != (n,) or scores.shape != (n,) or final.shape != (n,):
            raise ValueError(
                f"scores {tuple(scores.shape)}, uid ({n},), valid {valid.shape} and final {final.shape} must all "
                "be one per response"
            )
        if n and (final.min() < 0 or final.max() >= n or (valid[final] != valid).any()):
            raise ValueError("final must index a row of the batch that is valid exactly when the row is")
        counted = valid & (final == np.arange(n))
        coef = torch.zeros(n, dtype=torch.float32, device=scores.device)
        if counted.any():
            index = torch.from_numpy(np.flatnonzero(counted)).to(scores.device)
            coef[index] = self.regularizer.coefficients(scores[index], np.asarray(uid, dtype=object)[counted]).float()
            coef = coef[torch.from_numpy(final).to(scores.device)]
        out = self.regularizer.metrics(self.prefix)
        out[f"{self.prefix}coef_mean"] = float(coef[torch.from_numpy(valid)].mean()) if valid.any() else 0.0
        return coef, out

    def attach(self, batch: DataProto) -> dict[str, float]:
        """Write ``batch.batch["aer_coef"]`` (``[N]`` float32, ``alpha * w_i``); returns the metrics."""
        uid = batch.non_tensor_batch.get("uid")
        if uid is None:
            raise KeyError("batch.non_tensor_batch has no 'uid': AER groups responses by prompt uid")
        scores = self.difficulty_scores(response_scores(batch), batch.non_tensor_batch)
        coef, out = self.coefficients(scores, np.asarray(uid, dtype=object))
        batch.batch[COEF_KEY] = coef
        return out

    def loss_fn(self, actor_config: Any, distillation_config: Any = None) -> AERLoss:
        """The worker loss for ``actor_rollout_wg.set_loss_fn``; see :func:`make_loss_fn`."""
        fused = self.regularizer.config.fused_entropy
        return make_loss_fn(actor_config, distillation_config, prefix=self.prefix, fused_entropy=fused)

    def save(self, global_step_folder: str | os.PathLike[str]) -> str:
        """Save the state as ``global_step_folder/aer_state.json``."""
        return save_state(self.regularizer, global_step_folder)

    def load(self, global_step_folder: str | os.PathLike[str], *, missing_ok: bool = False) -> bool:
        """Restore the state saved by :meth:`save`; see :func:`entropy_reg.integrations.load_state`."""
        return load_state(self.regularizer, global_step_folder, missing_ok=missing_ok)


def verl_aer(config: Any, aer: VerlAER | AERConfig | None) -> VerlAER:
    """The trainer's :class:`VerlAER`: the one given, else from the config's checked ``aer`` section."""
    settings = prepare_config(config)
    if isinstance(aer, VerlAER):
        return aer
    return VerlAER(settings if aer is None else aer, score_field=aer_section(config).get("score_field"))


def reward_extra_info(extra_fields: list[Any]) -> dict[str, list[Any]]:
    """v1's per-sample ``extra_fields["reward_extra_info"]`` (what verl's agent loop stores) as
    ``{field: [value per sample]}``, None where a sample lacks the field."""
    infos = []
    for fields in extra_fields:
        fields = getattr(fields, "data", fields)  # a NonTensorData row, as verl's replay buffer unwraps it
        info = fields.get("reward_extra_info", None) if isinstance(fields, dict) else None
        infos.append(info if isinstance(info, dict) else {})
    names = {name for info in infos for name in info}
    return {name: [info.get(name) for info in infos] for name in sorted(names)}


def final_outputs(keys: list[str]) -> np.ndarray:
    """``[N]``: for each sample key ``{uid}_{session}_{index}`` (verl's agent loop; one session may
    put several outputs), the position of its session's final output, the one with the highest
    index: the row verl's ``compute_advantage_for_multi_trajectories`` computes GRPO on."""
    session_of, final = [], {}
    for i, key in enumerate(keys):
        parts = key.rsplit("_", 2)
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"AER: sample key {key!r} is not verl's {{uid}}_{{session}}_{{index}}")
        session, index = f"{parts[0]}_{parts[1]}", int(parts[2])
        session_of.append(session)
        if session not in final or final[session][0] < index:
            final[session] = (index, i)
    return np.array([final[s][1] for s in session_of], dtype=np.int64)


def padded(values: Tensor) -> Tensor:
    """``[N, T]`` from a jagged ``[N, j]`` tensor (zeros after each row's end), or the tensor as is."""
    return values.to_padded_tensor(0) if values.is_nested else values
