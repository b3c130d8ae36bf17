"""ktc IR: a small typed dataflow graph of the ops a captured MoE model is made of.

This module is the contract between capture (which builds graphs), passes (which rewrite
them), codegen, the artifact (which stores them as JSON) and the runtime (which runs
them). It depends on nothing but the standard library, so the runtime may import it.

A Graph has named Values (activations), named Weights (parameters, with a *source*
expression saying how to get them from the checkpoint) and Nodes in topological order.
Every node names its input/output values, its weights by role, and has attrs, plus the
fields passes fill in: device, format, kernel.

Activation conventions: hidden states are [batch, seq, hidden]; dims "batch" and "seq"
are symbolic. The runtime computes CPU activations in float32.

Ops (OP_SPECS below is the machine-readable form; the runtime implements exactly this):

  embedding(ids) -> h                          weights: weight [V, H]
  rope(positions) -> cos, sin                  weights: inv_freq [D/2]; attrs: scaling
      freqs = positions[..., None] * inv_freq; emb = cat(freqs, freqs, -1)
      cos = cos(emb) * scaling; sin = sin(emb) * scaling        (both [batch, seq, D])
  rms_norm(x) -> y                             weights: weight [H]; attrs: eps
      y = weight * x / sqrt(mean(x^2, -1) + eps)   (computed in float32)
  add(a, b) -> a + b
  add_rms_norm(x, residual) -> y, s            (fusion of add then rms_norm)
      s = x + residual; y = rms_norm(s)        weights: weight; attrs: eps
  attention(x, cos, sin) -> y                  stateful: uses KV-cache slot attrs.layer
      attrs.kind == "gqa": attrs num_heads, num_kv_heads, head_dim, scaling,
          qk_norm_eps (only with q_norm/k_norm), sliding_window (None = full; W: query i sees keys j
          with i - W < j <= i);
          weights q, k, v, o (+ optional q_bias, k_bias, v_bias, o_bias, q_norm, k_norm
          [head_dim] applied per head before rope); rope = rotate_half style on the whole
          head_dim; causal softmax(q k^T * scaling) v, heads of a kv group share k, v.
      attrs.kind == "mla" (DeepSeek-V2/V3): attrs num_heads, q_lora_rank (None = plain
          q), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, scaling,
          rope_interleave (True: rotary on adjacent pairs (x0,x1),(x2,x3).. as DeepSeek's
          checkpoints lay them out; False: rotate_half), norm_eps;
          weights q (when q_lora_rank is None) | q_a, q_a_norm, q_b; kv_a (kv_a_proj_with_mqa),
          kv_a_norm, kv_b, o (+ optional q_a_bias, kv_a_bias, o_bias).
          The cache holds the compressed latent (kv_lora_rank) and the shared k_rope.
  router(x) -> topk_weights [batch, seq, top_k] f32, topk_ids [batch, seq, top_k] int32
      weights: weight [E, H] (+ optional bias [E]: DeepSeek-V3 e_score_correction_bias)
      attrs: num_experts, top_k, scoring ("softmax" | "sigmoid"), topk_method ("greedy" |
      "group_limited_greedy" (V2: group score = max) | "noaux_tc" (V3: group score = sum of
      top-2 of biased scores; bias only chooses, weights come from unbiased scores)),
      n_group, topk_group, norm_topk_prob (divide by the sum of the k chosen),
      routed_scaling_factor (multiply at the end). Logits are computed in float32.
  moe_experts(x, topk_weights, topk_ids) -> y  the routed experts of one MoE layer
      weights: gate_up [E, 2I, H] (gate rows first, then up), down [E, H, I]
      attrs: num_experts, hidden_size, intermediate_size, top_k, act ("silu")
      y[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t,k]
      Optional attrs (set by placement): layer (decoder layer index); experts (the router's
      expert ids this node holds, in weight-row order; absent = all, e = id): a node holding a
      subset runs only the slots routed to its experts, the others contribute nothing — a
      heterogeneous layer is a GPU node and a CPU node over disjoint subsets whose outputs are
      summed by an add; num_global_experts (the router's E, with experts); expert_load (share of
      routed slots per router expert id from calibration, sums to 1; absent = unknown/uniform).
  mlp(x) -> y                                  dense SwiGLU (dense layers, shared experts)
      weights: gate [I, H], up [I, H], down [H, I]   (fusion replaces gate+up by
      gate_up [2I, H]) (+ optional output_gate [1, H]: y *= sigmoid(x @ output_gate^T),
      Qwen2-MoE's shared_expert_gate); attrs: act ("silu")
  linear(x) -> y                               weights: weight [N, K] (+ optional bias)

Weight sources (JSON expressions, evaluated when the artifact is written):
  {"load": KEY}                          a checkpoint tensor
  {"stack": [SRC, ...]}                  torch.stack along a new dim 0
  {"concat": [SRC, ...], "dim": D}       torch.cat
  {"values": [x, ...], "dtype": DT}      a small 1-D tensor computed at capture (rope inv_freq)
  {"take": SRC, "index": [i, ...]}       SRC's rows i, ... along dim 0 (an expert subset)
A weight's `format` says how it is stored: a dtype name ("float32", "bfloat16", ...) or a
quantized format ("int8", "int4") with `group_size`; quantized weights are stored as
several tensors (see ktc.quantize) and `layout` names the kernel layout they are packed in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

IR_VERSION = 1


@dataclass(frozen=True)
class OpSpec:
    """What an op takes and gives: input/output arity, weight roles, required attrs."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    optional_weights: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()


