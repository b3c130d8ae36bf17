"""CPU tuning: the thread count and kernel function of each CPU expert kernel, per batch bucket.

An artifact carries one TVM-built library per CPU target, and in it one kernel per expert shape
and format, with its decode / prefill crossover fixed at compile time. What a host can choose at
run time:
- how many tasks the kernel's parallel phases are split into (its last argument, `nthr`): all
  cores, one fewer (room for the thread that drives the GPU or the OS), three quarters or half
  of them (memory-bound decode often saturates bandwidth before it runs out of cores);
- where the library holds the kernel built with several int8/int4 prefill paths (x86-amx: AMX
  integer tiles on quantized activations, or AMX-BF16 tiles on dequantized weights, see
  codegen/tir_amx_bf16.py; x86-avx512 and x86-amx: "fma", no int-dot prefill at all, i.e. the
  decode / prefill crossover moved to never), which one runs, for the buckets that reach the
  prefill path: which is faster depends on the machine (tile throughput against dequantization,
  activation quantization and bandwidth).
- which tile shapes run, where the library holds the kernel built with other micro-kernel shapes
  (codegen TARGET_CONFIGS "tile_variants", x86-avx512 / x86-amx: token blocks of 4 instead of 8,
  parallel work items of 8 weight rows instead of 4), at every bucket.
A prefill path or a tile variant is one function of the library: a record's "prefill" names it.
All are tuned here together, per kernel and batch bucket, on one layer's real weights read from
the artifact and random routing; CpuExpertKernels.set_tuned_threads / set_tuned_prefill apply
the winners at load.

Record keys: kernel "cpu.<kernel name>#<library sha256 prefix>", shape (E, H, I, top_k), format
"<format>-g<group>/<target>/t<threads>" where threads is num_threads() on the tuning host: a run
with another thread budget (KTC_NUM_THREADS, a smaller cpuset) does not use them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ktc.ir import Graph, Node

from .artifact import Manifest, sha256_file
from .tuning import APPLIED, BATCH_BUCKETS, Candidate, Task, Timer, TuningKey, TuningRecords, bucket_order, bucket_table


def thread_candidates(n: int) -> list[int]:
    """n first (the default), then n - 1, 3n/4, n/2 (distinct, at least 1)."""
    out: list[int] = []
    for t in (n, n - 1, (3 * n) // 4, n // 2):
        if t >= 1 and t not in out:
            out.append(t)
    return out


def lib_hash(entry: dict[str, Any], kernel_dir: Path, files: dict[str, Any] | None = None) -> str:
    """The first 8 hex digits of the kernel library's sha256 (the manifest's, else hashed here)."""
    rel = f"{entry.get('dir', 'kernels/cpu')}/{entry['lib']}"
    meta = (files or {}).get(rel)
    return (meta["sha256"] if meta else sha256_file(Path(kernel_dir) / entry["lib"]))[:8]


def kernel_key(entry: dict[str, Any], name: str, lib_sha: str, threads: int) -> tuple[str, tuple[int, ...], str]:
    """(kernel, shape, format) of CPU expert kernel `name` (of manifest entry targets["cpu"]) in records."""
    spec = entry["kernels"][name]["spec"]
    shape = (int(spec["num_experts"]), int(spec["hidden_size"]), int(spec["intermediate_size"]), int(spec["top_k"]))
    group = spec.get("group_size")
    fmt = f"{spec.get('format')}{f'-g{group}' if group else ''}/{entry.get('target')}/t{threads}"
    return f"cpu.{name}#{lib_sha}", shape, fmt


def load_cpu_kernels(manifest: Manifest) -> Any:
    """The artifact's CPU expert kernels, loaded as ktc.load loads them (so num_threads() is what a
    run sees; records of another thread budget would not apply)."""
    from ktc.runtime.cpu_experts import CpuExpertKernels

    return CpuExpertKernels.load(manifest.path / manifest.cpu["dir"], manifest.cpu)


def node_weights(manifest: Manifest, node: Node) -> dict[str, torch.Tensor]:
    """The packed gate_up / down weights of one moe_experts node as the kernel takes them
    ({"gate_up.<part>": t, "down.<part>": t}), read from the artifact's shards; random ones in the
    same layout for a weights-free plan (a kernel's time does not depend on the values, which is
    also why tune validation runs such a plan on random weights)."""
    from safetensors import safe_open

    if manifest.data["weights"].get("state") == "pending":
        from ktc.pack import random_producer, weight_units

        units, _ = weight_units(manifest.graph)
        unit = next(u for u in units if u.kind == "cpu_experts" and node.weights["gate_up"] in u.names)
        made = random_producer(manifest.graph)(unit)
        return {f"{role}.{part}": t for role in ("gate_up", "down") for part, t in made[node.weights[role]].items()}

    aliases = manifest.data["weights"].get("aliases", {})
    wanted = {aliases.get(node.weights[r], node.weights[r]): r for r in ("gate_up", "down")}
    out: dict[str, torch.Tensor] = {}
    for rel in manifest.weight_files:
        with safe_open(str(manifest.path / rel), framework="pt") as f:
            for key in f.keys():
                name, sep, part = key.partition("::")
                if name in wanted:
                    out[f"{wanted[name]}.{part}" if sep else wanted[name]] = f.get_tensor(key)
    return out


def wall_timer(target_s: float = 0.03, min_reps: int = 3, max_reps: int = 50) -> Timer:
    """A timer for tune(): the median wall time of single calls after one warm-up call, repeated
    until target_s has passed (at least min_reps, at most max_reps times)."""
    def timer(run: Callable[[], None]) -> float:
        run()
        times: list[float] = []
        t_end = time.perf_counter() + target_s
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timer


def cpu_tasks(manifest: Manifest, kernels: Any, graph: Graph | None = None, buckets: list[int] | None = None,
              seed: int = 0) -> list[Task]:
    """One task per (CPU expert kernel, bucket), in bucket_order: candidates thread_candidates(n)."""
    from ktc.runtime.cpu_experts import num_threads

    graph = graph or manifest.graph
    n = num_threads()
    sha = lib_hash(kernels.entry, kernels.kernel_dir, manifest.files)
    nodes: dict[str, Node] = {}
    for node in graph.nodes:
        if node.op == "moe_experts" and node.device == "cpu" and node.kernel in kernels.kernel_names:
            nodes.setdefault(node.kernel, node)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    tasks: list[Task] = []
    for b in bucket_order(buckets or BATCH_BUCKETS):
        for name, node in nodes.items():
            kernel, shape, fmt = kernel_key(kernels.entry, name, sha, n)

            def build(name: str = name, node: Node = node, b: int = b, shape: tuple = shape) -> list[Candidate]:
                if name not in weights:
                    weights[name] = node_weights(manifest, node)
                packed = weights[name]
                e, h, _, k = shape
                gen = torch.Generator().manual_seed(seed + b)
                x = torch.randn(b, h, generator=gen)
                ids = torch.rand(b, e, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
                tw = torch.softmax(torch.randn(b, k, generator=gen), dim=-1)

                def run(threads: int, path: str | None) -> Callable[[], None]:
                    table = dict.fromkeys(BATCH_BUCKETS, threads)

                    def go() -> None:
                        kernels.set_tuned_threads(name, table)
                        if path is not None:
                            kernels.set_tuned_prefill(name, dict.fromkeys(BATCH_BUCKETS, path))
                        try:
                            kernels.moe_experts(name, x, tw, ids, packed)
                        finally:
                            kernels.set_tuned_threads(name, None)
                            kernels.set_tuned_prefill(name, None)
                    return go

                paths = _paths_at(kernels, name, b)
                return [Candidate({"threads": t} if p is None else {"threads": t, "prefill": p}, run(t, p))
                        for p in paths for t in thread_candidates(n)]

            paths = _paths_at(kernels, name, b)
            default = {"threads": n} if paths == [None] else {"threads": n, "prefill": paths[0]}
            tasks.append(Task(TuningKey(kernel, shape, fmt, b), default, build))
    return tasks


def _paths_at(kernels: Any, name: str, bucket: int) -> list[str | None]:
    """The kernel functions worth a candidate at `bucket` (the default first): the prefill paths from
    the prefill crossover on (below it they all run the same code), the tile variants at every bucket;
    [None] where there is no choice."""
    paths = kernels.prefill_paths(name) if hasattr(kernels, "prefill_paths") else []
    tiles = kernels.tile_variants(name) if hasattr(kernels, "tile_variants") else []
    start = kernels.prefill_from_tokens(name) if len(paths) > 1 else 0
    prefill = paths if len(paths) > 1 and start and bucket >= start else paths[:1]
    out = [*prefill, *tiles]
    return out if len(out) > 1 else [None]


def apply_cpu_records(kernels: Any, graph: Graph | None, records: TuningRecords,
                      files: dict[str, Any] | None = None) -> int:
    """Give each CPU expert kernel its tuned thread counts (set_tuned_threads: the records' active
    configs, so pending records are left out and dropped ones give their bucket num_threads()); records
    asking for more threads than num_threads() or for other thread budgets are ignored. Returns the
    kernels that run a searched thread count."""
    from ktc.runtime.cpu_experts import num_threads

    if not hasattr(kernels, "set_tuned_threads"):
        return 0
    n = num_threads()
    sha = lib_hash(kernels.entry, kernels.kernel_dir, files)
    applied = 0
    for name in kernels.kernel_names:
        valid: dict[int, int] = {}
        paths: dict[int, str] = {}
        known = kernels.prefill_paths(name) if hasattr(kernels, "prefill_paths") else []
        tiles = kernels.tile_variants(name) if hasattr(kernels, "tile_variants") else []
        searched = False
        for b, rec in records.by_bucket(*kernel_key(kernels.entry, name, sha, n)).items():
            cfg = rec.active_config or {}
            t = cfg.get("threads")
            if b in BATCH_BUCKETS and isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= n:
                valid[b] = t
                searched = searched or rec.status in APPLIED
                if cfg.get("prefill") in known or cfg.get("prefill") in tiles:
                    paths[b] = cfg["prefill"]
        kernels.set_tuned_threads(name, bucket_table(valid) if valid else None)
        if hasattr(kernels, "set_tuned_prefill"):
            # the nearest recorded bucket's function, but not another prefill path below the prefill crossover
            start = kernels.prefill_from_tokens(name)
            table = ({b: p if b >= start or p in tiles else known[0] for b, p in bucket_table(paths).items()}
                     if paths else None)
            kernels.set_tuned_prefill(name, table)
        applied += searched
    return applied

