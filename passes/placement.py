"""Placement: decide the device of every node and weight.

Rules, in order: explicit overrides (regex on node names -> device, like KTransformers'
injection rules) win; on a CPU target everything is on the CPU. On a GPU target (cuda) the
whole model goes on the GPU when its GPU-stored weights fit the --gpu-memory budget (no budget:
all of the GPU); otherwise the compile is refused with the size it needs. Splitting routed
experts between the GPU and the CPU (the heterogeneous mode) is not implemented yet.
"""

from __future__ import annotations

import re

from ktc.errors import KtcError
from ktc.ir import Graph
from ktc.passes.manager import PassContext

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
GPU_FLOAT_BYTES = 2          # GPU weights are stored bf16 (quantization pass)


def weight_bytes(graph: Graph, names: set[str]) -> int:
    return int(sum(graph.weights[n].numel * BYTES.get(graph.weights[n].dtype, 4) for n in names))


def gpu_resident_bytes(graph: Graph) -> int:
    """Bytes that must be on the GPU on a GPU target: every weight not owned by moe_experts."""
    expert_weights = {w for n in graph.nodes_of("moe_experts") for w in n.weights.values()}
    return weight_bytes(graph, set(graph.weights) - expert_weights)


def gpu_model_bytes(graph: Graph, quant: str) -> int:
    """Bytes of every weight as the GPU stores it: bf16, or int4 + a float32 scale per 32..128 values
    for the routed experts with --quant int4 (counted at group 128's overhead, 4 bytes per 128)."""
    expert_weights = {w for n in graph.nodes_of("moe_experts") for w in n.weights.values()}
    total = 0.0
    for name, w in graph.weights.items():
        if name in expert_weights and quant == "int4":
            total += w.numel * (0.5 + 4 / 128)
        else:
            total += w.numel * (GPU_FLOAT_BYTES if w.dtype in ("float32", "bfloat16", "float16") else
                                BYTES.get(w.dtype, 4))
    return int(total)


def _gpu_placement(graph: Graph, ctx: PassContext, rules) -> None:
    mla = [n.name for n in graph.nodes_of("attention") if n.attrs.get("kind") == "mla"]
    if mla:
        raise KtcError(f"--target {ctx.target}: MLA attention ({mla[0]}, DeepSeek-V2/V3) has no GPU kernels in this "
                       "ktc yet; use --target cpu")
    need = gpu_model_bytes(graph, ctx.quant)
    budget = ctx.gpu_memory_bytes
    if budget and need > budget:
        raise KtcError(f"--target {ctx.target}: the model needs {need / 2**30:.2f} GiB of GPU memory for its weights "
                       f"(bf16{', int4 experts' if ctx.quant == 'int4' else ''}), more than --gpu-memory "
                       f"{budget / 2**30:.2f} GiB; CPU-resident experts on a GPU target are not supported yet")
    for node in graph.nodes:
        for pat, dev in rules:
            if pat.search(node.name) and dev != ctx.target:
                raise KtcError(f"placement rule puts {node.name} on {dev!r}, but --target {ctx.target} runs the whole "
                               f"model on the GPU")
        node.device = ctx.target
        for w in node.weights.values():
            graph.weights[w].device = ctx.target


def placement(graph: Graph, ctx: PassContext) -> Graph:
    graph = graph.copy()
    rules = [(re.compile(pat), dev) for pat, dev in ctx.options.get("placement_rules", {}).items()]
    if ctx.target != "cpu":
        _gpu_placement(graph, ctx, rules)
        return graph
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
