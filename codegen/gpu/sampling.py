"""Greedy sampling on the device: argmax over the vocabulary in two passes.

    argmax(logits [B, V]) -> ids [B] int64
Pass 1: one program per (row, block of V) writes its block's max and the lowest index that
holds it; pass 2: one program per row reduces the blocks (ties go to the lowest index, as
torch.argmax does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def argmax_blocks_kernel(x_ptr, val_ptr, idx_ptr, vocab, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    nblk = tl.num_programs(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    best = tl.max(x, axis=0)
    idx = tl.min(tl.where(x == best, cols, vocab), axis=0)
    tl.store(val_ptr + row * nblk + blk, best)
    tl.store(idx_ptr + row * nblk + blk, idx)


@triton.jit
def argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, nblk, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK)
    mask = b < nblk
    v = tl.load(val_ptr + row * nblk + b, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * nblk + b, mask=mask, other=vocab)
    best = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == best, i, vocab), axis=0).to(tl.int64))


KERNELS = {"argmax_blocks_kernel": argmax_blocks_kernel, "argmax_reduce_kernel": argmax_reduce_kernel}


def default_config(vocab: int) -> dict:
    return {"BLOCK": 4096 if vocab >= 4096 else triton.next_power_of_2(vocab), "num_warps": 8 if vocab >= 4096 else 1}


def argmax(logits: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    b, vocab = logits.shape
    cfg = config or default_config(vocab)
    nblk = triton.cdiv(vocab, cfg["BLOCK"])
    vals = torch.empty(b, nblk, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b, nblk, dtype=torch.int32, device=logits.device)
    argmax_blocks_kernel[(b, nblk)](logits, vals, idx, vocab, logits.stride(0), BLOCK=cfg["BLOCK"],
                                    num_warps=cfg["num_warps"])
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    argmax_reduce_kernel[(b,)](vals, idx, out, nblk, vocab, BLOCK=triton.next_power_of_2(nblk), num_warps=1)
    return out
