"""MLA attention (DeepSeek-V2/V3) on the GPU path: the op against transformers' attention module, and
tiny deepseek models compiled with --target cuda against transformers end to end.

Without a GPU everything runs in Triton's interpreter on CPU tensors in float32 (see test_gpu_model.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ktc.runtime.gpu.kv_cache import GpuKVCache
from ktc.runtime.kv_cache import layer_specs
from tests.runtime.gpu.test_gpu_model import (
    HAS_CUDA,
    _executor,
    _run_prefill_then_decode,
    bf16_weights_ref,
    check_generate_with_cuda_graphs,
)
from tests.runtime.helpers import Builder, causal_mask, hf_model, mla_attrs, mla_weights
from tests.test_end_to_end import hf_model as hf_folder_model
from tests.test_end_to_end import prompts, rel_err

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 2e-2 if HAS_CUDA else 1e-4
MLA_ARCHS = ("deepseek_v2", "deepseek_v3")


# -- the op ------------------------------------------------------------------------------------------
def _kernels() -> SimpleNamespace:
    from ktc.codegen.gpu import matmul, mla, norm

    return SimpleNamespace(matmul=matmul, mla=mla, norm=norm)


def _mla_op(attn):
    """The attention node of `attn` (a transformers DeepSeek attention module) with its GPU-prepared weights."""
    from ktc.runtime.gpu import ops

    b = Builder()
    x, cos, sin = b.input("x"), b.input("cos"), b.input("sin")
    y = b.node("attention", [x, cos, sin], weights=mla_weights(attn), **mla_attrs(attn, 0))
    graph, tensors = b.graph([y])
    node = graph.nodes[0]
    op = ops.get("attention")
    ws = op.prepare(node, {role: tensors[w].detach().to(DEV, DTYPE) for role, w in node.weights.items()})
    return graph, node, op, ws


def _step(node, op, ws, cache, x, cos, sin, past):
    from ktc.runtime.gpu.ops import GpuRunContext

    b, s, _ = x.shape
    cache.reserve(b, past + s)
    pos = (past + torch.arange(s, device=DEV)).expand(b, s).contiguous()
    ctx = GpuRunContext(_kernels(), cache, pos, b, s, past)
    (y,) = op.run(node, [x.to(DEV, DTYPE), cos.to(DEV), sin.to(DEV)], ws, ctx)
    cache.advance(s)
    return y.float().cpu()


MLA_CASES = [
    ("deepseek_v2", {}),                                 # no q_lora, interleaved (complex) rotary
    ("deepseek_v3", {}),                                 # q_lora, rope_interleave
    ("deepseek_v3", {"rope_interleave": False}),         # q_lora, rotate_half
]


@pytest.mark.parametrize("arch,overrides", MLA_CASES)
def test_mla_op_prefill_chunks_and_decode_match_transformers(arch, overrides):
    """A prefill of 4 tokens, a second chunk of 3 (prefill after cached tokens), then 2 decode steps,
    against transformers' attention over all 9 tokens at once."""
    model = hf_model(arch, **overrides)
    attn = model.model.layers[1].self_attn
    if attn.q_lora_rank is None:
        assert arch == "deepseek_v2"
    batch, seq = 2, 9
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, seq, model.config.hidden_size, generator=g)
    pos = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        x = x.bfloat16().float()
        for p in attn.parameters():
            p.copy_(p.bfloat16().float())
        ref = attn(x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=causal_mask(seq))[0]
    rot = model.model.rotary_emb
    freqs = pos[..., None].float() * rot.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * rot.attention_scaling, emb.sin() * rot.attention_scaling
    graph, node, op, ws = _mla_op(attn)
    cache = GpuKVCache(layer_specs(graph), DEV, dtype=DTYPE)
    parts, past = [], 0
    for s in (4, 3, 1, 1):
        sl = slice(past, past + s)
        parts.append(_step(node, op, ws, cache, x[:, sl], cos[:, sl], sin[:, sl], past))
        past += s
    err = rel_err(torch.cat(parts, dim=1), ref)
    print(f"\n{arch} {overrides} MLA op on the GPU path: relative error {err:.2e}")
    assert err < TOL


def test_mla_op_refuses_a_node_without_kv_b():
    from ktc.errors import ArtifactError

    attn = hf_model("deepseek_v3").model.layers[0].self_attn
    graph, node, op, ws = _mla_op(attn)
    with pytest.raises(ArtifactError, match="kv_b"):
        op.prepare(node, {r: t for r, t in mla_weights(attn).items() if r != "kv_b" and t is not None})


