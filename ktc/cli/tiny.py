"""`ktc tiny ARCH OUT_DIR`: write a tiny random-weight model folder (needs ktc[compile])."""

from __future__ import annotations

from pathlib import Path

import typer

from ktc.cli.app import app, out
from ktc.errors import KtcError


@app.command("tiny")
def tiny_cmd(
    arch: str = typer.Argument("qwen3_moe", help="qwen2_moe, qwen3_moe, mixtral, deepseek_v2 or deepseek_v3"),
    out_dir: Path = typer.Argument(Path("tiny-moe"), help="Folder to write"),
    layers: int = typer.Option(2, help="Decoder layers"),
    seed: int = typer.Option(0, help="Random seed"),
    tokenizer: bool = typer.Option(True, help="Also train and save a tiny tokenizer.json"),
) -> None:
    """Write a tiny random-weight Hugging Face MoE model (for trying ktc without a download)."""
    from ktc.tiny import ARCHITECTURES, make_tiny_model

    if arch not in ARCHITECTURES:
        raise KtcError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KtcError(f"{out_dir} exists and is not empty: choose another folder")
    make_tiny_model(arch, out_dir, seed=seed, num_layers=layers, tokenizer=tokenizer)
    out.print(f"wrote a tiny {arch} model to {out_dir}")
