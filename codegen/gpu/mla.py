"""Multi-head latent attention (DeepSeek-V2/V3) over a latent KV cache.

The cache of an MLA layer is [B, capacity, R + DR] (R = kv_lora_rank, DR = qk_rope_head_dim):
per token the rms_norm'd latent, then the roped k_rope shared by every head. kv_b [H (DN + DV), R]
expands a latent to each head's k_nope [DN] and v [DV]. Queries are [T, H, DN + DR] rows (T =
batch * seq, batch-major), their nope part first.

    rope_cache      one program per (token, head) for the H query heads: rotary on q's rope part,
                    written to `q_pe_out` (its own buffer, never in place); program H of each token
                    rms-norms the latent of the kv_a row, ropes k_rope and writes both into the
                    cache row at positions[t]. Both rope styles: rotate_half pairs (i, i + DR/2),
                    interleaved pairs (2i, 2i + 1) written de-interleaved, as transformers does.
    head_matmul     out[t, h] = x[t, h] @ w[h]^T with strides for every operand: the weight
                    absorptions of decode read kv_b in place (q_lat = q_nope W_uk[h] reads it
                    transposed, o = o_lat W_uv[h]^T as it is), so no reshaped copy is kept.
    attention_decode   absorbed attention, one query per sequence: scores = q_lat . c + q_pe . k_pe
                    and out_lat = P . c over the cache, split-KV. One program per (batch, block of
                    BLOCK_H heads, split): every head shares the one latent row, so each cache tile
                    is loaded once for BLOCK_H heads and used twice (as K for the scores, as V for
                    the output). A combine kernel merges the splits by log-sum-exp. The cache length
                    comes from positions on the device: a decode step is CUDA-graph capturable.
    attention_prefill  causal flash attention of `seq` new queries after `past` cached tokens on
                    k_nope / v expanded by kv_b for all past + seq tokens ([B, L, H, DN + DV]) and the
                    cached k_pe: scores = q_nope . k_nope + q_pe . k_pe, values of width DV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _rope_pairs(src, dst, c, s, ia, ib, j, jmask, HALF: tl.constexpr):
    """dst[j] = a c - b s, dst[j + HALF] = b c + a s for the pairs a = src[ia], b = src[ib]."""
    a = tl.load(src + ia, mask=jmask, other=0.0).to(tl.float32)
    b = tl.load(src + ib, mask=jmask, other=0.0).to(tl.float32)
    tl.store(dst + j, (a * c - b * s).to(dst.dtype.element_ty), mask=jmask)
    tl.store(dst + HALF + j, (b * c + a * s).to(dst.dtype.element_ty), mask=jmask)


@triton.jit
def mla_rope_cache_kernel(q_ptr, kv_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, qpe_ptr, cache_ptr,
                          seq, q_stride, kv_stride, rope_stride, qpe_stride, qpe_hstride, cache_bstride, eps,
                          NUM_HEADS: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, LORA: tl.constexpr,
                          INTERLEAVE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half: tl.constexpr = ROPE // 2
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < half
    if INTERLEAVE:
        ia = 2 * j
        ib = 2 * j + 1
    else:
        ia = j
        ib = j + half
    c = tl.load(cos_ptr + t * rope_stride + j, mask=jmask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + t * rope_stride + j, mask=jmask, other=0.0).to(tl.float32)
    if head < NUM_HEADS:
        _rope_pairs(q_ptr + t * q_stride + head * (NOPE + ROPE) + NOPE, qpe_ptr + t * qpe_stride + head * qpe_hstride,
                    c, s, ia, ib, j, jmask, half)
    else:
        row = cache_ptr + (t // seq) * cache_bstride + tl.load(pos_ptr + t).to(tl.int64) * (LORA + ROPE)
        r = tl.arange(0, BLOCK_R)
        rmask = r < LORA
        lat = tl.load(kv_ptr + t * kv_stride + r, mask=rmask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(lat * lat, axis=0) / LORA + eps)
        w = tl.load(norm_ptr + r, mask=rmask, other=0.0).to(tl.float32)
        tl.store(row + r, (w * (lat * inv)).to(cache_ptr.dtype.element_ty), mask=rmask)
        _rope_pairs(kv_ptr + t * kv_stride + LORA, row + LORA, c, s, ia, ib, j, jmask, half)


@triton.jit
def mla_head_matmul_kernel(x_ptr, w_ptr, o_ptr, M, N, K, x_stride, x_hstride, w_hstride, w_nstride, w_kstride,
                           o_stride, o_hstride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    x_ptrs = x_ptr + h * x_hstride + offs_m.to(tl.int64)[:, None] * x_stride + offs_k[None, :]
    w_ptrs = w_ptr + h * w_hstride + offs_n.to(tl.int64)[None, :] * w_nstride + offs_k[:, None] * w_kstride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * w_kstride
    o_ptrs = o_ptr + h * o_hstride + offs_m.to(tl.int64)[:, None] * o_stride + offs_n[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def mla_decode_kernel(q_ptr, cache_ptr, pos_ptr, part_o_ptr, part_lse_ptr, qk_scale, chunk, cache_bstride,
                      NUM_HEADS: tl.constexpr, LORA: tl.constexpr, ROPE: tl.constexpr, SPLITS: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DR: tl.constexpr):
    head_blocks: tl.constexpr = (NUM_HEADS + BLOCK_H - 1) // BLOCK_H
    width: tl.constexpr = LORA + ROPE
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // head_blocks
    heads = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < NUM_HEADS
    r = tl.arange(0, BLOCK_R)
    rmask = r < LORA
    i = tl.arange(0, BLOCK_DR)
    imask = i < ROPE
    q_rows = (b.to(tl.int64) * NUM_HEADS + heads) * width
    q_lat = tl.load(q_ptr + q_rows[:, None] + r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    q_pe = tl.load(q_ptr + q_rows[:, None] + LORA + i[None, :], mask=hmask[:, None] & imask[None, :], other=0.0)
    kv_len = tl.load(pos_ptr + b) + 1
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    base = cache_ptr + b.to(tl.int64) * cache_bstride
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        rows = base + kpos.to(tl.int64)[:, None] * width
        c = tl.load(rows + r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0)          # [N, R]
        k_pe = tl.load(rows + LORA + i[None, :], mask=kmask[:, None] & imask[None, :], other=0.0)  # [N, DR]
        s = tl.dot(q_lat, tl.trans(c))
        s = tl.dot(q_pe, tl.trans(k_pe), s) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b.to(tl.int64) * NUM_HEADS + heads) * SPLITS + split
    tl.store(part_o_ptr + row[:, None] * LORA + r[None, :], o, mask=hmask[:, None] & rmask[None, :])
    tl.store(part_lse_ptr + row, lse, mask=hmask)


@triton.jit
def mla_combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, LORA: tl.constexpr, SPLITS: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    r = tl.arange(0, BLOCK_R)
    smask = offs_s < SPLITS
    lse = tl.load(part_lse_ptr + bh * SPLITS + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - m)
    o = tl.load(part_o_ptr + (bh * SPLITS + offs_s[:, None]) * LORA + r[None, :],
                mask=smask[:, None] & (r[None, :] < LORA), other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + bh * LORA + r, out.to(o_ptr.dtype.element_ty), mask=r < LORA)


@triton.jit
def mla_prefill_kernel(q_ptr, qpe_ptr, kv_ptr, cache_ptr, o_ptr, seq, past, qk_scale, q_stride, kv_bstride,
                       cache_bstride, NUM_HEADS: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                       V_DIM: tl.constexpr, LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NUM_HEADS
    h = bh % NUM_HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dn = tl.arange(0, BLOCK_DN)
    dr = tl.arange(0, BLOCK_DR)
    dv = tl.arange(0, BLOCK_DV)
    dnmask = dn < NOPE
    drmask = dr < ROPE
    dvmask = dv < V_DIM
    qmask = offs_m < seq
    rows = (b * seq + offs_m).to(tl.int64)
    q_nope = tl.load(q_ptr + rows[:, None] * q_stride + h * (NOPE + ROPE) + dn[None, :],
                     mask=qmask[:, None] & dnmask[None, :], other=0.0)
    q_pe = tl.load(qpe_ptr + (rows[:, None] * NUM_HEADS + h) * ROPE + dr[None, :],
                   mask=qmask[:, None] & drmask[None, :], other=0.0)
    q_pos = past + offs_m
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    end = tl.minimum(past + (pid_m + 1) * BLOCK_M, past + seq)
    kv_base = kv_ptr + b.to(tl.int64) * kv_bstride + h * (NOPE + V_DIM)
    pe_base = cache_ptr + b.to(tl.int64) * cache_bstride + LORA
    for n0 in range(0, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        kv_rows = kv_base + kpos.to(tl.int64)[None, :] * (NUM_HEADS * (NOPE + V_DIM))
        k_nope = tl.load(kv_rows + dn[:, None], mask=kmask[None, :] & dnmask[:, None], other=0.0)      # [DN, N]
        k_pe = tl.load(pe_base + kpos.to(tl.int64)[None, :] * (LORA + ROPE) + dr[:, None],
                       mask=kmask[None, :] & drmask[:, None], other=0.0)                                # [DR, N]
        s = tl.dot(q_nope, k_nope)
        s = tl.dot(q_pe, k_pe.to(q_pe.dtype), s) * qk_scale
        vis = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_base + kpos.to(tl.int64)[:, None] * (NUM_HEADS * (NOPE + V_DIM)) + NOPE + dv[None, :],
                    mask=kmask[:, None] & dvmask[None, :], other=0.0)                                  # [N, DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + (rows[:, None] * NUM_HEADS + h) * V_DIM + dv[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=qmask[:, None] & dvmask[None, :])


KERNELS = {"mla_rope_cache_kernel": mla_rope_cache_kernel,
           "mla_head_matmul_kernel": mla_head_matmul_kernel,
           "mla_decode_kernel": mla_decode_kernel,
           "mla_combine_kernel": mla_combine_kernel,
           "mla_prefill_kernel": mla_prefill_kernel}


# -- configs ---------------------------------------------------------------------------------------
def rope_cache_config(lora: int, rope: int) -> dict:
    return {"BLOCK_R": triton.next_power_of_2(lora), "BLOCK_HALF": triton.next_power_of_2(max(1, rope // 2)),
            "num_warps": 4 if lora >= 512 else 1, "num_stages": 1}


def head_matmul_config(m: int, n: int, k: int) -> dict:
    """Block sizes for a per-head [m, k] x [n, k]^T product (H of them in one launch)."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128 if k >= 128 else 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def decode_config(heads: int, lora: int, capacity: int) -> dict:
    """Absorbed decode: BLOCK_H heads per program (the rows of both products), BLOCK_N cache rows per
    step; SPLITS splits of the cache (set again from the real capacity at run time)."""
    block_h = 16 if heads <= 16 else 32
    return {"BLOCK_H": block_h, "BLOCK_N": 32 if lora >= 256 else 64,
            "SPLITS": max(1, min(32, triton.cdiv(capacity, 128))),
            "num_warps": 4 if block_h <= 16 else 8, "num_stages": 2}


