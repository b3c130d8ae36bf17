"""The IR ops on the GPU: each runs a node with the artifact's Triton kernels.

Same contract as runtime.ops (see runtime/ops/base.py): `prepare(node, weights) -> weights`
once at load (checks attrs, concatenates weights so that a step launches fewer kernels), and
`run(node, inputs, weights, ctx) -> outputs`. Activations are bf16 [batch, seq, ...]; cos/sin
and router weights float32, router ids int32. Every op is Triton kernels only: attention is
one q/k/v GEMM, a kernel that norms + ropes q/k and writes k/v into the cache, the flash
attention kernel (prefill) or split-KV decode kernel, and the o GEMM; MLA attention (DeepSeek)
is in attention_mla.py.

Dense linear weights are bf16 tensors, or (--gpu-dense-quant int4) packed w4a16 dicts
{"qweight": uint8 [N, K/2], "scales": float32 [N, K/G]} that `linear` sends to
matmul.linear_w4a16, or (--gpu-dense-quant fp8) {"qweight": float8_e4m3fn [N, K], "scales":
float32 [N, K/G]} for matmul.linear_fp8 (told apart by qweight's dtype); prepare concatenates
packed q/k/v or gate/up part by part (rows along N).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ktc.errors import ArtifactError
from ktc.ir import Node

DECODE_TOKENS = 16      # steps with at most this many tokens use the node's "decode" configs


@dataclass
class GpuRunContext:
    kernels: Any                 # namespace of kernel family modules (runtime.gpu.kernels)
    cache: Any                   # runtime.gpu.kv_cache.GpuKVCache
    positions: torch.Tensor      # [batch, seq] int64 on the device
    batch: int
    seq: int
    past: int                    # tokens already cached (host copy; decode kernels read positions instead)

    @property
    def phase(self) -> str:
        return "decode" if self.batch * self.seq <= DECODE_TOKENS else "prefill"


@dataclass(frozen=True)
class GpuOp:
    run: Callable[[Node, list[torch.Tensor], dict[str, Any], GpuRunContext], tuple[torch.Tensor, ...]]
    prepare: Callable[[Node, dict[str, Any]], dict[str, Any]] | None = None


def _cfg(node: Node, ctx: GpuRunContext, key: str, phase: str | None = None) -> dict | None:
    """The config of launch `key` for this step: the tuned one of the step's batch bucket (`ktc tune`
    records, set at load as attrs["gpu_tuned"]; runtime/gpu/tune.py), else the compiled default of
    `phase` (default: the step's). Host-side only, so a CUDA graph captures the chosen launch."""
    tuned = node.attrs.get("gpu_tuned")
    if tuned:
        from ktc.runtime.tuning import batch_bucket

        table = tuned.get(f"attention.{'decode' if ctx.seq == 1 else 'prefill'}" if key == "attention" else key)
        cfg = table.get(batch_bucket(ctx.batch * ctx.seq)) if table else None
        if cfg is not None:
            return cfg
    return node.attrs.get("gpu_config", {}).get(phase or ctx.phase, {}).get(key)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


W4A16_PARTS = frozenset(("qweight", "scales"))     # the parts of a packed w4a16 or fp8 weight
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


def linear(kernels: Any, x: torch.Tensor, w: torch.Tensor | dict[str, torch.Tensor], bias: torch.Tensor | None = None,
           config: dict | None = None, out_dtype: torch.dtype | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias) with the artifact's matmul family: matmul.linear for a dense weight,
    matmul.linear_w4a16 for a packed w4a16 one (a dict qweight / scales, uint8 qweight),
    matmul.linear_fp8 for an fp8 one (float8_e4m3fn qweight)."""
    if isinstance(w, torch.Tensor):
        return kernels.matmul.linear(x, w, bias, config, out_dtype=out_dtype, out=out)
    name, fmt = ("linear_fp8", "fp8") if _is_fp8(w) else ("linear_w4a16", "int4")
    launch = getattr(kernels.matmul, name, None)
    if launch is None:
        raise ArtifactError(f"the artifact's matmul kernels have no {name} for its {fmt} weights; recompile it")
    return launch(x, w["qweight"], w["scales"], bias, config, out_dtype=out_dtype, out=out)


def _is_fp8(w: dict[str, torch.Tensor]) -> bool:
    return w["qweight"].dtype == FP8_DTYPE


def _check_linear_weight(node: Node, role: str, w: Any) -> None:
    if not isinstance(w, torch.Tensor) and set(w) != W4A16_PARTS:
        raise ArtifactError(f"node {node.name}: {role} is packed as {sorted(w)}, not w4a16 or fp8")


def cat_rows(parts: list[torch.Tensor | dict[str, torch.Tensor]]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Linear weights stacked along N (one GEMM for q/k/v or gate/up): dense tensors concatenated, packed
    w4a16 (or fp8) weights part by part (the rows of qweight and scales are the weight's rows); a mix (a
    weight whose K fits no group beside quantized ones, or different groups or formats) is dequantized to
    the dense weights' dtype."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0).contiguous()
    if all(not isinstance(p, torch.Tensor) for p in parts) and len({p["scales"].shape[-1] for p in parts}) == 1 \
            and len({p["qweight"].dtype for p in parts}) == 1:
        return {k: torch.cat([p[k] for p in parts], dim=0).contiguous() for k in ("qweight", "scales")}
    dtype = next((p.dtype for p in parts if isinstance(p, torch.Tensor)), torch.bfloat16)
    return torch.cat([p if isinstance(p, torch.Tensor) else _dequant(p).to(dtype) for p in parts],
                     dim=0).contiguous()


def _dequant(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight behind a packed w4a16 or fp8 dict."""
    if _is_fp8(w):
        scales = w["scales"]
        q = w["qweight"].to(torch.float32).reshape(*w["qweight"].shape[:-1], scales.shape[-1], -1)
        return (q * scales.unsqueeze(-1)).reshape(w["qweight"].shape)
    return _dequant_w4a16(w)


def _dequant_w4a16(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight behind a w4a16 dict (moe.unpack_w4a16's arithmetic, on w's device)."""
    qweight, scales = w["qweight"], w["scales"]
    groups = scales.shape[-1]
    b = qweight.to(torch.int16).reshape(*qweight.shape[:-1], groups, -1)
    q = torch.cat((((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8), dim=-1).to(torch.float32)
    return (q * scales.unsqueeze(-1)).reshape(*qweight.shape[:-1], -1)


def _rows_of(w: torch.Tensor | dict[str, torch.Tensor]) -> int:
    return int((w if isinstance(w, torch.Tensor) else w["qweight"]).shape[0])


# -- simple ops ------------------------------------------------------------------------
def _embedding(node, inputs, w, ctx):
    return (ctx.kernels.embedding.embedding(inputs[0], w["weight"], _cfg(node, ctx, "embedding")),)


def _rope(node, inputs, w, ctx):
    cos, sin = ctx.kernels.rope.rope_tables(inputs[0], w["inv_freq"], float(node.attrs["scaling"]))
    return cos, sin


def _rms_norm(node, inputs, w, ctx):
    return (ctx.kernels.norm.rms_norm(inputs[0], w["weight"], float(node.attrs["eps"]), _cfg(node, ctx, "norm")),)


def _add_rms_norm(node, inputs, w, ctx):
    return ctx.kernels.norm.add_rms_norm(inputs[0], inputs[1], w["weight"], float(node.attrs["eps"]),
                                         _cfg(node, ctx, "norm"))


def _add(node, inputs, w, ctx):
    return (ctx.kernels.activation.add(inputs[0], inputs[1]),)


def _prepare_linear(node, w):
    _check_linear_weight(node, "weight", w["weight"])
    return w


def _linear(node, inputs, w, ctx):
    x = inputs[0]
    y = linear(ctx.kernels, _rows(x), w["weight"], w.get("bias"), _cfg(node, ctx, "linear"))
    return (y.view(*x.shape[:-1], -1),)


# -- mlp -------------------------------------------------------------------------------
def _prepare_mlp(node, w):
    if node.attrs.get("act", "silu") != "silu":
        raise ArtifactError(f"node {node.name}: activation {node.attrs['act']!r} has no GPU kernel")
    w = dict(w)
    for role in ("gate", "up", "gate_up", "down"):
        if role in w:
            _check_linear_weight(node, role, w[role])
    if "gate_up" not in w:
        w["gate_up"] = cat_rows([w.pop("gate"), w.pop("up")])
    return w


def _mlp(node, inputs, w, ctx):
    x = inputs[0]
    k = ctx.kernels
    x2 = _rows(x)
    gu = linear(k, x2, w["gate_up"], None, _cfg(node, ctx, "gate_up"))
    y = linear(k, k.activation.silu_mul(gu), w["down"], None, _cfg(node, ctx, "down"))
    if "output_gate" in w:
        y = k.activation.sigmoid_gate_mul(y, k.matmul.linear(x2, w["output_gate"]))
    return (y.view(x.shape),)


# -- attention -------------------------------------------------------------------------
def _prepare_attention(node, w):
    a = node.attrs
    if a.get("kind") == "mla":
        from . import attention_mla

        return attention_mla.prepare(node, w)
    if a.get("kind") != "gqa":
        raise ArtifactError(f"node {node.name}: {a.get('kind')} attention has no GPU kernels in this runtime")
    for r in ("q", "k", "v", "o"):
        if r not in w:
            raise ArtifactError(f"node {node.name}: gqa attention needs weight {r!r}")
    for r in ("q", "k", "v", "o"):
        _check_linear_weight(node, r, w[r])
    out = {"qkv": cat_rows([w["q"], w["k"], w["v"]]), "o": w["o"], "o_bias": w.get("o_bias")}
    # the activations' dtype: a dense projection's, else a bias's or a norm's (int4 projections)
    ref = next((t for t in (w["q"], w["k"], w["v"], w["o"], *(w.get(f"{r}_bias") for r in "qkvo"),
                            w.get("q_norm"), w.get("k_norm")) if isinstance(t, torch.Tensor)), None)
    dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.bfloat16, w["q"]["qweight"].device)
    if any(f"{r}_bias" in w for r in "qkv"):
        out["qkv_bias"] = torch.cat([w[f"{r}_bias"] if f"{r}_bias" in w else
                                     torch.zeros(_rows_of(w[r]), dtype=dtype, device=device)
                                     for r in "qkv"]).contiguous()
    if "q_norm" in w or "k_norm" in w:
        one = torch.ones(int(a["head_dim"]), dtype=dtype, device=device)
        out["q_norm"], out["k_norm"] = w.get("q_norm", one), w.get("k_norm", one)
    return out


def _attention(node, inputs, w, ctx):
    if node.attrs.get("kind") == "mla":
        from . import attention_mla

        return attention_mla.run(node, inputs, w, ctx)
    x, cos, sin = inputs
    a = node.attrs
    k = ctx.kernels
    h, hkv, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    b, s = ctx.batch, ctx.seq
    qkv = linear(k, _rows(x), w["qkv"], w.get("qkv_bias"), _cfg(node, ctx, "qkv"))
    k_cache, v_cache = ctx.cache.layer(int(a["layer"]))
    q = k.rope.qk_rope_cache(qkv, cos.reshape(b * s, -1), sin.reshape(b * s, -1), ctx.positions, k_cache, v_cache,
                             h, hkv, d, s, w.get("q_norm"), w.get("k_norm"), float(a.get("qk_norm_eps") or 1e-6),
                             _cfg(node, ctx, "rope"))
    window = a.get("sliding_window") or None
    scale = float(a["scaling"])
    if s == 1:
        cfg = _cfg(node, ctx, "attention")
        if cfg is not None:
            cfg = {**cfg, "SPLITS": k.attention.decode_config(d, k_cache.shape[2])["SPLITS"]}
        o = k.attention.attention_decode(q, k_cache, v_cache, ctx.positions, scale, window, cfg)
    else:
        cfg = _cfg(node, ctx, "attention", phase="prefill")
        o = k.attention.attention_prefill(q, k_cache, v_cache, b, s, ctx.past, scale, window, cfg)
    y = linear(k, o.view(b * s, h * d), w["o"], w.get("o_bias"), _cfg(node, ctx, "o"))
    return (y.view(b, s, -1),)


# -- routing and experts -----------------------------------------------------------------
def _prepare_router(node, w):
    from ktc.runtime.ops.router import _prepare

    _prepare(node, {})
    w = dict(w)
    if "bias" in w:
        w["bias"] = w["bias"].float().contiguous()
    return w


def _router(node, inputs, w, ctx):
    x = inputs[0]
    k = ctx.kernels
    fused = getattr(k.router, "router_fused", None)
    if fused is not None and ctx.batch * ctx.seq <= k.router.FUSED_TOKENS:
        tw, ids = fused(_rows(x), w["weight"], node.attrs, w.get("bias"), _cfg(node, ctx, "fused"))
        top_k = tw.shape[-1]
        return tw.view(*x.shape[:-1], top_k), ids.view(*x.shape[:-1], top_k)
    logits = k.matmul.linear(_rows(x), w["weight"], None, _cfg(node, ctx, "logits"), out_dtype=torch.float32)
    tw, ids = k.router.router_topk(logits, node.attrs, w.get("bias"))
    top_k = tw.shape[-1]
    return tw.view(*x.shape[:-1], top_k), ids.view(*x.shape[:-1], top_k)


def _prepare_moe(node, w):
    if node.attrs.get("act", "silu") != "silu":
        raise ArtifactError(f"node {node.name}: expert activation {node.attrs['act']!r} has no GPU kernel")
    out = {}
    for role in ("gate_up", "down"):
        t = w[role]
        if isinstance(t, dict):
            if set(t) != {"qweight", "scales"}:
                raise ArtifactError(f"node {node.name}: {role} is packed as {sorted(t)}, not w4a16 or fp8")
            out[f"{role}.qweight"], out[f"{role}.scales"] = t["qweight"], t["scales"]
        else:
            out[role] = t
    device = next(iter(out.values())).device
    out["expert_table"] = expert_table(node, device)
    return out


def expert_table(node: Node, device) -> torch.Tensor | None:
    """runtime.ops.moe.expert_table on `device` (router id -> row of this node, -1 elsewhere)."""
    from ktc.runtime.ops.moe import expert_table as table_of

    table = table_of(node)
    return None if table is None else table.to(device)


def _moe(node, inputs, w, ctx):
    x, tw, ids = inputs
    a = node.attrs
    ids = ids.reshape(-1, ids.shape[-1])
    table = w.get("expert_table")
    if table is not None:
        ids = table.index_select(0, ids.reshape(-1)).view(ids.shape)
    y = ctx.kernels.moe.fused_moe(_rows(x), tw.reshape(-1, tw.shape[-1]), ids, w, int(a["num_experts"]),
                                  int(a["intermediate_size"]), _cfg(node, ctx, "moe"), partial=table is not None)
    return (y.view(x.shape),)


def _require(*attrs):
    def prepare(node, w):
        missing = [x for x in attrs if node.attrs.get(x) is None]
        if missing:
            raise ArtifactError(f"node {node.name}: {node.op} needs attr(s) {', '.join(missing)}")
        return w
    return prepare


GPU_OPS: dict[str, GpuOp] = {
    "embedding": GpuOp(_embedding),
    "rope": GpuOp(_rope, _require("scaling")),
    "rms_norm": GpuOp(_rms_norm, _require("eps")),
    "add_rms_norm": GpuOp(_add_rms_norm, _require("eps")),
    "add": GpuOp(_add),
    "attention": GpuOp(_attention, _prepare_attention),
    "router": GpuOp(_router, _prepare_router),
    "moe_experts": GpuOp(_moe, _prepare_moe),
    "mlp": GpuOp(_mlp, _prepare_mlp),
    "linear": GpuOp(_linear, _prepare_linear),
}


def get(op: str) -> GpuOp:
    try:
        return GPU_OPS[op]
    except KeyError:
        raise ArtifactError(f"op {op!r} has no GPU implementation (the GPU runs: {', '.join(GPU_OPS)})") from None
