"""`ktc bench ARTIFACT`: prefill and decode tokens/s on this host, and CPU/GPU overlap per layer.

The measuring is runtime/bench.py's; this module parses the options, checks them against the
model's context before loading anything, loads the artifact sized for what is asked, and prints
(and optionally writes as JSON) the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ktc.cli.app import app, err, out
from ktc.errors import InputError, KtcError

DEFAULT_LENGTHS = (128, 512, 2048)
DEFAULT_CONTEXT = 1024
MANY_LAYERS = 8   # more CPU-expert layers than this: a summary row instead of one row per layer


def parse_lengths(text: str) -> list[int]:
    """'128,512' -> [128, 512]; a one-line InputError for anything else."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    try:
        lengths = [int(t) for t in parts]
    except ValueError:
        raise InputError(f"--prompt-lengths {text!r} is not a comma-separated list of whole numbers, "
                         "e.g. --prompt-lengths 128,512") from None
    if not lengths:
        raise InputError("--prompt-lengths is empty: give at least one length, e.g. --prompt-lengths 128,512")
    if min(lengths) < 1:
        raise InputError(f"--prompt-lengths {text!r}: every length must be at least 1")
    return list(dict.fromkeys(lengths))


def plan(lengths: list[int] | None, context: int | None, steps: int, model_context: int | None,
         warmup: int) -> tuple[list[int], int, int]:
    """(prompt lengths, decode context, the max_context to load with), checked against the model's context.
    Defaults are clipped to it; lengths asked for explicitly must fit."""
    limit = model_context
    if lengths is None:
        lengths = sorted({min(n, limit) if limit else n for n in DEFAULT_LENGTHS})
    elif limit and max(lengths) > limit:
        raise InputError(f"--prompt-lengths: {max(lengths)} tokens is longer than the model context ({limit} tokens)")
    if context is None:
        context = min(DEFAULT_CONTEXT, limit - steps - warmup) if limit else DEFAULT_CONTEXT
        if context < 1:
            raise InputError(f"--decode-steps {steps} leaves no room for a prompt in the model context "
                             f"({limit} tokens)")
    elif context < 1:
        raise InputError(f"--context must be at least 1, got {context}")
    elif limit and context + steps + warmup > limit:
        raise InputError(f"--context {context} + --decode-steps {steps} (+ {warmup} warm-up steps) is longer "
                         f"than the model context ({limit} tokens)")
    return lengths, context, max(max(lengths), context + steps + warmup)


def _load(artifact: Path, batch: int, max_context: int) -> Any:
    from ktc.runtime.loader import load_artifact

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("checking", total=None)

        def loading(stage: str, rel: str, done: int, total: int) -> None:
            bar.update(task, description=f"{'checking' if stage == 'verify' else 'loading'} {rel}",
                       completed=done, total=total)

        return load_artifact(artifact, verify="sizes", max_batch_size=batch, max_context=max_context,
                             progress=loading)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _layers_table(title: str, layers: dict | None) -> Table | None:
    if not layers or not layers["rows"]:
        return None
    t = Table(title=title, show_edge=False)
    s = layers["summary"]
    if len(layers["rows"]) <= MANY_LAYERS:
        for col in ("layer", "calls", "tokens/call", "CPU ms", "wait ms", "GPU ms beside", "overlap"):
            t.add_column(col, justify="right")
        for r in layers["rows"]:
            t.add_row(str(r["layer"]), str(r["calls"]), f"{r['tokens']:.1f}", _ms(r["cpu_ms"]), _ms(r["wait_ms"]),
                      _ms(r["gpu_ms"]), _pct(r["overlap"]))
    else:
        for col in ("layers", "overlap mean", "min", "max"):
            t.add_column(col, justify="right")
        t.add_row(str(s["layers"]), _pct(s["overlap_mean"]), _pct(s["overlap_min"]), _pct(s["overlap_max"]))
    t.caption = (f"sum over layers per pass: CPU {s['cpu_ms_sum']:.2f} ms, waiting for inputs "
                 f"{s['wait_ms_sum']:.2f} ms, GPU beside the CPU {_ms(s['gpu_ms_sum'])} ms "
                 f"(overall overlap {_pct(s['overall_overlap'])})")
    if s["step_ms"]:
        t.caption += f"; the pass takes {s['step_ms']:.2f} ms (CPU {s['cpu_share']:.0%}, wait {s['wait_share']:.0%})"
    return t