_MLA_WEIGHTS = ("q", "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o",
                "q_a_bias", "kv_a_bias", "o_bias")
_GQA_WEIGHTS = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm")

OP_SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        OpSpec("embedding", ("ids",), ("h",), ("weight",)),
        OpSpec("rope", ("positions",), ("cos", "sin"), ("inv_freq",), attrs=("scaling",)),
        OpSpec("rms_norm", ("x",), ("y",), ("weight",), attrs=("eps",)),
        OpSpec("add", ("a", "b"), ("y",)),
        OpSpec("add_rms_norm", ("x", "residual"), ("y", "sum"), ("weight",), attrs=("eps",)),
        OpSpec("attention", ("x", "cos", "sin"), ("y",), (), tuple(dict.fromkeys(_GQA_WEIGHTS + _MLA_WEIGHTS)),
               attrs=("kind", "layer", "num_heads", "scaling")),
        OpSpec("router", ("x",), ("topk_weights", "topk_ids"), ("weight",), ("bias",),
               attrs=("num_experts", "top_k", "scoring", "topk_method", "n_group", "topk_group",
                      "norm_topk_prob", "routed_scaling_factor")),
        OpSpec("moe_experts", ("x", "topk_weights", "topk_ids"), ("y",), ("gate_up", "down"),
               attrs=("num_experts", "hidden_size", "intermediate_size", "top_k", "act")),
        OpSpec("mlp", ("x",), ("y",), ("down",), ("gate", "up", "gate_up", "output_gate"), attrs=("act",)),
        OpSpec("linear", ("x",), ("y",), ("weight",), ("bias",)),
    ]
}


