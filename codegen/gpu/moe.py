"""Fused MoE for GPU-resident experts: grouped GEMMs over token slots sorted by expert.

A token's K routing choices are K "slots" (slot s = token s // K). Three steps:
  moe_align       count slots per expert, pad each expert's count to BLOCK_M,
                  and write sorted_slots (each expert's slots in a contiguous, BLOCK_M-aligned
                  run; padding holds the sentinel num_slots), the expert of every M block and
                  the padded total. Deterministic (ranks come from a cumulative sum, not atomics)
                  and all on the device, so it can be captured in a CUDA graph. One program for a few
                  slots; past PARALLEL_ALIGN_SLOTS three launches (per-chunk counts, offsets,
                  scatter), so that a prefill's alignment is not one serial loop (561 us at 16K slots).
  fused_moe       one grouped GEMM launch per matrix: program (M block, N block) multiplies the
                  rows of its block (gathered by slot) by its block's expert weights. The gate_up
                  pass computes the gate and up tiles together and stores silu(gate) * up; the
                  down pass multiplies each row by its routing weight. Blocks past the padded
                  total exit at once.
  moe_sum         y[t] = sum over k of the down pass's rows t*K .. t*K+K-1.

Decode (at most GEMV_TOKENS tokens) skips the alignment and the sum, two launches
(config DECODE): "gemv" = moe_gemv_up (program = slot, N block: silu(gate) * up) and
moe_gemv_down (program = token, N block: per K step, the token's K experts unrolled, sums
weight * (down row . act) in float32 before one store); "dot" = the gate_up grouped GEMM on a
constant alignment with one slot per M block (block_expert is topk_ids itself) and
moe_down_sum, the same ordered sum on tensor cores; "mixed" = that gate_up + moe_gemv_down. "gemv" is
the default (an in-graph sweep on an H100 measured it fastest at one token). w4a16 and fp8 experts
decode on moe_gemv_up_q / moe_gemv_down_q (the same pair reading whole groups a K step, float32
products summed per group and scaled once) unless their config says DECODE "grouped" (the
grouped GEMM, a tuning candidate).
Either way the weighted sum is folded into the down projection and stays deterministic (no
atomics).

Weights are bf16 / fp16 [E, N, K] (gate_up [E, 2I, H], gate rows first; down [E, H, I]), or
w4a16: int4 symmetric, group-wise along K (group = BLOCK_K). In each group of G values, byte j
holds value j in its low nibble and value j + G/2 in its high nibble (two's complement), so a
program multiplies two contiguous half-groups of activations by the two nibble planes; scales
are float32 [E, N, K / G]. Or fp8 weight-only (w8a16, --gpu-quant fp8): float8_e4m3fn [E, N, K]
with a float32 scale per row and group of G values along K (pack_fp8: amax / 448), on the
grouped GEMM at every token count; it runs the 8-bit branch of fused_moe_kernel (the load is
dtype-agnostic: int8 or fp8 values are converted to float32 in registers, scaled, and cast to the
activation dtype before tl.dot). Triton lowers fp8e4nv on sm89+ (and AMD) only. From W8A8_MIN_TOKENS
tokens on (prefill) fp8 experts run w8a8: quant_fp8_kernel rounds each pass's activations (x, then
silu(gate) * up) to e4m3 with a float32 scale per row and group (amax / 448), and fused_moe_w8a8_kernel
multiplies the raw e4m3 rows and weights on fp8 tensor cores, each K step's float32 product scaled by the
rows' and the weight rows' group scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)   # fp8 weight-only experts (pack_fp8)
FP8_MAX = 448.0          # the largest float8_e4m3fn value


@triton.jit
def _scatter_slots(ids, s, smask, e, running, sorted_ptr):
    """Write slots s (expert ids `ids`) to their places sorted by expert, after `running[e]` slots
    already placed per expert (rank = slot order); ids of no expert here are dropped. -> new running."""
    eq = (ids[:, None] == e[None, :]).to(tl.int32)
    before = tl.cumsum(eq, axis=0) - eq
    dest = tl.sum(eq * (before + running[None, :]), axis=1)
    tl.store(sorted_ptr + dest, s, mask=smask & (tl.sum(eq, axis=1) > 0))
    return running + tl.sum(eq, axis=0)


@triton.jit
def moe_align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, total_ptr, num_slots, max_padded, max_blocks,
                     NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                     CHUNK: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    emask = e < NUM_EXPERTS
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for s0 in range(0, num_slots, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + s, mask=s < num_slots, other=-1)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    cum = tl.cumsum(padded, axis=0)
    starts = cum - padded
    tl.store(total_ptr, tl.sum(padded, axis=0))
    for p0 in range(0, max_padded, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + p, tl.zeros((CHUNK,), tl.int32) + num_slots, mask=p < max_padded)
    for b0 in range(0, max_blocks, CHUNK):
        blk = b0 + tl.arange(0, CHUNK)
        owner = tl.sum(((cum[None, :] <= blk[:, None] * BLOCK_M) & emask[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blk, tl.minimum(owner, NUM_EXPERTS - 1), mask=blk < max_blocks)
    tl.debug_barrier()
    running = starts
    for s0 in range(0, num_slots, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        smask = s < num_slots
        ids = tl.load(ids_ptr + s, mask=smask, other=-1)
        running = _scatter_slots(ids, s, smask, e, running, sorted_ptr)


@triton.jit
def moe_count_kernel(ids_ptr, counts_ptr, num_slots, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Parallel alignment, step 1 of 3: program p counts the slots of chunk p per expert."""
    p = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for sub in tl.static_range(0, CHUNK, SUB):
        s = p * CHUNK + sub + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + s, mask=s < num_slots, other=-1)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + p * BLOCK_E + e, counts)


