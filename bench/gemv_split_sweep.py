"""Could a different decode GEMV make the qkv / o projections faster? An in-graph sweep (H100 or H200).

    KTC_SITE=$PWD/.carry/site-h TESTS=0 BENCH=0 bash bench/run_gpu.sh
    cd /tmp && PYTHONPATH=/tmp/kp OUT=DIR python3 REPO/bench/gemv_split_sweep.py

A prototype GEMV (the shipped matmul.gemv_kernel's loop, plus split-K: SPLIT programs per weight-row block
each take a K range, write float32 partials, and the last to arrive sums them) is timed at batch 1 on the
Qwen3-30B-A3B qkv (5120 x 2048) and o (2048 x 4096) shapes over rows per program, K step, warps, stages
and SPLIT, 8 calls a CUDA graph on 4 rotating weight sets (84 / 67 MB: no L2 reuse), against the shipped
kernel with its default config. Writes gemv_sweep.json to $OUT. Result (2026-11-23, H100): the best
config is 3-4% faster than the shipped one, split-K 20-30% slower (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import statistics

import torch
import triton
import triton.language as tl

DEV = torch.device("cuda")


@triton.jit
def gemv_split_kernel(a_ptr, w_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    w_rows = tl.where(nmask, offs_n, 0).to(tl.int64)
    offs_m = tl.arange(0, ROWS)
    a_rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_per = tl.cdiv(K, SPLIT)
    k_lo = pid_k * k_per
    for k0 in range(k_lo, k_lo + k_per, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        w = tl.load(w_ptr + w_rows[:, None] * stride_wn + kk[None, :], mask=kmask[None, :], other=0.0)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + kk[None, :], mask=kmask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    omask = (offs_m[:, None] < M) & nmask[None, :]
    if SPLIT == 1:
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=omask)
    else:
        ws = ws_ptr + (pid_k * ROWS + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(ws, acc, mask=omask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            tl.store(cnt_ptr + pid_n, 0)
            tot = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                tot += tl.load(ws_ptr + (s * ROWS + offs_m[:, None]) * N + offs_n[None, :], mask=omask, other=0.0,
                               volatile=True)
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], tot.to(c_ptr.dtype.element_ty),
                     mask=omask)


def run(x, w, out, cfg, ws, cnt):
    m, k = x.shape
    n = w.shape[0]
    rows = max(1, triton.next_power_of_2(m))
    grid = (triton.cdiv(n, cfg["BN"]), cfg["S"])
    gemv_split_kernel[grid](x, w, out, ws, cnt, m, n, k, x.stride(0), w.stride(0), out.stride(0), ROWS=rows,
                            BLOCK_N=cfg["BN"], BLOCK_K=cfg["BK"], SPLIT=cfg["S"], num_warps=cfg["W"],
                            num_stages=cfg["ST"])


def graph_us(fns, rep_ms=60):
    """us a call: `fns` captured in one CUDA graph, replayed for ~rep_ms, median of 3 blocks."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    reps = max(3, int(rep_ms / max(e0.elapsed_time(e1), 1e-3)))
    meds = []
    for _ in range(3):
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        meds.append(e0.elapsed_time(e1) / reps)
    return statistics.median(meds) * 1e3 / len(fns)


def candidates(m: int, k: int) -> list[dict]:
    out = []
    for bn, bk, w_, st, s in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (2, 4, 8), (1, 2), (1, 2, 4)):
        if bk * s > k or k % (bk * s) or (st > 1 and k // (bk * s) < 2):
            continue
        if bn * bk * max(1, m) > 64 * 32 * w_ or bn * bk < 32 * w_ * 2:   # register budget, work per thread
            continue
        out.append(dict(BN=bn, BK=bk, W=w_, ST=st, S=s))
    return out


def main():
    from ktc.codegen.gpu import matmul as mm
    bf = torch.bfloat16
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    m = 1
    for name, n, k in (("qkv", 5120, 2048), ("o", 2048, 4096)):
        weights = [torch.randn(n, k, dtype=bf, device=DEV) * 0.02 for _ in range(4)]
        xs = [torch.randn(m, k, dtype=bf, device=DEV) for _ in range(8)]
        outs = [torch.empty(m, n, dtype=bf, device=DEV) for _ in range(8)]
        ref = xs[0].float() @ weights[0].float().T
        nbytes = n * k * 2
        cfg0 = mm.default_config(m, n, k)
        base = graph_us([functools.partial(mm.linear, xs[i], weights[i % 4], None, cfg0, out=outs[i])
                         for i in range(8)])
        print(f"{name} m={m} shipped {cfg0}: {base:.2f} us {nbytes / base / 1e3:.0f} GB/s", flush=True)
        res["rows"].append({"shape": name, "m": m, "cfg": "shipped", "us": base})
        wsp = torch.empty(4 * 2 * n, dtype=torch.float32, device=DEV)
        cnt = torch.zeros(n, dtype=torch.int32, device=DEV)
        scores = []
        for cfg in candidates(m, k):
            try:
                run(xs[0], weights[0], outs[0], cfg, wsp, cnt)
                torch.cuda.synchronize()
                err = float((outs[0].float() - ref).norm() / ref.norm())
                if err > 1e-2:
                    print("WRONG", cfg, err)
                    continue
                us = graph_us([functools.partial(run, xs[i], weights[i % 4], outs[i], cfg, wsp, cnt) for i in range(8)])
            except Exception as ex:     # a config the device cannot run is skipped
                print("fail", cfg, type(ex).__name__, str(ex)[:100])
                continue
            scores.append((us, cfg))
            res["rows"].append({"shape": name, "m": m, "cfg": cfg, "us": us})
        scores.sort(key=lambda t: t[0])
        print(f"{name} m={m}: best " + "; ".join(f"{u:.2f} us {c}" for u, c in scores[:6]), flush=True)
        for split in (1, 2, 4):
            b = [t for t in scores if t[1]["S"] == split]
            if b:
                print(f"   best split {split}: {b[0][0]:.2f} us {b[0][1]} ({nbytes / b[0][0] / 1e3:.0f} GB/s)")
    with open(os.path.join(os.environ.get("OUT", "."), "gemv_sweep.json"), "w") as f:
        json.dump(res, f, indent=0)


if __name__ == "__main__":
    main()
