"""`ktc tune ARTIFACT`: measure the artifact's kernels on this host and keep the fastest configs.

GPU kernels (runtime/gpu/tune.py): each Triton launch of the graph's GPU nodes, at its real
shapes, over the family's candidate configs, timed with CUDA events at every batch bucket.
CPU expert kernels (runtime/cpu_tune.py): the thread count, per kernel and bucket. Records go to
ARTIFACT/tuning/<host id>.json (not with --cache-only) and to the user cache; both are written
after every kernel, so an interrupted or budget-limited tune keeps what it finished and a rerun
continues from there. Only the runtime's dependencies are needed (no TVM compiler, no weights
loaded for the GPU: its inputs are random). `ktc.load` applies the records of this host.
`--report` prints each kernel's default vs tuned time and tunes nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ktc.cli.app import app, err, out
from ktc.errors import ArtifactError


def _verify(manifest: Any) -> None:
    """Sizes of every listed file, sha256 of the kernels (they are about to run); weights are not
    loaded for the GPU and only one layer's for the CPU, so their hashes are left to `ktc run`."""
    from ktc.runtime.artifact import sha256_file, verify_files

    verify_files(manifest, hashes=False)
    for rel, meta in manifest.files.items():
        if rel.startswith("kernels/") and sha256_file(manifest.path / rel) != meta["sha256"]:
            raise ArtifactError(f"{manifest.path}: {rel} does not match its sha256 (changed or damaged); "
                                "recompile the artifact")


def _gpu_kernels(manifest: Any) -> Any:
    from ktc.runtime.gpu.kernels import load_kernels

    return load_kernels(manifest.path / manifest.gpu["dir"] / "src")


def _artifact_prefixes(manifest: Any, notes: list[str]) -> set[str]:
    """Record key prefixes (kernel|shape|format|b) of this artifact's tunable kernels on this host."""
    from ktc.runtime.tuning import key_prefix

    prefixes: set[str] = set()
    graph = manifest.graph
    if manifest.gpu:
        try:
            from ktc.runtime.gpu.tune import node_tunables

            kernels = _gpu_kernels(manifest)
            for node in graph.nodes:
                prefixes.update(key_prefix(t.kernel, t.shape, t.fmt) for t in node_tunables(graph, node, kernels))
        except Exception as e:  # noqa: BLE001 - no triton here: only the artifact's own file is shown
            notes.append(f"GPU kernels not enumerated here ({e})")
    if manifest.cpu:
        from ktc.runtime.cpu_experts import num_threads  # imports tvm_ffi: only for artifacts with CPU kernels
        from ktc.runtime.cpu_tune import kernel_key, lib_hash

        entry = {**manifest.cpu}
        h = lib_hash(entry, manifest.path / manifest.cpu["dir"], manifest.files)
        for name in entry.get("kernels", {}):
            prefixes.add(key_prefix(*kernel_key(entry, name, h, num_threads())))
    return prefixes


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _changes(rec: Any) -> str:
    if rec.default is None:
        return ", ".join(f"{k}={v}" for k, v in rec.config.items())
    diff = [f"{k}={v}" for k, v in rec.config.items() if rec.default.get(k) != v]
    return ", ".join(diff) if diff else "(default)"


def print_report(artifact: Path, manifest: Any, host: dict[str, str], cache_only: bool) -> None:
    from ktc.runtime.tuning import (
        TuningRecords,
        artifact_records_path,
        host_label,
        load_host_records,
        user_records_path,
    )

    records, notes = load_host_records(artifact, host)
    art, _ = TuningRecords.load(artifact_records_path(artifact, host), host)
    prefixes = _artifact_prefixes(manifest, notes)
    rows = []
    for key, rec in records.records.items():
        prefix = key[: key.rindex("|b") + 2]
        if key in art.records or prefix in prefixes:
            kernel, shape, fmt, _ = key.split("|")
            rows.append((kernel.split("#")[0], shape, fmt, int(key[len(prefix):]), rec))
    for n in notes:
        err.print(f"[dim]note: {n}[/]", soft_wrap=True)
    if not rows:
        out.print(f"no tuning records for {artifact} on this host ({host_label(host)}): run `ktc tune {artifact}`",
                  soft_wrap=True)
        return
    table = Table(title=f"tuning records, {host_label(host)}", show_edge=False)
    for col in ("kernel", "shape", "format", "batch", "default", "tuned", "speedup", "tuned config"):
        table.add_column(col, justify="right" if col in ("batch", "default", "tuned", "speedup") else "left")
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    for kernel, shape, fmt, batch, rec in rows:
        table.add_row(kernel, shape, fmt, str(batch), _fmt_s(rec.default_seconds), _fmt_s(rec.seconds),
                      f"{rec.speedup:.2f}x", _changes(rec))
    (out if out.is_terminal else Console(highlight=False, width=200)).print(table)   # a pipe gets whole rows
    gain = math.exp(sum(math.log(r[4].speedup) for r in rows) / len(rows))
    where = user_records_path(host) if cache_only or not art.records else artifact_records_path(artifact, host)
    out.print(f"{len(rows)} records (from {where}); geometric mean speedup over the defaults {gain:.2f}x",
              soft_wrap=True)


def _clock() -> float:
    return time.monotonic()


class _Bar:
    """The progress bar's callbacks for tune(): one step per task started."""

    def __init__(self, progress: Progress, total: int, label: str):
        self.p = progress
        self.task = progress.add_task(label, total=total)
        self.started = 0

    def on_task(self, task: Any) -> None:
        if self.started:
            self.p.advance(self.task)
        self.started += 1
        k = task.key
        self.p.update(self.task, description=f"{k.kernel.split('#')[0]} {'x'.join(map(str, k.shape))} b{k.batch}")

    def close(self, finished: bool) -> None:
        if self.started and finished:
            self.p.advance(self.task)


