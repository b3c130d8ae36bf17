"""CPU-placed routed experts inside a GPU run: the heterogeneous half of a MoE layer.

A CPU moe_experts node of a --target cuda graph runs in four actions, which the GPU executor
schedules around the GPU work of the same layer:

    stage    (stream)  ids -> this node's rows (table), x -> float32, into pinned host buffers:
                       decode sizes written by one kernel through CUDA aliases of the buffers,
                       larger batches by asynchronous copies (see _Buffers)
    mark     (stream)  record an event after those copies (an external event: a CUDA graph
                       captures the record itself, so the host can wait on it at replay)
             ...       queue the layer's GPU experts and shared experts (they run while the CPU works)
    run      (host)    wait for the event (this layer's copies, not the whole device), then run the
                       TVM kernel into a pinned output buffer, on this thread (the GIL is released;
                       decode sizes through a call bound once, CpuExpertKernels.bind)
    gather   (stream)  copy the pinned output to the device, in the activations' dtype; in decode
                       graphs launched a layer ahead (host_flags), the same kernel first waits, on
                       the GPU, for the step count the host sets after run (release)

Long prefills instead stream the layer's CPU experts to the GPU (the GPU's fused MoE reads the
CPU kernels' int8 layout as w8a16 and their int4 layout as w4a16): from `stream_min_tokens` tokens on, copying
a layer's CPU experts at host-to-device speed (~55 GB/s from pinned memory) beats the CPU
working through hundreds of tokens per expert. Then stage runs the experts on the GPU, mark and
run do nothing and gather hands its result on. The packed weights are pinned at load for this.

Single-token decode steps can split the layer's CPU experts between the two sides (pcie_take): the pinned
packed weights are also aliased as CUDA tensors, stage splits the token's ids in one kernel (the GPU's share
to a device buffer, the rest to the CPU's pinned ids, the GPU's share named -1 there), mark forks GPU
kernels onto a stream of their own that run that share reading its weights across PCIe (~45 GB/s, a
second road to the same DRAM) while the CPU kernel runs the rest and the main stream the layer's GPU
experts, join (before run) brings the streams together again, and gather adds the two results (one
kernel). How many experts the GPU takes of a token's n comes from a cost model of both sides
(pcie_take_model) or KTC_PCIE_EXPERTS.

The kernel runs on the thread that drives the GPU: the GPU work it overlaps with is already
queued when it starts, and what comes after needs its result, so a second thread would only
add two hand-offs per layer. TVM's CPU thread pool belongs to the calling thread, which is
therefore always the same one. Only run is host work, so a decode step is captured as one CUDA
graph per MoE layer, from one run to the next (runtime/gpu/model.py). One set of pinned buffers
serves every layer: a layer's stage is queued after the previous layer's gather, and
the kernel writes the output buffer only after this layer's event, so no buffer is overwritten
while it is being copied.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from ktc.errors import ArtifactError, InputError
from ktc.ir import Node

from .ops import expert_table


class _CudaBytes:
    """__cuda_array_interface__ of a pinned host tensor's bytes: torch.as_tensor(., device="cuda") makes a
    CUDA tensor of the same memory (with unified addressing, a pinned host pointer is a device one)."""

    def __init__(self, t: torch.Tensor):
        self.__cuda_array_interface__ = {"data": (t.data_ptr(), False), "shape": (t.numel() * t.element_size(),),
                                         "typestr": "|u1", "strides": None, "version": 3}


def device_alias(t: torch.Tensor) -> torch.Tensor | None:
    """A CUDA tensor over contiguous pinned host tensor t's memory (kernels read and write it across
    PCIe), or None where this torch / driver cannot make one."""
    if not t.is_contiguous():
        return None
    try:
        a = torch.as_tensor(_CudaBytes(t), device="cuda").view(t.dtype).view(t.shape)
    except Exception:  # noqa: BLE001 - then the buffers are copied with memcpys, as before
        return None
    return a if a.is_cuda and a.data_ptr() == t.data_ptr() else None


class _Buffers:
    """Host buffers for up to `capacity` tokens (pinned when a CUDA device will copy them).

    Decode-sized buffers (zero_copy) also get CUDA aliases (`on_device`): stage then writes x, the
    weights and the ids with kernels straight into host memory and gather reads y the same way,
    so a layer's CUDA graph holds only kernel nodes. With memcpy nodes a hand-off cost ~27 us a
    layer on an H100 host instead of ~11-14 (bench/handoff_probe.py): a graph that mixes copies and
    kernels takes longer to launch and pauses between a copy and the next kernel."""

    def __init__(self, capacity: int, hidden: int, top_k: int, pin: bool, zero_copy: bool = False):
        def alloc(*shape, dtype):
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        self.capacity = capacity
        self.x = alloc(capacity, hidden, dtype=torch.float32)
        self.tw = alloc(capacity, top_k, dtype=torch.float32)
        self.ids = alloc(capacity, top_k, dtype=torch.int32)
        self.y = alloc(capacity, hidden, dtype=torch.float32)
        self.on_device: dict[str, torch.Tensor] | None = None
        if pin and zero_copy:
            views = {n: device_alias(getattr(self, n)) for n in ("x", "tw", "ids", "y")}
            if all(v is not None for v in views.values()):
                self.on_device = views


class LayerStats:
    def __init__(self, layer: int):
        self.layer = layer
        self.calls = 0
        self.tokens = 0
        self.cpu_s = 0.0
        self.wait_s = 0.0
        self.gpu_s = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Per call means: cpu_ms = the CPU kernel; wait_ms = the host waiting for the GPU to deliver
        the layer's inputs before the kernel could start; gpu_ms = GPU time of the work queued beside
        the kernel (GPU experts, shared experts; None without CUDA). The CPU time hidden behind GPU
        work is min(gpu_ms, cpu_ms)."""
        n = max(1, self.calls)
        return {"layer": self.layer, "calls": self.calls, "tokens": self.tokens / n,
                "cpu_ms": 1e3 * self.cpu_s / n, "wait_ms": 1e3 * self.wait_s / n,
                "gpu_ms": 1e3 * self.gpu_s / n if self.gpu_s else None}


