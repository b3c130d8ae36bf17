"""--gpu-dense-quant int4: which GPU weights the quantization pass stores int4 w4a16, the option's
errors, rules with `format` on dense nodes, and the placement pass's byte accounting."""

from __future__ import annotations

import pytest

from ktc.errors import KtcError
from ktc.ir import Graph, Node, Value, Weight
from ktc.passes.fusion import fusion
from ktc.passes.kernel_selection import kernel_selection
from ktc.passes.manager import PassContext, PassManager
from ktc.passes.placement import (
    DEFAULT_MAX_CONTEXT,
    GPU_RESERVE_BYTES,
    expert_gpu_bytes,
    gpu_model_bytes,
    kv_cache_bytes,
    placement,
)
from ktc.passes.quantization import quantization
from tests.passes.graphs import E, H, one_layer_moe

PIPELINE = [placement, quantization, fusion, kernel_selection]


def with_extra_linears() -> Graph:
    """one_layer_moe plus three linear nodes: `proj` (with a bias), `odd` (K = 48: no group divides it)
    and `tied` (reads the embedding table)."""
    g = one_layer_moe()
    for name, shape in (("proj", [H, H]), ("proj.bias", [H]), ("odd", [8, 48])):
        g.weights[name] = Weight(name, shape, "float32", {"load": name})
    for v in ("p0", "p1", "p2"):
        g.values[v] = Value(v, ["batch", "seq", H], "float32")
    g.nodes[-1:-1] = [Node("l0.proj", "linear", ["n2"], ["p0"], {"weight": "proj", "bias": "proj.bias"}),
                      Node("l0.odd", "linear", ["n2"], ["p1"], {"weight": "odd"}),
                      Node("l0.tied", "linear", ["n2"], ["p2"], {"weight": "embed"})]
    g.validate()
    return g


def run(graph: Graph, **ctx) -> Graph:
    return PassManager(PIPELINE).run(graph, PassContext(**{"target": "cuda", "quant": "none", **ctx}))


def formats(g: Graph) -> dict[str, tuple]:
    return {n: (w.format, w.group_size) for n, w in g.weights.items()}


def test_int4_quantizes_the_gpu_dense_linears_and_nothing_else():
    from ktc.codegen.gpu import matmul

    g = run(with_extra_linears(), gpu_dense_quant="int4")
    f = formats(g)
    gate_up = g.nodes_of("mlp")[0].weights["gate_up"]           # fusion kept the format and the group
    int4 = {"q": 64, "k": 64, "v": 64, "o": 64, gate_up: 64, "shared.down_proj.weight": 32, "proj": 64}
    assert {n: fg for n, fg in f.items() if fg[0] == "int4"} == {n: ("int4", grp) for n, grp in int4.items()}
    assert all(g.weights[n].layout == "gpu_w4a16" for n in int4)
    for name in ("embed", "norm0", "normf", "router", "lm_head", "proj.bias", "odd", "experts.gate_up"):
        assert f[name] == ("bfloat16", None), name                  # never: embeddings, norms, router, head...
    assert f["inv_freq"] == ("float32", None)
    nodes = {n.name: n for n in g.nodes}
    assert nodes["l0.attn"].format == nodes["l0.shared"].format == nodes["l0.proj"].format == "int4"
    assert nodes["l0.proj"].kernel == "matmul.linear_w4a16" and nodes["lm_head"].kernel == "matmul.linear"
    assert nodes["lm_head"].format is None and nodes["l0.tied"].format is None and nodes["l0.odd"].format is None
    cfg = nodes["l0.attn"].attrs["gpu_config"]["decode"]
    assert cfg["qkv"] == matmul.default_config_w4a16(1, 3 * H, H)
    assert nodes["lm_head"].attrs["gpu_config"]["decode"]["linear"] == matmul.default_config(1, 128, H)


def test_bf16_by_default_and_on_the_cpu():
    for g in (run(with_extra_linears()), run(with_extra_linears(), target="cpu", quant="int8", gpu_dense_quant="int4")):
        assert not any(w.format == "int4" for n, w in g.weights.items() if not n.startswith("experts."))
        assert not any(w.layout == "gpu_w4a16" for w in g.weights.values())


def test_a_bad_option_value_is_one_line():
    from ktc.compiler import compile_model

    with pytest.raises(KtcError) as e:
        run(one_layer_moe(), gpu_dense_quant="int8")
    assert e.value.message == "--gpu-dense-quant 'int8' is not one of none, int4, fp8"
    with pytest.raises(KtcError) as e:
        compile_model("no-such-model", "out.ktc", target="cuda", gpu_dense_quant="fp16")
    assert e.value.message == "--gpu-dense-quant 'fp16' is not one of none, int4, fp8"


