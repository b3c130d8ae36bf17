"""Measure a loaded model on this host: prefill and decode tokens/s, and how much of the CPU
experts' work hides behind the GPU's (heterogeneous models).

    rows = bench_prefill(model, [128, 512], batch=1, repeats=3, seed=0)   # one dict per length
    dec = bench_decode(model, context=1024, steps=64, repeats=3, seed=0)

Every figure is the median of `repeats` timed runs, after untimed warm-up runs (the first
runs compile kernels and capture the CUDA graph). GPU models are synchronised around each
timing and decoded with `model.step` on device tensors, the CUDA-graph path generate() uses;
CPU models with `model.decode`. Prompts are random token ids from a seeded generator, and each
decode step feeds back the argmax of the previous logits, as greedy generation does.

Models that run CPU experts beside the GPU expose profile(on) and layer_stats(); for them one
extra, untimed profiled run per phase gives per-layer CPU time and waits (layer_overlap), so
profiling never slows the timed runs. Importable without typer or rich.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ktc.errors import InputError

DECODE_WARMUP = 2   # untimed decode steps after each prefill (the first captures the CUDA graph)


# -- helpers ---------------------------------------------------------------------------------
def _on_gpu(model: Any) -> bool:
    device = getattr(model, "device", None)
    return hasattr(model, "step") and device is not None and torch.device(device).type == "cuda"


def _sync(model: Any) -> None:
    if _on_gpu(model):
        torch.cuda.synchronize(model.device)


def random_ids(model: Any, batch: int, length: int, seed: int) -> torch.Tensor:
    """[batch, length] token ids drawn uniformly from the model's vocabulary."""
    vocab = getattr(model, "vocab_size", None) or 256
    return torch.randint(0, int(vocab), (batch, length), generator=torch.Generator().manual_seed(seed))


