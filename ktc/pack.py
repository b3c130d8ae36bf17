"""Weights into a plan: the compiler's weight phase, `ktc pack`, and random weights.

A plan (artifact) holds the lowered graph and its kernels; its weights are written by the one
function here, write_weights, whether they come from a checkpoint during `ktc compile`, from a
checkpoint later (`ktc pack PLAN --weights MODEL_DIR`, for a plan compiled with
--weights-free, the way MLC-LLM keeps model libraries apart from weights), or from a random
generator (`ktc pack PLAN --random`). random_weights builds the same thing in memory, in the
runtime's layout, for benchmarks at real shapes with no checkpoint at all.

    units, aliases = weight_units(graph)        # what is produced together, tied weights
    entry = write_weights(graph, folder, checkpoint_producer(graph, ckpt), origin=...)
    pack("plan.ktc", weights="./Qwen3-30B-A3B")              # in place, atomically
    weights = random_weights(graph, device="cuda")           # name -> tensor | {part: tensor}

Needs only the runtime's dependencies (torch, safetensors): no transformers, no TVM (the
packers in ktc.codegen.cpu_experts and ktc.codegen.gpu.moe import only torch, and triton
for the latter's kernels).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ktc.errors import KtcError
from ktc.ir import Graph

if TYPE_CHECKING:
    import torch

    from ktc.checkpoint import Checkpoint
    from ktc.codegen.cpu_experts import ExpertKernelSpec

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# config.json keys that may differ between the model a plan was compiled from and the folder packed into it
_CONFIG_KEYS_IGNORED = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache")
# Random content has this period (a prime, so that it lines up with no power-of-two dim): see _RandomBlocks.
RANDOM_PERIOD = 1_048_573
# Standard deviation of codes drawn uniformly from [-127, 127] (int8) and [-7, 7] (int4), and of the
# normal fp8 (e4m3) codes random weights use (clamped to +-448, 3.5 sigma).
_CODE_STD = {"int8": math.sqrt((255**2 - 1) / 12), "int4": math.sqrt((15**2 - 1) / 12), "fp8": 128.0}

Weights = dict[str, Any]   # name -> tensor; packed weights name -> {part: tensor}


class WeightProgress(Protocol):
    """What write_weights reports (ktc.compiler.CompileProgress is one)."""

    def weights_start(self, total: int) -> None: ...
    def weight_done(self, name: str) -> None: ...


@dataclass(frozen=True)
class WeightUnit:
    """Weights produced together: one dense tensor ("dense"), one GPU w4a16 weight ("gpu_w4a16"), one
    GPU fp8 weight ("gpu_fp8": float8_e4m3fn values + float32 group scales, moe.pack_fp8), or both
    matrices of a CPU expert kernel ("cpu_experts": names = (gate_up, down), packed by
    one call of pack_expert_weights)."""

    kind: str
    names: tuple[str, ...]
    spec: ExpertKernelSpec | None = None


Producer = Callable[[WeightUnit], Weights]


class PackProgress(WeightProgress, Protocol):
    """What pack reports: its phases, then the weights (ktc.cli.compile.RichCompileProgress is one)."""

    def phase(self, name: str) -> None: ...


def weight_units(graph: Graph) -> tuple[list[WeightUnit], dict[str, str]]:
    """The units in graph.weights order, and the aliases: a dense weight whose source and format
    equal an earlier one's (a tied lm_head) is stored once, alias -> stored name."""
    from ktc.passes.kernel_selection import expert_kernel_spec

    cpu_nodes = [n for n in graph.nodes_of("moe_experts") if n.kernel and n.device == "cpu"]
    by_weight = {n.weights[r]: n for n in cpu_nodes for r in ("gate_up", "down")}
    units: list[WeightUnit] = []
    aliases: dict[str, str] = {}
    stored: dict[tuple[str, str | None], str] = {}
    seen: set[str] = set()
    for name, w in graph.weights.items():
        if name in seen:
            continue
        node = by_weight.get(name)
        if node is not None:
            names = (node.weights["gate_up"], node.weights["down"])
            units.append(WeightUnit("cpu_experts", names, expert_kernel_spec(graph, node)))
            seen.update(names)
            continue
        seen.add(name)
        if w.layout in ("gpu_w4a16", "gpu_fp8"):
            units.append(WeightUnit(w.layout, (name,)))
            continue
        key = (json.dumps(w.source, sort_keys=True), w.format)
        if key in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        units.append(WeightUnit("dense", (name,)))
    return units, aliases


