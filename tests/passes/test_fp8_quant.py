"""--gpu-quant fp8 / --gpu-dense-quant fp8: which GPU weights the quantization pass stores fp8 (e4m3 values,
float32 scale per row and group of K), their layout and kernels, the options' errors, the placement pass's
byte accounting (a byte a value + scales), and the weight units / random weights that pack them."""

from __future__ import annotations

import pytest

from ktc.errors import KtcError
from ktc.ir import Graph
from ktc.passes.expert_split import expert_split
from ktc.passes.fusion import fusion
from ktc.passes.kernel_selection import kernel_selection
from ktc.passes.manager import PassContext, PassManager
from ktc.passes.placement import (
    DEFAULT_MAX_CONTEXT,
    GPU_RESERVE_BYTES,
    expert_gpu_bytes,
    fp8_bytes,
    gpu_model_bytes,
    kv_cache_bytes,
    placement,
)
from ktc.passes.quantization import quantization
from tests.passes.graphs import INTER, E, H, one_layer_moe
from tests.passes.test_dense_int4 import with_extra_linears

PIPELINE = [placement, expert_split, quantization, fusion, kernel_selection]


def run(graph: Graph, **ctx) -> Graph:
    return PassManager(PIPELINE).run(graph, PassContext(**{"target": "cuda", "quant": "none", **ctx}))


def formats(g: Graph) -> dict[str, tuple]:
    return {n: (w.format, w.group_size) for n, w in g.weights.items()}


def test_fp8_dense_linears_and_nothing_else():
    from ktc.codegen.gpu import matmul

    g = run(with_extra_linears(), gpu_dense_quant="fp8")
    f = formats(g)
    gate_up = g.nodes_of("mlp")[0].weights["gate_up"]           # fusion kept the format and the group
    fp8 = {"q": 64, "k": 64, "v": 64, "o": 64, gate_up: 64, "shared.down_proj.weight": 32, "proj": 64}
    assert {n: fg for n, fg in f.items() if fg[0] == "fp8"} == {n: ("fp8", grp) for n, grp in fp8.items()}
    assert all(g.weights[n].layout == "gpu_fp8" for n in fp8)
    for name in ("embed", "norm0", "normf", "router", "lm_head", "proj.bias", "odd", "experts.gate_up"):
        assert f[name] == ("bfloat16", None), name                  # never: embeddings, norms, router, head...
    nodes = {n.name: n for n in g.nodes}
    assert nodes["l0.attn"].format == nodes["l0.shared"].format == nodes["l0.proj"].format == "fp8"
    assert nodes["l0.proj"].kernel == "matmul.linear_fp8" and nodes["lm_head"].kernel == "matmul.linear"
    assert nodes["l0.experts"].kernel == "moe.fused_moe" and nodes["l0.experts"].format == "bfloat16"
    for phase, m in (("decode", 1), ("prefill", 2048)):
        cfg = nodes["l0.attn"].attrs["gpu_config"][phase]
        assert cfg["qkv"] == matmul.default_config_fp8(m, 3 * H, H) and cfg["o"] == matmul.default_config_fp8(m, H, H)
        assert nodes["l0.shared"].attrs["gpu_config"][phase]["down"] == matmul.default_config_fp8(m, H, INTER)
    assert nodes["lm_head"].attrs["gpu_config"]["decode"]["linear"] == matmul.default_config(1, 128, H)


def test_fp8_gpu_experts():
    from ktc.codegen.gpu import moe

    g = run(one_layer_moe(), gpu_quant="fp8")
    node = g.nodes_of("moe_experts")[0]
    assert node.format == "fp8" and node.kernel == "moe.fused_moe_fp8"
    for role in ("gate_up", "down"):
        w = g.weights[node.weights[role]]
        assert (w.format, w.group_size, w.layout) == ("fp8", 32, "gpu_fp8")
    assert node.attrs["gpu_config"]["decode"]["moe"] == moe.default_config(2, H, INTER, 32)
    assert g.weights["q"].format == "bfloat16" and g.weights["q"].layout is None   # dense stays bf16


