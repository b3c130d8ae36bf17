"""Quantization: choose the stored format of every weight, per placement.

CPU-resident routed experts: int8 or int4, symmetric, group-wise along K (the group is the
largest of 128/64/32 that divides K of both expert matrices), or the checkpoint's own float
dtype with --quant none. Everything else keeps the checkpoint dtype (the CPU runtime computes
dense ops in float32).

GPU-resident weights are stored bfloat16 (small float32 tables such as rope's inv_freq stay
float32); GPU routed experts are bfloat16 (--gpu-quant none, the default), int4 weight-only
(w4a16, group-wise, symmetric; --gpu-quant int4, implied by --quant int4) or fp8
(--gpu-quant fp8: float8_e4m3fn values with a float32 scale per row and group of K, amax / 448;
Triton runs them on sm89+ NVIDIA GPUs and AMD: weight-only at decode, and at prefill on NVIDIA
w8a8, the activations rounded to e4m3 per token and group at run time). int8 experts exist only for the CPU kernels. A
placement rule with `format` sets one layer part's format.

GPU dense linears (--gpu-dense-quant int4 / fp8; default none = bf16): the weights of gqa attention's
q / k / v / o projections, of dense MLPs and shared experts (gate / up / gate_up / down) and of
linear nodes other than the lm_head become int4 w4a16 (symmetric, group-wise along K, the group
the largest of 128/64/32 dividing K; a weight whose K none divides stays bf16), packed like the
GPU experts (kernel selection marks them gpu_w4a16), or fp8 with the same groups (gpu_fp8 layout,
packed like fp8 GPU experts). Never quantized: embeddings, norms, router
and shared-expert-gate logits (router weight, mlp output_gate), rope tables, biases, the lm_head
(it decides the tokens), and MLA attention (its runtime reads kv_b per head, in place). A rule
with `format` int4 / none matching a GPU dense node's name sets that node's linears (int8 is a
CPU expert format: such a rule leaves dense nodes as the option says; ktc.rules has no fp8 format).
"""

from __future__ import annotations

from ktc.errors import KtcError
from ktc.ir import Graph, Node
from ktc.passes.manager import PassContext
from ktc.rules import Rule, parse_rules

FLOAT_FORMATS = ("float32", "bfloat16", "float16")
QUANT_FORMATS = ("int8", "int4")
GPU_DENSE_QUANT = ("none", "int4", "fp8")
GPU_WEIGHT_FORMATS = ("int4", "fp8")          # quantized formats the GPU kernels read
GROUP_SIZES = (128, 64, 32)
# weight roles that are dense linear [N, K] weights a w4a16 GEMM may run (per op; gqa attention only)
DENSE_LINEAR_ROLES = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "gate_up", "down"),
                      "linear": ("weight",)}


def expert_group_size(hidden_size: int, intermediate_size: int, wanted: int | None = None) -> int:
    """The quantization group of the expert matrices: `wanted` (--group-size) when it divides both K
    dims, else the largest group in (128, 64, 32) that does. Smaller groups are more accurate and a
    little slower (int8 on Gaussian weights: group 128 1.1e-2, group 32 0.94e-2 relative error)."""
    if wanted is not None:
        if wanted not in GROUP_SIZES:
            raise KtcError(f"--group-size {wanted} is not one of {', '.join(map(str, GROUP_SIZES))}")
        if hidden_size % wanted or intermediate_size % wanted:
            raise KtcError(f"--group-size {wanted} does not divide the experts' hidden size {hidden_size} and "
                           f"intermediate size {intermediate_size}: choose "
                           f"{expert_group_size(hidden_size, intermediate_size)} or leave it out")
        return wanted
    for g in (128, 64, 32):
        if hidden_size % g == 0 and intermediate_size % g == 0:
            return g
    raise KtcError(
        f"experts with hidden {hidden_size} and intermediate {intermediate_size} cannot be quantized "
        "group-wise (neither is a multiple of 32): use --quant none"
    )


def dense_group_size(k: int) -> int | None:
    """Largest group in (128, 64, 32) dividing K, None if none does (the weight stays bf16)."""
    return next((g for g in GROUP_SIZES if k % g == 0), None)


def check_gpu_dense_quant(value: str) -> None:
    if value not in GPU_DENSE_QUANT:
        raise KtcError(f"--gpu-dense-quant {value!r} is not one of {', '.join(GPU_DENSE_QUANT)}")


