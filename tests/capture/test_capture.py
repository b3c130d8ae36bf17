"""Capture: HF folder -> IR for each architecture; structure, attrs, weight sources, and
logits of a reference interpreter of the IR against transformers' own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ktc.capture import SUPPORTED_MODEL_TYPES, capture
from ktc.checkpoint import Checkpoint, evaluate_source
from ktc.errors import KtcError
from ktc.ir import Graph
from ktc.tiny import ARCHITECTURES
from tests.capture.conftest import make_variant
from tests.capture.reference import load_weights, run_graph

SEQ_LENS = (1, 5, 17)
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits_errors(graph: Graph, model_dir, hf_model, offset: int = 0) -> dict[int, float]:
    """Relative error of the reference interpreter's logits vs transformers', per seq length."""
    weights = load_weights(graph, Checkpoint(model_dir))
    gen = torch.Generator().manual_seed(0)
    out = {}
    for s in SEQ_LENS:
        batch = 2 if s > 1 else 1
        ids = torch.randint(0, graph.config["vocab_size"], (batch, s), generator=gen)
        pos = (torch.arange(s) + offset).expand(batch, s).contiguous()
        with torch.no_grad():
            ref = hf_model(input_ids=ids, position_ids=pos).logits.float()
            got = run_graph(graph, weights, ids, pos)
        assert got.shape == ref.shape
        out[s] = rel_err(got, ref)
    return out


def load_hf(model_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# -- structure -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_graph_structure(arch, captured, tiny_models):
    g = captured[arch]
    g.validate()
    assert g.inputs == ["input_ids", "positions"] and g.outputs == ["logits"]
    assert g.values["input_ids"].shape == ["batch", "seq"] and g.values["input_ids"].dtype == "int64"
    assert g.values["logits"].shape == ["batch", "seq", 256]
    ops = [n.op for n in g.nodes]
    assert ops[0] == "embedding" and ops[1] == "rope" and ops[-2:] == ["rms_norm", "linear"]
    assert ops.count("attention") == 2
    assert sorted(n.attrs["layer"] for n in g.nodes_of("attention")) == [0, 1]
    assert ops.count("rms_norm") == 2 * 2 + 1
    n_moe = 1 if arch.startswith("deepseek") else 2          # deepseek: first_k_dense_replace = 1
    assert ops.count("router") == ops.count("moe_experts") == n_moe
    shared = arch in ("qwen2_moe", "deepseek_v2", "deepseek_v3")
    dense = 2 - n_moe
    assert ops.count("mlp") == dense + (n_moe if shared else 0)
    assert ops.count("add") == 2 * 2 + (n_moe if shared else 0)
    for n in g.nodes_of("router"):
        assert g.values[n.outputs[0]].shape == ["batch", "seq", 2] and g.values[n.outputs[0]].dtype == "float32"
        assert g.values[n.outputs[1]].dtype == "int32"
    for n in g.nodes:
        if n.op in ("rms_norm", "attention", "mlp", "moe_experts", "add", "embedding"):
            assert g.values[n.outputs[0]].shape == ["batch", "seq", 64], n.name
    cfg = g.config
    assert cfg["model_type"] == arch and cfg["vocab_size"] == 256 and cfg["hidden_size"] == 64
    assert cfg["num_hidden_layers"] == 2 and cfg["max_position_embeddings"] == 256
    assert cfg["tie_word_embeddings"] is False
    assert isinstance(cfg["eos_token_id"], list) and all(isinstance(i, int) for i in cfg["eos_token_id"])
    assert "bos_token_id" in cfg and "pad_token_id" in cfg
    assert cfg["hf_config"] == json.loads((tiny_models[arch] / "config.json").read_text())
    assert all(w.format is None for w in g.weights.values())
    inv = g.weights["model.rotary_emb.inv_freq"]
    assert "values" in inv.source and inv.dtype == "float32"
    assert g.weights["lm_head.weight"].source == {"load": "lm_head.weight"}


def test_qwen3_attention_and_router(captured):
    g = captured["qwen3_moe"]
    attn = g.nodes_of("attention")[0]
    assert attn.attrs["kind"] == "gqa"
    assert {k: attn.attrs[k] for k in ("num_heads", "num_kv_heads", "head_dim")} == \
        {"num_heads": 4, "num_kv_heads": 2, "head_dim": 32}
    assert attn.attrs["scaling"] == 32 ** -0.5 and attn.attrs["qk_norm_eps"] == 1e-6
    assert attn.attrs["sliding_window"] is None
    assert set(attn.weights) == {"q", "k", "v", "o", "q_norm", "k_norm"}
    assert attn.weights["q_norm"] == "model.layers.0.self_attn.q_norm.weight"
    assert g.weights["model.layers.0.self_attn.q_norm.weight"].shape == [32]
    r = g.nodes_of("router")[0]
    assert r.attrs["scoring"] == "softmax" and r.attrs["topk_method"] == "greedy"
    assert r.attrs["norm_topk_prob"] is True and r.attrs["routed_scaling_factor"] == 1.0
    assert r.weights == {"weight": "model.layers.0.mlp.gate.weight"}
    ex = g.nodes_of("moe_experts")[0]
    assert ex.attrs == {"num_experts": 8, "hidden_size": 64, "intermediate_size": 32, "top_k": 2, "act": "silu"}
    assert g.weights[ex.weights["gate_up"]].shape == [8, 64, 64]
    assert g.weights[ex.weights["down"]].shape == [8, 64, 32]


def test_qwen2_biases_and_gated_shared_expert(captured):
    g = captured["qwen2_moe"]
    attn = g.nodes_of("attention")[0]
    assert set(attn.weights) == {"q", "k", "v", "o", "q_bias", "k_bias", "v_bias"}
    assert "qk_norm_eps" not in attn.attrs
    assert g.nodes_of("router")[0].attrs["norm_topk_prob"] is False
    shared = [n for n in g.nodes_of("mlp") if n.name.endswith("shared_experts")]
    assert len(shared) == 2
    assert shared[0].weights["output_gate"] == "model.layers.0.mlp.shared_expert_gate.weight"
    assert g.weights["model.layers.0.mlp.shared_expert_gate.weight"].shape == [1, 64]
    assert shared[0].weights["gate"] == "model.layers.0.mlp.shared_expert.gate_proj.weight"
    add = g.producers()["layers.0.mlp"]
    assert add.op == "add" and add.inputs == ["layers.0.mlp.experts", "layers.0.mlp.shared_experts"]


def test_mixtral_keys(captured):
    g = captured["mixtral"]
    r = g.nodes_of("router")[0]
    assert r.weights["weight"] == "model.layers.0.block_sparse_moe.gate.weight"
    assert r.attrs["norm_topk_prob"] is True
    gate_up = g.weights["model.layers.0.mlp.experts.gate_up"].source
    assert gate_up["stack"][3] == {"concat": [{"load": "model.layers.0.block_sparse_moe.experts.3.w1.weight"},
                                              {"load": "model.layers.0.block_sparse_moe.experts.3.w3.weight"}],
                                   "dim": 0}
    down = g.weights["model.layers.0.mlp.experts.down"].source
    assert down["stack"][5] == {"load": "model.layers.0.block_sparse_moe.experts.5.w2.weight"}


def test_deepseek_v2_mla_and_router(captured):
    g = captured["deepseek_v2"]
    attn = g.nodes_of("attention")[0]
    assert attn.attrs["kind"] == "mla" and attn.attrs["q_lora_rank"] is None
    assert "q" in attn.weights and "q_a" not in attn.weights and "q_b" not in attn.weights
    assert set(attn.weights) == {"q", "kv_a", "kv_a_norm", "kv_b", "o"}
    assert attn.attrs["rope_interleave"] is True
    assert attn.attrs["scaling"] == pytest.approx((16 + 16) ** -0.5)
    assert {k: attn.attrs[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")} == \
        {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32}
    assert g.values["cos"].shape == ["batch", "seq", 16]
    r = g.nodes_of("router")[0]
    assert r.attrs["scoring"] == "softmax" and r.attrs["topk_method"] == "group_limited_greedy"
    assert (r.attrs["n_group"], r.attrs["topk_group"]) == (2, 1)
    assert r.attrs["norm_topk_prob"] is False and r.attrs["routed_scaling_factor"] == 1.5
    assert "bias" not in r.weights


def test_deepseek_v3_router_and_dense_first_layer(captured):
    g = captured["deepseek_v3"]
    attn = g.nodes_of("attention")[0]
    assert attn.attrs["q_lora_rank"] == 32
    assert {"q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o"} == set(attn.weights)
    r = g.nodes_of("router")[0]
    assert r.name.startswith("layers.1.")
    assert r.attrs["scoring"] == "sigmoid" and r.attrs["topk_method"] == "noaux_tc"
    assert r.attrs["norm_topk_prob"] is True and r.attrs["routed_scaling_factor"] == 1.5
    assert r.weights["bias"] == "model.layers.1.mlp.gate.e_score_correction_bias"
    assert g.weights[r.weights["bias"]].shape == [8]
    first = g.producers()["layers.0.mlp"]
    assert first.op == "mlp" and first.weights == {
        "gate": "model.layers.0.mlp.gate_proj.weight", "up": "model.layers.0.mlp.up_proj.weight",
        "down": "model.layers.0.mlp.down_proj.weight"}
    assert g.weights["model.layers.0.mlp.gate_proj.weight"].shape == [96, 64]
    shared = g.producers()["layers.1.mlp.shared_experts"]
    assert shared.weights["down"] == "model.layers.1.mlp.shared_experts.down_proj.weight"


# -- weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sources_evaluate_to_declared_shapes(arch, captured, tiny_models, hf_models):
    g = captured[arch]
    ckpt = Checkpoint(tiny_models[arch])
    for w in g.weights.values():
        t = evaluate_source(ckpt, w.source)
        assert list(t.shape) == w.shape, w.name
        assert str(t.dtype).removeprefix("torch.") == w.dtype, w.name
    # the stacked experts are exactly transformers' fused parameters
    model = hf_models[arch]
    for layer in range(2):
        mlp = model.model.layers[layer].mlp
        if not hasattr(mlp, "experts"):
            continue
        for ours, theirs in (("gate_up", mlp.experts.gate_up_proj), ("down", mlp.experts.down_proj)):
            w = g.weights[f"model.layers.{layer}.mlp.experts.{ours}"]
            assert torch.equal(evaluate_source(ckpt, w.source), theirs.detach()), (layer, ours)
    inv = model.model.rotary_emb.inv_freq
    assert torch.equal(evaluate_source(ckpt, g.weights["model.rotary_emb.inv_freq"].source), inv.float())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_json_round_trip(arch, captured):
    g = captured[arch]
    back = Graph.from_json(g.to_json())
    back.validate()
    assert back.to_dict() == g.to_dict()
    assert str(back) == str(g)


# -- numerics: the reference interpreter of the IR against transformers --------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch, captured, tiny_models, hf_models):
    errs = logits_errors(captured[arch], tiny_models[arch], hf_models[arch])
    assert max(errs.values()) < TOL, errs


VARIANTS = {
    # DeepSeek-V2-Lite shape: yarn rope with mscale (scaling = qk_head_dim^-0.5 * mscale^2), greedy, q_lora
    "deepseek_v2_yarn_greedy_qlora": ("deepseek_v2", dict(
        topk_method="greedy", q_lora_rank=32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707})),
    # yarn where attention_factor != 1 (mscale != mscale_all_dim): rope scaling attr
    "deepseek_v3_yarn_rotate_half": ("deepseek_v3", dict(
        rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 0.5})),
    "qwen2_moe_dense_layer_sliding": ("qwen2_moe", dict(
        mlp_only_layers=[1], use_sliding_window=True, sliding_window=4, max_window_layers=2,
        layer_types=["sliding_attention", "full_attention"])),
    "qwen3_moe_tied_sliding": ("qwen3_moe", dict(tie_word_embeddings=True, use_sliding_window=True,
                                                 sliding_window=4, attention_bias=True)),
    "mixtral_sliding": ("mixtral", dict(sliding_window=4)),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    cache = {}

    def get(name):
        if name not in cache:
            arch, overrides = VARIANTS[name]
            d = make_variant(root / name, arch, seed=3, **overrides)
            cache[name] = (d, capture(d))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_logits_match_transformers(name, variants):
    d, g = variants(name)
    errs = logits_errors(g, d, load_hf(d), offset=3)
    assert max(errs.values()) < TOL, errs


def test_variant_attrs(variants):
    _, g = variants("deepseek_v2_yarn_greedy_qlora")
    attn = g.nodes_of("attention")[0]
    mscale = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert attn.attrs["scaling"] == pytest.approx(32 ** -0.5 * mscale * mscale, rel=1e-6)
    assert attn.attrs["q_lora_rank"] == 32 and attn.attrs["rope_interleave"] is True
    r = g.nodes_of("router")[0]
    assert r.attrs["topk_method"] == "greedy" and (r.attrs["n_group"], r.attrs["topk_group"]) == (1, 1)

    _, g = variants("deepseek_v3_yarn_rotate_half")
    assert g.nodes_of("attention")[0].attrs["rope_interleave"] is False
    assert g.nodes_of("rope")[0].attrs["scaling"] != 1.0

    _, g = variants("qwen2_moe_dense_layer_sliding")
    assert [n.attrs["sliding_window"] for n in g.nodes_of("attention")] == [4, None]
    dense = g.producers()["layers.1.mlp"]
    assert dense.op == "mlp" and "output_gate" not in dense.weights
    assert g.weights[dense.weights["gate"]].shape == [96, 64]
    assert len(g.nodes_of("router")) == 1

    _, g = variants("qwen3_moe_tied_sliding")
    assert g.config["tie_word_embeddings"] is True
    assert g.weights["lm_head.weight"].source == {"load": "model.embed_tokens.weight"}
    assert [n.attrs["sliding_window"] for n in g.nodes_of("attention")] == [4, 4]
    assert {"q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"} <= set(g.nodes_of("attention")[0].weights)


def test_fused_expert_keys(tmp_path, tiny_models, captured, hf_models):
    """A checkpoint in transformers 5's own layout (mlp.experts.gate_up_proj / down_proj)."""
    from safetensors.torch import load_file, save_file

    src = tiny_models["qwen3_moe"]
    tensors = load_file(str(src / "model.safetensors"))
    model = hf_models["qwen3_moe"]
    for layer in range(2):
        for k in [k for k in tensors if f"layers.{layer}.mlp.experts." in k]:
            del tensors[k]
        experts = model.model.layers[layer].mlp.experts
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = experts.gate_up_proj.detach().clone()
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = experts.down_proj.detach().clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "config.json")
    g = capture(tmp_path)
    assert g.weights["model.layers.1.mlp.experts.gate_up"].source == {
        "load": "model.layers.1.mlp.experts.gate_up_proj"}
    assert g.weights["model.layers.1.mlp.experts.down"].source == {"load": "model.layers.1.mlp.experts.down_proj"}
    same = captured["qwen3_moe"]
    assert [n.op for n in g.nodes] == [n.op for n in same.nodes]
    errs = logits_errors(g, tmp_path, model)
    assert max(errs.values()) < TOL, errs


