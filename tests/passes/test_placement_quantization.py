import dataclasses

import pytest

from ktc.errors import KtcError
from ktc.passes.expert_split import expert_split
from ktc.passes.manager import PassContext, PassManager
from ktc.passes.placement import (
    DEFAULT_MAX_CONTEXT,
    GPU_RESERVE_BYTES,
    expert_cpu_bytes,
    expert_cpu_int8_bytes,
    expert_gpu_bytes,
    gpu_model_bytes,
    gpu_resident_bytes,
    kv_cache_bytes,
    placement,
)
from ktc.passes.quantization import expert_group_size, quantization
from ktc.rules import parse_rules
from tests.passes.graphs import E, one_layer_moe


def test_cpu_target_places_everything_on_the_cpu():
    g = placement(one_layer_moe(), PassContext(target="cpu"))
    assert {n.device for n in g.nodes} == {"cpu"}
    assert {w.device for w in g.weights.values()} == {"cpu"}


def test_gpu_target_places_everything_on_the_gpu_when_it_fits():
    g = placement(one_layer_moe(), PassContext(target="cuda", quant="none"))
    assert {n.device for n in g.nodes} == {"cuda"}
    assert {w.device for w in g.weights.values()} == {"cuda"}
    expert = 8 * (2 * 32 * 64 + 64 * 32) * 4
    total = sum(w.numel * 4 for w in g.weights.values())
    assert gpu_resident_bytes(g) == total - expert


def test_gpu_model_bytes_counts_what_the_gpu_stores():
    g = one_layer_moe()
    need = gpu_model_bytes(g, "none")
    assert need == sum(w.numel * 2 for w in g.weights.values())        # stored bf16
    assert gpu_model_bytes(g, "int4") < need


def _budget(g, experts_on_gpu: int, quant: str = "none", cpu_quant: str = "int8") -> int:
    moe = g.nodes_of("moe_experts")[0]
    dense = gpu_model_bytes(g, quant) - int(expert_gpu_bytes(moe, quant) * E)
    stream = (E - experts_on_gpu) * expert_cpu_int8_bytes(moe) if cpu_quant == "int8" else 0
    return int(dense + kv_cache_bytes(g, DEFAULT_MAX_CONTEXT) + GPU_RESERVE_BYTES + stream
               + experts_on_gpu * expert_gpu_bytes(moe, quant))


def test_gpu_budget_puts_the_experts_that_do_not_fit_on_the_cpu():
    g = one_layer_moe()
    out = placement(g, PassContext(target="cuda", quant="int8", gpu_memory_bytes=_budget(g, 3)))
    moe = out.nodes_of("moe_experts")[0]
    assert moe.device == "mixed" and moe.attrs["gpu_experts"] == [0, 1, 2]
    assert {n.device for n in out.nodes if n.op != "moe_experts"} == {"cuda"}
    plan = out.config["placement"]
    assert (plan["gpu_experts"], plan["cpu_experts"]) == (3, E - 3)
    assert plan["gpu_bytes_planned"] <= _budget(g, 3)
    moe_in = g.nodes_of("moe_experts")[0]
    assert plan["stream_buffer_bytes"] == (E - 3) * expert_cpu_int8_bytes(moe_in)    # one layer's CPU experts
    int4 = placement(g, PassContext(target="cuda", quant="int4", gpu_memory_bytes=_budget(g, 3)))
    n4 = int4.nodes_of("moe_experts")[0]                        # int4 GPU experts are smaller: more fit,
    gpu4 = E if n4.device == "cuda" else len(n4.attrs["gpu_experts"])
    assert gpu4 > 3                                             # and int4 CPU experts stream at half the bytes
    assert int4.config["placement"]["stream_buffer_bytes"] == (E - gpu4) * expert_cpu_bytes(moe_in, "int4")
    assert expert_cpu_bytes(moe_in, "int4") < expert_cpu_int8_bytes(moe_in)
    no_stream = placement(g, PassContext(target="cuda", quant="none", gpu_memory_bytes=_budget(g, 3)))
    assert no_stream.config["placement"]["stream_buffer_bytes"] == 0                # float CPU experts: no buffer,
    ns = no_stream.nodes_of("moe_experts")[0]                                       # room for more GPU experts
    assert ns.device == "cuda" or len(ns.attrs["gpu_experts"]) > 3
    everything = placement(g, PassContext(target="cuda", gpu_memory_bytes=_budget(g, E)))
    assert everything.nodes_of("moe_experts")[0].device == "cuda"
    nothing = placement(g, PassContext(target="cuda", gpu_memory_bytes=_budget(g, 0)))
    assert nothing.nodes_of("moe_experts")[0].device == "cpu"


