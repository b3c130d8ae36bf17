"""Quantization: choose the stored format of every weight, per placement.

CPU-resident routed experts: int8 or int4, symmetric, group-wise along K (the group is the
largest of 128/64/32 that divides K of both expert matrices), or the checkpoint's own float
dtype with --quant none. Everything else keeps the checkpoint dtype (the CPU runtime computes
dense ops in float32).

GPU-resident weights are stored bfloat16 (small float32 tables such as rope's inv_freq stay
float32); GPU routed experts are bfloat16 (--gpu-quant none, the default) or int4 weight-only
(w4a16, group-wise, symmetric; --gpu-quant int4, implied by --quant int4). int8 experts exist
only for the CPU kernels. A placement rule with `format` sets one layer part's format.
"""

from __future__ import annotations

from ktc.errors import KtcError
from ktc.ir import Graph
from ktc.passes.manager import PassContext
from ktc.rules import parse_rules

FLOAT_FORMATS = ("float32", "bfloat16", "float16")
QUANT_FORMATS = ("int8", "int4")


def expert_group_size(hidden_size: int, intermediate_size: int) -> int:
    """Largest group in (128, 64, 32) dividing both K dims of the expert matrices."""
    for g in (128, 64, 32):
        if hidden_size % g == 0 and intermediate_size % g == 0:
            return g
    raise KtcError(
        f"experts with hidden {hidden_size} and intermediate {intermediate_size} cannot be quantized "
        "group-wise (neither is a multiple of 32): use --quant none"
    )


def quantization(graph: Graph, ctx: PassContext) -> Graph:
    if ctx.quant not in ("none", *QUANT_FORMATS):
        raise KtcError(f"--quant {ctx.quant!r} is not one of none, int8, int4")
    graph = graph.copy()
    rules = parse_rules(ctx.options.get("placement_rules", []))
    for w in graph.weights.values():
        w.format = w.dtype
        if w.device not in (None, "cpu") and w.dtype in FLOAT_FORMATS and "values" not in w.source:
            w.format = "bfloat16"
    for node in graph.nodes_of("moe_experts"):
        if node.device not in (None, "cpu"):
            _gpu_experts(graph, node, ctx, rules)
            continue
        weights = [graph.weights[node.weights[r]] for r in ("gate_up", "down")]
        quant = _rule_format(rules, node) or ctx.quant
        if quant == "none":
            fmt = weights[0].dtype
            if fmt not in FLOAT_FORMATS or any(w.dtype != fmt for w in weights):
                raise KtcError(f"{node.name}: expert weights in {weights[0].dtype} cannot run unquantized on the "
                               "CPU: use --quant int8 or int4")
            node.format = fmt
            continue
        group = expert_group_size(node.attrs["hidden_size"], node.attrs["intermediate_size"])
        node.format = quant
        for w in weights:
            w.format = quant
            w.group_size = group
    return graph


def _rule_format(rules, node) -> str | None:
    """The format a rule gives this node's experts: rules match the node's name or its layer's
    (before expert_split), and a rule that also names a device applies only to that device's part."""
    base = node.name.removesuffix(".cpu").removesuffix(".gpu")
    for rule in rules:
        if rule.format is not None and (rule.device is None or rule.device == node.device) and (
                rule.matches(node.name) or rule.matches(base)):
            return rule.format
    return None


def _gpu_experts(graph: Graph, node, ctx: PassContext, rules) -> None:
    weights = [graph.weights[node.weights[r]] for r in ("gate_up", "down")]
    quant = _rule_format(rules, node) or ctx.gpu_expert_quant
    if quant == "none":
        node.format = "bfloat16"
        return
    if quant != "int4":
        raise KtcError(f"{node.name}: {quant} experts run only on the CPU; GPU experts are bf16 (--gpu-quant none) "
                       "or int4 w4a16 (--gpu-quant int4)")
    group = expert_group_size(node.attrs["hidden_size"], node.attrs["intermediate_size"])
    node.format = "int4"
    for w in weights:
        w.format = "int4"
        w.group_size = group