def _torch_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise KtcError(f"weight format {name!r} is not a tensor dtype: recompile the plan with this ktc")
    return dtype


def write_weights(graph: Graph, folder: Path, produce: Producer, origin: dict[str, Any],
                  progress: WeightProgress | None = None) -> dict[str, Any]:
    """Write every graph weight, as `produce` makes it, into safetensors shards under
    folder/weights (packed parts as 'name::part'); the manifest's "weights" entry."""
    from ktc.artifact import ShardWriter, packed_key

    units, aliases = weight_units(graph)
    writer = ShardWriter(folder / "weights")
    if progress:
        progress.weights_start(len(graph.weights))
    for unit in units:
        for name, value in produce(unit).items():
            if isinstance(value, dict):
                for part, tensor in value.items():
                    writer.add(packed_key(name, part), tensor)
            else:
                writer.add(name, value)
            if progress:
                progress.weight_done(name)
    if progress:
        for alias in aliases:
            progress.weight_done(alias)
    writer.flush()
    return {"state": "packed", "origin": origin, "files": writer.files, "map": writer.key_to_file,
            "aliases": aliases}


def pending_weights() -> dict[str, Any]:
    """The "weights" entry of a weights-free plan: no shards until `ktc pack`."""
    return {"state": "pending", "files": [], "map": {}, "aliases": {}}


# ---- from a checkpoint ---------------------------------------------------------------------------

def checkpoint_producer(graph: Graph, ckpt: Checkpoint) -> Producer:
    """Each unit's tensors read from `ckpt`, converted to the weight's format and packed for its kernel."""
    from ktc.checkpoint import evaluate_source
    from ktc.codegen.cpu_experts import pack_expert_weights

    def produce(unit: WeightUnit) -> Weights:
        if unit.kind == "cpu_experts":
            assert unit.spec is not None
            gate_up, down = unit.names
            parts = pack_expert_weights(unit.spec, evaluate_source(ckpt, graph.weights[gate_up].source),
                                        evaluate_source(ckpt, graph.weights[down].source))
            out: Weights = {gate_up: {}, down: {}}
            for part, tensor in parts.items():
                role, _, sub = part.partition(".")
                out[gate_up if role == "gate_up" else down][sub] = tensor
            return out
        (name,) = unit.names
        w = graph.weights[name]
        tensor = evaluate_source(ckpt, w.source)
        if list(tensor.shape) != list(w.shape):
            raise KtcError(f"{name}: checkpoint shape {list(tensor.shape)} does not match config {w.shape}")
        if unit.kind == "gpu_w4a16":
            from ktc.codegen.gpu.moe import pack_w4a16

            return {name: pack_w4a16(tensor, w.group_size)}
        if unit.kind == "gpu_fp8":
            from ktc.codegen.gpu.moe import pack_fp8

            return {name: pack_fp8(tensor, w.group_size)}
        return {name: tensor.to(_torch_dtype(w.format or w.dtype))}

    return produce


