"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Order as in transformers: divide by the temperature, keep the top_k logits, then keep the
smallest set of most likely tokens whose probability reaches top_p (the most likely token
always stays), renormalise and draw.
"""

from __future__ import annotations

import torch

from ktc.errors import InputError


def check_options(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0.0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise InputError(f"top_k must be a whole number >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits` [B, V] with everything outside the top-k / top-p support set to -inf."""
    logits = logits.to(torch.float32)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs          # probability of the tokens ranked above
        drop_sorted = before >= top_p                  # rank 0 has before == 0 < top_p: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] (int64) from `logits` [B, V]; argmax when temperature == 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.to(torch.float32) / temperature, top_k, top_p)
    probs = filtered.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed` (None: the global torch RNG is used)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))
