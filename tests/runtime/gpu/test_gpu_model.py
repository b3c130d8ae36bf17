"""The GPU runtime end to end: tiny models compiled with --target cuda against transformers.

Without a GPU the GPU executor runs here on CPU tensors in Triton's interpreter, in float32
(the interpreter cannot multiply bf16): every Triton kernel of the model is exercised, and the
logits of a prefill and of decode steps over the static KV cache are compared with
transformers' own. With a GPU (the device machine) the same checks run in bf16 on CUDA, plus
the CUDA-graph decode path and generate().
"""

from __future__ import annotations

import pytest
import torch

from ktc.errors import HostError
from tests.test_end_to_end import hf_model, prompts, rel_err

HAS_CUDA = torch.cuda.is_available()
GPU_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")


@pytest.fixture(scope="module")
def gpu_compiled(tiny_models, tmp_path_factory):
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("gpu-artifacts")
    cache = {}

    def get(arch: str, quant: str = "none"):
        if (arch, quant) not in cache:
            out = root / f"{arch}-{quant}.ktc"
            compile_model(tiny_models[arch], out, target="cuda", quant=quant)
            cache[(arch, quant)] = out
        return cache[(arch, quant)]

    return get


def bf16_weights_ref(folder):
    """transformers' float32 model with its weights rounded to bf16, as a --target cuda artifact stores them."""
    ref = hf_model(folder)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    return ref


def _executor(path, dtype):
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.gpu.executor import GpuExecutor
    from ktc.runtime.gpu.kernels import load_kernels
    from ktc.runtime.loader import load_weights

    m = read_manifest(path)
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    kernels = load_kernels(path / m.gpu["dir"] / "src")
    return GpuExecutor(m.graph, load_weights(m), kernels, dev, float_dtype=dtype), dev


def _run_prefill_then_decode(ex, dev, ids, steps, dtype):
    from ktc.runtime.gpu.kv_cache import GpuKVCache
    from ktc.runtime.kv_cache import layer_specs

    b, s = ids.shape
    cache = GpuKVCache(layer_specs(ex.graph), dev, dtype=dtype)
    cache.reserve(b, s + steps)
    pos = torch.arange(s, device=dev).expand(b, s).contiguous()
    outs = [ex.run(ids.to(dev), pos, cache, 0)]
    cache.advance(s)
    for i in range(steps):
        tok = outs[-1][:, -1].argmax(-1, keepdim=True)
        pos = torch.full((b, 1), s + i, device=dev)
        outs.append(ex.run(tok, pos, cache, s + i))
        cache.advance(1)
    return torch.cat([o.cpu() for o in outs], dim=1)


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_gpu_executor_matches_transformers(arch, tiny_models, gpu_compiled):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(gpu_compiled(arch), dtype)
    ref = bf16_weights_ref(tiny_models[arch])
    ids = prompts(ref.config.vocab_size, 6, batch=2)
    got = _run_prefill_then_decode(ex, dev, ids, 2, dtype)
    full = torch.cat((ids, got[:, 5:7].argmax(-1)), dim=1)       # the tokens the two decode steps fed
    with torch.no_grad():
        expected = ref(full).logits
    err = rel_err(got, expected)
    print(f"\n{arch} GPU path ({dev.type}, {dtype}): relative logits error {err:.2e}")
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_gpu_w4a16_experts_are_close(tiny_models, gpu_compiled):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(gpu_compiled("qwen3_moe", "int4"), dtype)
    ref = bf16_weights_ref(tiny_models["qwen3_moe"])
    ids = prompts(ref.config.vocab_size, 7)
    got = _run_prefill_then_decode(ex, dev, ids, 0, dtype)
    with torch.no_grad():
        err = rel_err(got, ref(ids).logits)
    assert err < 0.1


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a host without a GPU")
def test_cuda_artifact_is_refused_without_a_gpu(gpu_compiled):
    import ktc

    with pytest.raises(HostError, match="no CUDA GPU"):
        ktc.load(str(gpu_compiled("qwen3_moe")))


def check_generate_with_cuda_graphs(artifact, folder) -> None:
    """generate() with CUDA-graph decode == eager decode, and agrees with transformers' bf16 greedy
    tokens at least half the time (tiny random models have near-tied logits)."""
    import ktc

    model = ktc.load(str(artifact))
    ref = bf16_weights_ref(folder).to(torch.bfloat16)
    ids = prompts(ref.config.vocab_size, 5, seed=3)
    got = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    model.cuda_graphs = False
    again = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert got.tolist() == again.tolist()                 # graph replay == eager steps
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0,
                                eos_token_id=None)
    agree = (got[:, 5:] == expected[:, 5:]).float().mean().item()
    print(f"\ngreedy tokens agreeing with transformers bf16: {agree:.0%}")
    assert agree >= 0.5


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_generate_with_cuda_graphs_matches_transformers(tiny_models, gpu_compiled):
    check_generate_with_cuda_graphs(gpu_compiled("qwen3_moe"), tiny_models["qwen3_moe"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_short_prefills_run_in_cuda_graphs_and_match_eager(gpu_compiled):
    """Prompts padded to a power of two prefill in one CUDA graph per (batch, padded length), reused
    across prompts; logits and the decode steps after them match an eager model on the same weights."""
    import ktc
    from ktc.runtime.gpu.model import PREFILL_GRAPH_MIN, PREFILL_GRAPH_TOKENS

    model = ktc.load(str(gpu_compiled("qwen3_moe")), max_context=2200)
    eager = ktc.load(str(gpu_compiled("qwen3_moe")), max_context=2200)
    eager.cuda_graphs = False
    vocab = int(model.config["vocab_size"])
    captured = {}
    # the long (eager) prompt first: its cache is big enough for the next ones, whose graphs then stay valid
    for b, n in ((1, 2100), (1, 5), (1, PREFILL_GRAPH_MIN), (1, 23), (1, 11), (1, 40), (2, 9)):
        ids = prompts(vocab, n, batch=b, seed=7)
        got, ref = model.prefill(ids, reserve=4), eager.prefill(ids, reserve=4)
        assert got.shape == ref.shape == (b, vocab) and rel_err(got, ref) < 1e-2, (b, n)
        padded = max(PREFILL_GRAPH_MIN, 1 << (n - 1).bit_length())
        if n > PREFILL_GRAPH_TOKENS:
            assert (b, padded) not in model._prefill_graphs          # too long for a graph: eager
            continue
        graph = model._prefill_graphs[(b, padded)]["graph"]
        assert captured.setdefault((b, padded), graph) is graph       # the shape's graph, replayed again
        tok = got.argmax(-1)
        for _ in range(3):                                            # decoding goes on from the prompt
            step, ref_step = model.decode(tok), eager.decode(tok)
            assert rel_err(step, ref_step) < 1e-2, (b, n)
            tok = ref_step.argmax(-1)
    assert set(captured) == {(1, 16), (1, 32), (2, 16), (1, 64)}