def test_gpu_part_that_does_not_fit_is_refused_with_the_size_it_needs():
    g = one_layer_moe()
    with pytest.raises(KtcError, match=r"the GPU part needs 0\.50 GiB .*KV cache for 4096 tokens.*raise --gpu-memory"):
        placement(g, PassContext(target="cuda", quant="none", gpu_memory_bytes=_budget(g, 0, cpu_quant="none") - 1))


def test_calibration_puts_the_hottest_experts_on_the_gpu():
    g = one_layer_moe()
    counts = [1, 50, 3, 40, 2, 30, 0, 5]
    out = placement(g, PassContext(target="cuda", gpu_memory_bytes=_budget(g, 3),
                                   options={"calibration": {0: counts}}))
    moe = out.nodes_of("moe_experts")[0]
    assert moe.attrs["gpu_experts"] == [1, 3, 5]
    assert moe.attrs["expert_load"] == pytest.approx([c / sum(counts) for c in counts])
    with pytest.raises(KtcError, match="calibrate this model again"):
        placement(g, PassContext(target="cuda", options={"calibration": {0: [1, 2]}}))


def test_rules_pin_experts_and_set_formats():
    g = one_layer_moe()
    rules = parse_rules([{"match": r"experts\.(6|7)$", "device": "cuda"},
                         {"match": r"experts\.0$", "device": "cpu"},
                         {"match": r"experts\.cpu$", "format": "int4"}])
    ctx = PassContext(target="cuda", quant="int8", gpu_memory_bytes=_budget(g, 4), options={"placement_rules": rules})
    out = PassManager([placement, expert_split, quantization]).run(g, ctx)
    gpu, cpu = (next(n for n in out.nodes if n.name == f"l0.experts.{d}") for d in ("gpu", "cpu"))
    assert gpu.attrs["experts"][-2:] == [6, 7] and 0 not in gpu.attrs["experts"]
    assert len(gpu.attrs["experts"]) == 4 and 0 in cpu.attrs["experts"]
    assert (gpu.format, cpu.format) == ("bfloat16", "int4")


def test_gpu_experts_are_bf16_with_int4_on_request():
    g = one_layer_moe()
    ctx = PassContext(target="cuda", quant="int8", gpu_quant="int4",
                      gpu_memory_bytes=_budget(g, 2, "int4", cpu_quant="none"))
    out = PassManager([placement, expert_split, quantization]).run(g, ctx)
    formats = {n.name: n.format for n in out.nodes_of("moe_experts")}
    assert formats == {"l0.experts.cpu": "int8", "l0.experts.gpu": "int4"}


def test_gpu_quantization_is_bf16_with_int4_experts_on_request():
    g = PassManager([placement, quantization]).run(one_layer_moe(), PassContext(target="cuda", quant="int4"))
    moe = g.nodes_of("moe_experts")[0]
    assert moe.format == "int4" and g.weights[moe.weights["gate_up"]].group_size == 32
    assert g.weights["q"].format == "bfloat16" and g.weights["inv_freq"].format == "float32"
    g = PassManager([placement, quantization]).run(one_layer_moe(), PassContext(target="cuda", quant="int8"))
    assert g.nodes_of("moe_experts")[0].format == "bfloat16"      # int8 is a CPU format: GPU experts stay bf16
    with pytest.raises(KtcError, match="run only on the CPU"):
        PassManager([placement, quantization]).run(one_layer_moe(), PassContext(target="cuda", gpu_quant="int8"))