@app.command("tune")
def tune_cmd(
    artifact: Path = typer.Argument(..., help="A compiled artifact"),
    budget: str = typer.Option(None, help="Stop after this long, e.g. 10m, 90s, 1h; a rerun continues"),
    batch_sizes: str = typer.Option(None, help="Token counts to tune for, e.g. 1,2,4,8 (each rounded up to its "
                                    "bucket; default every bucket 1..2048)"),
    report: bool = typer.Option(False, "--report", help="Print each kernel's default vs tuned time; tune nothing"),
    cache_only: bool = typer.Option(False, "--cache-only", help="Write records to the user cache only, not into "
                                    "ARTIFACT/tuning/ (for a read-only artifact)"),
    retune: bool = typer.Option(False, "--retune", help="Measure again what is already recorded"),
) -> None:
    """Time the artifact's GPU kernel configs and CPU kernel thread counts on this host; keep the best."""
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.tuning import (
        TuningRecords,
        artifact_records_path,
        host_key,
        host_label,
        parse_batch_sizes,
        parse_budget,
        save_merged,
        tune,
        user_records_path,
    )

    budget_s = parse_budget(budget)
    buckets = parse_batch_sizes(batch_sizes)
    manifest = read_manifest(artifact)
    host = host_key()
    if report:
        print_report(artifact, manifest, host, cache_only)
        return
    _verify(manifest)

    groups: list[tuple[str, list, Any]] = []
    if manifest.gpu:
        import torch

        if torch.cuda.is_available():
            from ktc.runtime.gpu.tune import cuda_event_timer, gpu_tasks

            groups.append(("GPU", gpu_tasks(manifest.graph, _gpu_kernels(manifest), buckets), cuda_event_timer()))
        else:
            err.print("[yellow]note:[/] this host has no CUDA GPU: the GPU kernels are not tuned")
    if manifest.cpu and manifest.data["weights"].get("state") == "pending":
        err.print("[yellow]note:[/] a weights-free plan: the CPU expert kernels are timed on their weights, so they "
                  "are not tuned until `ktc pack` has written them", soft_wrap=True)
    elif manifest.cpu:
        from ktc.runtime.cpu_tune import cpu_tasks, load_cpu_kernels, wall_timer

        groups.append(("CPU", cpu_tasks(manifest, load_cpu_kernels(manifest), buckets=buckets), wall_timer()))

    if not any(tasks for _, tasks, _ in groups):
        out.print(f"nothing to tune in {artifact} on this host", soft_wrap=True)
        return
    art_path, cache_path = artifact_records_path(artifact, host), user_records_path(host)
    art, why = TuningRecords.load(art_path, host)
    if why:
        err.print(f"[yellow]note:[/] {why}", soft_wrap=True)
    cache, why = TuningRecords.load(cache_path, host)
    if why:
        err.print(f"[yellow]note:[/] {why}", soft_wrap=True)
    keys = {t.key.id() for _, tasks, _ in groups for t in tasks}
    work = TuningRecords(host, {k: r for k, r in {**cache.records, **art.records}.items()
                                if k in keys and not retune})
    reused = sum(1 for k in work.records if k not in art.records)

    def save(rec: Any) -> None:
        if not cache_only:
            work.save(art_path)
        save_merged(cache_path, TuningRecords(host, {rec.key: rec}))

    if reused and not cache_only:
        work.save(art_path)      # records of the same kernels tuned before (user cache) join the artifact's
    pending = [t for _, tasks, _ in groups for t in tasks if t.key.id() not in work.records]
    out.print(f"tuning {artifact} on {host_label(host)}: {len(pending)} kernel x batch tasks to measure, "
              f"{len(keys) - len(pending)} already recorded" + (f", budget {budget}" if budget else ""), soft_wrap=True)
    errors: list[str] = []

    def failed(task: Any, config: dict, e: Exception) -> None:
        errors.append(f"{task.key.id()} {config}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    start = _clock()
    done: list[str] = []
    stopped = False
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        for label, tasks, timer in groups:
            todo = [t for t in tasks if t.key.id() not in work.records]
            if not todo:
                continue
            left = None if budget_s is None else budget_s - (_clock() - start)
            if left is not None and left <= 0:
                stopped = True
                break
            bar = _Bar(progress, len(todo), label)
            got = tune(todo, work, timer, budget_s=left, on_record=save, on_task=bar.on_task, clock=_clock,
                       on_error=failed)
            done += got
            finished = bar.started == len(todo) and (left is None or _clock() - start < budget_s)
            bar.close(finished)
            stopped = stopped or not finished
    left_over = [t for t in pending if t.key.id() not in work.records]
    gains = [work.records[k].speedup for k in done]
    mean = math.exp(sum(math.log(g) for g in gains) / len(gains)) if gains else 1.0
    out.print(f"measured {len(done)} tasks in {_clock() - start:.0f} s (geometric mean speedup over the "
              f"defaults {mean:.2f}x); records: {cache_path}" + ("" if cache_only else f" and {art_path}"),
              soft_wrap=True)
    if errors:
        err.print(f"[dim]note: {len(errors)} candidate configs failed to run and were skipped; the first: "
                  f"{escape(errors[0])}[/]", soft_wrap=True)
    if left_over:
        why = "the budget ran out" if stopped else "their default config failed to run"
        out.print(f"{len(left_over)} tasks not recorded ({why}): run `ktc tune {artifact}` again to continue",
                  soft_wrap=True)