def _header_shape(ckpt: Checkpoint, source: dict[str, Any], weight: str) -> tuple[list[int], str]:
    """Shape and dtype of a weight source from the checkpoint's headers, checking its parts agree."""
    if "load" in source:
        info = ckpt.info(source["load"])   # a one-line KtcError naming the key when it is missing
        return list(info.shape), info.dtype
    if "values" in source:
        return [len(source["values"])], source.get("dtype", "float32")
    if "take" in source:
        inner, index = source["take"], list(source["index"])
        if "stack" in inner:
            parts = [_header_shape(ckpt, inner["stack"][i], weight) for i in index]
            shape, dtype = _agree(parts, weight)
            return [len(index), *shape], dtype
        shape, dtype = _header_shape(ckpt, inner, weight)
        if index and (max(index) >= shape[0] or min(index) < 0):
            raise KtcError(f"weight {weight} takes rows {min(index)}..{max(index)} of a tensor of {shape[0]} "
                           "rows in the checkpoint: these are not the plan's model's weights")
        return [len(index), *shape[1:]], dtype
    items = source.get("stack") or source.get("concat") or []
    if not items:
        raise KtcError(f"weight {weight} has an empty source: recompile the plan")
    parts = [_header_shape(ckpt, s, weight) for s in items]
    if "stack" in source:
        shape, dtype = _agree(parts, weight)
        return [len(parts), *shape], dtype
    dim = int(source["dim"])
    shape = list(parts[0][0])
    if any(len(p) != len(shape) or [d for i, d in enumerate(p) if i != dim] != [d for i, d in enumerate(shape)
                                                                             if i != dim] for p, _ in parts):
        raise KtcError(f"the checkpoint tensors of weight {weight} cannot be concatenated: their shapes differ")
    _agree([(shape, dt) for _, dt in parts], weight)
    shape[dim] = sum(p[dim] for p, _ in parts)
    return shape, parts[0][1]


def _agree(parts: list[tuple[list[int], str]], weight: str) -> tuple[list[int], str]:
    if any(p != parts[0][0] for p, _ in parts):
        raise KtcError(f"the checkpoint tensors of weight {weight} have different shapes")
    if any(dt != parts[0][1] for _, dt in parts):
        raise KtcError(f"the checkpoint tensors of weight {weight} have different dtypes")
    return parts[0]


def check_checkpoint(graph: Graph, ckpt: Checkpoint) -> None:
    """Every weight of `graph` can be read from `ckpt`: keys present, shapes as planned, float
    dtypes (packing converts to each weight's format, so a plan that assumed config.json's dtype
    takes a checkpoint stored in another float dtype). Headers only; one-line KtcErrors."""
    from ktc.checkpoint import source_keys

    for w in graph.weights.values():
        shape, dtype = _header_shape(ckpt, w.source, w.name)
        key = (source_keys(w.source) or [w.name])[0]
        if list(shape) != [int(d) for d in w.shape]:
            raise KtcError(f"weight {w.name} ({key}) has shape {list(shape)} in {ckpt.dir} but the plan expects "
                           f"{list(w.shape)}: pack the weights of the model the plan was compiled from")
        if "values" not in w.source and dtype not in FLOAT_DTYPES:
            raise KtcError(f"{key} is {dtype} in {ckpt.dir}: ktc packs float32 / bfloat16 / float16 checkpoints")


def check_config(graph: Graph, model_dir: Path) -> None:
    """model_dir's config.json says what the plan's said (but for bookkeeping keys such as dtype)."""
    from ktc.checkpoint import read_config

    planned = graph.config.get("hf_config")
    if not isinstance(planned, dict):
        return
    found = read_config(model_dir)
    for key in sorted(set(planned) | set(found)):
        if key in _CONFIG_KEYS_IGNORED or planned.get(key) == found.get(key):
            continue
        raise KtcError(f"{model_dir / 'config.json'} differs from the plan's at {key!r} ({found.get(key)!r}, the "
                       f"plan: {planned.get(key)!r}): pack the weights of the model the plan was compiled from")


# ---- random weights ------------------------------------------------------------------------------

