"""Grouped-query attention (Qwen2/3-MoE, Mixtral, GLM4-MoE, dense Llama-style models).

q/k/v projections (+ optional biases), optional per-head RMSNorm of q and k (Qwen3) before
rope, rotate_half rope (on the first cos.shape[-1] dims of a head: partial rotary), the
k/v heads appended to the layer's KV cache, causal softmax(q k^T * scaling) v, o projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktc.errors import ArtifactError

from .base import RunContext, Weights, require, rms_norm
from .rope import apply_rope
from .sdpa import attend


def prepare(node, weights: dict) -> dict:
    require(node, "layer", "num_heads", "num_kv_heads", "head_dim", "scaling")
    a = node.attrs
    for role in ("q", "k", "v", "o"):
        if role not in weights:
            raise ArtifactError(f"node {node.name}: gqa attention needs weight {role!r}")
    if a["num_heads"] % a["num_kv_heads"]:
        raise ArtifactError(f"node {node.name}: {a['num_heads']} heads do not split into "
                            f"{a['num_kv_heads']} kv groups")
    if ("q_norm" in weights or "k_norm" in weights) and a.get("qk_norm_eps") is None:
        raise ArtifactError(f"node {node.name}: q_norm/k_norm need attr qk_norm_eps")
    return weights


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> torch.Tensor:
    x, cos, sin = inputs
    a = node.attrs
    b, s, _ = x.shape
    h, hkv, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    q = F.linear(x, weights["q"], weights.get("q_bias")).view(b, s, h, d)
    k = F.linear(x, weights["k"], weights.get("k_bias")).view(b, s, hkv, d)
    v = F.linear(x, weights["v"], weights.get("v_bias")).view(b, s, hkv, d)
    if "q_norm" in weights:
        q = rms_norm(q, weights["q_norm"], float(a["qk_norm_eps"]))
    if "k_norm" in weights:
        k = rms_norm(k, weights["k_norm"], float(a["qk_norm_eps"]))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)            # [B, 1, S, D]: broadcast over heads
    q = apply_rope(q.transpose(1, 2), cos, sin)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    k_all, v_all = ctx.cache.append_gqa(int(a["layer"]), k, v.transpose(1, 2), ctx.past_length)
    o = attend(q, k_all, v_all, ctx.past_length, float(a["scaling"]), a.get("sliding_window") or None)
    o = o.transpose(1, 2).reshape(b, s, h * d)
    return F.linear(o, weights["o"], weights.get("o_bias"))
