"""Load the Triton kernel family modules an artifact carries (kernels/gpu/src/<family>.py).

They are imported by path under a private package name, so the runtime never imports the
compiler's copy (ktc.codegen) and two artifacts with different kernel sources can be loaded
in one process. Triton compiles each kernel on first launch and caches the binary per host.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from ktc.errors import ArtifactError, HostError

REQUIRED = ("norm", "embedding", "rope", "activation", "matmul", "attention", "router", "moe", "sampling")
OPTIONAL = ("mla",)     # absent from artifacts compiled before it existed; only MLA models launch it


def load_kernels(src: str | Path) -> SimpleNamespace:
    """A namespace family -> module for the sources in folder `src`."""
    src = Path(src)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise HostError("this artifact runs on a GPU with Triton kernels, and triton is not installed: "
                        "pip install triton") from None
    tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    mods: dict[str, ModuleType] = {}
    for family in REQUIRED + OPTIONAL:
        path = src / f"{family}.py"
        if family in OPTIONAL and not path.is_file():
            continue
        if not path.is_file():
            raise ArtifactError(f"{src}: GPU kernel source {family}.py is missing; recompile the artifact")
        name = f"_ktc_gpu_kernels_{tag}.{family}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        mods[family] = sys.modules[name]
    return SimpleNamespace(**mods)
