"""Linear layers: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), float32 accumulation.

One tiled kernel for every dense linear (q/k/v/o, dense MLP, router logits, lm_head).
Programs are ordered in GROUP_M bands of M blocks so that neighbours share weight tiles in
L2 (prefill); decode (M <= 16) uses narrow N blocks so that the N / BLOCK_N programs cover
the multiprocessors while each streams its slice of the weight once.

gemv_kernel is the product for a few rows (decode): no tensor-core tile (whose 16 rows would be
mostly padding); each program streams a few weight rows once with wide loads, float32 products.
It serves at most GEMV_ROWS rows: default_config picks it there, `ktc tune` times it beside the
tiles there, and a gemv config meeting more rows (a decode-phase config at a bigger batch) runs the
tiles instead. On an H100 (qkv / o projections, in a graph) it takes 0.63 / 0.58 of the tile
kernel's time at one row and 0.74 / 0.77 at two, but 1.4-1.8x at four and 4-6x at eight.

matmul_w4a16_kernel is the same product with a weight-only int4 weight (--gpu-dense-quant int4):
symmetric, group-wise along K, in the layout of the GPU experts (moe.pack_w4a16): qweight uint8
[N, K/2] where, in each group of G values, byte j holds value j in its low nibble and value
j + G/2 in its high nibble (two's complement), and float32 scales [N, K/G]. A K step of BLOCK_K
values reads BLOCK_K/2 bytes per weight row, dequantizes both nibble planes in registers
(value * its group's scale, in the activation dtype) and multiplies each by the matching half of
the activations: two tl.dot per step, float32 accumulation.

matmul_fp8_kernel is the product with a weight-only fp8 weight (--gpu-dense-quant fp8, w8a16):
qweight float8_e4m3fn [N, K] and float32 scales [N, K/G] (moe.pack_fp8: a scale per row and group
of G values along K, amax / 448). The fp8 values are converted to the activation dtype in registers
(exact: e4m3 fits bf16 / fp16) before tl.dot; a K step inside one group multiplies the product by
the rows' scales after the dot (float32, one multiply per output instead of per weight value), a
step over several groups scales every value before it. Triton lowers fp8e4nv on sm89+ (and on AMD)
only: an fp8 artifact is refused on older NVIDIA GPUs (runtime.artifact.check_host).

matmul_w8a8_kernel is the fp8 product from W8A8_MIN_ROWS rows on (prefill; a config's "A8" overrides):
quant_fp8_kernel first rounds the activations to e4m3 with a float32 scale per row and group of G values
(amax / 448), then the raw e4m3 activation and weight tiles are multiplied on fp8 tensor cores (sm90:
wgmma e4m3.e4m3), each K step's float32 product scaled by the rows' and the weight rows' group scales:
twice bf16's tensor-core rate and no weight conversion in registers, for the rounding of an fp8
activation (|error| <= 1/16 of the value) on top of the weight's.

gemv_grouped_kernel is those two products (FP8 picks the format) for up to GEMV_ROWS rows, as
gemv_kernel is matmul_kernel's: whole groups a step as [rows, groups, values] tiles, float32 products summed per
group and scaled once per group. On an H100 (in a graph, one row) they take 6-7 us for the qkv / o
projections where the tiles took 42-77 us (the tiles' dequantize-then-dot at 16 padded rows ran at
90-180 GB/s), i.e. 0.6x the bf16 GEMV's time for a quarter / half of its bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)   # fp8 weight-only linears (linear_fp8)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: M blocks in bands of GROUP_M, so that neighbours share weight
    tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _tile_rows(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile (_tile_ids): (offs_m, offs_n, activation rows, weight rows), the rows clamped
    to 0 past M / N so that their loads stay in bounds (_store_tile masks them out)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return (offs_m, offs_n, tl.where(offs_m < M, offs_m, 0).to(tl.int64),
            tl.where(offs_n < N, offs_n, 0).to(tl.int64))


@triton.jit
def _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS: tl.constexpr):
    """c[offs_m, offs_n] = acc (+ bias[offs_n]) in c's dtype, rows < M and columns < N only."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def matmul_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, a_rows, w_rows = _tile_rows(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + w_rows[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS)


@triton.jit
def gemv_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same product for a few rows (decode, M <= ROWS): no tensor-core tile, whose 16 rows would
    be 15 rows of padding. A program owns BLOCK_N weight rows and streams them once, BLOCK_K values a
    step with wide loads; every activation row is multiplied against the step's tile in float32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    w_rows = tl.where(nmask, offs_n, 0).to(tl.int64)
    offs_m = tl.arange(0, ROWS)
    a_rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        w = tl.load(w_ptr + w_rows[:, None] * stride_wn + kk[None, :], mask=kmask[None, :], other=0.0)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + kk[None, :], mask=kmask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS)


