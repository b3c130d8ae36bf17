"""Export a lowered ktc graph as an ONNX model for viewing (Netron), not for running.

One ONNX node per IR node, op_type = the IR op in the custom domain "ktc"; its inputs are the
activations then the weights (attribute weight_roles names the weights' roles in that order);
attributes: device, format, kernel and every IR attr (scalars and flat lists as ONNX
attributes, anything nested, such as gpu_config, as a JSON string). Weights are graph inputs
with their shape and stored element type and no data, so the file stays small; their
description says format, group size, layout and device. Needs the `onnx` package, imported
lazily so that ktc itself does not depend on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ktc.errors import KtcError
from ktc.ir import Graph, Node, Weight

DOMAIN = "ktc"
DOMAIN_VERSION = 1

# ktc dtype / weight format name -> onnx.TensorProto element type name
_ELEM_TYPES = {
    "float32": "FLOAT", "float": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "float64": "DOUBLE",
    "int64": "INT64", "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "int4": "INT4",
    "bool": "BOOL", "float8_e4m3fn": "FLOAT8E4M3FN", "float8_e5m2": "FLOAT8E5M2",
}


def require_onnx():
    """The onnx module, or a KtcError that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise KtcError("--onnx needs the onnx package: pip install onnx (or ktc[inspect])") from None
    return onnx


def elem_type(onnx: Any, dtype: str | None) -> int:
    name = _ELEM_TYPES.get(dtype or "", "UNDEFINED")
    return int(getattr(onnx.TensorProto, name, onnx.TensorProto.UNDEFINED))


def _dims(shape: list[int | str]) -> list[int | str]:
    """ONNX dims: ints stay fixed, symbolic names ("batch", "seq") become dim_param."""
    return [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in shape]


def _attribute(onnx: Any, key: str, value: Any):
    """An ONNX attribute for one IR attr, or None to leave it out (None values).

    Scalars, and flat lists of one kind, map to ONNX attribute types; anything else (nested
    dicts such as gpu_config, mixed or nested lists, empty lists) is stored as a JSON string."""
    helper = onnx.helper
    if value is None:
        return None
    if isinstance(value, bool):
        return helper.make_attribute(key, int(value))
    if isinstance(value, int | str):
        return helper.make_attribute(key, value)
    if isinstance(value, float):
        if math.isfinite(value):
            return helper.make_attribute(key, value)
        return helper.make_attribute(key, json.dumps(value))
    if isinstance(value, list | tuple) and value:
        if all(isinstance(v, bool) for v in value):
            return helper.make_attribute(key, [int(v) for v in value])
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return helper.make_attribute(key, [int(v) for v in value])
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return helper.make_attribute(key, [float(v) for v in value])
        if all(isinstance(v, str) for v in value):
            return helper.make_attribute(key, list(value))
    return helper.make_attribute(key, json.dumps(value, sort_keys=True, separators=(",", ":")))


def _node(onnx: Any, node: Node):
    roles = list(node.weights)
    proto = onnx.helper.make_node(
        node.op, inputs=[*node.inputs, *(node.weights[r] for r in roles)], outputs=list(node.outputs),
        name=node.name, domain=DOMAIN,
    )
    fields = {"device": node.device, "format": node.format, "kernel": node.kernel}
    if roles:
        fields["weight_roles"] = roles
    attrs = [_attribute(onnx, k, v) for k, v in fields.items()]
    for key, value in node.attrs.items():
        attrs.append(_attribute(onnx, key if key not in fields else f"attr_{key}", value))
    proto.attribute.extend(a for a in attrs if a is not None)
    return proto


def _weight_input(onnx: Any, w: Weight):
    stored = w.format or w.dtype
    info = onnx.helper.make_tensor_value_info(w.name, elem_type(onnx, stored), _dims(list(w.shape)))
    notes = [f"format {stored}"]
    if w.group_size:
        notes.append(f"group {w.group_size}")
    if w.layout:
        notes.append(f"layout {w.layout}")
    if w.device:
        notes.append(f"on {w.device}")
    if w.format and w.format != w.dtype:
        notes.append(f"checkpoint dtype {w.dtype}")
    info.doc_string = "weight, " + ", ".join(notes)
    return info


def to_onnx(graph: Graph):
    """The graph as an onnx.ModelProto (structure, shapes and types only; no weight data)."""
    onnx = require_onnx()
    helper = onnx.helper

    def value_info(name: str):
        v = graph.values[name]
        return helper.make_tensor_value_info(name, elem_type(onnx, v.dtype), _dims(list(v.shape)))

    referenced = {w for n in graph.nodes for w in n.weights.values()}
    used = [w for name, w in graph.weights.items() if name in referenced]
    boundary = set(graph.inputs) | set(graph.outputs)
    proto = helper.make_graph(
        [_node(onnx, n) for n in graph.nodes],
        name=str(graph.config.get("model_type") or "ktc"),
        inputs=[value_info(i) for i in graph.inputs] + [_weight_input(onnx, w) for w in used],
        outputs=[value_info(o) for o in graph.outputs],
        value_info=[value_info(v) for v in graph.values if v not in boundary],
    )
    model = helper.make_model(
        proto, producer_name="ktc",
        opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version()),
                       helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        doc_string="ktc lowered graph for viewing: custom 'ktc' ops, weights without data",
    )
    meta = {k: v for k, v in graph.config.items() if k != "hf_config" and v is not None}
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                   for k, v in meta.items()})
    return model


def export_onnx(graph: Graph, path: str | Path) -> Path:
    """Write `graph` as an ONNX file at `path` after checking it with onnx.checker."""
    onnx = require_onnx()
    model = to_onnx(graph)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save_model(model, str(path))
    return path
