"""`ktc demo`: make a tiny model, compile it for this CPU, run it — no download needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from ktc.cli.app import app, out


@app.command("demo")
def demo_cmd(
    arch: str = typer.Option("qwen3_moe", help="Architecture of the tiny model"),
    workdir: Path = typer.Option(Path("ktc-demo"), help="Where the tiny model and its artifact go"),
    prompt: str = typer.Option("hello world", help="Prompt to run"),
) -> None:
    """Compile and run a tiny random-weight MoE model end to end, then show how to use a real one."""
    model_dir, artifact = workdir / f"tiny-{arch}", workdir / f"tiny-{arch}.ktc"
    shutil.rmtree(model_dir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = [
        (f"[bold]1. make[/] a tiny random {arch} model", ["tiny", arch, str(model_dir)]),
        ("[bold]2. compile[/] it for this CPU", ["compile", str(model_dir), "-o", str(artifact), "--target", "cpu",
                                                "--force"]),
        ("[bold]3. run[/] it (random weights, so the text is gibberish)", ["run", str(artifact), "--prompt", prompt,
                                                                           "--max-new-tokens", "16"]),
    ]
    for title, argv in steps:   # through the CLI itself, so every option keeps its command-line default
        out.print(f"{title}:  ktc {' '.join(argv)}")
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code != 0:
            raise typer.Exit(code)
    out.print("\n[bold]With a real model[/] (a Hugging Face folder with config.json and *.safetensors):\n"
              "  ktc compile ./Qwen3-30B-A3B -o qwen.ktc --target cpu --quant int8\n"
              "  ktc run qwen.ktc --prompt \"Hello\" --max-new-tokens 64\n"
              "  ktc inspect qwen.ktc")
