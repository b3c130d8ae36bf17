import pytest

from ktc.errors import KtcError
from ktc.passes.manager import PassContext, PassManager
from ktc.passes.placement import gpu_model_bytes, gpu_resident_bytes, placement
from ktc.passes.quantization import expert_group_size, quantization
from tests.passes.graphs import one_layer_moe


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


def test_gpu_target_over_budget_is_refused_with_the_size_it_needs():
    g = one_layer_moe()
    need = gpu_model_bytes(g, "none")
    assert need == sum(w.numel * 2 for w in g.weights.values())        # stored bf16
    placement(g, PassContext(target="cuda", quant="none", gpu_memory_bytes=need))
    with pytest.raises(KtcError, match=r"needs 0\.00 GiB of GPU memory.*more than --gpu-memory"):
        placement(g, PassContext(target="cuda", quant="none", gpu_memory_bytes=need - 1))
    assert gpu_model_bytes(g, "int4") < need


def test_gpu_quantization_is_bf16_with_int4_experts_on_request():
    g = PassManager([placement, quantization]).run(one_layer_moe(), PassContext(target="cuda", quant="int4"))
    moe = g.nodes_of("moe_experts")[0]
    assert moe.format == "int4" and g.weights[moe.weights["gate_up"]].group_size == 32
    assert g.weights["q"].format == "bfloat16" and g.weights["inv_freq"].format == "float32"
    with pytest.raises(KtcError, match="run only on the CPU"):
        PassManager([placement, quantization]).run(one_layer_moe(), PassContext(target="cuda", quant="int8"))


def test_placement_rule_that_names_another_device_is_refused():
    with pytest.raises(KtcError, match="placement rule"):
        placement(one_layer_moe(), PassContext(options={"placement_rules": {r"experts$": "cuda"}}))
    with pytest.raises(KtcError, match="placement rule"):
        placement(one_layer_moe(), PassContext(target="cuda", options={"placement_rules": {r"experts$": "cpu"}}))


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


def test_unknown_quant_is_refused():
    with pytest.raises(KtcError, match="not one of"):
        quantization(one_layer_moe(), PassContext(quant="int3"))


def test_pass_manager_runs_instruments_after_each_pass():
    seen = []
    PassManager([placement, quantization], [lambda name, g: seen.append(name)]).run(one_layer_moe(), PassContext())
    assert seen == ["input", "placement", "quantization"]