class _RandomBlocks:
    """Random content without an RNG call per element: one block of RANDOM_PERIOD values per
    kind (float formats: normal * std; "int8": codes in [-127, 127]; "int4": bytes of two codes
    in [-7, 7]; "fp8": float8_e4m3fn normal * 128 clamped to +-448) and device, stored twice over
    so that any window of the period is one slice.
    A tensor is its block read from an offset (from its name) and tiled: its content repeats
    every RANDOM_PERIOD elements, and two tensors are shifted copies of one sequence. Fine for
    speed and memory tests; nothing here is a model."""

    def __init__(self, seed: int, std: float):
        self.seed, self.std = int(seed), float(std)
        self._cpu: dict[str, torch.Tensor] = {}
        self._dev: dict[tuple[str, str], torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}

    def _make(self, kind: str) -> torch.Tensor:
        import torch

        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{kind}".encode()))
        n = RANDOM_PERIOD
        if kind == "int8":
            block = torch.randint(-127, 128, (n,), generator=g, dtype=torch.int8)
        elif kind == "int4":
            nib = torch.randint(-7, 8, (2, n), generator=g, dtype=torch.int16) & 0xF
            block = (nib[0] | (nib[1] << 4)).to(torch.uint8)
        elif kind == "fp8":
            block = (torch.randn(n, generator=g) * _CODE_STD["fp8"]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        else:
            block = (torch.randn(n, generator=g) * self.std).to(_torch_dtype(kind))
        return torch.cat((block, block))

    def block(self, kind: str, device: torch.device) -> torch.Tensor:
        if kind not in self._cpu:
            self._cpu[kind] = self._make(kind)
        if device.type == "cpu":
            return self._cpu[kind]
        key = (kind, str(device))
        if key not in self._dev:
            self._dev[key] = self._cpu[kind].to(device)
        return self._dev[key]

    @staticmethod
    def offset(key: str) -> int:
        return zlib.crc32(key.encode()) % RANDOM_PERIOD

    def fill(self, kind: str, shape: tuple[int, ...] | list[int], device: torch.device, key: str) -> torch.Tensor:
        """A tensor of `shape` whose flat element i is block[(offset(key) + i) % RANDOM_PERIOD]."""
        import torch

        n = math.prod(int(d) for d in shape)
        block, p, off = self.block(kind, device), RANDOM_PERIOD, self.offset(key)
        out = torch.empty(n, dtype=block.dtype, device=device)
        rows = n // p
        if rows:   # one copy over all whole periods (multi-threaded), not one per period
            out[: rows * p].view(rows, p).copy_(block[off: off + p].expand(rows, p))
        if n - rows * p:
            out[rows * p:].copy_(block[off: off + n - rows * p])
        return out.view(tuple(int(d) for d in shape))

    def group_sums(self, kind: str, shape: tuple[int, ...], key: str, group: int) -> torch.Tensor:
        """int64 [..., K / group] sums of the codes of fill(kind, shape, cpu, key) over groups of
        `group` codes along the last dim ("int4": `group` codes = group / 2 bytes), read from the
        block's prefix sums (no pass over the tensor)."""
        import torch

        if kind not in self._sums:
            block = self.block(kind, torch.device("cpu"))
            if kind == "int4":
                b = block.to(torch.int16)
                values = (((b & 0xF) ^ 8) - 8) + ((((b >> 4) & 0xF) ^ 8) - 8)
            else:
                values = block.to(torch.int64)
            self._sums[kind] = torch.cat((torch.zeros(1, dtype=torch.int64), values.to(torch.int64).cumsum(0)))
        prefix = self._sums[kind]
        width = group // 2 if kind == "int4" else group
        n = math.prod(shape)
        starts = (self.offset(key) + torch.arange(0, n, width, dtype=torch.int64)) % RANDOM_PERIOD
        sums = prefix[starts + width] - prefix[starts]
        return sums.view(*shape[:-1], shape[-1] // width)


def _random_expert_parts(blocks: _RandomBlocks, spec: ExpertKernelSpec, role: str, name: str
                         ) -> dict[str, torch.Tensor]:
    """One matrix of a CPU expert kernel in pack_expert_weights' layout: codes, one scale for the
    whole tensor (dequantized std = blocks.std) and `comp` computed from the codes as the packer does."""
    import torch

    from ktc.codegen.cpu_experts import ACT_LEVELS

    cpu = torch.device("cpu")
    parts = {p[len(role) + 1:]: v for p, v in spec.weight_parts().items() if p.startswith(role + ".")}
    if not spec.quantized:
        shape, dtype = parts["w"]
        return {"w": blocks.fill(str(dtype).removeprefix("torch."), shape, cpu, f"{name}::w")}
    assert spec.group_size is not None
    qshape, _ = parts["q"]
    sshape, _ = parts["scales"]
    q = blocks.fill(spec.format, qshape, cpu, f"{name}::q")
    scales = torch.full(sshape, blocks.std / _CODE_STD[spec.format], dtype=torch.float32)
    qsum = blocks.group_sums(spec.format, qshape, f"{name}::q", spec.group_size)
    c = 128.0 * 257.0 if ACT_LEVELS[spec.format] == 2 else 128.0
    comp = (c * (qsum.to(torch.float64) * scales.to(torch.float64)).sum(-1)).to(torch.float32)
    return {"q": q, "scales": scales, "comp": comp}


def random_producer(graph: Graph, device: str | torch.device = "cpu", seed: int = 0,
                    std: float = 0.02) -> Producer:
    """Each unit as random_weights makes it (CUDA-resident weights on `device` when it is a CUDA device)."""
    import torch

    target = torch.device(device)
    blocks = _RandomBlocks(seed, std)
    cpu = torch.device("cpu")

    def produce(unit: WeightUnit) -> Weights:
        if unit.kind == "cpu_experts":
            assert unit.spec is not None
            return {name: _random_expert_parts(blocks, unit.spec, role, name)
                    for role, name in zip(("gate_up", "down"), unit.names, strict=True)}
        (name,) = unit.names
        w = graph.weights[name]
        dev = target if w.device == "cuda" and target.type == "cuda" else cpu
        if unit.kind == "gpu_w4a16":
            assert w.group_size is not None
            *lead, k = (int(d) for d in w.shape)
            return {name: {"qweight": blocks.fill("int4", (*lead, k // 2), dev, f"{name}::qweight"),
                           "scales": torch.full((*lead, k // w.group_size), std / _CODE_STD["int4"],
                                                dtype=torch.float32, device=dev)}}
        if unit.kind == "gpu_fp8":
            assert w.group_size is not None
            *lead, k = (int(d) for d in w.shape)
            return {name: {"qweight": blocks.fill("fp8", (*lead, k), dev, f"{name}::qweight"),
                           "scales": torch.full((*lead, k // w.group_size), std / _CODE_STD["fp8"],
                                                dtype=torch.float32, device=dev)}}
        fmt = w.format or w.dtype
        if "values" in w.source:
            return {name: torch.tensor(w.source["values"], dtype=_torch_dtype(fmt), device=dev)}
        if fmt not in FLOAT_DTYPES:
            raise KtcError(f"weight {name} has format {fmt}: random weights are made for float dense weights, "
                           "CPU expert kernels and GPU w4a16 / fp8 weights only")
        if "norm" in name:
            return {name: torch.ones(w.shape, dtype=_torch_dtype(fmt), device=dev)}
        if name.endswith("bias"):
            return {name: torch.zeros(w.shape, dtype=_torch_dtype(fmt), device=dev)}
        return {name: blocks.fill(fmt, w.shape, dev, name)}

    return produce


def random_weights(graph: Graph, device: str | torch.device = "cpu", seed: int = 0, std: float = 0.02) -> Weights:
    """Random weights for every weight of `graph`, already in the runtime's in-memory layout (what
    ktc.runtime.loader.load_weights returns; give it to load_artifact(path, weights=...)).

    Dense float weights: normal * std in their stored format; norm weights (names with "norm")
    ones; biases zeros; "values" sources (rope inv_freq) as given. CPU expert kernels' and GPU
    w4a16 / fp8 weights: uniform (fp8: normal) codes with one scale per tensor, so that the
    dequantized values have standard deviation `std`, and the int-dot compensation computed from
    the codes. Weights the
    graph puts on "cuda" are made on `device` when it is a CUDA device (the GPU part of a large
    model never passes through host memory); the others on the CPU. Content is tiled from one
    random block per dtype (see _RandomBlocks: it repeats every RANDOM_PERIOD elements), which
    is what makes tens of GB take seconds. Tied weights are the same tensor."""
    return produce_weights(graph, random_producer(graph, device, seed, std))


def produce_weights(graph: Graph, produce: Producer) -> Weights:
    """Every weight of the graph's layout from `produce`, unit by unit; tied names share a tensor."""
    units, aliases = weight_units(graph)
    out: Weights = {}
    for unit in units:
        out.update(produce(unit))
    for alias, name in aliases.items():
        out[alias] = out[name]
    return out


# ---- `ktc pack` ----------------------------------------------------------------------------------

@dataclass
class PackReport:
    output: str
    seconds: float
    weight_bytes: int
    phases: dict[str, float] = field(default_factory=dict)


class SilentProgress:
    """A progress that reports nothing (compile_model and pack without one)."""

    def phase(self, name: str) -> None:
        pass

    def weights_start(self, total: int) -> None:
        pass

    def weight_done(self, name: str) -> None:
        pass


def pack(plan: str | Path, weights: str | Path | None = None, output: str | Path | None = None, *,
         random: bool = False, seed: int = 0, std: float = 0.02, force: bool = False,
         progress: PackProgress | None = None) -> PackReport:
    """Write weights into the plan (artifact) at `plan`: from the Hugging Face folder `weights`
    (its headers checked against the plan first), or random ones (`random`, see random_weights).

    output: write a new artifact there and leave `plan` as it is; default: `plan` itself. Either
    way the artifact is staged beside the output and renamed into place, so an interrupted pack
    leaves the plan as it was. Weights a plan already holds are replaced."""
    from ktc.artifact import copy_tokenizer, staging_folder, write_manifest
    from ktc.runtime.artifact import Manifest, read_manifest, verify_files

    progress = progress or SilentProgress()
    start = time.perf_counter()
    phases: dict[str, float] = {}
    if weights is None and not random:
        raise KtcError("say where the weights come from: --weights MODEL_DIR or --random")
    if weights is not None and random:
        raise KtcError("--weights and --random exclude each other: give one of them")
    plan = Path(plan)
    out = Path(output) if output is not None else plan
    in_place = out.resolve() == plan.resolve()

    progress.phase("verify")
    t = time.perf_counter()
    manifest = read_manifest(plan)
    kept = {rel: meta for rel, meta in manifest.files.items() if not rel.startswith("weights/")}
    verify_files(Manifest(manifest.path, {**manifest.data, "files": kept}), hashes=True)
    graph = manifest.graph
    model_dir = None
    if weights is not None:
        from ktc.checkpoint import Checkpoint

        model_dir = Path(weights)
        check_config(graph, model_dir)
        ckpt = Checkpoint(model_dir)
        check_checkpoint(graph, ckpt)
        produce = checkpoint_producer(graph, ckpt)
        origin: dict[str, Any] = {"checkpoint": model_dir.name}
    else:
        produce = random_producer(graph, "cpu", seed, std)
        origin = {"random": {"seed": int(seed), "std": float(std)}}
    phases["verify"] = time.perf_counter() - t

    with staging_folder(out, force or in_place) as folder:
        for rel in kept:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.path / rel, folder / rel)
        progress.phase("weights")
        t = time.perf_counter()
        entry = write_weights(graph, folder, produce, origin, progress)
        phases["weights"] = time.perf_counter() - t
        progress.phase("manifest")
        data = {k: v for k, v in manifest.data.items() if k not in ("format", "format_version", "created", "files")}
        data["weights"] = entry
        if model_dir is not None and not data.get("tokenizer") and not (folder / "tokenizer").exists():
            data["tokenizer"] = copy_tokenizer(model_dir, folder)
        write_manifest(folder, data)
        nbytes = sum((folder / f).stat().st_size for f in entry["files"])
    return PackReport(str(out), time.perf_counter() - start, nbytes, phases)
