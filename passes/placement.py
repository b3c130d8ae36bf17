"""Placement: decide the device of every node, and on a GPU target which routed experts go where.

--target cpu: everything on the CPU.

--target cuda: attention, dense layers, shared experts, routers, norms, embeddings and lm_head
go on the GPU (they must fit, with the KV cache for --max-context and a fixed reserve, or the
compile is refused with the size needed; they are counted as the quantization pass stores them:
bf16, or packed int4 / fp8 values + scales for the dense linears --gpu-dense-quant int4 / fp8
quantizes, which leaves that much more room for experts). With int8 / int4 CPU experts the budget
also keeps a staging buffer for one layer's CPU experts, which long prefills stream to the GPU
(runtime/gpu/offload.py).
Routed experts fill what is left of --gpu-memory, hottest first; the rest stay on the CPU. No
budget: every expert on the GPU.

Which experts are hottest comes from calibration (ctx.options["calibration"]: {layer index:
activation counts per expert}, from `ktc calibrate`); without it every expert is equally hot.
Each MoE layer gets the same number of GPU experts (within one): every layer serves exactly
top_k slots per token, so equal counts keep the CPU share of every layer (and so its CPU time)
equal, and the CPU kernels come in at most two shapes; calibration decides which experts of a
layer those are. Rules (ktc.rules, ctx.options["placement_rules"]) override everything: a rule
matching "<layer node>.<expert id>" or the layer node's name pins experts to a device (pinned
GPU experts count against the budget first); only routed experts can be moved to the CPU.

What the pass writes: node.device on every node, and weights' devices; a MoE node whose experts
ended up on both devices gets device "mixed" and attrs["gpu_experts"] (the expert_split pass
turns it into a GPU node and a CPU node); attrs["layer"] and, with calibration,
attrs["expert_load"] on every MoE node; graph.config["placement"] with the byte accounting.
"""

from __future__ import annotations

import re

from ktc.errors import KtcError
from ktc.ir import Graph, Node
from ktc.passes.manager import PassContext
from ktc.rules import Rule, first_match, parse_rules

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
GPU_FLOAT_BYTES = 2          # GPU weights are stored bf16 (quantization pass)
GPU_RESERVE_BYTES = 512 * 2**20   # activations, the decode graph's buffers, the MoE sort scratch
DEFAULT_MAX_CONTEXT = 4096
_LAYER = re.compile(r"layers\.(\d+)\.")


def weight_bytes(graph: Graph, names: set[str]) -> int:
    return int(sum(graph.weights[n].numel * BYTES.get(graph.weights[n].dtype, 4) for n in names))


def _expert_weights(graph: Graph) -> set[str]:
    return {w for n in graph.nodes_of("moe_experts") for w in n.weights.values()}


def gpu_resident_bytes(graph: Graph) -> int:
    """Bytes that must be on the GPU on a GPU target: every weight not owned by moe_experts."""
    return weight_bytes(graph, set(graph.weights) - _expert_weights(graph))


def int4_bytes(numel: int, group: int) -> float:
    """Bytes of a w4a16 weight: half a byte a value and a float32 scale per group."""
    return numel * 0.5 + numel // group * 4


def fp8_bytes(numel: int, group: int) -> float:
    """Bytes of an fp8 weight: a byte a value and a float32 scale per group."""
    return numel + numel // group * 4


def _gpu_dense_bytes(graph: Graph, int4: dict[str, int] | None = None,
                     quantized: dict[str, tuple[str, int]] | None = None) -> int:
    """The must-be-on-GPU weights as the GPU stores them: bf16 (float32 tables stay float32), and the
    weights in `int4` (name -> group size) or `quantized` (name -> (int4 | fp8, group size), what
    --gpu-dense-quant quantizes) packed, values and scales."""
    packed = {**{n: ("int4", g) for n, g in (int4 or {}).items()}, **(quantized or {})}
    total = 0.0
    for name in set(graph.weights) - _expert_weights(graph):
        w = graph.weights[name]
        if name in packed:
            fmt, group = packed[name]
            total += fp8_bytes(w.numel, group) if fmt == "fp8" else int4_bytes(w.numel, group)
            continue
        total += w.numel * (GPU_FLOAT_BYTES if w.dtype in ("float32", "bfloat16", "float16") else
                            BYTES.get(w.dtype, 4))
    return int(total)


