"""Is a short prefill bound by the host launching kernels? (GPU machine; a --target cuda plan.)

    python3 bench/gpu_prefill_host.py PLAN [--tokens 32 256 2048]

For each prompt length: the wall time of an eager prefill (model.cuda_graphs off; synchronised, min
and median of 7), the GPU time of the kernels it launched (CUPTI, via torch.profiler: the sum of
kernel durations, and the span from the first kernel's start to the last one's end), and the number
of launches. A wall time far above the kernels' sum means the GPU waited for the host between
kernels. Then the same prefill as the model runs it by default (CUDA graphs on: a prompt of up to
PREFILL_GRAPH_TOKENS padded tokens replays one graph), interleaved with the eager one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ktc.pack import random_weights
from ktc.runtime.artifact import read_manifest
from ktc.runtime.loader import load_artifact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    m = read_manifest(a.plan)
    model = load_artifact(a.plan, weights=random_weights(m.graph, device="cuda"), max_batch_size=1,
                          max_context=max(a.tokens) + 16)
    ids = torch.randint(0, 1000, (1, max(a.tokens)))
    rows = []
    model._prefill(ids)                          # the cache at its largest first: later prompts keep it

    def wall(x: torch.Tensor) -> float:
        torch.cuda.synchronize()
        s = time.perf_counter()
        model._prefill(x)
        torch.cuda.synchronize()
        return time.perf_counter() - s

    for t in a.tokens:
        x = ids[:, :t]
        walls, graphed = [], []
        for graphs in (False, True, False, True):   # warm-up: kernels compiled, the graph captured
            model.cuda_graphs = graphs
            model._prefill(x)
        for _ in range(7):
            model.cuda_graphs = False
            walls.append(wall(x))
            model.cuda_graphs = True
            graphed.append(wall(x))
        model.cuda_graphs = False
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model._prefill(x)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith("Memcpy") and not e.name.startswith("Memset")]
        busy = sum(e.device_time for e in kernels) / 1e3
        span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
        row = {"tokens": t, "wall_ms_min": min(walls) * 1e3, "wall_ms_median": statistics.median(walls) * 1e3,
               "kernels": len(kernels), "gpu_busy_ms": busy, "gpu_span_ms": span,
               "graph_ms_min": min(graphed) * 1e3, "graph_ms_median": statistics.median(graphed) * 1e3,
               "graph": any(k[1] >= t for k in model._prefill_graphs)}
        rows.append(row)
        print(f"prefill {t:5d} tokens: eager wall {row['wall_ms_min']:7.2f} ms (median {row['wall_ms_median']:7.2f}), "
              f"{len(kernels)} kernels, GPU busy {busy:7.2f} ms over a {span:7.2f} ms span "
              f"({busy / row['wall_ms_min']:.0%} of the wall time), host per launch "
              f"{row['wall_ms_min'] * 1e3 / len(kernels):.1f} us; default (graphs on"
              f"{'' if row['graph'] else ', none used'}) {row['graph_ms_min']:7.2f} ms "
              f"(median {row['graph_ms_median']:7.2f}): {row['wall_ms_min'] / row['graph_ms_min']:.2f}x", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "plan": a.plan, "argv": sys.argv, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
