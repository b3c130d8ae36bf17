"""`ktc inspect ARTIFACT`: graph, placement, formats, sizes, targets — without loading weights."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table

from ktc.cli.app import app, out
from ktc.errors import KtcError
from ktc.ir import Graph


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command("inspect")
def inspect_cmd(
    artifact: Path = typer.Argument(..., help="A compiled artifact"),
    graph: bool = typer.Option(False, "--graph", help="Print the whole lowered IR"),
    png: Path | None = typer.Option(None, "--png", help="Write a picture of the expert placement (layers x experts)"),
    onnx: Path | None = typer.Option(None, "--onnx", help="Write the lowered graph as ONNX, for viewing in Netron"),
) -> None:
    """Show what an artifact holds: ops, placement, formats, sizes, kernels, targets."""
    from ktc.runtime.artifact import read_manifest
    from ktc.targets import host_cpu_features

    if onnx is not None:   # fail before printing anything when the export cannot happen
        from ktc.onnx_export import require_onnx

        require_onnx()
    m = read_manifest(artifact)
    g = m.graph
    d = m.data
    cfg = g.config
    out.print(f"[bold]{artifact}[/]  ktc {d.get('ktc_version')}, format {d['format_version']}, "
              f"created {d.get('created')}")
    out.print(f"model: {cfg.get('model_type')} from {d.get('model', {}).get('source')}: {cfg.get('num_hidden_layers')} "
              f"layers, hidden {cfg.get('hidden_size')}, vocab {cfg.get('vocab_size')}, "
              f"context {cfg.get('max_position_embeddings')}")
    comp = d.get("compile", {})
    out.print(f"compiled with: --target {comp.get('target')} (CPU {comp.get('cpu_target')}), "
              f"--quant {comp.get('quant')}")

    ops = Table(title="ops", show_edge=False)
    for col in ("op", "count", "device", "format", "kernel"):
        ops.add_column(col)
    rows: dict[tuple, int] = Counter((n.op, n.device or "-", n.format or "-", n.kernel or "-") for n in g.nodes)
    for (op, dev, fmt, kern), count in sorted(rows.items()):
        ops.add_row(op, str(count), dev, fmt, kern)
    out.print(ops)

    sizes: dict[tuple, float] = defaultdict(float)
    stored = {k: v["size"] for k, v in m.files.items()}
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5, "fp8": 1}
    for w in g.weights.values():
        sizes[(w.device or "-", w.format or w.dtype)] += w.numel * bytes_per.get(w.format or w.dtype, 4)
    wt = Table(title="weights (payload, scales excluded)", show_edge=False)
    for col in ("device", "format", "size"):
        wt.add_column(col)
    for (dev, fmt), b in sorted(sizes.items()):
        wt.add_row(dev, fmt, _size(b))
    out.print(wt)
    out.print(f"files: {len(stored)}, {_size(sum(stored.values()))} on disk; tokenizer: {d.get('tokenizer') or 'none'}")

    cpu = m.cpu
    if cpu:
        missing = [f for f in cpu.get("required_features", []) if f not in host_cpu_features()]
        state = ("[green]runs on this host[/]" if not missing
                 else f"[red]cannot run here (lacks {', '.join(missing)})[/]")
        out.print(f"CPU target: {cpu['target']} ({cpu['lib']}, {len(cpu.get('kernels', {}))} kernels): {state}")
    if any(n.device not in (None, "cpu") for n in g.nodes):
        _print_placement(g)
    from ktc.runtime.tuning import tuning_summary

    out.print(tuning_summary(artifact), markup=False)
    if graph:
        out.print(str(g), markup=False)
    if png is not None:
        from ktc.placement_picture import write_placement_png

        out.print(f"wrote the placement picture to {_write(png, lambda p: write_placement_png(g, p))}")
    if onnx is not None:
        from ktc.onnx_export import export_onnx

        out.print(f"wrote the ONNX graph to {_write(onnx, lambda p: export_onnx(g, p))}")


_PLACEMENT_BYTES = {"gpu_memory_budget": "budget", "gpu_bytes_planned": "planned", "dense_gpu_bytes": "dense weights",
                    "kv_cache_bytes": "KV cache", "reserve_bytes": "reserve"}


def _print_placement(g: Graph) -> None:
    """The GPU/CPU expert split and, when the placement pass recorded it, its GPU byte accounting."""
    from ktc.placement_picture import placement_summary

    out.print(placement_summary(g), markup=False)
    plan = g.config.get("placement")
    if not plan:
        return
    parts = [f"{label} {_size(plan[k]) if plan[k] else 'none'}" for k, label in _PLACEMENT_BYTES.items() if k in plan]
    if "max_context" in plan:
        parts.append(f"max context {plan['max_context']}")
    if "gpu_experts" in plan:
        fmt = plan.get("gpu_expert_format", "?")
        parts.append(f"{plan['gpu_experts']} GPU experts ({'bf16' if fmt == 'none' else fmt})")
    if "cpu_experts" in plan:
        parts.append(f"{plan['cpu_experts']} CPU experts")
    if "calibrated" in plan:
        parts.append("calibrated" if plan["calibrated"] else "not calibrated")
    out.print("GPU memory plan: " + ", ".join(parts), markup=False)


def _write(path: Path, write: Callable[[Path], object]) -> Path:
    """Run `write(path)`, turning a missing folder or an unwritable path into a KtcError."""
    if not path.parent.exists():
        raise KtcError(f"cannot write {path}: the folder {path.parent} does not exist: create it first")
    try:
        write(path)
    except OSError as e:
        raise KtcError(f"cannot write {path}: {e.strerror or e}; choose another path") from None
    return path
