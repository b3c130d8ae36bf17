"""Compile the GPU tuning candidates in parallel worker processes before the search times them.

The search (runtime.tuning.tune) runs every candidate once before timing it. On a host that never
ran these kernels, that first run is a Triton compile (Python front end, LLVM, ptxas: one core,
~0.1-1 s each), and a whole-model tune over every batch bucket meets ~1300 distinct kernel configs
(the Qwen3-30B-A3B shape: 96 kernel x bucket tasks, 3469 candidates), so compiling one after
another is most of a tune's time. Here worker processes (fresh interpreters, each with its own
CUDA context, so the compiles really run side by side) each take a share of the distinct
configs and run them once; Triton writes every compiled kernel to its on-disk cache, and the
search then loads it from there instead of compiling it. Nothing is timed in the workers and
nothing they do is trusted: a candidate a worker could not run (out of shared memory, out of GPU
memory) is simply compiled, or rejected, by the search as before.

Distinct means: the same kernel, weight format, config and token-count class. Triton specializes
a kernel on its integer arguments (== 1, divisible by 16), so buckets 1, 2, 4 and 8 are classes
of their own and every bucket from 16 up shares one; the weight shapes of a model are multiples
of 16. A config that still compiles differently at another shape is compiled by the search itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tuning import Task

MIN_FREE_PER_WORKER = 4 << 30     # GPU memory a worker may need: its CUDA context + one layer's random weights
MAX_WORKERS = 8


@dataclass(frozen=True)
class CompileJob:
    """One candidate to run once: the task's key id and the candidate's config."""

    key: str
    config: str      # the config as sorted JSON (hashable, picklable)


@dataclass
class PrecompileResult:
    jobs: int            # distinct configs handed to the workers
    ran: int             # of them run (compiled) by a worker
    failed: int          # of them that raised in a worker (left to the search)
    workers: int
    seconds: float
    finished: bool       # False: the time limit stopped the workers (the search compiles the rest)
    error: str | None = None   # the first worker's failure, if any (its share is left to the search)


def token_class(tokens: int) -> int:
    """Buckets whose launches Triton specializes alike (see the module docstring)."""
    return tokens if tokens < 16 else 16


def distinct_jobs(tasks: Sequence[Task]) -> list[CompileJob]:
    """The first task and candidate of every distinct (kernel, format, config, token class), in task order."""
    seen: set[tuple] = set()
    jobs: list[CompileJob] = []
    for task in tasks:
        for cfg in task.configs or []:
            text = json.dumps(cfg, sort_keys=True)
            sig = (task.key.kernel, task.key.format, text, token_class(task.key.batch))
            if sig not in seen:
                seen.add(sig)
                jobs.append(CompileJob(task.key.id(), text))
    return jobs


def split_jobs(jobs: Sequence[CompileJob], workers: int) -> list[list[CompileJob]]:
    """Round robin, so that every worker gets a mix of kernels (compile times differ by kernel)."""
    shares = [list(jobs[i::workers]) for i in range(max(1, workers))]
    return [s for s in shares if s]


def default_workers(device: Any = "cuda") -> int:
    """Processes to compile with: one core left for the rest of the host, at most MAX_WORKERS, and no
    more than the GPU's free memory holds (MIN_FREE_PER_WORKER each). 1 means no precompile."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(MAX_WORKERS, cores - 1)
    try:
        import torch

        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            n = min(n, free // MIN_FREE_PER_WORKER)
    except Exception:  # noqa: BLE001 - no driver to ask: the core count decides
        pass
    return max(1, int(n))


def run_jobs(artifact: str, buckets: list[int], jobs: list[CompileJob], device: str) -> tuple[int, int]:
    """A worker: rebuild the artifact's tuning tasks (the same ones the search has) and run each job's
    candidate once. Returns (ran, failed)."""
    import torch

    from ..artifact import read_manifest
    from .kernels import load_kernels
    from .tune import gpu_tasks

    manifest = read_manifest(artifact)
    kernels = load_kernels(Path(manifest.path) / manifest.gpu["dir"] / "src")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    tasks = {t.key.id(): t for t in gpu_tasks(manifest.graph, kernels, buckets, device=device, dtype=dtype)}
    by_task: dict[str, list[str]] = {}
    for job in jobs:
        by_task.setdefault(job.key, []).append(job.config)
    ran = failed = 0
    for key, configs in by_task.items():
        task = tasks.get(key)
        if task is None:
            failed += len(configs)
            continue
        wanted = set(configs)
        for cand in task.candidates():          # the runner and its random inputs live for this task only
            if json.dumps(cand.config, sort_keys=True) not in wanted:
                continue
            try:
                cand.run()
                ran += 1
            except Exception:  # noqa: BLE001 - the search meets it again and reports it
                failed += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    return ran, failed


def precompile(artifact: str | Path, buckets: Sequence[int], tasks: Sequence[Task], workers: int,
               device: str = "cuda", timeout_s: float | None = None) -> PrecompileResult:
    """Run the distinct candidates of `tasks` once, spread over `workers` processes, within timeout_s
    (workers still running then are stopped; what they compiled stays in Triton's cache). A worker
    that fails or dies only loses its share: the search compiles those configs itself.

    Workers are fresh interpreters (`python -m ktc.runtime.gpu.precompile`), not multiprocessing
    children: those would re-import the caller's main script, which a script calling ktc without a
    __main__ guard cannot survive."""
    jobs = distinct_jobs(tasks)
    shares = split_jobs(jobs, workers)
    start = time.monotonic()
    if not shares:
        return PrecompileResult(0, 0, 0, 0, 0.0, True)
    got: dict[int, tuple[int, int, str | None]] = {}
    with tempfile.TemporaryDirectory(prefix="ktc-precompile-") as tmp:
        procs: list[subprocess.Popen] = []
        try:
            for i, share in enumerate(shares):
                spec = Path(tmp) / f"share{i}.json"
                spec.write_text(json.dumps({"artifact": str(artifact), "buckets": list(buckets), "device": device,
                                            "jobs": [[j.key, j.config] for j in share]}))
                with open(Path(tmp) / f"worker{i}.log", "wb") as log:
                    procs.append(subprocess.Popen([sys.executable, "-m", __name__, str(spec), str(spec) + ".out"],
                                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
            while len(got) < len(procs):
                for i, p in enumerate(procs):
                    if i not in got and p.poll() is not None:
                        got[i] = _outcome(Path(tmp), i, p.returncode, len(shares[i]))
                if len(got) == len(procs) or (timeout_s is not None and time.monotonic() - start >= timeout_s):
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    errors = [why for _, _, why in got.values() if why]
    return PrecompileResult(len(jobs), sum(r for r, _, _ in got.values()), sum(f for _, f, _ in got.values()),
                            len(shares), time.monotonic() - start, len(got) == len(shares),
                            errors[0] if errors else None)


def _outcome(tmp: Path, i: int, code: int, n: int) -> tuple[int, int, str | None]:
    """(ran, failed, error) of worker i from its result file, else from its exit code and last log line."""
    try:
        ran, failed = json.loads((tmp / f"share{i}.json.out").read_text())
        return int(ran), int(failed), None
    except (OSError, ValueError, TypeError):
        lines = (tmp / f"worker{i}.log").read_text(errors="replace").strip().splitlines()
        return 0, n, f"worker exited with code {code}" + (f": {lines[-1][:200]}" if lines else "")


def _main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    jobs = [CompileJob(k, c) for k, c in spec["jobs"]]
    ran, failed = run_jobs(spec["artifact"], spec["buckets"], jobs, spec["device"])
    Path(argv[1]).write_text(json.dumps([ran, failed]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
