"""Test helpers for the runtime: tiny transformers models, hand-built ktc IR graphs with
their weights, and a torch reference for the moe_experts CPU kernel (tests only)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ktc.ir import Graph, Node, Value, Weight
from ktc.tiny import randomize_weights, tiny_config

REF_KERNEL = "torch_reference"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def causal_mask(seq: int) -> torch.Tensor:
    """Additive [1, 1, seq, seq] mask for transformers' attention modules."""
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]


# -- the moe_experts kernel, in torch --------------------------------------------------
class TorchExperts:
    """moe_experts reference: dense weights under "gate_up"/"down", or packed as
    {"gate_up.w": t, "down.w": t}. Records the kernel names it was called with."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def moe_experts(self, kernel_name, x, topk_weights, topk_ids, packed):
        assert x.dtype == torch.float32 and topk_weights.dtype == torch.float32
        assert topk_ids.dtype == torch.int32 and x.dim() == 2
        self.calls.append((kernel_name, tuple(sorted(packed))))
        gate_up = packed.get("gate_up", packed.get("gate_up.w"))
        down = packed.get("down", packed.get("down.w"))
        ids = topk_ids.long()
        gu = torch.einsum("tkoh,th->tko", gate_up[ids], x)                  # [T, K, 2I]
        gate, up = gu.chunk(2, dim=-1)
        y = torch.einsum("tkhi,tki->tkh", down[ids], F.silu(gate) * up)     # [T, K, H]
        return (y * topk_weights[..., None]).sum(dim=1)


# -- tiny transformers models ------------------------------------------------------------
@functools.cache
def hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny float32 model of `arch` with the random init of ktc.tiny.make_tiny_model (eager attention)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(arch)
    for k, v in overrides.items():
        setattr(config, k, v)
    config._attn_implementation = "eager"
    return randomize_weights(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


# -- building graphs by hand ---------------------------------------------------------------
class Builder:
    """Collects values, weights (with their tensors) and nodes into a Graph."""

    def __init__(self):
        self.values: dict[str, Value] = {}
        self.weights: dict[str, Weight] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []

    def input(self, name: str, dtype: str = "float32") -> str:
        self.values[name] = Value(name, ["batch", "seq"], dtype)
        self.inputs.append(name)
        return name

    def weight(self, name: str, t: torch.Tensor) -> str:
        t = t.detach().to(torch.float32).contiguous()
        self.weights[name] = Weight(name, list(t.shape), "float32", {"load": name})
        self.tensors[name] = t
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, weights: dict[str, torch.Tensor | str] | None = None,
             kernel: str | None = None, name: str | None = None, **attrs):
        name = name or f"n{len(self.nodes)}_{op}"
        roles = {}
        for role, w in (weights or {}).items():
            if w is None:
                continue
            roles[role] = w if isinstance(w, str) else self.weight(f"{name}.{role}", w)
        outs = [f"{name}.out{i}" for i in range(n_out)]
        for o in outs:
            self.values[o] = Value(o, ["batch", "seq"], "float32")
        self.nodes.append(Node(name, op, list(inputs), outs, roles, attrs, kernel=kernel))
        return outs[0] if n_out == 1 else outs

    def graph(self, outputs: list[str], **config) -> tuple[Graph, dict[str, torch.Tensor]]:
        g = Graph(list(self.inputs), list(outputs), dict(self.values), dict(self.weights), list(self.nodes), config)
        g.validate()
        return g, dict(self.tensors)


def _bias(linear):
    return None if linear.bias is None else linear.bias


def gqa_attrs(attn, layer: int) -> dict:
    cfg = attn.config
    attrs = dict(kind="gqa", layer=layer, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                 head_dim=attn.head_dim, scaling=attn.scaling, sliding_window=getattr(attn, "sliding_window", None))
    if getattr(attn, "q_norm", None) is not None:
        attrs["qk_norm_eps"] = attn.q_norm.variance_epsilon
    return attrs


def gqa_weights(attn) -> dict:
    w = dict(q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight, o=attn.o_proj.weight,
             q_bias=_bias(attn.q_proj), k_bias=_bias(attn.k_proj), v_bias=_bias(attn.v_proj), o_bias=_bias(attn.o_proj))
    if getattr(attn, "q_norm", None) is not None:
        w.update(q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight)
    return w


def mla_attrs(attn, layer: int) -> dict:
    cfg = attn.config
    interleave = True if cfg.model_type == "deepseek_v2" else bool(cfg.rope_interleave)
    return dict(kind="mla", layer=layer, num_heads=attn.num_heads, q_lora_rank=attn.q_lora_rank,
                kv_lora_rank=attn.kv_lora_rank, qk_nope_head_dim=attn.qk_nope_head_dim,
                qk_rope_head_dim=attn.qk_rope_head_dim, v_head_dim=attn.v_head_dim, scaling=attn.scaling,
                rope_interleave=interleave, norm_eps=attn.kv_a_layernorm.variance_epsilon)


def mla_weights(attn) -> dict:
    w = dict(kv_a=attn.kv_a_proj_with_mqa.weight, kv_a_bias=_bias(attn.kv_a_proj_with_mqa),
             kv_a_norm=attn.kv_a_layernorm.weight, kv_b=attn.kv_b_proj.weight, o=attn.o_proj.weight,
             o_bias=_bias(attn.o_proj))
    if attn.q_lora_rank is None:
        w["q"] = attn.q_proj.weight
    else:
        w.update(q_a=attn.q_a_proj.weight, q_a_bias=_bias(attn.q_a_proj), q_a_norm=attn.q_a_layernorm.weight,
                 q_b=attn.q_b_proj.weight)
    return w


def router_attrs(cfg, top_k: int | None = None) -> dict:
    arch = cfg.model_type
    e = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts
    attrs = dict(num_experts=e, top_k=top_k or cfg.num_experts_per_tok, scoring="softmax", topk_method="greedy",
                 n_group=1, topk_group=1, norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", False)),
                 routed_scaling_factor=1.0)
    if arch == "mixtral":
        attrs["norm_topk_prob"] = True
    elif arch == "deepseek_v2":
        attrs.update(topk_method=cfg.topk_method, n_group=cfg.n_group, topk_group=cfg.topk_group,
                     norm_topk_prob=False, routed_scaling_factor=cfg.routed_scaling_factor)
    elif arch == "deepseek_v3":
        attrs.update(scoring="sigmoid", topk_method="noaux_tc", n_group=cfg.n_group, topk_group=cfg.topk_group,
                     routed_scaling_factor=cfg.routed_scaling_factor)
    return attrs


def dense_mlp(b: Builder, x: str, mlp, fused: bool = False, output_gate=None) -> str:
    w = dict(down=mlp.down_proj.weight, output_gate=None if output_gate is None else output_gate.weight)
    if fused:
        w["gate_up"] = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight), dim=0)
    else:
        w.update(gate=mlp.gate_proj.weight, up=mlp.up_proj.weight)
    return b.node("mlp", [x], weights=w, act="silu")


def moe_block(b: Builder, x: str, block, cfg) -> str:
    """router + moe_experts (+ shared expert mlp + add) for a transformers sparse MoE block."""
    gate = block.gate
    bias = getattr(gate, "e_score_correction_bias", None)
    tw, ti = b.node("router", [x], n_out=2, weights=dict(weight=gate.weight, bias=bias), **router_attrs(cfg))
    ex = block.experts
    y = b.node("moe_experts", [x, tw, ti], weights=dict(gate_up=ex.gate_up_proj, down=ex.down_proj),
               kernel=REF_KERNEL, num_experts=ex.num_experts, hidden_size=ex.hidden_dim,
               intermediate_size=ex.intermediate_dim, top_k=router_attrs(cfg)["top_k"], act="silu")
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is None:
        return y
    s = dense_mlp(b, x, shared, output_gate=getattr(block, "shared_expert_gate", None))
    return b.node("add", [y, s])


def graph_from_hf(model, fuse_norms: bool = True) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The whole causal LM as a ktc IR graph (what capture would give), weights by name."""
    cfg = model.config
    mla = cfg.model_type in ("deepseek_v2", "deepseek_v3")
    b = Builder()
    ids = b.input("input_ids", "int64")
    pos = b.input("positions", "int64")
    h = b.node("embedding", [ids], weights=dict(weight=model.model.embed_tokens.weight), name="embed")
    rot = model.model.rotary_emb
    cos, sin = b.node("rope", [pos], n_out=2, weights=dict(inv_freq=rot.inv_freq), scaling=rot.attention_scaling)

    def norm(x, residual, mod):
        if residual is None:
            return b.node("rms_norm", [x], weights=dict(weight=mod.weight), eps=mod.variance_epsilon), x
        if fuse_norms:
            return b.node("add_rms_norm", [x, residual], n_out=2, weights=dict(weight=mod.weight),
                          eps=mod.variance_epsilon)
        s = b.node("add", [x, residual])
        return b.node("rms_norm", [s], weights=dict(weight=mod.weight), eps=mod.variance_epsilon), s

    layers = model.model.layers
    x, h = norm(h, None, layers[0].input_layernorm)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        attrs, ws = (mla_attrs(attn, i), mla_weights(attn)) if mla else (gqa_attrs(attn, i), gqa_weights(attn))
        a = b.node("attention", [x, cos, sin], weights=ws, **attrs)
        x, h = norm(a, h, layer.post_attention_layernorm)
        if hasattr(layer.mlp, "experts"):
            m = moe_block(b, x, layer.mlp, cfg)
        else:
            m = dense_mlp(b, x, layer.mlp, fused=True)
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else model.model.norm
        x, h = norm(m, h, nxt)
    logits = b.node("linear", [x], weights=dict(weight=model.lm_head.weight), name="lm_head")
    return b.graph([logits], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
                   max_position_embeddings=cfg.max_position_embeddings, eos_token_id=None)


