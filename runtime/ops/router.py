"""router(x) -> topk_weights [.., top_k] f32, topk_ids [.., top_k] int32.

scoring "softmax" | "sigmoid" of float32 logits; topk_method
  greedy                the top_k scores
  group_limited_greedy  (DeepSeek-V2) keep the topk_group groups with the largest max score
  noaux_tc              (DeepSeek-V3) keep the topk_group groups with the largest sum of their
                        top-2 biased scores
An optional bias (e_score_correction_bias) is added to the scores used to choose; the
weights are always the unbiased scores of the chosen experts. Then norm_topk_prob divides
by their sum and routed_scaling_factor multiplies. Ids come sorted by choice score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktc.errors import ArtifactError

from .base import OpImpl, RunContext, Weights, dense, require

_SCORING = ("softmax", "sigmoid")
_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def _prepare(node, weights):
    require(node, "num_experts", "top_k", "scoring", "topk_method")
    a = node.attrs
    if a["scoring"] not in _SCORING:
        raise ArtifactError(f"node {node.name}: router scoring {a['scoring']!r} is not one of {_SCORING}")
    if a["topk_method"] not in _METHODS:
        raise ArtifactError(f"node {node.name}: topk_method {a['topk_method']!r} is not one of {_METHODS}")
    if a["topk_method"] != "greedy":
        require(node, "n_group", "topk_group")
        if a["num_experts"] % a["n_group"]:
            raise ArtifactError(f"node {node.name}: {a['num_experts']} experts do not split into "
                                f"{a['n_group']} groups")
    return weights


def _group_mask(choice: torch.Tensor, n_group: int, topk_group: int, method: str) -> torch.Tensor:
    """[T, E] bool: the experts of the topk_group best groups of each token."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    if method == "group_limited_greedy":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attrs: dict) -> tuple[
        torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, K] f32, ids [T, K] int64)."""
    logits = F.linear(x.to(torch.float32), weight.to(torch.float32))
    scores = logits.softmax(dim=-1) if attrs["scoring"] == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.to(torch.float32)
    method = attrs["topk_method"]
    if method != "greedy":
        mask = _group_mask(choice, int(attrs["n_group"]), int(attrs["topk_group"]), method)
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = choice.topk(int(attrs["top_k"]), dim=-1).indices
    w = scores.gather(1, ids)
    if attrs.get("norm_topk_prob"):
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    factor = attrs.get("routed_scaling_factor")
    if factor is not None and factor != 1.0:
        w = w * float(factor)
    return w, ids


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    (x,) = inputs
    lead = x.shape[:-1]
    bias = weights.get("bias")
    w, ids = route(x.reshape(-1, x.shape[-1]), dense(node, weights, "weight"),
                   None if bias is None else dense(node, weights, "bias"), node.attrs)
    k = w.shape[-1]
    return w.reshape(*lead, k), ids.to(torch.int32).reshape(*lead, k)


ROUTER = OpImpl(run, _prepare)
