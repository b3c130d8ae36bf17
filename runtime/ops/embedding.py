"""embedding(ids) -> h: rows of the [V, H] table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OpImpl, RunContext, Weights, dense


def run(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    (ids,) = inputs
    return (F.embedding(ids.to(torch.long), dense(node, weights, "weight")),)


EMBEDDING = OpImpl(run)
