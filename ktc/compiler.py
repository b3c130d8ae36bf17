"""`ktc compile`: HF folder -> capture -> IR -> passes -> codegen -> artifact, in numbered phases.

Like MLC-LLM's compile: one readable function of phases, an IR dump between them when asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ktc.errors import KtcError
from ktc.ir import Graph

TARGET_CHOICES = ("cpu", "auto", "x86-avx2", "x86-avx512", "x86-amx", "cuda")
QUANT_CHOICES = ("none", "int8", "int4")
GPU_QUANT_CHOICES = ("none", "int4", "fp8")
GPU_DENSE_QUANT_CHOICES = ("none", "int4", "fp8")


class CompileProgress(Protocol):
    """What the CLI shows while compiling; every method is optional to act on."""

    def phase(self, name: str) -> None: ...
    def weights_start(self, total: int) -> None: ...
    def weight_done(self, name: str) -> None: ...


@dataclass
class CompileReport:
    output: str
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    graph: Graph | None = None


def parse_size(text: str | int | None) -> int:
    """'24GiB' / '24GB' / '512MiB' / bytes -> bytes."""
    if text is None:
        return 0
    if isinstance(text, int):
        return text
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    s = text.strip().lower().removesuffix("b")
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * units[u])
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise KtcError(f"cannot read the size {text!r}: write it like 24GiB or 512MiB") from None


def _resolve_targets(target: str, cpu_target: str | None):
    from ktc import targets

    if target not in TARGET_CHOICES:
        raise KtcError(f"--target {target!r} is not one of {', '.join(TARGET_CHOICES)}")
    device = "cuda" if target == "cuda" else "cpu"
    wanted = cpu_target or (target if target not in ("cuda",) else "cpu")
    try:
        return device, targets.resolve_cpu_target(wanted)
    except KeyError:
        raise KtcError(f"unknown CPU target {wanted!r}: choose one of {', '.join(targets.CPU_TARGET_NAMES)}") from None
    except LookupError as e:
        raise KtcError(f"{e}: name a target to cross-compile for, e.g. --target x86-avx2") from None


def _read_tuning(path: str | Path):
    """`ktc tune` records (JSON) to ship in the artifact's tuning/ folder; KtcError if unreadable."""
    from ktc.runtime.tuning import TuningRecords

    path = Path(path)
    if not path.is_file():
        raise KtcError(f"tuning records {path} do not exist: give a file written by `ktc tune` "
                       "(ARTIFACT/tuning/<host>.json or the user cache's)")
    try:
        return TuningRecords.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise KtcError(f"{path} is not a ktc tuning records file ({str(e).splitlines()[0]}): "
                       "give a file written by `ktc tune`") from None