def test_gpu_cache_keeps_mla_rows_when_it_grows():
    attn = hf_model("deepseek_v2").model.layers[0].self_attn
    graph, *_ = _mla_op(attn)
    cache = GpuKVCache(layer_specs(graph), DEV, dtype=torch.float32)
    cache.reserve(2, 5)
    (rows,) = cache.layer(0)
    width = attn.kv_lora_rank + attn.qk_rope_head_dim
    assert rows.shape == (2, 5, width)
    rows.copy_(torch.arange(rows.numel(), dtype=torch.float32).view(rows.shape))
    kept = rows[:, :3].clone()
    cache.advance(3)
    cache.reserve(2, 11)
    (grown,) = cache.layer(0)
    assert grown.shape == (2, 11, width) and torch.equal(grown[:, :3], kept)
    assert cache.nbytes == 2 * 11 * width * 4


# -- compiled tiny models ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mla_compiled(tiny_models, tmp_path_factory):
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("gpu-mla-artifacts")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            out = root / f"{arch}.ktc"
            compile_model(tiny_models[arch], out, target="cuda", quant="none")
            cache[arch] = out
        return cache[arch]

    return get


def test_compile_places_mla_on_the_gpu(mla_compiled):
    from ktc.passes.placement import kv_cache_bytes
    from ktc.runtime.artifact import read_manifest

    m = read_manifest(mla_compiled("deepseek_v3"))
    attn = m.graph.nodes_of("attention")
    assert attn and all(n.device == "cuda" and n.kernel == "mla.attention" for n in attn)
    cfg = attn[0].attrs["gpu_config"]
    assert {"qkv_a", "q_norm", "q_b", "rope", "absorb_q", "absorb_v", "mla_decode", "o"} <= set(cfg["decode"])
    assert {"qkv_a", "rope", "kv_b", "mla_prefill", "o"} <= set(cfg["prefill"])
    a = attn[0].attrs
    per_token = len(attn) * (int(a["kv_lora_rank"]) + int(a["qk_rope_head_dim"])) * 2
    assert kv_cache_bytes(m.graph, 100, batch=2) == per_token * 200
    assert (m.path / m.gpu["dir"] / "src" / "mla.py").is_file()


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_gpu_executor_matches_transformers(arch, tiny_models, mla_compiled):
    ex, dev = _executor(mla_compiled(arch), DTYPE)
    ref = bf16_weights_ref(tiny_models[arch])
    ids = prompts(ref.config.vocab_size, 6, batch=2)
    got = _run_prefill_then_decode(ex, dev, ids, 2, DTYPE)
    full = torch.cat((ids, got[:, 5:7].argmax(-1)), dim=1)       # the tokens the two decode steps fed
    with torch.no_grad():
        expected = ref(full).logits
    err = rel_err(got, expected)
    print(f"\n{arch} GPU path ({dev.type}, {DTYPE}): relative logits error {err:.2e}")
    assert err < TOL


def test_gpu_executor_prefill_after_cached_tokens(tiny_models, mla_compiled):
    """A prompt in two chunks (the second attends to the first through the latent cache) == one pass."""
    ex, dev = _executor(mla_compiled("deepseek_v3"), DTYPE)
    ref = bf16_weights_ref(tiny_models["deepseek_v3"])
    ids = prompts(ref.config.vocab_size, 7, batch=1, seed=4)
    cache = GpuKVCache(layer_specs(ex.graph), dev, dtype=DTYPE)
    cache.reserve(1, 7)
    outs = []
    for start, end in ((0, 3), (3, 7)):
        pos = torch.arange(start, end, device=dev)[None]
        outs.append(ex.run(ids[:, start:end].to(dev), pos, cache, start).cpu())
        cache.advance(end - start)
    with torch.no_grad():
        expected = ref(ids).logits
    assert rel_err(torch.cat(outs, dim=1), expected) < TOL


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_generate_with_cuda_graphs_matches_transformers(tiny_models, mla_compiled):
    check_generate_with_cuda_graphs(mla_compiled("deepseek_v3"), tiny_models["deepseek_v3"])


def test_hf_folder_model_is_deepseek(tiny_models):
    """The tiny folders these tests compile are the MLA architectures (q_lora only on V3)."""
    for arch in MLA_ARCHS:
        cfg = hf_folder_model(tiny_models[arch]).config
        assert cfg.model_type == arch and (cfg.q_lora_rank is None) == (arch == "deepseek_v2")