def _dense_quantized(graph: Graph, dense_quant: str, rules: list[Rule] | None = None,
                     assume_gpu: bool = False) -> dict[str, tuple[str, int]]:
    """The dense weights the quantization pass will store int4 / fp8 (name -> (format, group)), for byte
    accounting."""
    from ktc.passes.quantization import gpu_dense_quant_weights

    return gpu_dense_quant_weights(graph, dense_quant, rules, assume_gpu) if dense_quant != "none" or rules else {}


def expert_gpu_bytes(node: Node, quant: str, group: int | None = None) -> float:
    """Bytes one routed expert of `node` takes on the GPU: bf16, or int4 (half a byte a value) / fp8
    (a byte a value) + a float32 scale per group (counted at group 128's overhead, 4 bytes per 128
    values, unless --group-size names the group) with --gpu-quant int4 / fp8."""
    a = node.attrs
    numel = 3 * int(a["hidden_size"]) * int(a["intermediate_size"])
    scales = 4 / (group or 128)
    per_value = {"int4": 0.5 + scales, "fp8": 1 + scales}.get(quant, GPU_FLOAT_BYTES)
    return numel * per_value


def gpu_model_bytes(graph: Graph, quant: str, dense_quant: str = "none") -> int:
    """Bytes of every weight as the GPU stores it with every expert on the GPU (experts in `quant`,
    dense linears in `dense_quant`: see --gpu-dense-quant)."""
    experts = sum(expert_gpu_bytes(n, quant) * int(n.attrs["num_experts"]) for n in graph.nodes_of("moe_experts"))
    return int(_gpu_dense_bytes(graph, quantized=_dense_quantized(graph, dense_quant, assume_gpu=True)) + experts)


def kv_cache_bytes(graph: Graph, max_context: int, batch: int = 1) -> int:
    """bf16 KV cache of every attention layer for `batch` sequences of `max_context` tokens."""
    per_token = 0
    for n in graph.nodes_of("attention"):
        a = n.attrs
        if a.get("kind") == "mla":
            per_token += (int(a["kv_lora_rank"]) + int(a["qk_rope_head_dim"])) * 2
        else:
            per_token += 2 * int(a["num_kv_heads"]) * int(a["head_dim"]) * 2
    return per_token * max_context * batch


def budget_for_expert_share(graph: Graph, share: float) -> int:
    """A --gpu-memory (bytes) that holds the must-be-on-GPU part (bf16), the KV cache for the default
    context, the reserve and `share` of the routed experts in bf16: how tests and benchmarks make
    a plan with about that share of experts on the GPU (int8 CPU experts' stream buffer not counted)."""
    experts = sum(expert_gpu_bytes(n, "none") * int(n.attrs["num_experts"]) for n in graph.nodes_of("moe_experts"))
    context = min(DEFAULT_MAX_CONTEXT, int(graph.config.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT))
    return int(gpu_model_bytes(graph, "none") - experts + kv_cache_bytes(graph, context) + GPU_RESERVE_BYTES
               + experts * share)


def layer_index(node: Node, fallback: int) -> int:
    m = _LAYER.search(node.name)
    return int(m.group(1)) if m else fallback


def _annotate_layers(graph: Graph, ctx: PassContext) -> None:
    calibration = ctx.options.get("calibration") or {}
    for i, node in enumerate(graph.nodes_of("moe_experts")):
        layer = layer_index(node, i)
        node.attrs["layer"] = layer
        counts = calibration.get(layer, calibration.get(str(layer)))
        if counts is None:
            continue
        e = int(node.attrs["num_experts"])
        if len(counts) != e:
            raise KtcError(f"the calibration has {len(counts)} experts for layer {layer}, the model {e}: "
                           f"calibrate this model again")
        total = float(sum(counts))
        node.attrs["expert_load"] = [float(c) / total if total else 1.0 / e for c in counts]