def test_fp8_experts_and_int4_linears_mix_and_cpu_experts_keep_their_format():
    g = one_layer_moe()
    budget = _budget(g, 3, "fp8", "int4", stream=False)
    out = run(g, quant="none", gpu_quant="fp8", gpu_dense_quant="int4", gpu_memory_bytes=budget)
    fmts = {n.name: (n.format, n.kernel) for n in out.nodes_of("moe_experts")}
    assert fmts["l0.experts.gpu"] == ("fp8", "moe.fused_moe_fp8") and fmts["l0.experts.cpu"][0] == "float32"
    assert out.weights["q"].format == "int4" and out.weights["q"].layout == "gpu_w4a16"
    gpu = next(n for n in out.nodes_of("moe_experts") if n.device == "cuda")
    assert {out.weights[w].layout for w in gpu.weights.values()} == {"gpu_fp8"}
    assert out.config["placement"]["gpu_expert_format"] == "fp8" and len(gpu.attrs["experts"]) == 3


def test_bf16_by_default_and_nothing_fp8_on_the_cpu():
    for g in (run(with_extra_linears()),
              run(with_extra_linears(), target="cpu", quant="int8", gpu_quant="fp8", gpu_dense_quant="fp8")):
        assert not any(w.format == "fp8" or w.layout == "gpu_fp8" for w in g.weights.values())


def test_bad_option_values_are_one_line():
    from ktc.compiler import compile_model

    with pytest.raises(KtcError) as e:
        run(one_layer_moe(), gpu_dense_quant="fp16")
    assert e.value.message == "--gpu-dense-quant 'fp16' is not one of none, int4, fp8"
    with pytest.raises(KtcError) as e:
        compile_model("no-such-model", "out.ktc", target="cuda", gpu_quant="fp4")
    assert e.value.message == "--gpu-quant 'fp4' is not one of none, int4, fp8"
    with pytest.raises(KtcError) as e:
        compile_model("no-such-model", "out.ktc", target="cuda", gpu_dense_quant="e4m3")
    assert e.value.message == "--gpu-dense-quant 'e4m3' is not one of none, int4, fp8"
    with pytest.raises(KtcError, match=r"GPU experts are bf16 \(--gpu-quant none\), int4 w4a16 \(--gpu-quant int4\) "
                                       r"or fp8 \(--gpu-quant fp8\)"):
        run(one_layer_moe(), gpu_quant="int8")


@pytest.mark.parametrize("option,value", [("--gpu-quant", "fp16"), ("--gpu-dense-quant", "w8")])
def test_the_cli_options_reach_the_compiler(capsys, tmp_path, option, value):
    from ktc.cli import main

    rc = main(["compile", str(tmp_path), "-o", str(tmp_path / "o.ktc"), "--target", "cuda", option, value])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error:")
    assert f"{option} '{value}' is not one of none, int4, fp8" in lines[0]


# -- byte accounting -------------------------------------------------------------------------------------------
def _budget(g, experts_on_gpu: int, quant: str = "none", dense: str = "none", stream: bool = True) -> int:
    """The budget that fits `experts_on_gpu` experts in `quant` (and the int8 CPU experts' stream buffer)."""
    from ktc.passes.placement import expert_cpu_int8_bytes

    moe = g.nodes_of("moe_experts")[0]
    fixed = gpu_model_bytes(g, quant, dense) - int(expert_gpu_bytes(moe, quant) * E)
    stream = (E - experts_on_gpu) * expert_cpu_int8_bytes(moe) if stream else 0
    return int(fixed + kv_cache_bytes(g, DEFAULT_MAX_CONTEXT) + GPU_RESERVE_BYTES + stream
               + experts_on_gpu * expert_gpu_bytes(moe, quant))


