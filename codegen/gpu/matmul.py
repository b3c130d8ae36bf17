"""Linear layers: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), float32 accumulation.

One tiled kernel for every dense linear (q/k/v/o, dense MLP, router logits, lm_head).
Programs are ordered in GROUP_M bands of M blocks so that neighbours share weight tiles in
L2 (prefill); decode (M <= 16) uses narrow N blocks so that the N / BLOCK_N programs cover
the multiprocessors while each streams its slice of the weight once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def matmul_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    w_rows = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
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
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


KERNELS = {"matmul_kernel": matmul_kernel}

NUM_SMS = 132   # H100 / H200; only used to pick block sizes, never for correctness


def default_config(m: int, n: int, k: int) -> dict:
    """Block sizes for an [m, k] x [n, k]^T product."""
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
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    matmul_kernel[grid](x2, w, w if bias is None else bias, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
                        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"])
    return out.view(*x.shape[:-1], n)
