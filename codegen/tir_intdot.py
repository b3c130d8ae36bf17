"""Integer-dot-product prefill path of the quantized `moe_experts` kernels (TIR, TVMScript).

Imported only by the build subprocess, through codegen/tir_experts.py, which calls
`make_prefill_body` for int8 / int4 specs when the target's variant is "vnni" (AVX512-VNNI,
vpdpbusd), "amx" (AMX-INT8 tiles, tdpbsud) or "amx-emu" (the AMX code with every tile
instruction replaced by plain TIR loops of the same semantics: how the AMX path is tested on
hosts without AMX). The decode regime has its own micro-kernels (tir_experts: FMA for token
blocks, vpdpbusd for single tokens); this path runs when a call carries enough (token, expert) pairs
per expert (cpu_experts.PREFILL_PAIRS_PER_EXPERT) for a weight tile to serve many tokens.

The layer, for the segments (experts) the counting sort found, in five parallel phases:

1. quantize the input rows and gather them into each segment's column blocks `act`: a block is 16
   columns x Kd bytes in VNNI order (k / 4, column, k % 4): the layout of an AMX B tile and of
   a vpdpbusd source. Activations are quantized per token, symmetric, u8 = q + 128, in
   `levels` levels: int8 weights use 2 (x ~ s * (q1 + q2 / 256), ~15 bits: the activations
   add no error that matters), int4 weights 1 (their own error dominates). With 2 levels on amx
   (KernelConfig.act_levels "split") a segment's blocks go in twos: level 1 of 16 pairs, then
   level 2 of the same pairs; otherwise a block holds 8 pairs: columns 0-7 level 1, 8-15 level 2.
   KernelConfig.act_quant "row": each token's row is quantized once (into ybuf, free until phase 4),
   then each block copies 64 values of its 16 columns at a time with a 16 x 16 transpose of 4-byte
   words; "pair" (the path before, kept to time against): each pair quantizes its token's row into its
   block, top-k times a token. Measured on the H100 host's Xeon, int4 prefill-512: "row" faster in 14 of
   16 medians.
2. gate/up: per (segment, 16 intermediate rows): C = W . act as int32 per quantization group,
   then f32 += C * scale[row, group]; at the end (f32 - comp[row]) * column scale, and
   h = silu(gate) * up into hbuf.
3. quantize + gather h (hbuf rows of the segment) like 1 (rows once each either way; "row" writes
   them with the block copy where h's bytes fit in ybuf: I * levels + 4 <= 4 H).
4. down: per (segment, 32 hidden rows), the same micro-kernel into ybuf.
5. (tir_experts) y[t] = sum_k w[t, k] ybuf[pair(t, k)].

`comp[row]` (a packed weight part) is 128 * sum_g scale[row, g] * sum_{k in g} q[row, k]
(times 257 with 2 levels): the +128 of the unsigned activations, removed once per row.

Work items (segment, row tile) are spread over the threads by codegen/tir_schedule: each task
starts on a share balanced by cost (an item costs its segment's column blocks) and then steals
what the others have not reached (KernelConfig.item_schedule "steal"; "static": shares only).

Micro-kernels, per item, for each pair of column blocks and each group:
- amx: tiles 4, 5 = two 16-row weight tiles (K step KT = min(group, 64) bytes, read straight
  from the row-major int8 weights, or from the item's unpacked int4 rows); 6, 7 = two column
  blocks; 0-3 = the four 16 x 16 int32 products (tdpbsud: signed weights x unsigned
  activations); stored to `cbuf` and folded into the f32 accumulators after each group.
  Folding (per 32-row x 16-column tile pair and group: int32 -> f32, times the group's scale) and
  the tile stores before it are what group 32 costs over group 128 (measured: leaving the folds out
  saves 22-28% of an int8 g32 prefill, the stores too 40-46%), so the level-split layout exists: with it tiles
  0-1 hold level 1 and 2-3 level 2 of the same 16 pairs, and a fold combines (l1 << 8) + l2 of 16
  pairs per vector; with both levels in one block a vector holds 8 (twice the fold instructions).
- vnni: 8 rows at a time, one zmm accumulator per row: vpdpbusd(acc, act block row (64
  bytes = 16 columns x 4 k), 4 weight bytes broadcast).

int4 weights on amx (KernelConfig.int4_unpack "step"): an item's rows are unpacked to int8 a unit of
max(group, 128) values of K at a time into one of two small buffers (L1), right before that unit's tile
products for up to 4 column-block pairs, so the unpack (vector instructions) runs beside the previous
unit's tile products and a row is unpacked once for up to 128 pairs. With groups of 128 or more the
activations are written in the packed weights' nibble order (within 128 values: the four 32-value
blocks' low halves, then their high halves) and 64 packed bytes become two 64-byte tile rows with a
shift and two vpermb table lookups (AVX512-VBMI), no shuffle across lanes. Measured on the H100 host's
Xeon (prefill-512, BENCHMARKS.md): faster than unpacking the item's whole rows first ("item") in 15 of 16
(lease, shape) medians, 1.04-1.28x.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import tirx as IB

from ktc.codegen import tir_schedule
from ktc.codegen.tir_amx import emu_config, emu_release, tile_ops

NCOL = 16           # columns per activation block
RT = 16             # rows per weight tile
ITEM_ROWS = 32      # weight rows per work item (2 tiles)
VNNI_RB = 8         # rows per vnni register block
ALLOC = {"scope": "global", "annotations": {"disable_lower_builtin": True}}


def _ramp(buf, start, lanes):
    return tirx.BufferLoad(buf, [tirx.Ramp(start, tirx.const(1, "int32"), lanes)])


def _bc(v, lanes=16):
    return tirx.Broadcast(v, lanes)


def _lanes(vec, first, n):
    """Lanes first .. first + n - 1 of vec."""
    return tirx.Shuffle([vec], [tirx.const(first + i, "int32") for i in range(n)])


def prefetch_line(addr, locality):
    """llvm.prefetch of the line at addr (a read; locality 3: prefetcht0 .. 1: prefetcht2)."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", addr, T.int32(0), T.int32(locality), T.int32(1))


def levels_for(fmt: str) -> int:
    """Activation quantization levels of a weight format (see the module docstring)."""
    return 2 if fmt == "int8" else 1


