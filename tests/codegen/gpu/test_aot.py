"""Every GPU kernel builds ahead of time for cuda sm80, sm90 and hip gfx942 (no GPU needed).

The builds run in one subprocess without TRITON_INTERPRET (the interpreter replaces
triton.language's builders, so nothing compiles in a process that uses it), once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ktc.codegen.gpu import FAMILIES
from ktc.codegen.gpu_aot import FP8_TARGETS, TARGETS, W8A8_TARGETS


@pytest.fixture(scope="session")
def aot_results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "ktc.codegen.gpu_aot"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds(aot_results, family, target):
    mine = {k: v for k, v in aot_results.items() if v["family"] == family and k.endswith(f"@{target}")}
    assert mine, f"no kernel of {family} was built"
    failed = {k: v["error"] for k, v in mine.items() if not v["ok"]}
    assert not failed, failed
    assert all(v["binary"] for v in mine.values())


def test_sm90_prefill_gemms_use_wgmma(aot_results):
    """Hopper's warpgroup MMA is what the large-tile products must lower to on sm90."""
    big = [k for k in aot_results if k.startswith("matmul.matmul_kernel") and k.endswith("@sm90")]
    assert any(aot_results[k]["wgmma"] for k in big), {k: aot_results[k] for k in big}


def test_fp8_kernels_build_where_triton_lowers_e4m3(aot_results):
    """The fp8 weight-only kernels are built for sm89, sm90 and gfx942 and not listed for sm80, where Triton
    has no fp8e4nv (the runtime refuses fp8 artifacts on GPUs below sm89)."""
    fp8 = {k: v for k, v in aot_results.items() if "fp8" in k}
    assert {k.rsplit("@", 1)[1] for k in fp8} == set(FP8_TARGETS) and "sm80" not in FP8_TARGETS
    assert {v["family"] for v in fp8.values()} == {"matmul", "moe"}
    assert all(v["ok"] for v in fp8.values()), {k: v.get("error") for k, v in fp8.items() if not v["ok"]}


def test_w8a8_kernels_multiply_e4m3_on_tensor_cores(aot_results):
    """The w8a8 kernels (fp8 prefill: activation quantization, then fp8 x fp8 products of linears and experts)
    are built for sm89 / sm90 only, and the products lower to e4m3 x e4m3 MMAs (sm90: wgmma); the
    weight-only fp8 kernels convert the weights and multiply bf16."""
    a8 = {k: v for k, v in aot_results.items() if "w8a8" in k or "quant_fp8" in k}
    assert {k.split("[")[0].split("@")[0] for k in a8} == {
        "matmul.matmul_w8a8_kernel", "moe.fused_moe_w8a8_kernel", "matmul.quant_fp8_kernel", "moe.quant_fp8_kernel"}
    assert {k.rsplit("@", 1)[1] for k in a8} == set(W8A8_TARGETS) == {"sm89", "sm90"}
    assert all(v["ok"] for v in a8.values()), a8
    products = {k: v for k, v in a8.items() if "w8a8" in k}
    assert all(v["fp8_mma"] for v in products.values()), products
    assert all(v["wgmma"] for k, v in products.items() if k.endswith("@sm90"))
    w8a16 = [v for k, v in aot_results.items() if "fp8" in k and k not in a8 and k.endswith("@sm90")]
    assert w8a16 and not any(v["fp8_mma"] for v in w8a16)
