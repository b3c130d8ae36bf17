"""The whole all-GPU model by weight format: bf16, fp8 (w8a8 prefill / weight-only decode) and int4 (w4a16).

    python3 bench/gpu_formats.py [--layers 48] [--formats bf16 fp8 int4] [--prompts 512 2048] [--out DIR]

GPU machine. For each format: a weights-free --target cuda plan of the Qwen3-30B-A3B shape (routed experts
--gpu-quant FORMAT, dense linears --gpu-dense-quant FORMAT; bf16 = neither), loaded with random weights
in the artifact's layout on the GPU (ktc.pack.random_weights), then ktc bench's measurements
(runtime.bench: prefill of each prompt length, decode at --context tokens, medians of --repeats runs).
One format at a time, in one process, so the ratios are of the same machine state. Writes
DIR/gpu_formats.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_decode import QWEN3_30B_A3B  # noqa: E402

FORMATS = {"bf16": ("none", "none"), "fp8": ("fp8", "fp8"), "int4": ("int4", "int4")}


def plan(folder: Path, layers: int, fmt: str) -> Path:
    from ktc.compiler import compile_model

    cfg_dir = folder / "config"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(dict(QWEN3_30B_A3B, num_hidden_layers=layers)))
    out = folder / f"{fmt}.ktc"
    experts, dense = FORMATS[fmt]
    compile_model(cfg_dir, out, target="cuda", quant="none", gpu_quant=experts, gpu_dense_quant=dense,
                  weights_free=True, force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=".")
    a = ap.parse_args()

    from ktc.pack import random_weights
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.bench import bench_decode, bench_prefill
    from ktc.runtime.loader import load_artifact

    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
               "layers": a.layers, "formats": {}}
    with tempfile.TemporaryDirectory() as d:
        for fmt in a.formats:
            t = time.perf_counter()
            path = plan(Path(d), a.layers, fmt)
            m = read_manifest(path)
            weights = random_weights(m.graph, device="cuda")
            nbytes = sum(t.numel() * t.element_size() for w in weights.values()
                         for t in (w.values() if isinstance(w, dict) else (w,)) if isinstance(t, torch.Tensor))
            model = load_artifact(path, weights=weights, max_batch_size=1,
                                  max_context=max(max(a.prompts), a.context + a.steps + 8) + 16)
            prefill = bench_prefill(model, a.prompts, batch=1, repeats=a.repeats)
            decode = bench_decode(model, a.context, a.steps, repeats=a.repeats)
            row = {"weights_gb": nbytes / 1e9, "prefill": [{k: r[k] for k in ("length", "ms", "tokens_per_s")}
                                                           for r in prefill],
                   "decode_ms_per_token": decode["ms_per_token"], "decode_tokens_per_s": decode["tokens_per_s"],
                   "setup_s": time.perf_counter() - t}
            results["formats"][fmt] = row
            print(fmt, json.dumps(row), flush=True)
            model = weights = None
            gc.collect()
            torch.cuda.empty_cache()
    base = results["formats"].get("bf16")
    print(f"\n{'format':8s} {'weights GB':>10s} " + " ".join(f"{'prefill ' + str(p):>14s}" for p in a.prompts)
          + f" {'decode ms':>10s} {'tok/s':>8s}")
    for fmt, row in results["formats"].items():
        cells = []
        for r in row["prefill"]:
            ratio = ""
            if base is not None and fmt != "bf16":
                b = next(x for x in base["prefill"] if x["length"] == r["length"])
                ratio = f" {r['tokens_per_s'] / b['tokens_per_s']:.2f}x"
            cells.append(f"{r['tokens_per_s']:>8,.0f}{ratio:>6s}")
        dec = f"{row['decode_ms_per_token']:10.2f} {row['decode_tokens_per_s']:8.1f}"
        if base is not None and fmt != "bf16":
            dec += f" {base['decode_ms_per_token'] / row['decode_ms_per_token']:.2f}x"
        print(f"{fmt:8s} {row['weights_gb']:10.1f} " + " ".join(cells) + " " + dec)
    Path(a.out, "gpu_formats.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
