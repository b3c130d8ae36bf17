"""DeepSeek-V2 / V3: MLA attention, routed + shared experts, first_k_dense_replace dense layers.

transformers' modeling_deepseek_v2 / modeling_deepseek_v3, in short:
- MLA: q = q_proj(x) (q_lora_rank None, e.g. V2-Lite) or q_b(rms(q_a(x))); kv_a_proj_with_mqa
  gives [latent (kv_lora_rank) | k_rope (qk_rope_head_dim)], latent -> kv_a_layernorm -> kv_b
  -> per-head [k_nope | v]. The q_a / kv_a norms are built with the RMSNorm default eps
  (1e-6), not rms_norm_eps. scaling = qk_head_dim ** -0.5 times mscale**2 under yarn
  (the module's own `scaling`). Rotary: V2 multiplies complex numbers made of adjacent
  pairs (x0, x1), (x2, x3)...; V3 does the same when rope_interleave (default) and
  rotate_half otherwise.
- V2 router: softmax of float32 logits, topk_method "greedy" or "group_limited_greedy"
  (groups scored by their max), no renormalisation (norm_topk_prob is ignored by the
  module), times routed_scaling_factor.
- V3 router: sigmoid, e_score_correction_bias added only to choose ("noaux_tc": groups
  scored by the sum of their top-2 biased scores), weights from unbiased scores,
  renormalised iff norm_topk_prob, times routed_scaling_factor.
- shared_experts: a SwiGLU MLP of moe_intermediate_size * n_shared_experts added to the
  routed output. Layers < first_k_dense_replace are dense MLPs of intermediate_size.
"""

from __future__ import annotations

from torch import nn

from ktc.capture.export import check_act, mlp_spec_weights, routed_experts, router_attrs
from ktc.capture.importer import routed_expert_weight
from ktc.capture.ops import CaptureAttention, CaptureMoE
from ktc.errors import KtcError

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def _eps(norm: nn.Module) -> float:
    return float(norm.variance_epsilon)


def attention(attn: nn.Module, layer: int, hf_config) -> CaptureAttention:
    def bias(proj):
        return getattr(proj, "bias", None)

    if hf_config.model_type == "deepseek_v2":
        interleave = True                       # complex rotary on adjacent pairs
    else:
        interleave = bool(getattr(hf_config, "rope_interleave", True))
    norm_eps = _eps(attn.kv_a_layernorm)
    if attn.q_lora_rank is None:
        weights = {"q": attn.q_proj.weight}
    else:
        if _eps(attn.q_a_layernorm) != norm_eps:
            raise KtcError(f"layer {layer}: q_a_layernorm and kv_a_layernorm have different eps; "
                           "ktc's MLA has one norm_eps")
        weights = {"q_a": attn.q_a_proj.weight, "q_a_norm": attn.q_a_layernorm.weight, "q_b": attn.q_b_proj.weight,
                   "q_a_bias": bias(attn.q_a_proj)}
        if bias(attn.q_b_proj) is not None:
            raise KtcError(f"layer {layer}: q_b_proj has a bias, which ktc's MLA does not take")
    weights.update({
        "kv_a": attn.kv_a_proj_with_mqa.weight, "kv_a_norm": attn.kv_a_layernorm.weight, "kv_b": attn.kv_b_proj.weight,
        "o": attn.o_proj.weight, "kv_a_bias": bias(attn.kv_a_proj_with_mqa), "o_bias": bias(attn.o_proj),
    })
    if (attn.q_lora_rank is None and bias(attn.q_proj) is not None) or bias(attn.kv_b_proj) is not None:
        raise KtcError(f"layer {layer}: q_proj / kv_b_proj has a bias, which ktc's MLA does not take")
    attrs = {
        "kind": "mla",
        "layer": layer,
        "num_heads": int(attn.num_heads),
        "q_lora_rank": None if attn.q_lora_rank is None else int(attn.q_lora_rank),
        "kv_lora_rank": int(attn.kv_lora_rank),
        "qk_nope_head_dim": int(attn.qk_nope_head_dim),
        "qk_rope_head_dim": int(attn.qk_rope_head_dim),
        "v_head_dim": int(attn.v_head_dim),
        "scaling": float(attn.scaling),
        "rope_interleave": interleave,
        "norm_eps": norm_eps,
    }
    return CaptureAttention(attn, weights, {"name": f"model.layers.{layer}.self_attn", "attrs": attrs})


def moe(block: nn.Module, layer: int, hf_config) -> CaptureMoE:
    check_act(hf_config)
    experts, gate = block.experts, block.gate
    e = int(experts.num_experts)
    n_group = int(getattr(gate, "num_group", None) or 1)
    topk_group = int(getattr(gate, "topk_group", None) or 1)
    weights = {"router.weight": gate.weight}
    if hf_config.model_type == "deepseek_v2":
        method = gate.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise KtcError(f"topk_method {method!r} is not supported for deepseek_v2: "
                           "use 'greedy' or 'group_limited_greedy'")
        if method == "greedy":
            n_group, topk_group = 1, 1
        scoring, norm = "softmax", False
    else:
        method, scoring, norm = "noaux_tc", "sigmoid", bool(gate.norm_topk_prob)
        weights["router.bias"] = gate.e_score_correction_bias
    if e % n_group or topk_group > n_group:
        raise KtcError(f"n_routed_experts {e}, n_group {n_group}, topk_group {topk_group}: the experts must split "
                       "into n_group equal groups and topk_group <= n_group")
    router = router_attrs(e, gate.top_k, norm, scoring=scoring, topk_method=method, n_group=n_group,
                          topk_group=topk_group, routed_scaling_factor=gate.routed_scaling_factor)
    expert_attrs, expert_weights = routed_experts(experts, gate.top_k)
    weights.update(expert_weights)
    shared = None
    if getattr(hf_config, "n_shared_experts", 0):
        mlp = block.shared_experts
        if any(getattr(getattr(mlp, p), "bias", None) is not None for p in ("gate_proj", "up_proj", "down_proj")):
            raise KtcError("shared_experts have biases (mlp_bias): ktc's mlp op has none")
        weights.update(mlp_spec_weights(mlp, "shared."))
        shared = {"attrs": {"act": "silu"}}
    spec = {"name": f"model.layers.{layer}.mlp", "router": router, "experts": expert_attrs, "shared": shared}
    return CaptureMoE(block, weights, spec)


def weight(fqn: str, hf_config, keys):
    """(name, source) of the parameter `fqn` where it is not simply {"load": fqn}."""
    return routed_expert_weight(fqn, int(hf_config.n_routed_experts), keys)
