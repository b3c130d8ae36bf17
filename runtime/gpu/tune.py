"""GPU tuning: per GPU node and launch, the candidate Triton configs timed at batch buckets.

Every GPU node carries attrs["gpu_config"] = {"decode": {...}, "prefill": {...}} (chosen by the
kernel families' heuristics at compile time). A *tunable* is one launch of a node whose config
comes from there: which family launcher it drives, at which weight shape and format, and which
token counts it runs at. Nodes of the same shape share their tunables (every layer's q/k/v GEMM is
one tunable), so a 48-layer model is tuned at the cost of one layer (+ the head).

    table               launcher                    shape                 buckets
    linear/gate_up/     matmul.linear               (N, K) of the weight  all
      down/qkv/o        (matmul.linear_w4a16 for int4 weights: format w4a16-g<group>;
                         matmul.linear_fp8 for fp8 weights: format fp8-g<group>)
    logits              matmul.linear (fp32 out)    (E, H)                past router.FUSED_TOKENS
    norm                norm.rms_norm / add_rms_norm (H,)                 all
    moe                 moe.fused_moe               (E, H, I, top_k)      all (format w4a16-g / fp8-g<group>)
    attention.decode    attention.attention_decode  (H, Hkv, D)           all (batch = tokens)
    attention.prefill   attention.attention_prefill (H, Hkv, D)           past DECODE_TOKENS

Candidates come from each family's own `candidate_configs` (shipped in the artifact's kernel
sources, so the runtime never imports ktc.codegen), default first; a family source without
it (an artifact compiled before tuning existed) is not tuned. Inputs are random tensors of the
node's real weight shapes, on the device; decode attention reads a cache of DECODE_CONTEXT
tokens. Kernel names in records carry a hash of the family source, so records never outlive
the code they were measured on. The embedding, rope and router top-k kernels are not tuned.

At load, apply_gpu_records turns records (their active configs: validated ones, see
runtime/tuning.py) into node.attrs["gpu_tuned"] = {table: {bucket: config}} for every bucket
(the nearest tuned bucket on the same side of the decode / prefill split), which
runtime.gpu.ops._cfg reads: a host-side dict lookup, so CUDA graphs capture the tuned launch
like any other.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ktc.ir import Graph, Node

from ..tuning import (
    APPLIED,
    BATCH_BUCKETS,
    Candidate,
    Task,
    Timer,
    TuningKey,
    TuningRecords,
    bucket_order,
    bucket_table,
)
from .ops import DECODE_TOKENS

DECODE_CONTEXT = 4096            # cached tokens decode attention is timed at
MAX_CACHE_BYTES = 4 << 30        # decode attention buckets whose K+V cache would exceed this are skipped
DEFAULT_MAX_SHARED = 232448      # H100 / H200 opt-in shared memory per block (bytes)
TUNED_FAMILIES = ("matmul", "norm", "attention", "moe")
QUANTIZED = ("int4", "fp8")
# quantized weight format -> (matmul launcher, its candidates, record format prefix)
LINEAR_LAUNCHERS = {"int4": ("linear_w4a16", "candidate_configs_w4a16", "w4a16"),
                    "fp8": ("linear_fp8", "candidate_configs_fp8", "fp8")}


@dataclass
class Tunable:
    """One launch of a node whose config ktc tune chooses (see the module docstring)."""

    table: str                   # key in node.attrs["gpu_tuned"]
    cfg_key: str                 # key in node.attrs["gpu_config"][phase]
    family: str
    kernel: str                  # record kernel name: "<family>.<launcher>#<source hash>"
    shape: tuple[int, ...]
    fmt: str
    min_tokens: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    def runs_at(self, tokens: int) -> bool:
        return tokens >= self.min_tokens


_SOURCE_HASH: dict[str, str] = {}


def source_hash(module: Any) -> str:
    path = str(getattr(module, "__file__", "") or "")
    if path not in _SOURCE_HASH:
        data = Path(path).read_bytes() if path and Path(path).is_file() else repr(module).encode()
        _SOURCE_HASH[path] = hashlib.sha256(data).hexdigest()[:8]
    return _SOURCE_HASH[path]


def _tunable_families(kernels: Any) -> set[str]:
    return {f for f in TUNED_FAMILIES if callable(getattr(getattr(kernels, f, None), "candidate_configs", None))}


def _wshape(graph: Graph, node: Node, role: str) -> tuple[int, ...]:
    return tuple(int(d) for d in graph.weights[node.weights[role]].shape)


def _wfmt(graph: Graph, node: Node, role: str) -> str:
    w = graph.weights[node.weights[role]]
    return str(w.format or w.dtype)


def _wgroup(graph: Graph, node: Node, role: str) -> int | None:
    """The group size of an int4 (w4a16) or fp8 weight, None for a dense one."""
    w = graph.weights[node.weights[role]]
    return int(w.group_size) if w.format in QUANTIZED and w.group_size else None


def _wquant(graph: Graph, node: Node, role: str) -> str | None:
    """The format of a quantized weight (int4 or fp8), None for a dense one."""
    w = graph.weights[node.weights[role]]
    return w.format if w.format in QUANTIZED and w.group_size else None


def node_tunables(graph: Graph, node: Node, kernels: Any) -> list[Tunable]:
    """The tunable launches of one GPU node (none for nodes without gpu_config)."""
    if node.device != "cuda" or not node.attrs.get("gpu_config"):
        return []
    fams = _tunable_families(kernels)
    out: list[Tunable] = []

    def kid(family: str, launcher: str) -> str:
        return f"{family}.{launcher}#{source_hash(getattr(kernels, family))}"

    def linear(table: str, n: int, k: int, fmt: str, bias: bool, min_tokens: int = 1,
               out_dtype: str | None = None, group: int | None = None, quant: str | None = None) -> None:
        if "matmul" not in fams:
            return
        launcher = "linear"
        if group:   # w4a16 / fp8: own launcher and candidates (none in older kernel sources: not tuned)
            launcher, cands, prefix = LINEAR_LAUNCHERS[quant or "int4"]
            if not callable(getattr(kernels.matmul, cands, None)):
                return
            fmt = f"{prefix}-g{group}"
        f = fmt + ("+bias" if bias else "") + (f">{out_dtype}" if out_dtype else "")
        params = {"bias": bias, "out_dtype": out_dtype, "group": group}
        if group and quant == "fp8":
            params["quant"] = "fp8"
        out.append(Tunable(table, table, "matmul", kid("matmul", launcher), (n, k), f, min_tokens, params))

    op = node.op
    if op in ("rms_norm", "add_rms_norm") and "norm" in fams:
        out.append(Tunable("norm", "norm", "norm", kid("norm", op), _wshape(graph, node, "weight")[:1],
                           _wfmt(graph, node, "weight"), 1,
                           {"residual": op == "add_rms_norm", "eps": float(node.attrs.get("eps") or 1e-6)}))
    elif op == "linear":
        n, k = _wshape(graph, node, "weight")
        linear("linear", n, k, _wfmt(graph, node, "weight"), "bias" in node.weights,
               group=_wgroup(graph, node, "weight"), quant=_wquant(graph, node, "weight"))
    elif op == "mlp":
        h, inter = _wshape(graph, node, "down")
        fmt = _wfmt(graph, node, "down")
        gate = "gate_up" if "gate_up" in node.weights else "gate"
        linear("gate_up", 2 * inter, h, fmt, False, group=_wgroup(graph, node, gate),
               quant=_wquant(graph, node, gate))
        linear("down", h, inter, fmt, False, group=_wgroup(graph, node, "down"), quant=_wquant(graph, node, "down"))
    elif op == "router":
        e, h = _wshape(graph, node, "weight")
        fused = getattr(getattr(kernels, "router", None), "router_fused", None) is not None
        first = int(getattr(kernels.router, "FUSED_TOKENS", 0)) + 1 if fused else 1
        linear("logits", e, h, _wfmt(graph, node, "weight"), False, first, "float32")
    elif op == "attention" and node.attrs.get("kind") == "gqa":
        a = node.attrs
        h, hkv, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
        hidden = _wshape(graph, node, "q")[1]
        fmt = _wfmt(graph, node, "q")
        linear("qkv", (h + 2 * hkv) * d, hidden, fmt, any(f"{r}_bias" in node.weights for r in "qkv"),
               group=_wgroup(graph, node, "q"), quant=_wquant(graph, node, "q"))
        linear("o", hidden, h * d, fmt, "o_bias" in node.weights, group=_wgroup(graph, node, "o"),
               quant=_wquant(graph, node, "o"))
        if "attention" in fams:
            window = int(a.get("sliding_window") or 0)
            p = {"window": window, "scale": float(a.get("scaling") or d ** -0.5)}
            afmt = fmt + (f"+window{window}" if window else "")
            out.append(Tunable("attention.decode", "attention", "attention", kid("attention", "attention_decode"),
                               (h, hkv, d), afmt, 1, p))
            out.append(Tunable("attention.prefill", "attention", "attention",
                               kid("attention", "attention_prefill"), (h, hkv, d), afmt, DECODE_TOKENS + 1, p))
    elif op == "moe_experts" and "moe" in fams:
        a = node.attrs
        gu = graph.weights[node.weights["gate_up"]]
        e, two_i, hidden = (int(d) for d in gu.shape)
        top_k = int(a["top_k"])
        group = int(gu.group_size) if node.format in QUANTIZED else None
        fmt = f"{LINEAR_LAUNCHERS[node.format][2]}-g{group}" if group else str(gu.format or gu.dtype)
        params: dict[str, Any] = {"group": group}
        if node.format == "fp8":
            params["quant"] = "fp8"
        out.append(Tunable("moe", "moe", "moe", kid("moe", "fused_moe"), (e, hidden, two_i // 2, top_k), fmt, 1,
                           params))
    return out


# -- configs -----------------------------------------------------------------------------------------
def default_config(node: Node, t: Tunable, tokens: int, kernels: Any) -> dict[str, Any] | None:
    """The config the runtime launches with at `tokens` tokens when nothing is tuned."""
    phases = node.attrs.get("gpu_config", {})
    if t.table == "attention.prefill":
        return phases.get("prefill", {}).get("attention")
    cfg = phases.get("decode" if tokens <= DECODE_TOKENS else "prefill", {}).get(t.cfg_key)
    if cfg is not None and t.table == "attention.decode":
        cfg = {**cfg, "SPLITS": kernels.attention.decode_config(t.shape[2], DECODE_CONTEXT)["SPLITS"]}
    return cfg


def candidate_configs(node: Node, t: Tunable, tokens: int, kernels: Any,
                      max_shared: int = DEFAULT_MAX_SHARED) -> list[dict[str, Any]]:
    """The configs timed for tunable `t` at `tokens` tokens: the default first, then the family's."""
    default = default_config(node, t, tokens, kernels)
    if default is None:
        return []
    fam = getattr(kernels, t.family)
    if t.family == "matmul":
        n, k = t.shape
        candidates = (getattr(fam, LINEAR_LAUNCHERS[t.params.get("quant", "int4")][1]) if t.params.get("group")
                      else fam.candidate_configs)
        cands = candidates(tokens, n, k, max_shared)
    elif t.family == "norm":
        cands = fam.candidate_configs(t.shape[0])
    elif t.family == "attention":
        h, hkv, d = t.shape
        cands = fam.candidate_configs(d, t.table == "attention.decode", DECODE_CONTEXT, h // hkv, max_shared)
    else:
        e, hidden, inter, top_k = t.shape
        cands = fam.candidate_configs(tokens, top_k, e, hidden, inter, t.params.get("group"), max_shared)
    return [default, *(c for c in cands if c != default)]


def device_max_shared(device: torch.device) -> int:
    """Opt-in shared memory per block of `device` in bytes (the limit a Triton config must fit)."""
    try:
        import triton

        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # noqa: BLE001 - older Triton: ask torch
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 49152)


