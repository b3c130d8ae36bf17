"""Elementwise kernels: the dense MLP's silu(gate) * up and output gate, and the residual add.

    silu_mul(gu [T, 2I]) -> [T, I]      gate is gu[:, :I], up is gu[:, I:]
    sigmoid_gate_mul(y [T, H], g [T, 1]) -> y * sigmoid(g)
    add(a, b) -> a + b                  (an add that fusion left unfused)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + t * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(out_ptr + t * inter + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sigmoid_gate_mul_kernel(y_ptr, g_ptr, out_ptr, hidden, g_stride, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    y = tl.load(y_ptr + t * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + t * g_stride).to(tl.float32)
    tl.store(out_ptr + t * hidden + cols, (y * tl.sigmoid(g)).to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = {"silu_mul_kernel": silu_mul_kernel, "sigmoid_gate_mul_kernel": sigmoid_gate_mul_kernel}


def default_config(width: int) -> dict:
    return {"BLOCK": min(1024, triton.next_power_of_2(width)), "num_warps": 4, "num_stages": 1}


def silu_mul(gu: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    inter = gu.shape[-1] // 2
    cfg = config or default_config(inter)
    gu2 = gu.reshape(-1, 2 * inter).contiguous()
    out = torch.empty(gu2.shape[0], inter, dtype=gu.dtype, device=gu.device)
    silu_mul_kernel[(gu2.shape[0], triton.cdiv(inter, cfg["BLOCK"]))](
        gu2, out, inter, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*gu.shape[:-1], inter)


def sigmoid_gate_mul(y: torch.Tensor, g: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    hidden = y.shape[-1]
    cfg = config or default_config(hidden)
    y2 = y.reshape(-1, hidden).contiguous()
    g2 = g.reshape(-1, g.shape[-1])
    out = torch.empty_like(y2)
    sigmoid_gate_mul_kernel[(y2.shape[0], triton.cdiv(hidden, cfg["BLOCK"]))](
        y2, g2, out, hidden, g2.stride(0), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out.view(y.shape)


@triton.jit
def add_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a + b).to(out_ptr.dtype.element_ty), mask=mask)


KERNELS["add_kernel"] = add_kernel


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    add_kernel[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024, num_warps=4)
    return out