def compile_model(
    model_dir: str | Path,
    output: str | Path,
    target: str = "cpu",
    cpu_target: str | None = None,
    quant: str | None = None,
    force: bool = False,
    gpu_memory: str | int | None = None,
    gpu_quant: str | None = None,
    gpu_dense_quant: str = "none",
    group_size: int | None = None,
    max_context: int | None = None,
    calibration: str | Path | None = None,
    rules: str | Path | None = None,
    tuning: str | Path | None = None,
    dump_ir: str | Path | None = None,
    progress: CompileProgress | None = None,
    options: dict[str, Any] | None = None,
    weights_free: bool = False,
) -> CompileReport:
    """Compile the Hugging Face model folder `model_dir` into the artifact `output`.

    weights_free: the plan and its kernels from config.json alone (no safetensors read, weight
    dtypes taken from config.json) and no weight shards: `ktc pack` (ktc.pack) adds them later.
    gpu_quant: the GPU-resident routed experts' format: "none" (bf16), "int4" (w4a16) or "fp8" (e4m3
    weights, group-wise float32 scales; decode weight-only, prefill w8a8 on fp8 tensor cores with activations
    quantized per token and group; needs an sm89+ NVIDIA GPU, or AMD, weight-only there, at run time).
    gpu_dense_quant: "int4" / "fp8" stores the GPU dense linears (attention projections, dense MLPs, shared
    experts; not the lm_head) int4 w4a16 / fp8, group-wise (passes/quantization.py); "none" keeps them bf16.
    group_size: the routed experts' quantization group along K (32, 64 or 128; default the largest dividing
    the expert dims)."""
    from ktc.artifact import copy_tokenizer, staging_folder, write_manifest
    from ktc.checkpoint import Checkpoint, read_config
    from ktc.codegen.cpu_experts import build_cpu_kernels
    from ktc.pack import SilentProgress, checkpoint_producer, pending_weights, write_weights
    from ktc.passes.kernel_selection import expert_kernel_spec
    from ktc.passes.manager import PassContext, PassManager
    from ktc.passes.pipeline import DEFAULT_PIPELINE

    progress = progress or SilentProgress()
    start = time.perf_counter()
    phases: dict[str, float] = {}
    model_dir, output = Path(model_dir), Path(output)
    device, cpu = _resolve_targets(target, cpu_target)
    if quant is None:   # CPU experts default to int8; GPU experts to bf16 (see PassContext.gpu_expert_quant)
        quant = "int8"
    if quant not in QUANT_CHOICES:
        raise KtcError(f"--quant {quant!r} is not one of {', '.join(QUANT_CHOICES)}")
    if gpu_quant is not None and gpu_quant not in GPU_QUANT_CHOICES:
        raise KtcError(f"--gpu-quant {gpu_quant!r} is not one of {', '.join(GPU_QUANT_CHOICES)}")
    if gpu_dense_quant not in GPU_DENSE_QUANT_CHOICES:
        raise KtcError(f"--gpu-dense-quant {gpu_dense_quant!r} is not one of {', '.join(GPU_DENSE_QUANT_CHOICES)}")
    if group_size is not None:
        from ktc.passes.quantization import GROUP_SIZES

        if group_size not in GROUP_SIZES:
            raise KtcError(f"--group-size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if max_context is not None and int(max_context) < 1:
        raise KtcError(f"--max-context must be at least 1, got {max_context}")
    options = dict(options or {})
    if rules is not None:
        from ktc.rules import read_rules

        options["placement_rules"] = read_rules(rules)
    if calibration is not None:
        from ktc.calibrate import read_calibration

        options["calibration"] = read_calibration(calibration)
    if max_context is not None:
        options["max_context"] = int(max_context)
    records = _read_tuning(tuning) if tuning is not None else None
    if output.exists() and not force:
        raise KtcError(f"{output} already exists: choose another -o path or pass --force to replace it")

    # 1. capture: config + checkpoint headers -> IR (no weights loaded; weights-free: config alone)
    progress.phase("capture")
    t = time.perf_counter()
    read_config(model_dir)
    ckpt = None if weights_free else Checkpoint(model_dir)
    from ktc.capture import capture

    graph = capture(model_dir, ckpt, weights_free=weights_free)
    phases["capture"] = time.perf_counter() - t

    # 2. passes: placement -> quantization -> fusion -> kernel selection
    progress.phase("passes")
    t = time.perf_counter()
    instruments = []
    if dump_ir is not None:
        dump_dir = Path(dump_ir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        counter = iter(range(100))
        instruments.append(lambda name, g: (dump_dir / f"{next(counter):02d}-{name}.txt").write_text(str(g) + "\n"))
    ctx = PassContext(target=device, cpu_target=cpu.name, quant=quant, gpu_memory_bytes=parse_size(gpu_memory),
                      gpu_quant=gpu_quant, gpu_dense_quant=gpu_dense_quant, group_size=group_size,
                      options=options)
    manager = PassManager(DEFAULT_PIPELINE, instruments)
    graph = manager.run(graph, ctx)
    phases["passes"] = time.perf_counter() - t

    with staging_folder(output, force) as folder:
        # 3. codegen: one CPU kernel library for every expert kernel the graph names
        progress.phase(f"codegen ({cpu.name})")
        t = time.perf_counter()
        moe_nodes = [n for n in graph.nodes_of("moe_experts") if n.kernel and n.device == "cpu"]
        specs = list({expert_kernel_spec(graph, n).name: expert_kernel_spec(graph, n) for n in moe_nodes}.values())
        targets_entry: dict[str, Any] = {}
        if specs:
            entry = build_cpu_kernels(specs, cpu, folder / "kernels" / "cpu")
            targets_entry["cpu"] = {**entry, "dir": "kernels/cpu"}
        if any(n.device == "cuda" for n in graph.nodes):
            from ktc.codegen.gpu_artifact import write_gpu_kernels

            progress.phase("codegen (triton)")
            targets_entry["gpu"] = write_gpu_kernels(graph, folder / "kernels" / "gpu")
        phases["codegen"] = time.perf_counter() - t

        # 4. weights: evaluated from the checkpoint one at a time, converted, packed, sharded (ktc.pack,
        # shared with `ktc pack`); a weights-free plan gets them later from `ktc pack`
        if weights_free:
            weights_entry = pending_weights()
        else:
            progress.phase("weights")
            t = time.perf_counter()
            weights_entry = write_weights(graph, folder, checkpoint_producer(graph, ckpt),
                                          {"checkpoint": model_dir.name}, progress)
            phases["weights"] = time.perf_counter() - t

        # 5. manifest: everything the runtime checks before it runs anything
        progress.phase("manifest")
        tokenizer = copy_tokenizer(model_dir, folder)
        from ktc import __version__

        write_manifest(folder, {
            "ktc_version": __version__,
            "model": {"model_type": graph.config.get("model_type"), "source": model_dir.name},
            "graph": graph.to_dict(),
            "targets": targets_entry,
            "weights": weights_entry,
            "tokenizer": tokenizer,
            "compile": {"target": target, "cpu_target": cpu.name, "quant": quant, "weights_free": weights_free,
                        "gpu_quant": ctx.gpu_expert_quant if device != "cpu" else None,
                        "gpu_dense_quant": gpu_dense_quant if device != "cpu" else None,
                        "group_size": group_size,
                        "gpu_memory": ctx.gpu_memory_bytes, "max_context": options.get("max_context"),
                        "calibration": str(calibration) if calibration else None,
                        "rules": [r.to_dict() for r in options.get("placement_rules", []) if hasattr(r, "to_dict")],
                        "tuning": str(tuning) if tuning else None,
                        "passes": [r.__dict__ for r in manager.records]},
        })
        if records is not None:   # tuning/ is not in the manifest's hash list: records are checked on read
            from ktc.runtime.tuning import artifact_records_path

            records.save(artifact_records_path(folder, records.host))
    return CompileReport(str(output), time.perf_counter() - start, phases, graph)
