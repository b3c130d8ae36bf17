"""Multi-head latent attention (attention nodes of kind "mla": DeepSeek-V2/V3) on the GPU.

The semantics are runtime/ops/attention_mla.py's; the cache layer is [B, capacity, R + DR] (the
rms_norm'd latent, then the roped k_rope). prepare() fuses the input projections into one GEMM
([q | q_a] then kv_a rows) and keeps kv_b as stored: the absorptions read its per-head blocks in
place. A step is Triton kernels only (the kernel family codegen/gpu/mla.py plus matmul / norm):

    x -> one GEMM -> q (or q_a -> rms_norm -> q_b GEMM -> q) and the kv_a row of every token
    mla.rope_cache: q's rope part roped; the latent rms-normed and k_rope roped into the cache at
        each token's position (read on the device)
    decode (one token per sequence), absorbed: q_lat = q_nope W_uk[h] (head_matmul, written beside
        q_pe), mla.attention_decode over the latent cache -> o_lat, o = o_lat W_uv[h]^T (head_matmul)
    prefill: k_nope | v of every cached token by the kv_b GEMM (past + seq rows per sequence), then
        causal mla.attention_prefill; correct after earlier cached tokens (chunked prefill)
    the o GEMM.
"""

from __future__ import annotations

from typing import Any

import torch

from ktc.errors import ArtifactError
from ktc.ir import Node

from .ops import GpuRunContext, _cfg, _rows

_ATTRS = ("layer", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "scaling",
          "norm_eps")


def dims(node: Node) -> tuple[int, int, int, int, int]:
    """(heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)."""
    a = node.attrs
    return tuple(int(a[k]) for k in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                     "v_head_dim"))


def _check_shape(node: Node, w: dict[str, Any], role: str, rows: int, cols: int | None = None) -> torch.Tensor:
    t = w[role]
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"node {node.name}: mla weight {role!r} is packed ({sorted(t)}); the GPU needs it dense")
    if t.shape[0] != rows or (cols is not None and t.shape[-1] != cols):
        raise ArtifactError(f"node {node.name}: mla weight {role!r} has shape {tuple(t.shape)}, expected "
                            f"[{rows}, {cols if cols is not None else '...'}]")
    return t


def prepare(node: Node, w: dict[str, Any]) -> dict[str, Any]:
    a = node.attrs
    missing = [k for k in _ATTRS if a.get(k) is None]
    if missing:
        raise ArtifactError(f"node {node.name}: mla attention needs attr(s) {', '.join(missing)}")
    q_lora = a.get("q_lora_rank")
    need = ["kv_a", "kv_a_norm", "kv_b", "o"] + (["q"] if q_lora is None else ["q_a", "q_a_norm", "q_b"])
    absent = [r for r in need if r not in w]
    if absent:
        raise ArtifactError(f"node {node.name}: mla attention needs weight(s) {', '.join(absent)}")
    h, r, dn, dr, dv = dims(node)
    if dr % 2:
        raise ArtifactError(f"node {node.name}: qk_rope_head_dim {dr} is odd")
    kv_a = _check_shape(node, w, "kv_a", r + dr)
    hidden = kv_a.shape[1]
    _check_shape(node, w, "kv_b", h * (dn + dv), r)
    _check_shape(node, w, "o", hidden, h * dv)
    if q_lora is None:
        q_in = _check_shape(node, w, "q", h * (dn + dr), hidden)
    else:
        q_in = _check_shape(node, w, "q_a", int(q_lora), hidden)
        _check_shape(node, w, "q_b", h * (dn + dr), int(q_lora))
    out = {"w_in": torch.cat((q_in, kv_a), dim=0).contiguous(), "kv_a_norm": w["kv_a_norm"], "kv_b": w["kv_b"],
           "o": w["o"]}
    biases = ("q_a_bias", "kv_a_bias") if q_lora is not None else ("kv_a_bias",)
    if any(b in w for b in biases):
        zeros = q_in.new_zeros(q_in.shape[0])
        out["w_in_bias"] = torch.cat((w.get("q_a_bias", zeros) if q_lora is not None else zeros,
                                      w.get("kv_a_bias", kv_a.new_zeros(r + dr)))).contiguous()
    if q_lora is not None:
        out["q_a_norm"], out["q_b"] = w["q_a_norm"], w["q_b"]
    if "o_bias" in w:
        out["o_bias"] = w["o_bias"]
    return out


