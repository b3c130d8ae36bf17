"""Run a list of passes over a graph, validating and optionally dumping the IR after each.

Like TVM's PassContext instruments: `after_pass(name, graph)` callbacks see the IR after
every pass (the compiler uses one to write dumps when --dump-ir is given).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ktc.ir import Graph


@dataclass
class PassContext:
    """Options every pass may read: target, GPU budget, quantization choice, overrides."""

    target: str = "cpu"                 # "cpu" | "cuda"
    cpu_target: str = "x86-avx2"        # a ktc.targets name
    quant: str = "int8"                 # "none" | "int8" | "int4": routed experts on the CPU
    gpu_memory_bytes: int = 0
    gpu_quant: str | None = None        # routed experts on the GPU: "none" (bf16) | "int4" | "fp8"; None: see below
    gpu_dense_quant: str = "none"       # GPU dense linears (attention, dense MLP, shared experts): none | int4 | fp8
    group_size: int | None = None       # routed experts' quantization group (32 | 64 | 128); None: the largest dividing
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu_expert_quant(self) -> str:
        """The GPU experts' format: gpu_quant, else quant when the GPU has kernels for it, else bf16."""
        if self.gpu_quant is not None:
            return self.gpu_quant
        return self.quant if self.quant in ("none", "int4") else "none"


class Pass(Protocol):
    __name__: str

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph: ...


Instrument = Callable[[str, Graph], None]


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


class PassManager:
    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        for instrument in self.instruments:
            instrument("input", graph)
        for p in self.passes:
            start = time.perf_counter()
            before = len(graph.nodes)
            graph = p(graph, ctx)
            graph.validate()
            self.records.append(PassRecord(p.__name__, time.perf_counter() - start, before, len(graph.nodes)))
            for instrument in self.instruments:
                instrument(p.__name__, graph)
        return graph
