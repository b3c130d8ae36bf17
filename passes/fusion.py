"""Fusion: rewrite rules applied as data (pattern -> replacement), tinygrad style.

Rules:
- add_rms_norm: `s = add(a, b); y = rms_norm(s)` becomes `y, s = add_rms_norm(a, b)` (one pass
  over the residual stream instead of two; s stays available to later users).
- gate_up_concat: an mlp's separate gate and up weights become one [2I, H] weight, so one
  GEMM reads x once (the routed experts' gate_up is stacked this way by capture already).
- SiLU·mul and the weighted sum over a token's experts live inside the moe_experts kernel
  by construction, and router softmax/sigmoid + grouped top-k is one router op: nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ktc.ir import Graph, Node, Weight
from ktc.passes.manager import PassContext


@dataclass(frozen=True)
class Rule:
    name: str
    matches: Callable[[Graph, Node, dict[str, Node]], bool]
    rewrite: Callable[[Graph, Node, dict[str, Node]], None]   # keeps the producer map current


def _match_add_rms_norm(graph: Graph, node: Node, producers: dict[str, Node]) -> bool:
    if node.op != "rms_norm":
        return False
    producer = producers.get(node.inputs[0])
    return producer is not None and producer.op == "add"


def _rewrite_add_rms_norm(graph: Graph, node: Node, producers: dict[str, Node]) -> None:
    add = producers[node.inputs[0]]
    fused = Node(
        name=node.name, op="add_rms_norm", inputs=list(add.inputs), outputs=[node.outputs[0], add.outputs[0]],
        weights=dict(node.weights), attrs=dict(node.attrs), device=node.device,
    )
    i = graph.nodes.index(add)
    graph.nodes.remove(node)
    graph.nodes[i] = fused
    for o in fused.outputs:
        producers[o] = fused


def _match_gate_up(graph: Graph, node: Node, producers: dict[str, Node]) -> bool:
    return node.op == "mlp" and "gate" in node.weights and "up" in node.weights


def _rewrite_gate_up(graph: Graph, node: Node, producers: dict[str, Node]) -> None:
    gate, up = graph.weights[node.weights.pop("gate")], graph.weights[node.weights.pop("up")]
    name = gate.name.removesuffix("gate_proj.weight") + "gate_up_proj.weight" if gate.name.endswith(
        "gate_proj.weight") else gate.name + ".gate_up"
    graph.weights[name] = Weight(
        name=name, shape=[gate.shape[0] + up.shape[0], *gate.shape[1:]], dtype=gate.dtype,
        source={"concat": [gate.source, up.source], "dim": 0}, format=gate.format, device=gate.device,
        group_size=gate.group_size,   # int4 gate and up (same K, so the same group) stay int4 concatenated
    )
    node.weights["gate_up"] = name
    used = {w for n in graph.nodes for w in n.weights.values()}
    for w in (gate.name, up.name):
        if w not in used:
            del graph.weights[w]


RULES: list[Rule] = [
    Rule("add_rms_norm", _match_add_rms_norm, _rewrite_add_rms_norm),
    Rule("gate_up_concat", _match_gate_up, _rewrite_gate_up),
]


def fusion(graph: Graph, ctx: PassContext) -> Graph:
    graph = graph.copy()
    enabled = ctx.options.get("fusion_rules")
    for rule in RULES:
        if enabled is not None and rule.name not in enabled:
            continue
        producers = graph.producers()
        for node in list(graph.nodes):   # one sweep: no rule creates a new match for itself
            if rule.matches(graph, node, producers):
                rule.rewrite(graph, node, producers)
    return graph