def test_fp8_bytes_are_a_byte_a_value_plus_scales():
    moe = one_layer_moe().nodes_of("moe_experts")[0]
    numel = 3 * H * INTER
    assert expert_gpu_bytes(moe, "fp8") == numel * (1 + 4 / 128)
    assert expert_gpu_bytes(moe, "int4") < expert_gpu_bytes(moe, "fp8") < expert_gpu_bytes(moe, "none")
    assert fp8_bytes(64 * 128, 128) == 64 * 128 + 64 * 4


def test_placement_counts_fp8_dense_weights_at_their_packed_size():
    g = one_layer_moe()
    plans = {q: placement(g, PassContext(target="cuda", quant="none", gpu_dense_quant=q)).config["placement"]
             for q in ("none", "int4", "fp8")}
    quantized = run(one_layer_moe(), gpu_dense_quant="fp8")
    saved = sum(w.numel * 2 - fp8_bytes(w.numel, w.group_size) for w in quantized.weights.values()
                if w.format == "fp8")
    # q, k, v, o [64, 64] (group 64), shared gate / up [32, 64] (group 64), shared down [64, 32] (group 32)
    assert saved == 4 * (64 * 64 - 64 * 4) + 2 * (32 * 64 - 32 * 4) + (64 * 32 - 64 * 4)
    assert plans["none"]["dense_gpu_bytes"] - plans["fp8"]["dense_gpu_bytes"] == saved
    assert plans["int4"]["dense_gpu_bytes"] < plans["fp8"]["dense_gpu_bytes"] < plans["none"]["dense_gpu_bytes"]
    assert plans["fp8"]["gpu_dense_format"] == "fp8"
    assert gpu_model_bytes(g, "none") - gpu_model_bytes(g, "none", "fp8") == saved
    moe = g.nodes_of("moe_experts")[0]
    assert gpu_model_bytes(g, "none") - gpu_model_bytes(g, "fp8") == int(
        E * (expert_gpu_bytes(moe, "none") - expert_gpu_bytes(moe, "fp8")))


def test_fp8_experts_fill_the_budget_at_their_size():
    g = one_layer_moe()
    moe = g.nodes_of("moe_experts")[0]
    budget = _budget(g, 3, "none")
    counts = {}
    for quant in ("none", "fp8", "int4"):
        plan = placement(g, PassContext(target="cuda", quant="int8", gpu_quant=quant,
                                        gpu_memory_bytes=budget)).config["placement"]
        assert plan["gpu_bytes_planned"] <= budget and plan["gpu_expert_format"] == quant
        counts[quant] = plan["gpu_experts"]
    assert counts["none"] == 3 < counts["fp8"] <= counts["int4"]
    assert expert_gpu_bytes(moe, "fp8") * counts["fp8"] <= budget


def test_the_error_for_a_budget_too_small_names_the_dense_format():
    with pytest.raises(KtcError, match="with fp8 linears"):
        placement(one_layer_moe(), PassContext(target="cuda", quant="none", gpu_dense_quant="fp8",
                                                gpu_memory_bytes=1 << 20))


# -- packing -------------------------------------------------------------------------------------------------
def test_weight_units_and_random_weights_pack_fp8():
    import torch

    from ktc.pack import random_weights, weight_units

    g = run(with_extra_linears(), gpu_quant="fp8", gpu_dense_quant="fp8")
    units = {u.names[0]: u.kind for u in weight_units(g)[0]}
    w = random_weights(g)
    seen = 0
    for name, weight in g.weights.items():
        if weight.format == "fp8":
            *lead, k = weight.shape
            assert units[name] == "gpu_fp8" and set(w[name]) == {"qweight", "scales"}
            assert w[name]["qweight"].shape == (*lead, k) and w[name]["qweight"].dtype == torch.float8_e4m3fn
            assert w[name]["scales"].shape == (*lead, k // weight.group_size)
            deq = w[name]["qweight"].float() * w[name]["scales"].repeat_interleave(weight.group_size, -1)
            assert torch.isfinite(deq).all() and 0.01 < float(deq.std()) < 0.03      # std ~ 0.02
            seen += 1
        else:
            assert isinstance(w[name], torch.Tensor)
    assert seen == 9           # 7 dense linears (gate_up fused) and the experts' gate_up and down

