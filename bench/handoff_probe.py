"""How a GPU -> host -> GPU hand-off per layer costs, on the GPU machine (issue 5's decode).

A decode step of a heterogeneous model hands each MoE layer's input to the CPU and its result back,
48 times a token. This times three ways of doing that on a stand-in model (48 layers, each two
2048x2048 bf16 GEMVs around the hand-off; the CPU work is a trivial numpy multiply), as the
step's time over the same GPU work without hand-offs, in us a layer:

  events   + memcpys      one CUDA graph per layer; x, weights, ids copied to pinned buffers by
                          memcpy nodes, an external event after them that the host waits on, the
                          result copied back by a memcpy node (the runtime before 2026-11-23)
  events   + zero-copy    the same, with the pinned buffers aliased as CUDA tensors and written /
                          read by kernels (the runtime's decode path since, runtime/gpu/offload.py)
  flags                   one graph for the whole step; the GPU writes a request flag in pinned
                          memory (cuStreamWriteValue32) and waits for the answer flag
                          (cuStreamWaitValue32); the host polls and answers (stream memory ops)

    KTC_SITE=$PWD/.carry/site-h TESTS=0 BENCH=0 bash bench/run_gpu.sh     # on the GPU machine: ktc importable
    PYTHONPATH=/tmp/kp:$PWD python3 bench/handoff_probe.py                 # prints one line per round
"""

from __future__ import annotations

import ctypes
import statistics
import time

import numpy as np
import torch

L, H, K = 48, 2048, 8


def alias(t: torch.Tensor) -> torch.Tensor:
    from ktc.runtime.gpu.offload import device_alias  # the runtime's own aliasing of its pinned buffers

    a = device_alias(t)
    if a is None:
        raise SystemExit("this torch / driver cannot alias pinned memory as a CUDA tensor")
    return a


def main() -> None:
    dev = torch.device("cuda")
    w = [torch.randn(H, H, device=dev, dtype=torch.bfloat16) / H ** 0.5 for _ in range(2)]
    bx, by = torch.empty(1, H, pin_memory=True), torch.empty(1, H, pin_memory=True)
    btw, bids = torch.empty(1, K, pin_memory=True), torch.empty(1, K, dtype=torch.int32, pin_memory=True)
    ax, ay, atw, aids = alias(bx), alias(by), alias(btw), alias(bids)
    bxn, byn = bx.numpy(), by.numpy()
    x0 = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    twd, idd = torch.rand(1, K, device=dev), torch.randint(0, 128, (1, K), device=dev, dtype=torch.int32)
    table = torch.arange(128, device=dev, dtype=torch.int32)

    def pre(h):
        return (h @ w[0]).tanh()

    def mid(h):
        return h @ w[1]

    def cpu():
        np.multiply(bxn, 0.5, out=byn)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pre(x0), mid(x0)
    torch.cuda.current_stream().wait_stream(s)
    h = x0.clone()
    for _ in range(L):
        a = pre(h)
        h = mid(a) + (a.float() * 0.5).to(torch.bfloat16)
    ref = h.float()
    events = [torch.cuda.Event(external=True) for _ in range(L)]

    def per_layer_graphs(zero_copy: bool):
        st, graphs = {"h": x0}, []
        for i in range(L + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                if i > 0:
                    y = ay.to(torch.bfloat16) if zero_copy else by.to(dev, non_blocking=True).to(torch.bfloat16)
                    st["h"] = st["m"] + y
                if i < L:
                    a = pre(st["h"])
                    ids = table.index_select(0, idd.reshape(-1)).view(1, K)
                    if zero_copy:       # kernels (mul by 1: torch would copy one dtype with cudaMemcpy)
                        torch.mul(a, 1, out=ax), torch.mul(twd, 1, out=atw), torch.mul(ids, 1, out=aids)
                    else:
                        bx.copy_(a.float(), non_blocking=True), btw.copy_(twd, non_blocking=True)
                        bids.copy_(ids, non_blocking=True)
                    events[i].record()
                    st["m"] = mid(a)
            graphs.append(g)

        def step():
            for i, g in enumerate(graphs):
                g.replay()
                if i < L:
                    events[i].synchronize()
                    cpu()
            torch.cuda.synchronize()
        return step, lambda: st["h"]

    def flags_graph():
        cu = ctypes.CDLL("libcuda.so.1")
        wait32, write32 = cu.cuStreamWaitValue32_v2, cu.cuStreamWriteValue32_v2
        for f in (wait32, write32):
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            f.restype = ctypes.c_int
        flags = torch.zeros(2 * L * 16, dtype=torch.int32, pin_memory=True)
        fl = flags.numpy()

        def addr(i):
            return flags.data_ptr() + 4 * 16 * i

        def op(f, i, v, mode):
            assert f(ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), addr(i), v, mode) == 0

        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            h = x0
            for i in range(L):
                a = pre(h)
                bx.copy_(a.float(), non_blocking=True)
                op(write32, L + i, 1, 0)                    # request (with a memory barrier)
                m = mid(a)
                op(wait32, i, 1, 1)                         # answer == 1, then reset it
                op(write32, i, 0, 0)
                h = m + by.to(dev, non_blocking=True).to(torch.bfloat16)
            out = h

        def step():
            g.replay()
            for i in range(L):
                k = (L + i) * 16
                while fl[k] != 1:
                    pass
                fl[k] = 0
                cpu()
                fl[i * 16] = 1
            torch.cuda.synchronize()
        return step, lambda: out

    g0 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g0):
        h = x0
        for _ in range(L):
            a = pre(h)
            h = mid(a) + (a.float() * 0.5).to(torch.bfloat16)

    def gpu_only():
        g0.replay()
        torch.cuda.synchronize()

    ways = {"events + memcpys": per_layer_graphs(False), "events + zero-copy": per_layer_graphs(True),
            "flags": flags_graph()}
    for name, (step, out) in ways.items():
        step()
        err = float((out().float() - ref).norm() / ref.norm())
        print(f"{name}: output error vs eager {err:.1e}")

    def ms(f, n=150):
        for _ in range(10):
            f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts)

    for r in range(3):
        base = ms(gpu_only)
        cols = [f"GPU work alone {base:.3f} ms"]
        for name, (step, _) in ways.items():
            cols.append(f"{name} +{(ms(step) - base) / L * 1e3:.1f} us/layer")
        print(f"round {r}: " + " | ".join(cols), flush=True)


if __name__ == "__main__":
    main()
