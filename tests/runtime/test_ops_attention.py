"""attention (GQA and MLA) against the transformers attention modules, and through the cache."""

from __future__ import annotations

import pytest
import torch

from ktc.runtime.executor import Executor
from ktc.runtime.kv_cache import KVCache
from tests.runtime.helpers import (
    Builder,
    causal_mask,
    gqa_attrs,
    gqa_weights,
    hf_model,
    mla_attrs,
    mla_weights,
    rel_err,
)

TOL = 1e-5


def _attention_graph(attrs: dict, weights: dict):
    b = Builder()
    x, cos, sin = b.input("x"), b.input("cos"), b.input("sin")
    y = b.node("attention", [x, cos, sin], weights=weights, **attrs)
    return b.graph([y])


def _run(ex: Executor, cache: KVCache, x, cos, sin, mla_mode="auto"):
    cache.reserve(x.shape[0], cache.length + x.shape[1])
    feeds = {"x": x, "cos": cos, "sin": sin}
    return ex.execute(feeds, cache, x.shape[1], mla_mode=mla_mode)[ex.output]


def _inputs(model, batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, model.config.hidden_size, generator=g)
    pos = torch.arange(seq).expand(batch, seq)
    return x, pos


def _cos_sin(model, x, pos):
    rot = model.model.rotary_emb
    freqs = pos[..., None].float() * rot.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rot.attention_scaling, emb.sin() * rot.attention_scaling


def _check_prefill_decode(ex, x, cos, sin, full, split, mla_mode="auto"):
    """Prefill x[:, :split] then decode the rest one token at a time == the full forward."""
    cache = KVCache.for_graph(ex.graph)
    cache.reserve(x.shape[0], x.shape[1])
    parts = [_run(ex, cache, x[:, :split], cos[:, :split], sin[:, :split], mla_mode)]
    for t in range(split, x.shape[1]):
        parts.append(_run(ex, cache, x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], mla_mode))
    assert cache.length == x.shape[1]
    err = rel_err(torch.cat(parts, dim=1), full)
    assert err < TOL, err
    return err


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_gqa_matches_transformers(arch):
    model = hf_model(arch)
    attn = model.model.layers[1].self_attn
    if arch == "qwen2_moe":
        assert attn.q_proj.bias is not None          # qkv bias is exercised
    if arch == "qwen3_moe":
        assert attn.q_norm is not None               # q_norm / k_norm are exercised
    x, pos = _inputs(model)
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        ref = attn(x, position_embeddings=(cos, sin), attention_mask=causal_mask(x.shape[1]))[0]
    graph, weights = _attention_graph(gqa_attrs(attn, 1), gqa_weights(attn))
    ex = Executor(graph, weights)
    cache = KVCache.for_graph(graph)
    out = _run(ex, cache, x, cos, sin)
    assert rel_err(out, ref) < TOL, rel_err(out, ref)
    _check_prefill_decode(ex, x, cos, sin, ref, split=5)


MLA_CASES = [
    ("deepseek_v2", {}),                                 # q_lora_rank None, complex rotary (interleaved)
    ("deepseek_v3", {}),                                 # q_lora, rope_interleave True
    ("deepseek_v3", {"rope_interleave": False}),         # q_lora, rotate_half
]


@pytest.mark.parametrize("arch,overrides", MLA_CASES)
@pytest.mark.parametrize("mode", ["naive", "absorbed", "auto"])
def test_mla_matches_transformers(arch, overrides, mode):
    model = hf_model(arch, **overrides)
    attn = model.model.layers[1].self_attn
    assert (attn.q_lora_rank is None) == (arch == "deepseek_v2")
    x, pos = _inputs(model)
    pe = model.model.rotary_emb(x, pos)                  # V2: complex freqs_cis; V3: (cos, sin)
    with torch.no_grad():
        ref = attn(x, position_embeddings=pe, attention_mask=causal_mask(x.shape[1]))[0]
    cos, sin = _cos_sin(model, x, pos)
    graph, weights = _attention_graph(mla_attrs(attn, 1), mla_weights(attn))
    ex = Executor(graph, weights)
    out = _run(ex, KVCache.for_graph(graph), x, cos, sin, mode)
    assert rel_err(out, ref) < TOL, rel_err(out, ref)
    _check_prefill_decode(ex, x, cos, sin, ref, split=4, mla_mode=mode)


def test_mla_cache_holds_latent_and_k_rope():
    model = hf_model("deepseek_v3")
    attn = model.model.layers[1].self_attn
    graph, weights = _attention_graph(mla_attrs(attn, 1), mla_weights(attn))
    cache = KVCache.for_graph(graph)
    cache.reserve(2, 16)
    spec = cache.specs[1]
    assert spec.kind == "mla" and spec.width == attn.kv_lora_rank + attn.qk_rope_head_dim
    assert cache.nbytes == 2 * 16 * spec.width * 4


def test_sliding_window_against_explicit_mask():
    model = hf_model("mixtral")
    attn = model.model.layers[0].self_attn
    x, pos = _inputs(model, seq=10)
    cos, sin = model.model.rotary_emb(x, pos)
    window = 4
    mask = torch.full((10, 10), float("-inf")).triu(1)
    mask = mask + torch.full((10, 10), float("-inf")).tril(-window)
    with torch.no_grad():
        ref = attn(x, position_embeddings=(cos, sin), attention_mask=mask[None, None])[0]
    attrs = dict(gqa_attrs(attn, 0), sliding_window=window)
    graph, weights = _attention_graph(attrs, gqa_weights(attn))
    ex = Executor(graph, weights)
    out = _run(ex, KVCache.for_graph(graph), x, cos, sin)
    assert rel_err(out, ref) < TOL
    _check_prefill_decode(ex, x, cos, sin, ref, split=3)
