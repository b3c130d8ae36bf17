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
    from ktc.cli.compile import compile_cmd
    from ktc.cli.run import run_cmd
    from ktc.cli.tiny import tiny_cmd

    model_dir, artifact = workdir / f"tiny-{arch}", workdir / f"tiny-{arch}.ktc"
    shutil.rmtree(model_dir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    out.print(f"[bold]1. make[/] a tiny random {arch} model:  ktc tiny {arch} {model_dir}")
    tiny_cmd(arch=arch, out_dir=model_dir, layers=2, seed=0, tokenizer=True)
    out.print(f"[bold]2. compile[/] it for this CPU:  ktc compile {model_dir} -o {artifact} --target cpu --force")
    compile_cmd(model_dir=model_dir, output=artifact, target="cpu", cpu_target=None, quant=None, gpu_memory=None,
                gpu_quant=None, max_context=None, calibration=None, rules=None, force=True, dump_ir=None)
    out.print(f"[bold]3. run[/] it (random weights, so the text is gibberish):  ktc run {artifact} --prompt ...")
    run_cmd(artifact=artifact, prompt=prompt, tokens=None, max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0,
            seed=None, verify="full")
    out.print("\n[bold]With a real model[/] (a Hugging Face folder with config.json and *.safetensors):\n"
              "  ktc compile ./Qwen3-30B-A3B -o qwen.ktc --target cpu --quant int8\n"
              "  ktc run qwen.ktc --prompt \"Hello\" --max-new-tokens 64\n"
              "  ktc inspect qwen.ktc")
