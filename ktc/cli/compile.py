"""`ktc compile MODEL_DIR -o OUT`: the compiler, with progress."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ktc.cli.app import app, err, out


class RichCompileProgress:
    """Phases as a spinner line, weights as a bar (one step per tensor)."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.phase_task = progress.add_task("starting", total=None)
        self.weight_task = None

    def phase(self, name: str) -> None:
        self.p.update(self.phase_task, description=name)

    def weights_start(self, total: int) -> None:
        self.weight_task = self.p.add_task("tensors", total=total)

    def weight_done(self, name: str) -> None:
        if self.weight_task is not None:
            self.p.update(self.weight_task, advance=1, description=f"tensors  {name[-48:]}")


@app.command("compile")
def compile_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face model folder: config.json + *.safetensors (+ tokenizer)"),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact folder to write (e.g. qwen.ktc)"),
    target: str = typer.Option("cpu", help="cpu (this host's best CPU target), x86-avx2, x86-avx512, x86-amx, cuda"),
    cpu_target: str = typer.Option(None, help="CPU kernel target when --target is cuda (default: this host's)"),
    quant: str = typer.Option(None, help="Expert weights: int8, int4 (group-wise) or none (checkpoint dtype); "
                              "default int8 on the CPU, none (bf16) on cuda"),
    gpu_memory: str = typer.Option(None, help="GPU memory budget, e.g. 24GiB (GPU targets): what the attention, "
                                   "dense layers and KV cache leave is filled with the hottest routed experts; the "
                                   "rest run on the CPU"),
    gpu_quant: str = typer.Option(None, help="GPU-resident routed experts: none (bf16, default), int4 (w4a16) or "
                                  "fp8 (e4m3 weights; prefill w8a8 on fp8 tensor cores; sm89+ GPUs)"),
    gpu_dense_quant: str = typer.Option("none", help="GPU dense linears (attention projections, dense MLP, shared "
                                        "experts; never the lm_head): none (bf16, default), int4 (w4a16, "
                                        "group-wise) or fp8 (e4m3 weights, prefill w8a8; sm89+ GPUs): more GPU memory "
                                        "left for experts"),
    group_size: int = typer.Option(None, help="Routed experts' quantization group along K: 32, 64 or 128 "
                                   "(default: the largest dividing the expert dims; 32 is the most accurate, "
                                   "int8 under 1e-2 on Gaussian weights, and a little slower)"),
    max_context: int = typer.Option(None, help="Tokens the GPU KV cache is sized for (default min(4096, the "
                                    "model's))"),
    calibration: Path = typer.Option(None, help="Expert activation counts from `ktc calibrate`: the hottest "
                                     "experts go on the GPU"),
    rules: Path = typer.Option(None, help="Placement rules (TOML: [[rule]] match = regex, device, format)"),
    tuning: Path = typer.Option(None, help="`ktc tune` records to ship in the artifact (used on the host they "
                                "were measured on)"),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
    dump_ir: Path = typer.Option(None, help="Write the IR after each pass into this folder"),
    weights_free: bool = typer.Option(False, "--weights-free", help="Plan and kernels from config.json alone, no "
                                      "weights (no safetensors read): add them with `ktc pack OUTPUT --weights "
                                      "MODEL_DIR`"),
) -> None:
    """Compile a Hugging Face MoE model folder into a ktc artifact."""
    from ktc.compiler import compile_model

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        report = compile_model(model_dir, output, target=target, cpu_target=cpu_target, quant=quant, force=force,
                               gpu_memory=gpu_memory, gpu_quant=gpu_quant, gpu_dense_quant=gpu_dense_quant,
                               group_size=group_size, max_context=max_context,
                               calibration=calibration, rules=rules, tuning=tuning, dump_ir=dump_ir,
                               weights_free=weights_free, progress=RichCompileProgress(progress))
    g = report.graph
    moe = g.nodes_of("moe_experts") if g else []
    kernels = sorted({n.kernel for n in moe if n.kernel})
    out.print(f"[green]compiled[/] {model_dir} -> {report.output} in {report.seconds:.1f} s "
              f"({len(g.nodes)} ops, {len(moe)} MoE layers, kernels: {', '.join(kernels) or 'none'})")
    out.print("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items()))
