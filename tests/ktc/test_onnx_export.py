"""ONNX export of a lowered graph (for Netron) and `ktc inspect --onnx`."""

from __future__ import annotations

import json
import sys

import pytest

from ktc.errors import KtcError
from ktc.ir import Graph
from ktc.onnx_export import export_onnx, to_onnx
from ktc.passes.manager import PassContext, PassManager
from ktc.passes.pipeline import DEFAULT_PIPELINE
from ktc.passes.placement import (
    GPU_RESERVE_BYTES,
    _gpu_dense_bytes,
    expert_cpu_int8_bytes,
    expert_gpu_bytes,
    kv_cache_bytes,
)

onnx = pytest.importorskip("onnx")

CALIBRATION = {0: [10, 50, 1, 1, 30, 1, 1, 6], 1: [1, 1, 1, 80, 1, 1, 5, 10]}


@pytest.fixture(scope="module")
def hetero(tmp_path_factory) -> Graph:
    """The tiny Qwen3-MoE lowered for a GPU with room for five experts: each layer split GPU + CPU."""
    from ktc.capture import capture
    from ktc.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("onnx") / "qwen3"
    make_tiny_model("qwen3_moe", folder, num_layers=2)
    g = capture(folder)
    moe = g.nodes_of("moe_experts")[0]
    budget = (_gpu_dense_bytes(g) + kv_cache_bytes(g, int(g.config["max_position_embeddings"])) + GPU_RESERVE_BYTES
              + int(5 * expert_gpu_bytes(moe, "none")) + 6 * expert_cpu_int8_bytes(moe))   # + int8 staging
    ctx = PassContext(target="cuda", gpu_memory_bytes=budget, options={"calibration": CALIBRATION})
    return PassManager(DEFAULT_PIPELINE).run(g, ctx)


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def test_export_round_trips_with_one_onnx_node_per_ir_node(hetero, tmp_path):
    path = export_onnx(hetero, tmp_path / "g.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert path.stat().st_size < 64 * 1024           # structure only: no weight data
    assert not model.graph.initializer
    assert {(o.domain, o.version) for o in model.opset_import} >= {("ktc", 1)}
    assert "" in {o.domain for o in model.opset_import}
    nodes = model.graph.node
    assert len(nodes) == len(hetero.nodes)
    assert [n.op_type for n in nodes] == [n.op for n in hetero.nodes]
    assert [n.name for n in nodes] == [n.name for n in hetero.nodes]
    assert {n.domain for n in nodes} == {"ktc"}
    for proto, node in zip(nodes, hetero.nodes, strict=True):
        assert list(proto.input) == [*node.inputs, *node.weights.values()]
        assert list(proto.output) == node.outputs


def test_moe_nodes_carry_device_format_kernel_and_their_experts(hetero):
    model = to_onnx(hetero)
    by_name = {n.name: n for n in model.graph.node}
    for node in hetero.nodes_of("moe_experts"):
        a = _attrs(by_name[node.name])
        assert _text(a["device"]) == node.device and _text(a["format"]) == node.format
        assert _text(a["kernel"]) == node.kernel
        assert list(a["experts"]) == node.attrs["experts"]
        assert a["num_global_experts"] == 8 and a["layer"] == node.attrs["layer"]
        assert list(a["expert_load"]) == pytest.approx(node.attrs["expert_load"])
        assert [_text(r) for r in a["weight_roles"]] == list(node.weights)
    gpu = [n for n in hetero.nodes_of("moe_experts") if n.device == "cuda"][0]
    cpu = [n for n in hetero.nodes_of("moe_experts") if n.device == "cpu"][0]
    assert _text(_attrs(by_name[cpu.name])["device"]) == "cpu"
    # nested dicts survive as JSON strings
    assert json.loads(_text(_attrs(by_name[gpu.name])["gpu_config"])) == gpu.attrs["gpu_config"]
    router = _attrs(by_name[hetero.nodes_of("router")[0].name])
    assert router["norm_topk_prob"] == 1 and router["top_k"] == 2 and _text(router["scoring"]) == "softmax"
    attention = _attrs(by_name[hetero.nodes_of("attention")[0].name])
    assert "sliding_window" not in attention                 # None attrs are left out
    assert attention["scaling"] == pytest.approx(hetero.nodes_of("attention")[0].attrs["scaling"])


def test_inputs_outputs_and_weights_keep_shapes_and_element_types(hetero):
    model = to_onnx(hetero)
    T = onnx.TensorProto

    def shape(info):
        return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in model.graph.input}
    assert shape(inputs["input_ids"]) == ["batch", "seq"]
    assert inputs["input_ids"].type.tensor_type.elem_type == T.INT64
    out = model.graph.output[0]
    assert (out.name, shape(out)) == ("logits", ["batch", "seq", 256])
    infos = {v.name: v for v in model.graph.value_info}
    assert set(infos) == set(hetero.values) - {"input_ids", "positions", "logits"}
    topk_ids = next(v for v in hetero.values if v.endswith("topk_ids"))
    assert infos[topk_ids].type.tensor_type.elem_type == T.INT32
    cpu = [n for n in hetero.nodes_of("moe_experts") if n.device == "cpu"][0]
    gpu = [n for n in hetero.nodes_of("moe_experts") if n.device == "cuda"][0]
    w_cpu, w_gpu = inputs[cpu.weights["gate_up"]], inputs[gpu.weights["gate_up"]]
    assert shape(w_cpu) == hetero.weights[cpu.weights["gate_up"]].shape
    assert w_cpu.type.tensor_type.elem_type == T.INT8 and "group 32" in w_cpu.doc_string
    assert w_gpu.type.tensor_type.elem_type == T.BFLOAT16 and "on cuda" in w_gpu.doc_string
    referenced = {w for n in hetero.nodes for w in n.weights.values()}
    assert set(inputs) == {"input_ids", "positions"} | referenced


def test_without_onnx_the_export_says_how_to_install_it(hetero, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)       # import onnx -> ImportError
    with pytest.raises(KtcError, match=r"pip install onnx \(or ktc\[inspect\]\)"):
        export_onnx(hetero, tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()


def test_inspect_onnx_writes_a_checked_file(compiled, tmp_path, capsys, monkeypatch):
    from ktc.cli import main
    from ktc.runtime.artifact import read_manifest

    artifact = compiled("qwen3_moe", "int8")
    path = tmp_path / "model.onnx"
    assert main(["inspect", str(artifact), "--onnx", str(path)]) == 0
    assert f"wrote the ONNX graph to {path}" in " ".join(capsys.readouterr().out.split())
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert len(model.graph.node) == len(read_manifest(artifact).graph.nodes)
    assert {_text(_attrs(n)["device"]) for n in model.graph.node} == {"cpu"}

    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["inspect", str(artifact), "--onnx", str(tmp_path / "again.onnx")]) == 1
    captured = capsys.readouterr()
    assert "pip install onnx" in captured.err and captured.out == ""   # refused before printing anything
