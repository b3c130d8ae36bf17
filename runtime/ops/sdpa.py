"""Causal attention over a KV cache, shared by the attention kinds.

Queries are the `seq` new tokens at positions past .. past+seq-1; keys are everything in
the cache, new tokens included: a query sees every cached token and the new ones up to
itself (and, with a sliding window W, only keys less than W positions behind it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visibility_mask(seq: int, past: int, window: int | None = None) -> torch.Tensor | None:
    """[seq, past+seq] bool (True = attend), or None when every key is visible."""
    total = past + seq
    if seq == 1 and (not window or total <= window):
        return None
    q_pos = torch.arange(past, total).unsqueeze(1)
    k_pos = torch.arange(total).unsqueeze(0)
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float,
           window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, S, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv]
    (H a multiple of Hkv: query heads of a group share their k/v head); -> [B, H, S, Dv]."""
    seq = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if past == 0 and seq > 1 and not window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = visibility_mask(seq, past, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
