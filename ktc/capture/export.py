"""Build the transformers model on the meta device, swap in capture modules, torch.export it.

    model = build_meta_model(hf_config)          # no weight is allocated
    swap_modules(model, hf_config, arch)         # RMSNorm, rotary, attention, MoE, MLP -> ktc ops
    ep = export_model(model)                     # ExportedProgram, dynamic batch and seq

The exported program takes input_ids [batch, seq] and positions [batch, seq] and returns
the logits [batch, seq, vocab]. Attention is a capture op that ignores the mask, so the
mask transformers builds is dead code and is eliminated.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from ktc.capture.ops import CaptureMLP, CaptureRMSNorm, CaptureRope
from ktc.errors import KtcError

_DYNAMIC_ROPE = ("dynamic", "longrope")


def build_meta_model(hf_config) -> nn.Module:
    """The CausalLM of `hf_config` with every parameter on the meta device, float32, eval."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def rope_values(model: nn.Module, hf_config) -> tuple[torch.Tensor, float]:
    """inv_freq and attention_scaling, computed on CPU by the model's own rotary class."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise KtcError(f"rope_type {rope_type!r} changes the rotary frequencies with the sequence length; "
                       "ktc supports static rope types (default, linear, yarn, llama3)")
    with torch.device("cpu"):
        cpu_rotary = type(rotary)(config=hf_config)
    return cpu_rotary.inv_freq.detach().to("cpu", torch.float32), float(cpu_rotary.attention_scaling)


def mlp_capture(mlp: nn.Module, hf_config, name: str, output_gate: torch.Tensor | None = None) -> CaptureMLP:
    """A dense SwiGLU MLP (gate_proj, up_proj, down_proj; no biases) as a ktc::mlp call."""
    check_act(hf_config)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if getattr(getattr(mlp, proj), "bias", None) is not None:
            raise KtcError(f"{name}.{proj} has a bias (mlp_bias): ktc's mlp op has none")
    weights = {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight,
               "output_gate": output_gate}
    return CaptureMLP(mlp, weights, {"name": name, "attrs": {"act": "silu"}})


def mlp_spec_weights(mlp: nn.Module, prefix: str, output_gate: torch.Tensor | None = None) -> dict[str, Any]:
    """Weights of a shared-expert MLP inside a moe spec, with roles prefixed `shared.`."""
    out = {f"{prefix}gate": mlp.gate_proj.weight, f"{prefix}up": mlp.up_proj.weight,
           f"{prefix}down": mlp.down_proj.weight}
    if output_gate is not None:
        out[f"{prefix}output_gate"] = output_gate
    return out


def is_sparse(mlp: nn.Module) -> bool:
    """Whether a decoder layer's mlp is a sparse MoE block (transformers' fused experts)."""
    return hasattr(mlp, "experts")


def router_attrs(num_experts: int, top_k: int, norm_topk_prob: bool, scoring: str = "softmax",
                 topk_method: str = "greedy", n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0) -> dict[str, Any]:
    """The IR router attrs (ktc/ir.py); the defaults are plain softmax top-k routing."""
    return {"num_experts": int(num_experts), "top_k": int(top_k), "scoring": scoring, "topk_method": topk_method,
            "n_group": int(n_group), "topk_group": int(topk_group), "norm_topk_prob": bool(norm_topk_prob),
            "routed_scaling_factor": float(routed_scaling_factor)}


def routed_experts(experts: nn.Module, top_k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(IR moe_experts attrs, capture weights) of transformers' fused experts module."""
    attrs = {"num_experts": int(experts.num_experts), "hidden_size": int(experts.hidden_dim),
             "intermediate_size": int(experts.intermediate_dim), "top_k": int(top_k), "act": "silu"}
    return attrs, {"experts.gate_up": experts.gate_up_proj, "experts.down": experts.down_proj}


def check_act(hf_config) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise KtcError(f"hidden_act {act!r} is not supported: ktc's MLP and experts are SwiGLU (silu)")


def swap_modules(model: nn.Module, hf_config, arch: ModuleType) -> None:
    """Replace, in place, the modules of `model` by capture modules.

    `arch` is a per-architecture module providing attention(module, layer, config) and
    moe(module, layer, config) (for layers where is_sparse(mlp))."""
    inner = model.model
    head = model.lm_head
    if head.weight is inner.embed_tokens.weight:
        # untie, so that export keeps two parameters (model.embed_tokens.weight, lm_head.weight);
        # capture gives lm_head.weight the embedding's checkpoint key as its source
        head.weight = nn.Parameter(torch.empty_like(head.weight, device="meta"), requires_grad=False)
    inv_freq, scaling = rope_values(model, hf_config)
    inner.rotary_emb = CaptureRope(inv_freq, scaling)
    inner.norm = CaptureRMSNorm(inner.norm)
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}"
        layer.input_layernorm = CaptureRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = CaptureRMSNorm(layer.post_attention_layernorm)
        layer.self_attn = arch.attention(layer.self_attn, i, hf_config)
        if is_sparse(layer.mlp):
            layer.mlp = arch.moe(layer.mlp, i, hf_config)
        else:
            layer.mlp = mlp_capture(layer.mlp, hf_config, f"{prefix}.mlp")


class _Root(nn.Module):
    """The export root: (input_ids, positions) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head
        self._causal_lm = [model]   # not a child: parameter names stay model.* / lm_head.*

    def forward(self, input_ids, positions):
        out = self._causal_lm[0](
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=torch.ones_like(input_ids),   # explicit: see TOOLCHAIN.md; dead after capture
            use_cache=False,
            logits_to_keep=0,
        )
        return out.logits


def export_model(model: nn.Module, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export the swapped model with dynamic seq (and batch) dims; dead code removed."""
    root = _Root(model)
    batch, seq = 2, 8
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    pos = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    s = torch.export.Dim("seq", min=1, max=1 << 20)
    dims: dict[int, Any] = {1: s}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        ep = torch.export.export(root, (ids, pos), dynamic_shapes=({**dims}, {**dims}), strict=False)
    remove_dead_code(ep.graph_module.graph)
    ep.graph_module.recompile()
    return ep


def remove_dead_code(graph: torch.fx.Graph) -> None:
    """Erase every node the output does not depend on, asserts included (the attention mask
    transformers builds is dead once attention is a capture op). Placeholders stay: they
    are the program's signature."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    live = {out}
    stack = [out]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in live:
                live.add(i)
                stack.append(i)
    for n in reversed(list(graph.nodes)):
        if n not in live and n.op != "placeholder":
            graph.erase_node(n)
