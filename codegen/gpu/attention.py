"""Causal attention over the static KV cache, flash style (online softmax, exp2), GQA.

Layouts: q [T, H, D] (T = batch * seq, batch-major, as qk_rope_cache writes it), caches
[B, Hkv, capacity, D], output [T, H, D]. Query head h reads kv head h // (H / Hkv).

    attention_prefill   seq new tokens after `past` cached ones: one program per (block of
                        queries, batch * head); query i sees keys j <= past + i (and, with a
                        sliding window W, j > past + i - W). Key blocks past the diagonal are
                        never loaded.
    attention_decode    one new token per sequence, split-KV ("flash decoding"): one program per
                        (batch * kv head, split) computes all the group's query heads at once
                        (one tensor-core product for the group), then a combine kernel merges
                        the splits by their log-sum-exp. The cache length is read on the device
                        from positions, so a captured CUDA graph replays at every length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attention_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, seq, past, qk_scale, window,
                             cache_bstride, cache_hstride,
                             NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NUM_HEADS
    h = bh % NUM_HEADS
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    rows = (b * seq + offs_m).to(tl.int64)
    q_ptrs = q_ptr + (rows[:, None] * NUM_HEADS + h) * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq) & dmask[None, :], other=0.0)
    q_pos = past + offs_m
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = tl.minimum(past + (pid_m + 1) * BLOCK_M, past + seq)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(0, past + pid_m * BLOCK_M - window + 1)
        start = (start // BLOCK_N) * BLOCK_N
    base = b.to(tl.int64) * cache_bstride + kvh.to(tl.int64) * cache_hstride
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        k = tl.load(k_ptr + base + kpos[None, :].to(tl.int64) * HEAD_DIM + offs_d[:, None],
                    mask=kmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale
        vis = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
        if HAS_WINDOW:
            vis = vis & (kpos[None, :] > q_pos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base + kpos[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + (rows[:, None] * NUM_HEADS + h) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < seq) & dmask[None, :])


@triton.jit
def attention_decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_o_ptr, part_lse_ptr, qk_scale, window, chunk,
                            cache_bstride, cache_hstride,
                            NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                            SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    num_kv: tl.constexpr = NUM_HEADS // GROUP
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = bk // num_kv
    kvh = bk % num_kv
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (b.to(tl.int64) * NUM_HEADS + heads[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    q_pos = tl.load(pos_ptr + b)
    kv_len = q_pos + 1
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    if HAS_WINDOW:
        start = tl.maximum(start, q_pos - window + 1)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    base = b.to(tl.int64) * cache_bstride + kvh.to(tl.int64) * cache_hstride
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        k = tl.load(k_ptr + base + kpos[None, :].to(tl.int64) * HEAD_DIM + offs_d[:, None],
                    mask=kmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base + kpos[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b.to(tl.int64) * NUM_HEADS + heads) * SPLITS + split
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=gmask[:, None] & dmask[None, :])
    tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def attention_combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < SPLITS
    lse = tl.load(part_lse_ptr + bh * SPLITS + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - m)
    o = tl.load(part_o_ptr + (bh * SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=smask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + bh * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


KERNELS = {"attention_prefill_kernel": attention_prefill_kernel,
           "attention_decode_kernel": attention_decode_kernel,
           "attention_combine_kernel": attention_combine_kernel}


def prefill_config(head_dim: int) -> dict:
    bd = triton.next_power_of_2(head_dim)
    return {"BLOCK_M": 128 if bd <= 128 else 64, "BLOCK_N": 64, "num_warps": 8 if bd >= 128 else 4, "num_stages": 3}


def decode_config(head_dim: int, capacity: int) -> dict:
    splits = max(1, min(32, triton.cdiv(capacity, 64)))
    return {"BLOCK_N": 64, "SPLITS": splits, "num_warps": 4, "num_stages": 2}


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int, seq: int,
                      past: int, scale: float, window: int | None = None, config: dict | None = None) -> torch.Tensor:
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    cfg = config or prefill_config(d)
    o = torch.empty_like(q)
    grid = (triton.cdiv(seq, cfg["BLOCK_M"]), batch * h)
    attention_prefill_kernel[grid](q, k_cache, v_cache, o, seq, past, scale * LOG2E, int(window or 0),
                                   k_cache.stride(0), k_cache.stride(1), NUM_HEADS=h, GROUP=h // hkv, HEAD_DIM=d,
                                   HAS_WINDOW=bool(window), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                   BLOCK_D=triton.next_power_of_2(d), num_warps=cfg["num_warps"],
                                   num_stages=cfg["num_stages"])
    return o


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     scale: float, window: int | None = None, config: dict | None = None) -> torch.Tensor:
    """q [B, H, D] of one new token per sequence at positions [B] (already written into the cache)."""
    b, h, d = q.shape
    hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    cfg = config or decode_config(d, capacity)
    splits = cfg["SPLITS"]
    chunk = triton.cdiv(triton.cdiv(capacity, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    part_o = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    group = h // hkv
    attention_decode_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, positions.reshape(-1), part_o, part_lse, scale * LOG2E, int(window or 0), chunk,
        k_cache.stride(0), k_cache.stride(1), NUM_HEADS=h, GROUP=group, HEAD_DIM=d, SPLITS=splits,
        HAS_WINDOW=bool(window), BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=triton.next_power_of_2(d), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    o = torch.empty_like(q)
    attention_combine_kernel[(b * h,)](part_o, part_lse, o, HEAD_DIM=d, SPLITS=splits,
                                       BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(d),
                                       num_warps=1)
    return o


def candidate_configs(head_dim: int, decode: bool, capacity: int = 4096, group: int = 1,
                      max_shared: int = 232448) -> list[dict]:
    """Configs `ktc tune` times, default first. Prefill: query and key blocks, warps, stages. Decode:
    key blocks, warps and stages at the SPLITS the cache capacity gives (the runtime sets SPLITS from
    the capacity, so it is not tuned). Every config's q tile and pipelined k/v tiles (bf16) fit
    `max_shared` bytes of shared memory (the default too, or it is left out)."""
    bd = triton.next_power_of_2(head_dim)
    rows = max(16, triton.next_power_of_2(group))

    def fits(cfg: dict) -> bool:
        return (cfg.get("BLOCK_M", rows) * bd + cfg["num_stages"] * 2 * cfg["BLOCK_N"] * bd) * 2 <= max_shared

    if decode:
        default = decode_config(head_dim, capacity)
        grid = [{"BLOCK_N": bn, "SPLITS": default["SPLITS"], "num_warps": warps, "num_stages": stages}
                for bn in (32, 64, 128) for warps in (2, 4, 8) for stages in (1, 2, 3)]
    else:
        default = prefill_config(head_dim)
        grid = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                for bm in (32, 64, 128) for bn in (32, 64, 128) for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3))
                if not (bm == 128 and warps == 4 and bd >= 128)]    # a 128 x 128 fp32 accumulator on 4 warps spills
    out: list[dict] = []
    for cfg in (default, *grid):
        if fits(cfg) and cfg not in out:
            out.append(cfg)
    return out
