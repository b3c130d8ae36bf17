"""embedding(ids) -> rows of the [V, H] table: one program per (token, block of H)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def embedding_kernel(ids_ptr, table_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    row = tl.load(ids_ptr + t).to(tl.int64)
    v = tl.load(table_ptr + row * hidden + cols, mask=mask)
    tl.store(out_ptr + t * hidden + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = {"embedding_kernel": embedding_kernel}


def default_config(hidden: int) -> dict:
    return {"BLOCK": min(1024, triton.next_power_of_2(hidden)), "num_warps": 4, "num_stages": 1}


def embedding(ids: torch.Tensor, table: torch.Tensor, config: dict | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    hidden = table.shape[1]
    cfg = config or default_config(hidden)
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), hidden, dtype=out_dtype or table.dtype, device=table.device)
    grid = (flat.numel(), triton.cdiv(hidden, cfg["BLOCK"]))
    embedding_kernel[grid](flat, table, out, hidden, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
                           num_stages=cfg["num_stages"])
    return out.view(*ids.shape, hidden)
