"""--gpu-dense-quant int4 end to end: tiny --target cuda compiles, their manifests, and the GPU executor.

Without a GPU the executor runs on CPU tensors in Triton's interpreter in float32: the int4
attention / shared-expert projections go through matmul.linear_w4a16, and the logits must equal
transformers' on the same weights (each int4 weight replaced by what pack_w4a16 stores, the others
rounded to bf16) up to float32 rounding. qwen2_moe has q/k/v biases and a gated shared expert,
qwen3_moe q/k norms and an o projection with K = 128 (group 128).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.runtime.gpu.test_gpu_model import _executor, _run_prefill_then_decode
from tests.runtime.helpers import assert_candidates_agree, gpu_tuning_tasks
from tests.test_end_to_end import hf_model, prompts, rel_err

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def dense_int4(tiny_models, tmp_path_factory):
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("dense-int4")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = root / f"{arch}.ktc"
            compile_model(tiny_models[arch], cache[arch], target="cuda", quant="none", gpu_dense_quant="int4")
        return cache[arch]

    return get


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _int4_ref(folder, graph):
    """transformers' model with the artifact's int4 weights dequantized and every other weight bf16-rounded."""
    from ktc.codegen.gpu.moe import pack_w4a16, unpack_w4a16

    groups = {}
    for w in graph.weights.values():
        if w.format == "int4":
            for src in w.source.get("concat", [w.source]):
                groups[src["load"]] = w.group_size
    ref = hf_model(folder)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in groups:
                parts = pack_w4a16(p, groups[name])
                p.copy_(unpack_w4a16(parts["qweight"], parts["scales"]))
            else:
                p.copy_(p.bfloat16().float())
    assert set(groups) <= {n for n, _ in ref.named_parameters()}
    return ref


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "deepseek_v2"])
def test_manifest_and_graph_formats(arch, dense_int4):
    m = _manifest(dense_int4(arch))
    assert m["compile"]["gpu_dense_quant"] == "int4" and m["graph"]["config"]["placement"]["gpu_dense_format"] == "int4"
    weights, nodes = m["graph"]["weights"], m["graph"]["nodes"]
    int4 = {n for n, w in weights.items() if w["format"] == "int4"}
    expect = set()
    for node in nodes:
        if node["op"] == "attention" and node["attrs"]["kind"] == "gqa":
            expect |= {node["weights"][r] for r in ("q", "k", "v", "o")}
        elif node["op"] == "mlp":
            expect |= {w for r, w in node["weights"].items() if r in ("gate_up", "down")}
    assert expect and int4 == expect, int4 ^ expect      # MLA attention (deepseek) stays bf16
    for name in int4:
        w = weights[name]
        assert w["layout"] == "gpu_w4a16" and w["group_size"] == max(g for g in (32, 64, 128) if w["shape"][1] % g == 0)
        assert {f"{name}::qweight", f"{name}::scales"} <= set(m["weights"]["map"])
    head = next(n for n in nodes if n["name"] == "lm_head")
    assert weights[head["weights"]["weight"]]["format"] == "bfloat16" and head["kernel"] == "matmul.linear"
    for w in weights.values():
        if w["format"] != "int4":
            assert w["format"] in ("bfloat16", "float32") and w["layout"] is None


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_gpu_executor_matches_transformers_on_the_dequantized_weights(arch, tiny_models, dense_int4):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(dense_int4(arch), dtype)
    ref = _int4_ref(tiny_models[arch], ex.graph)
    ids = prompts(ref.config.vocab_size, 6, batch=2)
    got = _run_prefill_then_decode(ex, dev, ids, 2, dtype)
    full = torch.cat((ids, got[:, 5:7].argmax(-1)), dim=1)
    with torch.no_grad():
        expected = ref(full).logits
    err = rel_err(got, expected)
    print(f"\n{arch} int4 dense GPU path ({dev.type}, {dtype}): relative logits error {err:.2e}")
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    with torch.no_grad():           # and an approximation of the float model (absmax int4 on Gaussian weights:
        full_err = rel_err(got, hf_model(tiny_models[arch])(full).logits)   # ~10% rms error a matrix)
    print(f"{arch}: relative logits error to the float32 model {full_err:.2e}")
    assert full_err < 0.5


def test_random_weights_run_on_the_gpu_executor(dense_int4):
    """Benchmarks build weights with ktc.pack.random_weights: packed int4 dense parts included."""
    from ktc.pack import random_weights
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.gpu.executor import GpuExecutor
    from ktc.runtime.gpu.kernels import load_kernels

    path = dense_int4("qwen2_moe")
    m = read_manifest(path)
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    weights = random_weights(m.graph, device=dev)
    assert isinstance(weights["model.layers.0.self_attn.q_proj.weight"], dict)
    ex = GpuExecutor(m.graph, weights, load_kernels(path / m.gpu["dir"] / "src"), dev,
                     float_dtype=torch.bfloat16 if HAS_CUDA else torch.float32)
    logits = _run_prefill_then_decode(ex, dev, prompts(256, 4), 0, ex.float_dtype)
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_int4_linears_are_tunable(dense_int4):
    tunables, tasks = gpu_tuning_tasks(dense_int4("qwen3_moe"), ("linear_w4a16",))
    assert tunables["qkv"].kernel.startswith("matmul.linear_w4a16#") and tunables["qkv"].fmt == "w4a16-g64"
    assert tunables["o"].fmt == "w4a16-g128" and tunables["logits"].kernel.startswith("matmul.linear#")
    assert {t.key.shape for t in tasks} == {tunables["qkv"].shape, tunables["o"].shape}
    assert_candidates_agree(tasks, atol=1e-4)
