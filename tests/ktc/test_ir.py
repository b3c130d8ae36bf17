import pytest

from ktc.ir import Graph, Node
from tests.passes.graphs import one_layer_moe


def test_json_round_trip_is_exact():
    g = one_layer_moe()
    again = Graph.from_json(g.to_json())
    assert again.to_dict() == g.to_dict()
    assert str(again) == str(g)


def test_printing_shows_ops_weights_and_attrs():
    text = str(one_layer_moe())
    assert "h0 = embedding(input_ids) [weight=embed]" in text
    assert "tw, ti = router(n1)" in text and "scoring=softmax" in text


def test_validate_rejects_use_before_definition():
    g = one_layer_moe()
    g.nodes[0], g.nodes[2] = g.nodes[2], g.nodes[0]
    with pytest.raises(ValueError, match="used before it is defined"):
        g.validate()


def test_validate_rejects_unknown_op_missing_weight_and_bad_role():
    g = one_layer_moe()
    g.nodes.append(Node("x", "conv2d", ["n2"], ["z"]))
    with pytest.raises(ValueError, match="unknown op"):
        g.validate()
    g = one_layer_moe()
    del g.nodes[-1].weights["weight"]
    with pytest.raises(ValueError, match="missing weight role"):
        g.validate()
    g = one_layer_moe()
    g.nodes[-1].weights["scale"] = "embed"
    with pytest.raises(ValueError, match="no weight role"):
        g.validate()


def test_version_mismatch_is_refused():
    d = one_layer_moe().to_dict()
    d["ir_version"] = 99
    with pytest.raises(ValueError, match="IR version"):
        Graph.from_dict(d)
