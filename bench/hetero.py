"""Heterogeneous benchmark (issue 5): Qwen3-30B-A3B shape, hot experts on the GPU, cold on the CPU.

    python bench/hetero.py plan --out .carry/hetero            # here: weights-free plans + AMX kernels
    PYTHONPATH=$PWD/.carry/site python3 bench/hetero.py run --plans .carry/hetero --out $OUT/res   # GPU machine

`plan` compiles, from config.json alone (`ktc compile --weights-free`), with --target cuda
--cpu-target x86-amx --gpu-memory 24GiB:
  q30-int8         CPU experts int8, placement by a uniform expert popularity
  q30-int4         CPU experts int4 (GPU experts bf16)
  q30-int8-dense4  CPU experts int8, the GPU's dense linears int4 (--gpu-dense-quant int4)
  q4-none-hybrid / q4-none-gpu   4 layers, --quant none, half the experts on the CPU / all on
                   the GPU: the correctness pair
`run` (on the GPU machine, no checkpoint, no TVM) fills each plan with random weights in its
own layout (ktc.pack.random_weights, GPU part made on the GPU) and measures, batch 1:
  decode tokens/s after a 1K prompt (CUDA-graph segments), prefill tokens/s of 2K tokens,
  per-layer CPU kernel / wait / GPU-beside times, and the roofline of the placement:
  CPU bytes of the CPU-resident experts a token activates (averaged over the routing) / 116 GB/s
  vs GPU bytes / 4.3 TB/s; the same CPU kernels called directly (the kernel time the runtime's
  CPU part is compared with); a router skewed on purpose to a Zipf popularity (skew_routing)
  with uniform placement, then placed again with the routing counted on the machine as the
  calibration (the compiler's passes rerun there: same CPU kernel shapes, the plan's kernels serve);
  decode again under other runtime settings, interleaved in one process (compare_decode): the GPU's
  share of the CPU experts read over PCIe off or fixed, and the runtime of before 2026-11-23;
  transformers + accelerate (device_map auto, max_memory 3 GiB on the GPU) on 6 layers, scaled;
  and correctness: hybrid vs all-GPU logits and 32 greedy tokens (--quant none, 4 real layers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import QWEN3_30B_A3B  # noqa: E402

DEEPSEEK_V2_LITE = {   # deepseek-ai/DeepSeek-V2-Lite config.json, the fields transformers reads
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02,
    "rms_norm_eps": 1e-06, "use_cache": True, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "torch_dtype": "bfloat16",
}
CPU_BW = 116e9          # measured CPU read bandwidth of the GPU machine (issue 5)
GPU_BW = 4.3e12         # measured GPU copy bandwidth
ZIPF_ALPHA = 1.0
SKEW_SEED = 7
CONTEXT = 1024
PREFILL = 2048


def log(*a):
    print(*a, flush=True)


# -- the skewed router -------------------------------------------------------------------------
def zipf_popularity(layers: int, experts: int, alpha: float = ZIPF_ALPHA, seed: int = SKEW_SEED) -> torch.Tensor:
    """[layers, experts]: expert popularity 1/rank^alpha, ranks permuted per layer (seeded)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1
    p = 1.0 / ranks.double() ** alpha
    return p / p.sum(-1, keepdim=True)


class RouterTap:
    """Wraps the router ops of a GpuModel's executor (eager runs only: prefills) to record, per MoE
    layer, the mean of hidden dim 0 of the router input and the counts of the experts chosen."""

    def __init__(self, model):
        self.ex = model.executor
        self.x0: dict[int, list[float]] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.saved = list(self.ex.steps)
        for i, (node, op, ws) in enumerate(self.ex.steps):
            if node.op == "router":
                self.ex.steps[i] = (node, _Tapped(op, self, _layer(node.name)), ws)

    def close(self) -> None:
        self.ex.steps[:] = self.saved


class _Tapped:
    def __init__(self, op, tap: RouterTap, layer: int):
        self.op, self.tap, self.layer = op, tap, layer
        self.prepare = None

    def run(self, node, inputs, ws, ctx):
        out = self.op.run(node, inputs, ws, ctx)
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        self.tap.x0.setdefault(self.layer, []).append(float(x[:, 0].float().mean()))
        e = int(node.attrs["num_experts"])
        c = torch.bincount(out[1].reshape(-1).long(), minlength=e).cpu()
        self.tap.counts[self.layer] = self.tap.counts.get(self.layer, torch.zeros(e, dtype=torch.long)) + c
        return out


def _layer(name: str) -> int:
    import re

    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def diversify(model, rms: float = 1.0) -> None:
    """Embedding rows at rms `rms` (random weights give 0.02): with std-0.02 layers the residual
    stream then stays dominated by the token, so tokens route differently, as in a trained model;
    at 0.02 the attention's average of all tokens dominates and every token picks the same few
    experts (measured: the hottest 25% of experts took 99% of the slots)."""
    emb = next(ws for node, _, ws in model.executor.steps if node.op == "embedding")["weight"]
    emb.mul_(rms / emb.float().pow(2).mean().sqrt().item())