def _check_whole(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < least:
        raise InputError(f"{name} must be a whole number >= {least}, got {value}")


def _timed(model: Any, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds `fn` takes, the device synchronised before and after; what it returned)."""
    _sync(model)
    start = time.perf_counter()
    value = fn()
    _sync(model)
    return (time.perf_counter() - start) * 1e3, value


def _profiled(model: Any, fn: Callable[[], Any]) -> list[dict] | None:
    """Run `fn` with the model's CPU-expert profiler on; its layer_stats(), or None if it has none."""
    if not (hasattr(model, "profile") and hasattr(model, "layer_stats")):
        return None
    model.profile(True)
    try:
        fn()
        _sync(model)
        return list(model.layer_stats())
    finally:
        model.profile(False)


# -- overlap ------------------------------------------------------------------------------------
def overlap(cpu_ms: float, gpu_ms: float | None) -> float | None:
    """Share of the CPU kernel's time during which GPU work (the layer's GPU and shared experts)
    ran beside it: min(gpu, cpu) / cpu; None when the GPU time is unknown (no CUDA)."""
    if gpu_ms is None:
        return None
    if cpu_ms <= 0:
        return 1.0
    return min(1.0, max(0.0, gpu_ms / cpu_ms))


def layer_overlap(stats: Sequence[dict], step_ms: float | None = None, steps: int | None = None) -> dict:
    """Per-layer rows of `stats` (model.layer_stats(): per call cpu_ms = the CPU kernel, wait_ms =
    waiting for the GPU to deliver the layer's inputs, gpu_ms = GPU work beside the kernel) with
    their overlap, and a summary.

    steps: forward passes the stats cover; with it the summary has the ms per pass summed over
    layers (a layer may be called more than once per pass), and with step_ms too, the shares of
    one pass those sums are."""
    rows = []
    for s in sorted(stats, key=lambda s: int(s["layer"])):
        cpu, wait = float(s["cpu_ms"]), float(s["wait_ms"])
        gpu = None if s.get("gpu_ms") is None else float(s["gpu_ms"])
        rows.append({"layer": int(s["layer"]), "calls": int(s["calls"]), "tokens": float(s["tokens"]),
                     "cpu_ms": cpu, "wait_ms": wait, "gpu_ms": gpu, "overlap": overlap(cpu, gpu)})
    if not rows:
        return {"rows": [], "summary": None}
    ov = [r["overlap"] for r in rows if r["overlap"] is not None]
    per = (lambda key: sum((r[key] or 0.0) * r["calls"] for r in rows) / steps) if steps else \
        (lambda key: sum((r[key] or 0.0) for r in rows))
    cpu_sum, wait_sum = per("cpu_ms"), per("wait_ms")
    gpu_sum = per("gpu_ms") if ov else None
    summary = {"layers": len(rows), "overlap_mean": statistics.fmean(ov) if ov else None,
               "overlap_min": min(ov) if ov else None, "overlap_max": max(ov) if ov else None,
               "overall_overlap": overlap(cpu_sum, gpu_sum) if ov else None,
               "cpu_ms_sum": cpu_sum, "wait_ms_sum": wait_sum, "gpu_ms_sum": gpu_sum, "step_ms": step_ms,
               "cpu_share": cpu_sum / step_ms if step_ms else None,
               "wait_share": wait_sum / step_ms if step_ms else None}
    return {"rows": rows, "summary": summary}


# -- prefill ------------------------------------------------------------------------------------
def bench_prefill(model: Any, lengths: Sequence[int], batch: int = 1, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Prefill tokens/s per prompt length: one dict per length with the median of `repeats` runs."""
    _check_whole("repeats", repeats, 1)
    _check_whole("batch", batch, 1)
    if not lengths:
        raise InputError("give at least one prompt length")
    results = []
    for i, length in enumerate(lengths):
        _check_whole("a prompt length", length, 1)
        ids = random_ids(model, batch, int(length), seed + i)
        model.prefill(ids)                                          # warm-up
        runs = [_timed(model, lambda ids=ids: model.prefill(ids))[0] for _ in range(repeats)]
        ms = statistics.median(runs)
        stats = _profiled(model, lambda ids=ids: model.prefill(ids))
        results.append({"length": int(length), "batch": batch, "ms": ms, "tokens_per_s": batch * length / ms * 1e3,
                        "runs_ms": runs,
                        "layers": None if stats is None else layer_overlap(stats, step_ms=ms, steps=1)})
        model.reset()
    return results


# -- decode -------------------------------------------------------------------------------------
def _decoder(model: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(first token from prefill logits, one decode step token -> next token) on the model's device."""
    if _on_gpu(model):
        device = model.device
        return (lambda logits: logits.argmax(-1).to(device),
                lambda tok: model.step(tok).argmax(-1))
    return (lambda logits: logits.argmax(-1), lambda tok: model.decode(tok).argmax(-1))


def bench_decode(model: Any, context: int, steps: int, repeats: int = 3, seed: int = 0) -> dict:
    """Decode tokens/s at batch 1 after a `context`-token prompt: median of `repeats` runs of `steps` steps."""
    _check_whole("context", context, 1)
    _check_whole("decode steps", steps, 1)
    _check_whole("repeats", repeats, 1)
    ids = random_ids(model, 1, context, seed)
    first, step = _decoder(model)

    def start() -> tuple[float, torch.Tensor]:
        """A fresh prefill (timed) and the warm-up steps after it; (prefill ms, the next token)."""
        ms, logits = _timed(model, lambda: model.prefill(ids, reserve=DECODE_WARMUP + steps))
        tok = first(logits)
        for _ in range(DECODE_WARMUP):
            tok = step(tok)
        return ms, tok

    def decode(tok: torch.Tensor) -> None:
        for _ in range(steps):
            tok = step(tok)

    start()                                                          # warm-up run: prefill + a few steps
    prefill_runs, runs = [], []
    for _ in range(repeats):
        prefill_ms, tok = start()
        prefill_runs.append(prefill_ms)
        runs.append(_timed(model, lambda tok=tok: decode(tok))[0] / steps)
    ms = statistics.median(runs)
    tok = start()[1]
    stats = _profiled(model, lambda: decode(tok))
    model.reset()
    return {"context": context, "batch": 1, "steps": steps, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
            "runs_ms_per_token": runs, "prefill_ms": statistics.median(prefill_runs),
            "layers": None if stats is None else layer_overlap(stats, step_ms=ms, steps=steps)}


# -- host -----------------------------------------------------------------------------------------
def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_facts() -> dict:
    """What the figures were measured on."""
    import ktc

    cuda = torch.cuda.is_available()
    return {"cpu": cpu_model_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "ktc": ktc.__version__,
            "python": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