def make_prefill_body(*, H, I, E, K, G, fmt, variant, O_SEGEXP, O_SEGSTART, O_NSEG, O_SORTED, silu,  # noqa: E741
                      prefetch=0, schedule="steal", split=False, probe="", int4_unpack="step", epilogue="vector",
                      act_quant="row", prefetch_next=False, prefetch_hint=3,
                      act_prefetch=0):
    """The macro `prefill_body(x, gq, gs, gc, dq, ds, dc, hbuf, ybuf, iw, act, asc, nthr, o_cum,
    o_bseg, gqf, dqf, o_sched)` running phases 1-4 (iw already holds the sorted segments; gqf / dqf are
    flat int8 views of the weights, or None for int4). prefetch: on amx with int8 weights, K steps
    ahead whose weight lines each K step prefetches (see KernelConfig.prefill_prefetch); 0: none.
    schedule: "static" (each task runs its share of the items) or "steal" (and then takes items
    left in the others' shares; KernelConfig.item_schedule). split: on amx with two levels, each level in
    column blocks of its own (16 pairs a block; KernelConfig.act_levels "split"), else both in one.
    int4_unpack: on amx with int4 weights, "step" (unpack each 128 values of K of the item's rows just
    before their tile products) or "item" (the item's whole rows first; KernelConfig.int4_unpack).
    epilogue: "transpose", "vector" or "scalar" (KernelConfig.prefill_epilogue). act_quant: "row" (each x and h
    row quantized once, then copied into the blocks) or "pair" (each pair's row quantized into its block;
    KernelConfig.act_quant)."""
    L = levels_for(fmt)
    TRANSPOSE_EPI = epilogue == "transpose"
    VEC_EPI = epilogue == "vector"
    SPLIT = split and L == 2 and variant in ("amx", "amx-emu")
    int4 = fmt == "int4"
    amx = variant in ("amx", "amx-emu")
    # int4 "step" unpack: a unit of UNIT values of K of the item's rows at a time (64 packed bytes a row per
    # 128 values), into one of two 32 x UNIT buffers, right before the unit's tile products for up to NP
    # column-block pairs; the unpack (vector work) runs beside the previous unit's tile products, and
    # the rows are unpacked once for up to 2 NP blocks (16 NP pairs) instead of once a pass
    STEP = int4 and amx and int4_unpack == "step" and H % 128 == 0 and I % 128 == 0
    UNIT = max(G, 128)
    NP = 4
    # with groups of 128 or more, a chunk's 128 values are one group's, so the activations can take the
    # nibble order of the packed weights (per 128 values: the 4 blocks' low halves, then their high halves)
    # and a row's 64 packed bytes unpack to two 64-byte tile rows with no shuffle across lanes
    NIB = STEP and G % 128 == 0
    # bench only (KernelConfig.probe, wrong results): steps left out of the split int8 path or the int4 "step" one
    PROBE = probe if (SPLIT and probe in ("nofold", "nostore")) or (
        amx and probe in ("noprod", "noact", "noblocks")) or (
        STEP and probe in ("nounpack", "nofold", "nostore")) or probe.startswith("upto") else ""
    # probe "uptoN": the phases after N left out (phase 5, in tir_experts, too), to time each phase by difference
    STOP = int(PROBE[4:]) if PROBE.startswith("upto") else 4
    # the split int8 path folds its products unless a probe leaves the folds out (until 2026-11-24 every probe did,
    # so "noact" and "noblocks" timed int8 without its folds too)
    SPLIT_FOLDS = PROBE not in ("nofold", "nostore")
    PPB = NCOL if SPLIT else NCOL // L    # pairs per column block
    # column blocks of distinct pairs a pass over an item's rows takes (a pass reads two blocks: with split
    # levels they are the two levels of the same 16 pairs, and their fold leaves them at facc[row * 32 + pair])
    PAIR_BLOCKS = 1 if SPLIT else 2
    KT = min(G, 64)           # AMX K step (bytes)
    NR1 = I // RT             # gate/up items per segment (16 gate + 16 up rows each)
    NR2 = H // ITEM_ROWS      # down items per segment
    assert I % RT == 0 and H % ITEM_ROWS == 0 and G % KT == 0 and KT % 4 == 0
    PF = prefetch
    PFA = 0 if PROBE == "noact" else act_prefetch    # K steps ahead whose activation tile lines are prefetched
    PF_HINT = prefetch_hint       # llvm.prefetch locality: 3 prefetcht0 (L1), 2 prefetcht1 (L2), 1 prefetcht2
    # int4 "step": while on an item's rows (first pass), also prefetch the next item's into L2, a unit's share
    # (32 lines, contiguous: the next item's 2 x 16 rows are two runs of 16 rows) per unit
    PFN = prefetch_next and STEP and H % 128 == 0 and I % 128 == 0
    # act_quant "row": x's rows quantized once a token (phase 1) and h's rows (phase 3) into ybuf, unused
    # until phase 4 (h's bytes and scales fit where I * L + 4 <= 4 H), then copied into the blocks
    ROWQ_X = act_quant == "row" and H % 64 == 0
    ROWQ_H = act_quant == "row" and I % 64 == 0 and I * L + 4 <= 4 * H
    STEAL = schedule == "steal"
    emu = variant == "amx-emu"
    WST = UNIT if STEP else None     # row stride of the unpacked int4 rows in "step" mode

    def i64(v):
        return T.Cast("int64", v)

    def wrow(r0a, r0b, q):
        """Weight row of item row q (rows 0-15: tile a from r0a, 16-31: tile b from r0b)."""
        if isinstance(q, int):
            return r0a + q if q < RT else r0b + q - RT
        return T.if_then_else(q < RT, r0a + q, r0b + q - RT)

    def woff(e, nrows, kd, r0a, r0b, q, k):
        """Offset of weight (item row q, k) in the flat int8 weights, or in the unpacked rows."""
        if STEP:
            return i64(k // UNIT % 2 * (ITEM_ROWS * UNIT) + q * UNIT + k % UNIT)
        if int4:
            return i64(q * kd + k)
        return (i64(e) * nrows + i64(wrow(r0a, r0b, q))) * kd + i64(k)

    # ---- phase 1 / 3: quantize + gather rows into column blocks -------------------------
    def nib_pos(k16):
        """Position in the block's K order of values 16 k16 .. 16 k16 + 15: natural, or (NIB) the packed int4
        weights' nibble order: within 128 values, block j's values 0-15 at 16 j, its 16-31 at 64 + 16 j."""
        if NIB:
            return k16 // 8 * 128 + k16 % 2 * 64 + k16 % 8 // 2 * 16
        return k16 * 16

    @T.macro
    def store_words(act, off, u):
        """The 16 bytes u (k .. k + 15 of one column) -> 4 rows of a block, 64 bytes apart, from off."""
        act[tirx.Ramp(off, T.int64(1), 4)] = _lanes(u, 0, 4)
        act[tirx.Ramp(off + T.int64(64), T.int64(1), 4)] = _lanes(u, 4, 4)
        act[tirx.Ramp(off + T.int64(128), T.int64(1), 4)] = _lanes(u, 8, 4)
        act[tirx.Ramp(off + T.int64(192), T.int64(1), 4)] = _lanes(u, 12, 4)

    @T.macro
    def row_absmax(src, row, kd, amax):
        """amax[0] = max |src[row, 0:kd]|, at least 1e-30."""
        accv = T.alloc_buffer((16,), "float32", **ALLOC)
        for v in T.vectorized(16):
            accv[v] = T.float32(0)
        for k16 in range(kd // 16):
            for v in T.vectorized(16):
                accv[v] = T.max(accv[v], T.abs(src[row, k16 * 16 + v]))
        amax[0] = T.float32(1e-30)
        for v in range(16):
            amax[0] = T.max(amax[0], accv[v])

    def quant16(xv):
        """16 values already times 127 / amax -> (level 1's bytes (u8 = q + 128)[, level 2's: the residual times
        256, with 2 levels])."""
        q1 = T.Bind(T.max(T.min(T.nearbyint(xv), _bc(T.float32(127))), _bc(T.float32(-127))))
        u1 = T.Bind(T.Cast("uint8x16", T.Cast("int32x16", q1) + _bc(T.int32(128))))
        if L == 1:
            return (u1,)
        q2 = T.Bind(T.max(T.min(T.nearbyint((xv - q1) * _bc(T.float32(256))), _bc(T.float32(127))),
                          _bc(T.float32(-128))))
        return u1, T.Bind(T.Cast("uint8x16", T.Cast("int32x16", q2) + _bc(T.int32(128))))

    @T.macro
    def quant_rows(src, kd, b, jj, row_expr, act, asc):
        """src[row, 0:kd] -> column jj (and jj + PPB) of block b."""
        # bound once: an index expression that loads from iw, substituted into the vectorized loops,
        # makes TVM scalarize them (measured: this phase was 17% of an int8 prefill's time)
        row = T.Bind(row_expr)
        amax = T.alloc_buffer((1,), "float32", **ALLOC)
        row_absmax(src, row, kd, amax)
        inv = T.Bind(T.float32(127) / amax[0])
        if L == 2:
            asc[b * NCOL + jj] = amax[0] / T.float32(127 * 256)
        else:
            asc[b * NCOL + jj] = amax[0] / T.float32(127)
        base = T.Bind(i64(b) * (NCOL * kd))
        # 16 values at a time in vector registers; each 4 of them (one k / 4 row of the block) go to
        # the block as one 4-byte store
        for k16 in range(kd // 16):
            u = quant16(T.Bind(tirx.BufferLoad(src, [row, tirx.Ramp(k16 * 16, 1, 16)]) * _bc(inv)))
            store_words(act, base + i64(nib_pos(k16) * 16 + jj * 4), u[0])
            if L == 2:
                if SPLIT:
                    store_words(act, base + i64(NCOL * kd + k16 * 256 + jj * 4), u[1])
                else:
                    store_words(act, base + i64(k16 * 256 + (jj + PPB) * 4), u[1])

    def src_row(from_x, iw, p0, pv):
        """The row of the phase's source holding pair p0 + pv: x's row of its token, or h's row of the pair."""
        if from_x:
            return iw[O_SORTED + p0 + pv] // K
        return p0 + pv

    @T.macro
    def quant_phase(src, kd, from_x, iw, act, asc, o_cum, o_bseg):
        nb_tot = T.Bind(iw[o_cum + iw[O_NSEG]])
        for b in T.parallel(nb_tot):
            s = T.Bind(iw[o_bseg + b])
            lb = T.Bind(b - iw[o_cum + s])
            p0 = T.Bind(iw[O_SEGSTART + s])
            cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
            if SPLIT:
                # blocks 2j, 2j + 1 of a segment: levels 1, 2 of its pairs 16j .. 16j + 15
                if lb % 2 == 0:
                    for jj in range(PPB):
                        if lb // 2 * PPB + jj < cnt:
                            quant_rows(src, kd, b, jj, src_row(from_x, iw, p0, lb // 2 * PPB + jj), act, asc)
            else:
                for jj in range(PPB):
                    if lb * PPB + jj < cnt:
                        quant_rows(src, kd, b, jj, src_row(from_x, iw, p0, lb * PPB + jj), act, asc)

    # ---- phase 1 / 3, "row" (ROWQ): each source row quantized once, then copied into the blocks --------
    # x's rows are quantized once a token instead of once a (token, expert) pair (K times fewer), into rq
    # (bytes in the blocks' K order, L levels a row) with their scales in rs; then each column block takes
    # 64 values of its 16 columns at a time as 16 64-byte loads, transposed as 16 x 16 4-byte words into the
    # block's 16 rows (16 64-byte stores instead of 64 4-byte ones)
    @T.macro
    def quant_row_once(src, kd, row, rq, rs):
        """src[row, 0:kd] -> rq[(row * L + l) * kd:] (level l, the blocks' K order), its scale -> rs[row]."""
        amax = T.alloc_buffer((1,), "float32", **ALLOC)
        row_absmax(src, row, kd, amax)
        inv = T.Bind(T.float32(127) / amax[0])
        rs[row] = amax[0] / T.float32(127 * 256 if L == 2 else 127)
        base = T.Bind(i64(row) * (L * kd))
        for k16 in range(kd // 16):
            u = quant16(T.Bind(tirx.BufferLoad(src, [row, tirx.Ramp(k16 * 16, 1, 16)]) * _bc(inv)))
            rq[tirx.Ramp(base + i64(nib_pos(k16)), T.int64(1), 16)] = u[0]
            if L == 2:
                rq[tirx.Ramp(base + i64(kd + nib_pos(k16)), T.int64(1), 16)] = u[1]

    def col_pair(lb, jj):
        """The segment's pair in column jj of its block lb."""
        if SPLIT:
            return lb // 2 * NCOL + jj
        return lb * PPB + jj % PPB

    def col_level(lb, jj):
        if SPLIT:
            return lb % 2
        return jj // PPB

    def copy64(rq, act, roff, base, c):
        """Values 64 c .. 64 c + 63 of the block's 16 columns (rq rows at roff[jj]) -> its rows 16 c .. 16 c + 15."""
        cols = transpose16([T.reinterpret("int32x16", _ramp(rq, roff[jj] + i64(c * 64), 64)) for jj in range(NCOL)])
        for r in range(16):
            IB.buffer_store(act, T.reinterpret("uint8x64", cols[r]), [tirx.Ramp(base + i64((c * 16 + r) * 64),
                                                                                T.int64(1), 64)])

    @T.macro
    def gather_blocks(from_x, kd, iw, act, asc, rq, rs, o_cum, o_bseg):
        nb_tot = T.Bind(iw[o_cum + iw[O_NSEG]])
        for b in T.parallel(nb_tot):
            roff = T.alloc_buffer((NCOL,), "int64", **ALLOC)
            s = T.Bind(iw[o_bseg + b])
            lb = T.Bind(b - iw[o_cum + s])
            p0 = T.Bind(iw[O_SEGSTART + s])
            cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
            for jj in range(NCOL):
                # a column past the segment's pairs copies its last pair's row (the epilogues skip it)
                pv = T.Bind(T.min(col_pair(lb, jj), cnt - 1))
                roff[jj] = i64(src_row(from_x, iw, p0, pv)) * (L * kd) + i64(col_level(lb, jj) * kd)
                if jj < PPB and (not SPLIT or lb % 2 == 0):
                    asc[b * NCOL + jj] = rs[src_row(from_x, iw, p0, pv)]
            base = T.Bind(i64(b) * (NCOL * kd))
            for c in range(kd // 64):
                copy64(rq, act, roff, base, c)

    @T.macro
    def fill_blocks(src, kd, from_x, nrows, rowq, rs, iw, act, asc, rq, o_cum, o_bseg):
        """Phase 1 (x, from_x) or 3 (h): src's nrows rows into the segments' column blocks, each row quantized once
        into rq (scales rs) and copied (rowq: "row"), or each pair's row quantized into its block ("pair")."""
        if rowq:
            for r in T.parallel(nrows):
                quant_row_once(src, kd, r, rq, rs)
            if PROBE != "noblocks":
                gather_blocks(from_x, kd, iw, act, asc, rq, rs, o_cum, o_bseg)
        else:
            quant_phase(src, kd, from_x, iw, act, asc, o_cum, o_bseg)

    # ---- int4: unpack the item's 32 weight rows to int8 ----------------------------------
    # 64 packed bytes (4 blocks of 32 values) at a time: both nibbles of all 64 bytes in two 64-lane
    # vectors, then each block's low 16 values and high 16 put in order by two 128-bit-lane shuffles
    # (the loop below, 16 bytes at a time, takes ~4x the instructions: int4 prefill-512 was 1.16-1.33x slower)
    lanes_a = [i + 16 * j for j in (0, 4, 1, 5) for i in range(16)]       # blocks 0, 1 of (lo, hi)
    lanes_b = [i + 16 * j for j in (2, 6, 3, 7) for i in range(16)]       # blocks 2, 3

    def nib(v, hi):
        n = T.shift_right(v, _bc(T.uint8(4), 64)) if hi else T.bitwise_and(v, _bc(T.uint8(15), 64))
        return T.reinterpret("int8x64", T.bitwise_xor(n, _bc(T.uint8(8), 64))) - _bc(T.int8(8), 64)

    # the signed value of a nibble, for every byte: one vpermb (AVX512-VBMI) whose 64-entry table repeats the
    # 16 nibble values, so the index's bits 4-5 (the next nibble's) need no mask; the emulated build, for
    # hosts without VBMI, computes the same with and / xor / sub
    def nib_lut(v):
        if emu:
            return nib(v, False)
        table = tirx.Shuffle([tirx.Ramp(T.int8(0), T.int8(1), 16) - _bc(T.int8(8), 16)] * 4,
                             [tirx.const(i // 16 * 16 + (i + 8) % 16, "int32") for i in range(64)])
        return T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.permvar.qi.512", table,
                                       T.reinterpret("int8x64", v))

    @T.macro
    def unpack64(packed, dst0, wsc):
        """64 packed bytes (128 values) -> wsc[dst0 : dst0 + 128] as int8: in the nibble order by two table
        lookups (NIB), else in K order by two cross-lane shuffles."""
        pk = T.Bind(packed)
        dst = T.Bind(dst0)
        if NIB:
            wsc[tirx.Ramp(dst, T.int64(1), 64)] = nib_lut(pk)
            wsc[tirx.Ramp(dst + T.int64(64), T.int64(1), 64)] = nib_lut(T.reinterpret(
                "uint8x64", T.shift_right(T.reinterpret("uint16x32", pk), _bc(T.uint16(4), 32))))
        else:
            lo = T.Bind(nib(pk, False))
            hi = T.Bind(nib(pk, True))
            wsc[tirx.Ramp(dst, T.int64(1), 64)] = tirx.Shuffle([lo, hi], [tirx.const(i, "int32") for i in lanes_a])
            wsc[tirx.Ramp(dst + T.int64(64), T.int64(1), 64)] = tirx.Shuffle(
                [lo, hi], [tirx.const(i, "int32") for i in lanes_b])

    @T.macro
    def unpack_rows(wq, e, r0a, r0b, kd, wsc):
        for q in T.unroll(ITEM_ROWS):
            for b4 in range(kd // 128):
                unpack64(tirx.BufferLoad(wq, [i64(e), i64(wrow(r0a, r0b, q)), tirx.Ramp(i64(b4 * 64), T.int64(1), 64)]),
                         i64(q * kd + b4 * 128), wsc)
            for blk in range(kd // 128 * 4, kd // 32):
                for v in T.vectorized(16):
                    wsc[q * kd + blk * 32 + v] = T.reinterpret("int8", T.bitwise_xor(T.bitwise_and(
                        wq[i64(e), i64(wrow(r0a, r0b, q)), i64(blk * 16 + v)], T.uint8(15)), T.uint8(8))) - T.int8(8)
                for v in T.vectorized(16):
                    wsc[q * kd + blk * 32 + 16 + v] = T.reinterpret("int8", T.bitwise_xor(T.shift_right(
                        wq[i64(e), i64(wrow(r0a, r0b, q)), i64(blk * 16 + v)], T.uint8(4)), T.uint8(8))) - T.int8(8)

    @T.macro
    def unpack_chunk(wq, e, r0a, r0b, kd, c, dst0, wsc, pf, ne, na, nbr):
        """"step" mode: values 128 c .. 128 c + 127 of the item's 32 rows -> wsc from dst0, rows UNIT apart;
        pf: prefetch the packed rows PF chunks ahead (the first pass over the item) and (PFN) chunk c's share
        of the next item's rows (expert ne, rows na.., nbr..: 16 contiguous rows each) into L2."""
        if PFN:
            if pf:
                for ln in T.unroll(16):
                    off = T.Bind(c * 1024 + ln * 64)      # in the 16 rows' kd / 2 packed bytes each
                    T.evaluate(prefetch_line(
                        T.address_of(wq[i64(ne), i64(na + off // (kd // 2)), i64(off % (kd // 2))]), 2))
                    T.evaluate(prefetch_line(
                        T.address_of(wq[i64(ne), i64(nbr + off // (kd // 2)), i64(off % (kd // 2))]), 2))
        for q in T.unroll(ITEM_ROWS):
            if PF > 0:
                if pf:
                    T.evaluate(prefetch_line(T.address_of(
                        wq[i64(e), i64(wrow(r0a, r0b, q)), i64(T.min(c + PF, kd // 128 - 1) * 64)]), PF_HINT))
            if PROBE != "nounpack":
                unpack64(tirx.BufferLoad(wq, [i64(e), i64(wrow(r0a, r0b, q)), tirx.Ramp(i64(c * 64), T.int64(1), 64)]),
                         i64(dst0 + q * UNIT), wsc)

    # ---- tile operations: real AMX, or emulated with plain loops -------------------------
    if not emu:
        # C tiles 0-3: 16 rows x 64 bytes; weight tiles 4-5: 16 rows x KT bytes; activation tiles
        # 6-7: KT / 4 rows x 64 bytes
        tl_config, tl_release, tl_zero, tl_load, tl_dp, tl_store = tile_ops(
            "llvm.x86.tdpbsud", [(16, 64)] * 4 + [(16, KT)] * 2 + [(KT // 4, 64)] * 2)
    else:
        tl_config, tl_release = emu_config, emu_release

        @T.macro
        def tl_zero(c, creg):
            for i in range(256):
                creg[c * 256 + i] = 0

        @T.macro
        def tl_load(t, buf, off, stride, treg):
            if t < 6:
                for m in range(16):
                    for cc in range(KT):
                        treg[(t - 4) * 1024 + m * 64 + cc] = T.reinterpret("uint8", buf[off + i64(m * stride + cc)])
            else:
                for m in range(KT // 4):
                    for cc in range(64):
                        treg[(t - 4) * 1024 + m * 64 + cc] = buf[off + i64(m * stride + cc)]

        @T.macro
        def tl_dp(c, a, bt, treg, creg):
            for m in range(16):
                for nn in range(16):
                    for k in range(KT):
                        creg[c * 256 + m * 16 + nn] = creg[c * 256 + m * 16 + nn] + T.Cast(
                            "int32", T.reinterpret("int8", treg[(a - 4) * 1024 + m * 64 + k])) * T.Cast(
                            "int32", treg[(bt - 4) * 1024 + (k // 4) * 64 + nn * 4 + k % 4])

        @T.macro
        def tl_store(c, cbuf, creg):
            for i in range(256):
                cbuf[c * 256 + i] = creg[c * 256 + i]

    def act_off(cb, kd, g, ks):
        """Where K step ks of group g of column block cb starts in act (probe "noact": the first two blocks' first
        K step, which stay in L1: what loading the blocks from L2 costs)."""
        if PROBE == "noact":
            return i64(cb % 2 * 1024)
        return i64(cb) * (NCOL * kd) + i64((g * G + ks * KT) // 4 * 64)

    @T.macro
    def prefetch_act(act, cb, kd, g, ks):
        """PFA: prefetch (into L1) the lines of column block cb's activation tile PFA K steps ahead: the
        blocks of a segment outgrow L1 and are read again by every work item of the segment, from L2, and
        the "noact" probe measured those tile loads at 12-17% of an int4 prefill (its int8 figures left the folds
        out too)."""
        if PFA > 0:
            for ln in T.unroll(KT // 4):
                T.evaluate(prefetch_line(T.address_of(act[
                    i64(cb) * (NCOL * kd) + i64(T.min(g * G + ks * KT + PFA * KT, kd - KT) // 4 * 64 + ln * 64)]), 3))

    # ---- software prefetch of the item's weight rows at K offset k (one 64-byte line a row) -------
    # the 32 rows of a work item are 32 streams kd bytes apart, which the hardware prefetchers follow
    # badly: without this the weight tile loads were the largest cost of the AMX path (profile, H100 host)
    @T.macro
    def prefetch_rows(wbuf, nrows, kd, e, r0a, r0b, k):
        for q in T.unroll(ITEM_ROWS):
            T.evaluate(prefetch_line(T.address_of(wbuf[woff(e, nrows, kd, r0a, r0b, q, T.min(k, kd - 64))]), PF_HINT))

    # ---- fold the int32 products of one group into the f32 accumulators ------------------
    # facc[(q * 2 + cbi) * 16 + col]: item row q, column block cbi (of the pair), column col
    # (first: the item's first group writes facc instead of adding to it, so facc needs no zeroing)
    @T.macro
    def fold(src, so, facc, q, cbi, sc, first, fo=0):
        if L == 2:
            for v in T.vectorized(8):
                if first:
                    facc[fo + (q * 2 + cbi) * 16 + v] = T.Cast(
                        "float32", T.shift_left(src[so + v], 8) + src[so + 8 + v]) * sc
                else:
                    facc[fo + (q * 2 + cbi) * 16 + v] = facc[fo + (q * 2 + cbi) * 16 + v] + T.Cast(
                        "float32", T.shift_left(src[so + v], 8) + src[so + 8 + v]) * sc
        else:
            for v in T.vectorized(16):
                if first:
                    facc[fo + (q * 2 + cbi) * 16 + v] = T.Cast("float32", src[so + v]) * sc
                else:
                    facc[fo + (q * 2 + cbi) * 16 + v] = (facc[fo + (q * 2 + cbi) * 16 + v]
                                                         + T.Cast("float32", src[so + v]) * sc)

    @T.macro
    def fold_tile(c, cbuf, facc, ws, e, r0a, r0b, g, first, fo=0):
        for m in range(16):
            fold(cbuf, c * 256 + m * 16, facc, (c % 2) * RT + m, c // 2,
                 ws[i64(e), i64(wrow(r0a, r0b, (c % 2) * RT + m)), i64(g)], first, fo)

    @T.macro
    def fold_split(c, cbuf, facc, ws, e, r0a, r0b, g, first):
        """Split levels: tile c (level 1 of 16 pairs x weight tile c) and c + 2 (level 2) -> facc[row * 32 + pair]."""
        for m in range(16):
            sc = T.Bind(ws[i64(e), i64(wrow(r0a, r0b, c * RT + m)), i64(g)])
            for v in T.vectorized(16):
                if first:
                    facc[(c * RT + m) * 32 + v] = T.Cast(
                        "float32", T.shift_left(cbuf[c * 256 + m * 16 + v], 8) + cbuf[(c + 2) * 256 + m * 16 + v]) * sc
                else:
                    facc[(c * RT + m) * 32 + v] = facc[(c * RT + m) * 32 + v] + T.Cast(
                        "float32", T.shift_left(cbuf[c * 256 + m * 16 + v], 8) + cbuf[(c + 2) * 256 + m * 16 + v]) * sc

    @T.macro
    def group_amx_split(wbuf, nrows, kd, act, cb0, g, ws, e, r0a, r0b, facc, cbuf, treg, creg, first, pf):
        """Split levels: weight tile a's products (C0 level 1, C2 level 2), then b's (C1, C3); a's are
        stored and folded after b's are issued, so the fold runs beside b's tile products."""
        tl_zero(0, creg)
        tl_zero(2, creg)
        tl_zero(1, creg)
        tl_zero(3, creg)
        for ks in range(G // KT):
            if PF > 0 and not int4:
                if pf:
                    prefetch_rows(wbuf, nrows, kd, e, r0a, r0b, g * G + ks * KT + PF * KT)
            prefetch_act(act, cb0, kd, g, ks)
            prefetch_act(act, cb0 + 1, kd, g, ks)
            tl_load(4, wbuf, woff(e, nrows, kd, r0a, r0b, 0, g * G + ks * KT), kd, treg)
            tl_load(6, act, act_off(cb0, kd, g, ks), 64, treg)
            tl_load(7, act, act_off(cb0 + 1, kd, g, ks), 64, treg)
            tl_dp(0, 4, 6, treg, creg)
            tl_dp(2, 4, 7, treg, creg)
            tl_load(5, wbuf, woff(e, nrows, kd, r0a, r0b, RT, g * G + ks * KT), kd, treg)
            tl_dp(1, 5, 6, treg, creg)
            tl_dp(3, 5, 7, treg, creg)
        # PROBE (bench only, wrong results): "nofold" leaves out the folds, "nostore" the tile stores too
        if PROBE != "nostore":
            tl_store(0, cbuf, creg)
            tl_store(2, cbuf, creg)
        if SPLIT_FOLDS:
            fold_split(0, cbuf, facc, ws, e, r0a, r0b, g, first)
        if PROBE != "nostore":
            tl_store(1, cbuf, creg)
            tl_store(3, cbuf, creg)
        if SPLIT_FOLDS:
            fold_split(1, cbuf, facc, ws, e, r0a, r0b, g, first)

    @T.macro
    def group_amx(wbuf, nrows, kd, act, cb0, two, g, ws, e, r0a, r0b, facc, cbuf, treg, creg, first, pf, fo=0):
        """fo: where in facc the products of this column-block pair fold (int4 "step": pair p at p * 1024)."""
        tl_zero(0, creg)
        tl_zero(1, creg)
        if two:
            tl_zero(2, creg)
            tl_zero(3, creg)
        for ks in range(G // KT):
            if PF > 0 and not int4:
                if pf:
                    prefetch_rows(wbuf, nrows, kd, e, r0a, r0b, g * G + ks * KT + PF * KT)
            prefetch_act(act, cb0, kd, g, ks)
            if two:
                prefetch_act(act, cb0 + 1, kd, g, ks)
            tl_load(4, wbuf, woff(e, nrows, kd, r0a, r0b, 0, g * G + ks * KT), WST or kd, treg)
            tl_load(5, wbuf, woff(e, nrows, kd, r0a, r0b, RT, g * G + ks * KT), WST or kd, treg)
            tl_load(6, act, act_off(cb0, kd, g, ks), 64, treg)
            tl_dp(0, 4, 6, treg, creg)
            tl_dp(1, 5, 6, treg, creg)
            if two:
                tl_load(7, act, act_off(cb0 + 1, kd, g, ks), 64, treg)
                tl_dp(2, 4, 7, treg, creg)
                tl_dp(3, 5, 7, treg, creg)
        if SPLIT:
            tl_store(0, cbuf, creg)
            tl_store(1, cbuf, creg)
            tl_store(2, cbuf, creg)
            tl_store(3, cbuf, creg)
            fold_split(0, cbuf, facc, ws, e, r0a, r0b, g, first)
            fold_split(1, cbuf, facc, ws, e, r0a, r0b, g, first)
        elif PROBE != "nostore":
            tl_store(0, cbuf, creg)
            tl_store(1, cbuf, creg)
            if PROBE != "nofold":
                fold_tile(0, cbuf, facc, ws, e, r0a, r0b, g, first, fo)
                fold_tile(1, cbuf, facc, ws, e, r0a, r0b, g, first, fo)
            if two:
                tl_store(2, cbuf, creg)
                tl_store(3, cbuf, creg)
                if PROBE != "nofold":
                    fold_tile(2, cbuf, facc, ws, e, r0a, r0b, g, first, fo)
                    fold_tile(3, cbuf, facc, ws, e, r0a, r0b, g, first, fo)

    @T.macro
    def group_vnni(wbuf, nrows, kd, act, cb, cbi, g, ws, e, r0a, r0b, facc, first):
        acc = T.alloc_buffer((VNNI_RB * 16,), "int32", **ALLOC)
        for rb in T.unroll(ITEM_ROWS // VNNI_RB):
            for r in T.unroll(VNNI_RB):
                for v in T.vectorized(16):
                    acc[r * 16 + v] = 0
            for k4 in range(G // 4):
                av = T.Bind(_ramp(act, i64(cb) * (NCOL * kd) + i64((g * G) // 4 * 64 + k4 * 64), 64))
                for r in T.unroll(VNNI_RB):
                    acc[T.Ramp(r * 16, 1, 16)] = T.call_llvm_pure_intrin(
                        "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[T.Ramp(r * 16, 1, 16)], av,
                        T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", _ramp(
                            wbuf, woff(e, nrows, kd, r0a, r0b, rb * VNNI_RB + r, g * G + k4 * 4), 4)), 16)))
            for r in T.unroll(VNNI_RB):
                fold(acc, r * 16, facc, rb * VNNI_RB + r, cbi,
                     ws[i64(e), i64(wrow(r0a, r0b, rb * VNNI_RB + r)), i64(g)], first)

    @T.macro
    def one_group(wbuf, nrows, kd, act, cb0, two, g, ws, e, r0a, r0b, facc, cbuf, treg, creg, first, pf):
        if SPLIT:
            group_amx_split(wbuf, nrows, kd, act, cb0, g, ws, e, r0a, r0b, facc, cbuf, treg, creg, first, pf)
        elif amx:
            group_amx(wbuf, nrows, kd, act, cb0, two, g, ws, e, r0a, r0b, facc, cbuf, treg, creg, first, pf)
        else:
            group_vnni(wbuf, nrows, kd, act, cb0, 0, g, ws, e, r0a, r0b, facc, first)
            if two:
                group_vnni(wbuf, nrows, kd, act, cb0 + 1, 1, g, ws, e, r0a, r0b, facc, first)

    @T.macro
    def products(wbuf, nrows, kd, act, cb0, two, ws, e, r0a, r0b, facc, cbuf, treg, creg, pf):
        """facc = the item's rows x the column blocks cb0 (and cb0 + 1 if two); pf: prefetch the weights
        (the first pass over the item's rows; later passes find them in L2)."""
        one_group(wbuf, nrows, kd, act, cb0, two, 0, ws, e, r0a, r0b, facc, cbuf, treg, creg, True, pf)
        for g in range(1, kd // G):
            one_group(wbuf, nrows, kd, act, cb0, two, g, ws, e, r0a, r0b, facc, cbuf, treg, creg, False, pf)

    @T.macro
    def unpack_unit(wq, wsc, e, r0a, r0b, kd, u, pf, ne, na, nbr):
        """Unit u of the item's rows -> buffer u % 2."""
        for cc in range(UNIT // 128):
            unpack_chunk(wq, e, r0a, r0b, kd, u * (UNIT // 128) + cc, u % 2 * (ITEM_ROWS * UNIT) + cc * 128, wsc, pf,
                         ne, na, nbr)

    @T.macro
    def products_step(wq, wsc, nrows, kd, act, cb0, nbl, ws, e, r0a, r0b, facc, cbuf, treg, creg, pf, ne, na, nbr):
        """int4 "step": facc[p * 1024:] = the item's rows x column blocks cb0 + 2 p, cb0 + 2 p + 1 for the
        first NP pairs of the nbl blocks left; each UNIT values of K are unpacked once for all of them."""
        for pp in range(NP):
            if 2 * pp < nbl:        # only the pairs in use (zeroing all 4 was ~10% of what is left outside the tiles)
                for i in range(64):
                    for v in T.vectorized(16):
                        facc[pp * 1024 + i * 16 + v] = T.float32(0)
        for u in range(0 if PROBE == "noprod" else kd // UNIT):
            unpack_unit(wq, wsc, e, r0a, r0b, kd, u, pf, ne, na, nbr)
            for gi in range(UNIT // G):
                for pp in range(NP):
                    if 2 * pp < nbl:
                        group_amx(wsc, nrows, kd, act, cb0 + 2 * pp, 2 * pp + 1 < nbl, u * (UNIT // G) + gi, ws, e,
                                  r0a, r0b, facc, cbuf, treg, creg, False, False, pp * 1024)

    # ---- phases 2 and 4: one work item --------------------------------------------------
    # the epilogues read a column of facc (rows 32 floats apart) and write a row of hbuf / ybuf. "transpose":
    # 16 rows x 16 columns of facc loaded as 16 vectors and transposed in registers (TRANSPOSE_EPI); "vector":
    # each column's 16 rows gathered by 16 single-lane loads; "scalar": one value at a time (the path before
    # 2026-11-23); the last two kept to time against
    def transpose16(rows):
        """16 vectors of 16 lanes (the rows) -> their 16 columns: four stages of two-input shuffles, each
        exchanging one bit of the row index with the same bit of the lane index (a stage is one shuffle
        instruction a vector) instead of 16 single-lane loads and inserts a column."""
        vs = [T.Bind(v) for v in rows]
        for d in (8, 4, 2, 1):
            nxt = list(vs)
            for i in range(16):
                if i & d == 0:
                    j = i + d
                    nxt[i] = T.Bind(tirx.Shuffle([vs[i], vs[j]], [
                        tirx.const(ln if ln & d == 0 else 16 + ln - d, "int32") for ln in range(16)]))
                    nxt[j] = T.Bind(tirx.Shuffle([vs[i], vs[j]], [
                        tirx.const(ln + d if ln & d == 0 else 16 + ln, "int32") for ln in range(16)]))
            vs = nxt
        return vs

    def facc_cols(facc, fo, cbi, q0):
        """Columns 0-15 of column block cbi, rows q0 .. q0 + 15 of facc[fo:], as 16 vectors over the rows."""
        return transpose16([_ramp(facc, fo + ((q0 + q) * 2 + cbi) * 16, 16) for q in range(16)])

    def store_cols(cols, cbp, cbi, cnt, p0, b0, asc, value, out_buf, c0):
        """out_buf[pair, c0 : c0 + 16] = value(column jj's vector, the pair's scale, jj) for the valid pairs of
        column block cbi of pass cbp (IR builder calls: the columns are a Python list)."""
        for jj in range(PPB):
            col = (cbp * PAIR_BLOCKS + cbi) * PPB + jj
            sc = _bc(asc[(b0 + 2 * cbp + cbi) * NCOL + jj])
            with IB.If(col < cnt):
                with IB.Then():
                    IB.buffer_store(out_buf, value(cols[jj], sc, jj), [p0 + col, tirx.Ramp(c0, 1, 16)])

    def gu_out_t(cbp, cbi, fo, e, p0, cnt, b0, i0, gc, hbuf, asc, facc):
        # silu(gate) to hbuf first, then times up: the two transposed halves at once would hold 32 vectors
        # (spills: every zmm register is taken)
        gcv = T.Bind(tirx.BufferLoad(gc, [i64(e), tirx.Ramp(i64(i0), T.int64(1), 16)]))
        store_cols(facc_cols(facc, fo, cbi, 0), cbp, cbi, cnt, p0, b0, asc,
                   lambda g, sc, jj: silu((g - gcv) * sc), hbuf, i0)
        ucv = T.Bind(tirx.BufferLoad(gc, [i64(e), tirx.Ramp(i64(I + i0), T.int64(1), 16)]))
        first = (cbp * PAIR_BLOCKS + cbi) * PPB
        store_cols(facc_cols(facc, fo, cbi, RT), cbp, cbi, cnt, p0, b0, asc,
                   lambda u, sc, jj: tirx.BufferLoad(hbuf, [p0 + first + jj, tirx.Ramp(i0, 1, 16)]) * ((u - ucv) * sc),
                   hbuf, i0)

    def dn_out_t(cbp, cbi, fo, e, p0, cnt, b0, h0, dc, ybuf, asc, facc):
        for q2 in range(ITEM_ROWS // 16):
            cols = facc_cols(facc, fo, cbi, q2 * 16)
            dcv = T.Bind(tirx.BufferLoad(dc, [i64(e), tirx.Ramp(i64(h0 + q2 * 16), T.int64(1), 16)]))
            store_cols(cols, cbp, cbi, cnt, p0, b0, asc, lambda c, sc, jj, d=dcv: (c - d) * sc, ybuf, h0 + q2 * 16)

    @T.macro
    def gu_col(row, fo, cbi, jj, e, i0, gc, hbuf, colsc, facc):
        """Column jj of block cbi of facc[fo:] (a pair: hbuf row `row`, scale colsc) -> h = silu(gate) * up."""
        if VEC_EPI:
            for q in T.vectorized(RT):
                hbuf[row, i0 + q] = silu(
                    (facc[fo + (q * 2 + cbi) * 16 + jj] - gc[i64(e), i64(i0 + q)]) * colsc) * (
                    (facc[fo + ((q + RT) * 2 + cbi) * 16 + jj] - gc[i64(e), i64(I + i0 + q)]) * colsc)
        else:
            for q in range(RT):
                gv = T.Bind((facc[fo + (q * 2 + cbi) * 16 + jj] - gc[i64(e), i64(i0 + q)]) * colsc)
                uv = T.Bind((facc[fo + ((q + RT) * 2 + cbi) * 16 + jj] - gc[i64(e), i64(I + i0 + q)]) * colsc)
                hbuf[row, i0 + q] = silu(gv) * uv

    @T.macro
    def dn_col(row, fo, cbi, jj, e, h0, dc, ybuf, colsc, facc):
        """Column jj of block cbi of facc[fo:] (a pair: ybuf row `row`, scale colsc) -> ybuf."""
        if VEC_EPI:
            for q2 in range(ITEM_ROWS // 16):
                for q in T.vectorized(16):
                    ybuf[row, h0 + q2 * 16 + q] = (
                        facc[fo + ((q2 * 16 + q) * 2 + cbi) * 16 + jj] - dc[i64(e), i64(h0 + q2 * 16 + q)]) * colsc
        else:
            for q in range(ITEM_ROWS):
                ybuf[row, h0 + q] = (facc[fo + (q * 2 + cbi) * 16 + jj] - dc[i64(e), i64(h0 + q)]) * colsc

    def epilogue(out_t, out_col):
        """The macro out(cbp, fo, e, p0, cnt, b0, nb, r0, cv, out_buf, asc, facc): pass cbp's columns (column blocks
        b0 + 2 cbp, + 1) from facc[fo:] into out_buf, 16 columns a call of out_t (TRANSPOSE_EPI) or each valid column
        by out_col (gate/up: h = silu(gate) * up into hbuf; down: into ybuf; r0 its first row, cv the compensation)."""
        @T.macro
        def out(cbp, fo, e, p0, cnt, b0, nb, r0, cv, out_buf, asc, facc):
            for cbi in range(PAIR_BLOCKS):
                if TRANSPOSE_EPI:
                    if 2 * cbp + cbi < nb:
                        out_t(cbp, cbi, fo, e, p0, cnt, b0, r0, cv, out_buf, asc, facc)
                else:
                    for jj in range(PPB):
                        if 2 * cbp + cbi < nb and (cbp * PAIR_BLOCKS + cbi) * PPB + jj < cnt:
                            colsc = T.Bind(asc[(b0 + 2 * cbp + cbi) * NCOL + jj])
                            out_col(p0 + (cbp * PAIR_BLOCKS + cbi) * PPB + jj, fo, cbi, jj, e, r0, cv, out_buf, colsc,
                                    facc)
        return out

    gu_out = epilogue(gu_out_t, gu_col)
    dn_out = epilogue(dn_out_t, dn_col)

    def item_passes(out):
        """The passes of one work item over its segment's column blocks, each ending in `out` (gu_out or
        dn_out): rows r0a.. (tile a) and r0b.. (tile b) of the nrows x kd weights (wq packed int4 or int8,
        wqf its flat int8 view), row0 = the item's first output row."""
        @T.macro
        def passes(wq, wqf, ws, wc, nrows, kd, r0a, r0b, row0, e, p0, cnt, b0, nb, out_buf, act, asc, facc, cbuf,
                   treg, creg, wsc, ne, na, nbr):
            if STEP:
                for sp in range((nb + 2 * NP - 1) // (2 * NP)):
                    products_step(wq, wsc, nrows, kd, act, b0 + 2 * NP * sp, nb - 2 * NP * sp, ws, e, r0a, r0b, facc,
                                  cbuf, treg, creg, sp == 0, ne, na, nbr)
                    for pp in range(NP):
                        out(sp * NP + pp, pp * 1024, e, p0, cnt, b0, nb, row0, wc, out_buf, asc, facc)
            else:
                if int4 and PROBE != "noprod":
                    unpack_rows(wq, e, r0a, r0b, kd, wsc)
                for cbp in range((nb + 1) // 2):
                    if PROBE != "noprod":
                        if int4:
                            products(wsc, nrows, kd, act, b0 + 2 * cbp, 2 * cbp + 1 < nb, ws, e, r0a, r0b, facc, cbuf,
                                     treg, creg, cbp == 0)
                        else:
                            products(wqf, nrows, kd, act, b0 + 2 * cbp, 2 * cbp + 1 < nb, ws, e, r0a, r0b, facc, cbuf,
                                     treg, creg, cbp == 0)
                    out(cbp, 0, e, p0, cnt, b0, nb, row0, wc, out_buf, asc, facc)
        return passes

    gu_passes = item_passes(gu_out)
    dn_passes = item_passes(dn_out)

    @T.macro
    def gu_item(s, r, gq, gs, gc, gqf, hbuf, iw, act, asc, o_cum, facc, cbuf, treg, creg, wsc):
        e = T.Bind(iw[O_SEGEXP + s])
        p0 = T.Bind(iw[O_SEGSTART + s])
        cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
        b0 = T.Bind(iw[o_cum + s])
        nb = T.Bind(iw[o_cum + s + 1] - b0)
        i0 = T.Bind(r * RT)
        # the next item of the share (most often the next claimed): its expert and first rows
        sn = T.Bind(T.min(s + (r + 1) // NR1, iw[O_NSEG] - 1))
        ina = T.Bind((r + 1) % NR1 * RT)
        gu_passes(gq, gqf, gs, gc, 2 * I, H, i0, I + i0, i0, e, p0, cnt, b0, nb, hbuf, act, asc, facc, cbuf, treg,
                  creg, wsc, iw[O_SEGEXP + sn], ina, I + ina)

    @T.macro
    def dn_item(s, r, dq, ds, dc, dqf, ybuf, iw, act, asc, o_cum, facc, cbuf, treg, creg, wsc):
        e = T.Bind(iw[O_SEGEXP + s])
        p0 = T.Bind(iw[O_SEGSTART + s])
        cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
        b0 = T.Bind(iw[o_cum + s])
        nb = T.Bind(iw[o_cum + s + 1] - b0)
        h0 = T.Bind(r * ITEM_ROWS)
        sn = T.Bind(T.min(s + (r + 1) // NR2, iw[O_NSEG] - 1))
        hn = T.Bind((r + 1) % NR2 * ITEM_ROWS)
        dn_passes(dq, dqf, ds, dc, H, I, h0, h0 + RT, h0, e, p0, cnt, b0, nb, ybuf, act, asc, facc, cbuf, treg,
                  creg, wsc, iw[O_SEGEXP + sn], hn, hn + RT)

    def items_phase(item, nr, kd):
        """The parallel loop of phase 2 (item gu_item, nr = NR1, K = H) or 4 (dn_item, NR2, I).

        Items are claimed one at a time, from this task's share and then (schedule "steal") from the
        others' (codegen/tir_schedule)."""
        @T.macro
        def phase(wq, ws, wc, wqf, out, iw, act, asc, o_cum, ntask, o_sched):
            for tsk in T.parallel(ntask):
                cfg = T.alloc_buffer((64,), "uint8", **ALLOC)
                treg = T.alloc_buffer((4096 if emu else 1,), "uint8", **ALLOC)
                creg = T.alloc_buffer((1024 if emu else 1,), "int32", **ALLOC)
                cbuf = T.alloc_buffer((1024,), "int32", **ALLOC)
                facc = T.alloc_buffer(((NP if STEP else 1) * ITEM_ROWS * 2 * 16,), "float32", **ALLOC)
                wsc = T.alloc_buffer((2 * ITEM_ROWS * UNIT if STEP else ITEM_ROWS * kd if int4 else 1,), "int8",
                                     **ALLOC)
                cur = T.alloc_buffer((1,), "int32", **ALLOC)
                if amx:
                    tl_config(cfg)
                for vo in range(ntask if STEAL else 1):
                    v = T.Bind((tsk + vo) % ntask)
                    cur[0] = tir_schedule.claim(iw, o_sched, v)
                    while cur[0] < tir_schedule.share_end(iw, o_sched, v):
                        item(cur[0] // nr, cur[0] % nr, wq, ws, wc, wqf, out, iw, act, asc, o_cum, facc, cbuf,
                             treg, creg, wsc)
                        cur[0] = tir_schedule.claim(iw, o_sched, v)
                if amx:
                    tl_release()
        return phase

    def seg_blocks(cnt):
        """Column blocks of a segment of cnt pairs."""
        if SPLIT:
            return 2 * ((cnt + NCOL - 1) // NCOL)
        return (cnt * L + NCOL - 1) // NCOL

    task_starts = tir_schedule.make_task_starts(O_NSEG, 0)
    gu_phase = items_phase(gu_item, NR1, H)
    dn_phase = items_phase(dn_item, NR2, I)

    @T.macro
    def prefill_body(x, gq, gs, gc, dq, ds, dc, hbuf, ybuf, iw, act, asc, nthr, o_cum, o_bseg, gqf, dqf, o_sched):
        """o_sched: cpu_experts.SCHED_SLOTS free int32 of iw for the gate/up and down schedules."""
        # block bookkeeping: cum[s] = first column block of segment s, bseg[b] = its segment
        iw[o_cum] = 0
        for s in range(iw[O_NSEG]):
            for b in range(seg_blocks(iw[O_SEGSTART + s + 1] - iw[O_SEGSTART + s])):
                iw[o_bseg + iw[o_cum + s] + b] = s
            iw[o_cum + s + 1] = iw[o_cum + s] + seg_blocks(iw[O_SEGSTART + s + 1] - iw[O_SEGSTART + s])
        ntask = T.Bind(tir_schedule.ntasks(nthr))
        # views of ybuf and hbuf for the "row" quantization (ybuf is free until phase 4, hbuf until phase 2):
        # the quantized rows' bytes, x's scales, h's scales (after h's bytes)
        ybq = T.decl_buffer((ybuf.shape[0] * H * 4,), "uint8", data=ybuf.data)
        hbf = T.decl_buffer((hbuf.shape[0] * I,), "float32", data=hbuf.data)
        ybs = T.decl_buffer((ybuf.shape[0],), "float32", data=ybuf.data, elem_offset=ybuf.shape[0] * (I * L // 4))
        # 1. quantize x (once a token, or once a pair) into column blocks
        if STOP >= 1:
            fill_blocks(x, H, True, x.shape[0], ROWQ_X, hbf, iw, act, asc, ybq, o_cum, o_bseg)
        # 2. gate/up, items (segment, 16 intermediate rows)
        if STOP >= 2:
            task_starts(iw, o_cum, NR1, ntask, o_sched)
            gu_phase(gq, gs, gc, gqf, hbuf, iw, act, asc, o_cum, ntask, o_sched)
        # 3. quantize h
        if STOP >= 3:
            fill_blocks(hbuf, I, False, iw[O_SEGSTART + iw[O_NSEG]], ROWQ_H, ybs, iw, act, asc, ybq, o_cum, o_bseg)
        # 4. down, items (segment, 32 hidden rows)
        if STOP >= 4:
            task_starts(iw, o_cum, NR2, ntask, o_sched)
            dn_phase(dq, ds, dc, dqf, ybuf, iw, act, asc, o_cum, ntask, o_sched)

    return prefill_body