_PACKED_PARTS = ("gate_up.q", "gate_up.scales", "down.q", "down.scales")


def _expert_bytes(packed: dict[str, torch.Tensor]) -> int:
    """Bytes of one expert's packed weights and scales (what running it reads)."""
    return sum(packed[p][0].numel() * packed[p].element_size() for p in _PACKED_PARTS if p in packed)


def _slot_share(node: Node) -> float:
    """The chance that a routed slot goes to one of this node's experts: their calibrated load
    (attrs["expert_load"], over the router's experts) or, without calibration, their number's share."""
    experts = node.attrs.get("experts")
    if experts is None:
        return 1.0
    load = node.attrs.get("expert_load")
    if load is not None and len(load) == int(node.attrs["num_global_experts"]):
        return float(min(1.0, sum(float(load[int(e)]) for e in experts)))
    return len(experts) / int(node.attrs["num_global_experts"])


def host_wait_pays(node: Node) -> bool:
    """Whether decode graphs should wait on the GPU for this node's CPU kernel (CpuExpertsOffload.host_flags):
    where a token gives its experts at least one slot on average (calibration, or their number). A layer whose
    CPU kernel rarely has work is GPU-bound, and the waiting kernel (two PCIe round trips) then costs more than
    the launch it hides (H100, a calibrated plan: 9-11% slower a step)."""
    return _slot_share(node) * int(node.attrs["top_k"]) >= 1.0


DEFAULT_STREAM_MIN_TOKENS = 256    # about where copying a layer's CPU experts beats the CPU kernel


def stream_min_tokens() -> int | None:
    """Prefills of at least this many tokens stream CPU experts to the GPU (KTC_STREAM_MIN_TOKENS;
    0 turns streaming off)."""
    v = os.environ.get("KTC_STREAM_MIN_TOKENS", "").strip()
    if not v:
        return DEFAULT_STREAM_MIN_TOKENS
    try:
        n = int(v)
    except ValueError:
        raise InputError(f"KTC_STREAM_MIN_TOKENS={v!r} is not a whole number of tokens") from None
    return n if n > 0 else None