# -- tasks ---------------------------------------------------------------------------------------------
class _Inputs:
    """Random device tensors by (name, shape, dtype), kept for the whole tune (weights of one layer)."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.cache: dict[tuple, torch.Tensor] = {}

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0, keep: bool = True
              ) -> torch.Tensor:
        key = ("randn", shape, dtype, scale)
        if key in self.cache:
            return self.cache[key]
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=dtype).mul_(scale)
        if keep:
            self.cache[key] = t
        return t

    def bytes(self, shape: tuple[int, ...]) -> torch.Tensor:
        key = ("bytes", shape)
        if key not in self.cache:
            self.cache[key] = torch.randint(0, 256, shape, generator=self.gen, device=self.device, dtype=torch.uint8)
        return self.cache[key]

    def fp8(self, shape: tuple[int, ...]) -> torch.Tensor:
        """float8_e4m3fn codes, normal with std 64 (clamped to +-448)."""
        key = ("fp8", shape)
        if key not in self.cache:
            t = torch.randn(shape, generator=self.gen, device=self.device).mul_(64).clamp_(-448, 448)
            self.cache[key] = t.to(torch.float8_e4m3fn)
        return self.cache[key]

    def routing(self, tokens: int, top_k: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights and top_k distinct random experts per token (uniform routing)."""
        scores = torch.rand(tokens, experts, generator=self.gen, device=self.device)
        ids = scores.topk(top_k, dim=-1).indices.to(torch.int32)
        tw = torch.softmax(torch.randn(tokens, top_k, generator=self.gen, device=self.device), dim=-1)
        return tw, ids


