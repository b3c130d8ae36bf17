"""ktc: compile Mixture-of-Experts models for one machine's GPU and CPU together.

    import ktc
    ktc.compile("./Qwen3-30B-A3B", "qwen.ktc", target="cpu")   # needs ktc[compile]
    m = ktc.load("qwen.ktc")                                   # needs only the runtime
    logits = m(input_ids); out = m.generate(input_ids, max_new_tokens=8)

Importing ktc is cheap: the compiler (transformers, TVM) loads only when compile runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ktc.errors import KtcError

__version__ = "0.1.0"
__all__ = ["KtcError", "compile", "load", "__version__"]

if TYPE_CHECKING:
    from ktc.compiler import CompileReport
    from ktc.runtime.model import CompiledModel


def load(path: str, **options: Any) -> CompiledModel:
    """Load and verify a compiled artifact; see ktc.runtime.model.CompiledModel."""
    from ktc.runtime.loader import load_artifact

    return load_artifact(path, **options)


def compile(model_dir: str, output: str, **options: Any) -> CompileReport:  # noqa: A001 - mirrors the CLI verb
    """Compile a Hugging Face MoE folder into an artifact; options mirror `ktc compile`
    (target, cpu_target, quant, gpu_quant, gpu_memory, max_context, calibration, rules, force, dump_ir).
    Returns a CompileReport."""
    from ktc.compiler import compile_model

    return compile_model(model_dir, output, **options)
