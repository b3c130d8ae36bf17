"""Load an artifact: check it completely, then build a CompiledModel from it.

Order matters: manifest, file sizes and hashes, host CPU features — all before any kernel
library is even opened, so a damaged or foreign artifact never runs an instruction.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ktc.errors import ArtifactError
from ktc.runtime.artifact import Manifest, check_host, read_manifest, verify_files


def load_weights(manifest: Manifest, on_file: Callable[[str], None] | None = None) -> dict[str, Any]:
    """name -> tensor; packed weights (stored as 'name::part') -> {part: tensor}."""
    from safetensors import safe_open

    if manifest.data["weights"].get("state") == "pending":
        path = manifest.path
        raise ArtifactError(f"{path} is a weights-free plan: run `ktc pack {path} --weights MODEL_DIR`")
    weights: dict[str, Any] = {}
    for rel in manifest.weight_files:
        if on_file:
            on_file(rel)
        try:
            with safe_open(str(manifest.path / rel), framework="pt") as f:
                for key in f.keys():
                    name, sep, part = key.partition("::")
                    if sep:
                        weights.setdefault(name, {})[part] = f.get_tensor(key)
                    else:
                        weights[name] = f.get_tensor(key)
        except ArtifactError:
            raise
        except Exception as e:  # a shard that passed size checks but safetensors cannot parse
            raise ArtifactError(f"{manifest.path}: cannot read {rel} ({e}); recompile the artifact") from None
    for alias, name in manifest.data["weights"].get("aliases", {}).items():
        weights[alias] = weights[name]
    graph_weights = manifest.graph.weights
    missing = [w for w in graph_weights if w not in weights]
    if missing:
        raise ArtifactError(f"{manifest.path}: weight {missing[0]} is not in the artifact; recompile it")
    return weights


def load_artifact(path: str | Path, verify: str = "full", max_batch_size: int = 8,
                  max_context: int | None = None, progress: Callable[[str, str, int, int], None] | None = None,
                  weights: dict[str, Any] | None = None):
    """The CompiledModel in the artifact at `path`.

    verify: "full" checks every file's sha256 (default), "sizes" only sizes (faster for
    huge artifacts on trusted disks). progress(stage, file, bytes_done, bytes_total) is
    called as files are checked ("verify") and weight shards read ("load").
    weights: the weights as load_weights would return them (name -> tensor, packed weights
    name -> {part: tensor}), used instead of the artifact's shards — for a weights-free plan
    (benchmarks fill it with random weights in the artifact's layout, ktc.pack.random_weights).
    """
    if verify not in ("full", "sizes"):
        raise ValueError("verify must be 'full' or 'sizes'")
    manifest = read_manifest(path)
    total = sum(meta["size"] for meta in manifest.files.values())
    done = 0

    def checked(rel: str, size: int) -> None:
        nonlocal done
        done += size
        if progress:
            progress("verify", rel, done, total)

    verify_files(manifest, hashes=verify == "full", on_file=checked)
    check_host(manifest)
    from ktc.runtime.model import CompiledModel

    graph = manifest.graph
    shard_total = sum(manifest.files[f]["size"] for f in manifest.weight_files)
    shard_done = 0

    def loading(rel: str) -> None:
        nonlocal shard_done
        if progress:
            progress("load", rel, shard_done, shard_total)
        shard_done += manifest.files[rel]["size"]

    if weights is None:
        weights = load_weights(manifest, loading)
    else:
        missing = [w for w in graph.weights if w not in weights]
        if missing:
            raise ArtifactError(f"weight {missing[0]} is not among the weights given to load")
    cpu_kernels = None
    if manifest.cpu:
        from ktc.runtime.cpu_experts import CpuExpertKernels

        cpu_kernels = CpuExpertKernels.load(manifest.path / manifest.cpu["dir"], manifest.cpu)
    tokenizer = None
    if manifest.data.get("tokenizer"):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(manifest.path / manifest.data["tokenizer"]))
    if manifest.gpu:
        from ktc.runtime.gpu.kernels import load_kernels
        from ktc.runtime.gpu.model import GpuModel

        kernels = load_kernels(manifest.path / manifest.gpu["dir"] / "src")
        planned = graph.config.get("placement", {})
        if max_context is None and planned.get("gpu_memory_budget"):
            max_context = planned.get("max_context")    # what the GPU budget was planned for
        model = GpuModel(graph, weights, kernels, tokenizer=tokenizer, max_batch_size=max_batch_size,
                         max_context=max_context, cpu_kernels=cpu_kernels)
    else:
        model = CompiledModel(graph, weights, cpu_kernels=cpu_kernels, tokenizer=tokenizer,
                              max_batch_size=max_batch_size, max_context=max_context)
    model.manifest = manifest.data
    from ktc.runtime.tuning import apply_artifact_records

    apply_artifact_records(model, manifest.path)   # this host's `ktc tune` records (tuning/, user cache)
    return model