def test_bf16_checkpoint_dtypes(tmp_path):
    d = make_variant(tmp_path / "m", "mixtral", dtype="bfloat16")
    g = capture(d)
    assert g.weights["model.rotary_emb.inv_freq"].dtype == "float32"
    assert {w.dtype for n, w in g.weights.items() if n != "model.rotary_emb.inv_freq"} == {"bfloat16"}


def test_weights_free(tmp_path, tiny_models, captured):
    shutil.copy(tiny_models["deepseek_v3"] / "config.json", tmp_path / "config.json")
    g = capture(tmp_path, weights_free=True)
    ref = captured["deepseek_v3"]
    assert str(g) == str(ref)
    assert {n: w.source for n, w in g.weights.items()} == {n: w.source for n, w in ref.weights.items()}
    with pytest.raises(KtcError, match="no \\*.safetensors"):
        capture(tmp_path)


# -- errors --------------------------------------------------------------------------------


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(KtcError) as e:
        capture(tmp_path)
    msg = e.value.message
    assert "llama" in msg and "\n" not in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_missing_config(tmp_path):
    with pytest.raises(KtcError, match="config.json"):
        capture(tmp_path)
    with pytest.raises(KtcError, match="not a folder"):
        capture(tmp_path / "nope")


def test_quantized_checkpoint_refused(tmp_path, tiny_models):
    cfg = json.loads((tiny_models["deepseek_v3"] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtcError, match="fp8"):
        capture(tmp_path, weights_free=True)


def test_missing_tensor(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    src = tiny_models["deepseek_v2"]
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(KtcError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        capture(tmp_path)
    capture(tmp_path, weights_free=True)   # no header checks


def test_shape_mismatch(tmp_path, tiny_models):
    src = tiny_models["qwen3_moe"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["moe_intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(KtcError, match=r"experts\.gate_up .*shape \[8, 64, 64\] in the checkpoint .*\[8, 128, 64\]"):
        capture(tmp_path)
