"""The GPU part of an artifact: the Triton sources the graph's GPU nodes use, and their configs.

    kernels/gpu/src/<family>.py    the kernel family modules, copied verbatim (torch + triton only)
    kernels/gpu/configs.json       node name -> kernel name and the configs kernel selection chose

The runtime loads the sources by path (it never imports ktc.codegen) and Triton compiles them
once per host and caches the binaries (~/.triton/cache); nothing is compiled for a fixed arch
here, so one artifact serves sm80 and sm90 alike (CI builds every kernel for both, and for
gfx942, ahead of time to prove they lower).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ktc.ir import Graph

FORMAT = 1


def write_gpu_kernels(graph: Graph, folder: Path) -> dict[str, Any]:
    """Write the folder; returns the manifest's targets["gpu"] entry."""
    import triton

    from ktc.codegen.gpu import FAMILIES, source_files

    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    for family, path in source_files().items():
        shutil.copyfile(path, src / f"{family}.py")
    configs = {n.name: {"kernel": n.kernel, "config": n.attrs.get("gpu_config", {})}
               for n in graph.nodes if n.device == "cuda"}
    (folder / "configs.json").write_text(json.dumps(configs, indent=1))
    # fp8 (e4m3) weights: Triton lowers their kernels on sm89+ only (the runtime checks the GPU)
    fp8 = any(w.format == "fp8" and w.device not in (None, "cpu") for w in graph.weights.values())
    return {"backend": "cuda", "dir": "kernels/gpu", "format": FORMAT, "families": list(FAMILIES),
            "triton_version": triton.__version__, "archs": ["sm89", "sm90"] if fp8 else ["sm80", "sm90"],
            "dtype": "bfloat16"}