def skew_routing(model, prompt: torch.Tensor, big: float = 50.0) -> dict[int, torch.Tensor]:
    """Make a random-weight model's routing Zipf-skewed, on purpose, in place, and return the
    measured routing counts per layer. Hidden dim 0 of every embedding row is set to `big`, so the
    residual stream keeps a large, token-independent component there (the other 2047 dims keep
    their token-to-token variety); a prefill measures what dim 0 of each layer's router input is
    (x0), and each router row e gets weight log(p_e) / x0 on dim 0 (0 before), adding about
    log(p_e) to expert e's logit: softmax top-k then follows the Zipf popularity p of that layer."""
    ex = model.executor
    routers = [(node, ws) for node, _, ws in ex.steps if node.op == "router"]
    emb = next(ws for node, _, ws in ex.steps if node.op == "embedding")["weight"]
    emb[:, 0] = big
    for _, ws in routers:
        ws["weight"][:, 0] = 0
    tap = RouterTap(model)
    model.prefill(prompt)
    x0 = {layer: statistics.fmean(v) for layer, v in tap.x0.items()}
    tap.close()
    pop = zipf_popularity(len(routers), int(routers[0][0].attrs["num_experts"]))
    for i, (node, ws) in enumerate(routers):
        layer = _layer(node.name)
        ws["weight"][:, 0] = (torch.log(pop[i]) / x0[layer]).to(ws["weight"].dtype).to(ws["weight"].device)
    return measure_routing(model, prompt)


def measure_routing(model, prompt: torch.Tensor) -> dict[int, torch.Tensor]:
    tap = RouterTap(model)
    model.prefill(prompt)
    tap.close()
    return tap.counts


# -- plan (here) ----------------------------------------------------------------------------------
def cmd_plan(args) -> None:
    from ktc.compiler import compile_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        full, small, ds = Path(d) / "q30", Path(d) / "q4", Path(d) / "dsv2lite"
        for folder, layers in ((full, 48), (small, 4)):
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(dict(QWEN3_30B_A3B, num_hidden_layers=layers)))
        ds.mkdir()
        (ds / "config.json").write_text(json.dumps(DEEPSEEK_V2_LITE))
        common = {"target": "cuda", "cpu_target": args.cpu_target, "weights_free": True, "force": True}
        jobs = {
            "q30-int8": (full, {"quant": "int8", "gpu_memory": args.gpu_memory}),
            "q30-int4": (full, {"quant": "int4", "gpu_quant": "none", "gpu_memory": args.gpu_memory}),
            # the dense linears int4 on the GPU (--gpu-dense-quant): the bytes saved go to GPU experts
            "q30-int8-dense4": (full, {"quant": "int8", "gpu_dense_quant": "int4", "gpu_memory": args.gpu_memory}),
            "q4-none-hybrid": (small, {"quant": "none", "gpu_memory": _half_budget(small)}),
            "q4-none-gpu": (small, {"quant": "none"}),
            "dsv2lite-int8": (ds, {"quant": "int8", "gpu_memory": "12GiB"}),
        }
        for name, (folder, opts) in jobs.items():
            if args.only and name not in args.only:
                continue
            t = time.perf_counter()
            rep = compile_model(folder, out / f"{name}.ktc", **common, **opts)
            plan = rep.graph.config.get("placement", {})
            log(f"{name}: {time.perf_counter() - t:.0f} s; GPU experts {plan.get('gpu_experts')}, CPU experts "
                f"{plan.get('cpu_experts')}, planned {plan.get('gpu_bytes_planned', 0) / 2**30:.2f} GiB")


def _half_budget(folder: Path) -> int:
    from ktc.capture import capture
    from ktc.passes.placement import budget_for_expert_share

    return budget_for_expert_share(capture(folder, weights_free=True), 0.5)


# -- run (GPU machine) ---------------------------------------------------------------------------
def _load(plan: Path, weights: dict, max_context: int = CONTEXT + PREFILL + 80):
    from ktc.runtime.loader import load_artifact

    return load_artifact(plan, verify="sizes", max_batch_size=1, max_context=max_context, weights=weights)


def _sync():
    torch.cuda.synchronize()


def _decode_prompt(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.vocab_size, (1, CONTEXT), generator=g)