# The GPU's share of a decode step's CPU experts (see CpuExpertsOffload.pcie_take): a cost model of the two
# sides, from bench/pcie_assist_probe.py on an H100 host (5 int8 experts of Qwen3-30B-A3B: CPU kernel 0.257 ms;
# GPU kernels reading pinned memory 38-47 GB/s; the CPU kernel ~10% slower while they read the same DRAM)
PCIE_HOST_BW = 95e9        # the CPU kernel's decode read speed (bytes of the experts it runs / its time)
PCIE_GPU_BW = 45e9         # GPU kernels reading the packed experts from pinned host memory
PCIE_GPU_FIXED_S = 30e-6   # their launch and first-byte latency
PCIE_CPU_SLOWDOWN = 1.1    # the CPU kernel beside them
PCIE_STEP_COST_S = 6e-6    # what the share adds to a layer even when it gets no expert (two kernel launches
                           # in the layer's graph; H100: a plan whose CPU experts are almost never routed to
                           # ran 4.86 ms a step without the share, 5.30 with three extra kernels a layer)


def pcie_split_cost(n: int, j: int, expert_bytes: int) -> float:
    """Seconds, by the cost model, until both sides are done when the GPU runs j of a token's n CPU experts
    (CPU kernel on n - j, GPU kernels on j, both reading the same DRAM)."""
    cpu = (n - j) * expert_bytes / PCIE_HOST_BW * (PCIE_CPU_SLOWDOWN if j else 1.0)
    gpu = PCIE_GPU_FIXED_S + j * expert_bytes / PCIE_GPU_BW if j else 0.0
    return max(cpu, gpu)


def pcie_take_model(top_k: int, expert_bytes: int) -> tuple[int, ...]:
    """take[n] for n = 0..top_k CPU-held slots of a token: how many the GPU runs so that the slower side
    finishes first (pcie_split_cost)."""
    return tuple(min(range(n + 1), key=lambda j, n=n: (pcie_split_cost(n, j, expert_bytes), j))
                 for n in range(top_k + 1))


def pcie_expected_saving(top_k: int, expert_bytes: int, cpu_share: float, take: tuple[int, ...]) -> float:
    """Seconds a layer's step saves on average with the share `take`, by the cost model, when each of a token's
    top_k slots goes to this node's (CPU) experts with probability cpu_share (binomial), less PCIE_STEP_COST_S."""
    saving = 0.0
    for n, j in enumerate(take):
        if j:
            saving += (math.comb(top_k, n) * cpu_share ** n * (1 - cpu_share) ** (top_k - n)
                       * (pcie_split_cost(n, 0, expert_bytes) - pcie_split_cost(n, j, expert_bytes)))
    return saving - PCIE_STEP_COST_S


def pcie_turned_off() -> bool:
    """KTC_PCIE_EXPERTS=off (or 0, none): the GPU never takes CPU experts (the packed weights are then
    pinned only for streaming, and not aliased)."""
    return os.environ.get("KTC_PCIE_EXPERTS", "").strip().lower() in ("off", "0", "none")


def pcie_take_setting(top_k: int, expert_bytes: int, cpu_share: float = 1.0) -> tuple[int, ...] | None:
    """KTC_PCIE_EXPERTS: unset or "auto" = pcie_take_model, or None where the node's experts get too few
    slots for it to pay (pcie_expected_saving; cpu_share: the chance that a slot is this node's); "off"
    (or 0) = none; or take[0..top_k] as comma-separated counts (a shorter list repeats its last, capped at n)."""
    v = os.environ.get("KTC_PCIE_EXPERTS", "").strip().lower()
    if v in ("", "auto"):
        take = pcie_take_model(top_k, expert_bytes)
        if pcie_expected_saving(top_k, expert_bytes, cpu_share, take) <= 0:
            return None
    elif pcie_turned_off():
        return None
    else:
        try:
            given = [int(c) for c in v.split(",")]
        except ValueError:
            raise InputError(f"KTC_PCIE_EXPERTS={v!r}: give auto, off, or counts like 0,0,1,1,1,2") from None
        if any(c < 0 for c in given):
            raise InputError(f"KTC_PCIE_EXPERTS={v!r}: counts cannot be negative")
        take = tuple(min(n, given[min(n, len(given) - 1)]) for n in range(top_k + 1))
    return take if any(take) else None