def _set_device(graph: Graph, node: Node, device: str) -> None:
    node.device = device
    for w in node.weights.values():
        graph.weights[w].device = device


def _cpu_placement(graph: Graph, rules) -> None:
    for node in graph.nodes:
        names = [node.name] + ([f"{node.name}.{e}" for e in range(int(node.attrs["num_experts"]))]
                               if node.op == "moe_experts" else [])
        device = first_match(rules, names, "device")
        if device not in (None, "cpu"):
            raise KtcError(f"placement rule puts {node.name} on {device!r}, but --target cpu runs only on the CPU")
        _set_device(graph, node, "cpu")


def _gpu_placement(graph: Graph, ctx: PassContext, rules) -> None:
    gpu_quant = ctx.gpu_expert_quant
    for node in graph.nodes:
        if node.op != "moe_experts":
            device = first_match(rules, [node.name], "device")
            if device not in (None, ctx.target):
                raise KtcError(f"placement rule puts {node.name} on {device!r}, but with --target {ctx.target} only "
                               f"routed experts can run on the CPU")
            _set_device(graph, node, ctx.target)

    moe = graph.nodes_of("moe_experts")
    pinned: dict[str, dict[int, str]] = {}
    for node in moe:
        pins = {}
        for e in range(int(node.attrs["num_experts"])):
            device = first_match(rules, [f"{node.name}.{e}", node.name], "device")
            if device is not None:
                pins[e] = device
        pinned[node.name] = pins

    max_context = int(ctx.options.get("max_context") or min(DEFAULT_MAX_CONTEXT, int(
        graph.config.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT)))
    dense = _gpu_dense_bytes(graph, quantized=_dense_quantized(graph, ctx.gpu_dense_quant, rules))
    kv = kv_cache_bytes(graph, max_context)
    budget = ctx.gpu_memory_bytes
    gpu_sets: dict[str, set[int]] = {}
    if not budget:
        for node in moe:
            gpu_sets[node.name] = {e for e in range(int(node.attrs["num_experts"]))
                                   if pinned[node.name].get(e, ctx.target) == ctx.target}
        used = dense + sum(expert_gpu_bytes(n, gpu_quant, ctx.group_size) * len(gpu_sets[n.name]) for n in moe)
        stream = 0
    else:
        fixed = dense + kv + GPU_RESERVE_BYTES
        forced = sum(expert_gpu_bytes(n, gpu_quant, ctx.group_size)
                     * sum(1 for d in pinned[n.name].values() if d == ctx.target) for n in moe)
        if fixed + forced > budget:
            linears = "bf16" if ctx.gpu_dense_quant == "none" else f"with {ctx.gpu_dense_quant} linears"
            raise KtcError(
                f"--target {ctx.target}: the GPU part needs {(fixed + forced) / 2**30:.2f} GiB (attention, dense "
                f"layers, embeddings and lm_head {dense / 2**30:.2f} GiB "
                f"{linears}, KV cache for {max_context} "
                f"tokens {kv / 2**30:.2f} GiB, reserve {GPU_RESERVE_BYTES / 2**30:.2f} GiB"
                + (f", experts pinned by rules {forced / 2**30:.2f} GiB" if forced else "")
                + f"), more than --gpu-memory {budget / 2**30:.2f} GiB: raise --gpu-memory or lower --max-context")
        # int8 / int4 CPU experts of one layer are streamed to the GPU for long prefills: the budget keeps
        # a staging buffer for the largest CPU share of a layer, which shrinks as experts go to the GPU
        streamed = ctx.quant if ctx.quant in ("int8", "int4") else None
        gpu_sets, stream, used = _fill(moe, pinned, gpu_quant, fixed, budget, ctx.target, streamed,
                                       ctx.group_size)
        if used > budget:     # not even the smallest buffer fits: no streaming (the runtime reads stream 0)
            gpu_sets, stream, used = _fill(moe, pinned, gpu_quant, fixed, budget, ctx.target, None,
                                           ctx.group_size)
    n_gpu = n_cpu = 0
    for node in moe:
        e = int(node.attrs["num_experts"])
        gpu = sorted(gpu_sets[node.name])
        n_gpu += len(gpu)
        n_cpu += e - len(gpu)
        if len(gpu) == e:
            _set_device(graph, node, ctx.target)
        elif not gpu:
            _set_device(graph, node, "cpu")
        else:
            _set_device(graph, node, "mixed")
            node.attrs["gpu_experts"] = gpu
    graph.config["placement"] = {
        "gpu_memory_budget": budget, "gpu_bytes_planned": int(used), "dense_gpu_bytes": int(dense),
        "kv_cache_bytes": int(kv) if budget else 0, "reserve_bytes": GPU_RESERVE_BYTES if budget else 0,
        "stream_buffer_bytes": int(stream) if budget else 0,
        "max_context": max_context, "gpu_experts": n_gpu, "cpu_experts": n_cpu, "gpu_expert_format": gpu_quant,
        "gpu_dense_format": ctx.gpu_dense_quant,
        "calibrated": bool(ctx.options.get("calibration")),
    }


