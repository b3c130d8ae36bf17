"""Fixtures for capture tests: captured graphs and transformers models of the tiny folders,
built once per session, and tiny variants with config overrides."""

from __future__ import annotations

from pathlib import Path

import pytest


def make_variant(out_dir: Path, arch: str, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """A tiny `arch` folder whose config has `overrides` (set through the config class, so
    derived fields such as Qwen3's sliding_window are recomputed); same init as ktc.tiny."""
    import ktc.tiny as tiny

    base = tiny.tiny_config

    def patched(a, num_layers=2):
        c = base(a, num_layers=num_layers)
        return type(c).from_dict({**c.to_dict(), **overrides})

    tiny.tiny_config = patched
    try:
        tiny.make_tiny_model(arch, out_dir, seed=seed, dtype=dtype)
    finally:
        tiny.tiny_config = base
    return Path(out_dir)


@pytest.fixture(scope="session")
def captured(tiny_models):
    """captured[arch] -> the IR Graph of the tiny `arch` folder (captured once)."""
    from ktc.capture import capture

    cache: dict = {}

    class _Lazy(dict):
        def __missing__(self, arch):
            cache[arch] = capture(tiny_models[arch])
            self[arch] = cache[arch]
            return cache[arch]

    return _Lazy()


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    """hf_models[arch] -> the transformers float32 model of the tiny folder (loaded once)."""
    import torch
    import transformers as tf

    class _Lazy(dict):
        def __missing__(self, arch):
            m = tf.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
            self[arch] = m
            return m

    return _Lazy()
