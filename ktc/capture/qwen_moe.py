"""Qwen2-MoE and Qwen3-MoE: GQA attention, softmax top-k routing, (Qwen2) a gated shared expert.

transformers' modeling_qwen2_moe / modeling_qwen3_moe, in short:
- attention: q/k/v/o projections; Qwen2 q/k/v biases (qkv_bias); Qwen3 optional biases on all
  four (attention_bias) and q_norm / k_norm RMSNorms over head_dim before rope;
  scaling = head_dim ** -0.5; rotate_half rope. Sliding windows: Qwen2 per layer_types,
  Qwen3 on every layer when use_sliding_window.
- sparse layers: layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
  (we read which module transformers built). Router: softmax over float32 logits, top-k,
  renormalised iff norm_topk_prob. Qwen2 adds shared_expert(x) * sigmoid(shared_expert_gate(x)).
- dense layers: SwiGLU MLP of intermediate_size.
"""

from __future__ import annotations

from torch import nn

from ktc.capture.export import check_act, mlp_spec_weights, routed_experts, router_attrs
from ktc.capture.importer import routed_expert_weight
from ktc.capture.ops import CaptureAttention, CaptureMoE

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


def _sliding_window(hf_config, layer: int):
    if hf_config.model_type == "qwen2_moe":
        types = getattr(hf_config, "layer_types", None)
        if types is not None and types[layer] == "sliding_attention":
            return int(hf_config.sliding_window)
        return None
    window = getattr(hf_config, "sliding_window", None)
    return int(window) if window else None


def attention(attn: nn.Module, layer: int, hf_config) -> CaptureAttention:
    return gqa_attention(attn, layer, hf_config, _sliding_window(hf_config, layer))


def gqa_attention(attn: nn.Module, layer: int, hf_config, sliding_window: int | None) -> CaptureAttention:
    """q/k/v/o (+ biases, + q_norm/k_norm) attention of the Llama family (Qwen, Mixtral)."""

    def bias(proj):
        return getattr(proj, "bias", None)

    weights = {
        "q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight, "o": attn.o_proj.weight,
        "q_bias": bias(attn.q_proj), "k_bias": bias(attn.k_proj), "v_bias": bias(attn.v_proj),
        "o_bias": bias(attn.o_proj),
    }
    attrs = {
        "kind": "gqa",
        "layer": layer,
        "num_heads": int(hf_config.num_attention_heads),
        "num_kv_heads": int(hf_config.num_key_value_heads),
        "head_dim": int(attn.head_dim),
        "scaling": float(attn.scaling),
        "sliding_window": sliding_window,
    }
    if hasattr(attn, "q_norm"):
        weights["q_norm"] = attn.q_norm.weight
        weights["k_norm"] = attn.k_norm.weight
        attrs["qk_norm_eps"] = float(attn.q_norm.variance_epsilon)
    return CaptureAttention(attn, weights, {"name": f"model.layers.{layer}.self_attn", "attrs": attrs})


def moe(block: nn.Module, layer: int, hf_config) -> CaptureMoE:
    check_act(hf_config)
    experts, gate = block.experts, block.gate
    router = router_attrs(experts.num_experts, gate.top_k, norm_topk_prob=gate.norm_topk_prob)
    expert_attrs, expert_weights = routed_experts(experts, gate.top_k)
    weights = {"router.weight": gate.weight, **expert_weights}
    shared = None
    if hasattr(block, "shared_expert"):
        weights.update(mlp_spec_weights(block.shared_expert, "shared.", block.shared_expert_gate.weight))
        shared = {"attrs": {"act": "silu"}}
    spec = {"name": f"model.layers.{layer}.mlp", "router": router, "experts": expert_attrs, "shared": shared}
    return CaptureMoE(block, weights, spec)


def weight(fqn: str, hf_config, keys):
    """(name, source) of the parameter `fqn` where it is not simply {"load": fqn}."""
    return routed_expert_weight(fqn, int(hf_config.num_experts), keys)