class CpuExpertsOffload:
    """Runs one CPU-placed moe_experts node of a GPU graph (see the module docstring)."""

    def __init__(self, node: Node, packed: dict[str, Any], cpu_kernels: Any, device: torch.device,
                 small_capacity: int, pool: dict, gpu_kernels: Any = None, stream: bool = True):
        if cpu_kernels is None:
            raise ArtifactError(f"node {node.name}: CPU experts need the artifact's CPU kernels, which are not loaded")
        if node.kernel is None:
            raise ArtifactError(f"node {node.name}: a CPU moe_experts node needs a kernel name")
        self.node = node
        self.kernel = node.kernel
        self.kernels = cpu_kernels
        self.device = device
        self.packed = packed
        self.hidden = int(node.attrs["hidden_size"])
        self.top_k = int(node.attrs["top_k"])
        self.table = expert_table(node, device)
        self.pin = device.type == "cuda"
        self.pool = pool                       # shared by every offload of one executor: (H, K, kind) -> _Buffers
        self.small_capacity = small_capacity
        self.stats = LayerStats(int(node.attrs.get("layer", -1)))
        self.profile = False
        self._event = torch.cuda.Event(external=True) if self.pin else None
        self._timed = False             # profiling: _gpu_start was recorded by an eager mark()
        self._gpu_start = torch.cuda.Event(enable_timing=True) if self.pin else None
        self._gpu_end = torch.cuda.Event(enable_timing=True) if self.pin else None
        self._pending_gpu: list = []
        self._tokens = 0
        self._streamed: torch.Tensor | None = None
        # decode-sized calls run bound (CpuExpertKernels.bind: checked once, then only the FFI call);
        # False: through moe_experts every call, as before (for comparisons)
        self.bound_calls = True
        # decode-sized buffers are read and written by kernels through CUDA aliases (see _Buffers);
        # False: memcpys, as before (for comparisons; set before the first step)
        self.zero_copy = True
        self._bound: dict[int, Any] = {}
        self._bound_buffers: _Buffers | None = None
        self.gpu_kernels = gpu_kernels
        self.inter = int(node.attrs["intermediate_size"])
        quantized = node.format in ("int8", "int4") and "gate_up.q" in packed
        # these experts' layout, on the GPU (stream: the plan left room for the prefill staging buffer)
        gpu_can_run = quantized and self.pin and gpu_kernels is not None and stream
        self.stream_from = stream_min_tokens() if gpu_can_run else None
        pcie = (gpu_can_run and hasattr(getattr(gpu_kernels, "moe", None), "moe_decode_cpu_layout")
                and not pcie_turned_off())
        take = pcie_take_setting(self.top_k, _expert_bytes(packed), _slot_share(node)) if pcie else None
        if self.stream_from is not None or pcie:
            # pinned: copies at full host-to-device speed, and GPU kernels can read them where they are
            self.packed = {k: (v.pin_memory() if k.endswith((".q", ".scales")) else v) for k, v in packed.items()}
        self._pcie_weights: dict[str, torch.Tensor] | None = None
        self._gpu_ids: torch.Tensor | None = None
        if pcie:    # aliased even where the cost model gives the GPU no share: pcie_take can still be set
            aliases = {p: device_alias(self.packed[p]) for p in _PACKED_PARTS}
            if all(a is not None for a in aliases.values()):
                self._pcie_weights = aliases
                self._gpu_ids = torch.full((1, self.top_k), -1, dtype=torch.int32, device=device)
        self._pcie_take: tuple[int, ...] | None = None
        self._take: torch.Tensor | None = None
        self._pcie_in: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._pcie_y: torch.Tensor | None = None
        self.pcie_take = take if self._pcie_weights is not None else None
        # the share runs on a stream of its own, beside the layer's GPU experts (which then do not wait for
        # its PCIe reads); False: on the main stream after them (for comparisons)
        self.pcie_side_stream = True
        self._side = torch.cuda.Stream(device) if self._pcie_weights is not None else None
        self._forked = False
        # host_flags: decode graphs launched a layer ahead (runtime/gpu/model.py), gather starting with a kernel
        # that waits on the GPU for the host's step count after the CPU kernel (release), instead of the next
        # layer's graph being launched only then (False, as before); on where it pays (host_wait_pays)
        self.host_flags = host_wait_pays(node)
        # with host_flags: each graph launched before the previous layer's CPU kernel (True) or after it (False:
        # the flags still gate the graphs; for comparisons)
        self.launch_ahead = True
        self.await_host = False     # set by the model while it captures decode graphs launched ahead
        # the host's count of released steps, in pinned memory (a cache line of its own) and here; the device's
        # count of the steps its waiting kernel has seen
        self._flag = torch.zeros(16, dtype=torch.int32, pin_memory=self.pin)
        self._flag_host = self._flag.numpy()
        self._flag_dev = device_alias(self._flag) if self.pin else None
        self._count = 0
        self._seen = torch.zeros(1, dtype=torch.int32, device=device) if self._flag_dev is not None else None

    @property
    def pcie_take(self) -> tuple[int, ...] | None:
        """Single-token decode steps: of the n slots of a token that this node's experts hold, the GPU runs
        take[n], reading those experts' packed weights from pinned host memory over PCIe while the CPU kernel
        runs the others (the ids the CPU gets name them -1). None: the CPU runs them all. Set at load from
        KTC_PCIE_EXPERTS or the cost model (pcie_take_model; None where this node's experts get so few slots,
        by calibration, that the share's kernel launches would cost more than it saves); settable (before the
        next step's graphs)."""
        return self._pcie_take

    @pcie_take.setter
    def pcie_take(self, take: tuple[int, ...] | None) -> None:
        if take is not None and not any(take):
            take = None
        if take is not None:
            if self._pcie_weights is None:
                raise InputError(f"node {self.node.name}: the GPU cannot read these experts over PCIe "
                                 "(not quantized, no CUDA, or its GPU kernels predate it)")
            if len(take) != self.top_k + 1 or any(not 0 <= int(c) <= n for n, c in enumerate(take)):
                raise InputError(f"node {self.node.name}: pcie_take needs top_k + 1 = {self.top_k + 1} counts, "
                                 f"take[n] <= n, got {take}")
        self._pcie_take = None if take is None else tuple(int(c) for c in take)
        self._take = None if take is None else torch.tensor(self._pcie_take, dtype=torch.int32, device=self.device)

    def _buffers(self, tokens: int) -> _Buffers:
        # decode-sized steps use a fixed set (CUDA graphs keep its addresses); prefills a growing one
        kind = "small" if tokens <= self.small_capacity else "large"
        key = (self.hidden, self.top_k, kind)
        buf = self.pool.get(key)
        if buf is None or buf.capacity < tokens:
            cap = self.small_capacity if kind == "small" else max(tokens, 2 * (buf.capacity if buf else 0))
            buf = _Buffers(cap, self.hidden, self.top_k, self.pin, zero_copy=kind == "small" and self.zero_copy)
            self.pool[key] = buf
        return buf

    # -- GPU stream actions -----------------------------------------------------------------
    def stage(self, x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor) -> None:
        t = x.numel() // self.hidden
        ids = ids.reshape(t, self.top_k)
        self._out = (tuple(x.shape), x.dtype)
        self._tokens = t
        self._pcie_in = self._pcie_y = None
        streamed = self.stream_from is not None and t >= self.stream_from
        buf = None if streamed else self._buffers(t)
        dev = None if buf is None else buf.on_device
        if dev is not None and hasattr(getattr(self.gpu_kernels, "moe", None), "stage_decode"):
            # one kernel writes x, the weights and this node's ids into host memory (see _Buffers), splitting off
            # the GPU's share of the experts in single-token steps (pcie_take)
            self._streamed = None
            split = t == 1 and self._take is not None
            x2, tw2 = x.reshape(t, self.hidden), tw.reshape(t, self.top_k)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            self.gpu_kernels.moe.stage_decode(ids, self.table, dev["ids"][:t], x2, tw2, dev["x"][:t], dev["tw"][:t],
                                              self._take if split else None, self._gpu_ids if split else None)
            if split:
                self._pcie_in = (x2, tw2, self._gpu_ids)
            return
        if dev is not None:
            # artifacts from before moe_stage_kernel: kernels writing host memory. Not copy_: torch copies between
            # tensors of one dtype with cudaMemcpy, a memcpy node in a graph; mul by 1 is a kernel, exact
            self._streamed = None
            torch.mul(x.reshape(t, self.hidden), 1, out=dev["x"][:t])
            torch.mul(tw.reshape(t, self.top_k), 1, out=dev["tw"][:t])
            if t == 1 and self._take is not None:
                # the GPU's share (pcie_take): its ids to _gpu_ids, the CPU's (others -1) to the host buffer, by
                # those artifacts' own split_ids (moe_split_ids_kernel)
                self.gpu_kernels.moe.split_ids(ids, self.table, self._take, dev["ids"][:t], self._gpu_ids)
                self._pcie_in = (x.reshape(t, self.hidden), tw.reshape(t, self.top_k), self._gpu_ids)
            elif self.table is not None:
                torch.index_select(self.table, 0, ids.reshape(-1), out=dev["ids"][:t].view(-1))
            else:
                torch.mul(ids, 1, out=dev["ids"][:t])
            return
        if self.table is not None:
            ids = self.table.index_select(0, ids.reshape(-1)).view(t, self.top_k)
        if streamed:
            self._streamed = self._run_on_gpu(x.reshape(t, self.hidden), tw.reshape(t, self.top_k), ids)
            return
        self._streamed = None
        assert buf is not None
        buf.x[:t].copy_(x.reshape(t, self.hidden).float(), non_blocking=self.pin)
        buf.tw[:t].copy_(tw.reshape(t, self.top_k), non_blocking=self.pin)
        buf.ids[:t].copy_(ids, non_blocking=self.pin)

    def _run_on_gpu(self, x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This layer's CPU experts copied to the GPU (one staging buffer per part, shared by every
        layer: stream order keeps a layer's copy after the previous layer's use) and run there."""
        staged = {}
        for part in ("gate_up.q", "gate_up.scales", "down.q", "down.scales"):
            src = self.packed[part]
            key = ("stream", part)
            buf = self.pool.get(key)
            if buf is None or buf.numel() < src.numel():
                buf = torch.empty(src.numel(), dtype=src.dtype, device=self.device)
                self.pool[key] = buf
            dst = buf[: src.numel()].view(src.shape)
            dst.copy_(src, non_blocking=True)
            staged[part] = dst
        a = self.node.attrs
        return self.gpu_kernels.moe.fused_moe(x, tw, ids, staged, int(a["num_experts"]), int(a["intermediate_size"]),
                                              partial=self.table is not None)

    def gather(self) -> torch.Tensor:
        """The CPU experts' output on the device, shaped and typed like the staged x."""
        t = self._tokens
        shape, dtype = self._out
        if self._streamed is not None:
            y, self._streamed = self._streamed, None
            return y.to(dtype).view(shape)
        buf = self._buffers(t)
        if buf.on_device is not None and self.await_host:   # waits for release(), then as below, one kernel
            out = torch.empty(t, self.hidden, dtype=dtype, device=self.device)
            self.gpu_kernels.moe.wait_gather(self._flag_dev, self._seen, buf.on_device["y"][:t], out, self._pcie_y)
            self._pcie_y = None
            return out.view(shape)
        if buf.on_device is not None:   # one kernel reads y from host memory (a copy: the buffer is reused)
            y = buf.on_device["y"][:t]
            if self._pcie_y is not None:    # plus the GPU's share of the experts (float32): one kernel
                out = torch.empty(t, self.hidden, dtype=dtype, device=self.device)
                torch.add(self._pcie_y, y, out=out)
                self._pcie_y = None
                return out.view(shape)
            return y.to(dtype, copy=True).view(shape)
        y = buf.y[:t].to(self.device, non_blocking=self.pin)
        return y.to(dtype).view(shape)

    def mark(self) -> None:
        """After stage, on the stream: record the event run() waits for."""
        if self._streamed is not None or self._event is None:
            return
        self._event.record()
        if self._pcie_in is not None:   # right after the event: the GPU's share, reading over PCIe
            x, tw, gpu_ids = self._pcie_in
            self._pcie_in = None
            share = self.gpu_kernels.moe.moe_decode_cpu_layout
            if self.pcie_side_stream and self._side is not None:
                self._side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._side):
                    self._pcie_y = share(x, tw, gpu_ids, self._pcie_weights, self.inter)
                self._forked = True
            else:
                self._pcie_y = share(x, tw, gpu_ids, self._pcie_weights, self.inter)

    def join(self) -> None:
        """On the stream, after the layer's GPU work and before run: wait for what mark forked onto the side
        stream (a CUDA graph must join its streams; gather, in the next graph, then finds the share done)."""
        if self._forked:
            torch.cuda.current_stream().wait_stream(self._side)
            if not torch.cuda.is_current_stream_capturing():    # made on the side stream, used on this one
                self._pcie_y.record_stream(torch.cuda.current_stream())
            self._forked = False
        # GPU timing of the work beside the kernel: eager steps only (a replayed graph runs no Python here)
        self._timed = self.profile and not torch.cuda.is_current_stream_capturing()
        if self._timed:
            self._gpu_start.record()

    # -- host action -------------------------------------------------------------------------
    def run(self, tokens: int | None = None) -> None:
        """Wait for this layer's inputs, then run the CPU kernel (blocking this thread). `tokens`:
        the count a replayed CUDA graph staged, which no Python code saw."""
        if tokens is not None:
            self._tokens = tokens
        if self._streamed is not None:
            return
        t = self._tokens
        start = time.perf_counter()
        if self._event is not None:
            self._event.synchronize()
        timed, self._timed = self._timed, False
        if timed:
            self._gpu_end.record()            # the GPU work queued since mark() runs beside the kernel
        ready = time.perf_counter()
        # a step routed to none of these experts costs the kernel a serial zero-fill, no threads
        if t <= self.small_capacity and self.bound_calls:
            self._bound_call(t)()
        else:
            buf = self._buffers(t)
            self.kernels.moe_experts(self.kernel, buf.x[:t], buf.tw[:t], buf.ids[:t], self.packed, out=buf.y[:t])
        done = time.perf_counter()
        if self.profile:
            s = self.stats
            s.calls += 1
            s.tokens += t
            s.cpu_s += done - ready
            s.wait_s += ready - start
            if timed:
                self._pending_gpu.append((self._gpu_start, self._gpu_end))
                self._gpu_start, self._gpu_end = (torch.cuda.Event(enable_timing=True),
                                                  torch.cuda.Event(enable_timing=True))

    def can_await_host(self, tokens: int) -> bool:
        """Whether decode graphs of `tokens` tokens can wait on the GPU for this layer's CPU kernel (host_flags on,
        kernels through CUDA aliases, GPU kernels that have moe_wait_gather_kernel)."""
        return (self.host_flags and self._flag_dev is not None and tokens <= self.small_capacity
                and self._buffers(tokens).on_device is not None
                and hasattr(getattr(self.gpu_kernels, "moe", None), "wait_gather"))

    def release(self) -> None:
        """Host, after run(): count one more released step where the next layer's graph waits for it (await_host)."""
        self._count = (self._count + 1) & 0x7FFFFFFF
        self._flag_host[0] = self._count

    def resync(self) -> None:
        """After a step was abandoned (every layer released, the device synchronised): the device's count of seen
        steps set to the host's, so no later kernel takes a release meant for a graph that never ran."""
        if self._seen is not None:
            self._seen.fill_(self._count)

    def check_host_wait(self, timeout_s: float = 1.0) -> bool:
        """Whether a kernel waiting on the flag sees the host set it on this machine: launched before the release,
        it must still be waiting after a few ms and finish once released. Compiles it, too."""
        if self._flag_dev is None:
            return False
        y = self._buffers(1).on_device["y"][:1]
        out = torch.empty(1, self.hidden, dtype=torch.float32, device=self.device)
        done = torch.cuda.Event()
        self.gpu_kernels.moe.wait_gather(self._flag_dev, self._seen, y, out, None, max_spins=1 << 22)
        done.record()
        time.sleep(0.005)
        waited = not done.query()
        self.release()
        end = time.perf_counter() + timeout_s
        while not done.query() and time.perf_counter() < end:
            time.sleep(1e-4)
        seen = done.query()
        torch.cuda.synchronize(self.device)
        ok = waited and seen and int(self._seen[0]) == self._count and not bool(out.isnan().any())
        self.resync()
        return ok

    def _bound_call(self, t: int) -> Any:
        """The kernel call on the decode-sized buffers for t tokens, bound once (CpuExpertKernels.bind):
        made again when tuning records changed, or when the pool's buffers were replaced."""
        buf = self._buffers(t)
        call = self._bound.get(t)
        if call is None or call.tuning != self.kernels.tuning or self._bound_buffers is not buf:
            if self._bound_buffers is not buf:
                self._bound.clear()
                self._bound_buffers = buf
            call = self._bound[t] = self.kernels.bind(self.kernel, buf.x[:t], buf.tw[:t], buf.ids[:t], self.packed,
                                                      buf.y[:t])
        return call

    def collect_gpu_times(self) -> None:
        """Fold the finished GPU timings of profiled calls into the stats (needs a synchronised device)."""
        for a, b in self._pending_gpu:
            self.stats.gpu_s += a.elapsed_time(b) / 1e3
        self._pending_gpu.clear()