def run(node: Node, inputs: list[torch.Tensor], w: dict[str, Any], ctx: GpuRunContext) -> tuple[torch.Tensor]:
    x, cos, sin = inputs
    a = node.attrs
    k = ctx.kernels
    mla = getattr(k, "mla", None)
    if mla is None:
        raise ArtifactError(f"node {node.name}: the artifact's GPU kernels have no mla family; recompile it")
    h, r, dn, dr, dv = dims(node)
    b, s = ctx.batch, ctx.seq
    t = b * s
    eps, scale, interleave = float(a["norm_eps"]), float(a["scaling"]), bool(a.get("rope_interleave", False))
    proj = k.matmul.linear(_rows(x), w["w_in"], w.get("w_in_bias"), _cfg(node, ctx, "qkv_a"))
    q_lora = a.get("q_lora_rank")
    nq = h * (dn + dr) if q_lora is None else int(q_lora)
    if q_lora is None:
        q = proj[:, :nq]
    else:
        q_a = k.norm.rms_norm(proj[:, :nq], w["q_a_norm"], eps, _cfg(node, ctx, "q_norm"))
        q = k.matmul.linear(q_a, w["q_b"], None, _cfg(node, ctx, "q_b"))
    kv_a = proj[:, nq:]
    (cache,) = ctx.cache.layer(int(a["layer"]))
    per_head = w["kv_b"].view(h, dn + dv, r)
    if s == 1:
        qq = torch.empty(t, h, r + dr, dtype=x.dtype, device=x.device)      # [q_lat | q_pe] per head
        mla.rope_cache(q, kv_a, w["kv_a_norm"], cos, sin, ctx.positions, cache, qq[..., r:], h, dn, r, s, eps,
                       interleave, _cfg(node, ctx, "rope"))
        mla.head_matmul(q.view(t, h, dn + dr)[..., :dn], per_head[:, :dn].transpose(1, 2), qq[..., :r],
                        _cfg(node, ctx, "absorb_q"))
        cfg = _cfg(node, ctx, "mla_decode", "decode")
        if cfg is not None:
            cfg = {**cfg, "SPLITS": mla.decode_config(h, r, cache.shape[1])["SPLITS"]}
        o_lat = mla.attention_decode(qq, cache, ctx.positions, r, scale, cfg)
        o = mla.head_matmul(o_lat, per_head[:, dn:], torch.empty(t, h, dv, dtype=x.dtype, device=x.device),
                            _cfg(node, ctx, "absorb_v"))
    else:
        q_pe = torch.empty(t, h, dr, dtype=x.dtype, device=x.device)
        mla.rope_cache(q, kv_a, w["kv_a_norm"], cos, sin, ctx.positions, cache, q_pe, h, dn, r, s, eps,
                       interleave, _cfg(node, ctx, "rope"))
        total = ctx.past + s
        kv = torch.empty(b, total, h * (dn + dv), dtype=x.dtype, device=x.device)
        kv_cfg = _cfg(node, ctx, "kv_b", "prefill")
        for i in range(b):
            k.matmul.linear(cache[i, :total, :r], w["kv_b"], None, kv_cfg, out=kv[i])
        o = mla.attention_prefill(q, q_pe, kv, cache, b, s, ctx.past, dn, scale,
                                  _cfg(node, ctx, "mla_prefill", "prefill"))
    y = k.matmul.linear(o.view(t, h * dv), w["o"], w.get("o_bias"), _cfg(node, ctx, "o"))
    return (y.view(b, s, -1),)
