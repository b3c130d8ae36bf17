from ktc.passes.expert_split import expert_split
from ktc.passes.manager import PassContext
from ktc.passes.placement import placement
from ktc.rules import parse_rules
from tests.passes.graphs import E, one_layer_moe


def _split(gpu_experts: list[int]):
    rules = parse_rules([{"match": rf"experts\.{e}$", "device": "cuda"} for e in gpu_experts]
                        + [{"match": r"experts$", "device": "cpu"}])
    ctx = PassContext(target="cuda", options={"placement_rules": rules})
    return expert_split(placement(one_layer_moe(), ctx), ctx)


def test_a_mixed_layer_becomes_a_cpu_node_a_gpu_node_and_an_add():
    g = _split([1, 4, 6])
    g.validate()
    names = [n.name for n in g.nodes]
    i = names.index("l0.experts.cpu")
    # CPU part first, then the GPU part; the shared experts run before the two are added
    assert names[i:i + 5] == ["l0.experts.cpu", "l0.experts.gpu", "l0.shared", "l0.experts.combine", "l0.moe_add"]
    cpu, gpu, combine = g.nodes[i], g.nodes[i + 1], g.nodes[i + 3]
    assert (cpu.device, gpu.device, combine.device) == ("cpu", "cuda", "cuda")
    assert gpu.attrs["experts"] == [1, 4, 6] and cpu.attrs["experts"] == [0, 2, 3, 5, 7]
    assert (gpu.attrs["num_experts"], cpu.attrs["num_experts"], gpu.attrs["num_global_experts"]) == (3, 5, E)
    assert combine.op == "add" and combine.inputs == [gpu.outputs[0], cpu.outputs[0]] and combine.outputs == ["m0"]
    gu = g.weights[gpu.weights["gate_up"]]
    assert gu.shape[0] == 3 and gu.source == {"take": {"load": "experts.gate_up"}, "index": [1, 4, 6]}
    assert gu.device == "cuda" and g.weights[cpu.weights["down"]].device == "cpu"
    assert "experts.gate_up" not in g.weights            # each expert is stored once, on its device


def test_layers_on_one_device_are_left_alone():
    g = _split([])
    assert [n.device for n in g.nodes_of("moe_experts")] == ["cpu"]
    assert "experts" not in g.nodes_of("moe_experts")[0].attrs
