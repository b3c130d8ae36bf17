"""The static GPU KV cache: per GQA layer k and v [batch, num_kv_heads, capacity, head_dim], bf16.

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
            if spec.kind != "gqa":
                raise KtcError(f"KV-cache layer {layer} is {spec.kind}: the GPU runtime caches GQA layers only")
        self.specs = dict(specs)
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.dtype = dtype
        self.length = self.batch = self.capacity = 0
        self.generation = 0
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reserve(self, batch: int, length: int) -> None:
        check_reserve(self, batch, length)
        if batch == self.batch and length <= self.capacity:
            return
        capacity = max(length, self.capacity)
        for layer, spec in self.specs.items():
            shape = (batch, spec.heads, capacity, spec.width)
            new = (torch.empty(shape, dtype=self.dtype, device=self.device),
                   torch.empty(shape, dtype=self.dtype, device=self.device))
            if self.length:
                for old_t, new_t in zip(self._buffers[layer], new, strict=True):
                    new_t[:, :, :self.length].copy_(old_t[:, :, :self.length])
            self._buffers[layer] = new
        self.batch, self.capacity = batch, capacity
        self.generation += 1

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
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