def _timed_decode(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds a decode step, over `steps` steps after a prefill of `ids` and two untimed steps."""
    logits = model.prefill(ids, reserve=steps + 4)
    tok = torch.tensor([int(logits[0].argmax())], device=model.device)
    for _ in range(2):                    # the first step after a prefill captures the graphs
        tok = model.step(tok).argmax(-1)
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        tok = model.step(tok).argmax(-1)
    _sync()
    return (time.perf_counter() - t) / steps


def measure_decode(model, steps: int = 48, repeats: int = 5) -> dict:
    ids = _decode_prompt(model)
    runs = [_timed_decode(model, ids, steps) for _ in range(repeats + 1)]
    ms = 1e3 * statistics.median(runs[1:])
    return {"ms": ms, "tok_s": 1e3 / ms, "runs_ms": [1e3 * r for r in runs], "layers": decode_layer_stats(model, steps)}


def decode_layer_stats(model, steps: int = 48) -> dict:
    """Per-layer CPU kernel and wait times (the model's profile) over `steps` decode steps after a prefill."""
    ids = _decode_prompt(model)
    model.reset()
    model.prefill(ids, reserve=steps + 4)
    tok = torch.tensor([0], device=model.device)
    tok = model.step(tok).argmax(-1)
    model.profile(True)
    for _ in range(steps):
        tok = model.step(tok).argmax(-1)
    stats = model.layer_stats()
    model.profile(False)
    return _layer_summary(stats)


def kernel_profile(model, steps: int = 4, top: int = 24) -> dict:
    """The GPU kernels of `steps` CUDA-graph decode steps (torch.profiler / CUPTI): per kernel name, launches and
    mean us per step; the GPU's busy time per step (kernel time summed over streams); and a layer's timeline
    (layer_timeline)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ids = _decode_prompt(model)
    model.prefill(ids, reserve=steps + 8)
    tok = torch.tensor([0], device=model.device)
    for _ in range(3):
        tok = model.step(tok).argmax(-1)
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = model.step(tok).argmax(-1)
        _sync()
    events = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == DeviceType.CUDA and e.name and "Memcpy" not in e.name), key=lambda e: e[1])
    kernels: dict[str, list[float]] = {}
    for name, a, b in events:
        kernels.setdefault(name[:90], []).append(b - a)
    rows = sorted(((n, len(v) / steps, sum(v) / steps) for n, v in kernels.items()), key=lambda r: -r[2])
    return {"busy_us_per_step": sum(r[2] for r in rows), "launches_per_step": sum(r[1] for r in rows),
            "kernels": [{"name": n, "per_step": c, "us_per_step": us} for n, c, us in rows[:top]],
            "layer_timeline_us": layer_timeline(events)}


def layer_timeline(events: list[tuple[str, float, float]]) -> dict:
    """Median us, per MoE layer, from the end of the stage kernel (moe_stage_kernel, moe_split_ids_kernel before it;
    the host's event follows it) to: the GPU's PCIe share starting and ending, the GPU experts ending, the next
    layer's wait_gather ending (the CPU kernel's result is in) and the next layer's stage ending (the serial
    GPU part in between)."""
    anchors = [i for i, e in enumerate(events) if e[0] in ("moe_stage_kernel", "moe_split_ids_kernel")]
    marks: dict[str, list[float]] = {}
    for a, b in zip(anchors, anchors[1:], strict=False):
        t0 = events[a][2]
        seg = events[a + 1: b + 1]

        def first(name, which, seg=seg, t0=t0):
            hit = [e for e in seg if e[0].startswith(name)]
            return (hit[0][1] if which == "start" else max(e[2] for e in hit)) - t0 if hit else None

        got = {"share_start": first("moe_gemv_up_q_kernel", "start"),
               "share_end": first("moe_gemv_down_q_kernel", "end"),
               "gpu_experts_end": first("moe_gemv_down_kernel", "end"),
               "cpu_result_in": first("moe_wait_gather_kernel", "end"), "next_stage_end": events[b][2] - t0}
        for k, v in got.items():
            if v is not None:
                marks.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in marks.items()}


def measure_prefill(model, length: int = PREFILL, repeats: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.vocab_size, (1, length), generator=g)
    model.prefill(ids)
    runs = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        model.prefill(ids)
        _sync()
        runs.append(time.perf_counter() - t)
    model.profile(True)
    model.prefill(ids)
    stats = model.layer_stats()
    model.profile(False)
    s = statistics.median(runs)
    return {"ms": 1e3 * s, "tok_s": length / s, "layers": _layer_summary(stats)}


def _layer_summary(stats: list[dict]) -> dict:
    if not stats:
        return {}
    keys = ("cpu_ms", "wait_ms", "gpu_ms")
    out = {f"{k}_sum": sum((s[k] or 0.0) for s in stats) for k in keys}
    out.update({f"{k}_mean": out[f"{k}_sum"] / len(stats) for k in keys})
    out["overlap"] = min(1.0, out["gpu_ms_sum"] / out["cpu_ms_sum"]) if out["cpu_ms_sum"] else None
    out["layers"] = len(stats)
    return out


def _part_bytes(t) -> int:
    if isinstance(t, dict):
        return sum(_part_bytes(v) for v in t.values())
    return t.numel() * t.element_size()


def roofline(graph, weights: dict, shares: torch.Tensor | None, context: int = CONTEXT) -> dict:
    """Bytes one decode token reads: CPU = the CPU-resident experts it activates (expected over the
    routing: `shares` [layers, E] = share of routed slots per expert, uniform if None), GPU = dense
    weights (the embedding's one row, everything else whole), the GPU experts it activates, and the
    KV cache at `context`."""
    cpu = gpu = 0.0
    moe_nodes = graph.nodes_of("moe_experts")
    layers = sorted({int(n.attrs["layer"]) for n in moe_nodes})
    idx = {ly: i for i, ly in enumerate(layers)}
    expert_weights = set()
    for n in moe_nodes:
        e_global = int(n.attrs.get("num_global_experts", n.attrs["num_experts"]))
        held = n.attrs.get("experts", list(range(e_global)))
        top_k = int(n.attrs["top_k"])
        share = (shares[idx[int(n.attrs["layer"])]] if shares is not None
                 else torch.full((e_global,), 1.0 / e_global, dtype=torch.float64))
        slots = top_k * float(share[held].sum())          # expected experts of this node per token
        per_expert = sum(_part_bytes(weights[w]) for w in n.weights.values()) / max(1, len(held))
        expert_weights.update(n.weights.values())
        if n.device == "cpu":
            cpu += slots * per_expert
        else:
            gpu += slots * per_expert
    emb = graph.nodes_of("embedding")[0].weights["weight"]
    for name in set(graph.weights) - expert_weights:
        b = _part_bytes(weights[name])
        gpu += b / graph.weights[name].shape[0] if name == emb else b
    kv = sum((int(a.attrs["kv_lora_rank"]) + int(a.attrs["qk_rope_head_dim"])) * 2 if a.attrs.get("kind") == "mla"
             else 2 * int(a.attrs["num_kv_heads"]) * int(a.attrs["head_dim"]) * 2 for a in graph.nodes_of("attention"))
    gpu += kv * context
    return {"cpu_bytes": cpu, "gpu_bytes": gpu, "cpu_ms": 1e3 * cpu / CPU_BW, "gpu_ms": 1e3 * gpu / GPU_BW}


def direct_kernel_threads(model, graph, shares: torch.Tensor | None) -> dict[int, float]:
    """direct_kernel_ms with the kernel split into n tasks (the pool keeps its threads)."""
    out = {}
    old = os.environ.get("KTC_NUM_THREADS")
    try:
        for n in (8, 12, 14, 15, 16):
            os.environ["KTC_NUM_THREADS"] = str(n)
            out[n] = direct_kernel_ms(model, graph, shares, calls=120)
    finally:
        if old is None:
            os.environ.pop("KTC_NUM_THREADS", None)
        else:
            os.environ["KTC_NUM_THREADS"] = old
    return out


def direct_kernel_ms(model, graph, shares: torch.Tensor | None, calls: int = 200) -> float:
    """Median ms of the layer's CPU expert kernel called directly (no runtime around it), one token,
    a routing drawn from `shares` per call over a rotating set of layers (weights not in cache)."""
    ex = model.executor
    offs = ex.offloads
    rows = {ly: i for i, ly in enumerate(sorted({int(n.attrs["layer"]) for n in graph.nodes_of("moe_experts")}))}
    g = torch.Generator().manual_seed(3)
    times = []
    hidden = int(graph.config["hidden_size"])
    x = torch.randn(1, hidden, generator=g)
    # each layer's kernel bound to fixed buffers (as the runtime's decode calls it), so the time is
    # the kernel's and the FFI call's, not moe_experts' argument handling
    bufs = {id(off): (x.clone(), torch.empty(1, off.top_k), torch.empty(1, off.top_k, dtype=torch.int32),
                      torch.empty(1, hidden)) for off in offs}
    if hasattr(offs[0].kernels, "bind"):
        calls_of = {id(off): off.kernels.bind(off.kernel, *bufs[id(off)][:3], off.packed, bufs[id(off)][3])
                    for off in offs}
    else:   # a runtime from before bound calls (same-run comparisons with an older checkout)
        calls_of = {id(off): (lambda off=off, b=bufs[id(off)]: off.kernels.moe_experts(off.kernel, *b[:3], off.packed,
                                                                                        out=b[3])) for off in offs}
    for i in range(calls):
        off = offs[i % len(offs)]
        e_global = int(off.node.attrs.get("num_global_experts", off.node.attrs["num_experts"]))
        k = off.top_k
        p = shares[rows[off.stats.layer]] if shares is not None else torch.full((e_global,), 1.0 / e_global)
        ids = torch.multinomial(p.float(), k, replacement=False, generator=g).to(torch.int32)[None]
        if off.table is not None:
            ids = off.table.cpu()[ids.long()]
        _, tw, ids_buf, _ = bufs[id(off)]
        tw.fill_(1.0 / k)
        ids_buf.copy_(ids)
        call = calls_of[id(off)]
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[len(offs):])


def gpu_share(graph, shares: torch.Tensor | None) -> float:
    """Share of routed slots the GPU experts serve (expected over the routing)."""
    total = served = 0.0
    layers = sorted({int(n.attrs["layer"]) for n in graph.nodes_of("moe_experts")})
    idx = {ly: i for i, ly in enumerate(layers)}
    for n in graph.nodes_of("moe_experts"):
        e_global = int(n.attrs.get("num_global_experts", n.attrs["num_experts"]))
        held = n.attrs.get("experts", list(range(e_global)))
        share = shares[idx[int(n.attrs["layer"])]] if shares is not None else torch.full((e_global,), 1 / e_global)
        s = float(share[held].sum())
        total += s
        if n.device != "cpu":
            served += s
    return served / total if total else 0.0


def replan(plan: Path, counts: dict[int, torch.Tensor]):
    """The plan's graph placed again with `counts` as the calibration (same options, same CPU kernel
    shapes: every layer keeps its number of GPU experts, only which ones changes)."""
    from ktc.capture import capture
    from ktc.compiler import parse_size
    from ktc.passes.manager import PassContext, PassManager
    from ktc.passes.pipeline import DEFAULT_PIPELINE
    from ktc.runtime.artifact import read_manifest

    m = read_manifest(plan)
    comp = m.data["compile"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(m.graph.config["hf_config"]))
        graph = capture(d, weights_free=True)
    ctx = PassContext(target="cuda", cpu_target=comp["cpu_target"], quant=comp["quant"],
                      gpu_memory_bytes=parse_size(comp["gpu_memory"]),
                      options={"calibration": {k: v.tolist() for k, v in counts.items()}})
    return PassManager(DEFAULT_PIPELINE).run(graph, ctx)


def build_model(plan: Path, graph, weights: dict):
    """A GpuModel of `graph` with the kernels of `plan` (which must name the same CPU kernels)."""
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.cpu_experts import CpuExpertKernels
    from ktc.runtime.gpu.kernels import load_kernels
    from ktc.runtime.gpu.model import GpuModel

    m = read_manifest(plan)
    cpu = CpuExpertKernels.load(plan / m.cpu["dir"], m.cpu)
    return GpuModel(graph, weights, load_kernels(plan / m.gpu["dir"] / "src"), max_batch_size=1,
                    max_context=CONTEXT + PREFILL + 80, cpu_kernels=cpu)


def _shares(counts: dict[int, torch.Tensor]) -> torch.Tensor:
    rows = [counts[k].double() for k in sorted(counts)]
    return torch.stack([r / r.sum() for r in rows])


def run_variant(name: str, plan: Path, results: dict, skewed: bool = False, calibrated: bool = False) -> None:
    from ktc.pack import random_weights
    from ktc.runtime.artifact import read_manifest

    graph = read_manifest(plan).graph
    if calibrated:
        graph = replan(plan, results["_skewed_counts"])
    t = time.perf_counter()
    weights = random_weights(graph, device="cuda", seed=0)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    model = build_model(plan, graph, weights) if calibrated else _load(plan, weights)
    load_s = time.perf_counter() - t
    prompt = torch.randint(0, model.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(11))
    diversify(model)
    counts = skew_routing(model, prompt) if skewed else measure_routing(model, prompt)
    if skewed and not calibrated:
        results["_skewed_counts"] = counts
    shares = _shares(counts)
    top = shares.sort(-1, descending=True).values
    roof = roofline(graph, weights, shares)
    dec = measure_decode(model)
    pre = measure_prefill(model)
    direct = direct_kernel_ms(model, graph, shares)
    threads = direct_kernel_threads(model, graph, shares)
    bound = max(roof["cpu_ms"], roof["gpu_ms"])
    r = {"plan": plan.name, "skewed_router": skewed, "calibrated_placement": calibrated,
         "placement": graph.config.get("placement", {}),
         "routing_top25pct_share": float(top[:, : top.shape[1] // 4].sum(-1).mean()),
         "gpu_share_of_routed_slots": gpu_share(graph, shares), "roofline": roof,
         "roofline_step_ms": bound, "decode": dec, "decode_vs_roofline": bound / dec["ms"], "prefill": pre,
         "direct_kernel_ms_per_layer": direct, "direct_kernel_ms_by_threads": threads,
         "cpu_gbps_direct": roof["cpu_bytes"] / len(model.executor.offloads) / (direct * 1e-3) / 1e9,
         "random_weights_s": gen_s, "load_s": load_s}
    lay = dec["layers"]
    if lay:
        r["runtime_cpu_ms_per_layer"] = lay["cpu_ms_mean"]
        r["runtime_cpu_vs_direct"] = lay["cpu_ms_mean"] / direct
        r["step_rest_ms"] = dec["ms"] - lay["cpu_ms_sum"] - lay["wait_ms_sum"]
    # the same decode under other runtime settings, interleaved (same-run comparisons): the GPU's share of
    # the CPU experts read over PCIe (now: the cost model's take[n]) off or fixed; each layer's graph launched
    # after its CPU kernel instead of ahead of it (no GPU-side wait on the host's flag); and the runtime of
    # before 2026-11-23 (every CPU call through moe_experts, decode buffers copied by memcpys, no share)
    off0 = model.executor.offloads[0]
    k = off0.top_k
    configs = {"now": {}, "graphs launched after each CPU kernel": {"host_flags": False},
               "graphs launched ahead, waiting on flags": {"host_flags": True},
               "flags, graphs launched after each CPU kernel": {"host_flags": True, "launch_ahead": False}}
    if getattr(off0, "_pcie_weights", None) is not None:
        r["pcie_take_model"] = off0.pcie_take
        configs["no PCIe share"] = {"pcie_take": None}
        configs["PCIe share on the main stream"] = {"pcie_side_stream": False}
        for j, first in ((1, 3), (2, 4), (2, 5), (3, 6)):
            configs[f"PCIe {j} of n>={first}"] = {"pcie_take": fixed_take(k, j, first)}
    configs["before 2026-11-23"] = {"bound_calls": False, "zero_copy": False}
    ab = compare_decode(model, configs)
    r["pcie_share_logits_rel"] = pcie_share_logits(model)
    r["decode_ab"] = ab
    defaults = offload_defaults(model, configs)
    r["cpu_kernel_by_config"] = {}
    for cfg in [c for c in configs if "launched" in c or c == "now"]:
        set_offloads(model, configs[cfg], defaults)
        r["cpu_kernel_by_config"][cfg] = layers = decode_layer_stats(model, steps=32)
        log(f"{name} [{cfg}]: CPU kernel per layer in the runtime {layers.get('cpu_ms_mean', 0):.3f} ms, waits "
            f"{layers.get('wait_ms_mean', 0):.3f} ms")
    set_offloads(model, {}, defaults)
    r["kernel_profile"] = {}
    for cfg in [c for c in ("now", "PCIe 2 of n>=5", "PCIe share on the main stream") if c in configs]:
        try:
            set_offloads(model, configs[cfg], defaults)
            r["kernel_profile"][cfg] = kp = kernel_profile(model)
            log(f"{name} [{cfg}]: GPU kernels a decode step: {kp['launches_per_step']:.0f} launches, busy "
                f"{kp['busy_us_per_step']:.0f} us; a layer from its stage (us): "
                + ", ".join(f"{k} {v:.0f}" for k, v in kp["layer_timeline_us"].items()) + "; "
                + "; ".join(f"{k['name'][:50]} x{k['per_step']:.0f} {k['us_per_step']:.0f} us" for k in kp["kernels"]))
        except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the run's figures
            log(f"{name}: kernel profile failed: {e}")
        finally:
            set_offloads(model, {}, defaults)
    results[name] = r
    log(f"{name}: decode {dec['tok_s']:.1f} tok/s ({dec['ms']:.2f} ms; roofline {bound:.2f} ms = max(CPU "
        f"{roof['cpu_ms']:.2f}, GPU {roof['gpu_ms']:.2f}) -> {bound / dec['ms']:.0%} of it), prefill-2K "
        f"{pre['tok_s']:.0f} tok/s; hottest 25% of experts take {r['routing_top25pct_share']:.0%} of slots, the GPU "
        f"experts {r['gpu_share_of_routed_slots']:.0%}; CPU kernel per layer in the runtime "
        f"{lay.get('cpu_ms_mean', 0):.3f} ms vs called directly {direct:.3f} ms; waits {lay.get('wait_ms_mean', 0):.3f}"
        f" ms, GPU beside {lay.get('gpu_ms_mean', 0) or 0:.3f} ms per layer; direct kernel by threads "
        + ", ".join(f"{n}: {ms:.3f}" for n, ms in threads.items()) + f" ms ({r['cpu_gbps_direct']:.0f} GB/s); "
        "interleaved decode ms: " + ", ".join(f"{k} {v['ms']:.2f} ({v['vs_now']:.3f}x)" for k, v in ab.items())
        + f"; PCIe share {r.get('pcie_take_model')}, its logits vs the CPU's {r['pcie_share_logits_rel']}")
    del model, weights
    gc.collect()
    torch.cuda.empty_cache()


def pcie_share_logits(model, steps: int = 8) -> float | None:
    """Relative distance of `steps` teacher-forced decode steps' logits with the GPU's PCIe share of the CPU
    experts (the offloads' pcie_take) and without it (the CPU kernels run them all); None without a share."""
    offs = model.executor.offloads
    take = offs[0].pcie_take if offs and hasattr(offs[0], "pcie_take") else None
    if take is None:
        return None
    ids = _decode_prompt(model)[:, :256]
    toks = torch.randint(0, model.vocab_size, (steps,), generator=torch.Generator().manual_seed(12)).tolist()
    outs = {}
    try:
        for name, t in (("share", take), ("cpu", None)):
            for off in offs:
                off.pcie_take = t
            model.drop_graphs()
            model.reset()
            model.prefill(ids, reserve=steps + 2)
            outs[name] = torch.cat([model.step(torch.tensor([tok], device=model.device)).float().cpu() for tok in toks])
    finally:
        for off in offs:
            off.pcie_take = take
        model.drop_graphs()
        model.reset()
    return float((outs["share"].double() - outs["cpu"].double()).norm() / outs["cpu"].double().norm())


def fixed_take(top_k: int, j: int, first: int) -> tuple[int, ...]:
    """A CpuExpertsOffload.pcie_take table: the GPU runs j of a token's n CPU experts when n >= first."""
    return tuple(min(j, n) if n >= first else 0 for n in range(top_k + 1))


def offload_defaults(model, configs: dict[str, dict]) -> list[dict]:
    """Each offload's present values of the attributes `configs` set (per layer: some, e.g. host_flags, are
    chosen per node at load)."""
    keys = {k for attrs in configs.values() for k in attrs}
    return [{k: getattr(off, k) for k in keys if hasattr(off, k)} for off in model.executor.offloads]


def set_offloads(model, values: dict, defaults: list[dict]) -> None:
    """Set attributes on every CpuExpertsOffload (its own defaults, then values), then make the shared pinned
    buffers and the graphs again, as at load."""
    offs = model.executor.offloads
    for off, own in zip(offs, defaults, strict=True):
        for k, v in {**own, **values}.items():
            setattr(off, k, v)
    offs[0].pool.clear()
    model.drop_graphs()


def compare_decode(model, configs: dict[str, dict], rounds: int = 6, steps: int = 32) -> dict:
    """Decode ms a step under each configuration (attributes set on every CpuExpertsOffload; its
    buffers and graphs made again, as at load), interleaved: `rounds` rounds, each timing every
    configuration in turn (order reversed every other round), so drift of the machine hits all
    alike. -> name -> {"ms": median of the rounds, "rounds_ms", "vs_now": ms / the first one's}."""
    offs = model.executor.offloads
    names = [n for n, attrs in configs.items() if all(hasattr(offs[0], k) for k in attrs)] if offs else []
    defaults = offload_defaults(model, configs)

    def apply(values: dict) -> None:
        set_offloads(model, values, defaults)

    ids = _decode_prompt(model)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                apply(configs[n])
                times[n].append(1e3 * _timed_decode(model, ids, steps))
    finally:
        if offs:
            apply({})
    out = {n: {"ms": statistics.median(v), "rounds_ms": v} for n, v in times.items()}
    for v in out.values():
        v["vs_now"] = v["ms"] / out[names[0]]["ms"]
    return out


def accelerate_baseline(results: dict, layers: int = 6, steps: int = 4) -> None:
    """transformers + accelerate, device_map from max_memory {GPU: 3 GiB, cpu: rest}, `layers` layers."""
    import transformers as tf
    from accelerate import dispatch_model, infer_auto_device_map

    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    config = tf.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")},
                                     model_type=cfg["model_type"])
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.03, 0.03)
        for n, b in model.named_buffers():
            if "inv_freq" in n:
                d = b.numel()
                b.copy_(1.0 / (cfg["rope_theta"] ** (torch.arange(0, 2 * d, 2).float() / (2 * d))))
    dm = infer_auto_device_map(model, max_memory={0: "3GiB", "cpu": "120GiB"},
                               no_split_module_classes=["Qwen3MoeDecoderLayer"])
    model = dispatch_model(model, device_map=dm)
    on_gpu = sum(1 for v in dm.values() if v == 0)
    ids = torch.randint(0, cfg["vocab_size"], (1, 32), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        out = model(tok, past_key_values=past, use_cache=True)      # warm
        past = out.past_key_values
        _sync()
        t = time.perf_counter()
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=past, use_cache=True)
            past = out.past_key_values
        _sync()
    s = (time.perf_counter() - t) / steps
    results["accelerate"] = {"layers": layers, "modules_on_gpu": on_gpu, "tok_s": 1 / s,
                             "tok_s_scaled_to_48_layers": 1 / s * layers / 48, "step_ms": 1e3 * s}
    log(f"transformers+accelerate ({layers} layers, 3 GiB GPU): {1 / s:.2f} tok/s -> {1 / s * layers / 48:.3f} "
        "tok/s scaled to 48 layers")
    del model
    gc.collect()
    torch.cuda.empty_cache()


