"""GPU check of `ktc tune` with its validation phase: tune a weights-free plan (validation on, random
weights), print the report (records + validation table), then check independently, on a fresh load
that applies the records as ktc.load does, that the tuned model is not slower than the untuned one:
  1. the validation bench (same statistic as `ktc tune`): tuned-as-loaded vs no records, 7 rounds;
  2. the issue's method (two models, per-step synced median of 100 decode steps after 1024 tokens,
     min of 3 prefills), 3 interleaved rounds.
Args: PLAN OUTDIR BUDGET SIZES [EXTRA `ktc tune` ARGS, e.g. "--jobs 1"]."""
import contextlib
import io
import json
import os
import sys
import time

import torch

from ktc.cli import main
from ktc.pack import random_weights
from ktc.runtime.artifact import read_manifest
from ktc.runtime.loader import load_artifact
from ktc.runtime.tune_validate import ModelBench

plan, outdir, budget, sizes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
buckets = [int(s) for s in sizes.split(",")]
t0 = time.time()
extra = sys.argv[5].split() if len(sys.argv) > 5 else []
rc = main(["tune", plan, "--budget", budget, "--batch-sizes", sizes, *extra])
print("tune rc", rc, f"{time.time() - t0:.0f}s", flush=True)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    main(["tune", plan, "--report"])
report = buf.getvalue()
with open(os.path.join(outdir, "report.txt"), "w") as f:
    f.write(report)
lines = report.splitlines()
start = next((i for i, ln in enumerate(lines) if "records (from" in ln), 0)
print("\n".join(lines[start:]), flush=True)            # the summary and the validation table (all: report.txt)

m = read_manifest(plan)
w = random_weights(m.graph, device="cuda")
res: dict = {"bench": {}, "issue_method": {}}

# 1. the validation bench on a fresh load (records applied by load_artifact, as ktc.load does)
model = load_artifact(plan, weights=w, max_batch_size=16, max_context=4096)
print("tuning as loaded:", json.dumps(model.tuning), flush=True)
bench = ModelBench(model, rounds=7)
tuned, untuned = bench.current(), bench.variant(None)
slower = []
for b in [*buckets, 256]:
    u, t = bench.measure(b, [untuned, tuned])
    res["bench"][bench.describe(b)] = {"untuned_ms": u, "tuned_ms": t, "ratio": t / u}
    flag = "  SLOWER" if t > u else ""
    print(f"bench {bench.describe(b):14s} untuned {u:.4f} ms  tuned {t:.4f} ms  ratio {t / u:.4f}{flag}", flush=True)
    if t > u and b in buckets:
        slower.append(b)
del model, bench
torch.cuda.empty_cache()

# 2. the method: two models on the same weights
models = {}
for tag in ("untuned", "tuned"):
    os.environ["KTC_TUNING"] = "0" if tag == "untuned" else "1"
    models[tag] = load_artifact(plan, weights=w, max_batch_size=16, max_context=4096)
ids = torch.randint(0, 1000, (16, 2048))


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


for _ in range(3):
    for tag, mdl in models.items():
        r = res["issue_method"].setdefault(tag, {})
        for b in [*buckets, 256]:
            if b <= 16:
                mdl.prefill(ids[:b, :1024], reserve=200)
                tok = torch.zeros(b, dtype=torch.long, device="cuda")
                for _ in range(3):
                    mdl.step(tok)
                st = sorted(timed(lambda mdl=mdl, tok=tok: mdl.step(tok)) for _ in range(100))
                r[f"decode_b{b}_ms"] = min(r.get(f"decode_b{b}_ms", 1e9), st[50] * 1e3)
            else:
                ts = [timed(lambda mdl=mdl, b=b: mdl.prefill(ids[:1, :b])) for _ in range(3)]
                r[f"prefill{b}_ms"] = min(r.get(f"prefill{b}_ms", 1e9), min(ts) * 1e3)
for k in res["issue_method"]["untuned"]:
    u, t = res["issue_method"]["untuned"][k], res["issue_method"]["tuned"][k]
    print(f"issue method {k:16s} untuned {u:.4f} ms  tuned {t:.4f} ms  ratio {t / u:.4f}{'  SLOWER' if t > u else ''}",
          flush=True)
res["slower_buckets_bench"] = slower
print("tuned slower than untuned at measured buckets (bench):", slower or "none", flush=True)
with open(os.path.join(outdir, "validate.json"), "w") as f:
    json.dump(res, f, indent=1)
