"""rms_norm(x) -> y, add(a, b) -> a + b, add_rms_norm(x, residual) -> (rms_norm(x + residual), x + residual)."""

from __future__ import annotations

import torch

from .base import OpImpl, RunContext, Weights, dense, require, rms_norm


def _prepare(node, weights):
    require(node, "eps")
    return weights


def run_rms_norm(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    (x,) = inputs
    return (rms_norm(x, dense(node, weights, "weight"), float(node.attrs["eps"])),)


def run_add(node, inputs: list[torch.Tensor], weights: Weights, ctx: RunContext) -> tuple[torch.Tensor]:
    a, b = inputs
    return (a + b,)


def run_add_rms_norm(node, inputs: list[torch.Tensor], weights: Weights,
                     ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    x, residual = inputs
    s = x + residual
    return rms_norm(s, dense(node, weights, "weight"), float(node.attrs["eps"])), s


RMS_NORM = OpImpl(run_rms_norm, _prepare)
ADD = OpImpl(run_add)
ADD_RMS_NORM = OpImpl(run_add_rms_norm, _prepare)