class _DictCheckpoint:
    """A checkpoint made up on the GPU: key -> bf16 normal * 0.02, seeded by the key (same key, same tensor)."""

    def __init__(self, graph):
        self.graph = graph

    def load(self, key: str):
        import zlib

        shape = _hf_shape(key, self.graph.config["hf_config"])
        g = torch.Generator(device="cuda").manual_seed(zlib.crc32(key.encode()))
        if "norm" in key:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16).cpu()


def _hf_shape(key: str, cfg: dict) -> tuple[int, ...]:
    h, inter, heads, kv, d = (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_attention_heads"],
                              cfg["num_key_value_heads"], cfg["head_dim"])
    if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
        return (cfg["vocab_size"], h)
    if key.endswith(("gate_proj.weight", "up_proj.weight")):
        return (inter, h)
    if key.endswith("down_proj.weight"):
        return (h, inter)
    if key.endswith("q_proj.weight"):
        return (heads * d, h)
    if key.endswith(("k_proj.weight", "v_proj.weight")):
        return (kv * d, h)
    if key.endswith("o_proj.weight"):
        return (h, heads * d)
    if key.endswith(("q_norm.weight", "k_norm.weight")):
        return (d,)
    if key.endswith("mlp.gate.weight"):
        return (cfg["num_experts"], h)
    if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
        return (h,)
    raise KeyError(key)


