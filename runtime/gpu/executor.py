"""Runs a --target cuda graph: GPU nodes in order, CPU-placed routed experts beside them.

Weights are moved to the device once (bf16 where the graph stores bf16, packed w4a16 parts as
they are); each node gets its GPU op and prepared weights up front, so a step only launches
kernels. A step reads its token positions from a device tensor, which is what lets a decode
step be captured in CUDA graphs and replayed at every position.

The graph becomes a schedule of actions: "gpu" (a GPU node), and for every CPU-placed
moe_experts node (runtime/gpu/offload.py) "stage" (GPU: copies to pinned memory) and "mark"
(GPU: an event after them) where the node stands, "join" (GPU: the stream waits for work the node
forked onto its own stream, the GPU's PCIe share of its experts), "run" (host: the CPU kernel, while
the GPU works on what was queued meanwhile) and "gather" (GPU: copy the result back) just before its
output's first user. The host actions cut the schedule into segments of pure stream work:
`segments()` is what the model captures as CUDA graphs, one per segment (one per MoE layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ktc.errors import ArtifactError
from ktc.ir import Graph

from . import ops
from .offload import CpuExpertsOffload, LayerStats
from .ops import GpuRunContext

HOST_ACTIONS = ("run",)

_POSITION_NAMES = ("positions", "position_ids")


def to_device(weights: Mapping[str, Any], graph: Graph, device: torch.device,
              float_dtype: torch.dtype = torch.bfloat16, skip: set[str] = frozenset()) -> dict[str, Any]:
    """The graph's weights on `device`: bf16-format weights as `float_dtype` (bf16 but for tests in
    Triton's interpreter, which cannot multiply bf16), other dense weights in their stored format.
    Nodes named in `skip` (CPU-placed experts) keep their weights where they are."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(w for n in graph.nodes if n.name not in skip for w in n.weights.values()):
        if name not in weights:
            raise ArtifactError(f"weight {name!r} is missing")
        t = weights[name]
        if isinstance(t, Mapping):
            out[name] = {p: v.to(device).contiguous() for p, v in t.items()}
            continue
        spec = graph.weights[name]
        if spec.layout is None and tuple(t.shape) != tuple(int(d) for d in spec.shape):
            raise ArtifactError(f"weight {name!r} has shape {tuple(t.shape)}, the graph says {tuple(spec.shape)}")
        dtype = getattr(torch, spec.format) if spec.format in ("bfloat16", "float16", "float32") else t.dtype
        if dtype == torch.bfloat16:
            dtype = float_dtype
        out[name] = t.to(device=device, dtype=dtype).contiguous()
    return out


