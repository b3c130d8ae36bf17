"""rope(positions) -> cos, sin, and the two ways attention applies them.

cos/sin are [batch, seq, D] with D = 2 * len(inv_freq), laid out as cat(freqs, freqs).
"""

from __future__ import annotations

import torch

from .base import OpImpl, RunContext, Weights, dense, require


def _prepare(node, weights):
    require(node, "scaling")
    return weights


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    (positions,) = inputs
    inv_freq = dense(node, weights, "inv_freq").to(torch.float32)
    freqs = positions[..., None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = float(node.attrs["scaling"])
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate the last dim of `x` by cos/sin (broadcastable to x's leading dims).

    rotate_half style (interleave=False) rotates (x[i], x[i + D/2]); when cos covers fewer
    dims than x (partial rotary) only the first cos.shape[-1] dims turn. interleave=True
    rotates adjacent pairs (x0, x1), (x2, x3).. and returns them de-interleaved
    ([evens', odds']) as transformers' DeepSeek-V3 does; since queries and keys are permuted
    alike, q.k is the same as with DeepSeek-V2's complex form, which keeps pairs in place.
    """
    if interleave:
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


ROPE = OpImpl(run, _prepare)
