"""The op registry: IR op name -> implementation (runtime.ops.base.OpImpl).

One module per op family; every op of ktc.ir.OP_SPECS has an entry, and the executor
refuses a graph with an op that has none.
"""

from __future__ import annotations

from ktc.errors import ArtifactError

from .attention import ATTENTION
from .base import OpImpl, RunContext
from .embedding import EMBEDDING
from .linear import LINEAR
from .mlp import MLP
from .moe import MOE_EXPERTS
from .norm import ADD, ADD_RMS_NORM, RMS_NORM
from .rope import ROPE
from .router import ROUTER

OPS: dict[str, OpImpl] = {
    "embedding": EMBEDDING,
    "rope": ROPE,
    "rms_norm": RMS_NORM,
    "add": ADD,
    "add_rms_norm": ADD_RMS_NORM,
    "attention": ATTENTION,
    "router": ROUTER,
    "moe_experts": MOE_EXPERTS,
    "mlp": MLP,
    "linear": LINEAR,
}


def get(op: str) -> OpImpl:
    """The implementation of `op`; ArtifactError if this runtime has none."""
    try:
        return OPS[op]
    except KeyError:
        raise ArtifactError(f"op {op!r} is not supported by this runtime (it runs: {', '.join(OPS)})") from None


__all__ = ["OPS", "OpImpl", "RunContext", "get"]
