"""mlp(x) -> y: dense SwiGLU, down(silu(gate x) * up x), for dense layers and shared experts.

Weights gate [I, H] + up [I, H], or gate_up [2I, H] (gate rows first) once fusion ran;
optional output_gate [1, H] scales y by sigmoid(x @ output_gate^T) (Qwen2-MoE's
shared_expert_gate). prepare() concatenates a separate gate and up so that a step is one
matmul for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktc.errors import ArtifactError

from .base import OpImpl, RunContext, Weights, dense

ACTIVATIONS = {"silu": F.silu}


def check_act(node) -> None:
    act = node.attrs.get("act", "silu")
    if act not in ACTIVATIONS:
        raise ArtifactError(f"node {node.name}: activation {act!r} is not supported "
                            f"(supported: {', '.join(ACTIVATIONS)})")


def _prepare(node, weights):
    check_act(node)
    weights = dict(weights)
    if "gate_up" not in weights:
        if "gate" not in weights or "up" not in weights:
            raise ArtifactError(f"node {node.name}: mlp needs weights gate and up, or gate_up")
        weights["gate_up"] = torch.cat((dense(node, weights, "gate"), dense(node, weights, "up")), dim=0)
    weights.pop("gate", None)
    weights.pop("up", None)
    gate_up = dense(node, weights, "gate_up")
    if gate_up.shape[0] % 2:
        raise ArtifactError(f"node {node.name}: gate_up has an odd number of rows ({gate_up.shape[0]})")
    return weights


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    (x,) = inputs
    act = ACTIVATIONS[node.attrs.get("act", "silu")]
    gate, up = F.linear(x, weights["gate_up"]).chunk(2, dim=-1)
    y = F.linear(act(gate) * up, weights["down"])
    output_gate = weights.get("output_gate")
    if output_gate is not None:
        y = torch.sigmoid(F.linear(x, output_gate)) * y
    return (y,)


MLP = OpImpl(run, _prepare)