class GpuExecutor:
    def __init__(self, graph: Graph, weights: Mapping[str, Any], kernels: Any, device: torch.device,
                 float_dtype: torch.dtype = torch.bfloat16, cpu_kernels: Any = None, max_batch_size: int = 8):
        try:
            graph.validate()
        except ValueError as e:
            raise ArtifactError(f"invalid graph: {e}") from None
        off = [n for n in graph.nodes if n.device != "cuda" and not (n.device == "cpu" and n.op == "moe_experts")]
        if off:
            raise ArtifactError(f"node {off[0].name} is placed on {off[0].device!r}: in a GPU artifact only routed "
                                f"experts may run on the CPU")
        self.graph, self.kernels, self.device = graph, kernels, device
        self.float_dtype = float_dtype
        cpu_nodes = {n.name for n in graph.nodes if n.device == "cpu"}
        gpu_graph_weights = {w for n in graph.nodes if n.name not in cpu_nodes for w in n.weights.values()}
        resolved = to_device({k: v for k, v in weights.items() if k in gpu_graph_weights}, graph, device, float_dtype,
                             skip=cpu_nodes)
        plan = graph.config.get("placement", {})
        # a GPU budget without room for the prefill staging buffer: CPU experts stay on the CPU
        stream_ok = not plan.get("gpu_memory_budget") or plan.get("stream_buffer_bytes", 0) > 0
        self.steps = []
        self.offloads: list[CpuExpertsOffload] = []
        pool: dict = {}
        for n in graph.nodes:
            if n.name in cpu_nodes:
                from ktc.runtime.ops.moe import MOE_EXPERTS

                packed = MOE_EXPERTS.prepare(n, {role: weights[w] for role, w in n.weights.items()})["packed"]
                off = CpuExpertsOffload(n, packed, cpu_kernels, device, max_batch_size, pool, kernels, stream_ok)
                self.offloads.append(off)
                self.steps.append((n, off, None))
                continue
            op = ops.get(n.op)
            ws = {role: resolved[w] for role, w in n.weights.items()}
            if op.prepare is not None:
                ws = op.prepare(n, ws)
            self.steps.append((n, op, ws))
        self.actions = self._schedule()
        self.free_after = self._lifetimes()
        users = graph.users()
        self.ids_input = next((v for v in graph.inputs if any(u.op == "embedding" for u in users.get(v, []))), None)
        self.positions_input = next((v for v in graph.inputs if v in _POSITION_NAMES or
                                     any(u.op == "rope" for u in users.get(v, []))), None)
        if self.ids_input is None or self.positions_input is None:
            raise ArtifactError("the graph needs a token-id input and a positions input to run on the GPU")
        self.output = graph.outputs[0]
        producer = graph.producers().get(self.output)
        self._head = producer if producer is not None and producer.op == "linear" else None

    # -- the schedule ------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[str, int]]:
        """(kind, index) actions: "gpu" -> self.steps[index]; "stage" / "mark" / "join" / "run" / "gather"
        -> the CPU node self.steps[index] (see the module docstring)."""
        actions: list[tuple[str, int]] = []
        pending: dict[str, int] = {}            # output value of a launched CPU node -> its step
        for i, (node, op, _) in enumerate(self.steps):
            for v in node.inputs:
                if v in pending:
                    j = pending.pop(v)
                    actions += [("join", j), ("run", j), ("gather", j)]
            if isinstance(op, CpuExpertsOffload):
                actions += [("stage", i), ("mark", i)]
                pending[node.outputs[0]] = i
            else:
                actions.append(("gpu", i))
        for v in self.graph.outputs:
            if v in pending:
                j = pending.pop(v)
                actions += [("join", j), ("run", j), ("gather", j)]
        return actions

    def _lifetimes(self) -> list[tuple[str, ...]]:
        """Per action, the values to drop after it: each value after its last reader (or at once
        if nothing reads it), except the graph's outputs."""
        last: dict[str, int] = {}
        for k, (kind, i) in enumerate(self.actions):
            node = self.steps[i][0]
            if kind in ("gpu", "stage"):
                for v in node.inputs:
                    last[v] = k
            if kind == "gpu" or kind == "gather":
                for v in node.outputs:
                    last.setdefault(v, k)
        free: list[tuple[str, ...]] = [() for _ in self.actions]
        for v, k in last.items():
            if v not in self.graph.outputs:
                free[k] = (*free[k], v)
        return free

    def segments(self) -> list[tuple[str, list[int]]]:
        """The schedule cut at host actions: [("stream", [action index, ...]) | ("host", [k])]."""
        out: list[tuple[str, list[int]]] = []
        for k, (kind, _) in enumerate(self.actions):
            seg = "host" if kind in HOST_ACTIONS else "stream"
            if seg == "stream" and out and out[-1][0] == "stream":
                out[-1][1].append(k)
            else:
                out.append((seg, [k]))
        return out

    def start(self, ids: torch.Tensor, positions: torch.Tensor, cache, past: int, last_only: bool = False,
              last: torch.Tensor | None = None) -> dict[str, Any]:
        """A run's state. last_only: the head computes one position a row, the last one, or the one whose
        index the device tensor `last` [1] holds (a padded prompt in a CUDA graph)."""
        b, s = ids.shape
        return {"ctx": GpuRunContext(self.kernels, cache, positions, b, s, past), "last_only": last_only,
                "last": last, "values": {self.ids_input: ids, self.positions_input: positions}}

    def do(self, k: int, state: dict[str, Any]) -> None:
        """Carry out action k of the schedule on a run's state (from start())."""
        kind, i = self.actions[k]
        node, op, ws = self.steps[i]
        values = state["values"]
        if kind == "gpu":
            args = [values[v] for v in node.inputs]
            if state["last_only"] and node is self._head:
                last = state.get("last")
                args[0] = args[0][:, -1:, :].contiguous() if last is None else args[0].index_select(1, last)
            for name, t in zip(node.outputs, op.run(node, args, ws, state["ctx"]), strict=True):
                values[name] = t
        elif kind == "stage":
            op.stage(*[values[v] for v in node.inputs])
        elif kind == "mark":
            op.mark()
        elif kind == "join":
            op.join()
        elif kind == "run":
            op.run()
        elif kind == "gather":
            values[node.outputs[0]] = op.gather()
        for v in self.free_after[k]:
            values.pop(v, None)

    def finish(self, state: dict[str, Any]) -> torch.Tensor:
        out = state["values"][self.output]
        return out.float() if out.dtype != torch.float32 else out

    def run(self, ids: torch.Tensor, positions: torch.Tensor, cache, past: int, last_only: bool = False,
            last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32, on the device) of tokens `ids` [B, S] at `positions` [B, S] (device tensors).
        The cache must be reserved; it is not advanced here."""
        state = self.start(ids, positions, cache, past, last_only, last)
        with torch.no_grad():
            for k in range(len(self.actions)):
                self.do(k, state)
        return self.finish(state)

    # -- profiling of the CPU experts ------------------------------------------------------------
    def profile(self, on: bool = True) -> None:
        for off in self.offloads:
            off.profile = on
            if on:
                off.stats = LayerStats(off.stats.layer)

    def layer_stats(self) -> list[dict[str, Any]]:
        if self.offloads and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for off in self.offloads:
            off.collect_gpu_times()
        return [off.stats.as_dict() for off in self.offloads]