def _print(prefill: list[dict], decode: dict) -> None:
    pt = Table(title="prefill", show_edge=False)
    for col in ("prompt", "batch", "ms", "tokens/s"):
        pt.add_column(col, justify="right")
    for r in prefill:
        pt.add_row(str(r["length"]), str(r["batch"]), f"{r['ms']:.2f}", f"{r['tokens_per_s']:,.1f}")
    out.print(pt)
    dt = Table(title="decode (batch 1)", show_edge=False)
    for col in ("context", "steps", "ms/token", "tokens/s", "prefill ms"):
        dt.add_column(col, justify="right")
    dt.add_row(str(decode["context"]), str(decode["steps"]), f"{decode['ms_per_token']:.3f}",
               f"{decode['tokens_per_s']:,.1f}", f"{decode['prefill_ms']:.2f}")
    out.print(dt)
    longest = max(prefill, key=lambda r: r["length"])
    for table in (_layers_table("CPU experts, decode", decode["layers"]),
                  _layers_table(f"CPU experts, prefill of {longest['length']} tokens", longest["layers"])):
        if table is not None:
            out.print(table)


@app.command("bench")
def bench_cmd(
    artifact: Path = typer.Argument(..., help="A compiled artifact"),
    prompt_lengths: str = typer.Option(None, help="Prefill prompt lengths, e.g. 128,512,2048 "
                                       "(default: those, clipped to the model's context)"),
    batch: int = typer.Option(1, help="Batch size of the prefill runs"),
    context: int = typer.Option(None, help=f"Prompt tokens before the decode steps (default {DEFAULT_CONTEXT}, "
                                "clipped to the model's context)"),
    decode_steps: int = typer.Option(64, help="Timed decode steps per run"),
    repeats: int = typer.Option(3, help="Timed runs per figure (the median is reported)"),
    seed: int = typer.Option(0, help="Seed of the random prompts"),
    json_path: Path = typer.Option(None, "--json", help="Also write every figure and the host's facts here"),
) -> None:
    """Measure prefill and decode tokens/s of a compiled model on this host."""
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.bench import DECODE_WARMUP, bench_decode, bench_prefill, host_facts

    for name, value in (("--batch", batch), ("--decode-steps", decode_steps), ("--repeats", repeats)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    lengths = parse_lengths(prompt_lengths) if prompt_lengths is not None else None
    manifest = read_manifest(artifact)
    model_context = manifest.data.get("graph", {}).get("config", {}).get("max_position_embeddings")
    lengths, context, max_context = plan(lengths, context, decode_steps, model_context, DECODE_WARMUP)
    if json_path is not None and json_path.is_dir():
        raise KtcError(f"--json {json_path} is a folder: give a file path")

    model = _load(artifact, batch, max_context)
    with err.status("prefill"):
        prefill = bench_prefill(model, lengths, batch=batch, repeats=repeats, seed=seed)
    with err.status("decode"):
        decode = bench_decode(model, context, decode_steps, repeats=repeats, seed=seed)
    _print(prefill, decode)
    if json_path is not None:
        compile_options = {k: v for k, v in manifest.data.get("compile", {}).items() if k != "passes"}
        report = {"artifact": str(artifact), "model": manifest.data.get("model"), "compile": compile_options,
                  "host": host_facts(), "device": "cuda" if getattr(model, "device", None) is not None else "cpu",
                  "options": {"repeats": repeats, "seed": seed, "batch": batch},
                  "prefill": prefill, "decode": decode}
        try:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise KtcError(f"cannot write --json {json_path}: {e.strerror or e}") from None
        err.print(f"[dim]wrote {json_path}[/]")
