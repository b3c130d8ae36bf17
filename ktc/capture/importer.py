"""Turn the ExportedProgram of a swapped model into a ktc IR Graph.

The exported graph is small: placeholders (input_ids, positions, parameters, buffers),
aten.embedding, the ktc capture ops, aten.add, aten.linear (lm_head) and a few aliasing
ops (alias / view / slice over the full range / to) that are folded away. Anything else is
an internal error naming the op: capture swapped a module it should not have, or missed one.

ktc::moe is decomposed into router -> moe_experts (+ mlp for the shared experts) + add.
Weights are named by `resolve(fqn) -> (name, source)` (per architecture: checkpoint keys).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch

from ktc.capture.ops import decode_spec
from ktc.ir import Graph, Node, Value, Weight

Resolver = Callable[[str], tuple[str, dict[str, Any]]]

_aten = torch.ops.aten
_ktc = torch.ops.ktc

# ops that never change data; folded away when their output has the input's shape
_ALIASES = {
    _aten.alias.default, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default,
    _aten.clone.default, _aten.contiguous.default, _aten.detach.default, _aten.to.dtype,
    _aten.to.dtype_layout, _aten._to_copy.default, _aten.slice.Tensor, _aten.lift_fresh_copy.default,
}
_IGNORED = {_aten._assert_tensor_metadata.default, _aten.sym_size.int, _aten._assert_scalar.default,
            torch.ops.aten.sym_constrain_range_for_size.default}


class CaptureError(RuntimeError):
    """The exported program holds something the importer does not know: a bug in capture."""


def _strip(path: str) -> str:
    return path.removeprefix("model.")


class _Importer:
    def __init__(self, ep: torch.export.ExportedProgram, resolve: Resolver, lm_head_source: dict[str, Any],
                 dtype_of: Callable[[dict[str, Any]], str]):
        self.ep = ep
        self.resolve = resolve
        self.lm_head_source = lm_head_source
        self.dtype_of = dtype_of
        sig = ep.graph_signature
        self.fqn: dict[str, str] = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.user_inputs = list(sig.user_inputs)
        self.values: dict[str, Value] = {}
        self.weights: dict[str, Weight] = {}
        self.nodes: list[Node] = []
        self.env: dict[torch.fx.Node, Any] = {}      # fx node -> value name | fqn marker | tuple
        self.sym: dict[str, str] = {}                # sympy symbol name -> "batch" / "seq"
        self.node_names: set[str] = set()
        self.producer_op: dict[str, Node] = {}

    # -- helpers ---------------------------------------------------------------------
    def shape_of(self, fx_node: torch.fx.Node) -> list[int | str]:
        val = fx_node.meta["val"]
        out: list[int | str] = []
        for d in val.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                s = str(d)
                out.append(self.sym.get(s, s))
        return out

    @staticmethod
    def dtype_name(fx_node: torch.fx.Node) -> str:
        return str(fx_node.meta["val"].dtype).removeprefix("torch.")

    def new_node_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.node_names:
            name, k = f"{base}_{k}", k + 1
        self.node_names.add(name)
        return name

    def new_value(self, name: str, shape: list[int | str], dtype: str) -> str:
        base, k = name, 1
        while name in self.values:
            name, k = f"{base}_{k}", k + 1
        self.values[name] = Value(name, list(shape), dtype)
        return name

    def add_weight(self, fqn: str, shape: list[int], name: str | None = None,
                   source: dict[str, Any] | None = None) -> str:
        if name is None or source is None:
            name, source = self.resolve(fqn)
        if name in self.weights:
            if list(self.weights[name].shape) != list(shape):
                raise CaptureError(f"weight {name} is used with shapes {self.weights[name].shape} and {shape}")
            return name
        self.weights[name] = Weight(name=name, shape=[int(d) for d in shape], dtype=self.dtype_of(source),
                                    source=source)
        return name

    def weight_arg(self, fx_node: torch.fx.Node) -> str:
        """The IR weight name of a parameter / buffer placeholder."""
        if fx_node.op != "placeholder" or fx_node.name not in self.fqn:
            raise CaptureError(f"expected a parameter or buffer, got {fx_node.format_node()}")
        return self.add_weight(self.fqn[fx_node.name], list(fx_node.meta["val"].shape))

    def act(self, fx_node: torch.fx.Node) -> str:
        v = self.env.get(fx_node)
        if not isinstance(v, str):
            raise CaptureError(f"expected an activation, got {fx_node.format_node()}")
        return v

    def emit(self, name: str, op: str, inputs: list[str], outputs: list[tuple[str, list, str]],
             weights: dict[str, str] | None = None, attrs: dict[str, Any] | None = None) -> list[str]:
        node_name = self.new_node_name(name)
        outs = [self.new_value(n, shape, dtype) for n, shape, dtype in outputs]
        node = Node(name=node_name, op=op, inputs=list(inputs), outputs=outs, weights=dict(weights or {}),
                    attrs=dict(attrs or {}))
        self.nodes.append(node)
        for o in outs:
            self.producer_op[o] = node
        return outs

    # -- the walk --------------------------------------------------------------------
    def run(self) -> tuple[list[str], list[str]]:
        graph = self.ep.graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        users = [n for n in placeholders if n.name in self.user_inputs]
        ids = users[0]
        for d, label in zip(ids.meta["val"].shape, ("batch", "seq"), strict=True):
            if not isinstance(d, int):
                self.sym[str(d)] = label
        for n in users:
            self.env[n] = self.new_value(n.name, self.shape_of(n), self.dtype_name(n))
        outputs: list[str] = []
        for n in graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs = [self.act(a) for a in n.args[0]]
                continue
            if n.op != "call_function":
                raise CaptureError(f"unexpected {n.op} node {n.format_node()}")
            self.visit(n)
        return [self.env[n] for n in users], outputs

    def visit(self, n: torch.fx.Node) -> None:
        t = n.target
        if t in _IGNORED:
            return
        if t is operator.getitem:
            self.env[n] = self.env[n.args[0]][n.args[1]]
        elif t in _ALIASES:
            src = n.args[0]
            if self.shape_of(src) != self.shape_of(n):
                raise CaptureError(f"{t} changes a shape {self.shape_of(src)} -> {self.shape_of(n)}: "
                                   f"{n.format_node()}")
            self.env[n] = self.act(src)
        elif t == _aten.embedding.default:
            w, ids = n.args[0], n.args[1]
            w_name = self.weight_arg(w)
            path = _strip(self.fqn[w.name].removesuffix(".weight"))
            self.env[n] = self.emit(path, "embedding", [self.act(ids)],
                                    [(path, self.shape_of(n), self.dtype_name(n))], {"weight": w_name})[0]
        elif t == _ktc.rope.default:
            pos, inv_freq, scaling = n.args
            w_name = self.weight_arg(inv_freq)
            shape = [*self.shape_of(pos), 2 * int(inv_freq.meta["val"].shape[0])]
            path = _strip(self.fqn[inv_freq.name].removesuffix(".inv_freq"))
            self.env[n] = tuple(self.emit(path, "rope", [self.act(pos)],
                                          [("cos", shape, "float32"), ("sin", shape, "float32")],
                                          {"inv_freq": w_name}, {"scaling": float(scaling)}))
        elif t == _ktc.rms_norm.default:
            x, w, eps = n.args
            w_name = self.weight_arg(w)
            path = _strip(self.fqn[w.name].removesuffix(".weight"))
            self.env[n] = self.emit(path, "rms_norm", [self.act(x)], [(path, self.shape_of(n), self.dtype_name(n))],
                                    {"weight": w_name}, {"eps": float(eps)})[0]
        elif t == _ktc.attention.default:
            x, cos, sin, ws, spec = n.args
            spec = decode_spec(spec)
            weights = {role: self.weight_arg(w) for role, w in zip(spec["roles"], ws, strict=True)}
            path = _strip(spec["name"])
            self.env[n] = self.emit(path, "attention", [self.act(x), self.act(cos), self.act(sin)],
                                    [(path, self.shape_of(n), self.dtype_name(n))], weights, spec["attrs"])[0]
        elif t == _ktc.mlp.default:
            x, ws, spec = n.args
            spec = decode_spec(spec)
            weights = {role: self.weight_arg(w) for role, w in zip(spec["roles"], ws, strict=True)}
            path = _strip(spec["name"])
            self.env[n] = self.emit(path, "mlp", [self.act(x)], [(path, self.shape_of(n), self.dtype_name(n))],
                                    weights, spec["attrs"])[0]
        elif t == _ktc.moe.default:
            self.env[n] = self.visit_moe(n)
        elif t == _aten.add.Tensor:
            a, b = n.args[:2]
            if len(n.args) > 2 or n.kwargs.get("alpha", 1) != 1:
                raise CaptureError(f"add with alpha: {n.format_node()}")
            self.env[n] = self.emit(self.add_name(a, b), "add", [self.act(a), self.act(b)],
                                    [(self.add_name(a, b), self.shape_of(n), self.dtype_name(n))])[0]
        elif t == _aten.linear.default:
            x, w = n.args[:2]
            bias = n.args[2] if len(n.args) > 2 else None
            is_head = any(u.op == "output" for u in n.users)
            fqn = "lm_head.weight" if is_head else self.fqn[w.name]
            shape = list(w.meta["val"].shape)
            if is_head:
                weights = {"weight": self.add_weight(fqn, shape, "lm_head.weight", self.lm_head_source)}
            else:
                weights = {"weight": self.weight_arg(w)}
            if bias is not None:
                weights["bias"] = self.weight_arg(bias)
            path = _strip(fqn.removesuffix(".weight"))
            out = "logits" if is_head else path
            self.env[n] = self.emit(path, "linear", [self.act(x)], [(out, self.shape_of(n), self.dtype_name(n))],
                                    weights)[0]
        else:
            raise CaptureError(f"capture does not know op {t} in the exported graph: {n.format_node()}")

    def add_name(self, a: torch.fx.Node, b: torch.fx.Node) -> str:
        for v in (self.env.get(b), self.env.get(a)):
            node = self.producer_op.get(v) if isinstance(v, str) else None
            if node is not None and node.op == "attention":
                return f"layers.{node.attrs['layer']}.attn_add"
            if node is not None and node.name.startswith("layers.") and ".mlp" in node.name:
                return f"{node.name.split('.mlp')[0]}.mlp_add"
        return "add"

    def visit_moe(self, n: torch.fx.Node) -> str:
        x, ws, spec = n.args
        spec = decode_spec(spec)
        w = {role: self.weight_arg(t) for role, t in zip(spec["roles"], ws, strict=True)}
        path = _strip(spec["name"])
        xin = self.act(x)
        shape, dtype = self.shape_of(n), self.dtype_name(n)
        top_k = int(spec["router"]["top_k"])
        kshape = [*shape[:-1], top_k]
        router_w = {"weight": w["router.weight"]}
        if "router.bias" in w:
            router_w["bias"] = w["router.bias"]
        tw, ti = self.emit(f"{path}.router", "router", [xin],
                           [(f"{path}.topk_weights", kshape, "float32"), (f"{path}.topk_ids", kshape, "int32")],
                           router_w, spec["router"])
        shared = spec.get("shared")
        routed = self.emit(f"{path}.experts", "moe_experts", [xin, tw, ti],
                           [(f"{path}.experts" if shared else path, shape, dtype)],
                           {"gate_up": w["experts.gate_up"], "down": w["experts.down"]}, spec["experts"])[0]
        if not shared:
            return routed
        sw = {r.removeprefix("shared."): v for r, v in w.items() if r.startswith("shared.")}
        s_out = self.emit(f"{path}.shared_experts", "mlp", [xin], [(f"{path}.shared_experts", shape, dtype)],
                          sw, shared["attrs"])[0]
        return self.emit(f"{path}.add", "add", [routed, s_out], [(path, shape, dtype)])[0]


def import_program(ep: torch.export.ExportedProgram, resolve: Resolver, lm_head_source: dict[str, Any],
                   dtype_of: Callable[[dict[str, Any]], str], config: dict[str, Any]) -> Graph:
    """The IR Graph of `ep`; weights named and sourced by `resolve`, dtypes by `dtype_of`."""
    imp = _Importer(ep, resolve, lm_head_source, dtype_of)
    inputs, outputs = imp.run()
    if inputs != ["input_ids", "positions"] or outputs != ["logits"]:
        raise CaptureError(f"exported program has inputs {inputs} and outputs {outputs}")
    return Graph(inputs=inputs, outputs=outputs, values=imp.values, weights=imp.weights, nodes=imp.nodes,
                 config=config)


# -- weight naming helpers for the architecture modules -------------------------------------


def expert_source(layer: int, which: str, num_experts: int, keys, per_expert: Callable[[int, str], str],
                  fused: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Name and source of a layer's stacked routed-expert weight.

    which: "gate_up" ([E, 2I, H]: per expert concat(gate, up) along dim 0) or "down" ([E, H, I]).
    per_expert(e, role) gives the checkpoint key of expert e's "gate" / "up" / "down" matrix;
    fused[which] the key of an already stacked tensor. Per-expert keys are used unless the
    checkpoint (`keys`; None: no checkpoint) has only the fused one."""
    name = f"model.layers.{layer}.mlp.experts.{which}"
    probe = per_expert(0, "gate" if which == "gate_up" else "down")
    if keys is not None and probe not in keys and fused[which] in keys:
        return name, {"load": fused[which]}
    if which == "gate_up":
        parts = [{"concat": [{"load": per_expert(e, "gate")}, {"load": per_expert(e, "up")}], "dim": 0}
                 for e in range(num_experts)]
    else:
        parts = [{"load": per_expert(e, "down")} for e in range(num_experts)]
    return name, {"stack": parts}


_EXPERT_PARAM = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_HF_PROJ = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}


def routed_expert_weight(fqn: str, num_experts: int, keys, per_expert_prefix: str = "mlp.experts",
                         proj: dict[str, str] = _HF_PROJ) -> tuple[str, dict[str, Any]] | None:
    """(name, source) for transformers' fused expert parameters (`...mlp.experts.gate_up_proj` /
    `down_proj`), read from a checkpoint that stores expert e's matrices under
    `model.layers.L.<per_expert_prefix>.<e>.<proj[role]>`; None for any other parameter."""
    m = _EXPERT_PARAM.fullmatch(fqn)
    if m is None:
        return None
    layer = int(m.group(1))
    prefix = f"model.layers.{layer}.{per_expert_prefix}"
    fused = f"model.layers.{layer}.mlp.experts"
    return expert_source(
        layer, "gate_up" if m.group(2) == "gate_up_proj" else "down", num_experts, keys,
        lambda e, role: f"{prefix}.{e}.{proj[role]}",
        {"gate_up": f"{fused}.gate_up_proj", "down": f"{fused}.down_proj"},
    )
