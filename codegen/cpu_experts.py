"""CPU routed-expert kernels: spec, weight packing, and the build driver.

The kernels themselves are TIR (codegen/tir_experts.py) compiled by TVM for a CPU target into
one shared library per target. This module does not import `tvm`: TVM runs in a subprocess
(codegen/cpu_build.py), because LLVM can abort the whole process when asked for code its
target cannot select, and because a crash there must not take the compiler down.

    spec = ExpertKernelSpec(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8,
                            format="int8", group_size=128)
    parts = pack_expert_weights(spec, gate_up, down)       # -> safetensors
    entry = build_cpu_kernels([spec], ktc.targets.get("x86-avx2"), out_dir)   # -> manifest
    # runtime: ktc.runtime.cpu_experts.CpuExpertKernels.load(out_dir, entry)

Kernel ABI ("abi": 2) of the function `entry["kernels"][name]["functions"]["moe_experts"]`:
    f(x [T,H] f32, topk_weights [T,K] f32, topk_ids [T,K] i32, *weights (in
      entry["kernels"][name]["weights"] order), y [T,H] f32, *scratch (in
      entry["kernels"][name]["scratch"] order), nthreads i32)
T is symbolic. Scratch buffer i is 1-D, of dtype scratch[i]["dtype"] and
scratch[i]["fixed"] + scratch[i]["per_token"] * T elements; the caller provides them
(contents irrelevant). nthreads: the number of tasks the cost-balanced phases, and the two
loops of a single-token call, are split into (the thread pool's size). Pairs whose expert id
is outside [0, E) are skipped (contribute nothing): a caller may mark experts that run
elsewhere (the GPU) with -1.

Weight layout (`pack_expert_weights`): gate_up [E, 2I, H] and down [E, H, I] as given
(row-major, K last); int8/int4 are symmetric group-wise along K with float32 scales
[E, rows, K / group] (int4: MSE-optimal clipping, ktc.quantize), plus `comp` [E, rows]
float32 = c * sum_g scale[row, g] * sum_{k in g} q[row, k] (c = 128 * 257 for int8, 128 for
int4): the integer-dot prefill path feeds activations as u8 = q + 128 and removes the offset
with it. int4 packs two values per byte along K, in blocks of 32 values where byte j holds
value j (low nibble) and value j + 16 (high nibble) - ktc.quantize.pack_int4 applied to K
permuted inside each block - so one 16-byte load yields 32 consecutive values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ktc.codegen import kernel_cache
from ktc.errors import KtcError
from ktc.quantize import dequantize_symmetric, pack_int4, quantize_symmetric, unpack_int4
from ktc.targets import CpuTarget

ABI_VERSION = 2
PREFILL_PAIRS_PER_EXPERT = 4   # int-dot prefill path from this many (token, expert) pairs per expert
FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
QUANTIZED = ("int8", "int4")
K_STEP = 32  # H and I must be multiples (see tir_experts.KS)
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Micro-kernel shapes per target (see tir_experts.KernelConfig): decode on the FMA
# micro-kernels (x86-avx2, and token blocks) or, int8/int4 single tokens on x86-avx512 /
# x86-amx, on vpdpbusd; int8/int4 prefill on VNNI (x86-avx512) or AMX tiles (x86-amx).
# "decode": the path of single-token calls ("fused": one pool launch, see tir_experts).
TARGET_CONFIGS: dict[str, dict[str, Any]] = {
    "x86-avx2": {"variant": "fma", "vl": 8, "tile_rows": 4, "block_rows": 1, "block_tokens": 4,
                 "decode_rows": 2, "decode": "fused"},
    "x86-avx512": {"variant": "vnni", "vl": 16, "tile_rows": 4, "block_rows": 1, "block_tokens": 8,
                   "decode_rows": 2, "decode": "fused", "decode_prefetch": 1, "prefill": "int",
                   "prefill_variants": ["fma"], "tile_variants": {"bt4": {"block_tokens": 4},
                                                                 "tr8": {"tile_rows": 8}}},
    "x86-amx": {"variant": "amx", "vl": 16, "tile_rows": 4, "block_rows": 1, "block_tokens": 8,
                "decode_rows": 2, "decode": "fused", "decode_prefetch": 1, "prefill": "int", "prefill_prefetch": 1,
                "prefill_variants": ["bf16", "fma"], "tile_variants": {"bt4": {"block_tokens": 4},
                                                                      "tr8": {"tile_rows": 8}}},
}
# "tile_variants": the same kernels with other micro-kernel shapes (tir_experts.KernelConfig), built
# into the library as "moe_experts@<name>" functions beside the default for `ktc tune` to time at every
# batch bucket: "bt4" token blocks of 4 instead of 8 (batches of 2-16 tokens), "tr8" parallel work items
# of 8 weight rows instead of 4 (fewer, larger items: less scheduling, coarser balance)
# "decode_prefetch": 1 (software prefetch of the next row group's weights in the VNNI single-token
# micro-kernel): cold one-token calls on the H100 machine's 16-core Xeon, Qwen3-30B-A3B experts,
# ~5 of 8 active, 10% faster for int8 (0.342 -> 0.306 ms) and 20% for int4 (0.178 -> 0.143 ms);
# 4 groups ahead gained less, 4 row pairs per call lost (bench/cpu_moe.py, BENCHMARKS.md)
# "prefill_prefetch": 2 (int8 AMX prefill: software prefetch of each work item's weight rows 2 K steps
# ahead): the weight tile loads were the largest stall of the path (perf on the H100 host);
# prefill-512, Qwen3-30B-A3B int8 g128, same run: 15.8 ms with 4 ahead against 17.0 (none) and 17.2
# (8 ahead); 2 ahead then beat 4 in 8 of 8 (shape, group) cases over two leases, by 0-10%
# (2026-11-23, bench/cpu_moe.py build --probes, BENCHMARKS.md); then 1 ahead (for int4: the packed rows of
# the next 128-value unit) beat 2 in every median of three leases at int4 (1.03-1.30x, 36 of 40 rounds) and
# at int8 group 128 (1.01-1.12x), even at group 32 (0.98-1.01x) (2026-11-23, sixth session, --variants pf1/pf2)
# "item_schedule": "steal" (tir_experts.KernelConfig; codegen/tir_schedule): prefill-512 on the same
# host, same run, against "static" (bench/cpu_moe.py build --static-schedule): 1.13-1.27x faster
# "prefill_variants": other int8/int4 prefill paths built into the same library as
# "moe_experts@<path>" functions (codegen/cpu_build); `ktc tune` picks one per batch bucket
# ("fma": no int-dot prefill, i.e. the decode / prefill crossover moved to never)
ACT_LEVELS = {"int8": 2, "int4": 1}   # activation quantization levels of the int-dot path
# batches (T > 1): tasks of a gate/up or down phase at most, and their schedule's int32 at the end of
# iwork (codegen/tir_schedule: share starts, then a counter per task, a cache line apart)
SCHED_MAX_TASKS = 256
SCHED_CTR_STRIDE = 16
SCHED_SLOTS = SCHED_MAX_TASKS + 1 + SCHED_CTR_STRIDE * SCHED_MAX_TASKS


def scratch_parts(H: int, I: int, E: int, K: int, fmt: str, intdot: bool,  # noqa: E741
                  prefill: str = "int") -> list[dict[str, Any]]:
    """The kernel's scratch buffers (ABI 2): name, dtype, fixed + per_token * T elements.
    Column blocks: at most levels * E + T * ceil(K * levels / 16), of 1 byte per value on the int-dot
    path (tir_intdot) and 2 on the bf16 paths (tir_amx_bf16), which need only E + T * ceil(...)."""
    bf16 = prefill.startswith("bf16")
    # bf16 paths: 1 or 2 bf16 terms per value (tir_experts.bf16_levels: "bf16" two for int8, one for int4)
    lv = ({"bf16x1": 1, "bf16x2": 2}.get(prefill, 2 if fmt == "int8" else 1) if bf16
          else ACT_LEVELS.get(fmt, 1))
    nb_per = -(-K * lv // 16)
    # a segment's blocks: ceil(pairs * levels / 16), or with two levels split into blocks of their own
    # (tir_intdot, KernelConfig.act_levels) 2 * ceil(pairs / 16): at most levels more a segment
    nb_fix = E * lv
    km = max(H, I) * (2 if bf16 else 1)
    parts = [
        {"name": "hbuf", "dtype": "float32", "fixed": 0, "per_token": K * I},
        {"name": "ybuf", "dtype": "float32", "fixed": 0, "per_token": K * H},
        {"name": "iwork", "dtype": "int32", "per_token": 2 * K + nb_per,
         "fixed": 3 * E + 2 + E + 1 + nb_fix + SCHED_SLOTS},
    ]
    if intdot:
        parts += [{"name": "act", "dtype": "uint8", "fixed": nb_fix * 16 * km, "per_token": nb_per * 16 * km},
                  {"name": "asc", "dtype": "float32", "fixed": nb_fix * 16, "per_token": nb_per * 16}]
    else:
        parts += [{"name": "act", "dtype": "uint8", "fixed": 1, "per_token": 0},
                  {"name": "asc", "dtype": "float32", "fixed": 1, "per_token": 0}]
    return parts


class SpecError(KtcError, ValueError):
    """An expert kernel spec the CPU kernels cannot implement (a KtcError and a ValueError)."""


@dataclass(frozen=True)
class ExpertKernelSpec:
    """One `moe_experts` kernel: shapes, top_k and weight format."""

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    format: str             # "float32" | "bfloat16" | "float16" | "int8" | "int4"
    group_size: int | None = None  # for int8/int4

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SpecError(f"unknown expert weight format {self.format!r}; expected one of {FORMATS}")
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            if int(getattr(self, name)) <= 0:
                raise SpecError(f"{name} must be positive")
        if self.hidden_size % K_STEP or self.intermediate_size % K_STEP:
            raise SpecError(f"CPU expert kernels need hidden and intermediate sizes that are multiples "
                            f"of {K_STEP}, got {self.hidden_size} and {self.intermediate_size}")
        if self.format in QUANTIZED:
            g = self.group_size
            if g is None or g % K_STEP or self.hidden_size % g or self.intermediate_size % g:
                raise SpecError(f"{self.format} needs a group size that is a multiple of {K_STEP} and "
                                f"divides {self.hidden_size} and {self.intermediate_size}, got {g}")
        elif self.group_size is not None:
            raise SpecError(f"format {self.format} takes no group size")

    @property
    def quantized(self) -> bool:
        return self.format in QUANTIZED

    @property
    def name(self) -> str:
        n = (f"moe_experts_{self.format}_h{self.hidden_size}_i{self.intermediate_size}"
             f"_e{self.num_experts}_k{self.top_k}")
        return n + (f"_g{self.group_size}" if self.quantized else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertKernelSpec:
        return cls(**{k: d[k] for k in ("hidden_size", "intermediate_size", "num_experts", "top_k",
                                         "format")}, group_size=d.get("group_size"))

    def weight_parts(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Part name -> (shape, dtype) of the tensors the kernel reads, in argument order."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size  # noqa: E741
        if not self.quantized:
            dt = _TORCH_DTYPES[self.format]
            return {"gate_up.w": ((E, 2 * I, H), dt), "down.w": ((E, H, I), dt)}
        g = self.group_size
        assert g is not None
        if self.format == "int8":
            gq, dq, qdt = (E, 2 * I, H), (E, H, I), torch.int8
        else:
            gq, dq, qdt = (E, 2 * I, H // 2), (E, H, I // 2), torch.uint8
        return {"gate_up.q": (gq, qdt), "gate_up.scales": ((E, 2 * I, H // g), torch.float32),
                "gate_up.comp": ((E, 2 * I), torch.float32),
                "down.q": (dq, qdt), "down.scales": ((E, H, I // g), torch.float32),
                "down.comp": ((E, H), torch.float32)}


# ---- weight packing -------------------------------------------------------------------------

def _int4_kernel_order(q: Tensor) -> Tensor:
    """Permute K inside blocks of 32 so that pack_int4 puts value j and value j+16 of a block
    into byte j (the kernel's nibble layout)."""
    *lead, k = q.shape
    b = q.reshape(*lead, k // 32, 2, 16)
    return b.transpose(-1, -2).reshape(*lead, k)


def _int4_natural_order(q: Tensor) -> Tensor:
    *lead, k = q.shape
    b = q.reshape(*lead, k // 32, 16, 2)
    return b.transpose(-1, -2).reshape(*lead, k)


def _pack_one(spec: ExpertKernelSpec, w: Tensor, role: str) -> dict[str, Tensor]:
    if not spec.quantized:
        return {f"{role}.w": w.detach().to(_TORCH_DTYPES[spec.format]).contiguous()}
    assert spec.group_size is not None
    bits = 8 if spec.format == "int8" else 4
    g = spec.group_size
    q, s = quantize_symmetric(w, bits, g)
    c = 128.0 * 257.0 if ACT_LEVELS[spec.format] == 2 else 128.0
    qsum = q.reshape(*q.shape[:-1], -1, g).sum(-1, dtype=torch.int32).to(torch.float64)
    comp = (c * (qsum * s.to(torch.float64)).sum(-1)).to(torch.float32)
    if bits == 4:
        q = pack_int4(_int4_kernel_order(q))
    return {f"{role}.q": q.contiguous(), f"{role}.scales": s.contiguous(), f"{role}.comp": comp.contiguous()}


def pack_expert_weights(spec: ExpertKernelSpec, gate_up: Tensor, down: Tensor) -> dict[str, Tensor]:
    """gate_up [E, 2I, H] (gate rows then up rows), down [E, H, I] (any float dtype) -> the
    tensors the kernel reads, by part name (`spec.weight_parts()` order), contiguous."""
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size  # noqa: E741
    if tuple(gate_up.shape) != (E, 2 * I, H):
        raise ValueError(f"gate_up must be [{E}, {2 * I}, {H}], got {list(gate_up.shape)}")
    if tuple(down.shape) != (E, H, I):
        raise ValueError(f"down must be [{E}, {H}, {I}], got {list(down.shape)}")
    out = {**_pack_one(spec, gate_up, "gate_up"), **_pack_one(spec, down, "down")}
    return {k: out[k] for k in spec.weight_parts()}


def unpack_expert_weights(spec: ExpertKernelSpec, parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The float32 (dequantized) gate_up and down that `parts` represent (for references)."""
    res = []
    for role in ("gate_up", "down"):
        if not spec.quantized:
            res.append(parts[f"{role}.w"].to(torch.float32))
            continue
        assert spec.group_size is not None
        q = parts[f"{role}.q"]
        if spec.format == "int4":
            q = _int4_natural_order(unpack_int4(q))
        res.append(dequantize_symmetric(q, parts[f"{role}.scales"], spec.group_size))
    return res[0], res[1]


# ---- build --------------------------------------------------------------------------------------

def kernel_config(target: CpuTarget) -> dict[str, Any]:
    try:
        return dict(TARGET_CONFIGS[target.name])
    except KeyError:
        raise KtcError(f"no CPU expert kernel configuration for target {target.name}") from None


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # prefer the last line that looks like an error over a traceback footer
    for ln in reversed(lines):
        if re.search(r"error|Error|abort|Cannot|LLVM", ln):
            return ln[:limit]
    return (lines[-1] if lines else "no output")[:limit]


def _disassemble(lib: Path) -> str | None:
    for tool in ("objdump", "llvm-objdump"):
        exe = shutil.which(tool)
        if exe:
            r = subprocess.run([exe, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True)
            if r.returncode == 0:
                return r.stdout
    return None


def missing_instructions(text: str, target: CpuTarget, quantized: bool = False,
                         prefill: str = "int") -> list[str]:
    """The target's expected instruction mnemonics (substrings) absent from disassembly `text`
    (with `quantized`, also those of its int8/int4 kernels; the bf16 prefill path has AMX-BF16
    tile products instead of the integer ones)."""
    quant = list(target.quant_instructions) if quantized else []
    if prefill.startswith("bf16") and quant:
        quant = ["tdpbf16ps" if m == "tdpbsud" else m for m in quant] + ["vcvtne2ps2bf16"]
    want = list(target.expected_instructions) + quant
    return [m for m in want if m not in text]


def build_cpu_kernels(specs: list[ExpertKernelSpec], target: CpuTarget, out_dir: Path,
                      timeout: float | None = 1800, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build every spec into ONE shared library out_dir/<target>.so (TVM, in a subprocess),
    check that it holds the target's expected instructions, ship libtvm_runtime.so next to it,
    and return the manifest entry (JSON-able). A build made before with the same inputs comes from
    the kernel cache (codegen/kernel_cache) instead."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uniq: dict[str, ExpertKernelSpec] = {}
    for s in specs:
        uniq.setdefault(s.name, s)
    if not uniq:
        raise KtcError("build_cpu_kernels: no kernels to build")
    cfg = dict(config) if config is not None else kernel_config(target)
    lib_name = f"{target.name}.so"
    key = kernel_cache.build_key({"specs": [s.to_dict() for s in uniq.values()], "target": asdict(target),
                                  "config": cfg, "abi": ABI_VERSION})
    cached = kernel_cache.lookup(key, out_dir)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="ktc-cpu-build-") as tmp:
        req = Path(tmp) / "request.json"
        res_path = Path(tmp) / "result.json"
        req.write_text(json.dumps({
            "target": target.tvm_target, "target_name": target.name, "config": cfg,
            "specs": [s.to_dict() for s in uniq.values()],
            "lib": str(Path(tmp) / lib_name), "asm": str(Path(tmp) / "kernels.s"),
            "result": str(res_path)}))
        env = dict(os.environ)
        env.setdefault("TVM_BACKTRACE", "0")
        try:
            r = subprocess.run([sys.executable, "-m", "ktc.codegen.cpu_build", str(req)],
                               capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise KtcError(f"building CPU kernels for {target.name} timed out after {timeout:.0f} s") from None
        if r.returncode != 0 or not res_path.exists():
            how = f"exit code {r.returncode}" if r.returncode >= 0 else f"signal {-r.returncode}"
            raise KtcError(f"building CPU kernels for {target.name} failed ({how}): "
                           f"{_one_line(r.stderr + r.stdout)}")
        result = json.loads(res_path.read_text())
        text = _disassemble(Path(tmp) / lib_name)
        if text is None:
            text = Path(result["asm"]).read_text()
        quantized = cfg.get("variant", "fma") in ("vnni", "amx") and any(s.quantized for s in uniq.values())
        missing = missing_instructions(text, target, quantized, cfg.get("prefill", "int"))
        for path in {p for v in result.get("variants", {}).values() for p in v}:
            missing += [m for m in missing_instructions(text, target, quantized, path) if m not in missing]
        if missing:
            raise KtcError(f"the {target.name} CPU kernels lack the expected instructions "
                           f"{', '.join(missing)}: the TVM target {json.dumps(target.tvm_target)} "
                           f"did not select them")
        shutil.copyfile(Path(tmp) / lib_name, out_dir / lib_name)
    runtime_libs = []
    if result.get("needs_runtime"):
        src = Path(result["runtime_lib"])
        shutil.copyfile(src, out_dir / src.name)
        runtime_libs.append(src.name)
    entry = {
        "target": target.name,
        "lib": lib_name,
        "runtime_libs": runtime_libs,
        "required_features": list(target.required_features),
        "abi": ABI_VERSION,
        "config": cfg,
        "kernels": {
            name: {"spec": s.to_dict(),
                   "functions": {"moe_experts": result["symbols"][name],
                                 **{f"moe_experts@{p}": sym
                                    for p, sym in result.get("variants", {}).get(name, {}).items()},
                                 **{f"moe_experts@{v}": sym
                                    for v, sym in result.get("tiles", {}).get(name, {}).items()}},
                   "tile_variants": list(result.get("tiles", {}).get(name, {})),
                   "prefill": cfg.get("prefill", "int"),
                   "prefill_from_pairs": PREFILL_PAIRS_PER_EXPERT * s.num_experts,
                   "weights": list(s.weight_parts()),
                   "scratch": _scratch_of_paths(s, cfg.get("variant", "fma"),
                                                [cfg.get("prefill", "int"),
                                                 *result.get("variants", {}).get(name, {})])}
            for name, s in uniq.items()
        },
    }
    kernel_cache.store(key, out_dir, [lib_name, *runtime_libs], entry)
    return entry


def _scratch_of_paths(s: ExpertKernelSpec, variant: str, paths: list[str]) -> list[dict[str, Any]]:
    return scratch_parts_of_paths(s.hidden_size, s.intermediate_size, s.num_experts, s.top_k, s.format,
                                  s.quantized and variant != "fma", paths)


def scratch_parts_of_paths(H: int, I: int, E: int, K: int, fmt: str, intdot: bool,  # noqa: E741
                           paths: list[str]) -> list[dict[str, Any]]:
    """Scratch parts big enough for every prefill path of `paths` (each part's max): what every
    function of a library that holds the kernel with several paths takes."""
    layouts = [scratch_parts(H, I, E, K, fmt, intdot, p) for p in paths]
    out = [dict(d) for d in layouts[0]]
    for other in layouts[1:]:
        for d, o in zip(out, other, strict=True):
            d["fixed"], d["per_token"] = max(d["fixed"], o["fixed"]), max(d["per_token"], o["per_token"])
    return out
