"""Where a decode step's GPU time goes, and what a decode-kernel choice does to the whole step.

    python bench/gpu_profile.py [--layers 16] [--context 1024] [--variants compiled swept] [--out DIR]
    python bench/gpu_profile.py --model deepseek-v2-lite --variants compiled     (MLA: per-kernel table only)

The model is bench/gpu_decode.py's (Qwen3-30B-A3B dims, transformers' random bf16 init on the GPU,
ktc running on the same tensors, everything on the GPU), or with --model deepseek-v2-lite that shape
(MLA, 2 shared + 64 routed experts; bench/hetero.py's config) on ktc.pack.random_weights made on the
GPU. For each variant (VARIANTS: the compiled decode configs, or those winning this run's in-graph
sweep) the script re-captures the decode graph and measures, after a `--context`-token prompt:
  - the CUDA-graph step (median of 7 blocks of `--steps` replays, CUDA events), interleaving the
    variants round by round so that clock drift hits all of them alike;
  - the GPU time of every kernel in one step (torch.profiler / CUPTI over `--steps` eager steps:
    a kernel's time on the GPU does not depend on how it was launched), grouped by kernel name,
    per layer where a kernel runs once a layer.
The sum of kernel times against the graph step is the time the GPU is idle between kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import (
    DEV,
    QWEN3_30B_A3B,
    compiled_graph,
    cuda_time,
    graph_ms,
    hf_model,
    ktc_model,
    log,
    shared_weights,  # noqa: E402
)

VARIANTS = {
    "compiled": "the configs the compiler chose (the shipped defaults)",
    "swept": "the decode configs that won this run's in-graph sweep (qkv, o, lm_head, MoE, router)",
}


def graph_us(fns) -> float:
    """gpu_decode.graph_ms in us, over 200 ms of replays."""
    return graph_ms(fns, rep=200) * 1e3


def sweep(k, res: dict) -> dict:
    """Time decode configs of the step's big launches in a graph; -> {launch: best config}."""
    bf = torch.bfloat16
    h, inter, e, top_k, vocab = 2048, 768, 128, 8, 151936
    rows, best = [], {}

    def run(name, configs, make_fns, nbytes):
        scores = []
        for cfg in configs:
            try:
                us = graph_us(make_fns(cfg))
            except Exception as ex:      # a config the device cannot run (resources) is skipped
                log(f"  {name} {cfg}: {type(ex).__name__}: {str(ex)[:120]}")
                continue
            scores.append((us, cfg))
            rows.append({"launch": name, "config": cfg, "us": us, "GB/s": nbytes / us / 1e3})
        scores.sort(key=lambda x: x[0])
        first = [us for us, c in scores if c == configs[0]]
        if not scores or not first:
            raise RuntimeError(f"{name}: the default config did not run")
        log(f"{name}: default {first[0]:.2f} us ({nbytes / first[0] / 1e3:.0f} GB/s), best {scores[0][0]:.2f} us "
            f"({nbytes / scores[0][0] / 1e3:.0f} GB/s) {scores[0][1]}; next {[round(u, 2) for u, _ in scores[1:4]]}")
        best[name] = scores[0][1]
        return scores

    for name, n, kk in (("qkv", 5120, h), ("o", h, 4096), ("lm_head", vocab, h)):
        sets = 1 if name == "lm_head" else 4
        ws = [torch.randn(n, kk, dtype=bf, device=DEV) * 0.02 for _ in range(sets)]
        xs = [torch.randn(1, kk, dtype=bf, device=DEV) for _ in range(8)]
        outs = [torch.empty(1, n, dtype=bf, device=DEV) for _ in range(8)]
        configs = [k.matmul.tile_config(1, n, kk)] + [c for c in k.matmul.candidate_configs(1, n, kk) if c.get("GEMV")]

        def fns(cfg, ws=ws, xs=xs, outs=outs):
            return [lambda i=i: k.matmul.linear(xs[i], ws[i % len(ws)], None, cfg, out=outs[i]) for i in range(8)]
        run(name, configs, fns, n * kk * 2)
        ws = None

    w_up = torch.randn(e, 2 * inter, h, dtype=bf, device=DEV) * 0.02
    w_dn = torch.randn(e, h, inter, dtype=bf, device=DEV) * 0.02
    dense = {"gate_up": w_up, "down": w_dn}
    sets = [(torch.randn(1, h, dtype=bf, device=DEV), torch.rand(1, top_k, device=DEV),
             torch.randperm(e, device=DEV)[:top_k].to(torch.int32)[None]) for _ in range(16)]
    base = {**k.moe.default_config(top_k, h, inter), **k.moe.gemv_config(h, inter)}

    def moe_fns(cfg):
        full = {**base, **cfg}
        return [lambda x=x, tw=tw, ids=ids: k.moe.fused_moe(x, tw, ids, dense, e, inter, full) for x, tw, ids in sets]
    downs = [{}] + [{"GEMV_N_DOWN": n, "GEMV_K_DOWN": kk, "gemv_warps": wp} for n in (4, 8, 16, 32)
                    for kk in (128, 256, 512, 1024) for wp in (4, 8) if n * kk <= 8192 * wp // 4]
    run("moe down (mixed up)", downs, moe_fns, top_k * 3 * inter * h * 2)
    down = best["moe down (mixed up)"]
    ups = [dict(down)] + [{**down, "DECODE": "gemv", "GEMV_N_UP": n, "GEMV_K_UP": kk}
                          for n in (4, 8, 16, 32) for kk in (256, 512, 1024, 2048)
                          if n * kk <= 8192 * down.get("gemv_warps", base["gemv_warps"]) // 4]
    run("moe", ups, moe_fns, top_k * 3 * inter * h * 2)
    dense = w_up = w_dn = None

    gate = torch.randn(e, h, dtype=bf, device=DEV) * 0.02
    rattrs = {"scoring": "softmax", "topk_method": "greedy", "top_k": top_k, "norm_topk_prob": True}
    xs = [torch.randn(1, h, dtype=bf, device=DEV) for _ in range(32)]
    routers = [k.router.fused_config(e, h)] + [{"ROWS": r, "BLOCK_H": bh, "num_warps": wp} for r in (1, 2, 4, 8)
                                               for bh in (512, 1024, 2048) for wp in (1, 2, 4, 8)]

    def router_fns(cfg):
        return [lambda x=x: k.router.router_fused(x, gate, rattrs, None, cfg) for x in xs]
    run("router", routers, router_fns, e * h * 2)
    res["sweep"] = rows
    res["sweep_best"] = best
    torch.cuda.empty_cache()
    return best


def rows_sweep(rows_list: list[int], res: dict) -> None:
    """The default gemv config against the tensor-core tile config (the choice matmul.default_config
    makes at GEMV_ROWS) for the qkv / o projections at a few decode rows, in a graph."""
    from ktc.codegen.gpu import SOURCE_DIR
    from ktc.runtime.gpu.kernels import load_kernels

    k = load_kernels(SOURCE_DIR)
    bf = torch.bfloat16
    out = []
    for name, n, kk in (("qkv", 5120, 2048), ("o", 2048, 4096)):
        ws = [torch.randn(n, kk, dtype=bf, device=DEV) * 0.02 for _ in range(4)]
        for m in rows_list:
            xs = [torch.randn(m, kk, dtype=bf, device=DEV) for _ in range(8)]
            outs = [torch.empty(m, n, dtype=bf, device=DEV) for _ in range(8)]
            row = {"launch": name, "rows": m}
            for label, cfg in (("tile", k.matmul.tile_config(m, n, kk)), ("gemv", k.matmul.gemv_config(m, n, kk))):
                row[label] = graph_us([lambda x=xs[i], w=ws[i % 4], o=outs[i], cfg=cfg: k.matmul.linear(
                    x, w, None, cfg, out=o) for i in range(8)])
            out.append(row)
            log(f"{name} rows={m}: tile {row['tile']:.2f} us, gemv {row['gemv']:.2f} us "
                f"(gemv/tile {row['gemv'] / row['tile']:.2f})")
    res["rows_sweep"] = out


def apply(graph, variant: str, compiled: dict, best: dict) -> None:
    """Set every node's decode configs to the compiled ones, or to the sweep's winners."""
    for node in graph.nodes:
        if node.name not in compiled:
            continue
        node.attrs["gpu_config"]["decode"] = dict(compiled[node.name])
        if variant != "swept":
            continue
        dec = node.attrs["gpu_config"]["decode"]
        if node.op == "attention":
            dec["qkv"], dec["o"] = best["qkv"], best["o"]
        elif node.op == "linear" and node.name == "lm_head":
            dec["linear"] = best["lm_head"]
        elif node.op == "moe_experts":
            dec["moe"] = {**dec["moe"], **best["moe"]}
        elif node.op == "router":
            dec["fused"] = best["router"]


def kernel_times(step, steps: int) -> dict[str, dict]:
    """name -> {"calls": per step, "us": GPU us per step} over `steps` calls of `step`."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out: dict[str, dict] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if not t or getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        out[ev.key] = {"calls": ev.count / steps, "us": t / steps}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("qwen3-30b-a3b", "deepseek-v2-lite"), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--rows-sweep", type=int, nargs="*", default=None,
                   help="only compare the gemv and tile linears at these decode row counts")
    args = p.parse_args()
    if args.rows_sweep:
        res: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name()}
        rows_sweep(args.rows_sweep, res)
        (Path(args.out) / "gpu_rows_sweep.json").write_text(json.dumps(res, indent=1))
        return

    t0 = time.perf_counter()
    if args.model == "deepseek-v2-lite":
        from hetero import DEEPSEEK_V2_LITE

        from ktc.pack import random_weights

        cfg = dict(DEEPSEEK_V2_LITE, num_hidden_layers=args.layers)
        graph = compiled_graph(cfg)
        m = ktc_model(graph, random_weights(graph, device=DEV))
        if "swept" in args.variants:
            raise SystemExit("the sweep is of the Qwen3-30B-A3B shape's launches: use --variants compiled")
    else:
        cfg = dict(QWEN3_30B_A3B, num_hidden_layers=args.layers)
        graph = compiled_graph(cfg)
        m = ktc_model(graph, shared_weights(graph, hf_model(cfg, seed=2)))
    k = m.executor.kernels
    g = m.executor.graph
    compiled = {n.name: dict(n.attrs["gpu_config"]["decode"]) for n in g.nodes if "gpu_config" in n.attrs}
    log(f"built {args.layers}-layer model in {time.perf_counter() - t0:.0f}s")
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.context))
    res: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "model": args.model,
                 "layers": args.layers,
                 "context": args.context, "command": " ".join(sys.argv), "variants": {}}
    out = Path(args.out) / f"gpu_profile_{args.model}.json"
    best = sweep(k, res) if "swept" in args.variants else {}
    out.write_text(json.dumps(res, indent=1))
    reserve = args.steps * (args.rounds + 4) * 2 + 16

    def fresh(variant: str):
        apply(g, variant, compiled, best)
        m.reset()
        tok = m._prefill(prompt, reserve=reserve).argmax(-1)
        state = {"tok": tok}

        def step():
            state["tok"] = m.step(state["tok"]).argmax(-1)

        step()
        step()      # captured now
        return step

    with torch.no_grad():
        # logits of one step per variant on the same prefix: the variants must compute the same function
        first = {}
        for v in args.variants:
            apply(g, v, compiled, best)
            m.reset()
            m._prefill(prompt, reserve=4)
            first[v] = m.step(torch.tensor([7], device=DEV)).float().clone()
        for v in args.variants:
            d = float((first[v] - first[args.variants[0]]).norm() / first[args.variants[0]].norm())
            res["variants"].setdefault(v, {})["logits_vs_first_variant"] = d
            log(f"{v}: step logits vs {args.variants[0]}: {d:.2e}")
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        for _ in range(args.rounds):
            for v in args.variants:
                step = fresh(v)
                times[v].append(cuda_time(step, args.steps) * 1e3)
        for v in args.variants:
            r = res["variants"][v]
            r["graph_step_ms"] = statistics.median(times[v])
            r["graph_step_ms_rounds"] = times[v]
            step = fresh(v)
            m.cuda_graphs = False
            r["eager_step_ms"] = cuda_time(step, args.steps) * 1e3
            r["kernels"] = kernel_times(step, args.steps)
            m.cuda_graphs = True
            out.write_text(json.dumps(res, indent=1))

    layers = args.layers
    for v in args.variants:
        r = res["variants"][v]
        ks = sorted(r["kernels"].items(), key=lambda kv: -kv[1]["us"])
        total = sum(x["us"] for _, x in ks)
        log(f"\n## {v} ({VARIANTS[v]}): graph step {r['graph_step_ms']:.3f} ms "
            f"(rounds {' '.join(f'{x:.3f}' for x in r['graph_step_ms_rounds'])}), eager {r['eager_step_ms']:.2f} ms, "
            f"kernels {total / 1e3:.3f} ms -> GPU idle in the graph step {r['graph_step_ms'] - total / 1e3:.3f} ms")
        log("| kernel | calls/step | us/step | us/call | us/layer |")
        log("| --- | --- | --- | --- | --- |")
        for name, x in ks[:24]:
            per_call = x["us"] / x["calls"] if x["calls"] else 0
            log(f"| {name[:60]} | {x['calls']:.1f} | {x['us']:.1f} | {per_call:.2f} | {x['us'] / layers:.2f} |")
    base = res["variants"][args.variants[0]]["graph_step_ms"]
    log("\n| variant | graph step ms | vs " + args.variants[0] + " |")
    log("| --- | --- | --- |")
    for v in args.variants:
        ms = res["variants"][v]["graph_step_ms"]
        log(f"| {v} | {ms:.3f} | {ms / base:.3f} |")
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
