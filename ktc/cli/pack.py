"""`ktc pack PLAN --weights MODEL_DIR [-o OUT]`: weights into a plan compiled with --weights-free.

Needs only the runtime's dependencies (torch, safetensors): a plan can be compiled on one
machine from config.json alone and packed where the checkpoint is.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ktc.cli.app import app, err, out
from ktc.cli.compile import RichCompileProgress


@app.command("pack")
def pack_cmd(
    plan: Path = typer.Argument(..., help="Plan (artifact folder) to pack, e.g. from `ktc compile --weights-free`"),
    weights: Path = typer.Option(None, "--weights", help="Hugging Face model folder (config.json + *.safetensors) "
                                 "whose weights go into the plan"),
    output: Path = typer.Option(None, "-o", "--output", help="Write a new artifact here and leave PLAN as it is "
                                "(default: pack PLAN in place)"),
    random: bool = typer.Option(False, "--random", help="Random weights instead of a checkpoint (tests, demos)"),
    seed: int = typer.Option(0, help="Seed of --random"),
    std: float = typer.Option(0.02, help="Standard deviation of --random weights"),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
) -> None:
    """Write a plan's weights: converted, quantized and packed exactly as `ktc compile` would."""
    from ktc.pack import pack

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        report = pack(plan, weights, output, random=random, seed=seed, std=std, force=force,
                      progress=RichCompileProgress(progress))
    source = f"random weights (seed {seed})" if random else str(weights)
    out.print(f"[green]packed[/] {source} -> {report.output}: {report.weight_bytes / 2**20:.1f} MiB of weights "
              f"in {report.seconds:.1f} s")
