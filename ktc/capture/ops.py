"""Capture ops: opaque torch.library ops (namespace "ktc") that stand in for the parts of a
transformers model whose eager code is data-dependent or stateful, plus the thin modules
that call them.

Each op has a fake (meta) implementation only: capture runs on the meta device and never
computes anything, so the eager CPU kernel raises. Shapes are never data-dependent. What an
op means is not defined here but in ktc/ir.py: the importer turns each call into IR nodes,
reading the op's `spec` (a JSON string: IR attrs and the weight roles, in the order of the
`weights` list).

    ktc::rms_norm(Tensor x, Tensor w, float eps) -> Tensor
    ktc::rope(Tensor positions, Tensor inv_freq, float scaling) -> (Tensor cos, Tensor sin)
    ktc::attention(Tensor x, Tensor cos, Tensor sin, Tensor?[] weights, str spec) -> Tensor
    ktc::moe(Tensor x, Tensor?[] weights, str spec) -> Tensor       (router, experts, shared experts)
    ktc::mlp(Tensor x, Tensor?[] weights, str spec) -> Tensor
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

NAMESPACE = "ktc"

_SCHEMAS = {
    "rms_norm": "(Tensor x, Tensor w, float eps) -> Tensor",
    "rope": "(Tensor positions, Tensor inv_freq, float scaling) -> (Tensor, Tensor)",
    "attention": "(Tensor x, Tensor cos, Tensor sin, Tensor?[] weights, str spec) -> Tensor",
    "moe": "(Tensor x, Tensor?[] weights, str spec) -> Tensor",
    "mlp": "(Tensor x, Tensor?[] weights, str spec) -> Tensor",
}


def _no_eager(name: str):
    def impl(*args, **kwargs):
        raise NotImplementedError(
            f"ktc::{name} is a capture op: it only has a fake implementation (export on the meta device); "
            "ktc.ir / the runtime define what it computes"
        )
    return impl


def _fake_same(x, *args, **kwargs):
    return x.new_empty(x.shape)


def _fake_rope(positions, inv_freq, scaling):
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return (positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32))


def _register() -> None:
    for name, schema in _SCHEMAS.items():
        qualname = f"{NAMESPACE}::{name}"
        if hasattr(getattr(torch.ops, NAMESPACE), name):
            # already registered in this process (module reloaded): it must be ours
            have = getattr(getattr(torch.ops, NAMESPACE), name).default._schema
            if have != torch._C.parse_schema(qualname + schema):
                raise RuntimeError(f"{qualname} is already registered with another schema ({have}): "
                                   "the capture ops' names clash with another library's")
            continue
        torch.library.define(qualname, schema)
        torch.library.impl(qualname, "CPU")(_no_eager(name))
        torch.library.register_fake(qualname)(_fake_rope if name == "rope" else _fake_same)


_register()

OPS = {name: getattr(getattr(torch.ops, NAMESPACE), name).default for name in _SCHEMAS}


def encode_spec(spec: dict[str, Any]) -> str:
    return json.dumps(spec)


def decode_spec(spec: str) -> dict[str, Any]:
    return json.loads(spec)


# -- modules that replace transformers' ones in the meta model ---------------------------------


class CaptureRMSNorm(nn.Module):
    """Replaces an RMSNorm module; keeps its weight parameter (so its name is unchanged)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x):
        return OPS["rms_norm"](x, self.weight, self.eps)


class CaptureRope(nn.Module):
    """Replaces a rotary embedding module: forward(x, position_ids) -> (cos, sin).

    `inv_freq` values are computed on CPU by the model's own rotary class (so every rope
    scaling type is exactly transformers'); the buffer here is a meta tensor of that shape
    and the values travel in `values` to the importer."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float):
        super().__init__()
        self.values = [float(v) for v in inv_freq.detach().to("cpu", torch.float32)]
        self.register_buffer("inv_freq", torch.empty(len(self.values), device="meta"), persistent=False)
        self.scaling = float(scaling)

    def forward(self, x, position_ids):
        return OPS["rope"](position_ids, self.inv_freq, self.scaling)


class _SpecModule(nn.Module):
    """Takes over the children, parameters and buffers of the module it replaces (so every
    parameter keeps its name, e.g. model.layers.0.self_attn.q_proj.weight) and holds the
    weights its op takes in role order; the roles are stored in the spec."""

    def __init__(self, inner: nn.Module, weights: dict[str, torch.Tensor | None], spec: dict[str, Any]):
        super().__init__()
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, p in inner.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in inner.named_buffers(recurse=False):
            self.register_buffer(name, b)
        # roles -> attribute paths: the weights must be read through module attributes at
        # forward time, or torch.export sees constants instead of parameters / buffers
        names = {id(t): n for n, t in self.named_parameters(remove_duplicate=False)}
        names.update({id(t): n for n, t in self.named_buffers(remove_duplicate=False)})
        self._paths: dict[str, str] = {}
        for role, w in weights.items():
            if w is None:
                continue
            if id(w) not in names:
                raise ValueError(f"weight for role {role!r} is not a parameter or buffer of {type(inner).__name__}")
            self._paths[role] = names[id(w)]
        self.roles = list(self._paths)
        self.spec = encode_spec({**spec, "roles": self.roles})

    def weight_list(self) -> list[torch.Tensor]:
        out = []
        for role in self.roles:
            mod_path, _, attr = self._paths[role].rpartition(".")
            out.append(getattr(self.get_submodule(mod_path) if mod_path else self, attr))
        return out


class CaptureAttention(_SpecModule):
    """Replaces a self_attn module; forward keeps transformers' signature and returns (y, None)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        cos, sin = position_embeddings
        return OPS["attention"](hidden_states, cos, sin, self.weight_list(), self.spec), None


class CaptureMoE(_SpecModule):
    """Replaces a sparse MoE block (router + routed experts + shared experts)."""

    def forward(self, hidden_states):
        return OPS["moe"](hidden_states, self.weight_list(), self.spec)


class CaptureMLP(_SpecModule):
    """Replaces a dense SwiGLU MLP module."""

    def forward(self, x):
        return OPS["mlp"](x, self.weight_list(), self.spec)
