"""Shared, cached CPU expert kernel builds for the codegen and runtime tests.

TVM compile time dominates these tests, so every target is built once per session, with the
same few small specs (one per weight format, shapes picked to exercise the kernels' token
blocks and tails), and the targets are built concurrently (each build is a subprocess).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ktc.codegen.cpu_experts import TARGET_CONFIGS, ExpertKernelSpec, build_cpu_kernels
from ktc.targets import get as get_target

# "x86-amx-emu": the x86-amx kernels with every tile instruction emulated by plain loops,
# built for x86-avx512: runs the AMX code path (layouts, tile loops, epilogues) on hosts
# without AMX; only the tile instructions themselves are not exercised.
EMU = "x86-amx-emu"
# the same with the AMX-BF16 prefill path (KernelConfig.prefill = "bf16", tir_amx_bf16)
EMU_BF16 = "x86-amx-emu-bf16"
EMU_BF16X1 = "x86-amx-emu-bf16x1"     # one bf16 activation term whatever the format (int8 too)
# the same with int8's two activation levels in one column block (KernelConfig.act_levels "shared")
EMU_SHARED = "x86-amx-emu-shared"
EMUS = (EMU, EMU_BF16, EMU_BF16X1, EMU_SHARED)
# x86-avx2 with two tile variants (TARGET_CONFIGS "tile_variants"); the other builds leave them out
# (they cost build time and every test but the tile one would ignore them)
TILES = "x86-avx2-tiles"
TILE_VARIANTS = {"bt8": {"block_tokens": 8}, "tr8": {"tile_rows": 8}}

# one kernel per format; odd little shapes (multiples of 32), several group sizes
SPECS = {
    "float32": ExpertKernelSpec(96, 64, 5, 2, "float32"),
    "bfloat16": ExpertKernelSpec(64, 96, 4, 3, "bfloat16"),
    "float16": ExpertKernelSpec(128, 32, 7, 2, "float16"),
    "int8": ExpertKernelSpec(128, 192, 6, 3, "int8", 32),
    "int4": ExpertKernelSpec(128, 128, 5, 4, "int4", 64),
}
# int4 at group 128 for the AMX builds (real and emulated): their prefill then unpacks the weights in units of
# a group, in the packed nibble order (vpermb), with activations in that order (tir_intdot NIB); K of 256 and
# 128 give units in both halves of the double buffer and one alone
INT4_G128 = ExpertKernelSpec(256, 128, 3, 2, "int4", 128)

_lock = threading.Lock()
_builds: dict[str, tuple[Path, dict[str, Any]]] = {}
_root: Path | None = None


def _root_dir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="ktc-test-cpu-kernels-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def _split(name: str) -> tuple[str, str | None]:
    """"x86-avx512@phased" -> ("x86-avx512", "phased"): a build with another single-token
    decode path (tir_experts.KernelConfig.decode), to compare the paths with each other."""
    base, _, decode = name.partition("@")
    return base, decode or None


def specs_for(name: str) -> list[ExpertKernelSpec]:
    """A target this host cannot run (x86-amx so far; x86-avx512 on an AVX2 host), the emulated AMX
    build and the other decode paths build only the quantized kernels: unrunnable kernels are only
    checked for their instructions, and the quantized ones hold every instruction the float ones do."""
    base, decode = _split(name)
    foreign = base in ("x86-avx512", "x86-amx") and not get_target(base).runs_here()
    if base in (EMU, "x86-amx") and not decode:
        return [SPECS["int8"], SPECS["int4"], INT4_G128]
    if decode or base in EMUS or foreign:
        return [SPECS["int8"], SPECS["int4"]]
    if base == TILES:
        return [SPECS["float32"], SPECS["int8"]]
    return list(SPECS.values())


def target_for(name: str):
    base = _split(name)[0]
    return get_target("x86-avx512" if base in EMUS else "x86-avx2" if base == TILES else base)


def _build(name: str) -> tuple[Path, dict[str, Any]]:
    out = _root_dir() / name
    base, decode = _split(name)
    if base == TILES:
        config = dict(TARGET_CONFIGS["x86-avx2"], tile_variants=TILE_VARIANTS)
    else:
        config = dict(TARGET_CONFIGS["x86-amx" if base in EMUS else base], tile_variants={})
    if base in EMUS:
        config["variant"] = "amx-emu"
    if base in (EMU_BF16, EMU_BF16X1):
        config["prefill"] = "bf16" if base == EMU_BF16 else "bf16x1"
    if base == EMU_SHARED:
        config["act_levels"] = "shared"
    if decode:
        config["decode"] = decode
    return out, build_cpu_kernels(specs_for(name), target_for(name), out, config=config)


def builds(names: list[str]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """(kernel dir, manifest entry) per target name, building the missing ones concurrently."""
    with _lock:
        todo = [n for n in names if n not in _builds]
        if todo:
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                for n, res in zip(todo, pool.map(_build, todo), strict=True):
                    _builds[n] = res
        return {n: _builds[n] for n in names}


def reference_moe(x, topk_weights, topk_ids, gate_up, down) -> torch.Tensor:
    """float64 moe_experts; ids outside [0, E) contribute nothing."""
    E, two_i, _ = gate_up.shape
    inter = two_i // 2
    y = torch.zeros(x.shape, dtype=torch.float64)
    gu, dn, xd = gate_up.double(), down.double(), x.double()
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if 0 <= e < E:
                g = gu[e] @ xd[t]
                h = F.silu(g[:inter]) * g[inter:]
                y[t] += float(topk_weights[t, k]) * (dn[e] @ h)
    return y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm())
