"""attention(x, cos, sin) -> y: dispatch on attrs.kind ("gqa" | "mla")."""

from __future__ import annotations

import torch

from ktc.errors import ArtifactError

from . import attention_gqa, attention_mla
from .base import OpImpl, RunContext, Weights

_KINDS = {"gqa": attention_gqa, "mla": attention_mla}


def _kind(node):
    kind = node.attrs.get("kind")
    if kind not in _KINDS:
        raise ArtifactError(f"node {node.name}: attention kind {kind!r} is not one of {', '.join(_KINDS)}")
    return _KINDS[kind]


def _prepare(node, weights):
    return _kind(node).prepare(node, weights)


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    return (_KINDS[node.attrs["kind"]].run(node, inputs, weights, ctx),)


ATTENTION = OpImpl(run, _prepare)
