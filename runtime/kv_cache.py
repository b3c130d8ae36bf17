"""The KV cache: one preallocated buffer set per attention layer, filled in place.

GQA layers keep k and v per kv head, [batch, num_kv_heads, capacity, head_dim] each. MLA
layers keep one row per token, [batch, capacity, kv_lora_rank + qk_rope_head_dim]: the
rms_norm'd latent then the roped shared k_rope (absorbed attention reads the row whole).

All batch rows hold the same number of tokens, `length`. A forward of `seq` new tokens
calls reserve(batch, length + seq) first, the attention ops then write their tokens at
[length, length + seq) and read [0, length + seq), and the executor calls advance(seq)
once every layer has written. reserve() allocates once for the whole length asked for
(generate asks for prompt + max_new_tokens up front), so decode steps never allocate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktc.errors import InputError, KtcError
from ktc.ir import Graph


def check_reserve(cache, batch: int, length: int) -> None:
    """Refuse a reservation the cache's limits or its current contents do not allow."""
    if cache.max_batch_size is not None and batch > cache.max_batch_size:
        raise InputError(f"batch of {batch} is larger than max_batch_size ({cache.max_batch_size})")
    if cache.max_context is not None and length > cache.max_context:
        raise InputError(f"{length} tokens do not fit the model context ({cache.max_context} tokens)")
    if cache.length and batch != cache.batch:
        raise InputError(f"the cache holds {cache.batch} sequences; a batch of {batch} cannot continue them "
                         f"(reset first)")


@dataclass(frozen=True)
class LayerSpec:
    kind: str               # "gqa" | "mla"
    heads: int              # kv heads (gqa); 1 (mla)
    width: int              # head_dim (gqa); kv_lora_rank + qk_rope_head_dim (mla)


def layer_specs(graph: Graph) -> dict[int, LayerSpec]:
    """The cache layout each attention node's attrs.layer needs; KtcError on a layer used twice."""
    specs: dict[int, LayerSpec] = {}
    for n in graph.nodes_of("attention"):
        a = n.attrs
        layer = int(a["layer"])
        if layer in specs:
            raise KtcError(f"node {n.name}: KV-cache layer {layer} is used by two attention nodes")
        if a.get("kind") == "mla":
            specs[layer] = LayerSpec("mla", 1, int(a["kv_lora_rank"]) + int(a["qk_rope_head_dim"]))
        else:
            specs[layer] = LayerSpec("gqa", int(a["num_kv_heads"]), int(a["head_dim"]))
    return specs


class KVCache:
    """`generation` changes whenever the buffers are re-allocated or dropped: a CUDA graph captured
    over them is valid only while it stays the same (runtime/gpu/model.py)."""

    def __init__(self, specs: dict[int, LayerSpec], max_batch_size: int | None = None,
                 max_context: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.specs = dict(specs)
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.batch = 0
        self.capacity = 0
        self.generation = 0
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def for_graph(cls, graph: Graph, **kwargs) -> KVCache:
        return cls(layer_specs(graph), **kwargs)

    # -- allocation -------------------------------------------------------------
    def _alloc(self, spec: LayerSpec, batch: int, capacity: int) -> tuple[torch.Tensor, ...]:
        if spec.kind == "mla":
            return (torch.empty(batch, capacity, spec.width, dtype=self.dtype, device=self.device),)
        shape = (batch, spec.heads, capacity, spec.width)
        return (torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device))

    def reserve(self, batch: int, length: int) -> None:
        """Make room for `batch` rows of `length` tokens, keeping what is cached."""
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
        """(k, v) of a GQA layer; (rows,) of an MLA layer: the whole buffers, for kernels that
        write and read them in place."""
        return self._buffers[layer]

    def advance(self, seq: int) -> None:
        self.length += seq

    def clear(self) -> None:
        """Forget every token, keep the buffers (CUDA graphs captured over them stay valid)."""
        self.length = 0

    def reset(self) -> None:
        """Forget every token and free the buffers."""
        self._buffers.clear()
        self.length = self.batch = self.capacity = 0
        self.generation += 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._buffers.values() for t in ts)

    # -- what the attention ops call ---------------------------------------------
    def _check(self, layer: int, kind: str, batch: int, end: int) -> tuple[torch.Tensor, ...]:
        bufs = self._buffers.get(layer)
        if bufs is None or self.specs[layer].kind != kind:
            raise KtcError(f"KV-cache layer {layer} has no {kind} buffers")
        if batch != self.batch or end > self.capacity:
            raise KtcError(f"KV-cache layer {layer}: writing {batch} rows up to token {end} into a cache of "
                           f"{self.batch} rows x {self.capacity} tokens (reserve first)")
        return bufs

    def append_gqa(self, layer: int, k: torch.Tensor, v: torch.Tensor, past: int) -> tuple[
            torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, S, D] at [past, past+S); return the cached k, v [B, Hkv, past+S, D]."""
        b, _, s, _ = k.shape
        end = past + s
        k_buf, v_buf = self._check(layer, "gqa", b, end)
        k_buf[:, :, past:end] = k
        v_buf[:, :, past:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def append_mla(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, past: int) -> torch.Tensor:
        """Write latent [B, S, r] and k_rope [B, S, dr] at [past, past+S); return rows [B, past+S, r+dr]."""
        b, s, r = latent.shape
        end = past + s
        (buf,) = self._check(layer, "mla", b, end)
        buf[:, past:end, :r] = latent
        buf[:, past:end, r:] = k_rope
        return buf[:, :end]