def test_the_cli_option_reaches_the_compiler(capsys, tmp_path):
    from ktc.cli import main

    rc = main(["compile", str(tmp_path), "-o", str(tmp_path / "o.ktc"), "--target", "cuda",
               "--gpu-dense-quant", "w8"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error:")
    assert "--gpu-dense-quant 'w8' is not one of none, int4" in lines[0]


def test_rules_set_the_format_of_matching_dense_nodes():
    def int4_of(g):
        return {n for n, w in g.weights.items() if w.format == "int4"}

    only_attn = run(one_layer_moe(), options={"placement_rules": [{"match": r"attn$", "format": "int4"}]})
    assert int4_of(only_attn) == {"q", "k", "v", "o"}
    no_shared = run(one_layer_moe(), gpu_dense_quant="int4",
                    options={"placement_rules": [{"match": r"shared$", "format": "none"}]})
    assert int4_of(no_shared) == {"q", "k", "v", "o"}
    cpu_format = run(one_layer_moe(), options={"placement_rules": [{"match": r"attn$", "format": "int8"}]})
    assert int4_of(cpu_format) == set() and cpu_format.weights["q"].format == "bfloat16"   # int8: CPU experts'
    head = run(one_layer_moe(), options={"placement_rules": [{"match": "lm_head", "format": "int4"}]})
    assert int4_of(head) == set()                                   # the lm_head decides the tokens: bf16


def _int4_savings(g: Graph) -> int:
    """Bytes bf16 minus packed int4 (values + float32 scales) over the int4 weights of a quantized graph,
    counted on the checkpoint's weights (gate and up, not the fused gate_up)."""
    saved = 0
    for w in g.weights.values():
        if w.format == "int4" and not w.name.startswith("experts."):
            saved += w.numel * 2 - (w.numel // 2 + w.numel // w.group_size * 4)
    return saved


def test_placement_counts_int4_dense_weights_at_their_packed_size():
    g = one_layer_moe()
    bf16 = placement(g, PassContext(target="cuda", quant="none")).config["placement"]
    int4 = placement(g, PassContext(target="cuda", quant="none", gpu_dense_quant="int4")).config["placement"]
    saved = _int4_savings(run(one_layer_moe(), gpu_dense_quant="int4"))
    assert saved == 4 * (64 * 64 * 2 - (64 * 32 + 64 * 4)) + (2 * 32 * 64 * 2 - (32 * 64 + 64 * 4)) \
        + (64 * 32 * 2 - (64 * 16 + 64 * 4))
    assert bf16["dense_gpu_bytes"] - int4["dense_gpu_bytes"] == saved
    assert int4["gpu_dense_format"] == "int4" and bf16["gpu_dense_format"] == "none"
    assert gpu_model_bytes(g, "none") - gpu_model_bytes(g, "none", "int4") == saved


def test_smaller_dense_weights_leave_room_for_more_gpu_experts():
    g = one_layer_moe()
    moe = g.nodes_of("moe_experts")[0]
    per_expert = expert_gpu_bytes(moe, "none")
    dense = gpu_model_bytes(g, "none") - int(per_expert * E)
    budget = int(dense + kv_cache_bytes(g, DEFAULT_MAX_CONTEXT) + GPU_RESERVE_BYTES + 3 * per_expert)
    counts = {}
    for dense_quant in ("none", "int4"):
        ctx = PassContext(target="cuda", quant="none", gpu_memory_bytes=budget, gpu_dense_quant=dense_quant)
        plan = placement(g, ctx).config["placement"]
        assert plan["gpu_bytes_planned"] <= budget
        counts[dense_quant] = plan["gpu_experts"]
    saved = _int4_savings(run(one_layer_moe(), gpu_dense_quant="int4"))
    assert counts == {"none": 3, "int4": 3 + int(saved // per_expert)} and counts["int4"] > 3


def test_random_weights_pack_the_int4_dense_weights():
    import torch

    from ktc.pack import random_weights, weight_units

    g = run(with_extra_linears(), gpu_dense_quant="int4")
    units = {u.names[0]: u.kind for u in weight_units(g)[0]}
    w = random_weights(g)
    for name, weight in g.weights.items():
        if weight.format == "int4":
            n, k = weight.shape
            assert units[name] == "gpu_w4a16" and set(w[name]) == {"qweight", "scales"}
            assert w[name]["qweight"].shape == (n, k // 2) and w[name]["qweight"].dtype == torch.uint8
            assert w[name]["scales"].shape == (n, k // weight.group_size)
            assert w[name]["scales"].dtype == torch.float32
        else:
            assert isinstance(w[name], torch.Tensor)
