"""--gpu-quant fp8 and --gpu-dense-quant fp8 end to end: tiny --target cuda compiles, their manifests and
float8_e4m3fn shards, the GPU executor, the sm89 requirement, tuning and random weights.

Without a GPU the executor runs on CPU tensors in Triton's interpreter in float32: the fp8 routed experts
go through the fused MoE's 8-bit branch and the fp8 attention / shared-expert projections through
matmul.linear_fp8, and the logits must equal transformers' on the same weights (each fp8 weight replaced by
what pack_fp8 stores, dequantized; the others rounded to bf16) up to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktc.errors import HostError
from tests.runtime.gpu.test_gpu_model import _executor, _run_prefill_then_decode
from tests.runtime.helpers import assert_candidates_agree, gpu_tuning_tasks
from tests.test_end_to_end import hf_model, prompts, rel_err

HAS_CUDA = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def fp8_compiled(tiny_models, tmp_path_factory):
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("fp8")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = root / f"{arch}.ktc"
            compile_model(tiny_models[arch], cache[arch], target="cuda", quant="none", gpu_quant="fp8",
                          gpu_dense_quant="fp8")
        return cache[arch]

    return get


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _loads(source: dict) -> list[str]:
    """The checkpoint keys of a weight source, all of them rows of it (stack / row concat / load)."""
    if "load" in source:
        return [source["load"]]
    assert "values" not in source and source.get("dim", 0) == 0
    return [k for s in source.get("stack", source.get("concat", [])) for k in _loads(s)]


def _fp8_ref(folder: Path, graph, out: Path):
    """transformers' model on a copy of the checkpoint where every fp8 weight's tensors are what pack_fp8
    stores, dequantized, and every other tensor is rounded to bf16. pack_fp8 quantizes each row in groups
    along K, so packing a checkpoint tensor alone gives the rows the stacked / concatenated weight gets."""
    from safetensors.torch import load_file, save_file

    from ktc.codegen.gpu.moe import pack_fp8, unpack_fp8

    groups = {k: w.group_size for w in graph.weights.values() if w.format == "fp8" for k in _loads(w.source)}
    tensors = load_file(str(folder / "model.safetensors"))
    assert groups and set(groups) <= set(tensors)
    for key, t in tensors.items():
        if key in groups:
            parts = pack_fp8(t, groups[key])
            tensors[key] = unpack_fp8(parts["qweight"], parts["scales"])
        else:
            tensors[key] = t.bfloat16().float()
    out.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return hf_model(out)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_manifest_formats_and_fp8_shards(arch, fp8_compiled, tiny_models):
    from safetensors import safe_open

    from ktc.codegen.gpu.moe import pack_fp8
    from ktc.runtime.artifact import gpu_fp8, read_manifest, verify_files
    from ktc.runtime.loader import load_weights

    path = fp8_compiled(arch)
    m = _manifest(path)
    assert m["compile"]["gpu_quant"] == "fp8" and m["compile"]["gpu_dense_quant"] == "fp8"
    assert m["targets"]["gpu"]["archs"] == ["sm89", "sm90"]
    placement = m["graph"]["config"]["placement"]
    assert placement["gpu_expert_format"] == placement["gpu_dense_format"] == "fp8"
    weights, nodes = m["graph"]["weights"], m["graph"]["nodes"]
    fp8 = {n for n, w in weights.items() if w["format"] == "fp8"}
    expect = set()
    for node in nodes:
        if node["op"] == "moe_experts":
            expect |= {node["weights"]["gate_up"], node["weights"]["down"]}
            assert node["kernel"] == "moe.fused_moe_fp8"
        elif node["op"] == "attention" and node["attrs"]["kind"] == "gqa":
            expect |= {node["weights"][r] for r in ("q", "k", "v", "o")}
        elif node["op"] == "mlp":
            expect |= {w for r, w in node["weights"].items() if r in ("gate_up", "down")}
    assert expect and fp8 == expect, fp8 ^ expect           # MLA attention (deepseek) and the head stay bf16
    for name in fp8:
        assert weights[name]["layout"] == "gpu_fp8"
        key = f"{name}::qweight"
        with safe_open(str(path / m["weights"]["map"][key]), framework="pt") as f:
            assert f.get_slice(key).get_dtype() == "F8_E4M3"
            assert f.get_tensor(f"{name}::scales").dtype == torch.float32
    manifest = read_manifest(path)
    verify_files(manifest, hashes=True)                     # sizes and sha256 of the fp8 shards
    assert gpu_fp8(manifest)
    loaded = load_weights(manifest)
    name = sorted(n for n in fp8 if "load" in weights[n]["source"])[0]
    assert loaded[name]["qweight"].dtype == FP8 and list(loaded[name]["qweight"].shape) == weights[name]["shape"]
    from safetensors.torch import load_file

    ref = pack_fp8(load_file(str(tiny_models[arch] / "model.safetensors"))[weights[name]["source"]["load"]],
                   weights[name]["group_size"])
    assert torch.equal(loaded[name]["qweight"].float(), ref["qweight"].float())
    assert torch.equal(loaded[name]["scales"], ref["scales"])


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_gpu_executor_matches_transformers_on_the_dequantized_weights(arch, tiny_models, fp8_compiled, tmp_path):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(fp8_compiled(arch), dtype)
    ref = _fp8_ref(tiny_models[arch], ex.graph, tmp_path / "ref")
    ids = prompts(ref.config.vocab_size, 6, batch=2)
    got = _run_prefill_then_decode(ex, dev, ids, 2, dtype)
    full = torch.cat((ids, got[:, 5:7].argmax(-1)), dim=1)
    with torch.no_grad():
        expected = ref(full).logits
    err = rel_err(got, expected)
    print(f"\n{arch} fp8 GPU path ({dev.type}, {dtype}): relative logits error {err:.2e}")
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    with torch.no_grad():           # and an approximation of the float model (e4m3: ~2-3% rms error a matrix)
        full_err = rel_err(got, hf_model(tiny_models[arch])(full).logits)
    print(f"{arch}: relative logits error to the float32 model {full_err:.2e}")
    assert full_err < 0.15


def test_gpu_executor_prefill_runs_w8a8(tiny_models, fp8_compiled, tmp_path):
    """A prompt of W8A8_MIN_ROWS tokens or more prefills the fp8 products w8a8 (activations rounded to e4m3
    per row and group): its logits differ from the dequantized-weights reference by that rounding, far
    more than float32's (the short prompts above: 1e-4) and of the order of the weights' own e4m3 rounding
    (the float model above: 0.15), on this tiny random model."""
    from ktc.codegen.gpu import matmul, moe

    arch = "qwen3_moe"
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    ex, dev = _executor(fp8_compiled(arch), dtype)
    ref = _fp8_ref(tiny_models[arch], ex.graph, tmp_path / "ref")
    s = max(matmul.W8A8_MIN_ROWS, moe.W8A8_MIN_TOKENS) + 3
    ids = prompts(ref.config.vocab_size, s)
    got = _run_prefill_then_decode(ex, dev, ids, 1, dtype)
    full = torch.cat((ids, got[:, s - 1:s].argmax(-1)), dim=1)
    with torch.no_grad():
        expected = ref(full).logits
    prefill_err, decode_err = rel_err(got[:, :s], expected[:, :s]), rel_err(got[:, s:], expected[:, s:])
    print(f"\nw8a8 prefill of {s} tokens: logits error {prefill_err:.2e}; the decode step after it {decode_err:.2e}")
    assert 1e-2 < prefill_err < 0.2 and decode_err < 0.2


def _fake_gpu(monkeypatch, capability, hip=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.version, "hip", hip)


def test_fp8_artifacts_need_sm89(fp8_compiled, tiny_models, tmp_path, monkeypatch):
    from ktc.compiler import compile_model
    from ktc.runtime.artifact import check_host, read_manifest
    from ktc.runtime.gpu.kernels import load_kernels
    from ktc.runtime.gpu.tune import gpu_tasks

    fp8 = read_manifest(fp8_compiled("qwen3_moe"))
    compile_model(tiny_models["qwen3_moe"], tmp_path / "dense.ktc", target="cuda", quant="none",
                  gpu_dense_quant="fp8")
    bf16 = tmp_path / "bf16.ktc"
    compile_model(tiny_models["qwen3_moe"], bf16, target="cuda", quant="none", weights_free=True)
    _fake_gpu(monkeypatch, (8, 0))
    for path in (fp8.path, tmp_path / "dense.ktc"):
        with pytest.raises(HostError) as e:
            check_host(read_manifest(path))
        assert "\n" not in e.value.message and "fp8 (e4m3), which needs an sm89+ GPU" in e.value.message
        assert "(Test GPU) is sm80: recompile it with --gpu-quant / --gpu-dense-quant int4 or none" in e.value.message
    check_host(read_manifest(bf16))                        # bf16 kernels run on sm80
    kernels = load_kernels(fp8.path / fp8.gpu["dir"] / "src")
    with pytest.raises(HostError, match="needs an sm89"):
        gpu_tasks(fp8.graph, kernels, [1], device="cuda")  # `ktc tune` refuses before timing anything
    for capability, hip in (((8, 9), None), ((9, 0), None), ((9, 4), "6.2")):
        _fake_gpu(monkeypatch, capability, hip)
        check_host(fp8)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a host without a GPU")
def test_fp8_artifact_without_a_gpu_is_refused_as_any_cuda_one(fp8_compiled):
    import ktc

    with pytest.raises(HostError, match="no CUDA GPU"):
        ktc.load(str(fp8_compiled("qwen3_moe")))


def test_fp8_linears_and_experts_are_tunable(fp8_compiled):
    tunables, tasks = gpu_tuning_tasks(fp8_compiled("qwen3_moe"), ("linear_fp8", "fused_moe"))
    assert tunables["qkv"].kernel.startswith("matmul.linear_fp8#") and tunables["qkv"].fmt == "fp8-g64"
    assert tunables["o"].fmt == "fp8-g128" and tunables["logits"].kernel.startswith("matmul.linear#")
    assert tunables["moe"].kernel.startswith("moe.fused_moe#") and tunables["moe"].fmt == "fp8-g32"
    assert {t.key.shape for t in tasks} == {tunables[k].shape for k in ("qkv", "o", "moe")}
    assert_candidates_agree(tasks, atol=1e-5, limit=6)


def test_random_weights_run_on_the_gpu_executor(fp8_compiled):
    """Benchmarks build weights with ktc.pack.random_weights: fp8 parts included."""
    from ktc.pack import random_weights
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.gpu.executor import GpuExecutor
    from ktc.runtime.gpu.kernels import load_kernels

    path = fp8_compiled("qwen2_moe")
    m = read_manifest(path)
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    weights = random_weights(m.graph, device=dev)
    assert weights["model.layers.0.self_attn.q_proj.weight"]["qweight"].dtype == FP8
    assert weights["model.layers.0.mlp.experts.gate_up"]["qweight"].dtype == FP8
    ex = GpuExecutor(m.graph, weights, load_kernels(path / m.gpu["dir"] / "src"), dev,
                     float_dtype=torch.bfloat16 if HAS_CUDA else torch.float32)
    logits = _run_prefill_then_decode(ex, dev, prompts(256, 4), 1, ex.float_dtype)
    assert logits.shape == (1, 5, 256) and torch.isfinite(logits).all()


def test_cat_rows_concatenates_fp8_parts_and_dequantizes_a_mix():
    """q / k / v (or gate / up) become one GEMM: fp8 weights of one group size stay fp8, concatenated part by
    part; beside a bf16 weight (K fits no group) or an int4 one they are dequantized."""
    from ktc.codegen.gpu.moe import pack_fp8, pack_w4a16, unpack_fp8
    from ktc.runtime.gpu.ops import cat_rows

    a, b = torch.randn(8, 64), torch.randn(4, 64)
    pa, pb = pack_fp8(a, 32), pack_fp8(b, 32)
    both = cat_rows([pa, pb])
    assert both["qweight"].dtype == FP8 and both["qweight"].shape == (12, 64) and both["scales"].shape == (12, 2)
    assert torch.equal(unpack_fp8(both["qweight"], both["scales"]),
                       torch.cat([unpack_fp8(**pa), unpack_fp8(**pb)]))
    mixed = cat_rows([pa, b.to(torch.float32)])
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed[:8], unpack_fp8(**pa)) and torch.equal(mixed[8:], b)
    with_int4 = cat_rows([pa, pack_w4a16(b, 32)])
    assert isinstance(with_int4, torch.Tensor) and with_int4.dtype == torch.bfloat16 and with_int4.shape == (12, 64)