def gpu_tuning_tasks(path, kinds: tuple[str, ...]) -> tuple[dict, list]:
    """(the artifact's GPU tunables by table, its batch-1 tuning tasks whose kernel names contain one
    of `kinds`), the tasks on the GPU when there is one, else the CPU (Triton's interpreter); float32."""
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.gpu.kernels import load_kernels
    from ktc.runtime.gpu.tune import gpu_tasks, node_tunables

    m = read_manifest(path)
    kernels = load_kernels(path / m.gpu["dir"] / "src")
    g = m.graph
    tunables = {t.table: t for n in g.nodes for t in node_tunables(g, n, kernels)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tasks = [t for t in gpu_tasks(g, kernels, [1], device=device, dtype=torch.float32)
             if any(k in t.key.kernel for k in kinds)]
    return tunables, tasks


def assert_candidates_agree(tasks: list, atol: float, limit: int | None = None) -> None:
    """Each task's default comes first among several candidates, and the candidates (the first `limit`)
    compute what the default does: elementwise in the interpreter (float32 throughout); on a GPU, where the
    tensor-core tiles multiply float32 as TF32 and the GEMV kernels do not, within TF32's relative error."""
    for task in tasks:
        cands = task.candidates()
        assert cands[0].config == task.default and len(cands) > 1
        ref = cands[0].run().clone()
        for c in cands[1:limit]:
            got = c.run()
            if got.is_cuda:
                assert rel_err(got.float(), ref.float()) < 3e-3, c.config
            else:
                assert torch.allclose(got, ref, rtol=1e-4, atol=atol), c.config
