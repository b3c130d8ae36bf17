"""Before/After tests of the fusion rules."""

from ktc.passes.fusion import fusion
from ktc.passes.manager import PassContext
from tests.passes.graphs import one_layer_moe


def test_add_then_rms_norm_becomes_add_rms_norm_keeping_the_sum():
    before = one_layer_moe()
    after = fusion(before, PassContext(options={"fusion_rules": ["add_rms_norm"]}))
    ops = [n.op for n in after.nodes]
    assert ops.count("add_rms_norm") == 2          # after attention, and the final norm
    assert ops.count("rms_norm") == 1              # the first norm reads the embedding: no add to fuse
    fused = next(n for n in after.nodes if n.name == "l0.norm1")
    assert fused.op == "add_rms_norm" and fused.inputs == ["h0", "a0"] and fused.outputs == ["n1", "h1"]
    # the residual sum h1 stays available to its later user, the final fused norm
    final = next(n for n in after.nodes if n.name == "final_norm")
    assert final.op == "add_rms_norm" and final.inputs == ["h1", "y0"] and final.outputs == ["n2", "h2"]
    assert all(n.name not in ("l0.add0", "l0.add1") for n in after.nodes)
    after.validate()
    assert str(before) != str(after) and len(after.nodes) == len(before.nodes) - 2


def test_mlp_gate_and_up_become_one_concatenated_weight():
    after = fusion(one_layer_moe(), PassContext(options={"fusion_rules": ["gate_up_concat"]}))
    mlp = next(n for n in after.nodes if n.op == "mlp")
    assert set(mlp.weights) == {"gate_up", "down"}
    w = after.weights[mlp.weights["gate_up"]]
    assert w.name == "shared.gate_up_proj.weight" and w.shape == [64, 64]
    assert w.source == {"concat": [{"load": "shared.gate_proj.weight"}, {"load": "shared.up_proj.weight"}], "dim": 0}
    assert "shared.gate_proj.weight" not in after.weights and "shared.up_proj.weight" not in after.weights


def test_fusion_does_not_mutate_its_input():
    before = one_layer_moe()
    text = str(before)
    fusion(before, PassContext())
    assert str(before) == text
