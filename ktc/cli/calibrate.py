"""`ktc calibrate MODEL_DIR --prompts FILE -o calib.json`: expert activation counts for placement."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ktc.cli.app import app, err, out
from ktc.errors import KtcError


def read_prompts(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one prompt each."""
    if not path.is_file():
        raise KtcError(f"prompts file {path} does not exist: give a UTF-8 text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KtcError(f"prompts file {path} is not UTF-8 text: save it as UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise KtcError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def hot_share(counts: list[int], fraction: float = 0.25) -> float:
    """Share of a layer's slots taken by its hottest `fraction` of experts (at least one expert)."""
    total = sum(counts)
    if not total:
        return 0.0
    n = max(1, round(len(counts) * fraction))
    return sum(sorted(counts, reverse=True)[:n]) / total


def summary_table(data: dict) -> Table:
    """One row per MoE layer: hottest and coldest expert's share, share of the hottest quarter."""
    table = Table(title=None, box=None, pad_edge=False)
    for col in ("layer", "hottest expert", "coldest expert", "hottest 25% of experts", "unused experts"):
        table.add_column(col, justify="right")
    for layer, counts in sorted(data["layers"].items(), key=lambda kv: int(kv[0])):
        total = sum(counts) or 1
        hot = max(range(len(counts)), key=lambda e: (counts[e], -e))
        cold = min(range(len(counts)), key=lambda e: (counts[e], e))
        table.add_row(layer, f"#{hot} {counts[hot] / total:.1%}", f"#{cold} {counts[cold] / total:.1%}",
                      f"{hot_share(counts):.1%}", f"{sum(1 for c in counts if c == 0)}/{len(counts)}")
    return table


@app.command("calibrate")
def calibrate_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face model folder: config.json + *.safetensors + tokenizer"),
    prompts: Path = typer.Option(..., "--prompts", help="UTF-8 text file, one prompt per line (blank lines skipped)"),
    output: Path = typer.Option(Path("calib.json"), "-o", "--output", help="Calibration file to write"),
    max_tokens: int = typer.Option(4096, help="Stop after this many prompt tokens"),
    device: str = typer.Option("auto", help="Where the forward passes run: auto (cuda if available), cpu, cuda"),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
) -> None:
    """Count how often each routed expert is chosen on some prompts (for `ktc compile --calibration`)."""
    from ktc.calibrate import calibrate, write_calibration

    if output.exists() and not force:
        raise KtcError(f"{output} already exists: choose another -o path or pass --force to replace it")
    texts = read_prompts(prompts)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("loading the model", total=None)

        def step(done: int, total: int, tokens: int) -> None:
            bar.update(task, description=f"prompts ({tokens} tokens)", completed=done, total=total)

        data = calibrate(model_dir, texts, max_tokens=max_tokens, device=device, progress=step)
    write_calibration(output, data)
    out.print(f"[green]calibrated[/] {model_dir} -> {output}: {data['tokens']} tokens from {data['prompts']} "
              f"prompt(s), top-{data['top_k']}, {len(data['layers'])} MoE layers")
    out.print(summary_table(data))
