"""`ktc tune ARTIFACT`: measure the artifact's kernels on this host and keep the fastest configs.

GPU kernels (runtime/gpu/tune.py): each Triton launch of the graph's GPU nodes, at its real
shapes, over the family's candidate configs, timed with CUDA events at every batch bucket.
CPU expert kernels (runtime/cpu_tune.py): the thread count, per kernel and bucket. Records go to
ARTIFACT/tuning/<host id>.json (not with --cache-only) and to the user cache; both are written
after every kernel, so an interrupted or budget-limited tune keeps what it finished and a rerun
continues from there. Only the runtime's dependencies are needed (no TVM compiler, no weights
loaded for the GPU search: its inputs are random).

Then validation (runtime/tune_validate.py; `--no-validate` skips it): per batch bucket that got
records, the whole model (random weights for a weights-free plan) is timed with the bucket's
records and without, and records that make the step slower are dropped; the outcome per bucket
goes to the records file. The search gets at most (1 - VALIDATE_SHARE) of --budget, validation the
rest; a bucket the budget runs out before keeps its records pending: `ktc.load` applies only
validated records (and --no-validate ones), and a rerun validates the pending ones.
`--report` prints each kernel's default vs tuned time and the validation table; it tunes nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ktc.cli.app import app, err, out
from ktc.errors import ArtifactError, KtcError

VALIDATE_SHARE = 0.3      # of --budget kept for validation when the search would use it all


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
        TO_VALIDATE,
        TuningRecords,
        artifact_records_path,
        host_label,
        load_host_records,
        model_id,
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
    for col in ("kernel", "shape", "format", "batch", "default", "tuned", "speedup", "status", "tuned config"):
        table.add_column(col, justify="right" if col in ("batch", "default", "tuned", "speedup") else "left")
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    for kernel, shape, fmt, batch, rec in rows:
        table.add_row(kernel, shape, fmt, str(batch), _fmt_s(rec.default_seconds), _fmt_s(rec.seconds),
                      f"{rec.speedup:.2f}x", rec.status, _changes(rec))
    _wide().print(table)
    gain = math.exp(sum(math.log(r[4].speedup) for r in rows) / len(rows))
    where = user_records_path(host) if cache_only or not art.records else artifact_records_path(artifact, host)
    out.print(f"{len(rows)} records (from {where}); geometric mean speedup over the defaults {gain:.2f}x",
              soft_wrap=True)
    print_validation(records, model_id(manifest.data["graph"]))
    pending = sum(1 for r in rows if r[4].status in TO_VALIDATE)
    if pending:
        out.print(f"{pending} records not validated yet (pending ones are not applied): run `ktc tune {artifact}` "
                  "to validate them", soft_wrap=True)


def _wide() -> Console:
    return out if out.is_terminal else Console(highlight=False, width=200)   # a pipe gets whole rows


def _kept(e: dict[str, Any]) -> str:
    if e.get("state") != "validated":
        return str(e.get("state"))
    kept, total = int(e["kept"]), int(e["records"])
    word = "yes" if kept == total else "no" if kept == 0 else "partly"
    return f"{word} ({kept}/{total})"


def print_validation(records: Any, model: str) -> None:
    """The validation table: per bucket what was timed, untuned vs tuned ms, and which records were kept."""
    from ktc.runtime.tune_validate import validation_rows

    rows = validation_rows(records, model)
    if not rows:
        return
    table = Table(title="validation: whole step, median of interleaved rounds", show_edge=False)
    for col in ("bucket", "step", "untuned", "tuned", "ratio", "kept"):
        table.add_column(col, justify="left" if col in ("step", "kept") else "right")
    notes = []
    for b, e in rows:
        u, t = e.get("untuned_ms"), e.get("tuned_ms")
        table.add_row(str(b), str(e.get("step", "")), "-" if u is None else f"{u:.3f} ms",
                      "-" if t is None else f"{t:.3f} ms", "-" if u is None or t is None else f"{t / u:.3f}",
                      _kept(e))
        if e.get("note"):
            notes.append(f"bucket {b}: {e['note']}")
    _wide().print(table)
    for n in notes:
        out.print(f"  {escape(n)}", soft_wrap=True)


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
    report: bool = typer.Option(False, "--report", help="Print each kernel's default vs tuned time and the "
                                "validation table; tune nothing"),
    cache_only: bool = typer.Option(False, "--cache-only", help="Write records to the user cache only, not into "
                                    "ARTIFACT/tuning/ (for a read-only artifact)"),
    retune: bool = typer.Option(False, "--retune", help="Measure again what is already recorded"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Time the whole model at each tuned "
                                  "bucket with and without its records and drop records that make it slower "
                                  "(--no-validate: apply the searched records unchecked)"),
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="Processes that compile the GPU kernel candidates "
                             "before the search times them (default: one per core less one, at most 8, as many "
                             "as the GPU's free memory allows; 1: compile while searching)"),
) -> None:
    """Time the artifact's GPU kernel configs and CPU kernel thread counts on this host; keep the best."""
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.tuning import (
        PENDING,
        TuningRecords,
        artifact_records_path,
        host_key,
        host_label,
        parse_batch_sizes,
        parse_budget,
        save_merged,
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
    if manifest.cpu:
        if manifest.data["weights"].get("state") == "pending":
            err.print("[yellow]note:[/] a weights-free plan: the CPU expert kernels are timed on random weights "
                      "(their time does not depend on the values)", soft_wrap=True)
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
    # this artifact's records (every bucket), and the cache's of the kernels to tune here (another
    # artifact's search: re-validated for this model, unless the cache is where this one keeps its own)
    work = TuningRecords(host, dict(art.records), {m: dict(v) for m, v in art.validation.items()})
    reused = 0
    for k in keys:
        if retune:
            work.records.pop(k, None)
        elif k not in work.records and k in cache.records:
            work.records[k] = cache.records[k] if cache_only else replace(cache.records[k], status=PENDING)
            reused += 1
    if cache_only:
        for m, v in cache.validation.items():
            work.validation.setdefault(m, {}).update(v)

    def save(rec: Any) -> None:
        if not cache_only:
            work.save(art_path)
        save_merged(cache_path, TuningRecords(host, {rec.key: rec}))

    if reused and not cache_only:
        work.save(art_path)      # records of the same kernels tuned before (user cache) join the artifact's
    pending = [t.key.id() for _, tasks, _ in groups for t in tasks if t.key.id() not in work.records]
    out.print(f"tuning {artifact} on {host_label(host)}: {len(pending)} kernel x batch tasks to measure, "
              f"{len(keys) - len(pending)} already recorded" + (f", budget {budget}" if budget else ""), soft_wrap=True)
    errors: list[str] = []

    def failed(task: Any, config: dict, e: Exception) -> None:
        errors.append(f"{task.key.id()} {config}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    start = _clock()
    search_s = budget_s * (1 - VALIDATE_SHARE) if budget_s is not None and validate else budget_s
    _precompile(artifact, buckets, groups, work, jobs, search_s)
    done, stopped = _search(groups, work, start, search_s, save, failed)
    groups.clear()        # the search's tasks and their random inputs: freed before the model is loaded
    left_over = [k for k in pending if k not in work.records]
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
    _validate_phase(artifact, manifest, work, buckets, validate, cache_only, art_path, cache_path,
                    over=lambda: budget_s is not None and _clock() - start >= budget_s)


def _precompile(artifact: Path, buckets: list[int], groups: list[tuple[str, list, Any]], work: Any,
                jobs: int | None, search_s: float | None) -> None:
    """Compile the GPU tasks' candidates in parallel first (runtime/gpu/precompile.py), within the search's
    time; the search then loads them from Triton's cache."""
    todo = [t for label, tasks, _ in groups if label == "GPU" for t in tasks if t.key.id() not in work.records]
    if not todo:
        return
    from ktc.runtime.gpu.precompile import default_workers, precompile

    workers = default_workers() if jobs is None else jobs
    if workers <= 1:
        return
    with err.status(f"compiling the GPU kernel candidates on {workers} processes"):
        res = precompile(artifact, buckets, todo, workers, timeout_s=search_s)
    why = "" if res.finished else " (stopped: the budget ran out)"
    out.print(f"compiled {res.ran} of {res.jobs} distinct GPU kernel configs on {res.workers} processes in "
              f"{res.seconds:.0f} s{why}" + (f"; {res.failed} did not run there" if res.failed else ""),
              soft_wrap=True)
    if res.error:
        err.print(f"[dim]note: a compile worker failed ({escape(res.error)}); the search compiles its share[/]",
                  soft_wrap=True)


def _search(groups: list[tuple[str, list, Any]], work: Any, start: float, search_s: float | None, save: Any,
            failed: Any) -> tuple[list[str], bool]:
    """The per-kernel search of every group's tasks not yet in `work`, within search_s seconds of
    `start`; (the keys recorded, whether the budget stopped it)."""
    from ktc.runtime.tuning import tune

    done: list[str] = []
    stopped = False
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        for label, tasks, timer in groups:
            todo = [t for t in tasks if t.key.id() not in work.records]
            if not todo:
                continue
            left = None if search_s is None else search_s - (_clock() - start)
            if left is not None and left <= 0:
                stopped = True
                break
            bar = _Bar(progress, len(todo), label)
            got = tune(todo, work, timer, budget_s=left, on_record=save, on_task=bar.on_task, clock=_clock,
                       on_error=failed)
            done += got
            finished = bar.started == len(todo) and (left is None or _clock() - start < search_s)
            bar.close(finished)
            stopped = stopped or not finished
    return done, stopped


def _validate_phase(artifact: Path, manifest: Any, work: Any, buckets: list[int], validate: bool, cache_only: bool,
                    art_path: Path, cache_path: Path, over: Any) -> None:
    """Validate the records of every bucket that has records to validate (runtime/tune_validate.py),
    saving after each bucket; with validate=False mark them unchecked (applied without validation)."""
    import gc

    from ktc.runtime import tune_validate
    from ktc.runtime.tuning import TO_VALIDATE, UNCHECKED, TuningRecords, model_id, save_merged

    notes: list[str] = []
    prefixes = _artifact_prefixes(manifest, notes)

    def mine(key: str) -> bool:
        return key[: key.rindex("|b") + 2] in prefixes

    def save(keys: list[str], model: str | None = None, bucket: int | None = None) -> None:
        if not cache_only:
            work.save(art_path)
        part = TuningRecords(work.host, {k: work.records[k] for k in keys})
        if model is not None:
            part.validation = {model: {str(bucket): work.validation[model][str(bucket)]}}
        save_merged(cache_path, part)

    todo = tune_validate.buckets_to_validate(work, mine)
    if not todo:
        return
    if not validate:
        keys = [k for k, r in work.records.items() if r.status in TO_VALIDATE and mine(k)]
        for k in keys:
            work.records[k].status = UNCHECKED
        save(keys)
        out.print(f"--no-validate: {len(keys)} records applied without validation", soft_wrap=True)
        return
    model = model_id(manifest.data["graph"])
    if over():
        out.print(f"not validated (the budget ran out): the records of buckets {', '.join(map(str, todo))} are "
                  f"not applied until `ktc tune {artifact}` validates them", soft_wrap=True)
        return
    gc.collect()
    _empty_cuda_cache()
    t0 = time.monotonic()
    try:
        with err.status("loading the model to validate the records"):
            bench = tune_validate.load_bench(manifest, sorted({*buckets, *todo}))
    except (KtcError, RuntimeError, OSError, ImportError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        out.print(f"not validated: the model does not load here ({escape(first)}); the records of buckets "
                  f"{', '.join(map(str, todo))} are not applied", soft_wrap=True)
        return
    load_s = time.monotonic() - t0

    def on_bucket(b: int, entry: dict[str, Any]) -> None:
        save([k for k, r in work.records.items() if r.bucket == b and mine(k)], model, b)

    with err.status("validating") as status:
        outcomes = tune_validate.validate(work, bench, model, keep=mine, over=over, on_bucket=on_bucket,
                                          on_start=lambda b, step: status.update(f"validating bucket {b}: {step}"))
    del bench
    gc.collect()
    _empty_cuda_cache()
    states = [e.get("state") for e in outcomes.values()]
    print_validation(TuningRecords(work.host, validation={model: {str(b): e for b, e in outcomes.items()}}), model)
    out.print(f"validated {states.count('validated')} of {len(outcomes)} buckets (model loaded in {load_s:.0f} s); "
              f"outcomes saved to {cache_path}" + ("" if cache_only else f" and {art_path}"), soft_wrap=True)
    if "unvalidated" in states or "error" in states:
        out.print(f"records of unvalidated buckets are not applied: run `ktc tune {artifact}` again to validate them",
                  soft_wrap=True)


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
