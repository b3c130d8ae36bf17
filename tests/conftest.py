"""Shared fixtures: tiny HF model folders and their compiled artifacts, built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Without a CUDA GPU the Triton kernels (ktc.codegen.gpu, the GPU runtime) run in Triton's
# interpreter; it must be chosen before triton is first imported, which may be in any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The session's compiles share a CPU kernel cache of their own (codegen/kernel_cache), never the user's: a
# kernel built once (same specs, target and config) is copied, not rebuilt, by the next compile that needs it.
os.environ["KTC_CACHE_DIR"] = tempfile.mkdtemp(prefix="ktc-test-cache-")
atexit.register(shutil.rmtree, os.environ["KTC_CACHE_DIR"], True)

COMPILE_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from ktc.tiny import ARCHITECTURES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {a: (make_tiny_model(a, root / a, seed=1, tokenizer=(a == "qwen3_moe")), root / a)[1]
            for a in ARCHITECTURES}


@pytest.fixture(scope="session")
def compiled(tiny_models, tmp_path_factory):
    """compiled(arch, quant) -> artifact path, compiled once per (arch, quant)."""
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, quant: str) -> Path:
        if (arch, quant) not in cache:
            out = root / f"{arch}-{quant}.ktc"
            start = time.perf_counter()
            compile_model(tiny_models[arch], out, target="cpu", quant=quant)
            COMPILE_SECONDS[f"{arch}/{quant}"] = time.perf_counter() - start
            cache[(arch, quant)] = out
        return cache[(arch, quant)]

    return get


def pytest_terminal_summary(terminalreporter):
    if COMPILE_SECONDS:
        terminalreporter.write_line("compile times: " + ", ".join(f"{k} {v:.1f}s" for k, v in COMPILE_SECONDS.items()))
