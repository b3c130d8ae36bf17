"""`ktc targets`: every target ktc can compile for, and which this host can run."""

from __future__ import annotations

from rich.table import Table

from ktc.cli.app import app, out


@app.command("targets")
def targets_cmd() -> None:
    """List compile targets and mark the ones this host can run."""
    from ktc.targets import all_targets, best_host_cpu_target

    best = best_host_cpu_target()
    table = Table(show_edge=False)
    for col in ("target", "runs here", "needs", "description"):
        table.add_column(col)
    for t in all_targets():
        missing = t.missing_features()
        here = "[green]yes[/]" + (" (default)" if best and best.name == t.name else "") if t.runs_here() else (
            f"[red]no[/] (lacks {', '.join(missing)})" if missing else "[red]no[/] (not x86-64)")
        table.add_row(t.name, here, " ".join(t.required_features), t.description)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    table.add_row("cuda", f"[green]yes[/] ({gpu})" if gpu else "[red]no[/] (no CUDA GPU visible)", "NVIDIA GPU",
                  "Triton GPU kernels, whole model on one GPU (GQA models)")
    out.print(table)
