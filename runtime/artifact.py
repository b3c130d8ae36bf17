"""The artifact format, read side: a directory a runtime can check before trusting it.

    manifest.json            format version, ktc version, model config, lowered graph, targets,
                             required CPU features, sha256 + size of every other file
    weights/*.safetensors    already quantized and packed in kernel layout (never pickle)
    kernels/cpu/<target>.so  TVM-built CPU kernels (+ TVM's runtime library for its thread pool)
    kernels/gpu/             Triton kernel sources (src/<family>.py) and configs.json (--target cuda)
    tokenizer/               tokenizer.json and friends, when the model folder had them

Everything here is checked before any kernel runs: the format version, every listed file's
size and sha256, that nothing listed is missing, and the host's CPU features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktc.errors import ArtifactError, HostError
from ktc.ir import Graph

FORMAT_NAME = "ktc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any]

    @property
    def graph(self) -> Graph:
        return Graph.from_dict(self.data["graph"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    @property
    def cpu(self) -> dict[str, Any] | None:
        return self.data.get("targets", {}).get("cpu")

    @property
    def gpu(self) -> dict[str, Any] | None:
        return self.data.get("targets", {}).get("gpu")

    @property
    def weight_files(self) -> list[str]:
        return self.data["weights"]["files"]


def read_manifest(path: str | Path) -> Manifest:
    """Parse and sanity-check manifest.json of the artifact at `path` (no hashing yet)."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{root} does not exist: compile one with `ktc compile MODEL_DIR -o {root}`")
    if not root.is_dir() or not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root} is not a ktc artifact (no {MANIFEST}): compile one with `ktc compile`")
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{root / MANIFEST} is damaged (not JSON): recompile the artifact") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{root / MANIFEST} is not a ktc manifest: recompile the artifact")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has artifact format {version}, this ktc reads format {FORMAT_VERSION}: recompile it with this ktc"
        )
    for key in ("graph", "files", "weights", "targets"):
        if key not in data:
            raise ArtifactError(f"{root / MANIFEST} lacks {key!r}: recompile the artifact")
    return Manifest(root, data)


def verify_files(manifest: Manifest, hashes: bool = True, on_file: Callable[[str, int], None] | None = None) -> None:
    """Every listed file exists with its size (and sha256 when `hashes`); on_file(rel, size) after each."""
    for rel, meta in manifest.files.items():
        path = manifest.path / rel
        if not path.is_file():
            raise ArtifactError(f"{manifest.path} is incomplete: {rel} is missing; recompile the artifact")
        if path.stat().st_size != meta["size"]:
            raise ArtifactError(f"{manifest.path}: {rel} has {path.stat().st_size} bytes, the manifest says "
                                f"{meta['size']} (truncated or changed); recompile the artifact")
        if hashes and sha256_file(path) != meta["sha256"]:
            raise ArtifactError(f"{manifest.path}: {rel} does not match its sha256 (changed or damaged); "
                                "recompile the artifact")
        if on_file:
            on_file(rel, meta["size"])


FP8_MIN_CAPABILITY = (8, 9)     # Triton lowers float8_e4m3fn (fp8e4nv) on sm89+ NVIDIA GPUs (and on AMD)


def gpu_fp8(manifest: Manifest) -> bool:
    """Whether the artifact stores GPU weights in fp8 (--gpu-quant / --gpu-dense-quant fp8)."""
    weights = manifest.data.get("graph", {}).get("weights", {})
    return any(w.get("format") == "fp8" and w.get("device") not in (None, "cpu") for w in weights.values())


def require_fp8_gpu(what: str, device: Any = None) -> None:
    """HostError unless the CUDA `device` (default: the current one) runs fp8 (e4m3) kernels: an sm89+
    NVIDIA GPU (Triton has no e4m3 conversions below), or an AMD GPU (Triton converts them there)."""
    import torch

    if getattr(torch.version, "hip", None):
        return
    device = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        raise HostError(f"{what} stores GPU weights in fp8 (e4m3), which needs an sm89+ GPU (Ada, Hopper or newer), "
                        f"and this GPU ({torch.cuda.get_device_name(device)}) is sm{major}{minor}: recompile it "
                        "with --gpu-quant / --gpu-dense-quant int4 or none")


def check_gpu_arch(manifest: Manifest) -> None:
    """Refuse an fp8 artifact on an NVIDIA GPU below sm89."""
    if gpu_fp8(manifest):
        require_fp8_gpu(str(manifest.path))


def check_host(manifest: Manifest) -> None:
    """Refuse an artifact whose CPU kernels need features this host lacks, or whose GPU kernels need
    a CUDA GPU this host does not have (or, for fp8 weights, an sm89+ one)."""
    from ktc.targets import host_cpu_features

    if manifest.gpu:
        import torch

        if not torch.cuda.is_available():
            raise HostError(f"{manifest.path} was compiled for --target cuda and this host has no CUDA GPU: "
                            "recompile it with --target cpu")
        check_gpu_arch(manifest)

    cpu = manifest.cpu
    if not cpu:
        return
    have = host_cpu_features()
    missing = [f for f in cpu.get("required_features", []) if f not in have]
    if missing:
        raise HostError(
            f"{manifest.path} was compiled for {cpu['target']}, and this CPU lacks {', '.join(missing)}: "
            "recompile it here with `ktc compile MODEL_DIR --target cpu`"
        )
