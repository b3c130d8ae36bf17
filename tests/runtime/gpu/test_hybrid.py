"""Heterogeneous artifacts: routed experts split between the GPU and the CPU, run together.

Without a GPU the GPU half runs in Triton's interpreter on CPU tensors (float32) and the CPU
half in the artifact's TVM kernels, through the same schedule (stage / mark / run / gather)
the CUDA runtime uses; with a GPU (the device machine) the same checks run in bf16 on CUDA,
plus CUDA-graph decode (one graph per stretch between CPU steps), generate() and profiling.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.runtime.gpu.test_gpu_model import HAS_CUDA, _run_prefill_then_decode, bf16_weights_ref
from tests.test_end_to_end import prompts, rel_err

# experts 0-3 of every layer on the CPU, 4-7 on the GPU
HALF_ON_CPU = "[[rule]]\nmatch = 'experts\\.[0-3]$'\ndevice = 'cpu'\n"


def build(tiny_models: dict, root: Path, arch: str, kind: str) -> Path:
    """Compile tiny `arch` as `kind`: "gpu" (all on the GPU), "hybrid" (experts 0-3 on the CPU by a
    rule, --quant none), "budget" (int8 CPU experts placed by a GPU budget) or "budget4" (the same
    with int4 CPU experts, bf16 GPU experts)."""
    from ktc.compiler import compile_model

    rules = root / "rules.toml"
    rules.write_text(HALF_ON_CPU)
    out = root / f"{arch}-{kind}.ktc"
    if kind == "gpu":
        compile_model(tiny_models[arch], out, target="cuda", quant="none", force=True)
    elif kind == "hybrid":
        compile_model(tiny_models[arch], out, target="cuda", quant="none", rules=rules, force=True)
    else:   # int8 (int4) CPU experts, placed by a GPU budget that holds about half the experts
        compile_model(tiny_models[arch], out, target="cuda", quant="int4" if kind == "budget4" else "int8",
                      gpu_quant="none", gpu_memory=_half_budget(tiny_models[arch]), force=True)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    """artifacts(arch, kind) -> path. The GPU machine has no TVM to build CPU kernels with: there
    KTC_TEST_ARTIFACTS names a folder of these artifacts built here (python -m
    tests.runtime.gpu.test_hybrid DIR, with the same tiny models)."""
    root = tmp_path_factory.mktemp("hybrid")
    prebuilt = os.environ.get("KTC_TEST_ARTIFACTS")
    cache = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            if prebuilt:
                cache[(arch, kind)] = Path(prebuilt) / f"{arch}-{kind}.ktc"
            else:
                cache[(arch, kind)] = build(tiny_models, root, arch, kind)
        return cache[(arch, kind)]

    return get


def _half_budget(folder) -> int:
    from ktc.capture import capture
    from ktc.passes.placement import budget_for_expert_share

    return budget_for_expert_share(capture(folder), 0.5)


def _executor(path, dtype):
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.cpu_experts import CpuExpertKernels
    from ktc.runtime.gpu.executor import GpuExecutor
    from ktc.runtime.gpu.kernels import load_kernels
    from ktc.runtime.loader import load_weights

    m = read_manifest(path)
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    cpu = CpuExpertKernels.load(path / m.cpu["dir"], m.cpu) if m.cpu else None
    ex = GpuExecutor(m.graph, load_weights(m), load_kernels(path / m.gpu["dir"] / "src"), dev, float_dtype=dtype,
                     cpu_kernels=cpu)
    return ex, dev


def test_hybrid_schedule_starts_the_cpu_before_the_gpu_experts_and_waits_at_the_add(artifacts):
    ex, _ = _executor(artifacts("qwen2_moe", "hybrid"), torch.float32)
    assert len(ex.offloads) == 2                                   # both layers have CPU experts
    names = [(kind, ex.steps[i][0].name) for kind, i in ex.actions]
    for layer in (0, 1):
        moe = f"layers.{layer}.mlp.experts"
        order = [names.index(a) for a in [("stage", f"{moe}.cpu"), ("mark", f"{moe}.cpu"), ("gpu", f"{moe}.gpu"),
                                          ("gpu", f"layers.{layer}.mlp.shared_experts"), ("run", f"{moe}.cpu"),
                                          ("gather", f"{moe}.cpu"), ("gpu", f"{moe}.combine")]]
        assert order == sorted(order)
    segments = ex.segments()
    assert [kind for kind, _ in segments].count("host") == 2       # run, once per layer
    assert all(kind == "stream" for kind, _ in segments[::2])


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_hybrid_run_matches_the_all_gpu_run(arch, artifacts):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    hybrid, dev = _executor(artifacts(arch, "hybrid"), dtype)
    gpu, _ = _executor(artifacts(arch, "gpu"), dtype)
    ids = prompts(256, 9, batch=2)
    got = _teacher_forced(hybrid, dev, ids, 6, dtype)     # prefill 6 tokens, then 3 decode steps
    want = _teacher_forced(gpu, dev, ids, 6, dtype)
    err = rel_err(got, want)
    print(f"\n{arch} hybrid vs all-GPU ({dev.type}, {dtype}): relative logits error {err:.2e}")
    # the CPU experts keep the checkpoint's float32 where the GPU stores bf16: ~5e-4 in float32
    assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def _teacher_forced(ex, dev, ids, prompt: int, dtype) -> torch.Tensor:
    """Logits of a prefill of ids[:, :prompt], then one decode step per further token of ids (the
    same tokens for every run compared, so near-tied argmaxes cannot make runs diverge)."""
    from ktc.runtime.gpu.kv_cache import GpuKVCache
    from ktc.runtime.kv_cache import layer_specs

    b, s = ids.shape
    cache = GpuKVCache(layer_specs(ex.graph), dev, dtype=dtype)
    cache.reserve(b, s)
    pos = torch.arange(prompt, device=dev).expand(b, prompt).contiguous()
    outs = [ex.run(ids[:, :prompt].to(dev), pos, cache, 0)]
    cache.advance(prompt)
    for i in range(prompt, s):
        outs.append(ex.run(ids[:, i:i + 1].to(dev), torch.full((b, 1), i, device=dev), cache, i))
        cache.advance(1)
    return torch.cat([o.float().cpu() for o in outs], dim=1)


def test_decode_calls_bound_to_the_pinned_buffers_compute_what_moe_experts_computes(artifacts):
    """Decode-sized CPU calls run bound to the pool's buffers (CpuExpertKernels.bind: no argument
    handling per call); the same steps through moe_experts give the same logits, bit for bit."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(artifacts("qwen3_moe", "budget"), dtype)
    ids = prompts(256, 7, batch=2)
    bound = _teacher_forced(ex, dev, ids, 4, dtype)
    assert all(off._bound for off in ex.offloads)            # decode steps (2 tokens) took the bound calls
    for off in ex.offloads:
        off.bound_calls = False
    unbound = _teacher_forced(ex, dev, ids, 4, dtype)
    assert torch.equal(bound, unbound)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (pinned memory)")
