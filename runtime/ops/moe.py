"""moe_experts(x, topk_weights, topk_ids) -> y: the routed experts, run by a CPU kernel.

The node's `kernel` names the kernel; the runtime's kernel object runs it:
    cpu_kernels.moe_experts(kernel, x [T, H] f32, topk_weights [T, K] f32, topk_ids [T, K] int32,
                            packed) -> [T, H] f32
where `packed` merges the parts of the gate_up and down weights, keys prefixed by role:
{"gate_up.<part>": t, "down.<part>": t} for packed weights (a dict part -> tensor), or
{"gate_up": t, "down": t} for dense ones. There is no torch fallback: a node without a
kernel is an error, so a missing kernel never turns silently into a slow path.
"""

from __future__ import annotations

import torch

from ktc.errors import ArtifactError, KtcError

from .base import OpImpl, RunContext, Weights, require

_ROLES = ("gate_up", "down")


def _prepare(node, weights):
    require(node, "num_experts", "hidden_size", "intermediate_size", "top_k")
    if node.attrs.get("act", "silu") != "silu":
        raise ArtifactError(f"node {node.name}: expert activation {node.attrs['act']!r} is not supported")
    if node.kernel is None:
        raise ArtifactError(f"node {node.name}: moe_experts has no kernel; compile the model with a CPU "
                            f"target (the runtime does not run routed experts without one)")
    packed = {}
    for role in _ROLES:
        w = weights[role]
        if isinstance(w, torch.Tensor):
            packed[role] = w
        else:
            packed.update({f"{role}.{part}": t for part, t in w.items()})
    out = {"packed": packed}
    table = expert_table(node)
    if table is not None:   # a subset of the router's experts: other ids map to -1, which kernels skip
        out["table"] = table
    return out


def expert_table(node) -> torch.Tensor | None:
    """Router expert id -> row in this node's weights (int32, -1 for experts it does not hold),
    for a node holding a subset (attrs["experts"]); None when it holds them all."""
    experts = node.attrs.get("experts")
    if experts is None:
        return None
    table = torch.full((int(node.attrs["num_global_experts"]),), -1, dtype=torch.int32)
    table[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts), dtype=torch.int32)
    return table


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    x, topk_weights, topk_ids = inputs
    if ctx.cpu_kernels is None:
        raise KtcError(f"node {node.name}: moe_experts needs CPU kernel {node.kernel!r}, but no CPU kernels "
                       f"are loaded")
    hidden = x.shape[-1]
    k = topk_ids.shape[-1]
    if "table" in weights:
        topk_ids = weights["table"][topk_ids.long()]
    y = ctx.cpu_kernels.moe_experts(
        node.kernel,
        x.reshape(-1, hidden).to(torch.float32).contiguous(),
        topk_weights.reshape(-1, k).to(torch.float32).contiguous(),
        topk_ids.reshape(-1, k).to(torch.int32).contiguous(),
        weights["packed"],
    )
    return (y.reshape(x.shape),)


MOE_EXPERTS = OpImpl(run, _prepare)
