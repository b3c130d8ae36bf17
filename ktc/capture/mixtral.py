"""Mixtral: GQA attention (optional sliding window on every layer), softmax top-k routing
always renormalised over the k chosen, no shared expert, every layer sparse.

Checkpoints keep the original layout: model.layers.L.block_sparse_moe.gate.weight (router)
and block_sparse_moe.experts.e.w1 (gate) / w3 (up) / w2 (down); transformers renames them
to mlp.gate / mlp.experts.gate_up_proj / down_proj when it loads. Both layouts are read.
"""

from __future__ import annotations

import re

from torch import nn

from ktc.capture.export import check_act, routed_experts, router_attrs
from ktc.capture.importer import routed_expert_weight
from ktc.capture.ops import CaptureAttention, CaptureMoE
from ktc.capture.qwen_moe import gqa_attention

MODEL_TYPES = ("mixtral",)


def attention(attn: nn.Module, layer: int, hf_config) -> CaptureAttention:
    window = getattr(hf_config, "sliding_window", None)
    return gqa_attention(attn, layer, hf_config, int(window) if window else None)


def moe(block: nn.Module, layer: int, hf_config) -> CaptureMoE:
    check_act(hf_config)
    experts, gate = block.experts, block.gate
    router = router_attrs(experts.num_experts, gate.top_k, norm_topk_prob=True)   # Mixtral always renormalises
    expert_attrs, expert_weights = routed_experts(experts, gate.top_k)
    weights = {"router.weight": gate.weight, **expert_weights}
    spec = {"name": f"model.layers.{layer}.mlp", "router": router, "experts": expert_attrs, "shared": None}
    return CaptureMoE(block, weights, spec)


_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")
_W = {"gate": "w1.weight", "up": "w3.weight", "down": "w2.weight"}


def weight(fqn: str, hf_config, keys):
    """(name, source) of the parameter `fqn` where it is not simply {"load": fqn}."""
    m = _ROUTER.fullmatch(fqn)
    if m is not None:
        legacy = f"model.layers.{m.group(1)}.block_sparse_moe.gate.weight"
        key = fqn if keys is not None and legacy not in keys and fqn in keys else legacy
        return key, {"load": key}
    return routed_expert_weight(fqn, int(hf_config.num_local_experts), keys, "block_sparse_moe.experts", _W)
