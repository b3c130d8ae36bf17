"""CPU MoE layer benchmark: ktc's TVM-built expert kernels against kt-kernel, same machine, same run.

Two steps, because the machine that measures (the lent GPU host's AMX Xeon) has no TVM:

    # here (TVM installed): cross-compile the kernels of every benchmarked spec for x86-amx
    # and x86-avx512 into DIR, with libtvm_runtime.so and a manifest
    python bench/cpu_moe.py build --out .carry/kernels

    # there: measure (kt-kernel and apache-tvm-ffi unpacked into .carry/site)
    PYTHONPATH=.carry/site python3 bench/cpu_moe.py run --kernels .carry/kernels --out $OUT

One MoE layer, random Gaussian weights (randn / sqrt(K), generated there from a fixed seed, in
bf16 so both sides quantize the same values), shapes of Qwen3-30B-A3B (H2048 I768 E128 top8)
and DeepSeek-V2-Lite (H2048 I1408 E64 top6); int8 and int4; decode batch 1 and 8 and prefill
512 tokens. Every call gets a fresh random routing (64 pre-drawn, cycled), so the experts it
reads are mostly not in cache. Medians of per-call wall times after warm-up; our builds run in
one process, timed in turn over --rounds rounds (the figure is the median of the round medians,
which results.json keeps as round_ms: their spread is the noise). Beside each
figure: GB/s (weight bytes of the experts the call touches / time), TFLOP/s (2 * pairs * 3 *
H * I / time) and the relative error of the layer output against a float32 torch reference
on the same (bf16) weights. kt-kernel runs in a subprocess (its queue thread busy-waits, it
must not share the machine with our timings) with 15 threads, KTMoEWrapper method
AMXINT8 / AMXINT4, all experts on the CPU.

`build` also builds x86-amx with the AMX-BF16 prefill paths (PREFILL_BUILDS, "x86-amx+bf16":
weights dequantized to bf16 per work item, tdpbf16ps, activations in two bf16 terms for int8
and one for int4; "+bf16x1": one term for both) into DIR/x86-amx+bf16 and DIR/x86-amx+bf16x1;
`run` measures every build the
manifest holds, each a row "ktc <build>".

Regime "decode-1-cold" (only when named in --regimes; ours only): the fixed cost of a
single-token call and how the thread count moves it, old decode path against new in one run.
`build` also builds the x86-amx kernels with the other single-token paths of
tir_experts.KernelConfig.decode ("phased": the path every T took before, "regions": the new
one as two parallel regions) into DIR/x86-amx_phased, DIR/x86-amx_regions, and with
`--decode-paths dr1 dr4 pf1 pf4` the fused path with 1 / 4 row pairs per micro-kernel call or a
software prefetch 1 / 4 row groups ahead (ALT_DECODE). `run` then loads --cold-target's builds
(the plain one and each alternative built), packs the layer once and clones it into --cold-layers
separately allocated layers, and calls T=1 with a new routing every call, rotating over the
layers (48 x ~0.6 GB: nothing stays in L3), the builds round-robin. Cases: "gpu-mask"
(top-K of E; the ids of a fixed 3/8 of the experts, the ones a hybrid run keeps on the GPU,
set to -1: ~5 of 8 active), "all-cpu" (every id valid) and "none" (every id -1: the fixed
cost). For each of --cold-threads (a fresh host thread per count: TVM's pool is per host
thread and sized by TVM_NUM_THREADS when it starts) the median ms of the runtime call
(CpuExpertKernels.moe_experts) and of the bare kernel call, and GB/s: the weight bytes of
the experts each call actually reads over the bare kernel call's median. results.json holds
these rows under "cold_rows", table.md a second table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "deepseek-v2-lite": (2048, 1408, 64, 6)}
# (label, format, group) of our kernels; int8 needs group 32 for <= 1e-2 on Gaussian weights
OURS = [("int8-g32", "int8", 32), ("int8-g128", "int8", 128), ("int4-g128", "int4", 128)]
KT_METHOD = {"int8": "AMXINT8", "int4": "AMXINT4"}
REGIMES = [("decode-1", 1), ("decode-8", 8), ("prefill-512", 512)]
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)   # runtime.tuning.BATCH_BUCKETS
COLD = "decode-1-cold"
TARGETS = ("x86-amx", "x86-avx512")
# x86-amx built with the other int8/int4 prefill paths (tir_experts.KernelConfig.prefill)
PREFILL_BUILDS = ("x86-amx+bf16", "x86-amx+bf16x1")
BUILDS = TARGETS + PREFILL_BUILDS
# other single-token builds of x86-amx (tir_experts.KernelConfig fields over the target's): decode paths
# besides the default "fused", and the fused path with 1 or 4 gate/up row pairs per micro-kernel call
# instead of 2 (more rows: more weight streams in flight per core), or prefetching the rows 1 / 4 row
# groups ahead
ALT_DECODE = {"phased": {"decode": "phased"}, "regions": {"decode": "regions"},
              "dr1": {"decode_rows": 1}, "dr4": {"decode_rows": 4, "tile_rows": 8},
              "pf1": {"decode_prefetch": 1}, "pf4": {"decode_prefetch": 4}}
COLD_CASES = ("gpu-mask", "all-cpu", "none")
# `build --static-schedule`: the plain builds also hold every kernel with the static item split of its
# batch phases (tir_experts.KernelConfig.item_schedule), as tile variant "st", to time against the
# default work stealing (run --tile-variants)
STATIC_VARIANT = {"st": {"item_schedule": "static"}}
# `build --shared-levels`: ... and with the int8 activation levels in one column block (8 pairs a block,
# KernelConfig.act_levels "shared", the AMX layout before 2026-11-23), as tile variant "sh", to time
# against the level-split blocks (16 pairs a block)
SHARED_VARIANT = {"sh": {"act_levels": "shared"}}
# `build --probes`: ... and the split int8 AMX path without its folds ("nf") and without its folds and tile
# stores ("ns"): wrong results (the error column shows it), timings that say what those steps cost; and with
# the weight prefetch 2 / 8 K steps ahead instead of 4 ("pf2", "pf8")
PROBE_VARIANTS = {"nf": {"probe": "nofold"}, "ns": {"probe": "nostore"}, "pf2": {"prefill_prefetch": 2},
                  "pf8": {"prefill_prefetch": 8}}
# `build --int4-probes`: ... and the int4 AMX prefill with its rows unpacked a whole work item at a time ("it",
# KernelConfig.int4_unpack "item", the path before 2026-11-23) instead of 128 values of K at a time beside the
# tile products; the packed rows prefetched 1 / 4 / 8 units ahead instead of 2 ("pf1", "pf4", "pf8"); and, wrong
# results, timings that say what steps cost: without the unpack ("nu"), the folds ("nf"), the folds and tile
# stores ("ns"), or the unpack, tile products and folds ("np": what is left are the other phases)
INT4_VARIANTS = {"it": {"int4_unpack": "item"}, "pf1": {"prefill_prefetch": 1}, "pf4": {"prefill_prefetch": 4},
                 "pf8": {"prefill_prefetch": 8}, "nu": {"probe": "nounpack"}, "nf": {"probe": "nofold"},
                 "ns": {"probe": "nostore"}, "np": {"probe": "noprod"}}
# `build --phases`: ... and the int prefill path stopped after each of its phases ("u0": the sort; "u1": x's column
# blocks; "u2": gate/up; "u3": h's blocks; "u4": down, without the weighted sum), wrong results; `run` prints each
# phase's time as the difference of two of them (the last: the default's time less "u4"), in a second table
PHASES = ("sort", "x blocks", "gate/up", "h blocks", "down", "weighted sum")
PHASE_VARIANTS = {f"u{i}": {"probe": f"upto{i}"} for i in range(len(PHASES) - 1)}
# `build --variants NAME ...`: any of these (the int4 probes' "nf" / "ns" also probe the split int8 path)
ALL_VARIANTS = {**STATIC_VARIANT, **SHARED_VARIANT, **PROBE_VARIANTS, **INT4_VARIANTS,
                "es": {"prefill_epilogue": "scalar"}, "et": {"prefill_epilogue": "transpose"},
                "aq": {"act_quant": "pair"}, "pn": {"prefill_prefetch_next": True},
                "pn0": {"prefill_prefetch_next": True, "prefill_prefetch": 0}, "pt1": {"prefill_prefetch_hint": 2},
                "pt0": {"prefill_prefetch_hint": 3},
                "pt2": {"prefill_prefetch_hint": 1},
                "na": {"probe": "noact"}, "ap1": {"prefill_act_prefetch": 1},
                "ap2": {"prefill_act_prefetch": 2}, "ap4": {"prefill_act_prefetch": 4},
                "nb": {"probe": "noblocks"}, **PHASE_VARIANTS}


def _import_ktc():
    """Import ktc from this checkout, installed or not (its subpackages live in sibling folders)."""
    try:
        import ktc.runtime.cpu_experts  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import ktc
    for sub in ("targets", "runtime", "codegen"):
        spec = importlib.util.spec_from_file_location(f"ktc.{sub}", ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"ktc.{sub}"] = mod
        spec.loader.exec_module(mod)
        setattr(ktc, sub, mod)


# ---- build (here) ---------------------------------------------------------------------------

def alt_key(target: str, decode: str) -> str:
    """Manifest key and folder of `target` built with another single-token decode path."""
    return f"{target}_{decode}"


def cmd_build(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ktc.codegen.cpu_experts import ExpertKernelSpec, build_cpu_kernels, kernel_config
    from ktc.targets import get

    specs = [ExpertKernelSpec(H, I, E, K, fmt, g) for (H, I, E, K) in SHAPES.values()  # noqa: E741
             for label, fmt, g in OURS if not args.formats or label in args.formats]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(t, None) for t in args.targets] + [(t, d) for t in args.decode_targets for d in args.decode_paths]
    jobs += [(b, None) for b in args.prefill_builds]

    def one(job):
        t, decode = job
        key = t if decode is None else alt_key(t, decode)
        t, _, prefill = t.partition("+")
        config = None if decode is None else dict(kernel_config(get(t)), **ALT_DECODE[decode])
        if prefill:     # only that path (the plain x86-amx build holds the int path and "bf16" as a variant)
            config = dict(kernel_config(get(t)), prefill=prefill, prefill_variants=[])
        if (args.static_schedule or args.shared_levels or args.probes or args.int4_probes or args.variants
                or args.phases) and decode is None and not prefill:
            base = kernel_config(get(t))
            extra = dict(STATIC_VARIANT if args.static_schedule else {},
                         **(SHARED_VARIANT if args.shared_levels else {}), **(PROBE_VARIANTS if args.probes else {}),
                         **(INT4_VARIANTS if args.int4_probes else {}),
                         **(PHASE_VARIANTS if args.phases else {}), **{v: ALL_VARIANTS[v] for v in args.variants or ()})
            config = dict(base, tile_variants=dict({} if args.only_extra_variants else base.get("tile_variants", {}),
                                                   **extra))
            if args.only_extra_variants:
                config["prefill_variants"] = []
        t0 = time.time()
        entry = build_cpu_kernels(specs, get(t), out / key, config=config)
        print(f"built {key} in {time.time() - t0:.0f} s", flush=True)
        return key, entry

    with ThreadPoolExecutor(len(TARGETS)) as pool:
        manifest = dict(pool.map(one, jobs))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


# ---- shared helpers (run) -----------------------------------------------------------------------

def make_weights(H, I, E, seed):  # noqa: E741
    import torch

    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(torch.bfloat16)
    return gate_up, down


def routings(T, E, K, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].to(torch.int32)
        tw = torch.rand(T, K, generator=g)
        out.append((ids, tw / tw.sum(-1, keepdim=True)))
    return out


def reference(x, ids, tw, gate_up, down):
    """float32 torch reference of the routed experts."""
    import torch
    import torch.nn.functional as F

    T, H = x.shape
    I = down.shape[2]  # noqa: E741
    y = torch.zeros(T, H)
    for e in torch.unique(ids).tolist():
        if not 0 <= e < down.shape[0]:   # skipped, as the kernels do (experts run elsewhere)
            continue
        rows, ks = (ids == e).nonzero(as_tuple=True)
        g = x[rows] @ gate_up[e].float().T
        h = F.silu(g[:, :I]) * g[:, I:]
        y.index_add_(0, rows, (h @ down[e].float().T) * tw[rows, ks].unsqueeze(1))
    return y


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def time_calls(fn, inputs, warmup, iters):
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    ts = []
    for i in range(iters):
        args = inputs[(warmup + i) % len(inputs)]
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def iters_for(T):
    return (10, 60) if T <= 8 else (3, 12)


def interleaved(fns: dict, inputs, T: int, rounds: int) -> dict[str, list[float]]:
    """Builds timed in turn, `rounds` times (each round: the median of iters / rounds calls after a
    short warm-up), so that drift of the machine (clocks, other tenants) hits every build alike:
    name -> the rounds' medians (the figure is their median; their spread is the noise)."""
    warmup, iters = iters_for(T)
    per = max(3, iters // max(1, rounds))
    out: dict[str, list[float]] = {t: [] for t in fns}
    for r in range(max(1, rounds)):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))     # neither build always goes first
        for t in order:
            out[t].append(time_calls(fns[t], inputs, warmup if r == 0 else 2, per))
    return out


