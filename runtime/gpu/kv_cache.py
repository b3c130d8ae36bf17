"""The static GPU KV cache, bf16: per GQA layer k and v [batch, num_kv_heads, capacity, head_dim]; per
MLA layer one buffer [batch, capacity, kv_lora_rank + qk_rope_head_dim] (the rms_norm'd latent, then the
roped k_rope shared by every head: the layout of runtime/kv_cache.py).

Allocated once for the whole length a generation asks for (prompt + new tokens) and written in
place by the attention kernels at each token's position, so decode steps never allocate and a
captured CUDA graph stays valid until the cache is re-allocated (`generation` changes then).
"""

from __future__ import annotations

import torch

from ktc.errors import KtcError
from ktc.runtime.kv_cache import KVCache


class GpuKVCache(KVCache):
    """runtime.kv_cache.KVCache on a GPU, bf16 by default, GQA and MLA layers only."""

    def __init__(self, specs: dict, device: torch.device, max_batch_size: int | None = None,
                 max_context: int | None = None, dtype: torch.dtype = torch.bfloat16):
        for layer, spec in specs.items():
            if spec.kind not in ("gqa", "mla"):
                raise KtcError(f"KV-cache layer {layer} is {spec.kind}: the GPU runtime caches GQA and MLA layers only")
        super().__init__(specs, max_batch_size, max_context, dtype, device)
