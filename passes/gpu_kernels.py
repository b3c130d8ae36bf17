"""Which Triton kernels (ktc.codegen.gpu) run a GPU-placed node, and with which configs.

Used by kernel_selection. Every GPU node gets `kernel` = "<family>.<launcher>" (what the
runtime calls) and attrs["gpu_config"] = {"decode": {...}, "prefill": {...}}: per kernel the
block sizes / warps / stages for a decode step (one token per sequence) and for a prefill
(GPU_PREFILL_TOKENS tokens), chosen by the family's own heuristics at this node's shapes.
"""

from __future__ import annotations

from typing import Any

from ktc.ir import Graph, Node

GPU_PREFILL_TOKENS = 2048
DECODE_CONTEXT = 4096          # the decode attention config assumes a cache of about this many tokens

GPU_KERNELS = {
    "embedding": "embedding.embedding",
    "rope": "rope.rope_tables",
    "rms_norm": "norm.rms_norm",
    "add_rms_norm": "norm.add_rms_norm",
    "add": "activation.add",
    "attention": "attention.gqa",
    "router": "router.router_topk",
    "moe_experts": "moe.fused_moe",
    "mlp": "mlp.swiglu",
    "linear": "matmul.linear",
}


def _shape(graph: Graph, node: Node, role: str) -> list[int]:
    return [int(d) for d in graph.weights[node.weights[role]].shape]


def _linear_config(graph: Graph, node: Node, role: str, m: int, n: int, k: int) -> dict[str, Any]:
    """The GEMM config of the weight in `role`: matmul.linear's, or linear_w4a16's / linear_fp8's for an
    int4 / fp8 weight."""
    from ktc.codegen.gpu import matmul

    fmt = graph.weights[node.weights[role]].format if role in node.weights else None
    if fmt == "int4":
        return matmul.default_config_w4a16(m, n, k)
    if fmt == "fp8":
        return matmul.default_config_fp8(m, n, k)
    return matmul.default_config(m, n, k)


def gpu_configs(graph: Graph, node: Node) -> dict[str, dict[str, Any]]:
    from ktc.codegen.gpu import attention, embedding, matmul, moe, norm, rope, router

    if node.op == "attention" and node.attrs.get("kind") == "mla":
        return mla_configs(graph, node)

    out: dict[str, dict[str, Any]] = {}
    for phase, m in (("decode", 1), ("prefill", GPU_PREFILL_TOKENS)):
        cfg: dict[str, Any] = {}
        if node.op in ("rms_norm", "add_rms_norm"):
            cfg["norm"] = norm.default_config(_shape(graph, node, "weight")[0])
        elif node.op == "embedding":
            cfg["embedding"] = embedding.default_config(_shape(graph, node, "weight")[1])
        elif node.op == "linear":
            n, k = _shape(graph, node, "weight")
            cfg["linear"] = _linear_config(graph, node, "weight", m, n, k)
        elif node.op == "router":
            e, h = _shape(graph, node, "weight")
            cfg["logits"] = matmul.default_config(m, e, h)
            if phase == "decode":
                cfg["fused"] = router.fused_config(e, h)
        elif node.op == "mlp":
            inter, h = _shape(graph, node, "down")[1], _shape(graph, node, "down")[0]
            cfg["gate_up"] = _linear_config(graph, node, "gate_up" if "gate_up" in node.weights else "gate", m,
                                            2 * inter, h)
            cfg["down"] = _linear_config(graph, node, "down", m, h, inter)
        elif node.op == "moe_experts":
            a = node.attrs
            group = graph.weights[node.weights["gate_up"]].group_size if node.format in ("int4", "fp8") else None
            cfg["moe"] = moe.default_config(m * int(a["top_k"]), int(a["hidden_size"]), int(a["intermediate_size"]),
                                            group)
        elif node.op == "attention":
            a = node.attrs
            h, hkv, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
            hidden = _shape(graph, node, "q")[1]
            cfg["qkv"] = _linear_config(graph, node, "q", m, (h + 2 * hkv) * d, hidden)
            cfg["o"] = _linear_config(graph, node, "o", m, hidden, h * d)
            cfg["rope"] = rope.default_config(d)
            if phase == "decode":
                cfg["attention"] = attention.decode_config(d, DECODE_CONTEXT)
            else:
                cfg["attention"] = attention.prefill_config(d)
        out[phase] = cfg
    return out


def mla_configs(graph: Graph, node: Node) -> dict[str, dict[str, Any]]:
    """Configs of an MLA attention node's launches (runtime/gpu/attention_mla.py): the fused input GEMM
    (qkv_a), q_a's norm and q_b (with q_lora), rope + cache write, the o GEMM; decode: the two per-head
    absorptions and the absorbed split-KV attention; prefill: the kv_b expansion and flash attention."""
    from ktc.codegen.gpu import matmul, mla, norm

    a = node.attrs
    h, r, dn, dr, dv = (int(a[k]) for k in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                             "v_head_dim"))
    hidden = _shape(graph, node, "kv_a")[1]
    q_lora = a.get("q_lora_rank")
    n_in = (h * (dn + dr) if q_lora is None else int(q_lora)) + r + dr
    out: dict[str, dict[str, Any]] = {}
    for phase, m in (("decode", 1), ("prefill", GPU_PREFILL_TOKENS)):
        cfg: dict[str, Any] = {"qkv_a": matmul.default_config(m, n_in, hidden),
                               "o": matmul.default_config(m, hidden, h * dv),
                               "rope": mla.rope_cache_config(r, dr),
                               "absorb_q": mla.head_matmul_config(m, r, dn),
                               "absorb_v": mla.head_matmul_config(m, dv, r)}
        if q_lora is not None:
            cfg["q_norm"] = norm.default_config(int(q_lora))
            cfg["q_b"] = matmul.default_config(m, h * (dn + dr), int(q_lora))
        if phase == "decode":
            cfg["mla_decode"] = mla.decode_config(h, r, DECODE_CONTEXT)
        else:
            cfg["kv_b"] = matmul.default_config(m, h * (dn + dv), r)
            cfg["mla_prefill"] = mla.prefill_config(dn, dr, dv)
        out[phase] = cfg
    return out


def select_gpu_kernel(graph: Graph, node: Node) -> None:
    node.kernel = GPU_KERNELS[node.op]
    if node.op == "attention" and node.attrs.get("kind") == "mla":
        node.kernel = "mla.attention"
    if node.op == "moe_experts" and node.format == "int4":
        node.kernel = "moe.fused_moe_w4a16"
    if node.op == "moe_experts" and node.format == "fp8":
        node.kernel = "moe.fused_moe_fp8"
    if node.op == "linear" and graph.weights[node.weights["weight"]].format == "int4":
        node.kernel = "matmul.linear_w4a16"
    if node.op == "linear" and graph.weights[node.weights["weight"]].format == "fp8":
        node.kernel = "matmul.linear_fp8"
    node.attrs["gpu_config"] = gpu_configs(graph, node)