@triton.jit
def matmul_w4a16_kernel(a_ptr, qw_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_qn, stride_sn, stride_cm,
                        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    HALF_G: tl.constexpr = GROUP // 2       # bytes per group
    BLOCK_KB: tl.constexpr = BLOCK_K // 2   # bytes per K step
    offs_m, offs_n, a_rows, w_rows = _tile_rows(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_b = tl.arange(0, BLOCK_KB)
    a_base = a_ptr + a_rows[:, None] * stride_am
    q_base = qw_ptr + w_rows[None, :] * stride_qn
    s_base = s_ptr + w_rows * stride_sn
    kbytes = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, kbytes, BLOCK_KB):
        kb = kb0 + offs_b
        kmask = kb < kbytes
        if BLOCK_K <= GROUP:
            # the step lies in one group: contiguous activations, one scale per weight row
            k_lo = kb0 + (kb0 // HALF_G) * HALF_G + offs_b
            sc = tl.load(s_base + kb0 // HALF_G)[None, :]
        else:
            # several whole groups: byte b of group g holds values g*G + b and g*G + G/2 + b
            k_lo = kb + (kb // HALF_G) * HALF_G
            sc = tl.load(s_base[None, :] + (kb // HALF_G)[:, None], mask=kmask[:, None], other=0.0)
        a_lo = tl.load(a_base + k_lo[None, :], mask=kmask[None, :], other=0.0)
        a_hi = tl.load(a_base + (k_lo + HALF_G)[None, :], mask=kmask[None, :], other=0.0)
        packed = tl.load(q_base + kb[:, None], mask=kmask[:, None], other=0)
        lo = (packed << 4).to(tl.int8, bitcast=True) >> 4
        hi = packed.to(tl.int8, bitcast=True) >> 4
        acc = tl.dot(a_lo, (lo.to(tl.float32) * sc).to(a_lo.dtype), acc)
        acc = tl.dot(a_hi, (hi.to(tl.float32) * sc).to(a_lo.dtype), acc)
    _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS)


@triton.jit
def matmul_fp8_kernel(a_ptr, qw_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_qn, stride_sn, stride_cm,
                      HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, a_rows, w_rows = _tile_rows(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * stride_am
    q_base = qw_ptr + w_rows[None, :] * stride_qn
    s_base = s_ptr + w_rows * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(a_base + kk[None, :], mask=kmask[None, :], other=0.0)
        w = tl.load(q_base + kk[:, None], mask=kmask[:, None], other=0.0)
        if BLOCK_K <= GROUP:
            # the step lies in one group (BLOCK_K divides GROUP, which divides K): scale the product
            sc = tl.load(s_base + k0 // GROUP)
            acc += tl.dot(a, w.to(a.dtype)) * sc[None, :]
        else:
            # several whole groups: every value times its group's scale, then the dot
            sc = tl.load(s_base[None, :] + (kk // GROUP)[:, None], mask=kmask[:, None], other=0.0)
            acc = tl.dot(a, (w.to(tl.float32) * sc).to(a.dtype), acc)
    _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS)



@triton.jit
def quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, x_stride, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    """Dynamic fp8 activations for the w8a8 products: row program_id(0) of x, BLOCK_G groups of GROUP values
    a program -> e4m3 values of x / scale and a float32 scale per group = amax / 448 (1 for a zero group)."""
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
def matmul_w8a8_kernel(a_ptr, as_ptr, qw_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_asm, stride_qn,
                       stride_sn, stride_cm, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """e4m3 activations with a scale per row and group (quant_fp8) times an fp8 weight (pack_fp8's layout,
    the same groups) on fp8 tensor cores: each K step (BLOCK_K divides GROUP) is a fresh float32 dot, scaled
    by the rows' and the weight rows' scales of its group before it is added."""
    offs_m, offs_n, a_rows, w_rows = _tile_rows(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * stride_am
    q_base = qw_ptr + w_rows[None, :] * stride_qn
    as_base = as_ptr + a_rows * stride_asm
    s_base = s_ptr + w_rows * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_base + (k0 + offs_k)[None, :])
        w = tl.load(q_base + (k0 + offs_k)[:, None])
        sa = tl.load(as_base + k0 // GROUP)
        sw = tl.load(s_base + k0 // GROUP)
        acc += tl.dot(a, w) * (sa[:, None] * sw[None, :])
    _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS)


@triton.jit
def gemv_grouped_kernel(a_ptr, qw_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_qn, stride_sn, stride_cm,
                        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, FP8: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """matmul_w4a16_kernel (FP8 false) / matmul_fp8_kernel (FP8 true) for a few rows (decode, M <= ROWS),
    as gemv_kernel is matmul_kernel's: a program streams BLOCK_N packed weight rows once, BLOCK_K values
    (BLOCK_K / GROUP whole groups) a step, as [rows, groups, bytes] tiles (int4: a byte holds value j of
    the group in its low nibble and j + GROUP/2 in its high one; fp8: a byte a value); each group's
    values times the activations are summed in float32 first and scaled once per group."""
    VALS: tl.constexpr = GROUP if FP8 else GROUP // 2     # bytes of one row's group
    NG: tl.constexpr = BLOCK_K // GROUP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    offs_m = tl.arange(0, ROWS)
    offs_g = tl.arange(0, NG)
    offs_j = tl.arange(0, VALS)
    q_base = qw_ptr + w_rows[:, None, None] * stride_qn + offs_j[None, None, :]
    s_base = s_ptr + w_rows[:, None] * stride_sn
    groups = K // GROUP
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, groups, NG):
        g = g0 + offs_g
        gmask = g < groups
        if FP8:
            lo = tl.load(q_base + (g * VALS)[None, :, None], mask=gmask[None, :, None], other=0.0).to(tl.float32)
        else:
            packed = tl.load(q_base + (g * VALS)[None, :, None], mask=gmask[None, :, None], other=0)
            lo = ((packed << 4).to(tl.int8, bitcast=True) >> 4).to(tl.float32)
            hi = (packed.to(tl.int8, bitcast=True) >> 4).to(tl.float32)
        sc = tl.load(s_base + g[None, :], mask=gmask[None, :], other=0.0)
        for r in tl.static_range(ROWS):
            a_row = a_ptr + r * stride_am + (g * GROUP)[:, None] + offs_j[None, :]
            amask = (gmask & (g * 0 + r < M))[:, None]       # a tensor mask: row r is a real row
            a_lo = tl.load(a_row, mask=amask, other=0.0).to(tl.float32)
            if FP8:
                part = tl.sum(lo * a_lo[None, :, :], axis=2)
            else:
                a_hi = tl.load(a_row + VALS, mask=amask, other=0.0).to(tl.float32)
                part = tl.sum(lo * a_lo[None, :, :] + hi * a_hi[None, :, :], axis=2)
            acc += tl.where(offs_m[:, None] == r, tl.sum(part * sc, axis=1)[None, :], 0.0)
    _store_tile(acc, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_cm, HAS_BIAS)


KERNELS = {"matmul_kernel": matmul_kernel, "gemv_kernel": gemv_kernel, "matmul_w4a16_kernel": matmul_w4a16_kernel,
           "matmul_fp8_kernel": matmul_fp8_kernel, "gemv_grouped_kernel": gemv_grouped_kernel,
           "quant_fp8_kernel": quant_fp8_kernel, "matmul_w8a8_kernel": matmul_w8a8_kernel}

NUM_SMS = 132   # H100 / H200; only used to pick block sizes, never for correctness


GEMV_ROWS = 2       # the most rows gemv_kernel serves (see the module docstring)
GEMV_REGS = 64      # float32 partial products a thread holds per K step (rows x BLOCK_N x BLOCK_K / threads)


def gemv_config(m: int, n: int, k: int) -> dict:
    """gemv_kernel's blocks: 4 weight rows a program (N / 4 programs: thousands), K steps of up to 2048
    values (4 KB of every bf16 weight row in flight) shrinking with the rows; 8 warps for deep K (two
    steps). Chosen by in-graph sweeps on an H100 and an H200 (bench/gpu_profile.py; BENCHMARKS.md)."""
    rows = max(1, triton.next_power_of_2(m))
    warps = 8 if k >= 4096 else 4
    block_k = max(64, min(2048 // rows, triton.next_power_of_2(k)))
    return {"GEMV": 1, "BLOCK_N": 4, "BLOCK_K": block_k, "num_warps": warps}


def default_config(m: int, n: int, k: int) -> dict:
    """Block sizes for an [m, k] x [n, k]^T product: gemv_kernel's up to GEMV_ROWS rows, else tiles."""
    return gemv_config(m, n, k) if m <= GEMV_ROWS else tile_config(m, n, k)


def tile_config(m: int, n: int, k: int) -> dict:
    """matmul_kernel's (and the weight-only kernels') tensor-core tiles for an [m, k] x [n, k]^T product."""
    if m <= 16:
        block_n = 64
        while block_n > 16 and triton.cdiv(n, block_n) < 2 * NUM_SMS:
            block_n //= 2
        return {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 256 if k >= 256 else 64, "GROUP_M": 1,
                "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None,
           out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    n = w.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or default_config(m, n, k)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if cfg.get("GEMV") and m > GEMV_ROWS:
        cfg = tile_config(m, n, k)      # a decode config (one token) serving a batch past what gemv takes
    if cfg.get("GEMV"):
        rows = max(1, triton.next_power_of_2(m))
        block_k = cfg["BLOCK_K"]        # fewer K values a step for more rows: same registers a thread
        while block_k > 64 and rows * cfg["BLOCK_N"] * block_k > GEMV_REGS * 32 * cfg["num_warps"]:
            block_k //= 2
        gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            x2, w, w if bias is None else bias, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
            num_warps=cfg["num_warps"])
        return out.view(*x.shape[:-1], n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    matmul_kernel[grid](x2, w, w if bias is None else bias, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
                        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"])
    return out.view(*x.shape[:-1], n)


def default_config_w4a16(m: int, n: int, k: int) -> dict:
    """Block sizes for an [m, k] x int4 [n, k]^T product (group `group` along K). Up to GEMV_ROWS rows:
    gemv_grouped_kernel's (gemv_config's blocks; a K step is at least one group). Other decode batches
    (m <= 16): as the bf16 product's tiles (narrow N blocks, so many programs each stream their rows
    once) with twice the K values per step (512: 256 bytes of every weight row, what bf16 reads with
    128 values); prefill: the bf16 tiles. BLOCK_K is at least 32 (16 bytes, tl.dot's smallest K)."""
    if m <= GEMV_ROWS:
        return gemv_config(m, n, k)
    cfg = dict(tile_config(m, n, k))
    if m <= 16:
        cfg["BLOCK_K"] = min(512, max(32, triton.next_power_of_2(k)))
    cfg["BLOCK_K"] = max(32, cfg["BLOCK_K"])
    return cfg


def linear_w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 config: dict | None = None, out_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qweight, scales)^T (+ bias): qweight uint8 [N, K/2] and float32 scales [N, K/G] in
    moe.pack_w4a16's layout (G = K / scales.shape[1], a power of two >= 32). Config keys as linear's."""
    k = x.shape[-1]
    if qweight.shape[-1] * 2 != k or k % scales.shape[-1]:
        raise ValueError(f"w4a16 weight {tuple(qweight.shape)} / scales {tuple(scales.shape)} do not fit K={k}")
    group = k // scales.shape[-1]
    if group < 32 or group & (group - 1):
        raise ValueError(f"w4a16 group size {group} is not a power of two >= 32")
    return _linear_grouped(matmul_w4a16_kernel, False, default_config_w4a16, x, qweight, scales, group,
                           bias, config, out_dtype, out)


def _linear_grouped(kernel, fp8: bool, default, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    group: int, bias: torch.Tensor | None, config: dict | None, out_dtype: torch.dtype | None,
                    out: torch.Tensor | None) -> torch.Tensor:
    """Launch a weight-only kernel (matmul_w4a16_kernel, matmul_fp8_kernel: the same arguments;
    gemv_grouped_kernel with FP8 = `fp8` for a GEMV config up to GEMV_ROWS rows) on x [.., K] and a
    packed [N, ..] weight with a scale per row and group; `default` picks the config (and the tiles for
    a GEMV config meeting more rows)."""
    k = x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or default(m, n, k)
    if cfg.get("GEMV") and m > GEMV_ROWS:
        cfg = default(m, n, k)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    b = scales if bias is None else bias
    if cfg.get("GEMV"):
        gemv_grouped_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            x2, qweight, scales, b, out, m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, GROUP=group, FP8=fp8, ROWS=max(1, triton.next_power_of_2(m)),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=max(group, cfg["BLOCK_K"]), num_warps=cfg["num_warps"])
        return out.view(*x.shape[:-1], n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    if fp8 and w8a8(cfg, m, group, x.device):
        xq, xs = quant_fp8(x2, group)
        matmul_w8a8_kernel[grid](xq, xs, qweight, scales, b, out, m, n, k, xq.stride(0), xs.stride(0),
                                 qweight.stride(0), scales.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                 GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                 BLOCK_K=min(cfg["BLOCK_K"], group), GROUP_M=cfg["GROUP_M"],
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out.view(*x.shape[:-1], n)
    kernel[grid](x2, qweight, scales, b, out, m, n, k, x2.stride(0),
                 qweight.stride(0), scales.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                 GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                 GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*x.shape[:-1], n)


def quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of `group`) -> (float8_e4m3fn [M, K], float32 scales [M, K / group]): quant_fp8_kernel."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    block_g = min(triton.next_power_of_2(k // group), max(1, 4096 // group))
    quant_fp8_kernel[(m, triton.cdiv(k // group, block_g))](x, q, s, k, x.stride(0), GROUP=group, BLOCK_G=block_g,
                                                            num_warps=4)
    return q, s


W8A8_MIN_ROWS = 32    # fp8 products of at least this many rows (prefill) quantize their activations too


def w8a8(cfg: dict, rows: int, group: int, device: torch.device) -> bool:
    """Whether an fp8-weight product of `rows` rows on the tiles runs w8a8 (quant_fp8 on the activations,
    then matmul_w8a8_kernel): the config's "A8" when it has one, else from W8A8_MIN_ROWS rows on. Never for
    groups under 32 values (an fp8 dot's K is at least 32) nor on AMD GPUs (the ahead-of-time builds lower
    the e4m3fn dot for NVIDIA sm89+ only)."""
    if group < 32 or (device.type == "cuda" and torch.version.hip is not None):
        return False
    return bool(cfg.get("A8", rows >= W8A8_MIN_ROWS))


def default_config_fp8(m: int, n: int, k: int) -> dict:
    """Block sizes for an [m, k] x fp8 [n, k]^T product: up to GEMV_ROWS rows gemv_grouped_kernel's
    (gemv_config's blocks), from W8A8_MIN_ROWS rows matmul_w8a8_kernel's 64 x 128 tiles with K steps of
    128 (the best of an H100 sweep at 2048 rows: 87-95 us for the qkv / o projections against 122-206 us
    for 128 x 128 tiles; bench/gpu_decode.py), else the bf16 product's tiles (decode: narrow N blocks,
    256 values = 256 bytes of every weight row a step)."""
    if m <= GEMV_ROWS:
        return gemv_config(m, n, k)
    if m >= W8A8_MIN_ROWS:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": max(32, min(128, triton.next_power_of_2(k))),
                "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    cfg = dict(tile_config(m, n, k))
    cfg["BLOCK_K"] = max(16, min(cfg["BLOCK_K"], triton.next_power_of_2(k)))
    return cfg


def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
               config: dict | None = None, out_dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (qweight * scales)^T (+ bias): qweight float8_e4m3fn [N, K], float32 scales [N, K/G] with a
    scale per row and group of G values along K (moe.pack_fp8; G a power of two >= 16). Config keys as
    linear's; a K step (BLOCK_K) is either within one group or several whole groups."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if qweight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 weight of dtype {qweight.dtype}, not float8_e4m3fn")
    if qweight.shape[-1] != k or k % scales.shape[-1] or scales.shape[0] != n:
        raise ValueError(f"fp8 weight {tuple(qweight.shape)} / scales {tuple(scales.shape)} do not fit K={k}")
    group = k // scales.shape[-1]
    if group < 16 or group & (group - 1):
        raise ValueError(f"fp8 group size {group} is not a power of two >= 16")
    return _linear_grouped(matmul_fp8_kernel, True, default_config_fp8, x, qweight, scales, group,
                           bias, config, out_dtype, out)


def candidate_configs(m: int, n: int, k: int, max_shared: int = 232448, elem_bytes: int = 2) -> list[dict]:
    """Configs `ktc tune` times for an [m, k] x [n, k]^T product, default first. Tiles are at least 16
    (tl.dot), no larger than the problem rounded up to a power of two, and their pipelined A and W tiles
    fit `max_shared` bytes of shared memory (the device's opt-in limit; the default too, or it is left
    out); M blocks of at least a quarter of the rows (up to 128), narrow N blocks with deep K for decode.
    Up to GEMV_ROWS rows, gemv_kernel's blocks too (at most GEMV_REGS float32 partial products a
    thread a step)."""
    def fits(cfg: dict) -> bool:
        if cfg.get("GEMV"):
            return True     # no shared memory
        return cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem_bytes <= max_shared

    out = _candidates(m, n, k, default_config(m, n, k), fits, (64, 128, 256, 512), (64, 128))
    return out + [c for c in _gemv_candidates(m, k, max(1, triton.next_power_of_2(m))) if c not in out]


def _gemv_candidates(m: int, k: int, rows: int) -> list[dict]:
    """GEMV blocks for up to GEMV_ROWS rows: 4-16 weight rows a program, K steps of 512-2048 values, at most
    GEMV_REGS float32 values a thread a step (`rows` of them per weight value)."""
    if m > GEMV_ROWS:
        return []
    return [{"GEMV": 1, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
            for bn in (4, 8, 16) for bk in (512, 1024, 2048) for warps in (4, 8)
            if bk <= max(64, triton.next_power_of_2(k)) and rows * bn * bk <= GEMV_REGS * 32 * warps]


def _grouped_fits(weight_bytes: Callable[[int], int], max_shared: int, elem_bytes: int) -> Callable[[dict], bool]:
    """A weight-only kernel's shared-memory check: pipelined activation tile + packed weight tile (a GEMV
    config uses none)."""
    def fits(cfg: dict) -> bool:
        if cfg.get("GEMV"):
            return True
        bk = cfg["BLOCK_K"]
        return cfg["num_stages"] * (cfg["BLOCK_M"] * bk * elem_bytes + cfg["BLOCK_N"] * weight_bytes(bk)) <= max_shared
    return fits


def candidate_configs_w4a16(m: int, n: int, k: int, max_shared: int = 232448, elem_bytes: int = 2) -> list[dict]:
    """Configs `ktc tune` times for linear_w4a16 at [m, k] x int4 [n, k]^T, default first: the tiles of
    candidate_configs with K steps of 64 to 1024 values for decode (up to 512 bytes per weight row), whose
    pipelined activation tile and packed weight tile (half a byte a value) fit `max_shared`; up to
    GEMV_ROWS rows gemv_grouped_kernel's blocks (its products are per row: one row's registers)."""
    fits = _grouped_fits(lambda bk: bk // 2, max_shared, elem_bytes)
    out = _candidates(m, n, k, default_config_w4a16(m, n, k), fits, (64, 128, 256, 512, 1024), (64, 128))
    return out + [c for c in _gemv_candidates(m, k, 1) if c not in out]


def candidate_configs_fp8(m: int, n: int, k: int, max_shared: int = 232448, elem_bytes: int = 2) -> list[dict]:
    """Configs `ktc tune` times for linear_fp8 at [m, k] x fp8 [n, k]^T, default first: the tiles of
    candidate_configs (K steps of 64 to 512 values for decode), whose pipelined activation tile and fp8
    weight tile (a byte a value) fit `max_shared` (from W8A8_MIN_ROWS rows the activations are e4m3 too);
    up to GEMV_ROWS rows gemv_grouped_kernel's blocks."""
    fits = _grouped_fits(lambda bk: bk, max_shared, 1 if m >= W8A8_MIN_ROWS else elem_bytes)
    out = _candidates(m, n, k, default_config_fp8(m, n, k), fits, (64, 128, 256, 512), (64, 128))
    return out + [c for c in _gemv_candidates(m, k, 1) if c not in out]


def _candidates(m: int, n: int, k: int, default: dict, fits: Callable[[dict], bool], decode_ks: tuple[int, ...],
                prefill_ks: tuple[int, ...]) -> list[dict]:
    def cap(dim: int) -> int:
        return max(16, triton.next_power_of_2(dim))

    if m <= 16:
        tiles = [(16, bn, bk) for bn in (16, 32, 64, 128) for bk in decode_ks]
        group_m = 1
    else:
        tiles = [(bm, bn, bk) for bm, bn in ((16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128),
                                              (128, 64), (128, 128), (128, 256), (256, 128))
                 for bk in prefill_ks if min(cap(m), 128) // 4 <= bm <= cap(m)]
        group_m = 8
    out = [cfg for cfg in (default,) if fits(cfg)]
    for bm, bn, bk in tiles:
        if bn > cap(n) or bk > cap(k):
            continue
        for warps, stages in ((4, 3), (4, 4), (8, 3), (8, 4)):
            if (bm * bn >= 128 * 128 and warps < 8) or (bm * bn <= 16 * 32 and warps > 4):
                continue   # big tiles on 4 warps spill; tiny ones leave 8 warps idle
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps,
                   "num_stages": stages}
            if fits(cfg) and cfg not in out:
                out.append(cfg)
    return out
