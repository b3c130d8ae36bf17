"""Ahead-of-time builds of the GPU kernels: every kernel, for a named GPU target, with no GPU.

`aot_specs(shape)` lists each kernel with a signature and the constexprs (block sizes, flags)
that the runtime would launch it with for a model of that shape; `compile_kernel` builds one
with triton.compile(ASTSource(...), target=GPUTarget(...)). CI builds them all for cuda sm80,
sm90 and hip gfx942 so that a syntax or lowering error fails there and not on a GPU.

The fp8 (e4m3 weight-only) kernels are listed for FP8_TARGETS only: Triton refuses fp8e4nv below
sm89 ("type fp8e4nv not supported in this architecture"), so they are built for sm89, sm90 and
gfx942 (which compiles e4m3fn too), and the runtime refuses an fp8 artifact on an older NVIDIA GPU.
The w8a8 kernels (fp8 prefill: activation quantization and fp8 x fp8 dots) are built for W8A8_TARGETS,
NVIDIA only; the launchers never pick them on AMD.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
# targets only some kernels are built for (AotSpec.targets), beside TARGETS
EXTRA_TARGETS = {"sm89": ("cuda", 89, 32)}
FP8_TARGETS = ("sm89", "sm90", "gfx942")      # where Triton lowers float8_e4m3fn (fp8e4nv)
W8A8_TARGETS = ("sm89", "sm90")               # where it lowers an e4m3fn x e4m3fn dot (w8a8 prefill)


@dataclass(frozen=True)
class AotSpec:
    family: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] | None = None      # names in TARGETS / EXTRA_TARGETS; None: every TARGETS entry
    variant: str = ""                            # told apart from a spec of the same flags (e.g. "fp8")

    @property
    def name(self) -> str:
        flags = "-".join(f"{k}{v}" for k, v in self.constexprs.items() if isinstance(v, bool) and v)
        return f"{self.family}.{self.kernel}" + (f"<{self.variant}>" if self.variant else "") + (
            f"[{flags}]" if flags else "")

    def builds_for(self, target: str) -> bool:
        return target in (self.targets if self.targets is not None else TARGETS)


def _sig(ptrs: dict[str, str], ints: tuple[str, ...] = (), floats: tuple[str, ...] = (),
         consts: dict[str, Any] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    sig = {k: f"*{v}" for k, v in ptrs.items()}
    sig.update({k: "i32" for k in ints})
    sig.update({k: "fp32" for k in floats})
    sig.update({k: "constexpr" for k in (consts or {})})
    return sig, dict(consts or {})


def aot_specs(hidden: int = 2048, heads: int = 32, kv_heads: int = 4, head_dim: int = 128, experts: int = 128,
              top_k: int = 8, inter: int = 768, group: int = 128) -> list[AotSpec]:
    """One spec per kernel and per flag combination the runtime uses, at these model dims."""
    from ktc.codegen.gpu import attention, matmul, moe, norm, rope, router

    out: list[AotSpec] = []

    def add(family, kernel, sig_consts, targets=None, variant="", **options):
        sig, consts = sig_consts
        ordered = _order(family, kernel, sig)
        out.append(AotSpec(family, kernel, ordered, consts, options, targets, variant))

    nc = norm.default_config(hidden)
    for res in (False, True):
        add("norm", "rms_norm_kernel", _sig(dict(x_ptr="bf16", r_ptr="bf16", w_ptr="bf16", y_ptr="bf16", s_ptr="bf16"),
                                            ("n_cols", "x_stride", "r_stride"), ("eps",),
                                            dict(HAS_RESIDUAL=res, BLOCK=nc["BLOCK"])), num_warps=nc["num_warps"])
    add("embedding", "embedding_kernel", _sig(dict(ids_ptr="i64", table_ptr="bf16", out_ptr="bf16"), ("hidden",),
                                              consts=dict(BLOCK=1024)))
    add("activation", "silu_mul_kernel", _sig(dict(gu_ptr="bf16", out_ptr="bf16"), ("inter",), consts=dict(BLOCK=1024)))
    add("activation", "sigmoid_gate_mul_kernel", _sig(dict(y_ptr="bf16", g_ptr="bf16", out_ptr="bf16"),
                                                      ("hidden", "g_stride"), consts=dict(BLOCK=1024)))
    add("activation", "add_kernel", _sig(dict(a_ptr="bf16", b_ptr="bf16", out_ptr="bf16"), ("n",),
                                         consts=dict(BLOCK=1024)))
    for m in (1, 2048):
        cfg = matmul.tile_config(m, hidden, hidden)
        consts = {k: v for k, v in cfg.items() if k.isupper()}
        for bias in (False, True):
            add("matmul", "matmul_kernel", _sig(dict(a_ptr="bf16", w_ptr="bf16", bias_ptr="bf16", c_ptr="bf16"),
                                                ("M", "N", "K", "stride_am", "stride_wn", "stride_cm"),
                                                consts=dict(HAS_BIAS=bias, **consts)),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    for rows, bias in ((1, False), (2, True)):      # decode linears (gemv_kernel), one and two tokens
        cfg = matmul.gemv_config(rows, hidden, hidden)
        add("matmul", "gemv_kernel", _sig(dict(a_ptr="bf16", w_ptr="bf16", bias_ptr="bf16", c_ptr="bf16"),
                                          ("M", "N", "K", "stride_am", "stride_wn", "stride_cm"),
                                          consts=dict(HAS_BIAS=bias, ROWS=rows, BLOCK_N=cfg["BLOCK_N"],
                                                      BLOCK_K=cfg["BLOCK_K"])),
            num_warps=cfg["num_warps"])
    # --gpu-dense-quant int4 / fp8 linears: decode batches past the GEMV's rows and prefill configs on the
    # tiles (fp8 decode: K steps of several groups), one and two rows on the GEMV kernels
    for kernel, fp8, default, qw, targets in (
            ("matmul_w4a16_kernel", False, matmul.default_config_w4a16, "u8", None),
            ("matmul_fp8_kernel", True, matmul.default_config_fp8, "fp8e4nv", FP8_TARGETS)):
        ptrs = dict(a_ptr="bf16", qw_ptr=qw, s_ptr="fp32", bias_ptr="bf16", c_ptr="bf16")
        ints = ("M", "N", "K", "stride_am", "stride_qn", "stride_sn", "stride_cm")
        for m, bias in ((4, False), (2048, True)):
            cfg = default(m, hidden, hidden)
            consts = {k: v for k, v in cfg.items() if k.isupper()}
            add("matmul", kernel, _sig(ptrs, ints, consts=dict(HAS_BIAS=bias, GROUP=group, **consts)),
                targets=targets, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            if fp8 and m >= matmul.W8A8_MIN_ROWS:       # prefill: w8a8 (fp8 x fp8 dots)
                a8 = dict(HAS_BIAS=bias, GROUP=group, **consts)
                a8["BLOCK_K"] = min(a8["BLOCK_K"], group)
                add("matmul", "matmul_w8a8_kernel", _sig(
                    dict(a_ptr="fp8e4nv", as_ptr="fp32", qw_ptr="fp8e4nv", s_ptr="fp32", bias_ptr="bf16", c_ptr="bf16"),
                    ("M", "N", "K", "stride_am", "stride_asm", "stride_qn", "stride_sn", "stride_cm"), consts=a8),
                    targets=W8A8_TARGETS, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    for family in ("matmul", "moe"):       # the w8a8 products' activation quantization (each family has its own)
        add(family, "quant_fp8_kernel", _sig(dict(x_ptr="bf16", q_ptr="fp8e4nv", s_ptr="fp32"), ("K", "x_stride"),
                                             consts=dict(GROUP=group, BLOCK_G=hidden // group)),
            targets=W8A8_TARGETS, num_warps=4)
        for rows, bias in ((1, False), (2, True)):
            cfg = default(rows, hidden, hidden)
            consts = dict(HAS_BIAS=bias, GROUP=group, FP8=fp8, ROWS=rows, BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_K=max(group, cfg["BLOCK_K"]))
            add("matmul", "gemv_grouped_kernel", _sig(ptrs, ints, consts=consts), targets=targets,
                variant="fp8" if fp8 else "", num_warps=cfg["num_warps"])
    add("rope", "rope_tables_kernel", _sig(dict(pos_ptr="i64", inv_freq_ptr="fp32", cos_ptr="fp32", sin_ptr="fp32"),
                                           floats=("scaling",), consts=dict(HALF=head_dim // 2, BLOCK=head_dim // 2)),
        num_warps=1)
    rc = rope.default_config(head_dim)
    for has_norm in (False, True):
        add("rope", "qk_rope_cache_kernel", _sig(
            dict(qkv_ptr="bf16", cos_ptr="fp32", sin_ptr="fp32", pos_ptr="i64", qn_ptr="bf16", kn_ptr="bf16",
                 q_ptr="bf16", kc_ptr="bf16", vc_ptr="bf16"),
            ("seq", "qkv_stride", "cache_heads_stride", "cache_batch_stride"), ("eps",),
            dict(NUM_HEADS=heads, NUM_KV=kv_heads, HEAD_DIM=head_dim, ROT=head_dim, HAS_NORM=has_norm,
                 BLOCK_D=rc["BLOCK_D"], BLOCK_HALF=rc["BLOCK_D"] // 2)), num_warps=rc["num_warps"])
    pc = attention.prefill_config(head_dim)
    dc = attention.decode_config(head_dim, 1024)
    for window in (False, True):
        add("attention", "attention_prefill_kernel", _sig(
            dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", o_ptr="bf16"),
            ("seq", "past", "window", "cache_bstride", "cache_hstride"), ("qk_scale",),
            dict(NUM_HEADS=heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, HAS_WINDOW=window,
                 BLOCK_M=pc["BLOCK_M"], BLOCK_N=pc["BLOCK_N"], BLOCK_D=head_dim)),
            num_warps=pc["num_warps"], num_stages=pc["num_stages"])
        add("attention", "attention_decode_kernel", _sig(
            dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", pos_ptr="i64", part_o_ptr="fp32", part_lse_ptr="fp32"),
            ("window", "chunk", "cache_bstride", "cache_hstride"), ("qk_scale",),
            dict(NUM_HEADS=heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, SPLITS=dc["SPLITS"], HAS_WINDOW=window,
                 BLOCK_G=16, BLOCK_N=dc["BLOCK_N"], BLOCK_D=head_dim)),
            num_warps=dc["num_warps"], num_stages=dc["num_stages"])
    add("attention", "attention_combine_kernel", _sig(dict(part_o_ptr="fp32", part_lse_ptr="fp32", o_ptr="bf16"),
                                                      consts=dict(HEAD_DIM=head_dim, SPLITS=dc["SPLITS"],
                                                                  BLOCK_S=16, BLOCK_D=head_dim)), num_warps=1)
    _mla_specs(add)
    for method, sigmoid, bias in ((0, False, False), (2, True, True)):
        add("router", "router_topk_kernel", _sig(
            dict(logits_ptr="fp32", bias_ptr="fp32", w_ptr="fp32", ids_ptr="i32"), ("num_experts",), ("scaling",),
            dict(TOP_K=top_k, N_GROUP=8 if method else 1, GROUP_SIZE=experts // (8 if method else 1),
                 TOPK_GROUP=4 if method else 1, SIGMOID=sigmoid, METHOD=method, HAS_BIAS=bias, NORM=True,
                 BLOCK_G=8 if method else 1, BLOCK_E=experts // (8 if method else 1), BLOCK_K=top_k)), num_warps=4)
        fc = router.fused_config(experts, hidden)
        add("router", "router_fused_kernel", _sig(
            dict(x_ptr="bf16", gate_ptr="bf16", logits_ptr="fp32", count_ptr="i32", bias_ptr="fp32", w_ptr="fp32",
                 ids_ptr="i32"), ("hidden", "num_experts", "x_stride"), ("scaling",),
            dict(TOP_K=top_k, N_GROUP=8 if method else 1, GROUP_SIZE=experts // (8 if method else 1),
                 TOPK_GROUP=4 if method else 1, SIGMOID=sigmoid, METHOD=method, HAS_BIAS=bias, NORM=True,
                 BLOCK_G=8 if method else 1, BLOCK_E=experts // (8 if method else 1), BLOCK_K=top_k,
                 ROWS=fc["ROWS"], BLOCK_H=fc["BLOCK_H"])), num_warps=fc["num_warps"])
    gc = moe.gemv_config(hidden, inter)
    add("moe", "moe_gemv_up_kernel", _sig(dict(x_ptr="bf16", w_ptr="bf16", ids_ptr="i32", out_ptr="bf16"),
                                          ("N", "K", "x_stride", "w_estride", "w_nstride"),
                                          consts=dict(TOP_K=top_k, BLOCK_N=gc["GEMV_N_UP"], BLOCK_K=gc["GEMV_K_UP"])),
        num_warps=gc["gemv_warps"])
    add("moe", "moe_gemv_down_kernel", _sig(dict(a_ptr="bf16", w_ptr="bf16", ids_ptr="i32", topk_w_ptr="fp32",
                                                 y_ptr="bf16"), ("N", "K", "y_stride", "w_estride", "w_nstride"),
                                            consts=dict(TOP_K=top_k, BLOCK_N=gc["GEMV_N_DOWN"],
                                                        BLOCK_K=gc["GEMV_K_DOWN"])), num_warps=gc["gemv_warps"])
    for qw, fp8 in (("u8", {}), ("fp8e4nv", dict(targets=FP8_TARGETS, variant="fp8"))):   # w4a16 / fp8 experts
        q = dict(TOP_K=top_k, GROUP=group, FP8=bool(fp8), INT8=False, PAIR=0, SKIP=False)
        ints = ("N", "K", "x_stride", "y_stride", "q_estride", "q_nstride", "s_estride", "s_nstride")
        add("moe", "moe_gemv_up_q_kernel", _sig(dict(x_ptr="bf16", q_ptr=qw, s_ptr="fp32", ids_ptr="i32",
                                                     out_ptr="bf16"), tuple(i for i in ints if i != "y_stride"),
                                                consts=dict(q, BLOCK_N=gc["GEMV_N_UP"], BLOCK_K=gc["GEMV_K_UP"])),
            num_warps=gc["gemv_warps"], **fp8)
        add("moe", "moe_gemv_down_q_kernel",
            _sig(dict(a_ptr="bf16", q_ptr=qw, s_ptr="fp32", ids_ptr="i32", topk_w_ptr="fp32", y_ptr="bf16"),
                 tuple(i for i in ints if i != "x_stride"),
                 consts=dict(q, BLOCK_N=gc["GEMV_N_DOWN"], BLOCK_K=gc["GEMV_K_DOWN"])),
            num_warps=gc["gemv_warps"], **fp8)
    cc = moe.cpu_layout_gemv_config(hidden, inter)
    for qw, cpu in (("i8", dict(INT8=True)), ("u8", dict(PAIR=moe.CPU_INT4_PAIR))):   # the GPU's PCIe share
        q = {**dict(TOP_K=top_k, GROUP=group, FP8=False, INT8=False, PAIR=0, SKIP=True), **cpu}
        ints = ("N", "K", "x_stride", "y_stride", "q_estride", "q_nstride", "s_estride", "s_nstride")
        add("moe", "moe_gemv_up_q_kernel", _sig(dict(x_ptr="bf16", q_ptr=qw, s_ptr="fp32", ids_ptr="i32",
                                                     out_ptr="bf16"), tuple(i for i in ints if i != "y_stride"),
                                                consts=dict(q, BLOCK_N=cc["GEMV_N_UP"], BLOCK_K=cc["GEMV_K_UP"])),
            num_warps=cc["gemv_warps"])
        add("moe", "moe_gemv_down_q_kernel",
            _sig(dict(a_ptr="bf16", q_ptr=qw, s_ptr="fp32", ids_ptr="i32", topk_w_ptr="fp32", y_ptr="fp32"),
                 tuple(i for i in ints if i != "x_stride"),
                 consts=dict(q, BLOCK_N=cc["GEMV_N_DOWN"], BLOCK_K=cc["GEMV_K_DOWN"])),
            num_warps=cc["gemv_warps"])
    for has_table in (False, True):     # decode steps' hand-off to the CPU kernel (with the GPU's PCIe share)
        for split, has_x in ((True, False), (True, True), (False, True)):
            add("moe", "moe_stage_kernel",
                _sig(dict(ids_ptr="i32", table_ptr="i32", take_ptr="i32", cpu_ptr="i32", gpu_ptr="i32", x_ptr="bf16",
                          tw_ptr="fp32", x_out_ptr="fp32", tw_out_ptr="fp32"), ("hidden", "x_stride"),
                     consts=dict(TOP_K=top_k, BLOCK=top_k, HAS_TABLE=has_table, SPLIT=split, HAS_X=has_x,
                                 BLOCK_H=hidden)), num_warps=4)
    for extra in (False, True):     # decode graphs: the hand-off back from the CPU kernel
        add("moe", "moe_wait_gather_kernel", _sig(dict(flag_ptr="i32", seen_ptr="i32", y_ptr="fp32", extra_ptr="fp32",
                                                       out_ptr="bf16"), ("n", "max_spins"),
                                                  consts=dict(HAS_EXTRA=extra, BLOCK=hidden)),
            num_warps=8)
    add("moe", "moe_down_sum_kernel", _sig(dict(a_ptr="bf16", w_ptr="bf16", ids_ptr="i32", topk_w_ptr="fp32",
                                                y_ptr="bf16"), ("N", "K", "y_stride", "w_estride", "w_nstride"),
                                           consts=dict(TOP_K=top_k, BLOCK_M=16, BLOCK_N=gc["DOWN_SUM_N"],
                                                       BLOCK_K=gc["DOWN_SUM_K"])),
        num_warps=gc["down_sum_warps"], num_stages=gc["down_sum_stages"])
    add("moe", "moe_count_kernel", _sig(dict(ids_ptr="i32", counts_ptr="i32"), ("num_slots",),
                                        consts=dict(BLOCK_E=experts, CHUNK=256, SUB=64)))
    add("moe", "moe_offsets_kernel", _sig(dict(counts_ptr="i32", offsets_ptr="i32", sorted_ptr="i32",
                                               block_expert_ptr="i32", total_ptr="i32"),
                                          ("num_slots", "num_chunks", "max_padded", "max_blocks"),
                                          consts=dict(NUM_EXPERTS=experts, BLOCK_M=64, BLOCK_E=experts, BLOCK_P=64,
                                                      CHUNK=64, FILL=1024)), num_warps=8)
    add("moe", "moe_scatter_kernel", _sig(dict(ids_ptr="i32", offsets_ptr="i32", sorted_ptr="i32"), ("num_slots",),
                                          consts=dict(BLOCK_E=experts, CHUNK=256, SUB=64)))
    add("moe", "moe_align_kernel", _sig(dict(ids_ptr="i32", sorted_ptr="i32", block_expert_ptr="i32", total_ptr="i32"),
                                        ("num_slots", "max_padded", "max_blocks"),
                                        consts=dict(NUM_EXPERTS=experts, BLOCK_M=16, BLOCK_E=experts, CHUNK=64)))
    for slots in (top_k, 2048 * top_k):
        # int8: the CPU experts' layout, streamed in for long prefills; fp8: --gpu-quant fp8 (the 8-bit branch)
        for fmt in ("bf16", "int4", "int8", "fp8"):
            int4, int8 = fmt == "int4", fmt in ("int8", "fp8")
            cfg = moe.default_config(slots, hidden, inter, group if fmt in ("int4", "fp8") else None)
            block_k = min(cfg["BLOCK_K"], group) if int8 else cfg["BLOCK_K"]
            fp8 = dict(targets=FP8_TARGETS, variant="fp8") if fmt == "fp8" else {}
            for gated in (True, False):
                if fmt == "fp8" and slots // top_k >= moe.W8A8_MIN_TOKENS:     # fp8 prefill: w8a8
                    add("moe", "fused_moe_w8a8_kernel", _sig(
                        dict(a_ptr="fp8e4nv", as_ptr="fp32", w_ptr="fp8e4nv", scale_ptr="fp32", c_ptr="bf16",
                             sorted_ptr="i32", block_expert_ptr="i32", total_ptr="i32", topk_w_ptr="fp32"),
                        ("N", "K", "num_slots", "a_stride", "as_stride", "c_stride", "w_estride", "w_nstride",
                         "s_estride", "s_nstride"),
                        consts=dict(A_DIV=top_k if gated else 1, GATED=gated, MUL_WEIGHT=not gated,
                                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N_UP" if gated else "BLOCK_N_DOWN"],
                                    BLOCK_K=block_k, GROUP=group)),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], targets=W8A8_TARGETS)
                add("moe", "fused_moe_kernel", _sig(
                    dict(a_ptr="bf16", w_ptr={"int4": "u8", "int8": "i8", "fp8": "fp8e4nv"}.get(fmt, "bf16"),
                         scale_ptr="fp32", c_ptr="bf16", sorted_ptr="i32", block_expert_ptr="i32", total_ptr="i32",
                         topk_w_ptr="fp32"),
                    ("N", "K", "num_slots", "a_stride", "c_stride", "w_estride", "w_nstride", "s_estride", "s_nstride"),
                    consts=dict(A_DIV=top_k if gated else 1, GATED=gated, MUL_WEIGHT=not gated, INT4=int4,
                                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N_UP" if gated else "BLOCK_N_DOWN"],
                                BLOCK_K=block_k, INT8=int8, GROUP=group)),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **fp8)
    add("moe", "moe_sum_kernel", _sig(dict(c_ptr="bf16", y_ptr="bf16"), ("hidden",),
                                      consts=dict(TOP_K=top_k, BLOCK=1024)))
    add("sampling", "argmax_blocks_kernel", _sig(dict(x_ptr="fp32", val_ptr="fp32", idx_ptr="i32"),
                                                 ("vocab", "x_stride"), consts=dict(BLOCK=4096)), num_warps=8)
    add("sampling", "argmax_reduce_kernel", _sig(dict(val_ptr="fp32", idx_ptr="i32", out_ptr="i64"),
                                                 ("nblk", "vocab"), consts=dict(BLOCK=64)), num_warps=1)
    rows = ("vocab", "x_stride", "nblk", "top_k")
    for kernel, ptrs, ints, floats, consts in (         # temperature / top-k / top-p sampling
            ("sample_count_kernel", dict(bmax_ptr="fp32", hist_ptr="i64"), (*rows, "level"), ("temperature",),
             dict(BLOCK=4096)),
            ("sample_mass_kernel", dict(bmax_ptr="fp32", hist_ptr="i64"), (*rows, "level"), ("temperature", "top_p"),
             dict(BLOCK=4096, BLOCK_B=64)),
            ("sample_draw_kernel", dict(hist_ptr="i64", val_ptr="fp32", idx_ptr="i32", thr_ptr="i32"),
             (*rows, "seed", "step"), ("temperature", "top_p"), dict(BLOCK=4096))):
        add("sampling", kernel, _sig(dict(x_ptr="bf16", **ptrs), ints, floats, consts=consts), num_warps=8)
    return out


def _mla_specs(add: Callable[..., None], lora: int = 512, rope: int = 64, nope: int = 128, v_dim: int = 128) -> None:
    """Add (with aot_specs' `add`) the MLA family at DeepSeek-V2/V3's attention dims; the decode kernel
    for 16 and 128 heads (both head-block configs)."""
    from ktc.codegen.gpu import mla

    rc = mla.rope_cache_config(lora, rope)
    for interleave in (False, True):
        add("mla", "mla_rope_cache_kernel", _sig(
            dict(q_ptr="bf16", kv_ptr="bf16", norm_ptr="bf16", cos_ptr="fp32", sin_ptr="fp32", pos_ptr="i64",
                 qpe_ptr="bf16", cache_ptr="bf16"),
            ("seq", "q_stride", "kv_stride", "rope_stride", "qpe_stride", "qpe_hstride", "cache_bstride"), ("eps",),
            dict(NUM_HEADS=128, NOPE=nope, ROPE=rope, LORA=lora, INTERLEAVE=interleave, BLOCK_R=rc["BLOCK_R"],
                 BLOCK_HALF=rc["BLOCK_HALF"])), num_warps=rc["num_warps"])
    # the absorptions read kv_b in place: W_uk transposed (unit n stride), W_uv as stored (unit k stride);
    # the JIT specializes that stride of 1, so the builds do too
    for m, n, k, unit in ((1, lora, nope, "w_nstride"), (1, v_dim, lora, "w_kstride"), (2048, lora, nope, "w_nstride")):
        hc = mla.head_matmul_config(m, n, k)
        ints = ("M", "N", "K", "x_stride", "x_hstride", "w_hstride", "w_nstride", "w_kstride", "o_stride", "o_hstride")
        add("mla", "mla_head_matmul_kernel", _sig(
            dict(x_ptr="bf16", w_ptr="bf16", o_ptr="bf16"), tuple(a for a in ints if a != unit),
            consts={**{key: v for key, v in hc.items() if key.isupper()}, unit: 1}),
            num_warps=hc["num_warps"], num_stages=hc["num_stages"])
    for heads in (16, 128):
        dc = mla.decode_config(heads, lora, 4096)
        add("mla", "mla_decode_kernel", _sig(
            dict(q_ptr="bf16", cache_ptr="bf16", pos_ptr="i64", part_o_ptr="fp32", part_lse_ptr="fp32"),
            ("chunk", "cache_bstride"), ("qk_scale",),
            dict(NUM_HEADS=heads, LORA=lora, ROPE=rope, SPLITS=dc["SPLITS"], BLOCK_H=dc["BLOCK_H"],
                 BLOCK_N=dc["BLOCK_N"], BLOCK_R=lora, BLOCK_DR=rope)),
            num_warps=dc["num_warps"], num_stages=dc["num_stages"])
    dc = mla.decode_config(128, lora, 4096)
    add("mla", "mla_combine_kernel", _sig(dict(part_o_ptr="fp32", part_lse_ptr="fp32", o_ptr="bf16"),
                                          consts=dict(LORA=lora, SPLITS=dc["SPLITS"], BLOCK_S=dc["SPLITS"],
                                                      BLOCK_R=lora)), num_warps=4)
    pc = mla.prefill_config(nope, rope, v_dim)
    add("mla", "mla_prefill_kernel", _sig(
        dict(q_ptr="bf16", qpe_ptr="bf16", kv_ptr="bf16", cache_ptr="bf16", o_ptr="bf16"),
        ("seq", "past", "q_stride", "kv_bstride", "cache_bstride"), ("qk_scale",),
        dict(NUM_HEADS=128, NOPE=nope, ROPE=rope, V_DIM=v_dim, LORA=lora, BLOCK_M=pc["BLOCK_M"],
             BLOCK_N=pc["BLOCK_N"], BLOCK_DN=nope, BLOCK_DR=rope, BLOCK_DV=v_dim)),
        num_warps=pc["num_warps"], num_stages=pc["num_stages"])


def _order(family: str, kernel: str, sig: dict[str, str]) -> dict[str, str]:
    """The signature in the kernel's argument order; KeyError naming an argument left out."""
    fn = _jit_function(family, kernel)
    missing = [a for a in fn.arg_names if a not in sig]
    extra = [a for a in sig if a not in fn.arg_names]
    if missing or extra:
        raise KeyError(f"{family}.{kernel}: signature lacks {missing}, has unknown {extra}")
    return {a: sig[a] for a in fn.arg_names}


def _jit_function(family: str, kernel: str):
    """A JITFunction for the kernel, also when TRITON_INTERPRET=1 made @triton.jit an interpreter object."""
    from triton.runtime.jit import JITFunction

    k = importlib.import_module(f"ktc.codegen.gpu.{family}").KERNELS[kernel]
    return k if isinstance(k, JITFunction) else JITFunction(k.fn)


def compile_kernel(spec: AotSpec, target: str):
    """triton.compile the kernel for a TARGETS name; returns the CompiledKernel (asm: ptx/cubin or amdgcn/hsaco)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, arch, warp = {**TARGETS, **EXTRA_TARGETS}[target]
    src = ASTSource(_jit_function(spec.family, spec.kernel), spec.signature, spec.constexprs)
    return triton.compile(src, target=GPUTarget(backend, arch, warp), options=dict(spec.options))


def build_all(targets: tuple[str, ...] = (*TARGETS, *EXTRA_TARGETS)) -> dict[str, dict[str, Any]]:
    """Build every spec for every target it lists: {"<spec name>@<target>": {"ok", "error", "wgmma", "seconds"}}."""
    import time

    results: dict[str, dict[str, Any]] = {}
    for spec in aot_specs():
        for target in targets:
            if not spec.builds_for(target):
                continue
            start = time.perf_counter()
            key = f"{spec.name}@{target}"
            try:
                k = compile_kernel(spec, target)
                asm = k.asm.get("ptx", "")
                results[key] = {"ok": True, "family": spec.family, "wgmma": "wgmma" in asm,
                                "fp8_mma": ".e4m3.e4m3" in asm,
                                "binary": "cubin" in k.asm or "hsaco" in k.asm}
            except Exception as e:  # reported per kernel; the test names the failing one
                results[key] = {"ok": False, "family": spec.family, "error": f"{type(e).__name__}: {e}"[:2000]}
            results[key]["seconds"] = round(time.perf_counter() - start, 3)
    return results


if __name__ == "__main__":
    import json
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run ahead-of-time builds without TRITON_INTERPRET=1")
    print(json.dumps(build_all()))
