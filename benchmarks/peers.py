"""The entropy formulas users run today, written from their math (the baselines of every benchmark).

Each takes logits [N, V] and returns the entropy [N] (nats). They compute in the
logits' dtype where the trainers do, and in float32 where they upcast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive(logits: Tensor) -> Tensor:
    """logsumexp(x) - sum(softmax(x) * x): verl's entropy_from_logits, in the logits' dtype."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def naive_chunked(logits: Tensor, chunk: int = 2048) -> Tensor:
    """The naive formula over row chunks upcast to float32 (verl's entropy_from_logits_with_chunking)."""
    return torch.cat([naive(c.float()) for c in logits.split(chunk)])


def logsoftmax_chunked(logits: Tensor, chunk: int = 128) -> Tensor:
    """-sum(exp(log_softmax(x)) * log_softmax(x)) over row chunks (TRL's entropy_from_logits)."""
    out = []
    for c in logits.split(chunk):
        logp = torch.log_softmax(c, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def categorical(logits: Tensor) -> Tensor:
    """torch.distributions.Categorical(logits=x).entropy()."""
    return torch.distributions.Categorical(logits=logits).entropy()


PEERS = {
    "naive": naive,
    "naive_chunked": naive_chunked,
    "logsoftmax_chunked": logsoftmax_chunked,
    "categorical": categorical,
}