def correctness(plans: Path, results: dict, steps: int = 32) -> None:
    from ktc.pack import checkpoint_producer, produce_weights
    from ktc.runtime.artifact import read_manifest

    def weights_for(plan: Path) -> dict:
        graph = read_manifest(plan).graph
        return produce_weights(graph, checkpoint_producer(graph, _DictCheckpoint(graph)))

    ids = torch.randint(0, QWEN3_30B_A3B["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(5))
    got = {}
    for kind in ("hybrid", "gpu"):
        plan = plans / f"q4-none-{kind}.ktc"
        model = _load(plan, weights_for(plan), max_context=256)
        logits = model.prefill(ids, reserve=steps + 1)
        tokens = model.generate(ids, max_new_tokens=steps, eos_token_id=[])[0, ids.shape[1]:].tolist()
        got[kind] = (logits, tokens, read_manifest(plan).graph.config.get("placement", {}))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    (a, ta, plan_h), (b, tb, _) = got["hybrid"], got["gpu"]
    err = float((a.double() - b.double()).norm() / b.double().norm())
    same = sum(x == y for x, y in zip(ta, tb, strict=True))
    results["correctness"] = {"layers": 4, "quant": "none", "cpu_experts": plan_h.get("cpu_experts"),
                              "gpu_experts": plan_h.get("gpu_experts"), "prefill_logits_rel_err": err,
                              "greedy_tokens_equal": same, "greedy_tokens": steps}
    log(f"correctness (4 real-shape layers, --quant none, {plan_h.get('cpu_experts')} experts on the CPU): "
        f"hybrid vs all-GPU logits rel err {err:.2e}; greedy tokens equal {same}/{steps}")


def cmd_run(args) -> None:
    plans = Path(args.plans)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
                     "torch": torch.__version__, "threads": os.environ.get("KTC_NUM_THREADS"),
                     "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                  if ln.startswith("model name")), "?")}

    def save():
        (out / "hetero.json").write_text(json.dumps(results, indent=1, default=str))

    steps = [("correctness", lambda: correctness(plans, results))] if "correctness" in args.only else []
    variants = (("int8-uniform", "q30-int8", False, False), ("int4-uniform", "q30-int4", False, False),
                ("int8-skewed-uniform-placement", "q30-int8", True, False),
                ("int8-skewed-calibrated-placement", "q30-int8", True, True),
                ("dsv2lite-int8-uniform", "dsv2lite-int8", False, False),
                ("int8-dense-int4-uniform", "q30-int8-dense4", False, False))
    for name, plan, skewed, calibrated in variants:
        if name in args.only or "all" in args.only:
            steps.append((name, lambda n=name, p=plan, s=skewed, c=calibrated:
                          run_variant(n, plans / f"{p}.ktc", results, s, c)))
    if "accelerate" in args.only or "all" in args.only:
        steps.append(("accelerate", lambda: accelerate_baseline(results)))
    for name, fn in steps:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the other measurements
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        save()
    if "accelerate" in results and "int8-uniform" in results and "tok_s" in results["int8-uniform"].get("decode", {}):
        acc = results["accelerate"].get("tok_s_scaled_to_48_layers")
        if acc:
            results["ktc_vs_accelerate"] = results["int8-uniform"]["decode"]["tok_s"] / acc
            log(f"ktc int8 decode vs transformers+accelerate (scaled): {results['ktc_vs_accelerate']:.0f}x")
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--out", default=".carry/hetero")
    p.add_argument("--cpu-target", default="x86-amx")
    p.add_argument("--gpu-memory", default="24GiB")
    p.add_argument("--only", nargs="*", default=None, help="plans to compile (default: all)")
    r = sub.add_parser("run")
    r.add_argument("--plans", default=".carry/hetero")
    r.add_argument("--out", default="bench/out")
    r.add_argument("--only", nargs="+", default=["all", "correctness"])
    a = ap.parse_args()
    cmd_plan(a) if a.cmd == "plan" else cmd_run(a)


if __name__ == "__main__":
    main()
