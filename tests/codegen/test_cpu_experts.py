"""CPU expert kernels: specs, weight packing, and builds for every target (cross-compiled)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import ktc.targets as kt
from ktc.codegen.cpu_experts import (
    ExpertKernelSpec,
    build_cpu_kernels,
    missing_instructions,
    pack_expert_weights,
    unpack_expert_weights,
)
from ktc.errors import HostError, KtcError
from ktc.quantize import dequantize_symmetric, quantize_symmetric
from tests.codegen.cpu_builds import SPECS, builds, specs_for

ALL_TARGETS = ["x86-avx2", "x86-avx512", "x86-amx"]


@pytest.fixture(scope="session")
def all_builds():
    return builds(ALL_TARGETS)


def _disasm(path: Path) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                          text=True, check=True).stdout


# ---- specs ---------------------------------------------------------------------------------

def test_spec_names_are_unique_and_round_trip():
    specs = [ExpertKernelSpec(2048, 768, 128, 8, "int8", 128), ExpertKernelSpec(2048, 768, 128, 8, "int4", 128),
             ExpertKernelSpec(2048, 768, 128, 8, "int8", 64), ExpertKernelSpec(2048, 768, 128, 6, "int8", 128),
             ExpertKernelSpec(2048, 768, 64, 8, "int8", 128), ExpertKernelSpec(2048, 768, 128, 8, "bfloat16")]
    assert len({s.name for s in specs}) == len(specs)
    assert specs[0].name == "moe_experts_int8_h2048_i768_e128_k8_g128"
    for s in specs:
        assert ExpertKernelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize("kwargs", [
    dict(format="int3", group_size=32),             # unknown format
    dict(format="int8", group_size=None),           # quantized without a group
    dict(format="int8", group_size=48),             # group not a multiple of 32
    dict(format="float32", group_size=32),          # float with a group
    dict(format="int8", group_size=32, hidden_size=100),  # H not a multiple of 32
])
def test_bad_specs_are_refused(kwargs):
    base = dict(hidden_size=128, intermediate_size=64, num_experts=4, top_k=2)
    with pytest.raises(ValueError):
        ExpertKernelSpec(**{**base, **kwargs})


# ---- packing -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(SPECS))
def test_pack_expert_weights_layout(fmt):
    spec = SPECS[fmt]
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size  # noqa: E741
    torch.manual_seed(0)
    gu, dn = torch.randn(E, 2 * I, H, dtype=torch.bfloat16), torch.randn(E, H, I, dtype=torch.bfloat16)
    parts = pack_expert_weights(spec, gu, dn)
    expected = spec.weight_parts()
    assert list(parts) == list(expected)
    for name, t in parts.items():
        shape, dtype = expected[name]
        assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous(), name
    gud, dnd = unpack_expert_weights(spec, parts)
    if spec.quantized:
        bits = 8 if fmt == "int8" else 4
        for w, got in ((gu, gud), (dn, dnd)):
            q, s = quantize_symmetric(w, bits, spec.group_size)
            torch.testing.assert_close(got, dequantize_symmetric(q, s, spec.group_size), rtol=0, atol=0)
    else:
        torch.testing.assert_close(gud, gu.to(parts["gate_up.w"].dtype).float(), rtol=0, atol=0)
        torch.testing.assert_close(dnd, dn.to(parts["down.w"].dtype).float(), rtol=0, atol=0)


def test_int4_nibble_layout():
    """byte j of every 16-byte block holds K-element j (low nibble) and j + 16 (high)."""
    spec = ExpertKernelSpec(64, 32, 1, 1, "int4", 32)
    gu = torch.zeros(1, 64, 64)
    gu[0, 0, :32] = torch.arange(32) % 15 - 7        # one group whose max |w| is 7: scale 1
    parts = pack_expert_weights(spec, gu, torch.zeros(1, 64, 32))
    b = parts["gate_up.q"][0, 0, :16].to(torch.int16)
    lo, hi = b & 15, b >> 4
    signed = lambda v: torch.where(v >= 8, v - 16, v)  # noqa: E731
    assert signed(lo).tolist() == gu[0, 0, :16].int().tolist()
    assert signed(hi).tolist() == gu[0, 0, 16:32].int().tolist()


def test_pack_rejects_wrong_shapes():
    spec = SPECS["int8"]
    with pytest.raises(ValueError):
        pack_expert_weights(spec, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


# ---- builds --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_TARGETS)
def test_build_contains_the_targets_instructions(all_builds, name):
    out, entry = all_builds[name]
    target = kt.get(name)
    assert entry["target"] == name and entry["lib"] == f"{name}.so"
    assert entry["required_features"] == list(target.required_features)
    assert set(entry["kernels"]) == {s.name for s in specs_for(name)}
    for k in entry["kernels"].values():
        assert k["functions"]["moe_experts"] == ExpertKernelSpec.from_dict(k["spec"]).name
    assert entry["runtime_libs"] == ["libtvm_runtime.so"]
    assert (out / "libtvm_runtime.so").is_file()
    json.dumps(entry)   # JSON-able
    text = _disasm(out / entry["lib"])
    assert not missing_instructions(text, target, quantized=True)
    assert "vfmadd" in text                      # dequantize-and-FMA kernels (decode)
    if name == "x86-avx2":
        assert "ymm" in text and "zmm" not in text
        assert "vpdpbusd" not in text and "tdp" not in text
    else:
        assert "zmm" in text                     # 512-bit vectors
    if name == "x86-avx512":
        assert "vpdpbusd" in text                # int8/int4 prefill: VNNI dot products
    if name != "x86-avx2":                       # the VNNI single-token micro-kernel prefetches its rows
        assert entry["config"]["decode_prefetch"] == 1 and "prefetcht0" in text
    if name == "x86-amx":                        # int8/int4 prefill: AMX tiles, integer and bf16 paths
        for m in ("ldtilecfg", "tileloadd", "tdpbsud", "tilestored", "tilerelease", "tdpbf16ps", "vcvtne2ps2bf16"):
            assert m in text, m
        assert "vpermb" in text                  # int4 at group 128: nibbles to bytes by table lookup
        assert "avx512vbmi" in target.required_features
    if name != "x86-avx2":                       # the kernel with the other prefill paths, for ktc tune
        other = {"moe_experts@bf16", "moe_experts@fma"} if name == "x86-amx" else {"moe_experts@fma"}
        for k in entry["kernels"].values():
            fns = k["functions"]
            quantized = ExpertKernelSpec.from_dict(k["spec"]).quantized
            assert k["prefill"] == "int" and set(fns) == {"moe_experts", *(other if quantized else ())}
            for key in fns.keys() - {"moe_experts"}:
                assert fns[key] == fns["moe_experts"] + "__" + key.split("@")[1] and k["prefill_from_pairs"] > 0
    for k in entry["kernels"].values():
        assert [d["name"] for d in k["scratch"]] == ["hbuf", "ybuf", "iwork", "act", "asc"]
    # single tokens: gate/up and down in one launch of the thread pool, a barrier between them
    assert entry["config"]["decode"] == "fused" and "TVMBackendParallelBarrier" in text


def test_decode_paths_are_checked():
    from ktc.codegen.tir_experts import DECODE_PATHS, KernelConfig

    assert KernelConfig().decode == "fused" and set(DECODE_PATHS) == {"fused", "regions", "phased"}
    with pytest.raises(ValueError, match="decode path"):
        KernelConfig(decode="serial")


def test_act_levels_are_checked():
    from ktc.codegen.tir_experts import KernelConfig

    assert KernelConfig().act_levels == "split"
    with pytest.raises(ValueError, match="act_levels"):
        KernelConfig(act_levels="interleaved")
    assert KernelConfig().probe == ""
    with pytest.raises(ValueError, match="probe"):
        KernelConfig(probe="nothing")
    assert KernelConfig().int4_unpack == "step"
    with pytest.raises(ValueError, match="int4_unpack"):
        KernelConfig(int4_unpack="row")
    assert KernelConfig().prefill_epilogue == "vector"
    with pytest.raises(ValueError, match="prefill_epilogue"):
        KernelConfig(prefill_epilogue="fused")
    assert KernelConfig().act_quant == "row"
    with pytest.raises(ValueError, match="act_quant"):
        KernelConfig(act_quant="token")
    assert KernelConfig().prefill_prefetch_hint == 3
    assert KernelConfig().prefill_act_prefetch == 0
    with pytest.raises(ValueError, match="prefill_act_prefetch"):
        KernelConfig(prefill_act_prefetch=-1)
    with pytest.raises(ValueError, match="prefill_prefetch_hint"):
        KernelConfig(prefill_prefetch_hint=0)


def test_missing_instructions_are_reported():
    t = kt.get("x86-avx512")
    assert missing_instructions("vfmadd231ps %ymm1, %ymm2, %ymm3", t) == ["zmm"]
    assert missing_instructions("vfmadd231ps %zmm1, %zmm2, %zmm3", t) == []
    assert missing_instructions("vfmadd231ps %zmm1, %zmm2, %zmm3", t, quantized=True) == ["vpdpbusd"]
    amx = kt.get("x86-amx")
    assert "tdpbsud" in missing_instructions("vfmadd231ps %zmm1, %zmm2, %zmm3", amx, quantized=True)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compensation_part(fmt):
    """comp[row] = c * sum_g scale[row, g] * sum_{k in g} q[row, k], c = 128 * 257 (int8) / 128 (int4)."""
    spec = SPECS[fmt]
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size  # noqa: E741
    torch.manual_seed(1)
    gu, dn = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    parts = pack_expert_weights(spec, gu, dn)
    gud, dnd = unpack_expert_weights(spec, parts)
    c = 128.0 * 257.0 if fmt == "int8" else 128.0
    for role, deq in (("gate_up", gud), ("down", dnd)):
        # sum_g scale * sum q = sum_k deq[k] (up to rounding)
        ref = c * deq.double().sum(-1)
        torch.testing.assert_close(parts[f"{role}.comp"].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_build_failure_is_one_line_ktc_error(tmp_path):
    bad = kt.CpuTarget(name="x86-avx2", description="broken", required_features=("avx2",),
                       tvm_target={"kind": "no-such-kind"}, expected_instructions=("vfmadd",))
    with pytest.raises(KtcError) as e:
        build_cpu_kernels([SPECS["float32"]], bad, tmp_path)
    assert "x86-avx2" in e.value.message and "\n" not in e.value.message
    assert not (tmp_path / "x86-avx2.so").exists()


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_builds_the_host_cannot_run_are_refused_before_loading(all_builds, name, monkeypatch):
    """e.g. the x86-amx build on a host without AMX: HostError, and nothing is loaded or run."""
    from ktc.runtime import cpu_experts as rt

    out, entry = all_builds[name]
    if kt.get(name).runs_here():
        pytest.skip(f"this host runs {name} kernels")
    calls = []
    monkeypatch.setattr(rt.tvm_ffi, "load_module", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(rt.ctypes, "CDLL", lambda *a, **k: calls.append(a))
    with pytest.raises(HostError) as e:
        rt.CpuExpertKernels.load(out, entry)
    msg = e.value.message
    missing = kt.get(name).missing_features()
    assert "\n" not in msg and all(f in msg for f in missing) and "--target x86-" in msg
    assert calls == []   # nothing was loaded, let alone run