def expert_bytes(H, I, fmt, g):  # noqa: E741
    n = 3 * H * I
    return (n if fmt == "int8" else n // 2) + 4 * n // g + 4 * 3 * I   # values + scales + comp


# ---- ours (run) -------------------------------------------------------------------------------

def _pack(spec_dict, gate_up, down):
    """pack_expert_weights without importing the compiler package (same code, loaded by path)."""
    spec_mod = _load_codegen_cpu_experts()
    spec = spec_mod.ExpertKernelSpec.from_dict(spec_dict)
    return spec_mod.pack_expert_weights(spec, gate_up, down)


def _load_codegen_cpu_experts():
    _import_ktc()
    from ktc.codegen import cpu_experts
    return cpu_experts


def measure_ours(args) -> list[dict]:
    import torch

    _import_ktc()
    from ktc.runtime.cpu_experts import CpuExpertKernels

    kdir = Path(args.kernels)
    manifest = json.loads((kdir / "manifest.json").read_text())
    from ktc.errors import HostError

    loaded = {}
    for t in BUILDS:
        if (args.target and t != args.target) or (args.ours and t not in args.ours) or t not in manifest:
            continue
        try:
            loaded[t] = CpuExpertKernels.load(kdir / t, manifest[t])
        except HostError as e:
            print(f"skipping {t}: {e.message}", flush=True)
    rows = []
    for sname in args.shapes:
        H, I, E, K = SHAPES[sname]  # noqa: E741
        gate_up, down = make_weights(H, I, E, args.seed)
        for label, fmt, g in OURS:
            if args.formats and label not in args.formats:
                continue
            name = f"moe_experts_{fmt}_h{H}_i{I}_e{E}_k{K}_g{g}"
            entry = next(iter(manifest.values()))["kernels"][name]
            t0 = time.time()
            parts = _pack(entry["spec"], gate_up, down)
            print(f"packed {name} in {time.time() - t0:.1f} s", flush=True)
            for rname, T in REGIMES:
                if args.regimes and rname not in args.regimes:
                    continue
                gen = torch.Generator().manual_seed(args.seed + T)
                xs = [torch.randn(T, H, generator=gen) for _ in range(4)]
                rts = routings(T, E, K, 64 if T <= 8 else 4, args.seed + 7 * T)
                inputs = [(xs[i % 4], rts[i][1], rts[i][0]) for i in range(len(rts))]
                x, tw, ids = inputs[0]
                ref = reference(x, ids, tw, gate_up, down)
                fns, errs = {}, {}
                for t, kern in loaded.items():
                    def fn(x, tw, ids, kern=kern, name=name, parts=parts):
                        return kern.moe_experts(name, x, tw, ids, parts)
                    fns[t] = fn
                    errs[t] = rel(fn(x, tw, ids), ref)
                    tiles = kern.tile_variants(name) if args.tile_variants and hasattr(kern, "tile_variants") else []
                    for v in tiles:       # the same kernel with other micro-kernel shapes, interleaved with it
                        def fv(x, tw, ids, kern=kern, name=name, parts=parts, table=dict.fromkeys(BUCKETS, v)):
                            kern.set_tuned_prefill(name, table)
                            try:
                                return kern.moe_experts(name, x, tw, ids, parts)
                            finally:
                                kern.set_tuned_prefill(name, None)
                        fns[f"{t}:{v}"] = fv
                        errs[f"{t}:{v}"] = rel(fv(x, tw, ids), ref)
                for t, per_round in interleaved(fns, inputs, T, args.rounds).items():
                    med = sorted(per_round)[len(per_round) // 2]
                    rows.append(dict(shape=sname, impl=f"ktc {t}", fmt=label, regime=rname, T=T, ms=med * 1e3,
                                     round_ms=[r * 1e3 for r in per_round], err=errs[t],
                                     **_rates(H, I, E, K, T, med, expert_bytes(H, I, fmt, g), rts)))
                    print(json.dumps(rows[-1]), flush=True)
            parts = None
    return rows


def _rates(H, I, E, K, T, sec, bytes_per_expert, rts):  # noqa: E741
    import torch

    touched = sum(len(torch.unique(ids)) for ids, _ in rts) / len(rts)
    return dict(gbs=touched * bytes_per_expert / sec / 1e9, tflops=2 * T * K * 3 * H * I / sec / 1e12,
                tok_s=T / sec)


# ---- decode-1-cold (run, subprocess) -----------------------------------------------------------

def cold_routings(E, K, n, gpu, seed):
    """n single-token routings per case: top-K of E random scores; "gpu-mask" sets the ids of
    `gpu` fixed experts (those a hybrid run keeps on the GPU) to -1, "none" sets every id to -1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    on_gpu = torch.randperm(E, generator=g)[:gpu]
    out = {c: [] for c in COLD_CASES}
    for _ in range(n):
        ids = torch.argsort(torch.rand(1, E, generator=g), dim=1)[:, :K].to(torch.int32)
        tw = torch.rand(1, K, generator=g)
        tw = tw / tw.sum(-1, keepdim=True)
        masked = ids.clone()
        masked[torch.isin(masked, on_gpu.to(torch.int32))] = -1
        out["gpu-mask"].append((masked, tw))
        out["all-cpu"].append((ids, tw))
        out["none"].append((torch.full_like(ids, -1), tw))
    return out


def _cold_one_count(nthr, builds, layers, xs, rts, spec_name, iters, res):
    """Runs in a fresh host thread: its TVM pool starts with TVM_NUM_THREADS = nthr."""
    import torch

    os.environ["TVM_NUM_THREADS"] = os.environ["KTC_NUM_THREADS"] = str(nthr)
    time.sleep(1.0)   # let the previous count's pool stop spinning
    nb, nl = len(builds), len(layers)
    for case, rt in rts.items():
        for mode in ("ms", "kernel_ms"):
            ts = {b: [] for b in builds}
            for i in range(iters[0] + iters[1]):
                for j, (b, kern) in enumerate(builds.items()):
                    c = i * nb + j        # every call: another layer and another routing
                    ids, tw = rt[c % len(rt)]
                    x, parts = xs[c % len(xs)], layers[c % nl]
                    if mode == "ms":
                        t0 = time.perf_counter()
                        kern.moe_experts(spec_name, x, tw, ids, parts)
                    else:
                        k = kern._kernels[spec_name]
                        args = [x, tw, ids, *[parts[n] for n in k["weights"]], torch.empty(1, x.shape[1]),
                                *kern._scratch_for(k, 1), nthr]
                        t0 = time.perf_counter()
                        k["fn"](*args)
                    dt = time.perf_counter() - t0
                    if i >= iters[0]:
                        ts[b].append(dt)
            for b, v in ts.items():
                v.sort()
                res.setdefault((case, b), {})[mode] = v[len(v) // 2]


def measure_cold(args) -> list[dict]:
    import threading

    import torch

    _import_ktc()
    from ktc.errors import HostError
    from ktc.runtime.cpu_experts import CpuExpertKernels

    kdir = Path(args.kernels)
    manifest = json.loads((kdir / "manifest.json").read_text())
    builds, target = {}, None
    for t in [args.cold_target] + [x for x in TARGETS if x != args.cold_target]:
        keys = [("fused", t)] + [(d, alt_key(t, d)) for d in ALT_DECODE if alt_key(t, d) in manifest]
        if t not in manifest:
            continue
        try:
            builds = {d: CpuExpertKernels.load(kdir / key, manifest[key]) for d, key in keys}
        except HostError as e:
            print(f"skipping {t}: {e.message}", flush=True)
            continue
        target = t
        break
    if target is None:
        print("decode-1-cold: no target of the manifest runs here")
        return []
    print(f"decode-1-cold on {target}: builds {', '.join(builds)}", flush=True)
    builds = dict(sorted(builds.items(), key=lambda kv: [*ALT_DECODE, "fused"].index(kv[0])))
    rows = []
    for sname in args.shapes:
        H, I, E, K = SHAPES[sname]  # noqa: E741
        gate_up, down = make_weights(H, I, E, args.seed)
        gpu = args.cold_gpu_experts if args.cold_gpu_experts is not None else round(E * 3 / 8)
        rts = cold_routings(E, K, 256, gpu, args.seed + 11)
        gen = torch.Generator().manual_seed(args.seed + 1)
        xs = [torch.randn(1, H, generator=gen) for _ in range(8)]
        for label, fmt, g in OURS:
            if args.formats and label not in args.formats:
                continue
            name = f"moe_experts_{fmt}_h{H}_i{I}_e{E}_k{K}_g{g}"
            t0 = time.time()
            base = _pack(manifest[target]["kernels"][name]["spec"], gate_up, down)
            layers = [base] + [{n: t.clone() for n, t in base.items()} for _ in range(args.cold_layers - 1)]
            nbytes = expert_bytes(H, I, fmt, g)
            gb = len(layers) * sum(t.nbytes for t in base.values()) / 1e9
            print(f"packed {name} x {len(layers)} layers ({gb:.1f} GB) in {time.time() - t0:.0f} s", flush=True)
            errs = {}   # rel err vs the float reference; case "none": 0 if y is exactly 0, else -1
            for case, rt in rts.items():
                ids, tw = rt[0]
                ref = reference(xs[0], ids, tw, gate_up, down)
                for b, kern in builds.items():
                    y = kern.moe_experts(name, xs[0], tw, ids, layers[0])
                    errs[(case, b)] = float((y == 0).all()) - 1.0 if case == "none" else rel(y, ref)
            active = {c: sum(int(((ids >= 0) & (ids < E)).sum()) for ids, _ in rt) / len(rt) for c, rt in rts.items()}
            touched = {c: sum(len({e for e in ids.flatten().tolist() if 0 <= e < E}) for ids, _ in rt) / len(rt)
                       for c, rt in rts.items()}
            for nthr in args.cold_threads:
                res: dict = {}
                th = threading.Thread(target=_cold_one_count, args=(nthr, builds, layers, xs, rts, name,
                                                                    (args.cold_warmup, args.cold_iters), res))
                th.start()
                th.join()
                for (case, b), m in res.items():
                    rows.append(dict(shape=sname, impl=f"ktc {target}", decode=b, fmt=label, regime=COLD, T=1,
                                     threads=nthr, case=case, active=active[case], ms=m["ms"] * 1e3,
                                     kernel_ms=m["kernel_ms"] * 1e3,
                                     gbs=touched[case] * nbytes / m["kernel_ms"] / 1e9,
                                     err=errs[(case, b)]))
                    print(json.dumps(rows[-1]), flush=True)
            layers = base = None
    return rows


def cold_table(rows) -> str:
    """One line per (shape, format, threads, case): each decode path's ms, and new vs phased."""
    lines = ["| shape | format | threads | case | active | decode | ms (runtime call) | ms (kernel) | GB/s | rel err "
             "| kernel vs phased |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["shape"], r["fmt"], r["threads"], r["case"]): r for r in rows if r["decode"] == "phased"}
    for r in rows:
        b = base.get((r["shape"], r["fmt"], r["threads"], r["case"]))
        vs = f"{r['kernel_ms'] / b['kernel_ms']:.2f}x" if b and b is not r else ""
        err = "zeros" if r["case"] == "none" and r["err"] == 0 else f"{r['err']:.2e}"
        lines.append(f"| {r['shape']} | {r['fmt']} | {r['threads']} | {r['case']} | {r['active']:.2f} | {r['decode']} "
                     f"| {r['ms']:.3f} | {r['kernel_ms']:.3f} | {r['gbs']:.1f} | {err} | {vs} |")
    return "\n".join(lines)


# ---- kt-kernel (run, subprocess) ----------------------------------------------------------------

def measure_kt(args) -> list[dict]:
    import torch
    from kt_kernel import KTMoEWrapper

    rows = []
    for sname in args.shapes:
        H, I, E, K = SHAPES[sname]  # noqa: E741
        gate_up, down = make_weights(H, I, E, args.seed)
        gate, up = gate_up[:, :I].contiguous(), gate_up[:, I:].contiguous()
        for fmt in ("int8", "int4"):
            if args.formats and not any(f.startswith(fmt) for f in args.formats):
                continue
            method = KT_METHOD[fmt]
            t0 = time.time()
            with tempfile.TemporaryDirectory() as wdir:
                w = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H,
                                 moe_intermediate_size=I, gpu_experts_mask=None, cpuinfer_threads=args.kt_threads,
                                 threadpool_count=1, weight_path=wdir, chunked_prefill_size=1024, method=method)
                w.load_weights_from_tensors(gate, up, down, torch.arange(E, dtype=torch.int64))
                print(f"kt {method} {sname} loaded in {time.time() - t0:.1f} s", flush=True)
                cpu_infer, moe = w.cpu_infer, w.moe
                for rname, T in REGIMES:
                    if args.regimes and rname not in args.regimes:
                        continue
                    gen = torch.Generator().manual_seed(args.seed + T)
                    xs = [torch.randn(T, H, generator=gen) for _ in range(4)]
                    rts = routings(T, E, K, 64 if T <= 8 else 4, args.seed + 7 * T)
                    bsz = torch.tensor([T], dtype=torch.int32)
                    xb = [x.to(torch.bfloat16).contiguous() for x in xs]
                    ids64 = [ids.to(torch.int64).contiguous() for ids, _ in rts]
                    tws = [tw.to(torch.float32).contiguous() for _, tw in rts]
                    out = torch.empty(T, H, dtype=torch.bfloat16)

                    def fn(i, bsz=bsz, xb=xb, ids64=ids64, tws=tws, out=out, K=K, cpu_infer=cpu_infer, moe=moe):
                        cpu_infer.submit(moe.forward_task(bsz.data_ptr(), K, ids64[i].data_ptr(), tws[i].data_ptr(),
                                                          xb[i % 4].data_ptr(), out.data_ptr(), False))
                        cpu_infer.sync()
                        return out

                    x0 = xb[0].float()
                    ref = reference(x0, rts[0][0], rts[0][1], gate_up, down)
                    err = rel(fn(0).float(), ref)
                    med = time_calls(fn, [(i,) for i in range(len(rts))], *iters_for(T))
                    nbytes = 3 * H * I if fmt == "int8" else 3 * H * I // 2
                    rows.append(dict(shape=sname, impl=f"kt-kernel {method}", fmt=fmt, regime=rname, T=T,
                                     ms=med * 1e3, err=err, **_rates(H, I, E, K, T, med, nbytes, rts)))
                    print(json.dumps(rows[-1]), flush=True)
                w = moe = None
    return rows


# ---- run (there) ------------------------------------------------------------------------------------

def stream_read_gbs() -> float:
    """Read bandwidth estimate: torch float32 sum over 2 GiB (all of torch's threads)."""
    import torch

    a = torch.ones(1 << 29, dtype=torch.float32)
    a.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9


def table(rows) -> str:
    kt = {(r["shape"], r["fmt"][:4], r["regime"]): r for r in rows if r["impl"].startswith("kt-kernel")}
    lines = ["| shape | regime | impl | format | ms | tok/s | GB/s | TFLOP/s | rel err | vs kt |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = kt.get((r["shape"], r["fmt"][:4], r["regime"]))
        if r["regime"].startswith("prefill"):
            vs = f"{r['tok_s'] / k['tok_s']:.2f}x tok/s" if k and k is not r else ""
        else:
            vs = f"{r['ms'] / k['ms']:.2f}x latency" if k and k is not r else ""
        lines.append(f"| {r['shape']} | {r['regime']} | {r['impl']} | {r['fmt']} | {r['ms']:.3f} | {r['tok_s']:.0f} "
                     f"| {r['gbs']:.1f} | {r['tflops']:.2f} | {r['err']:.2e} | {vs} |")
    return "\n".join(lines)


def phase_table(rows) -> str:
    """Each prefill phase's ms (the difference of the builds stopped after it and before it, "u0" .. "u4" and the
    default), per shape and format that has them all; "" if none has. One call's medians: a noisy round can make
    a difference negative."""
    by = {(r["shape"], r["fmt"], r["regime"], r["impl"]): r["ms"] for r in rows}
    lines = ["| shape | format | " + " | ".join(PHASES) + " | total ms |", "|---|---|" + "---|" * (len(PHASES) + 1)]
    for (shape, fmt, regime, impl), total in sorted(by.items()):
        if not (regime.startswith("prefill") and impl.startswith("ktc ") and ":" not in impl):
            continue
        stops = [by.get((shape, fmt, regime, f"{impl}:u{i}")) for i in range(len(PHASES) - 1)]
        if None in stops:
            continue
        ends = [*stops, total]
        parts = [ends[0]] + [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
        lines.append(f"| {shape} | {fmt} | " + " | ".join(f"{v:.3f}" for v in parts) + f" | {total:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cmd_run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.kt_only:
        (out / "kt.json").write_text(json.dumps(measure_kt(args)))
        return
    if args.cold_only:
        (out / "cold.json").write_text(json.dumps(measure_cold(args)))
        return
    if args.target or args.ours:
        (out / f"{args.target or 'ours'}.json").write_text(json.dumps(measure_ours(args)))
        return
    info = {"cpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout}
    print(info["cpu"], flush=True)
    info["read_gbs"] = stream_read_gbs()
    print(f"torch float32 sum read bandwidth: {info['read_gbs']:.1f} GB/s", flush=True)
    rows = []
    # one subprocess each: kt-kernel's queue thread busy-waits, and a crash of one side must
    # not lose the other's figures
    regimes = args.regimes if args.regimes is not None else [x for x, _ in REGIMES]
    plain = [x for x in regimes if x != COLD]
    jobs = [] if args.no_kt or not plain else [("kt", ["--kt-only", "--kt-threads", str(args.kt_threads)])]
    built = json.loads((Path(args.kernels) / "manifest.json").read_text())
    ours = [t for t in args.targets if t in built]
    # our builds in one process, timed in turn (interleaved) so that drift hits them alike
    jobs += [("ours", ["--ours", *ours, "--rounds", str(args.rounds), *(["--tile-variants"] if args.tile_variants
                                                                         else [])])] if plain and ours else []
    if COLD in regimes:
        jobs.append(("cold", ["--cold-only", "--cold-target", args.cold_target, "--cold-layers", str(args.cold_layers),
                              "--cold-threads", *map(str, args.cold_threads), "--cold-iters", str(args.cold_iters),
                              "--cold-warmup", str(args.cold_warmup)]
                     + ([] if args.cold_gpu_experts is None else ["--cold-gpu-experts", str(args.cold_gpu_experts)])))
    cold_rows = []
    for name, extra in jobs:
        cmd = [sys.executable, __file__, "run", "--out", str(out), "--kernels", args.kernels, "--shapes",
               *args.shapes, "--seed", str(args.seed), *extra]
        if args.formats:
            cmd += ["--formats", *args.formats]
        if name != "cold":
            cmd += ["--regimes", *plain]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                               timeout=args.job_timeout * (len(ours) if name == "ours" else 1))
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"{name}: exit {code} after {time.time() - t0:.0f} s", flush=True)
        f = out / f"{name}.json"
        if code == 0 and f.exists():
            (cold_rows if name == "cold" else rows).extend(json.loads(f.read_text()))
    rows.sort(key=lambda r: (r["shape"], [x for x, _ in REGIMES].index(r["regime"]), r["fmt"][:4],
                             not r["impl"].startswith("kt-kernel"), r["impl"], r["fmt"]))
    cold_rows.sort(key=lambda r: (r["shape"], r["fmt"], r["threads"], COLD_CASES.index(r["case"]),
                                  ["phased", "regions", "fused"].index(r["decode"])))
    (out / "results.json").write_text(json.dumps({"info": info, "rows": rows, "cold_rows": cold_rows}, indent=1))
    text = "\n\n".join(t for t in (table(rows) if rows else "", phase_table(rows),
                                    cold_table(cold_rows) if cold_rows else "") if t)
    (out / "table.md").write_text(text + "\n")
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--decode-targets", nargs="*", default=["x86-amx"], choices=TARGETS,
                   help="targets also built with the other single-token decode paths (for decode-1-cold)")
    b.add_argument("--decode-paths", nargs="*", default=["phased", "regions"], choices=list(ALT_DECODE))
    b.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS, help="plain builds to make")
    b.add_argument("--prefill-builds", nargs="*", default=list(PREFILL_BUILDS), choices=PREFILL_BUILDS,
                   help="x86-amx also built with these int8/int4 prefill paths (AMX-BF16 tiles)")
    b.add_argument("--formats", nargs="*", default=None, help="subset of " + ", ".join(x for x, _, _ in OURS))
    b.add_argument("--static-schedule", action="store_true",
                   help="plain builds also hold the static item split as tile variant 'st'")
    b.add_argument("--shared-levels", action="store_true",
                   help="plain builds also hold int8's activation levels in one block as tile variant 'sh'")
    b.add_argument("--probes", action="store_true",
                   help="plain builds also hold the fold / store probes and prefetch distances (PROBE_VARIANTS)")
    b.add_argument("--int4-probes", action="store_true",
                   help="plain builds also hold the int4 unpack variants and probes (INT4_VARIANTS)")
    b.add_argument("--phases", action="store_true",
                   help="plain builds also hold the int prefill path stopped after each phase (PHASE_VARIANTS)")
    b.add_argument("--variants", nargs="*", choices=list(ALL_VARIANTS), default=None,
                   help="plain builds also hold these tile variants (ALL_VARIANTS)")
    b.add_argument("--only-extra-variants", action="store_true",
                   help="with --static-schedule / --shared-levels / --probes: only those variants (no bt4, tr8, bf16, "
                        "fma)")
    r = sub.add_parser("run")
    r.add_argument("--kernels", default=str(ROOT / ".carry" / "kernels"))
    r.add_argument("--out", required=True)
    r.add_argument("--shapes", nargs="+", default=list(SHAPES))
    r.add_argument("--formats", nargs="*", default=None, help="subset of " + ", ".join(x for x, _, _ in OURS))
    r.add_argument("--regimes", nargs="*", default=None,
                   help="subset of " + ", ".join([x for x, _ in REGIMES] + [COLD]) + f" (default: all but {COLD})")
    r.add_argument("--targets", nargs="*", default=list(BUILDS), help="builds to measure (those in the manifest)")
    r.add_argument("--kt-threads", type=int, default=15)
    r.add_argument("--job-timeout", type=float, default=300)
    r.add_argument("--kt-only", action="store_true")
    r.add_argument("--target", choices=BUILDS, default=None, help="measure only this build's kernels")
    r.add_argument("--ours", nargs="*", choices=BUILDS, default=None,
                   help="measure these builds in one process, interleaved (what `run` does)")
    r.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (ours)")
    r.add_argument("--tile-variants", action="store_true",
                   help="also time each kernel's tile variants (TARGET_CONFIGS tile_variants), interleaved")
    r.add_argument("--no-kt", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--cold-only", action="store_true")
    r.add_argument("--cold-target", choices=TARGETS, default="x86-amx",
                   help=f"{COLD}: this target's builds (the next one if this host cannot run it)")
    r.add_argument("--cold-layers", type=int, default=48, help=f"{COLD}: separately allocated copies of the layer")
    r.add_argument("--cold-threads", type=int, nargs="+", default=[8, 12, 16])
    r.add_argument("--cold-gpu-experts", type=int, default=None,
                   help=f"{COLD} gpu-mask case: experts whose ids become -1 (default 3/8 of E)")
    r.add_argument("--cold-iters", type=int, default=200, help=f"{COLD}: timed calls per build, case and mode")
    r.add_argument("--cold-warmup", type=int, default=20)
    args = p.parse_args(argv)
    (cmd_build if args.cmd == "build" else cmd_run)(args)


if __name__ == "__main__":
    main()
