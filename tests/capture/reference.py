"""A reference interpreter of ktc IR (test code only): each op written straight from the
semantics in ktc/ir.py, float32, whole sequence at once (no KV cache), causal.

    logits = run_graph(graph, weights, input_ids, positions)

It exists to prove that capture produced the right graph: the right ops, attrs and weight
roles. It is deliberately naive (dense loops over experts) and independent of the runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktc.checkpoint import Checkpoint, evaluate_source
from ktc.ir import Graph, Node


def load_weights(graph: Graph, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {name: evaluate_source(ckpt, w.source).to(torch.float32) for name, w in graph.weights.items()}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(x, w, b=None):
    return F.linear(x, w, b)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [b, s, h, d]; cos/sin [b, s, d] laid out cat(freqs, freqs)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        # pairs (x0, x1), (x2, x3)...: pair i turns by freq i, kept in place (DeepSeek-V2's complex form)
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _attend(q, k, v, scaling: float, window: int | None) -> torch.Tensor:
    """q [b, s, h, dq], k [b, s, h, dq], v [b, s, h, dv] -> [b, s, h * dv]; causal (+ window)."""
    s = q.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scaling
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = j <= i
    if window:
        allowed = allowed & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = scores.softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out.reshape(*out.shape[:2], -1)


def _gqa(node: Node, x, cos, sin, w) -> torch.Tensor:
    a = node.attrs
    nh, nkv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    b, s, _ = x.shape
    q = _linear(x, w["q"], w.get("q_bias")).view(b, s, nh, hd)
    k = _linear(x, w["k"], w.get("k_bias")).view(b, s, nkv, hd)
    v = _linear(x, w["v"], w.get("v_bias")).view(b, s, nkv, hd)
    if "q_norm" in w:
        q = _rms(q, w["q_norm"], a["qk_norm_eps"])
        k = _rms(k, w["k_norm"], a["qk_norm_eps"])
    q, k = _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)
    rep = nh // nkv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    out = _attend(q, k, v, a["scaling"], a.get("sliding_window"))
    return _linear(out, w["o"], w.get("o_bias"))


def _mla(node: Node, x, cos, sin, w) -> torch.Tensor:
    a = node.attrs
    nh, dn, dr, dv, r = a["num_heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"], a["kv_lora_rank"]
    b, s, _ = x.shape
    if a["q_lora_rank"] is None:
        q = _linear(x, w["q"])
    else:
        q = _linear(_rms(_linear(x, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], a["norm_eps"]), w["q_b"])
    q = q.view(b, s, nh, dn + dr)
    q_nope, q_rope = q[..., :dn], q[..., dn:]
    kv_a = _linear(x, w["kv_a"], w.get("kv_a_bias"))
    latent, k_rope = kv_a[..., :r], kv_a[..., r:]
    kv = _linear(_rms(latent, w["kv_a_norm"], a["norm_eps"]), w["kv_b"]).view(b, s, nh, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q_rope = _rotate(q_rope, cos, sin, a["rope_interleave"])
    k_rope = _rotate(k_rope.view(b, s, 1, dr), cos, sin, a["rope_interleave"]).expand(b, s, nh, dr)
    q = torch.cat((q_nope, q_rope), -1)
    k = torch.cat((k_nope, k_rope), -1)
    out = _attend(q, k, v, a["scaling"], None)
    return _linear(out, w["o"], w.get("o_bias"))


def _router(node: Node, x, w) -> tuple[torch.Tensor, torch.Tensor]:
    a = node.attrs
    e, k = a["num_experts"], a["top_k"]
    logits = _linear(x.float(), w["weight"].float())
    scores = logits.softmax(-1) if a["scoring"] == "softmax" else logits.sigmoid()
    choice = scores + w["bias"] if "bias" in w else scores
    method = a["topk_method"]
    if method in ("group_limited_greedy", "noaux_tc"):
        g, kg = a["n_group"], a["topk_group"]
        grouped = choice.view(*choice.shape[:-1], g, e // g)
        if method == "group_limited_greedy":
            gs = grouped.max(-1).values
        else:
            gs = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(-1, gs.topk(kg, dim=-1).indices, True)
        keep = keep[..., None].expand(*keep.shape, e // g).reshape(choice.shape)
        masked = choice.masked_fill(~keep, float("-inf") if method == "noaux_tc" else 0.0)
    else:
        masked = choice
    ids = masked.topk(k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if a["norm_topk_prob"]:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * a["routed_scaling_factor"]
    return weights.float(), ids.to(torch.int32)


def _experts(node: Node, x, tw, ti, w) -> torch.Tensor:
    inter = node.attrs["intermediate_size"]
    out = torch.zeros_like(x)
    for e in range(node.attrs["num_experts"]):
        gate, up = w["gate_up"][e, :inter], w["gate_up"][e, inter:]
        y = _linear(F.silu(_linear(x, gate)) * _linear(x, up), w["down"][e])
        weight = (tw * (ti == e)).sum(-1, keepdim=True)
        out = out + weight * y
    return out


def _mlp(node: Node, x, w) -> torch.Tensor:
    if "gate_up" in w:
        inter = w["gate_up"].shape[0] // 2
        gate, up = w["gate_up"][:inter], w["gate_up"][inter:]
    else:
        gate, up = w["gate"], w["up"]
    y = _linear(F.silu(_linear(x, gate)) * _linear(x, up), w["down"])
    if "output_gate" in w:
        y = y * torch.sigmoid(_linear(x, w["output_gate"]))
    return y


def run_graph(graph: Graph, weights: dict[str, torch.Tensor], input_ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    env: dict[str, torch.Tensor] = {"input_ids": input_ids, "positions": positions}
    for n in graph.nodes:
        w = {role: weights[name] for role, name in n.weights.items()}
        ins = [env[i] for i in n.inputs]
        if n.op == "embedding":
            outs = [F.embedding(ins[0], w["weight"])]
        elif n.op == "rope":
            freqs = ins[0][..., None].float() * w["inv_freq"]
            emb = torch.cat((freqs, freqs), -1)
            outs = [emb.cos() * n.attrs["scaling"], emb.sin() * n.attrs["scaling"]]
        elif n.op == "rms_norm":
            outs = [_rms(ins[0], w["weight"], n.attrs["eps"])]
        elif n.op == "add":
            outs = [ins[0] + ins[1]]
        elif n.op == "add_rms_norm":
            s = ins[0] + ins[1]
            outs = [_rms(s, w["weight"], n.attrs["eps"]), s]
        elif n.op == "attention":
            fn = _gqa if n.attrs["kind"] == "gqa" else _mla
            outs = [fn(n, *ins, w)]
        elif n.op == "router":
            outs = list(_router(n, ins[0], w))
        elif n.op == "moe_experts":
            outs = [_experts(n, *ins, w)]
        elif n.op == "mlp":
            outs = [_mlp(n, ins[0], w)]
        elif n.op == "linear":
            outs = [_linear(ins[0], w["weight"], w.get("bias"))]
        else:
            raise NotImplementedError(n.op)
        for name, t in zip(n.outputs, outs, strict=True):
            env[name] = t
    return env[graph.outputs[0]]
