"""`ktc compile`: HF folder -> capture -> IR -> passes -> codegen -> artifact, in numbered phases.

Like MLC-LLM's compile: one readable function of phases, an IR dump between them when asked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ktc.errors import KtcError
from ktc.ir import Graph

TARGET_CHOICES = ("cpu", "auto", "x86-avx2", "x86-avx512", "x86-amx", "cuda")
QUANT_CHOICES = ("none", "int8", "int4")


class CompileProgress(Protocol):
    """What the CLI shows while compiling; every method is optional to act on."""

    def phase(self, name: str) -> None: ...
    def weights_start(self, total: int) -> None: ...
    def weight_done(self, name: str) -> None: ...


class _Silent:
    def phase(self, name: str) -> None:
        pass

    def weights_start(self, total: int) -> None:
        pass

    def weight_done(self, name: str) -> None:
        pass


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


def compile_model(
    model_dir: str | Path,
    output: str | Path,
    target: str = "cpu",
    cpu_target: str | None = None,
    quant: str | None = None,
    force: bool = False,
    gpu_memory: str | int | None = None,
    dump_ir: str | Path | None = None,
    progress: CompileProgress | None = None,
    options: dict[str, Any] | None = None,
) -> CompileReport:
    """Compile the Hugging Face model folder `model_dir` into the artifact `output`."""
    from ktc.artifact import ShardWriter, copy_tokenizer, packed_key, staging_folder, write_manifest
    from ktc.checkpoint import Checkpoint, evaluate_source, read_config
    from ktc.codegen.cpu_experts import build_cpu_kernels, pack_expert_weights
    from ktc.passes.kernel_selection import expert_kernel_spec
    from ktc.passes.manager import PassContext, PassManager
    from ktc.passes.pipeline import DEFAULT_PIPELINE

    progress = progress or _Silent()
    start = time.perf_counter()
    phases: dict[str, float] = {}
    model_dir, output = Path(model_dir), Path(output)
    device, cpu = _resolve_targets(target, cpu_target)
    if quant is None:   # CPU experts default to int8; GPU experts to the checkpoint's dtype (bf16)
        quant = "int8" if device == "cpu" else "none"
    if quant not in QUANT_CHOICES:
        raise KtcError(f"--quant {quant!r} is not one of {', '.join(QUANT_CHOICES)}")
    if output.exists() and not force:
        raise KtcError(f"{output} already exists: choose another -o path or pass --force to replace it")

    # 1. capture: config + checkpoint headers -> IR (no weights loaded)
    progress.phase("capture")
    t = time.perf_counter()
    read_config(model_dir)
    ckpt = Checkpoint(model_dir)
    from ktc.capture import capture

    graph = capture(model_dir, ckpt)
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
                      options=options or {})
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

        # 4. weights: evaluated from the checkpoint one at a time, converted, packed, sharded
        progress.phase("weights")
        t = time.perf_counter()
        writer = ShardWriter(folder / "weights")
        packed_by_node = {n.weights[r]: n for n in moe_nodes for r in ("gate_up", "down")}
        gpu_packed = {n.weights[r]: graph.weights[n.weights[r]].group_size for n in graph.nodes_of("moe_experts")
                      for r in ("gate_up", "down") if graph.weights[n.weights[r]].layout == "gpu_w4a16"}
        progress.weights_start(len(graph.weights))
        done: set[str] = set()
        stored_sources: dict[tuple[str, str | None], str] = {}
        aliases: dict[str, str] = {}
        for name, w in graph.weights.items():
            if name in done:
                continue
            node = packed_by_node.get(name)
            if node is not None:
                gu_name, dn_name = node.weights["gate_up"], node.weights["down"]
                parts = pack_expert_weights(
                    expert_kernel_spec(graph, node),
                    evaluate_source(ckpt, graph.weights[gu_name].source),
                    evaluate_source(ckpt, graph.weights[dn_name].source),
                )
                for part, tensor in parts.items():
                    role, _, sub = part.partition(".")
                    writer.add(packed_key(node.weights[role], sub), tensor)
                for n in (gu_name, dn_name):
                    done.add(n)
                    progress.weight_done(n)
                continue
            if name in gpu_packed:
                from ktc.codegen.gpu.moe import pack_w4a16

                for part, tensor in pack_w4a16(evaluate_source(ckpt, w.source), gpu_packed[name]).items():
                    writer.add(packed_key(name, part), tensor)
                done.add(name)
                progress.weight_done(name)
                continue
            key = (json.dumps(w.source, sort_keys=True), w.format)
            if key in stored_sources:   # e.g. a tied lm_head: store the tensor once
                aliases[name] = stored_sources[key]
                done.add(name)
                progress.weight_done(name)
                continue
            stored_sources[key] = name
            tensor = evaluate_source(ckpt, w.source)
            if list(tensor.shape) != list(w.shape):
                raise KtcError(f"{name}: checkpoint shape {list(tensor.shape)} does not match config {w.shape}")
            import torch

            writer.add(name, tensor.to(getattr(torch, w.format or w.dtype)))
            done.add(name)
            progress.weight_done(name)
        writer.flush()
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
            "weights": {"files": writer.files, "map": writer.key_to_file, "aliases": aliases},
            "tokenizer": tokenizer,
            "compile": {"target": target, "cpu_target": cpu.name, "quant": quant,
                        "passes": [r.__dict__ for r in manager.records]},
        })
    return CompileReport(str(output), time.perf_counter() - start, phases, graph)
