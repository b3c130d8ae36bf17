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
from ktc.runtime.kv_cache import check_reserve


class GpuKVCache:
    def __init__(self, specs: dict, device: torch.device, max_batch_size: int | None = None,
                 max_context: int | None = None, dtype: torch.dtype = torch.bfloat16):
        for layer, spec in specs.items():
            if spec.kind not in ("gqa", "mla"):
                raise KtcError(f"KV-cache layer {layer} is {spec.kind}: the GPU runtime caches GQA and MLA layers only")
        self.specs = dict(specs)
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.dtype = dtype
        self.length = self.batch = self.capacity = 0
        self.generation = 0
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}

    def _alloc(self, spec, batch: int, capacity: int) -> tuple[torch.Tensor, ...]:
        if spec.kind == "mla":
            return (torch.empty(batch, capacity, spec.width, dtype=self.dtype, device=self.device),)
        shape = (batch, spec.heads, capacity, spec.width)
        return (torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device))

    def reserve(self, batch: int, length: int) -> None:
        check_reserve(self, batch, length)
        if batch == self.batch and length <= self.capacity:
            return
        capacity = max(length, self.capacity)
        for layer, spec in self.specs.items():
            new = self._alloc(spec, batch, capacity)
            if self.length:
                seq_dim = 1 if spec.kind == "mla" else 2
                for old_t, new_t in zip(self._buffers[layer], new, strict=True):
                    new_t.narrow(seq_dim, 0, self.length).copy_(old_t.narrow(seq_dim, 0, self.length))
            self._buffers[layer] = new
        self.batch, self.capacity = batch, capacity
        self.generation += 1

    def layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """(k, v) of a GQA layer; (rows,) of an MLA layer."""
        return self._buffers[layer]

    def advance(self, seq: int) -> None:
        self.length += seq

    def reset(self) -> None:
        self._buffers.clear()
        self.length = self.batch = self.capacity = 0
        self.generation += 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._buffers.values() for t in ts)