def _fill(moe: list[Node], pinned: dict[str, dict[int, str]], gpu_quant: str, fixed: float, budget: int,
          target: str, streamed: str | None, group: int | None = None) -> tuple[dict[str, set[int]], int, float]:
    """Pinned GPU experts, then one more free expert per layer per round (hottest first, ties:
    lower id) while fixed + GPU experts + the stream buffer (streamed: the largest CPU share of a
    layer in that CPU format) fit the budget. -> (GPU experts per node, stream buffer bytes, bytes used)."""
    gpu_sets = {n.name: {e for e, d in pinned[n.name].items() if d == target} for n in moe}
    cpu_left = {n.name: int(n.attrs["num_experts"]) - len(gpu_sets[n.name]) for n in moe}
    per_cpu = {n.name: expert_cpu_bytes(n, streamed, group) if streamed else 0 for n in moe}

    def stream() -> int:
        return max((per_cpu[n.name] * cpu_left[n.name] for n in moe), default=0)

    experts = sum(expert_gpu_bytes(n, gpu_quant, group) * len(gpu_sets[n.name]) for n in moe)
    queues = {}
    for node in moe:
        load = node.attrs.get("expert_load")
        free = [e for e in range(int(node.attrs["num_experts"])) if e not in pinned[node.name]]
        queues[node.name] = sorted(free, key=lambda e, ld=load: (-(ld[e] if ld else 0.0), e))
    progress = True
    while progress:
        progress = False
        for node in moe:
            q = queues[node.name]
            if not q:
                continue
            cost = expert_gpu_bytes(node, gpu_quant, group)
            cpu_left[node.name] -= 1
            if fixed + experts + cost + stream() <= budget:
                gpu_sets[node.name].add(q.pop(0))
                experts += cost
                progress = True
            else:
                cpu_left[node.name] += 1
    return gpu_sets, stream(), fixed + experts + stream()


def expert_cpu_int8_bytes(node: Node) -> int:
    """Bytes of one routed expert in the CPU kernels' int8 layout (codes, a float32 scale per group,
    a float32 compensation per row): what streaming it to the GPU copies."""
    return expert_cpu_bytes(node, "int8")


def expert_cpu_bytes(node: Node, fmt: str, group: int | None = None) -> int:
    """Bytes of one routed expert in the CPU kernels' int8 or int4 layout (codes: 1 or 1/2 byte a
    value, a float32 scale per group, a float32 compensation per row); group: --group-size, if given."""
    from ktc.passes.quantization import expert_group_size

    h, i = int(node.attrs["hidden_size"]), int(node.attrs["intermediate_size"])
    try:
        group = expert_group_size(h, i, group)
    except KtcError:
        return 0
    return 3 * h * i // (2 if fmt == "int4" else 1) + 3 * h * i // group * 4 + (2 * i + h) * 4


def placement(graph: Graph, ctx: PassContext) -> Graph:
    graph = graph.copy()
    rules = parse_rules(ctx.options.get("placement_rules", []))
    _annotate_layers(graph, ctx)
    if ctx.target == "cpu":
        _cpu_placement(graph, rules)
    else:
        _gpu_placement(graph, ctx, rules)
    return graph
