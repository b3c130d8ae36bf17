"""linear(x) -> x @ weight^T (+ bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OpImpl, RunContext, Weights, dense


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    (x,) = inputs
    bias = weights.get("bias")
    return (F.linear(x, dense(node, weights, "weight"), None if bias is None else dense(node, weights, "bias")),)


LINEAR = OpImpl(run)