def test_placement_rule_that_names_another_device_is_refused():
    with pytest.raises(KtcError, match="placement rule"):
        placement(one_layer_moe(), PassContext(options={"placement_rules": {r"experts$": "cuda"}}))
    with pytest.raises(KtcError, match="only routed experts can run on the CPU"):
        placement(one_layer_moe(), PassContext(target="cuda", options={"placement_rules": {r"attn$": "cpu"}}))
    g = placement(one_layer_moe(), PassContext(target="cuda", options={"placement_rules": {r"experts$": "cpu"}}))
    assert g.nodes_of("moe_experts")[0].device == "cpu"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_cpu_experts_are_quantized_group_wise_and_the_rest_keeps_its_dtype(quant):
    g = PassManager([placement, quantization]).run(one_layer_moe(), PassContext(quant=quant))
    moe = g.nodes_of("moe_experts")[0]
    assert moe.format == quant
    for role in ("gate_up", "down"):
        w = g.weights[moe.weights[role]]
        assert (w.format, w.group_size) == (quant, 32)
    assert g.weights["q"].format == "float32" and g.weights["q"].group_size is None


def test_quant_none_keeps_the_checkpoint_dtype():
    g = PassManager([placement, quantization]).run(one_layer_moe("bfloat16"), PassContext(quant="none"))
    assert g.nodes_of("moe_experts")[0].format == "bfloat16"


def test_group_size_is_the_largest_dividing_both_dims():
    assert expert_group_size(2048, 768) == 128
    assert expert_group_size(2048, 1408) == 128
    assert expert_group_size(64, 96) == 32
    with pytest.raises(KtcError, match="--quant none"):
        expert_group_size(100, 64)


def test_group_size_option():
    """--group-size picks the experts' group when it divides both K dims (CPU and GPU experts alike)."""
    assert expert_group_size(2048, 768, 32) == 32 and expert_group_size(2048, 1408, 64) == 64
    with pytest.raises(KtcError, match="--group-size 48 is not one of 128, 64, 32"):
        expert_group_size(2048, 768, 48)
    with pytest.raises(KtcError, match="does not divide the experts' hidden size 64 and intermediate size 96: "
                                       "choose 32"):
        expert_group_size(64, 96, 64)
    g = quantization(one_layer_moe(), PassContext(quant="int8"))
    moe = next(iter(g.nodes_of("moe_experts")))
    assert {g.weights[moe.weights[r]].group_size for r in ("gate_up", "down")} == {32}
    with pytest.raises(KtcError, match="--group-size 64 does not divide"):
        quantization(one_layer_moe(), PassContext(quant="int8", group_size=64))
    # placement's byte counts follow the group: a float32 scale per 32 values instead of per 128
    big = dataclasses.replace(moe, attrs={**moe.attrs, "hidden_size": 2048, "intermediate_size": 768})
    scales = 3 * 2048 * 768 * 4 * (1 / 32 - 1 / 128)
    assert expert_cpu_bytes(big, "int8", 32) - expert_cpu_bytes(big, "int8") == scales
    assert expert_gpu_bytes(big, "fp8", 32) - expert_gpu_bytes(big, "fp8") == pytest.approx(scales)


def test_unknown_quant_is_refused():
    with pytest.raises(KtcError, match="not one of"):
        quantization(one_layer_moe(), PassContext(quant="int3"))


def test_pass_manager_runs_instruments_after_each_pass():
    seen = []
    PassManager([placement, quantization], [lambda name, g: seen.append(name)]).run(one_layer_moe(), PassContext())
    assert seen == ["input", "placement", "quantization"]


def test_budget_for_expert_share_places_that_share_of_the_experts():
    from ktc.passes.placement import budget_for_expert_share

    g = one_layer_moe()
    for share, want in ((0.0, 0), (0.5, E // 2), (1.0, E)):
        out = placement(g, PassContext(target="cuda", quant="none", gpu_memory_bytes=budget_for_expert_share(g, share)))
        assert out.config["placement"]["gpu_experts"] == want