def make_runner(t: Tunable, tokens: int, kernels: Any, inputs: _Inputs, dtype: torch.dtype
                ) -> Callable[[dict[str, Any]], Callable[[], None]]:
    """config -> a function that launches the tunable's kernel(s) once with that config at `tokens`."""
    k = kernels
    if t.family == "matmul":
        n, kk = t.shape
        x = inputs.randn((tokens, kk), dtype, keep=False)
        group = t.params.get("group")
        fp8 = t.params.get("quant") == "fp8"
        if group and fp8:   # fp8: normal codes (std 64), scales of the size a 0.02-std weight's would have
            qw = inputs.fp8((n, kk))
            sc = inputs.randn((n, kk // group), torch.float32, 0.02 / 64)
        elif group:   # w4a16: random nibbles, scales of the size a 0.02-std weight's would have
            qw = inputs.bytes((n, kk // 2))
            sc = inputs.randn((n, kk // group), torch.float32, 0.002)
        else:
            w = inputs.randn((n, kk), dtype, 0.02)
        bias = inputs.randn((n,), dtype, 0.02) if t.params.get("bias") else None
        out_dtype = torch.float32 if t.params.get("out_dtype") == "float32" else dtype
        out = torch.empty(tokens, n, dtype=out_dtype, device=inputs.device)
        if group:
            launch = k.matmul.linear_fp8 if fp8 else k.matmul.linear_w4a16
            return lambda cfg: lambda: launch(x, qw, sc, bias, cfg, out_dtype=out_dtype, out=out)
        return lambda cfg: lambda: k.matmul.linear(x, w, bias, cfg, out_dtype=out_dtype, out=out)
    if t.family == "norm":
        (h,) = t.shape
        x = inputs.randn((tokens, h), dtype, keep=False)
        w = inputs.randn((h,), dtype)
        eps = t.params["eps"]
        if t.params.get("residual"):
            r = inputs.randn((tokens, h), dtype, keep=False)
            return lambda cfg: lambda: k.norm.add_rms_norm(x, r, w, eps, cfg)
        return lambda cfg: lambda: k.norm.rms_norm(x, w, eps, cfg)
    if t.family == "attention":
        h, hkv, d = t.shape
        window, scale = t.params["window"] or None, t.params["scale"]
        if t.table == "attention.decode":
            b, cap = tokens, DECODE_CONTEXT
            q = inputs.randn((b, h, d), dtype, keep=False)
            kc = inputs.randn((b, hkv, cap, d), dtype, keep=False)
            vc = inputs.randn((b, hkv, cap, d), dtype, keep=False)
            pos = torch.full((b,), cap - 1, dtype=torch.long, device=inputs.device)
            return lambda cfg: lambda: k.attention.attention_decode(q, kc, vc, pos, scale, window, cfg)
        q = inputs.randn((tokens, h, d), dtype, keep=False)
        kc = inputs.randn((1, hkv, tokens, d), dtype, keep=False)
        vc = inputs.randn((1, hkv, tokens, d), dtype, keep=False)
        return lambda cfg: lambda: k.attention.attention_prefill(q, kc, vc, 1, tokens, 0, scale, window, cfg)
    e, hidden, inter, top_k = t.shape
    group = t.params.get("group")
    x = inputs.randn((tokens, hidden), dtype, keep=False)
    tw, ids = inputs.routing(tokens, top_k, e)
    if group and t.params.get("quant") == "fp8":
        w = {"gate_up.qweight": inputs.fp8((e, 2 * inter, hidden)),
             "gate_up.scales": inputs.randn((e, 2 * inter, hidden // group), torch.float32, 0.02 / 64),
             "down.qweight": inputs.fp8((e, hidden, inter)),
             "down.scales": inputs.randn((e, hidden, inter // group), torch.float32, 0.02 / 64)}
    elif group:
        w = {"gate_up.qweight": inputs.bytes((e, 2 * inter, hidden // 2)),
             "gate_up.scales": inputs.randn((e, 2 * inter, hidden // group), torch.float32, 0.01),
             "down.qweight": inputs.bytes((e, hidden, inter // 2)),
             "down.scales": inputs.randn((e, hidden, inter // group), torch.float32, 0.01)}
    else:
        w = {"gate_up": inputs.randn((e, 2 * inter, hidden), dtype, 0.02),
             "down": inputs.randn((e, hidden, inter), dtype, 0.02)}
    return lambda cfg: lambda: k.moe.fused_moe(x, tw, ids, w, e, inter, cfg)


def _cache_bytes(t: Tunable, tokens: int) -> int:
    h, hkv, d = t.shape
    return 2 * tokens * hkv * DECODE_CONTEXT * d * 2


def _check_fp8(graph: Graph, device: torch.device) -> None:
    """fp8 GPU weights need an sm89+ NVIDIA GPU (runtime.artifact.require_fp8_gpu): a one-line HostError."""
    if any(w.format == "fp8" and w.device not in (None, "cpu") for w in graph.weights.values()):
        from ..artifact import require_fp8_gpu

        require_fp8_gpu("the artifact", device)


def gpu_tasks(graph: Graph, kernels: Any, buckets: list[int] | None = None, device: torch.device | str = "cuda",
              dtype: torch.dtype = torch.bfloat16, max_shared: int | None = None) -> list[Task]:
    """One task per distinct (tunable, bucket) of the graph's GPU nodes, in bucket_order."""
    device = torch.device(device)
    if device.type == "cuda":
        _check_fp8(graph, device)
    if max_shared is None:
        max_shared = device_max_shared(device) if device.type == "cuda" else DEFAULT_MAX_SHARED
    inputs = _Inputs(device)
    seen: dict[tuple, tuple[Node, Tunable]] = {}
    for node in graph.nodes:
        for t in node_tunables(graph, node, kernels):
            seen.setdefault((t.kernel, t.shape, t.fmt), (node, t))
    tasks: list[Task] = []
    for b in bucket_order(buckets or BATCH_BUCKETS):
        for node, t in seen.values():
            if not t.runs_at(b) or (t.table == "attention.decode" and _cache_bytes(t, b) > MAX_CACHE_BYTES):
                continue
            configs = candidate_configs(node, t, b, kernels, max_shared)
            if not configs:
                continue

            def build(t: Tunable = t, b: int = b, configs: list = configs) -> list[Candidate]:
                run = make_runner(t, b, kernels, inputs, dtype)
                return [Candidate(c, run(c)) for c in configs]

            tasks.append(Task(TuningKey(t.kernel, t.shape, t.fmt, b), configs[0], build, configs))
    return tasks


def cuda_event_timer(target_s: float = 0.005, min_reps: int = 5, max_reps: int = 50,
                     flush_bytes: int = 256 << 20, idle_s: float = 0.05, preheat_s: float = 0.02) -> Timer:
    """A timer for tune(): the 20th percentile of CUDA-event timings of single launches, GPU time only.

    The L2 cache is flushed before each timed launch, as a decode step meets every layer's weights
    cold. The timed launches are queued behind a GPU sleep as long as queueing them takes, so the
    GPU never waits for the host between an event and its kernel (a launcher's Python overhead would
    otherwise be timed for small kernels). After the GPU sat idle for more than idle_s (a Triton
    compile), preheat_s of flushes bring its clocks up first. Errors (out of resources...) surface
    from the first launch."""
    state: dict[str, Any] = {"flush": None, "flush_s": 1e-4, "cycles_per_s": 1e9, "last": 0.0}

    def event() -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True)

    def calibrate() -> None:
        state["flush"] = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
        s, e, s2, e2 = event(), event(), event(), event()
        s.record()
        state["flush"].zero_()
        e.record()
        s2.record()
        torch.cuda._sleep(1 << 20)
        e2.record()
        torch.cuda.synchronize()
        state["flush_s"] = max(s.elapsed_time(e) / 1e3, 1e-5)
        state["cycles_per_s"] = (1 << 20) / max(s2.elapsed_time(e2) / 1e3, 1e-6)

    def timer(run: Callable[[], None]) -> float:
        if state["flush"] is None:
            calibrate()
        flush = state["flush"]
        run()
        if time.perf_counter() - state["last"] > idle_s:
            for _ in range(int(preheat_s / state["flush_s"]) + 1):
                flush.zero_()
        torch.cuda.synchronize()
        s, e = event(), event()
        host = time.perf_counter()
        s.record()
        for _ in range(3):
            run()
        e.record()
        host = (time.perf_counter() - host) / 3
        torch.cuda.synchronize()
        estimate = max(s.elapsed_time(e) / 3e3, 1e-6)
        reps = max(min_reps, min(max_reps, int(target_s / estimate)))
        starts, ends = [event() for _ in range(reps)], [event() for _ in range(reps)]
        queueing = reps * (host + 50e-6)                  # launch + flush + events per rep, with margin
        torch.cuda._sleep(int(min(queueing, 0.2) * state["cycles_per_s"]))
        for s, e in zip(starts, ends, strict=True):
            flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        state["last"] = time.perf_counter()
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
        return times[len(times) // 5] / 1e3      # a low quantile: a launch the GPU had to wait for only adds

    return timer


# -- applying records at load ---------------------------------------------------------------------------
def apply_gpu_records(graph: Graph, kernels: Any, records: TuningRecords, max_shared: int | None = None) -> int:
    """Set node.attrs["gpu_tuned"] from the records' active configs (see the module docstring; pending
    records are left out, dropped ones give their bucket the default); a config that is not among the
    kernel's own candidates at that shape is ignored. Returns the tunables that run a searched config."""
    if max_shared is None:
        try:
            max_shared = device_max_shared(torch.device("cuda")) if torch.cuda.is_available() else DEFAULT_MAX_SHARED
        except Exception:  # noqa: BLE001
            max_shared = DEFAULT_MAX_SHARED
    memo: dict[tuple, dict[int, dict] | None] = {}
    applied = 0
    for node in graph.nodes:
        tables: dict[str, dict[int, dict]] = {}
        for t in node_tunables(graph, node, kernels):
            key = (t.kernel, t.shape, t.fmt)
            if key not in memo:
                valid, searched = {}, False
                for b, rec in records.by_bucket(*key).items():
                    cfg = rec.active_config
                    if cfg is not None and b in BATCH_BUCKETS and t.runs_at(b) and cfg in candidate_configs(
                            node, t, b, kernels, max_shared):
                        valid[b] = cfg
                        searched = searched or rec.status in APPLIED
                memo[key] = bucket_table(valid, DECODE_TOKENS) if valid else None
                applied += searched
            if memo[key]:
                tables[t.table] = memo[key]
        if tables:
            node.attrs["gpu_tuned"] = tables
        else:
            node.attrs.pop("gpu_tuned", None)
    return applied
