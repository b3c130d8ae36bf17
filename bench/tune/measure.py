"""Decode-step and prefill times of an artifact (tuned, or KTC_TUNING=0), plus logits for a comparison."""
import json
import os
import sys
import time

import torch

import ktc

path, tag, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
m = ktc.load(path, verify="sizes", max_batch_size=8, max_context=4096)
print(tag, "tuning:", json.dumps(m.tuning), flush=True)
torch.manual_seed(0)
res = {"tag": tag, "tuning": m.tuning}
ids = torch.randint(0, 1000, (1, 2048))
for n in (2048, 512):
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = m.prefill(ids[:, :n])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res[f"prefill{n}_ms"] = sorted(times[1:])[1] * 1e3
    if n == 512:
        torch.save(logits, os.path.join(outdir, f"logits_{tag}.pt"))
for b in (1, 8):
    m.prefill(ids[:1, :1024].expand(b, 1024).contiguous(), reserve=200)
    tok = torch.zeros(b, dtype=torch.long, device="cuda")
    for _ in range(5):
        m.step(tok)
    torch.cuda.synchronize()
    steps = []
    for _ in range(100):
        t0 = time.perf_counter()
        m.step(tok)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
    res[f"decode_b{b}_ms"] = sorted(steps)[50] * 1e3
print(json.dumps(res), flush=True)
json.dump(res, open(os.path.join(outdir, f"measure_{tag}.json"), "w"), indent=1)
