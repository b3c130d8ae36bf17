"""Placement: decide the device of every node and weight.

Rules, in order: explicit overrides (regex on node names -> device, like KTransformers'
injection rules) win; on a CPU target everything is on the CPU; on a GPU target the
must-be-on-GPU part (everything but routed experts) must fit the budget, and what is left
is filled with the hottest routed experts (calibration counts, uniform without them).
GPU execution does not exist yet in the runtime, so a GPU target is refused for now.
"""

from __future__ import annotations

import re

from ktc.errors import KtcError
from ktc.ir import Graph
from ktc.passes.manager import PassContext

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


def weight_bytes(graph: Graph, names: set[str]) -> int:
    return int(sum(graph.weights[n].numel * BYTES.get(graph.weights[n].dtype, 4) for n in names))


def gpu_resident_bytes(graph: Graph) -> int:
    """Bytes that must be on the GPU on a GPU target: every weight not owned by moe_experts."""
    expert_weights = {w for n in graph.nodes_of("moe_experts") for w in n.weights.values()}
    return weight_bytes(graph, set(graph.weights) - expert_weights)


def placement(graph: Graph, ctx: PassContext) -> Graph:
    graph = graph.copy()
    rules = [(re.compile(pat), dev) for pat, dev in ctx.options.get("placement_rules", {}).items()]
    if ctx.target != "cpu":
        need = gpu_resident_bytes(graph)
        raise KtcError(
            f"--target {ctx.target}: GPU execution is not available in this ktc yet "
            f"(the GPU-resident part would need {need / 2**30:.2f} GiB); use --target cpu"
        )
    for node in graph.nodes:
        device = "cpu"
        for pat, dev in rules:
            if pat.search(node.name):
                device = dev
        if device != "cpu":
            raise KtcError(f"placement rule puts {node.name} on {device!r}, but --target cpu runs only on the CPU")
        node.device = device
        for w in node.weights.values():
            graph.weights[w].device = device
    return graph
