"""Triton kernels for the GPU-placed ops, one module per kernel family.

Every family module depends on torch and triton alone (no ktc import), because the compiler
copies these very files into an artifact (kernels/gpu/src/) and the runtime loads them from
there by path: the runtime never imports ktc.codegen. Each module has
    KERNELS        the @triton.jit kernels it defines, by name (for ahead-of-time builds)
    launchers      plain Python functions that take torch tensors, a config dict, and launch
    default_config / configs   how the block sizes, warps and stages are chosen per shape
Configs are plain dicts (BLOCK_* constexprs, num_warps, num_stages) so that they can be
stored in the artifact next to the node that uses them.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("norm", "embedding", "rope", "activation", "matmul", "attention", "router", "moe", "sampling", "mla")
SOURCE_DIR = Path(__file__).parent


def source_files() -> dict[str, Path]:
    """family -> path of its source file (what the artifact keeps)."""
    return {f: SOURCE_DIR / f"{f}.py" for f in FAMILIES}
