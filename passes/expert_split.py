"""Expert split: turn every "mixed" MoE layer (placement put some of its experts on the GPU and
the rest on the CPU) into two moe_experts nodes over disjoint expert subsets and an add.

    y = moe_experts(x, w, ids)   @mixed {gpu_experts=[...]}
becomes
    y.cpu = moe_experts(x, w, ids) @cpu  {experts=[cpu ids], num_experts=#cpu, num_global_experts=E}
    y.gpu = moe_experts(x, w, ids) @cuda {experts=[gpu ids], ...}
    ...                                  (nodes that do not need y: shared experts, ...)
    y = add(y.gpu, y.cpu)                @cuda, just before y's first user

The CPU node comes first so that the runtime can start the CPU experts before it launches the
GPU's; the add sits as late as possible so that everything that does not need the routed
experts' output (the shared experts) runs on the GPU while the CPU works. Each subset gets its
own weights: `<weight>.gpu` / `<weight>.cpu`, sources {"take": source, "index": ids}, so the
artifact stores each expert once, on the device that runs it.
"""

from __future__ import annotations

from ktc.errors import KtcError
from ktc.ir import Graph, Node, Value, Weight
from ktc.passes.manager import PassContext


def _subset_weight(graph: Graph, name: str, index: list[int], device: str, suffix: str) -> str:
    w = graph.weights[name]
    new = f"{name}.{suffix}"
    graph.weights[new] = Weight(name=new, shape=[len(index), *w.shape[1:]], dtype=w.dtype,
                                source={"take": w.source, "index": list(index)}, device=device)
    return new


def _part(graph: Graph, node: Node, experts: list[int], device: str, suffix: str) -> Node:
    out = node.outputs[0]
    value = graph.values[out]
    name = f"{out}.{suffix}"
    graph.values[name] = Value(name=name, shape=list(value.shape), dtype=value.dtype)
    attrs = dict(node.attrs)
    attrs.pop("gpu_experts", None)
    attrs.update(experts=list(experts), num_experts=len(experts), num_global_experts=int(node.attrs["num_experts"]))
    weights = {role: _subset_weight(graph, w, experts, device, suffix) for role, w in node.weights.items()}
    return Node(name=f"{node.name}.{suffix}", op="moe_experts", inputs=list(node.inputs), outputs=[name],
                weights=weights, attrs=attrs, device=device)


def expert_split(graph: Graph, ctx: PassContext) -> Graph:
    mixed = [n for n in graph.nodes if n.device == "mixed"]
    if not mixed:
        return graph
    graph = graph.copy()
    for name in [n.name for n in graph.nodes if n.device == "mixed"]:
        i, node = next((i, n) for i, n in enumerate(graph.nodes) if n.name == name)
        if node.op != "moe_experts":
            raise KtcError(f"{node.name}: only moe_experts nodes can be split between devices")
        e = int(node.attrs["num_experts"])
        gpu = sorted(int(x) for x in node.attrs["gpu_experts"])
        cpu = [x for x in range(e) if x not in set(gpu)]
        cpu_node = _part(graph, node, cpu, "cpu", "cpu")
        gpu_node = _part(graph, node, gpu, ctx.target, "gpu")
        out = node.outputs[0]
        combine = Node(name=f"{node.name}.combine", op="add", inputs=[gpu_node.outputs[0], cpu_node.outputs[0]],
                       outputs=[out], device=ctx.target)
        rest = graph.nodes[i + 1:]
        first_user = next((j for j, n in enumerate(rest) if out in n.inputs), len(rest))
        graph.nodes = [*graph.nodes[:i], cpu_node, gpu_node, *rest[:first_user], combine, *rest[first_user:]]
        used = {w for n in graph.nodes for w in n.weights.values()}
        for w in list(node.weights.values()):
            if w not in used:
                del graph.weights[w]
    return graph