def _is_lm_head(graph: Graph, node: Node) -> bool:
    return node.op == "linear" and (node.name == "lm_head" or any(o in graph.outputs for o in node.outputs))


def _dense_linear_roles(graph: Graph, node: Node) -> tuple[str, ...]:
    if node.op == "attention" and node.attrs.get("kind") != "gqa":
        return ()
    if _is_lm_head(graph, node):
        return ()
    return tuple(r for r in DENSE_LINEAR_ROLES.get(node.op, ()) if r in node.weights)


def gpu_dense_quant_weights(graph: Graph, dense_quant: str, rules: list[Rule] | None = None,
                            assume_gpu: bool = False) -> dict[str, tuple[str, int]]:
    """Weight name -> (format, group size) of the GPU dense linear weights stored quantized, int4 w4a16
    or fp8 (see the module docstring). Nodes count as GPU-resident when placed on a non-CPU device, or
    all of them with `assume_gpu` (the placement pass's byte estimates before it places anything). A
    weight is quantized only if every use of it is such a linear role of a node choosing one format."""
    check_gpu_dense_quant(dense_quant)
    rules = rules or []
    chosen: dict[str, tuple[str, int]] = {}
    refused: set[str] = set()
    for node in graph.nodes:
        roles = _dense_linear_roles(graph, node)
        on_gpu = node.device not in (None, "cpu") or (assume_gpu and node.device is None)
        fmt = _dense_rule_format(rules, node) or dense_quant
        for role, name in node.weights.items():
            w = graph.weights[name]
            group = dense_group_size(int(w.shape[-1])) if len(w.shape) == 2 else None
            if (role in roles and on_gpu and fmt in GPU_WEIGHT_FORMATS and group is not None
                    and w.dtype in FLOAT_FORMATS and "values" not in w.source
                    and chosen.get(name, (fmt, group)) == (fmt, group)):
                chosen[name] = (fmt, group)
            else:
                refused.add(name)
    return {name: fg for name, fg in chosen.items() if name not in refused}


def gpu_dense_int4_weights(graph: Graph, dense_quant: str, rules: list[Rule] | None = None,
                           assume_gpu: bool = False) -> dict[str, int]:
    """Weight name -> group size of the GPU dense linear weights stored int4 w4a16."""
    return {name: g for name, (fmt, g) in gpu_dense_quant_weights(graph, dense_quant, rules, assume_gpu).items()
            if fmt == "int4"}


def _dense_rule_format(rules: list[Rule], node: Node) -> str | None:
    """int4 / fp8 / none from the first format rule matching a dense node (int8 rules are for CPU experts)."""
    for rule in rules:
        if rule.format in ("int4", "fp8", "none") and rule.device in (None, node.device) and rule.matches(node.name):
            return rule.format
    return None


def quantization(graph: Graph, ctx: PassContext) -> Graph:
    if ctx.quant not in ("none", *QUANT_FORMATS):
        raise KtcError(f"--quant {ctx.quant!r} is not one of none, int8, int4")
    check_gpu_dense_quant(ctx.gpu_dense_quant)
    graph = graph.copy()
    rules = parse_rules(ctx.options.get("placement_rules", []))
    for w in graph.weights.values():
        w.format = w.dtype
        if w.device not in (None, "cpu") and w.dtype in FLOAT_FORMATS and "values" not in w.source:
            w.format = "bfloat16"
    dense = gpu_dense_quant_weights(graph, ctx.gpu_dense_quant, rules)
    for name, (fmt, group) in dense.items():
        graph.weights[name].format = fmt
        graph.weights[name].group_size = group
    for node in graph.nodes:
        fmts = [dense[w][0] for w in node.weights.values() if w in dense]
        if node.op != "moe_experts" and fmts:
            node.format = fmts[0]
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
        group = expert_group_size(node.attrs["hidden_size"], node.attrs["intermediate_size"], ctx.group_size)
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
    if quant not in GPU_WEIGHT_FORMATS:
        raise KtcError(f"{node.name}: {quant} experts run only on the CPU; GPU experts are bf16 (--gpu-quant none), "
                       "int4 w4a16 (--gpu-quant int4) or fp8 (--gpu-quant fp8)")
    group = expert_group_size(node.attrs["hidden_size"], node.attrs["intermediate_size"], ctx.group_size)
    node.format = quant
    for w in weights:
        w.format = quant
        w.group_size = group
