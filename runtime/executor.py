"""Runs a lowered ktc IR graph: nodes in order, values in a dict, each freed after its last use.

Built once per model: the graph is validated, every node gets its op implementation
(runtime.ops) and its weights by role, prepared (checked, converted, precomputed) up front,
so that a step only looks things up. Dense weights run in float32 on the CPU; weights
packed for a kernel (a dict part -> tensor) go to the kernel untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ktc.errors import ArtifactError, KtcError
from ktc.ir import Graph, Node

from . import ops
from .kv_cache import KVCache
from .ops.base import OpImpl, RunContext

_POSITION_NAMES = ("positions", "position_ids")


@dataclass
class _Step:
    node: Node
    impl: OpImpl
    weights: dict[str, Any]
    free: tuple[str, ...]      # values dead once this step has run


def dense_float32(weights: Mapping[str, Any], graph: Graph) -> dict[str, Any]:
    """The graph's weights from `weights`: dense float tensors converted to contiguous float32
    (once, by name, so shared weights stay shared), packed dicts passed through."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(w for n in graph.nodes for w in n.weights.values()):
        if name not in weights:
            raise ArtifactError(f"weight {name!r} is missing")
        t = weights[name]
        if isinstance(t, Mapping):
            out[name] = dict(t)
            continue
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
        spec = graph.weights[name]
        if spec.layout is None and spec.shape and tuple(t.shape) != tuple(int(d) for d in spec.shape):
            raise ArtifactError(f"weight {name!r} has shape {tuple(t.shape)}, the graph says {tuple(spec.shape)}")
        out[name] = t.to(torch.float32).contiguous() if t.is_floating_point() else t
    return out


class Executor:
    def __init__(self, graph: Graph, weights: Mapping[str, Any], cpu_kernels: Any = None):
        try:
            graph.validate()
        except ValueError as e:
            raise ArtifactError(f"invalid graph: {e}") from None
        if not graph.outputs:
            raise ArtifactError("the graph has no outputs")
        self.graph = graph
        self.cpu_kernels = cpu_kernels
        resolved = dense_float32(weights, graph)

        last_use: dict[str, int] = {}
        for i, n in enumerate(graph.nodes):
            for v in n.inputs:
                last_use[v] = i
        produced = {v: -1 for v in graph.inputs}
        produced.update({o: i for i, n in enumerate(graph.nodes) for o in n.outputs})
        dead_after: dict[int, list[str]] = {}
        for v, i in produced.items():
            if v not in graph.outputs:
                dead_after.setdefault(last_use.get(v, i), []).append(v)
        self._initially_dead = tuple(dead_after.pop(-1, ()))   # graph inputs nobody reads

        self.steps: list[_Step] = []
        for i, n in enumerate(graph.nodes):
            impl = ops.get(n.op)
            ws = {role: resolved[w] for role, w in n.weights.items()}
            if n.op != "moe_experts":
                packed = [r for r, w in ws.items() if not isinstance(w, torch.Tensor)]
                if packed:
                    raise ArtifactError(f"node {n.name}: {n.op} runs on dense weights, but {', '.join(packed)} "
                                        f"are packed for a kernel")
            elif cpu_kernels is None:
                raise KtcError(f"node {n.name}: moe_experts needs CPU kernels ({n.kernel!r}), but none are loaded")
            if impl.prepare is not None:
                ws = impl.prepare(n, ws)
            self.steps.append(_Step(n, impl, ws, tuple(dead_after.get(i, ()))))

        users = graph.users()
        self.ids_input = next((v for v in graph.inputs if any(u.op == "embedding" for u in users.get(v, []))), None)
        self.positions_input = next((v for v in graph.inputs if v in _POSITION_NAMES or
                                     any(u.op == "rope" for u in users.get(v, []))), None)
        self.output = graph.outputs[0]
        self._has_attention = any(n.op == "attention" for n in graph.nodes)
        producer = graph.producers().get(self.output)
        # Only the head's rows for the last position are needed when sampling: a linear is
        # per token, so slicing its input first gives those rows for a fraction of the work.
        self._head = producer if producer is not None and producer.op == "linear" else None

    # -- running ------------------------------------------------------------------
    def execute(self, feeds: Mapping[str, torch.Tensor], cache: KVCache | None = None, seq: int = 0,
                last_only: bool = False, mla_mode: str = "auto") -> dict[str, torch.Tensor]:
        """Run the graph on `feeds` (graph input -> tensor); returns the graph outputs.

        Attention reads and appends to `cache` (already reserved for `seq` more tokens), which
        advances by `seq` once the whole graph has run."""
        missing = [v for v in self.graph.inputs if v not in feeds]
        if missing:
            raise KtcError(f"missing graph input(s): {', '.join(missing)}")
        if cache is None and self._has_attention:
            raise KtcError("the graph has attention: running it needs a KV cache")
        ctx = RunContext(cache=cache, past_length=cache.length if cache is not None else 0,
                         cpu_kernels=self.cpu_kernels, mla_mode=mla_mode)
        values: dict[str, torch.Tensor] = dict(feeds)
        for v in self._initially_dead:
            values.pop(v, None)
        # no_grad rather than inference_mode: callers may modify the logits in place afterwards
        with torch.no_grad():
            for step in self.steps:
                node = step.node
                args = [values[v] for v in node.inputs]
                if last_only and node is self._head:
                    args[0] = args[0][..., -1:, :]
                outs = step.impl.run(node, args, step.weights, ctx)
                for name, t in zip(node.outputs, outs, strict=True):
                    values[name] = t
                for v in step.free:
                    del values[v]
        if cache is not None:
            cache.advance(seq)
        return {v: values[v] for v in self.graph.outputs}

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False,
                mla_mode: str = "auto") -> torch.Tensor:
        """Logits for the new tokens `ids` [batch, seq] after what `cache` holds ([batch, seq or 1, vocab])."""
        if self.ids_input is None:
            raise ArtifactError("the graph has no token-id input (no embedding reads a graph input)")
        batch, seq = ids.shape
        cache.reserve(batch, cache.length + seq)
        feeds = {self.ids_input: ids}
        if self.positions_input is not None:
            feeds[self.positions_input] = (cache.length + torch.arange(seq)).expand(batch, seq)
        extra = [v for v in self.graph.inputs if v not in feeds]
        if extra:
            raise ArtifactError(f"graph input(s) {', '.join(extra)} are neither token ids nor positions")
        return self.execute(feeds, cache, seq, last_only=last_only, mla_mode=mla_mode)[self.output]
