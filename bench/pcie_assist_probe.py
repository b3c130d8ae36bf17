"""Can the GPU take some of a decode step's CPU experts, reading their weights over PCIe? (issue 5)

A batch-1 decode step of a heterogeneous plan spends most of each MoE layer in the CPU kernel, which
reads its active experts' weights at the host's ~100 GB/s. The packed CPU weights are pinned (the
prefill streaming path needs that), so the GPU can read them too, straight from host memory through
a CUDA alias of the pinned pages (~55 GB/s of PCIe, a second path to the same DRAM). This probe
measures, on one plan's real layers (random weights in the artifact's layout, rotating over the
layers so no layer's weights sit in a cache), per call:

  cpu(n)          the layer's CPU kernel (bound call) with n active experts, the rest skipped
  gpu(j)          the GPU's kernels on j of the layer's CPU experts, weights read over PCIe
                  (moe_decode_cpu_layout, the runtime's; one CUDA graph per layer, replayed)
  both(j)         gpu(j) launched, then cpu(n - j) on this thread, until both are done: the
                  split a runtime would make, against cpu(n) alone

    KTC_SITE=$PWD/.carry/site-h TESTS=0 BENCH=0 bash bench/run_gpu.sh        # on the GPU machine
    PYTHONPATH=/tmp/kp:$PWD:$PWD/.carry/site-h python3 bench/pcie_assist_probe.py .carry/hetero7/q30-int8.ktc
    ... pcie_assist_probe.py PLAN 96 --sweep      # also: the share's GEMV blocks against its PCIe read speed
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def alias(t: torch.Tensor) -> torch.Tensor:
    from ktc.runtime.gpu.offload import device_alias  # the runtime's own aliasing of its pinned weights

    a = device_alias(t)
    if a is None:
        raise SystemExit("this torch / driver cannot alias pinned memory as a CUDA tensor")
    return a


def main() -> None:
    from hetero import _load

    from ktc.pack import random_weights
    from ktc.runtime.artifact import read_manifest

    plan = Path(sys.argv[1])
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    graph = read_manifest(plan).graph
    weights = random_weights(graph, device="cuda", seed=0)
    model = _load(plan, weights)
    offs = model.executor.offloads
    moe = offs[0].gpu_kernels.moe
    off0 = offs[0]
    k = off0.top_k
    e_local = int(off0.node.attrs["num_experts"])
    e_global = int(off0.node.attrs.get("num_global_experts", e_local))
    inter = int(off0.node.attrs["intermediate_size"])
    hidden = off0.hidden
    n_active = round(k * e_local / e_global)
    pinned = all(off.packed[p].is_pinned() for off in offs for p in ("gate_up.q", "down.q"))
    print(f"{plan.name}: {len(offs)} CPU layers, {e_local}/{e_global} experts on the CPU, top-{k} -> "
          f"~{n_active} CPU experts a token; packed weights pinned: {pinned}; "
          + ", ".join(f"{p} {tuple(off0.packed[p].shape)} {off0.packed[p].dtype}" for p in off0.packed), flush=True)
    if not pinned:
        raise SystemExit("the packed CPU weights are not pinned: nothing to read over PCIe")

    def run_gpu():
        """The runtime's decode kernels on the packed layout (moe_decode_cpu_layout: slots -1 read nothing),
        or, in plans from before them, the grouped GEMM that long prefills stream these experts through."""
        if hasattr(moe, "moe_decode_cpu_layout"):
            return lambda x, tw, ids, w: moe.moe_decode_cpu_layout(x, tw, ids, w, inter)
        return lambda x, tw, ids, w: moe.fused_moe(x, tw, ids, w, e_local, inter, partial=True)

    print("GPU side:", "moe_decode_cpu_layout" if hasattr(moe, "moe_decode_cpu_layout") else "fused_moe (grouped)")
    g = torch.Generator().manual_seed(5)
    x_host = torch.randn(1, hidden, generator=g)
    per = []
    for off in offs:
        aliases = {p: alias(off.packed[p]) for p in ("gate_up.q", "gate_up.scales", "down.q", "down.scales")}
        xb, tw, ids, yb = (x_host.clone(), torch.full((1, k), 1.0 / k), torch.full((1, k), -1, dtype=torch.int32),
                           torch.empty(1, hidden))
        call = off.kernels.bind(off.kernel, xb, tw, ids, off.packed, yb)
        gx = x_host.to("cuda", torch.bfloat16)
        gtw = torch.full((1, k), 1.0 / k, device="cuda")
        gids = torch.full((1, k), -1, dtype=torch.int32, device="cuda")
        run_gpu()(gx, gtw, gids, aliases)   # compile
        torch.cuda.synchronize()
        graph_ = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_):
            gy = run_gpu()(gx, gtw, gids, aliases)
        # the graph reads gx, gtw and gids where they were at capture: they must stay alive with it
        per.append({"call": call, "ids": ids, "gids": gids, "graph": graph_, "gy": gy, "aliases": aliases,
                    "off": off, "gx": gx, "gtw": gtw})
    # correctness of the PCIe path against the CPU kernel on the same experts
    p = per[0]
    chosen = torch.randperm(e_local, generator=g)[:2].to(torch.int32)
    p["ids"].fill_(-1)
    p["ids"][0, :2] = chosen
    yb_ref = torch.empty(1, hidden)
    p["off"].kernels.moe_experts(p["off"].kernel, x_host, torch.full((1, k), 1.0 / k), p["ids"], p["off"].packed,
                                 out=yb_ref)
    p["gids"].copy_(p["ids"])
    p["graph"].replay()
    torch.cuda.synchronize()
    gy = p["gy"].double().cpu()
    err = float((gy - yb_ref.double()).norm() / yb_ref.double().norm())
    print(f"PCIe path vs CPU kernel on the same 2 experts: rel diff {err:.2e} (norms {float(gy.norm()):.3e} GPU, "
          f"{float(yb_ref.double().norm()):.3e} CPU; finite {bool(gy.isfinite().all())} / "
          f"{bool(yb_ref.isfinite().all())})", flush=True)

    def draw(n_cpu: int, j: int, p: dict) -> None:
        pick = torch.randperm(e_local, generator=g)[: n_cpu + j].to(torch.int32)
        p["ids"].fill_(-1)
        p["ids"][0, :n_cpu] = pick[:n_cpu]
        gi = torch.full((1, k), -1, dtype=torch.int32)
        gi[0, :j] = pick[n_cpu:]
        p["gids"].copy_(gi)

    results = {}
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for j in range(0, min(4, n_active) + 1):
        n_cpu = n_active - j
        cpu_t, gpu_t, both_t, cpu_in_both = [], [], [], []
        for i in range(calls):
            p = per[i % len(per)]
            draw(n_cpu, j, p)
            torch.cuda.synchronize()
            # cpu alone
            t0 = time.perf_counter()
            p["call"]()
            cpu_t.append(time.perf_counter() - t0)
            # gpu alone (another layer's weights, so neither run finds the other's in a cache)
            q = per[(i + len(per) // 2) % len(per)]
            draw(n_cpu, j, q)
            torch.cuda.synchronize()
            if j:
                ev[0].record()
                q["graph"].replay()
                ev[1].record()
                torch.cuda.synchronize()
                gpu_t.append(ev[0].elapsed_time(ev[1]) * 1e-3)
            # both
            r = per[(i + len(per) // 4) % len(per)]
            draw(n_cpu, j, r)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if j:
                r["graph"].replay()
            t1 = time.perf_counter()
            r["call"]()
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            both_t.append(t3 - t0)
            cpu_in_both.append(t2 - t1)

        def med(v, warm=calls // 8):
            return 1e3 * statistics.median(v[warm:]) if v else 0.0

        results[j] = {"cpu_experts": n_cpu, "gpu_experts": j, "cpu_ms": med(cpu_t), "gpu_ms": med(gpu_t),
                      "both_ms": med(both_t), "cpu_in_both_ms": med(cpu_in_both)}
    base = results[0]["cpu_ms"]
    per_expert_bytes = sum(per[0]["off"].packed[p_][0].numel() * per[0]["off"].packed[p_].element_size()
                           for p_ in ("gate_up.q", "gate_up.scales", "down.q", "down.scales"))
    print(f"one expert: {per_expert_bytes / 1e6:.2f} MB", flush=True)
    print(f"{'split cpu+gpu':>14s} {'cpu alone':>10s} {'gpu alone':>10s} {'GB/s pcie':>10s} {'both':>8s} "
          f"{'cpu in both':>12s} {'vs all-cpu':>10s}")
    for j, r in results.items():
        gbps = j * per_expert_bytes / (r["gpu_ms"] * 1e-3) / 1e9 if j else 0.0
        r["pcie_gbps"] = gbps
        r["vs_all_cpu"] = r["both_ms"] / base
        print(f"{r['cpu_experts']:>7d}+{j:<6d} {r['cpu_ms']:10.3f} {r['gpu_ms']:10.3f} {gbps:10.1f} "
              f"{r['both_ms']:8.3f} {r['cpu_in_both_ms']:12.3f} {r['vs_all_cpu']:10.3f}")
    out = {"plan": plan.name, "pcie_vs_cpu_rel": err, "expert_bytes": per_expert_bytes, "rows": results}
    if "--sweep" in sys.argv and hasattr(moe, "cpu_layout_gemv_config"):
        out["sweep"] = sweep(per, moe, inter, n_active, per_expert_bytes, draw, calls)
    print(json.dumps(out))


def sweep(per: list[dict], moe, inter: int, n_active: int, expert_bytes: int, draw, calls: int) -> list[dict]:
    """The GPU side's blocks (rows a program of the up / down GEMVs, warps) against its PCIe read speed: gpu(j)
    alone for j = 1, 2 under each config, then both(j) for the fastest few (the CPU kernel beside them)."""
    layers = per[:16]
    grid = [{"GEMV_N_UP": nu, "GEMV_N_DOWN": nd, "gemv_warps": w}
            for nu in (2, 4, 8, 16) for nd in (2, 4, 8, 16) for w in (2, 4, 8)]
    rows = []
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def graphs(cfg):
        out = []
        for p in layers:
            moe.moe_decode_cpu_layout(p["gx"], p["gtw"], p["gids"], p["aliases"], inter, config=cfg)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                moe.moe_decode_cpu_layout(p["gx"], p["gtw"], p["gids"], p["aliases"], inter, config=cfg)
            out.append(g)
        return out

    def median_ms(gs, j, with_cpu, n=48):
        """gpu(j) alone (CUDA events around the graph), or both(j): the graph, then the CPU kernel on this thread,
        until both are done (wall time)."""
        ts = []
        for i in range(n):
            k = i % len(layers)
            draw(n_active - j, j, layers[k])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ev[0].record()
            gs[k].replay()
            ev[1].record()
            if with_cpu:
                layers[k]["call"]()
            torch.cuda.synchronize()
            ts.append(1e3 * (time.perf_counter() - t0) if with_cpu else ev[0].elapsed_time(ev[1]))
        return statistics.median(ts[n // 8:])

    for cfg in grid:
        gs = graphs(cfg)
        r = {**cfg, "gpu1_ms": median_ms(gs, 1, False), "gpu2_ms": median_ms(gs, 2, False)}
        r["gbps2"] = 2 * expert_bytes / (r["gpu2_ms"] * 1e-3) / 1e9
        rows.append(r)
        print(f"sweep {cfg}: gpu(1) {r['gpu1_ms']:.3f} ms, gpu(2) {r['gpu2_ms']:.3f} ms ({r['gbps2']:.1f} GB/s)",
              flush=True)
    default = {k: v for k, v in moe.cpu_layout_gemv_config(layers[0]["gx"].shape[1], inter).items() if k in grid[0]}
    best = sorted(rows, key=lambda r: r["gpu2_ms"])[:4]
    for r in [r for r in rows if all(r[k] == v for k, v in default.items())] + best:
        gs = graphs({k: r[k] for k in grid[0]})
        r["both1_ms"], r["both2_ms"] = median_ms(gs, 1, True), median_ms(gs, 2, True)
        print(f"both {({k: r[k] for k in grid[0]})}: {n_active - 1}+1 {r['both1_ms']:.3f} ms, "
              f"{n_active - 2}+2 {r['both2_ms']:.3f} ms", flush=True)
    return rows


if __name__ == "__main__":
    main()
