"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2).

q = q(x) | q_b(rms_norm(q_a(x))), split per head into q_nope [dn] and q_rope [dr];
kv_a(x) = latent [r] | k_rope [dr]; latent = rms_norm(latent); k_rope (one head, shared)
and q_rope are roped. The cache keeps only rms_norm'd latent and roped k_rope (r + dr per
token, side by side in one row). kv_b [H*(dn+dv), r] maps a latent to each head's k_nope
and v. Two exact ways to attend, the cheaper one chosen per call (ctx.mla_mode = "auto"):
  naive     expand every cached latent through kv_b, then ordinary attention over
            k = [k_nope, k_rope], v (cheap when the queries are many: prefill);
  absorbed  fold kv_b into the query and the output: q_lat = q_nope W_uk[h] (r dims),
            scores = [q_lat, q_rope] . [latent, k_rope], o = (p . latent) W_uv[h]^T: the
            cache is never expanded (cheap for few queries over a long cache: decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktc.errors import ArtifactError

from .base import RunContext, Weights, require, rms_norm
from .rope import apply_rope
from .sdpa import attend, visibility_mask

_REQUIRED_ATTRS = ("layer", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                   "scaling", "norm_eps")


def prepare(node, weights: dict) -> dict:
    require(node, *_REQUIRED_ATTRS)
    a = node.attrs
    need = ["kv_a", "kv_a_norm", "kv_b", "o"] + (["q"] if a.get("q_lora_rank") is None else ["q_a", "q_a_norm", "q_b"])
    missing = [r for r in need if r not in weights]
    if missing:
        raise ArtifactError(f"node {node.name}: mla attention needs weight(s) {', '.join(missing)}")
    h, dn, dv, r = (int(a[k]) for k in ("num_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank"))
    kv_b = weights["kv_b"]
    if tuple(kv_b.shape) != (h * (dn + dv), r):
        raise ArtifactError(f"node {node.name}: kv_b has shape {tuple(kv_b.shape)}, expected {(h * (dn + dv), r)}")
    per_head = kv_b.view(h, dn + dv, r)
    weights = dict(weights)
    weights["w_uk"] = per_head[:, :dn].contiguous()                    # [H, dn, r]
    weights["w_uv_t"] = per_head[:, dn:].transpose(1, 2).contiguous()  # [H, r, dv]
    return weights


def use_absorbed(seq: int, total: int, a: dict, mode: str = "auto") -> bool:
    """Whether absorbed attention costs fewer multiply-adds than expanding the cache."""
    if mode != "auto":
        return mode == "absorbed"
    r, dn, dr, dv = (int(a[k]) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    naive = total * r * (dn + dv) + seq * total * (dn + dr + dv)
    absorbed = seq * r * (dn + dv) + seq * total * (2 * r + dr)
    return absorbed < naive


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> torch.Tensor:
    x, cos, sin = inputs
    a = node.attrs
    b, s, _ = x.shape
    h, r, dn, dr, dv = (int(a[k]) for k in ("num_heads", "kv_lora_rank", "qk_nope_head_dim",
                                             "qk_rope_head_dim", "v_head_dim"))
    eps, interleave = float(a["norm_eps"]), bool(a.get("rope_interleave", False))
    if a.get("q_lora_rank") is None:
        q = F.linear(x, weights["q"])
    else:
        q_a = F.linear(x, weights["q_a"], weights.get("q_a_bias"))
        q = F.linear(rms_norm(q_a, weights["q_a_norm"], eps), weights["q_b"])
    q = q.view(b, s, h, dn + dr).transpose(1, 2)                       # [B, H, S, dn+dr]
    q_nope, q_rope = q.split([dn, dr], dim=-1)
    q_rope = apply_rope(q_rope, cos.unsqueeze(1), sin.unsqueeze(1), interleave)
    latent, k_rope = F.linear(x, weights["kv_a"], weights.get("kv_a_bias")).split([r, dr], dim=-1)
    latent = rms_norm(latent, weights["kv_a_norm"], eps)
    k_rope = apply_rope(k_rope, cos, sin, interleave)                  # [B, S, dr], shared by all heads

    past = ctx.past_length
    ckv = ctx.cache.append_mla(int(a["layer"]), latent, k_rope, past)  # [B, L, r+dr]
    total = ckv.shape[1]
    scale = float(a["scaling"])
    if use_absorbed(s, total, a, ctx.mla_mode):
        q_lat = torch.matmul(q_nope, weights["w_uk"])                  # [B, H, S, r]
        qq = torch.cat((q_lat, q_rope), dim=-1).reshape(b, 1, h * s, r + dr)
        mask = visibility_mask(s, past)
        if mask is not None:
            mask = mask.repeat(h, 1)                                   # rows ordered (head, query)
        o_lat = F.scaled_dot_product_attention(qq, ckv.unsqueeze(1), ckv[..., :r].unsqueeze(1),
                                               attn_mask=mask, scale=scale)
        o = torch.matmul(o_lat.view(b, h, s, r), weights["w_uv_t"])    # [B, H, S, dv]
    else:
        kv = F.linear(ckv[..., :r], weights["kv_b"]).view(b, total, h, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)
        k = torch.cat((k_nope, ckv[..., r:].unsqueeze(1).expand(b, h, total, dr)), dim=-1)
        o = attend(torch.cat((q_nope, q_rope), dim=-1), k, v, past, scale)
    o = o.transpose(1, 2).reshape(b, s, h * dv)
    return F.linear(o, weights["o"], weights.get("o_bias"))