def prefill_config(nope: int, rope: int, v_dim: int) -> dict:
    wide = nope + rope > 128 or v_dim > 128
    return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 8 if wide else 4, "num_stages": 2}


# -- launchers -------------------------------------------------------------------------------------
def rope_cache(q: torch.Tensor, kv_a: torch.Tensor, norm_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor, cache: torch.Tensor, q_pe_out: torch.Tensor, num_heads: int, nope: int,
               lora: int, seq: int, eps: float, interleave: bool, config: dict | None = None) -> None:
    """q [T, H (DN + DR)] and kv_a [T, >= R + DR] row views (any row stride); cos/sin [T, DR] float32 (rows
    of one stride); cache [B, capacity, R + DR]; q_pe_out [T, H, DR]-shaped view (row and head strides free)."""
    t = q.shape[0]
    rope = cos.shape[-1]
    cfg = config or rope_cache_config(lora, rope)
    cos, sin = cos.reshape(t, rope), sin.reshape(t, rope)
    if cos.stride() != sin.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    if any(x.stride(-1) != 1 for x in (q_pe_out, q, kv_a, cos)):
        raise ValueError("rope_cache needs unit stride along the last dim")
    mla_rope_cache_kernel[(t, num_heads + 1)](
        q, kv_a, norm_w, cos, sin, positions.reshape(-1), q_pe_out, cache, seq, q.stride(0), kv_a.stride(0),
        cos.stride(0), q_pe_out.stride(0), q_pe_out.stride(1), cache.stride(0), float(eps),
        NUM_HEADS=num_heads, NOPE=nope, ROPE=rope, LORA=lora, INTERLEAVE=bool(interleave),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_HALF=cfg["BLOCK_HALF"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def head_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """out[t, h] = x[t, h] @ w[h]^T for x [T, H, K], w [H, N, K], out [T, H, N] (views: strides are free,
    but for unit stride along x's and out's last dim)."""
    m, h, k = x.shape
    n = w.shape[1]
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("head_matmul needs unit stride along x's and out's last dim")
    cfg = config or head_matmul_config(m, n, k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), h)
    mla_head_matmul_kernel[grid](x, w, out, m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                 w.stride(2), out.stride(0), out.stride(1), BLOCK_M=cfg["BLOCK_M"],
                                 BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                                 num_stages=cfg["num_stages"])
    return out


def attention_decode(q: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor, lora: int, scale: float,
                     config: dict | None = None) -> torch.Tensor:
    """q [B, H, R + DR] (absorbed q_lat, then roped q_pe) of one new token per sequence at positions [B]
    (already written into cache [B, capacity, R + DR]) -> out_lat [B, H, R]."""
    b, h, width = q.shape
    capacity = cache.shape[1]
    cfg = config or decode_config(h, lora, capacity)
    splits = cfg["SPLITS"]
    chunk = triton.cdiv(triton.cdiv(capacity, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    part_o = torch.empty(b, h, splits, lora, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    grid = (b * triton.cdiv(h, cfg["BLOCK_H"]), splits)
    mla_decode_kernel[grid](q, cache, positions.reshape(-1), part_o, part_lse, scale * LOG2E, chunk, cache.stride(0),
                            NUM_HEADS=h, LORA=lora, ROPE=width - lora, SPLITS=splits, BLOCK_H=cfg["BLOCK_H"],
                            BLOCK_N=cfg["BLOCK_N"], BLOCK_R=max(16, triton.next_power_of_2(lora)),
                            BLOCK_DR=max(16, triton.next_power_of_2(width - lora)), num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"])
    o = torch.empty(b, h, lora, dtype=q.dtype, device=q.device)
    mla_combine_kernel[(b * h,)](part_o, part_lse, o, LORA=lora, SPLITS=splits,
                                 BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=triton.next_power_of_2(lora),
                                 num_warps=4 if lora >= 256 else 1)
    return o


def attention_prefill(q: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, batch: int,
                      seq: int, past: int, nope: int, scale: float, config: dict | None = None) -> torch.Tensor:
    """q [T, H (DN + DR)] rows (row stride free; nope parts read), q_pe [T, H, DR] roped, kv [B, L, H (DN + DV)]
    (L >= past + seq: kv_b of the cached latents), cache [B, capacity, R + DR] -> o [T, H, DV]."""
    t, h, rope = q_pe.shape
    v_dim = kv.shape[-1] // h - nope
    lora = cache.shape[-1] - rope
    cfg = config or prefill_config(nope, rope, v_dim)
    o = torch.empty(t, h, v_dim, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(seq, cfg["BLOCK_M"]), batch * h)
    mla_prefill_kernel[grid](q, q_pe, kv, cache, o, seq, past, scale * LOG2E, q.stride(0), kv.stride(0),
                             cache.stride(0), NUM_HEADS=h, NOPE=nope, ROPE=rope, V_DIM=v_dim, LORA=lora,
                             BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                             BLOCK_DN=max(16, triton.next_power_of_2(nope)),
                             BLOCK_DR=max(16, triton.next_power_of_2(rope)),
                             BLOCK_DV=max(16, triton.next_power_of_2(v_dim)), num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return o
