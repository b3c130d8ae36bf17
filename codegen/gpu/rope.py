"""Rotary embedding: the cos/sin tables, and q/k preparation fused with the KV-cache write.

    rope_tables(positions [T], inv_freq [R/2], scaling) -> cos, sin [T, R] float32
        freqs = pos * inv_freq; cos = cos(cat(freqs, freqs)) * scaling (sin likewise)
    qk_rope_cache(qkv [T, (H + 2 Hkv) D], cos, sin, positions, k_cache, v_cache) -> q [T, H, D]
        one program per (token, head): optional per-head RMSNorm (Qwen3's q_norm / k_norm),
        rotate_half rotary on the first R dims of the head (partial rotary when R < D); q heads
        go to q, k heads (and the matching v heads) are written straight into the static cache
        [B, Hkv, capacity, D] at slot positions[t], so k and v never round-trip through memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_tables_kernel(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, scaling, HALF: tl.constexpr,
                       BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    pos = tl.load(pos_ptr + t).to(tl.float32)
    f = pos * tl.load(inv_freq_ptr + i, mask=mask, other=0.0)
    c = tl.cos(f) * scaling
    s = tl.sin(f) * scaling
    base = t * 2 * HALF
    tl.store(cos_ptr + base + i, c, mask=mask)
    tl.store(cos_ptr + base + HALF + i, c, mask=mask)
    tl.store(sin_ptr + base + i, s, mask=mask)
    tl.store(sin_ptr + base + HALF + i, s, mask=mask)


@triton.jit
def qk_rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, qn_ptr, kn_ptr, q_ptr, kc_ptr, vc_ptr,
                         seq, qkv_stride, cache_heads_stride, cache_batch_stride, eps,
                         NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                         ROT: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    is_q = head < NUM_HEADS
    src = qkv_ptr + t * qkv_stride + head * HEAD_DIM
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    x = tl.load(src + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
        if is_q:
            nw = tl.load(qn_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        else:
            nw = tl.load(kn_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        x = x * inv * nw
    # rotate_half on the first ROT dims: (x[i], x[i + ROT/2]) turn together
    half: tl.constexpr = ROT // 2
    in_rot = d < ROT
    partner = tl.where(d < half, d + half, d - half)
    xp = tl.load(src + partner, mask=in_rot, other=0.0).to(tl.float32)
    if HAS_NORM:
        if is_q:
            pw = tl.load(qn_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
        else:
            pw = tl.load(kn_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
        xp = xp * inv * pw
    c = tl.load(cos_ptr + t * ROT + d, mask=in_rot, other=1.0)
    s = tl.load(sin_ptr + t * ROT + d, mask=in_rot, other=0.0)
    sign = tl.where(d < half, -1.0, 1.0)
    y = tl.where(in_rot, x * c + sign * xp * s, x)
    if is_q:
        tl.store(q_ptr + (t * NUM_HEADS + head) * HEAD_DIM + d, y.to(q_ptr.dtype.element_ty), mask=dmask)
    else:
        kv = head - NUM_HEADS
        b = t // seq
        pos = tl.load(pos_ptr + t).to(tl.int64)
        off = b * cache_batch_stride + kv * cache_heads_stride + pos * HEAD_DIM + d
        tl.store(kc_ptr + off, y.to(kc_ptr.dtype.element_ty), mask=dmask)
        v = tl.load(src + NUM_KV * HEAD_DIM + d, mask=dmask, other=0.0)
        tl.store(vc_ptr + off, v.to(vc_ptr.dtype.element_ty), mask=dmask)


KERNELS = {"rope_tables_kernel": rope_tables_kernel, "qk_rope_cache_kernel": qk_rope_cache_kernel}


def default_config(head_dim: int) -> dict:
    return {"BLOCK_D": triton.next_power_of_2(head_dim), "num_warps": 1 if head_dim <= 128 else 2, "num_stages": 1}


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    half = inv_freq.shape[0]
    flat = positions.reshape(-1)
    cos = torch.empty(flat.numel(), 2 * half, dtype=torch.float32, device=inv_freq.device)
    sin = torch.empty_like(cos)
    rope_tables_kernel[(flat.numel(),)](flat, inv_freq, cos, sin, float(scaling), HALF=half,
                                        BLOCK=triton.next_power_of_2(half), num_warps=1)
    return cos.view(*positions.shape, 2 * half), sin.view(*positions.shape, 2 * half)


def qk_rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv: int, head_dim: int,
                  seq: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                  eps: float = 1e-6, config: dict | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) D] (T = batch * seq, batch-major); caches [B, Hkv, capacity, D]."""
    cfg = config or default_config(head_dim)
    t = qkv.shape[0]
    rot = cos.shape[-1]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm is not None
    qk_rope_cache_kernel[(t, num_heads + num_kv)](
        qkv, cos.reshape(t, rot), sin.reshape(t, rot), positions.reshape(-1),
        q_norm if has_norm else qkv, k_norm if has_norm else qkv, q, k_cache, v_cache,
        seq, qkv.stride(0), k_cache.stride(1), k_cache.stride(0), float(eps),
        NUM_HEADS=num_heads, NUM_KV=num_kv, HEAD_DIM=head_dim, ROT=rot, HAS_NORM=has_norm,
        BLOCK_D=cfg["BLOCK_D"], BLOCK_HALF=cfg["BLOCK_D"] // 2, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return q
