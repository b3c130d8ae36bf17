"""Runs a graph whose every node is on the GPU: nodes in order, values freed after their last use.

Weights are moved to the device once (bf16 where the graph stores bf16, packed w4a16 parts as
they are); each node gets its GPU op and prepared weights up front, so a step only launches
kernels. A step reads its token positions from a device tensor, which is what lets a decode
step be captured once in a CUDA graph and replayed at every position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ktc.errors import ArtifactError
from ktc.ir import Graph

from . import ops
from .ops import GpuRunContext

_POSITION_NAMES = ("positions", "position_ids")


def to_device(weights: Mapping[str, Any], graph: Graph, device: torch.device,
              float_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The graph's weights on `device`: bf16-format weights as `float_dtype` (bf16 but for tests in
    Triton's interpreter, which cannot multiply bf16), other dense weights in their stored format."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(w for n in graph.nodes for w in n.weights.values()):
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
                 float_dtype: torch.dtype = torch.bfloat16):
        try:
            graph.validate()
        except ValueError as e:
            raise ArtifactError(f"invalid graph: {e}") from None
        off = [n.name for n in graph.nodes if n.device != "cuda"]
        if off:
            raise ArtifactError(f"node {off[0]} is placed on {graph.nodes[0].device!r}: the GPU runtime runs graphs "
                                f"placed wholly on the GPU")
        self.graph, self.kernels, self.device = graph, kernels, device
        self.float_dtype = float_dtype
        resolved = to_device(weights, graph, device, float_dtype)
        last_use: dict[str, int] = {}
        for i, n in enumerate(graph.nodes):
            for v in n.inputs:
                last_use[v] = i
        self.free_after: list[tuple[str, ...]] = [() for _ in graph.nodes]
        produced = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs}
        for v, i in produced.items():
            if v not in graph.outputs:
                j = last_use.get(v, i)
                self.free_after[j] = (*self.free_after[j], v)
        self.steps = []
        for n in graph.nodes:
            op = ops.get(n.op)
            ws = {role: resolved[w] for role, w in n.weights.items()}
            if op.prepare is not None:
                ws = op.prepare(n, ws)
            self.steps.append((n, op, ws))
        users = graph.users()
        self.ids_input = next((v for v in graph.inputs if any(u.op == "embedding" for u in users.get(v, []))), None)
        self.positions_input = next((v for v in graph.inputs if v in _POSITION_NAMES or
                                     any(u.op == "rope" for u in users.get(v, []))), None)
        if self.ids_input is None or self.positions_input is None:
            raise ArtifactError("the graph needs a token-id input and a positions input to run on the GPU")
        self.output = graph.outputs[0]
        producer = graph.producers().get(self.output)
        self._head = producer if producer is not None and producer.op == "linear" else None

    def run(self, ids: torch.Tensor, positions: torch.Tensor, cache, past: int, last_only: bool = False
            ) -> torch.Tensor:
        """Logits (float32, on the device) of tokens `ids` [B, S] at `positions` [B, S] (device tensors).
        The cache must be reserved; it is not advanced here."""
        b, s = ids.shape
        ctx = GpuRunContext(self.kernels, cache, positions, b, s, past)
        values: dict[str, torch.Tensor] = {self.ids_input: ids, self.positions_input: positions}
        with torch.no_grad():
            for (node, op, ws), dead in zip(self.steps, self.free_after, strict=True):
                args = [values[v] for v in node.inputs]
                if last_only and node is self._head:
                    args[0] = args[0][:, -1:, :].contiguous()
                for name, t in zip(node.outputs, op.run(node, args, ws, ctx), strict=True):
                    values[name] = t
                for v in dead:
                    values.pop(v, None)
        out = values[self.output]
        if out.dtype != torch.float32:
            out = out.float()
        return out