@dataclass
class Value:
    """An activation: a name, a shape (ints or symbolic dim names) and a dtype."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class Weight:
    """A parameter of the model and how to obtain it."""

    name: str
    shape: list[int]
    dtype: str
    source: dict[str, Any]
    format: str | None = None       # None until the quantization pass: then a dtype or "int8"/"int4"
    group_size: int | None = None   # for quantized formats
    layout: str | None = None       # packing layout a kernel reads (set by codegen-aware passes)
    device: str | None = None       # where the weight lives at run time

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    weights: dict[str, str] = field(default_factory=dict)   # role -> weight name
    attrs: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    format: str | None = None
    kernel: str | None = None


@dataclass
class Graph:
    """A model as ops in topological order. `config` keeps the facts the runtime needs
    that are not per node (model_type, vocab_size, max_position_embeddings, eos ids...)."""

    inputs: list[str]
    outputs: list[str]
    values: dict[str, Value]
    weights: dict[str, Weight]
    nodes: list[Node]
    config: dict[str, Any] = field(default_factory=dict)

    # -- queries ----------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def nodes_of(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    # -- checks -----------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError if the graph breaks the op specs or its own references."""
        defined = set(self.inputs)
        for name in self.inputs:
            if name not in self.values:
                raise ValueError(f"graph input {name!r} has no Value")
        for n in self.nodes:
            spec = OP_SPECS.get(n.op)
            if spec is None:
                raise ValueError(f"node {n.name}: unknown op {n.op!r}")
            if len(n.inputs) != len(spec.inputs) or len(n.outputs) != len(spec.outputs):
                raise ValueError(f"node {n.name}: {n.op} takes {len(spec.inputs)} inputs and gives "
                                 f"{len(spec.outputs)} outputs, got {len(n.inputs)}/{len(n.outputs)}")
            for i in n.inputs:
                if i not in defined:
                    raise ValueError(f"node {n.name}: input {i!r} is used before it is defined")
            for role in spec.weights:
                if role not in n.weights:
                    raise ValueError(f"node {n.name}: missing weight role {role!r}")
            for role, w in n.weights.items():
                if role not in spec.weights and role not in spec.optional_weights:
                    raise ValueError(f"node {n.name}: {n.op} has no weight role {role!r}")
                if w not in self.weights:
                    raise ValueError(f"node {n.name}: weight {w!r} is not in the graph")
            for a in spec.attrs:
                if a not in n.attrs:
                    raise ValueError(f"node {n.name}: missing attr {a!r}")
            for o in n.outputs:
                if o in defined:
                    raise ValueError(f"node {n.name}: value {o!r} defined twice")
                if o not in self.values:
                    raise ValueError(f"node {n.name}: output {o!r} has no Value")
                defined.add(o)
        for o in self.outputs:
            if o not in defined:
                raise ValueError(f"graph output {o!r} is never defined")

    # -- serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "ir_version": IR_VERSION,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "config": self.config,
            "values": {k: asdict(v) for k, v in self.values.items()},
            "weights": {k: asdict(w) for k, w in self.weights.items()},
            "nodes": [asdict(n) for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Graph:
        if d.get("ir_version") != IR_VERSION:
            raise ValueError(f"IR version {d.get('ir_version')} is not {IR_VERSION}")
        return cls(
            inputs=list(d["inputs"]),
            outputs=list(d["outputs"]),
            values={k: Value(**v) for k, v in d["values"].items()},
            weights={k: Weight(**w) for k, w in d["weights"].items()},
            nodes=[Node(**n) for n in d["nodes"]],
            config=dict(d.get("config", {})),
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str) -> Graph:
        return cls.from_dict(json.loads(s))

    def copy(self) -> Graph:
        return Graph.from_dict(json.loads(json.dumps(self.to_dict())))

    # -- printing ---------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"graph({', '.join(self.inputs)}) -> {', '.join(self.outputs)}"]
        for n in self.nodes:
            ws = ", ".join(f"{r}={w}" for r, w in n.weights.items())
            at = ", ".join(f"{k}={v}" for k, v in n.attrs.items())
            place = "".join(
                f" {k}={v}" for k, v in (("device", n.device), ("format", n.format), ("kernel", n.kernel)) if v
            )
            lines.append(
                f"  {', '.join(n.outputs)} = {n.op}({', '.join(n.inputs)})"
                + (f" [{ws}]" if ws else "") + (f" {{{at}}}" if at else "") + (f" @{place.strip()}" if place else "")
            )
        return "\n".join(lines)
