"""A tiny decoder-only transformer policy, randomly initialized (no downloads).

Pre-norm blocks with causal scaled-dot-product attention and learned absolute
positions: the shape of an LLM at a size that trains on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PolicyConfig:
    vocab_size: int
    max_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4


# Named policy sizes, (d_model, n_layers): "small" is the demo's (103k parameters with the
# built-in tasks' 13 tokens), "large" has 3.3x its parameters (340k).
SIZES = {"small": (64, 2), "large": (96, 3)}


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """``cache``, when given, holds this block's past keys and values: the new
        positions attend to them too, and they are extended in place of the list."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        # A single new token may attend to every cached position: no mask needed.
        att = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """``forward(tokens[B, T]) -> logits[B, T, V]`` (float32); position t predicts token t + 1."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model ({config.d_model}) must be divisible by n_heads ({config.n_heads})")
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(_Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, tokens: Tensor, caches: list[list[Tensor]] | None = None, offset: int = 0) -> Tensor:
        """Logits of ``tokens`` placed at positions ``offset, offset + 1, ...``; ``caches``
        (one list per block, see :meth:`generate`) carries the keys and values of earlier positions."""
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln(x))

    @torch.no_grad()
    def generate(
        self, prompts: Tensor, n_new: int, generator: torch.Generator, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Sample ``n_new`` tokens after each prompt from softmax(logits / temperature).

        Returns the tokens ``[B, n_new]`` and the logits they were sampled from
        ``[B, n_new, V]`` (float32, before the temperature): the rollout policy's
        distribution, from which a trainer takes the old log-probs and entropy
        without a second forward pass. Keys and values are cached, so each new
        token costs one position's compute.
        """
        caches: list[list[Tensor]] = [[] for _ in self.blocks]
        logits = self(prompts, caches)[:, -1].float()
        tokens, all_logits = [], []
        for i in range(n_new):
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
            tokens.append(nxt)
            all_logits.append(logits)
            if i + 1 < n_new:
                logits = self(nxt, caches, offset=prompts.shape[1] + i)[:, -1].float()
        return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1)


def response_logits(policy: TinyTransformer, prompts: Tensor, responses: Tensor) -> Tensor:
    """Logits that score each response token: ``[B, n_resp, V]`` (teacher forcing on prompt + response)."""
    seq = torch.cat([prompts, responses], dim=1)
    logits = policy(seq[:, :-1])
    return logits[:, prompts.shape[1] - 1:]