def test_zero_copy_decode_buffers_give_the_memcpy_results(artifacts):
    """Decode-sized pinned buffers are written and read by kernels through CUDA aliases; copying
    them with memcpys instead (as before) gives the same logits, bit for bit."""
    ex, dev = _executor(artifacts("qwen3_moe", "budget"), torch.bfloat16)
    ids = prompts(256, 7, batch=2)
    zero_copy = _teacher_forced(ex, dev, ids, 4, torch.bfloat16)
    small = [b for key, b in ex.offloads[0].pool.items() if key[-1] == "small"]
    assert small and all(b.on_device is not None for b in small)
    for off in ex.offloads:
        off.zero_copy = False
    ex.offloads[0].pool.clear()
    memcpy = _teacher_forced(ex, dev, ids, 4, torch.bfloat16)
    assert all(b.on_device is None for key, b in ex.offloads[0].pool.items() if key[-1] == "small")
    assert torch.equal(zero_copy, memcpy)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (pinned memory read over PCIe)")
@pytest.mark.parametrize("kind", ["budget", "budget4"])
def test_gpu_share_of_the_cpu_experts_read_over_pcie_matches_the_cpu_kernels(artifacts, kind):
    """Single-token decode steps with the GPU running part, or all, of a token's CPU experts (int8 / int4
    packed weights read from pinned host memory, on a side stream or the main one) give the logits of the
    CPU kernels running them all; and CUDA-graph decode with the split == eager decode with it."""
    import ktc

    ex, dev = _executor(artifacts("qwen3_moe", kind), torch.bfloat16)
    assert all(off.pcie_take is None for off in ex.offloads)      # the cost model: tiny experts stay on the CPU
    moe = ex.offloads[0].gpu_kernels.moe
    real, calls = moe.moe_decode_cpu_layout, []

    def counted(*a, **kw):
        calls.append(a[2].shape)
        return real(*a, **kw)

    moe.moe_decode_cpu_layout = counted
    try:
        ids = prompts(256, 8, batch=1)
        cpu = _teacher_forced(ex, dev, ids, 4, torch.bfloat16)
        assert not calls
        k = ex.offloads[0].top_k
        for name, take in (("half", tuple((n + 1) // 2 for n in range(k + 1))), ("all", tuple(range(k + 1)))):
            for off in ex.offloads:
                off.pcie_take = take
            got = _teacher_forced(ex, dev, ids, 4, torch.bfloat16)
            assert len(calls) == 4 * len(ex.offloads)           # every decode step, every layer
            calls.clear()
            for off in ex.offloads:                             # the share on the main stream: the same sums
                off.pcie_side_stream = False
            assert torch.equal(_teacher_forced(ex, dev, ids, 4, torch.bfloat16), got)
            for off in ex.offloads:
                off.pcie_side_stream = True
            calls.clear()
            err = rel_err(got, cpu)
            print(f"\n{kind}: GPU takes {name} of the CPU experts over PCIe: logits vs CPU kernels {err:.2e}")
            assert err < 1e-2
    finally:
        moe.moe_decode_cpu_layout = real
    model = ktc.load(str(artifacts("qwen3_moe", kind)))
    for off in model.executor.offloads:
        off.pcie_take = tuple((n + 1) // 2 for n in range(off.top_k + 1))
    p = prompts(256, 5, seed=4)
    graphs = model.generate(p, max_new_tokens=12, eos_token_id=[])
    model.cuda_graphs = False
    assert model.generate(p, max_new_tokens=12, eos_token_id=[]).tolist() == graphs.tolist()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (a kernel waiting on a flag in pinned memory)")
def test_decode_graphs_launched_ahead_wait_on_the_gpu_for_each_cpu_kernel(artifacts):
    """Decode graphs launched a layer ahead, each waiting on the GPU for the flag the host sets after the CPU
    kernel, give the logits of graphs launched after each kernel, bit for bit; a step interrupted half way
    releases every waiting kernel, leaves the device's and the host's counts equal, and the step run again gives
    the uninterrupted logits."""
    import ktc

    model = ktc.load(str(artifacts("qwen3_moe", "budget")))
    offs = model.executor.offloads
    for off in offs:
        off.host_flags = True
    p, toks = prompts(256, 5, seed=4), [7, 91, 13, 200, 5]

    def decode(interrupt_at: int | None = None) -> torch.Tensor:
        model.reset()
        model.prefill(p, reserve=len(toks) + 2)
        out = []
        for i, tok in enumerate(toks):
            t = torch.tensor([tok], device="cuda")
            if i == interrupt_at:
                def stop(*a, **kw):
                    raise KeyboardInterrupt
                offs[-1].run = stop
                with pytest.raises(KeyboardInterrupt):
                    model.step(t)
                del offs[-1].run
                assert all(int(off._seen[0]) == off._count for off in offs)
            out.append(model.step(t).float().cpu())
        return torch.stack(out)

    ahead = decode()
    assert model._cuda_graph["ahead"]
    assert torch.equal(decode(interrupt_at=3), ahead)
    for off in offs:
        off.host_flags = False
    after = decode()
    assert not model._cuda_graph["ahead"]
    assert torch.equal(ahead, after)


def test_hybrid_with_int8_cpu_experts_is_close_to_transformers(tiny_models, artifacts):
    from ktc.runtime.artifact import read_manifest

    path = artifacts("qwen3_moe", "budget")
    plan = read_manifest(path).graph.config["placement"]
    assert plan["gpu_experts"] > 0 and plan["cpu_experts"] > 0
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(path, dtype)
    ref = bf16_weights_ref(tiny_models["qwen3_moe"])
    ids = prompts(ref.config.vocab_size, 6, batch=2)
    got = _run_prefill_then_decode(ex, dev, ids, 2, dtype)
    full = torch.cat((ids, got[:, 5:7].argmax(-1)), dim=1)
    with torch.no_grad():
        err = rel_err(got, ref(full).logits)
    print(f"\nhybrid int8 CPU experts vs transformers: {err:.2e}")
    assert err < 3e-2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_hybrid_generate_with_cuda_graphs_follows_all_gpu_for_32_steps(artifacts):
    """CUDA-graph decode (one graph per stretch between CPU steps) == eager steps; and fed the
    all-GPU run's 32 greedy tokens, every step's logits stay within 2e-2 of the all-GPU run's
    (the tiny random model's logits are too flat for its own argmax to be a stable check)."""
    import ktc

    hybrid = ktc.load(str(artifacts("qwen3_moe", "hybrid")))
    gpu = ktc.load(str(artifacts("qwen3_moe", "gpu")))
    ids = prompts(256, 5, seed=3)
    hybrid.profile(True)
    got = hybrid.generate(ids, max_new_tokens=32, eos_token_id=[])
    stats = hybrid.layer_stats()
    hybrid.profile(False)
    assert len(stats) == 2 and all(s["calls"] >= 31 and s["cpu_ms"] > 0 for s in stats)
    hybrid.cuda_graphs = False
    eager = hybrid.generate(ids, max_new_tokens=32, eos_token_id=[])
    assert got.tolist() == eager.tolist()                  # segment graphs == eager steps
    hybrid.cuda_graphs = True
    want = gpu.generate(ids, max_new_tokens=32, eos_token_id=[])
    errs = []
    a, b = hybrid.prefill(ids, reserve=32), gpu.prefill(ids, reserve=32)
    errs.append(rel_err(a, b))
    for tok in want[0, 5:].tolist():
        t = torch.tensor([tok], device="cuda")
        errs.append(rel_err(hybrid.step(t).float().cpu(), gpu.step(t).float().cpu()))
    print(f"\nhybrid vs all-GPU, 33 teacher-forced steps: worst relative logits error {max(errs):.2e}")
    assert max(errs) < 2e-2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (streaming copies from pinned memory)")
@pytest.mark.parametrize("kind", ["budget", "budget4"])
def test_long_prefill_streaming_cpu_experts_matches_the_cpu_kernels(artifacts, monkeypatch, kind):
    """A prefill that streams the CPU experts (int8 as w8a16, int4 as w4a16, on the GPU) gives the
    logits of the same prefill run by the CPU kernels."""
    from ktc.runtime.artifact import read_manifest

    path = artifacts("qwen3_moe", kind)
    plan = read_manifest(path).graph.config["placement"]
    assert plan["cpu_experts"] > 0 and plan["stream_buffer_bytes"] > 0
    ids = prompts(256, 40, batch=2)
    outs = {}
    for mode, env in (("cpu", "0"), ("stream", "1")):
        monkeypatch.setenv("KTC_STREAM_MIN_TOKENS", env)
        ex, dev = _executor(path, torch.bfloat16)
        assert all((o.stream_from is not None) == (mode == "stream") for o in ex.offloads)
        outs[mode] = _run_prefill_then_decode(ex, dev, ids, 0, torch.bfloat16)
    err = rel_err(outs["stream"], outs["cpu"])
    print(f"\n{kind}: streamed vs CPU-kernel prefill logits {err:.2e}")
    assert err < 2e-2


if __name__ == "__main__":   # build the artifacts for KTC_TEST_ARTIFACTS: python -m tests.runtime.gpu.test_hybrid DIR
    from ktc.tiny import make_tiny_model

    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    folders = {}
    for a in ("qwen3_moe", "qwen2_moe"):
        make_tiny_model(a, dest / "models" / a, seed=1, tokenizer=(a == "qwen3_moe"))
        folders[a] = dest / "models" / a
    for arch, kind in (("qwen3_moe", "gpu"), ("qwen3_moe", "hybrid"), ("qwen3_moe", "budget"),
                       ("qwen3_moe", "budget4"), ("qwen2_moe", "gpu"), ("qwen2_moe", "hybrid")):
        print(build(folders, dest, arch, kind))