@triton.jit
def moe_offsets_kernel(counts_ptr, offsets_ptr, sorted_ptr, block_expert_ptr, total_ptr, num_slots, num_chunks,
                       max_padded, max_blocks, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """Step 2 (one program): per-expert padded starts, each chunk's first destination per expert,
    the padded total, the expert of every M block, and the sentinel fill of sorted_slots."""
    pp = tl.arange(0, BLOCK_P)[:, None]
    e = tl.arange(0, BLOCK_E)
    emask = e < NUM_EXPERTS
    c = tl.load(counts_ptr + pp * BLOCK_E + e[None, :], mask=pp < num_chunks, other=0)
    counts = tl.sum(c, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    cum = tl.cumsum(padded, axis=0)
    starts = cum - padded
    tl.store(total_ptr, tl.sum(padded, axis=0))
    tl.store(offsets_ptr + pp * BLOCK_E + e[None, :], starts[None, :] + tl.cumsum(c, axis=0) - c, mask=pp < num_chunks)
    for p0 in range(0, max_padded, FILL):
        q = p0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + q, tl.zeros((FILL,), tl.int32) + num_slots, mask=q < max_padded)
    for b0 in range(0, max_blocks, CHUNK):
        blk = b0 + tl.arange(0, CHUNK)
        owner = tl.sum(((cum[None, :] <= blk[:, None] * BLOCK_M) & emask[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blk, tl.minimum(owner, NUM_EXPERTS - 1), mask=blk < max_blocks)


@triton.jit
def moe_scatter_kernel(ids_ptr, offsets_ptr, sorted_ptr, num_slots, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                       SUB: tl.constexpr):
    """Step 3: program p writes the slots of chunk p to their sorted places (rank = slot order)."""
    p = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    running = tl.load(offsets_ptr + p * BLOCK_E + e)
    for sub in tl.static_range(0, CHUNK, SUB):
        s = p * CHUNK + sub + tl.arange(0, SUB)
        smask = s < num_slots
        ids = tl.load(ids_ptr + s, mask=smask, other=-1)
        running = _scatter_slots(ids, s, smask, e, running, sorted_ptr)


@triton.jit
def fused_moe_kernel(a_ptr, w_ptr, scale_ptr, c_ptr, sorted_ptr, block_expert_ptr, total_ptr, topk_w_ptr,
                     N, K, num_slots, a_stride, c_stride, w_estride, w_nstride, s_estride, s_nstride,
                     A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, INT4: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     INT8: tl.constexpr = False, GROUP: tl.constexpr = 128):
    pid_m, pid_n = _moe_block_ids(N, BLOCK_N)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert, slots, smask, arow, offs_n, nmask, wn = _moe_block(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots,
                                                               N, A_DIV, BLOCK_M, BLOCK_N)
    w_base = w_ptr + expert * w_estride
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if INT4:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_h = tl.arange(0, HALF)
        s_base = scale_ptr + expert * s_estride
        for g in range(0, K // BLOCK_K):
            a_lo = tl.load(a_ptr + arow[:, None] * a_stride + g * BLOCK_K + offs_h[None, :], mask=smask[:, None],
                           other=0.0)
            a_hi = tl.load(a_ptr + arow[:, None] * a_stride + g * BLOCK_K + HALF + offs_h[None, :],
                           mask=smask[:, None], other=0.0)
            packed = tl.load(w_base + wn[None, :] * w_nstride + g * HALF + offs_h[:, None])
            lo = (packed << 4).to(tl.int8, bitcast=True) >> 4
            hi = packed.to(tl.int8, bitcast=True) >> 4
            sc = tl.load(s_base + wn * s_nstride + (g * BLOCK_K) // GROUP)[None, :]
            acc = tl.dot(a_lo, (lo.to(tl.float32) * sc).to(a_lo.dtype), acc)
            acc = tl.dot(a_hi, (hi.to(tl.float32) * sc).to(a_lo.dtype), acc)
            if GATED:
                packed = tl.load(w_base + (wn + N)[None, :] * w_nstride + g * HALF + offs_h[:, None])
                lo = (packed << 4).to(tl.int8, bitcast=True) >> 4
                hi = packed.to(tl.int8, bitcast=True) >> 4
                sc = tl.load(s_base + (wn + N) * s_nstride + (g * BLOCK_K) // GROUP)[None, :]
                acc_up = tl.dot(a_lo, (lo.to(tl.float32) * sc).to(a_lo.dtype), acc_up)
                acc_up = tl.dot(a_hi, (hi.to(tl.float32) * sc).to(a_lo.dtype), acc_up)
    elif INT8:
        # int8 weights [E, N, K] with a float32 scale per GROUP values of K (the CPU experts' layout,
        # streamed to the GPU for long prefills); BLOCK_K divides GROUP
        offs_k = tl.arange(0, BLOCK_K)
        s_base = scale_ptr + expert * s_estride
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + arow[:, None] * a_stride + k0 + offs_k[None, :], mask=smask[:, None], other=0.0)
            w = tl.load(w_base + wn[None, :] * w_nstride + k0 + offs_k[:, None])
            sc = tl.load(s_base + wn * s_nstride + k0 // GROUP)[None, :]
            acc = tl.dot(a, (w.to(tl.float32) * sc).to(a.dtype), acc)
            if GATED:
                wu = tl.load(w_base + (wn + N)[None, :] * w_nstride + k0 + offs_k[:, None])
                su = tl.load(s_base + (wn + N) * s_nstride + k0 // GROUP)[None, :]
                acc_up = tl.dot(a, (wu.to(tl.float32) * su).to(a.dtype), acc_up)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptr + arow[:, None] * a_stride + k0 + offs_k[None, :], mask=smask[:, None] & kmask[None, :],
                        other=0.0)
            w = tl.load(w_base + wn[None, :] * w_nstride + k0 + offs_k[:, None], mask=kmask[:, None], other=0.0)
            acc = tl.dot(a, w.to(a.dtype), acc)
            if GATED:
                wu = tl.load(w_base + (wn + N)[None, :] * w_nstride + k0 + offs_k[:, None], mask=kmask[:, None],
                             other=0.0)
                acc_up = tl.dot(a, wu.to(a.dtype), acc_up)
    _moe_store(acc, acc_up, c_ptr, c_stride, topk_w_ptr, slots, smask, offs_n, nmask, GATED, MUL_WEIGHT)


@triton.jit
def _moe_block_ids(N, BLOCK_N: tl.constexpr):
    """(M block, N block) of this program of a grouped GEMM launch (M blocks outer)."""
    num_n = tl.cdiv(N, BLOCK_N)
    return tl.program_id(0) // num_n, tl.program_id(0) % num_n


@triton.jit
def _moe_block(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N, A_DIV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The expert, slots (and which are real), activation rows (slot // A_DIV), output columns (and which
    are in N) and clamped weight rows of M block pid_m, N block pid_n."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    smask = slots < num_slots
    arow = tl.where(smask, slots // A_DIV, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    return expert, slots, smask, arow, offs_n, nmask, tl.where(nmask, offs_n, 0).to(tl.int64)


@triton.jit
def _moe_store(acc, acc_up, c_ptr, c_stride, topk_w_ptr, slots, smask, offs_n, nmask, GATED: tl.constexpr,
               MUL_WEIGHT: tl.constexpr):
    """Row slot of c = silu(gate) * up (gate_up pass) or routing weight * acc (down pass), in c's dtype."""
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + slots, mask=smask, other=0.0)[:, None]
    c_ptrs = c_ptr + tl.where(smask, slots, 0).to(tl.int64)[:, None] * c_stride + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=smask[:, None] & nmask[None, :])


@triton.jit
def quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, x_stride, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    """Dynamic fp8 activations for w8a8 experts (matmul.quant_fp8_kernel's arithmetic: kernel families import
    nothing from each other): row program_id(0) of x, BLOCK_G groups of GROUP values a program -> e4m3 values
    of x / scale and a float32 scale per group = amax / 448 (1 for a zero group)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    groups = K // GROUP
    gmask = g < groups
    offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = tl.load(x_ptr + row * x_stride + offs, mask=gmask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    q = tl.clamp(x / scale[:, None], -448.0, 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + row * K + offs, q, mask=gmask[:, None])
    tl.store(s_ptr + row * groups + g, scale, mask=gmask)


@triton.jit
def fused_moe_w8a8_kernel(a_ptr, as_ptr, w_ptr, scale_ptr, c_ptr, sorted_ptr, block_expert_ptr, total_ptr, topk_w_ptr,
                          N, K, num_slots, a_stride, as_stride, c_stride, w_estride, w_nstride, s_estride, s_nstride,
                          A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """fused_moe_kernel for fp8 experts at prefill (w8a8): e4m3 activation rows with a scale per group
    (quant_fp8) times the raw e4m3 weights on fp8 tensor cores, each K step (BLOCK_K divides GROUP) a fresh
    float32 dot scaled by the rows' and the weight rows' scales of its group."""
    pid_m, pid_n = _moe_block_ids(N, BLOCK_N)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert, slots, smask, arow, offs_n, nmask, wn = _moe_block(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots,
                                                               N, A_DIV, BLOCK_M, BLOCK_N)
    w_base = w_ptr + expert * w_estride
    s_base = scale_ptr + expert * s_estride
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + arow[:, None] * a_stride + k0 + offs_k[None, :], mask=smask[:, None], other=0.0)
        sa = tl.load(as_ptr + arow * as_stride + k0 // GROUP, mask=smask, other=0.0)[:, None]
        w = tl.load(w_base + wn[None, :] * w_nstride + k0 + offs_k[:, None])
        acc += tl.dot(a, w) * (sa * tl.load(s_base + wn * s_nstride + k0 // GROUP)[None, :])
        if GATED:
            wu = tl.load(w_base + (wn + N)[None, :] * w_nstride + k0 + offs_k[:, None])
            acc_up += tl.dot(a, wu) * (sa * tl.load(s_base + (wn + N) * s_nstride + k0 // GROUP)[None, :])
    _moe_store(acc, acc_up, c_ptr, c_stride, topk_w_ptr, slots, smask, offs_n, nmask, GATED, MUL_WEIGHT)


@triton.jit
def moe_sum_kernel(c_ptr, y_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(c_ptr + (t * TOP_K + k) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * hidden + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_gemv_up_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, N, K, x_stride, w_estride, w_nstride,
                       TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    wn = tl.where(nmask, offs_n, 0).to(tl.int64)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    x_row = x_ptr + (slot // TOP_K) * x_stride
    w_base = w_ptr + expert * w_estride
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_N,), tl.float32)
    acc_u = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        xv = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
        wg = tl.load(w_base + wn[:, None] * w_nstride + kk[None, :], mask=kmask[None, :], other=0.0)
        wu = tl.load(w_base + (wn + N)[:, None] * w_nstride + kk[None, :], mask=kmask[None, :], other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * xv, axis=1)
        acc_u += tl.sum(wu.to(tl.float32) * xv, axis=1)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(out_ptr + slot * N + offs_n, act.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def moe_gemv_down_kernel(a_ptr, w_ptr, ids_ptr, topk_w_ptr, y_ptr, N, K, y_stride, w_estride, w_nstride,
                         TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    wn = tl.where(nmask, offs_n, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        for j in tl.static_range(TOP_K):     # unrolled: the experts' weight tiles are loaded together
            slot = t * TOP_K + j
            expert = tl.load(ids_ptr + slot).to(tl.int64)
            weight = tl.load(topk_w_ptr + slot)
            av = tl.load(a_ptr + slot * K + kk, mask=kmask, other=0.0).to(tl.float32) * weight
            w = tl.load(w_ptr + expert * w_estride + wn[:, None] * w_nstride + kk[None, :], mask=kmask[None, :],
                        other=0.0)
            acc += tl.sum(w.to(tl.float32) * av[None, :], axis=1)
    tl.store(y_ptr + t * y_stride + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def moe_down_sum_kernel(a_ptr, w_ptr, ids_ptr, topk_w_ptr, y_ptr, N, K, y_stride, w_estride, w_nstride,
                        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[t, n block] = sum over the token's K experts, in order, of (weight * act row) @ down^T: one
    pipelined tensor-core loop over (expert, k) with the token's row as row 0 of an M tile."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    wn = tl.where(nmask, offs_n, 0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    kiters = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for it in range(0, TOP_K * kiters):
        j = it // kiters
        k0 = (it - j * kiters) * BLOCK_K
        slot = t * TOP_K + j
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        weight = tl.load(topk_w_ptr + slot)
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(a_ptr + slot * K + offs_m[:, None] * 0 + kk[None, :], mask=(offs_m[:, None] == 0) & kmask[None, :],
                    other=0.0)
        a = (a.to(tl.float32) * weight).to(a_ptr.dtype.element_ty)
        w = tl.load(w_ptr + expert * w_estride + wn[None, :] * w_nstride + kk[:, None], mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc)
    y = tl.sum(acc, axis=0)
    tl.store(y_ptr + t * y_stride + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _group_dots(q_rows, s_rows, x_row, g, gmask, GROUP: tl.constexpr, FP8: tl.constexpr, INT8: tl.constexpr = False,
                PAIR: tl.constexpr = 0):
    """[rows] float32: sum over the groups g (those with gmask) of scale * (the row's values of the group
    . x's): fp8 or int8 rows (a value a byte, q_rows value pointers), or int4 rows (q_rows byte pointers)
    in blocks of PAIR values, byte j of a block holding value j in its low nibble and value j + PAIR / 2 in
    its high one, both signed (PAIR 0: one block a group, pack_w4a16's layout; the CPU kernels' is 32);
    s_rows the rows' scale pointers. Products in float32, one scale multiply a group."""
    if FP8 or INT8:
        offs_j = tl.arange(0, GROUP)
        w = tl.load(q_rows[:, None, None] + (g * GROUP)[None, :, None] + offs_j[None, None, :],
                    mask=gmask[None, :, None], other=0.0).to(tl.float32)
        xv = tl.load(x_row + (g * GROUP)[:, None] + offs_j[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        part = tl.sum(w * xv[None, :, :], axis=2)
    else:
        HALF_G: tl.constexpr = GROUP // 2
        offs_j = tl.arange(0, HALF_G)
        if PAIR == 0:
            HALF: tl.constexpr = HALF_G
            k_lo = offs_j
        else:
            HALF: tl.constexpr = PAIR // 2
            k_lo = (offs_j // HALF) * PAIR + offs_j % HALF
        packed = tl.load(q_rows[:, None, None] + (g * HALF_G)[None, :, None] + offs_j[None, None, :],
                         mask=gmask[None, :, None], other=0)
        lo = ((packed << 4).to(tl.int8, bitcast=True) >> 4).to(tl.float32)
        hi = (packed.to(tl.int8, bitcast=True) >> 4).to(tl.float32)
        x_lo = x_row + (g * GROUP)[:, None] + k_lo[None, :]
        a_lo = tl.load(x_lo, mask=gmask[:, None], other=0.0).to(tl.float32)
        a_hi = tl.load(x_lo + HALF, mask=gmask[:, None], other=0.0).to(tl.float32)
        part = tl.sum(lo * a_lo[None, :, :] + hi * a_hi[None, :, :], axis=2)
    sc = tl.load(s_rows[:, None] + g[None, :], mask=gmask[None, :], other=0.0)
    return tl.sum(part * sc, axis=1)


@triton.jit
def moe_gemv_up_q_kernel(x_ptr, q_ptr, s_ptr, ids_ptr, out_ptr, N, K, x_stride, q_estride, q_nstride, s_estride,
                         s_nstride, TOP_K: tl.constexpr, GROUP: tl.constexpr, FP8: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr = False,
                         PAIR: tl.constexpr = 0, SKIP: tl.constexpr = False):
    """moe_gemv_up_kernel on w4a16 / fp8 experts, or int8 / int4 ones in the CPU kernels' layout (INT8, PAIR;
    see _group_dots), at decode: BLOCK_K / GROUP whole groups a step. SKIP: a slot with id -1 does nothing."""
    NG: tl.constexpr = BLOCK_K // GROUP
    slot = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    if SKIP:
        if expert < 0:
            return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    wn = tl.where(nmask, offs_n, 0).to(tl.int64)
    x_row = x_ptr + (slot // TOP_K) * x_stride
    q_gate = q_ptr + expert * q_estride + wn * q_nstride
    s_gate = s_ptr + expert * s_estride + wn * s_nstride
    offs_g = tl.arange(0, NG)
    groups = K // GROUP
    acc_g = tl.zeros((BLOCK_N,), tl.float32)
    acc_u = tl.zeros((BLOCK_N,), tl.float32)
    for g0 in range(0, groups, NG):
        g = g0 + offs_g
        gmask = g < groups
        acc_g += _group_dots(q_gate, s_gate, x_row, g, gmask, GROUP, FP8, INT8, PAIR)
        acc_u += _group_dots(q_gate + N * q_nstride, s_gate + N * s_nstride, x_row, g, gmask, GROUP, FP8, INT8, PAIR)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(out_ptr + slot * N + offs_n, act.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def moe_gemv_down_q_kernel(a_ptr, q_ptr, s_ptr, ids_ptr, topk_w_ptr, y_ptr, N, K, y_stride, q_estride, q_nstride,
                           s_estride, s_nstride, TOP_K: tl.constexpr, GROUP: tl.constexpr, FP8: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr = False,
                           PAIR: tl.constexpr = 0, SKIP: tl.constexpr = False):
    """moe_gemv_down_kernel on the experts of moe_gemv_up_q_kernel (decode): per step the token's experts
    unrolled, each weighted sum of (down rows . act) over BLOCK_K / GROUP whole groups, one store. SKIP: slots
    with id -1 add nothing and read no weights."""
    NG: tl.constexpr = BLOCK_K // GROUP
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    wn = tl.where(nmask, offs_n, 0).to(tl.int64)
    offs_g = tl.arange(0, NG)
    groups = K // GROUP
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g0 in range(0, groups, NG):
        g = g0 + offs_g
        gmask = g < groups
        for j in tl.static_range(TOP_K):
            slot = t * TOP_K + j
            expert = tl.load(ids_ptr + slot).to(tl.int64)
            if SKIP:     # a slot held elsewhere reads no group
                gmask = g < tl.where(expert >= 0, groups, 0)
                expert = tl.where(expert >= 0, expert, 0)
            weight = tl.load(topk_w_ptr + slot)
            dots = _group_dots(q_ptr + expert * q_estride + wn * q_nstride, s_ptr + expert * s_estride + wn * s_nstride,
                               a_ptr + slot * K, g, gmask, GROUP, FP8, INT8, PAIR)
            acc += dots * weight
    tl.store(y_ptr + t * y_stride + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


# a decode step's hand-off to the CPU kernel (runtime/gpu/offload): x, the weights and this node's ids written to
# pinned host memory in one kernel, the ids split with the GPU's share of the CPU experts, which the q GEMV kernels
# above then run on the CPU kernels' layout (INT8 / PAIR, SKIP), reading pinned host memory over PCIe

@triton.jit
def moe_stage_kernel(ids_ptr, table_ptr, take_ptr, cpu_ptr, gpu_ptr, x_ptr, tw_ptr, x_out_ptr, tw_out_ptr, hidden,
                     x_stride, TOP_K: tl.constexpr, BLOCK: tl.constexpr, HAS_TABLE: tl.constexpr, SPLIT: tl.constexpr,
                     HAS_X: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token t's router ids -> this node's rows (table; -1: held elsewhere) into cpu. SPLIT: of the n slots held
    here the first take[n] go to gpu instead (their row; -1 elsewhere), cpu naming them -1. HAS_X: also x's row
    (as float32) and the token's weights to x_out / tw_out."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < TOP_K
    ids = tl.load(ids_ptr + t * TOP_K + offs, mask=m, other=-1).to(tl.int32)
    if HAS_TABLE:
        rows = tl.load(table_ptr + tl.where(ids >= 0, ids, 0), mask=m & (ids >= 0), other=-1).to(tl.int32)
    else:
        rows = ids
    if SPLIT:
        held = ((rows >= 0) & m).to(tl.int32)
        take = tl.load(take_ptr + tl.sum(held, axis=0))
        to_gpu = (held > 0) & (tl.cumsum(held, axis=0) <= take)
        tl.store(gpu_ptr + t * TOP_K + offs, tl.where(to_gpu, rows, -1), mask=m)
        rows = tl.where(to_gpu, -1, rows)
    tl.store(cpu_ptr + t * TOP_K + offs, rows, mask=m)
    if HAS_X:
        tl.store(tw_out_ptr + t * TOP_K + offs, tl.load(tw_ptr + t * TOP_K + offs, mask=m, other=0.0), mask=m)
        for h0 in range(0, hidden, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hm = hh < hidden
            xv = tl.load(x_ptr + t * x_stride + hh, mask=hm, other=0.0).to(tl.float32)
            tl.store(x_out_ptr + t * hidden + hh, xv, mask=hm)


# the hand-off back from the CPU kernel in decode graphs (runtime/gpu/offload): the graph of the next layer is
# queued before the CPU kernel runs and starts with this kernel, which waits on the GPU for the host's flag

@triton.jit
def moe_wait_gather_kernel(flag_ptr, seen_ptr, y_ptr, extra_ptr, out_ptr, n, max_spins, HAS_EXTRA: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Spin until the host's step count in flag (pinned host memory, read across PCIe with volatile loads) reaches
    seen + 1 (seen: the count this kernel last saw, in device memory) or max_spins reads went by, then out = y
    (+ extra) and seen += 1. Nothing is written back to host memory (a write there costs the kernel a PCIe round
    trip at its end). Timed out: out is NaN. y is read with plain loads, issued once the loop has exited, as the
    gather kernel of a graph launched after the host's work reads it."""
    want = (tl.load(seen_ptr) + 1) & 0x7FFFFFFF
    f = tl.load(flag_ptr, volatile=True)
    spins = 0
    while (f != want) & (spins < max_spins):
        f = tl.load(flag_ptr, volatile=True)
        spins += 1
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        y = tl.load(y_ptr + offs, mask=m, other=0.0)
        if HAS_EXTRA:
            y += tl.load(extra_ptr + offs, mask=m, other=0.0)
        y = tl.where(f == want, y, float("nan"))
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(seen_ptr, want)


KERNELS = {"moe_align_kernel": moe_align_kernel, "moe_count_kernel": moe_count_kernel,
           "moe_offsets_kernel": moe_offsets_kernel, "moe_scatter_kernel": moe_scatter_kernel,
           "fused_moe_kernel": fused_moe_kernel, "quant_fp8_kernel": quant_fp8_kernel,
           "fused_moe_w8a8_kernel": fused_moe_w8a8_kernel,
           "moe_sum_kernel": moe_sum_kernel, "moe_gemv_up_kernel": moe_gemv_up_kernel,
           "moe_gemv_down_kernel": moe_gemv_down_kernel, "moe_down_sum_kernel": moe_down_sum_kernel,
           "moe_gemv_up_q_kernel": moe_gemv_up_q_kernel, "moe_gemv_down_q_kernel": moe_gemv_down_q_kernel,
           "moe_stage_kernel": moe_stage_kernel, "moe_wait_gather_kernel": moe_wait_gather_kernel}

GEMV_TOKENS = 4          # dense steps with at most this many tokens take the two-launch decode path


def gemv_config(hidden: int, inter: int) -> dict:
    """Decode (few tokens): DECODE "dot" = the grouped gate_up GEMM on a fixed one-slot-per-block
    alignment (no align launch) + moe_down_sum; "gemv" = moe_gemv_up + moe_gemv_down. Default: gemv with
    4 weight rows a program, the winner of an in-graph sweep on an H100 (bench/gpu_profile.py)."""
    return {"DECODE": "gemv", "DOWN_SUM_N": 16, "DOWN_SUM_K": 128, "down_sum_warps": 4, "down_sum_stages": 4,
            "GEMV_N_UP": 4, "GEMV_K_UP": min(2048, triton.next_power_of_2(hidden)), "GEMV_N_DOWN": 4,
            "GEMV_K_DOWN": min(1024, triton.next_power_of_2(inter)), "gemv_warps": 4}


def default_config(num_slots: int, hidden: int, inter: int, group_size: int | None = None) -> dict:
    """One config for both passes (they share the alignment, hence BLOCK_M)."""
    if num_slots <= 64:
        cfg = {"BLOCK_M": 16, "BLOCK_N_UP": 32, "BLOCK_N_DOWN": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N_UP": 64, "BLOCK_N_DOWN": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    if group_size is not None:
        cfg["BLOCK_K"] = group_size
    cfg.update(gemv_config(hidden, inter))
    return cfg


CPU_INT4_PAIR = 32   # the CPU kernels' int4 layout: byte j of each 32 values holds values j and j + 16
PARALLEL_ALIGN_SLOTS = 512   # more slots than this: the three-launch parallel alignment


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the M blocks after alignment (each non-empty expert adds < 1 block of padding)."""
    return min(num_slots, triton.cdiv(num_slots, block_m) + num_experts)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    slots = ids.numel()
    blocks = max_blocks(slots, num_experts, block_m)
    sorted_slots = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    total = torch.empty(1, dtype=torch.int32, device=ids.device)
    if slots > PARALLEL_ALIGN_SLOTS:
        block_e = triton.next_power_of_2(num_experts)
        chunk = max(256, triton.next_power_of_2(triton.cdiv(slots, 128)))
        chunks = triton.cdiv(slots, chunk)
        counts = torch.empty(chunks, block_e, dtype=torch.int32, device=ids.device)
        offsets = torch.empty_like(counts)
        moe_count_kernel[(chunks,)](ids, counts, slots, BLOCK_E=block_e, CHUNK=chunk, SUB=64, num_warps=4)
        moe_offsets_kernel[(1,)](counts, offsets, sorted_slots, block_expert, total, slots, chunks, blocks * block_m,
                                 blocks, NUM_EXPERTS=num_experts, BLOCK_M=block_m, BLOCK_E=block_e,
                                 BLOCK_P=triton.next_power_of_2(chunks), CHUNK=64, FILL=1024, num_warps=8)
        moe_scatter_kernel[(chunks,)](ids, offsets, sorted_slots, slots, BLOCK_E=block_e, CHUNK=chunk, SUB=64,
                                      num_warps=4)
        return sorted_slots, block_expert, total
    moe_align_kernel[(1,)](ids, sorted_slots, block_expert, total, slots, blocks * block_m, blocks,
                           NUM_EXPERTS=num_experts, BLOCK_M=block_m,
                           BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=64, num_warps=4)
    return sorted_slots, block_expert, total


def _gemm(a, w, scales, c, align, topk_w, n, k, a_div, gated, mul_weight, block_n, cfg, pair=None):
    """pair: int4 values packed in blocks of `pair` (the CPU kernels' layout: 32) instead of one
    block per scale group (w4a16's own layout). `a` is (e4m3 values, scales) from quant_fp8 for w8a8."""
    sorted_slots, block_expert, total = align
    quantized = scales is not None
    # int8 or fp8 (one value per byte, the 8-bit branch); else uint8: w4a16 (two values per byte)
    int8 = quantized and (w.dtype == torch.int8 or w.dtype == FP8_DTYPE)
    group = k // scales.shape[-1] if quantized else 128
    block_k = min(cfg["BLOCK_K"], group) if int8 else pair or cfg["BLOCK_K"]
    grid = (block_expert.numel() * triton.cdiv(n, block_n),)
    if isinstance(a, tuple):
        aq, a_scales = a
        fused_moe_w8a8_kernel[grid](
            aq, a_scales, w, scales, c, sorted_slots, block_expert, total, topk_w, n, k, c.shape[0], aq.stride(0),
            a_scales.stride(0), c.stride(0), w.stride(0), w.stride(1), scales.stride(0), scales.stride(1),
            A_DIV=a_div, GATED=gated, MUL_WEIGHT=mul_weight, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n,
            BLOCK_K=block_k, GROUP=group, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return
    fused_moe_kernel[grid](
        a, w, scales if quantized else w, c, sorted_slots, block_expert, total, topk_w,
        n, k, c.shape[0], a.stride(0), c.stride(0), w.stride(0), w.stride(1),
        scales.stride(0) if quantized else 0, scales.stride(1) if quantized else 0,
        A_DIV=a_div, GATED=gated, MUL_WEIGHT=mul_weight, INT4=quantized and not int8, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], INT8=int8,
        GROUP=group)


def quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of `group`) -> (float8_e4m3fn [M, K], float32 scales [M, K / group])."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    block_g = min(triton.next_power_of_2(k // group), max(1, 4096 // group))
    quant_fp8_kernel[(m, triton.cdiv(k // group, block_g))](x, q, s, k, x.stride(0), GROUP=group, BLOCK_G=block_g,
                                                            num_warps=4)
    return q, s


W8A8_MIN_TOKENS = 32    # fp8 experts' grouped GEMMs for at least this many tokens quantize activations too


def w8a8(cfg: dict, tokens: int, group: int, device: torch.device) -> bool:
    """Whether fp8 experts' grouped GEMMs run w8a8 (quant_fp8 on each pass's activations, then
    fused_moe_w8a8_kernel): the config's "A8" when it has one, else from W8A8_MIN_TOKENS tokens on
    (prefill). Never for groups under 32 values (an fp8 dot's K is at least 32) nor on AMD GPUs (the
    ahead-of-time builds lower the e4m3fn dot for NVIDIA sm89+ only)."""
    if group < 32 or (device.type == "cuda" and torch.version.hip is not None):
        return False
    return bool(cfg.get("A8", tokens >= W8A8_MIN_TOKENS))


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, weights: dict,
              num_experts: int, inter: int, config: dict | None = None, partial: bool = False) -> torch.Tensor:
    """x [T, H], topk_* [T, K]; weights {"gate_up", "down"} dense, {"gate_up.qweight",
    "gate_up.scales", "down.qweight", "down.scales"} for w4a16 (uint8 qweight) or fp8 (float8_e4m3fn
    qweight, pack_fp8's layout; the grouped GEMM's 8-bit branch at every token count), or {"gate_up.q",
    "gate_up.scales", "down.q", "down.scales"} (+ "comp", unused) for the CPU kernels' int8 layout (w8a16) or int4
    layout (uint8 q: w4a16 with values paired in blocks of CPU_INT4_PAIR, a scale per group), both
    always on the grouped GEMM: they serve prefills that stream CPU experts in. -> y [T, H] in x's dtype.
    partial: some ids are -1 (experts this node does not hold, run elsewhere): those slots add
    nothing (decode: they run expert 0 with weight 0, keeping every shape static for CUDA graphs;
    prefill: alignment drops them)."""
    t, h = x.shape
    top_k = topk_ids.shape[-1]
    slots = t * top_k
    cpu = "gate_up.q" in weights           # the CPU experts' layout (q, scales[, comp]), streamed in
    int8 = cpu and weights["gate_up.q"].dtype == torch.int8
    fp8 = "gate_up.qweight" in weights and weights["gate_up.qweight"].dtype == FP8_DTYPE
    int4 = ("gate_up.qweight" in weights and not fp8) or (cpu and not int8)
    pair = CPU_INT4_PAIR if cpu and int4 else None
    group = h // weights["gate_up.scales"].shape[-1] if int4 or int8 or fp8 else None
    cfg = config or default_config(slots, h, inter, None if cpu else group)
    if int8 or fp8:
        cfg = {**cfg, "BLOCK_K": min(cfg["BLOCK_K"], group)}
    gpu_q = (int4 or fp8) and not cpu      # GPU experts' w4a16 / fp8: GEMV decode unless a config says "grouped"
    if t <= GEMV_TOKENS and (not (int4 or int8 or fp8) or (gpu_q and cfg.get("DECODE", "gemv") == "gemv")):
        if partial:
            held = topk_ids >= 0
            topk_weights = topk_weights * held
            topk_ids = topk_ids.clamp(min=0)
        full = {**gemv_config(h, inter), **cfg}
        if gpu_q:
            return _fused_moe_decode_q(x, topk_weights, topk_ids, weights, inter, fp8, full)
        return _fused_moe_decode(x, topk_weights, topk_ids, weights, inter, full)
    align = moe_align(topk_ids, num_experts, cfg["BLOCK_M"])
    key = ".q" if cpu else ".qweight" if int4 or fp8 else ""
    w_up, w_down = weights["gate_up" + key], weights["down" + key]
    s_up = weights["gate_up.scales"] if int4 or int8 or fp8 else None
    s_down = weights["down.scales"] if int4 or int8 or fp8 else None
    tw = topk_weights.reshape(-1).to(torch.float32)
    a8 = fp8 and w8a8(cfg, t, group, x.device)
    # w8a8 quantizes every row of inter_act: the rows of dropped slots (partial) must hold numbers
    inter_act = (torch.zeros if partial and a8 else torch.empty)(slots, inter, dtype=x.dtype, device=x.device)
    _gemm(quant_fp8(x, group) if a8 else x, w_up, s_up, inter_act, align, tw, inter, h, top_k, True, False,
          cfg["BLOCK_N_UP"], cfg, pair)
    out = (torch.zeros if partial else torch.empty)(slots, h, dtype=x.dtype, device=x.device)
    down_in = quant_fp8(inter_act, inter // s_down.shape[-1]) if a8 else inter_act
    _gemm(down_in, w_down, s_down, out, align, tw, h, inter, 1, False, True, cfg["BLOCK_N_DOWN"], cfg, pair)
    y = torch.empty(t, h, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(h))
    moe_sum_kernel[(t, triton.cdiv(h, block))](out, y, h, TOP_K=top_k, BLOCK=block, num_warps=4)
    return y


_ALIGN_CONST: dict = {}


def _slot_blocks(slots: int, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment of `slots` slots with one slot per M block (what moe_align gives when no two slots
    share an expert, as at decode), as constants: sorted_slots and the padded total."""
    key = (str(device), slots, block_m)
    if key not in _ALIGN_CONST:
        sorted_slots = torch.full((slots, block_m), slots, dtype=torch.int32, device=device)
        sorted_slots[:, 0] = torch.arange(slots, dtype=torch.int32, device=device)
        total = torch.full((1,), slots * block_m, dtype=torch.int32, device=device)
        _ALIGN_CONST[key] = (sorted_slots.reshape(-1), total)
    return _ALIGN_CONST[key]


def _decode_slots(topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernels' per-slot inputs: expert ids int32 [T*K] and routing weights float32 [T*K]."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    return ids, topk_weights.reshape(-1).to(torch.float32)


def _fused_moe_decode(x, topk_weights, topk_ids, weights, inter, cfg):
    t, h = x.shape
    top_k = topk_ids.shape[-1]
    ids, tw = _decode_slots(topk_weights, topk_ids)
    w_up, w_down = weights["gate_up"], weights["down"]
    mode = cfg["DECODE"]
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    if mode in ("dot", "mixed"):
        sorted_slots, total = _slot_blocks(t * top_k, cfg["BLOCK_M"], x.device)
        _gemm(x, w_up, None, act, (sorted_slots, ids, total), tw, inter, h, top_k, True, False, cfg["BLOCK_N_UP"],
              cfg)
    else:
        moe_gemv_up_kernel[(t * top_k, triton.cdiv(inter, cfg["GEMV_N_UP"]))](
            x, w_up, ids, act, inter, h, x.stride(0), w_up.stride(0), w_up.stride(1), TOP_K=top_k,
            BLOCK_N=cfg["GEMV_N_UP"], BLOCK_K=cfg["GEMV_K_UP"], num_warps=cfg["gemv_warps"])
    y = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if mode == "dot":
        moe_down_sum_kernel[(t, triton.cdiv(h, cfg["DOWN_SUM_N"]))](
            act, w_down, ids, tw, y, h, inter, y.stride(0), w_down.stride(0), w_down.stride(1), TOP_K=top_k,
            BLOCK_M=16, BLOCK_N=cfg["DOWN_SUM_N"], BLOCK_K=cfg["DOWN_SUM_K"], num_warps=cfg["down_sum_warps"],
            num_stages=cfg["down_sum_stages"])
    else:
        moe_gemv_down_kernel[(t, triton.cdiv(h, cfg["GEMV_N_DOWN"]))](
            act, w_down, ids, tw, y, h, inter, y.stride(0), w_down.stride(0), w_down.stride(1), TOP_K=top_k,
            BLOCK_N=cfg["GEMV_N_DOWN"], BLOCK_K=cfg["GEMV_K_DOWN"], num_warps=cfg["gemv_warps"])
    return y


def _fused_moe_decode_q(x, topk_weights, topk_ids, weights, inter, fp8, cfg):
    """The "gemv" decode on w4a16 / fp8 experts: moe_gemv_up_q + moe_gemv_down_q, K steps of whole groups."""
    t, h = x.shape
    top_k = topk_ids.shape[-1]
    ids, tw = _decode_slots(topk_weights, topk_ids)
    q_up, s_up = weights["gate_up.qweight"], weights["gate_up.scales"]
    q_dn, s_dn = weights["down.qweight"], weights["down.scales"]
    g_up, g_dn = h // s_up.shape[-1], inter // s_dn.shape[-1]
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    moe_gemv_up_q_kernel[(t * top_k, triton.cdiv(inter, cfg["GEMV_N_UP"]))](
        x, q_up, s_up, ids, act, inter, h, x.stride(0), q_up.stride(0), q_up.stride(1), s_up.stride(0), s_up.stride(1),
        TOP_K=top_k, GROUP=g_up, FP8=fp8, BLOCK_N=cfg["GEMV_N_UP"], BLOCK_K=max(g_up, cfg["GEMV_K_UP"]),
        num_warps=cfg["gemv_warps"])
    y = torch.empty(t, h, dtype=x.dtype, device=x.device)
    moe_gemv_down_q_kernel[(t, triton.cdiv(h, cfg["GEMV_N_DOWN"]))](
        act, q_dn, s_dn, ids, tw, y, h, inter, y.stride(0), q_dn.stride(0), q_dn.stride(1), s_dn.stride(0),
        s_dn.stride(1), TOP_K=top_k, GROUP=g_dn, FP8=fp8, BLOCK_N=cfg["GEMV_N_DOWN"],
        BLOCK_K=max(g_dn, cfg["GEMV_K_DOWN"]), num_warps=cfg["gemv_warps"])
    return y


def pack_w4a16(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """[..., N, K] float -> {"qweight": uint8 [..., N, K/2], "scales": float32 [..., N, K/G]} (layout above)."""
    k = w.shape[-1]
    wg = w.detach().to(torch.float32).reshape(*w.shape[:-1], k // group_size, group_size)
    scales = wg.abs().amax(dim=-1) / 7.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(wg / safe.unsqueeze(-1)).clamp_(-7, 7).to(torch.int16)
    half = group_size // 2
    lo, hi = q[..., :half] & 0xF, q[..., half:] & 0xF
    packed = (lo | (hi << 4)).to(torch.uint8).reshape(*w.shape[:-1], k // 2)
    return {"qweight": packed.contiguous(), "scales": scales.contiguous()}


def unpack_w4a16(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight that pack_w4a16's output stands for."""
    groups = scales.shape[-1]
    b = qweight.to(torch.int16).reshape(*qweight.shape[:-1], groups, -1)
    lo = ((b & 0xF) ^ 8) - 8
    hi = ((b >> 4) ^ 8) - 8
    q = torch.cat((lo, hi), dim=-1).to(torch.float32)
    return (q * scales.unsqueeze(-1)).reshape(*qweight.shape[:-1], -1)


def pack_fp8(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """[..., N, K] float -> {"qweight": float8_e4m3fn [..., N, K], "scales": float32 [..., N, K/G]}: per row
    and group of G values along K, scale = amax / 448 and qweight = w / scale rounded to nearest e4m3
    (clamped to +-448; an all-zero group has scale 0 and zero values)."""
    k = w.shape[-1]
    if k % group_size:
        raise ValueError(f"fp8 group size {group_size} does not divide K={k}")
    wg = w.detach().to(torch.float32).reshape(*w.shape[:-1], k // group_size, group_size)
    scales = wg.abs().amax(dim=-1) / FP8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (wg / safe.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return {"qweight": q.reshape(w.shape).contiguous(), "scales": scales.contiguous()}


def unpack_fp8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight that pack_fp8's output stands for."""
    groups = scales.shape[-1]
    q = qweight.to(torch.float32).reshape(*qweight.shape[:-1], groups, -1)
    return (q * scales.unsqueeze(-1)).reshape(qweight.shape)


def candidate_configs(tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                      group_size: int | None = None, max_shared: int = 232448) -> list[dict]:
    """Configs `ktc tune` times for a step of `tokens` tokens, default first (if it fits `max_shared`);
    each has every key of default_config (so it is valid at any token count, on either path).

    Grouped GEMM path: M blocks around the expected rows per expert (slots / experts), N blocks of
    the two passes, K block (the group size for w4a16, whose loop walks whole groups), warps, stages;
    tiles whose pipelined A and W(gate + up) tiles fit `max_shared` bytes. Dense decode path (at most
    GEMV_TOKENS tokens): every DECODE mode with a product of its own kernels' block choices (the
    launches of a mode are separate kernels, so Triton compiles each variant once)."""
    slots = tokens * top_k
    base = default_config(slots, hidden, inter, group_size)
    out: list[dict] = []

    def add(cfg: dict) -> None:
        if cfg not in out:
            out.append(cfg)

    def fits(bm: int, bn: int, bk: int, stages: int, gated: bool) -> bool:
        return stages * (bm * bk + (2 if gated else 1) * bk * bn) * 2 <= max_shared

    def cap(dim: int) -> int:
        return max(16, triton.next_power_of_2(dim))

    if fits(base["BLOCK_M"], base["BLOCK_N_UP"], base["BLOCK_K"], base["num_stages"], True) and \
            fits(base["BLOCK_M"], base["BLOCK_N_DOWN"], base["BLOCK_K"], base["num_stages"], False):
        out.append(base)
    per_expert = triton.next_power_of_2(max(1, slots // max(1, num_experts)))
    block_ms = [b for b in (16, 32, 64, 128) if per_expert // 2 <= b <= 2 * per_expert] or [16]
    block_ks = (group_size,) if group_size is not None else (64, 128)
    launches = ((4, 3), (4, 4), (8, 3))
    k_down = [k for k in (512, 1024) if k <= max(512, triton.next_power_of_2(inter))]
    gemv_down = [{"GEMV_N_DOWN": n, "GEMV_K_DOWN": k} for n in (4, 8) for k in k_down]
    k_up = [k for k in (1024, 2048) if k <= max(1024, triton.next_power_of_2(hidden))]
    gemv_up = [{"GEMV_N_UP": n, "GEMV_K_UP": k} for n in (4, 8) for k in k_up]
    if group_size is not None or tokens > GEMV_TOKENS:
        # quantized decode: the grouped GEMM too ("grouped"), beside the GEMV pair below
        grouped = {"DECODE": "grouped"} if group_size is not None and tokens <= GEMV_TOKENS else {}
        for bm in block_ms:
            for bn_up, bn_down in ((32, 64), (64, 64), (64, 128), (128, 128)):
                if bn_up > cap(inter) or bn_down > cap(hidden):
                    continue
                for bk in block_ks:
                    for warps, stages in launches:
                        if fits(bm, bn_up, bk, stages, True) and fits(bm, bn_down, bk, stages, False):
                            add({**base, "BLOCK_M": bm, "BLOCK_N_UP": bn_up, "BLOCK_N_DOWN": bn_down,
                                 "BLOCK_K": bk, "num_warps": warps, "num_stages": stages, **grouped})
        if grouped:
            for warps in (4, 8):
                for u in gemv_up:
                    for d in gemv_down:
                        add({**base, **u, **d, "DECODE": "gemv", "gemv_warps": warps})
        return out
    # dense decode: the gate_up grouped GEMM (modes dot and mixed) on one slot per 16-row M block
    up = [{"BLOCK_M": 16, "BLOCK_N_UP": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": stages}
          for bn in (16, 32, 64) for bk in (128, 256) for stages in (3, 4)
          if bn <= cap(inter) and bk <= max(128, triton.next_power_of_2(hidden)) and fits(16, bn, bk, stages, True)
          and fits(16, base["BLOCK_N_DOWN"], bk, stages, False)]
    down_sum = [{"DOWN_SUM_N": n, "DOWN_SUM_K": k, "down_sum_warps": 4, "down_sum_stages": s}
                for n in (16, 32) for k in (128, 256) for s in (3, 4)
                if k <= max(128, triton.next_power_of_2(inter)) and s * (16 * k + k * n) * 2 <= max_shared]
    for warps in (4, 8):
        for u in up:
            for d in gemv_down:
                add({**base, **u, **d, "DECODE": "mixed", "gemv_warps": warps})
        for u in gemv_up:
            for d in gemv_down:
                add({**base, **u, **d, "DECODE": "gemv", "gemv_warps": warps})
    for u in up:
        for d in down_sum:
            add({**base, **u, **d, "DECODE": "dot"})
    return out


def stage_decode(ids: torch.Tensor, table: torch.Tensor | None, cpu_ids: torch.Tensor, x: torch.Tensor | None = None,
                 tw: torch.Tensor | None = None, x_out: torch.Tensor | None = None, tw_out: torch.Tensor | None = None,
                 take: torch.Tensor | None = None, gpu_ids: torch.Tensor | None = None) -> None:
    """moe_stage_kernel, one launch: this node's rows of router ids [T, K] (table: global -> row, -1 elsewhere;
    None: ids are rows) into cpu_ids (int32 [T, K]); with take / gpu_ids, the GPU's share split off to gpu_ids;
    with x [T, H] / tw [T, K], x as float32 to x_out and tw to tw_out. Outputs may be CUDA aliases of pinned
    host memory (the CPU kernel's buffers)."""
    t, k = ids.shape
    has_x = x is not None
    split = take is not None
    dummy = cpu_ids
    moe_stage_kernel[(t,)](ids, table if table is not None else dummy, take if split else dummy, cpu_ids,
                           gpu_ids if split else dummy, x if has_x else dummy, tw if has_x else dummy,
                           x_out if has_x else dummy, tw_out if has_x else dummy, x.shape[-1] if has_x else 0,
                           x.stride(0) if has_x else 0, TOP_K=k, BLOCK=triton.next_power_of_2(k),
                           HAS_TABLE=table is not None, SPLIT=split, HAS_X=has_x,
                           BLOCK_H=min(4096, triton.next_power_of_2(x.shape[-1])) if has_x else 16, num_warps=4)


WAIT_SPINS = 1 << 26     # ~a minute of PCIe reads: a decode graph never waits forever on a host that died


def wait_gather(flag: torch.Tensor, seen: torch.Tensor, y: torch.Tensor, out: torch.Tensor,
                extra: torch.Tensor | None = None, max_spins: int = WAIT_SPINS) -> None:
    """moe_wait_gather_kernel: once the int32 step count in `flag` (a CUDA alias of pinned host memory) is
    seen + 1 (`seen`: int32 on the device, advanced here), out [T, H] = y (float32, an alias of the host's output
    buffer) + extra (float32 on the device, or None). Not reached within max_spins reads: out is NaN."""
    n = out.numel()
    block = min(4096, triton.next_power_of_2(n))
    moe_wait_gather_kernel[(1,)](flag, seen, y, extra if extra is not None else y, out, n, max_spins,
                                 HAS_EXTRA=extra is not None, BLOCK=block, num_warps=8)


def cpu_layout_gemv_config(hidden: int, inter: int) -> dict:
    """moe_decode_cpu_layout's blocks: as gemv_config's (4 weight rows a program, whole rows of K a step)."""
    return {"GEMV_N_UP": 4, "GEMV_K_UP": min(2048, triton.next_power_of_2(hidden)), "GEMV_N_DOWN": 4,
            "GEMV_K_DOWN": min(1024, triton.next_power_of_2(inter)), "gemv_warps": 4}


def moe_decode_cpu_layout(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, weights: dict,
                          inter: int, config: dict | None = None) -> torch.Tensor:
    """Decode-sized MoE over experts in the CPU kernels' int8 / int4 layout ({"gate_up.q", "gate_up.scales",
    "down.q", "down.scales"}, e.g. CUDA aliases of the pinned packed weights): x [T, H], topk_* [T, K], ids -1
    skipped without reading their weights. -> y float32 [T, H]."""
    t, h = x.shape
    top_k = topk_ids.shape[-1]
    ids, tw = _decode_slots(topk_weights, topk_ids)
    q_up, s_up, q_dn, s_dn = (weights[n] for n in ("gate_up.q", "gate_up.scales", "down.q", "down.scales"))
    int4 = q_up.dtype == torch.uint8
    g_up, g_dn = h // s_up.shape[-1], inter // s_dn.shape[-1]
    cfg = {**cpu_layout_gemv_config(h, inter), **(config or {})}
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    moe_gemv_up_q_kernel[(t * top_k, triton.cdiv(inter, cfg["GEMV_N_UP"]))](
        x, q_up, s_up, ids, act, inter, h, x.stride(0), q_up.stride(0), q_up.stride(1), s_up.stride(0),
        s_up.stride(1), TOP_K=top_k, GROUP=g_up, FP8=False, BLOCK_N=cfg["GEMV_N_UP"],
        BLOCK_K=max(g_up, cfg["GEMV_K_UP"]), INT8=not int4, PAIR=CPU_INT4_PAIR if int4 else 0, SKIP=True,
        num_warps=cfg["gemv_warps"])
    y = torch.empty(t, h, dtype=torch.float32, device=x.device)
    moe_gemv_down_q_kernel[(t, triton.cdiv(h, cfg["GEMV_N_DOWN"]))](
        act, q_dn, s_dn, ids, tw, y, h, inter, y.stride(0), q_dn.stride(0), q_dn.stride(1), s_dn.stride(0),
        s_dn.stride(1), TOP_K=top_k, GROUP=g_dn, FP8=False, BLOCK_N=cfg["GEMV_N_DOWN"],
        BLOCK_K=max(g_dn, cfg["GEMV_K_DOWN"]), INT8=not int4, PAIR=CPU_INT4_PAIR if int4 else 0, SKIP=True,
        num_warps=cfg["gemv_warps"])
    return y
