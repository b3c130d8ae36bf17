"""Small hand-written IR graphs for pass tests (a one-layer MoE decoder)."""

from __future__ import annotations

from ktc.ir import Graph, Node, Value, Weight

H, INTER, E, V = 64, 32, 8, 128


def _w(name: str, shape: list[int], dtype: str = "float32") -> Weight:
    return Weight(name=name, shape=shape, dtype=dtype, source={"load": name})


def one_layer_moe(dtype: str = "float32") -> Graph:
    hs = ["batch", "seq", H]
    values = {
        "input_ids": Value("input_ids", ["batch", "seq"], "int64"),
        "positions": Value("positions", ["batch", "seq"], "int64"),
    }
    for name in ("h0", "n0", "a0", "h1", "n1", "m0", "s0", "y0", "h2", "n2"):
        values[name] = Value(name, hs, "float32")
    values["cos"] = Value("cos", ["batch", "seq", 16], "float32")
    values["sin"] = Value("sin", ["batch", "seq", 16], "float32")
    values["tw"] = Value("tw", ["batch", "seq", 2], "float32")
    values["ti"] = Value("ti", ["batch", "seq", 2], "int32")
    values["logits"] = Value("logits", ["batch", "seq", V], "float32")
    weights = [
        _w("embed", [V, H], dtype), _w("norm0", [H], dtype), _w("norm1", [H], dtype), _w("normf", [H], dtype),
        Weight("inv_freq", [8], "float32", {"values": [1.0] * 8}),
        _w("q", [H, H], dtype), _w("k", [H, H], dtype), _w("v", [H, H], dtype), _w("o", [H, H], dtype),
        _w("router", [E, H], dtype), _w("experts.gate_up", [E, 2 * INTER, H], dtype),
        _w("experts.down", [E, H, INTER], dtype),
        _w("shared.gate_proj.weight", [INTER, H], dtype), _w("shared.up_proj.weight", [INTER, H], dtype),
        _w("shared.down_proj.weight", [H, INTER], dtype), _w("lm_head", [V, H], dtype),
    ]
    nodes = [
        Node("embed", "embedding", ["input_ids"], ["h0"], {"weight": "embed"}),
        Node("rope", "rope", ["positions"], ["cos", "sin"], {"inv_freq": "inv_freq"}, {"scaling": 1.0}),
        Node("l0.norm0", "rms_norm", ["h0"], ["n0"], {"weight": "norm0"}, {"eps": 1e-6}),
        Node("l0.attn", "attention", ["n0", "cos", "sin"], ["a0"], {"q": "q", "k": "k", "v": "v", "o": "o"},
             {"kind": "gqa", "layer": 0, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16, "scaling": 0.25}),
        Node("l0.add0", "add", ["h0", "a0"], ["h1"]),
        Node("l0.norm1", "rms_norm", ["h1"], ["n1"], {"weight": "norm1"}, {"eps": 1e-6}),
        Node("l0.router", "router", ["n1"], ["tw", "ti"], {"weight": "router"},
             {"num_experts": E, "top_k": 2, "scoring": "softmax", "topk_method": "greedy", "n_group": 1,
              "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0}),
        Node("l0.experts", "moe_experts", ["n1", "tw", "ti"], ["m0"],
             {"gate_up": "experts.gate_up", "down": "experts.down"},
             {"num_experts": E, "hidden_size": H, "intermediate_size": INTER, "top_k": 2, "act": "silu"}),
        Node("l0.shared", "mlp", ["n1"], ["s0"], {"gate": "shared.gate_proj.weight", "up": "shared.up_proj.weight",
                                                  "down": "shared.down_proj.weight"}, {"act": "silu"}),
        Node("l0.moe_add", "add", ["m0", "s0"], ["y0"]),
        Node("l0.add1", "add", ["h1", "y0"], ["h2"]),
        Node("final_norm", "rms_norm", ["h2"], ["n2"], {"weight": "normf"}, {"eps": 1e-6}),
        Node("lm_head", "linear", ["n2"], ["logits"], {"weight": "lm_head"}),
    ]
    g = Graph(["input_ids", "positions"], ["logits"], values, {w.name: w for w in weights}, nodes,
              {"model_type": "test", "vocab_size": V})
    g.validate()
    return g
