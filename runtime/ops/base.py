"""What every op implementation shares: the run context and the OpImpl record.

An op is `run(node, inputs, weights, ctx) -> tuple of outputs`: `inputs` are the node's input
tensors in IR order, `weights` maps weight role -> tensor (float32) or, for weights packed
for a kernel, a dict part -> tensor, as returned by the op's `prepare`. `prepare(node,
weights) -> weights` runs once when a model is loaded: it checks the node's attrs (raising
ArtifactError for what this runtime cannot run) and may precompute from the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ktc.errors import ArtifactError
from ktc.ir import Node

Weights = Mapping[str, Any]


@dataclass
class RunContext:
    """Per-forward state the stateful ops read: the KV cache, how many tokens it already
    holds (`past_length`, the same for every batch row), and the CPU kernel object."""

    cache: Any = None               # runtime.kv_cache.KVCache
    past_length: int = 0
    cpu_kernels: Any = None
    mla_mode: str = "auto"          # "auto" | "naive" | "absorbed" (see attention_mla.py)


@dataclass(frozen=True)
class OpImpl:
    run: Callable[[Node, list[torch.Tensor], Weights, RunContext], tuple[torch.Tensor, ...]]
    prepare: Callable[[Node, dict[str, Any]], dict[str, Any]] | None = None


def dense(node: Node, weights: Weights, role: str) -> torch.Tensor:
    """The dense tensor behind `role`; ArtifactError if it is packed (a dict) instead."""
    w = weights[role]
    if not isinstance(w, torch.Tensor):
        raise ArtifactError(f"node {node.name}: weight role {role!r} is packed for a kernel, but {node.op} "
                            f"runs on dense weights here")
    return w


def require(node: Node, *attrs: str) -> None:
    missing = [a for a in attrs if node.attrs.get(a) is None]
    if missing:
        raise ArtifactError(f"node {node.name}: {node.op} needs attr(s) {', '.join(missing)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), in float32 (the exact order transformers uses)."""
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))
