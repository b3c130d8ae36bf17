"""AMX-BF16 prefill path of the quantized `moe_experts` kernels (TIR, TVMScript).

The alternative to tir_intdot's integer tiles for x86-amx (KernelConfig.prefill = "bf16"):
weights are dequantized to bf16 (group scale applied) once per work item, activations are
converted to bf16, and tdpbf16ps accumulates float32 over the whole K. Why: with group-wise
scales along K the int8 path must fold its int32 tile products into float32 after every
group (tilestored + AVX512 reload), and int8 weights need two activation levels to stay
under 1e-2, which halves the columns each tile product serves. bf16 tiles need neither: no
fold, 16 pairs per column block, and bf16 activations add ~1e-3 error at most. The price is
the dequantization (~8 AVX512 instructions per 32 weights), paid once per item and shared
by all the item's column blocks (the tokens routed to that expert).

Imported only by the build subprocess, through codegen/tir_experts.py, which calls
`make_prefill_body` when the config asks for it; same macro signature as tir_intdot's.

Phases (each a parallel loop, like tir_intdot):
1. convert + gather the input rows of each segment into column blocks `act` (viewed as
   uint16 / uint32): a block is 16 columns x Kd bf16 in pair order (k / 2, column, k % 2),
   the layout of an AMX B tile for tdpbf16ps (a block's unused columns hold stale values:
   a product column depends only on its own activation column, and those are not read).
2. gate/up, items (segment, 16 intermediate rows): dequantize the item's 16 gate + 16 up
   rows to bf16 (`wsc`, 32 x H x 2 bytes, stays in L2), then for each pair of column blocks
   C[4 tiles] = W . act over all of K; h = silu(gate) * up into hbuf.
3. convert + gather h like 1.
4. down, items (segment, 32 hidden rows), the same into ybuf.

Work is split over `nthr` tasks by cost: an item costs its segment's column blocks plus
DEQUANT_COST (the dequantization, in units of one column block's tile work over the item),
and task t starts on the items whose cost prefix starts in its share, then steals what the others
have not reached (codegen/tir_schedule).

"amx-emu" replaces every tile instruction by plain TIR loops of the same semantics (and the
bf16 conversion by integer round-to-nearest-even), how this path is tested without AMX.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ktc.codegen import tir_schedule
from ktc.codegen.tir_amx import emu_config, emu_release, tile_ops

NCOL = 16           # columns (pairs) per activation block
RT = 16             # rows per weight tile
ITEM_ROWS = 32      # weight rows per work item (2 tiles)
KT = 32             # bf16 values of K per tile row (64 bytes)
DEQUANT_COST = 4    # an item's dequantization, in column blocks (32 x K weights ~ 4 x K/16 tdpbf16ps)
ALLOC = {"scope": "global", "annotations": {"disable_lower_builtin": True}}


def make_prefill_body(*, H, I, E, K, G, fmt, variant, O_SEGEXP, O_SEGSTART, O_NSEG, O_SORTED, silu,  # noqa: E741
                      levels=1, schedule="steal"):
    """The macro `prefill_body(x, gq, gs, gc, dq, ds, dc, hbuf, ybuf, iw, act, asc, nthr, o_cum,
    o_bseg, gqf, dqf, o_sched)` running phases 1-4 (iw already holds the sorted segments; gqf / dqf are
    flat int8 views of the weights, or None for int4; gc, dc and asc are not used here).
    levels=2: activations as two bf16 terms (x = hi + lo, ~16 bits; columns 0-7 of a block
    hi, 8-15 lo of the same pairs), summed in the epilogue: the activations then add no error
    that matters, for twice the tile products. schedule: "static" or "steal" (KernelConfig.item_schedule)."""
    L = levels
    STEAL = schedule == "steal"
    PPB = NCOL // L           # pairs per column block
    assert L in (1, 2)
    NR1 = I // RT             # gate/up items per segment
    NR2 = H // ITEM_ROWS      # down items per segment
    assert H % KT == 0 and I % KT == 0 and G % 32 == 0 and I % RT == 0 and H % ITEM_ROWS == 0
    int4 = fmt == "int4"
    emu = variant == "amx-emu"
    assert variant in ("amx", "amx-emu")

    def i64(v):
        return T.Cast("int64", v)

    def wrow(r0a, r0b, q):
        return T.if_then_else(q < RT, r0a + q, r0b + q - RT)

    def bf(u16):
        """bf16 bits -> float32."""
        return T.reinterpret("float32", T.shift_left(T.Cast("uint32", u16), T.uint32(16)))

    def col(buf, c, q, jj):
        """Product tile c, row q, pair jj of its column block (both levels summed)."""
        if L == 2:
            return buf[c * 256 + q * 16 + jj] + buf[c * 256 + q * 16 + jj + PPB]
        return buf[c * 256 + q * 16 + jj]

    # ---- float32 x32 -> bf16 bits x32 ---------------------------------------------------------
    if emu:
        def bf16_bits(v16):
            u = T.reinterpret("uint32x16", v16)
            r = T.shift_right(u + T.Broadcast(T.uint32(0x7FFF), 16) + T.bitwise_and(
                T.shift_right(u, T.Broadcast(T.uint32(16), 16)), T.Broadcast(T.uint32(1), 16)),
                T.Broadcast(T.uint32(16), 16))
            return T.Cast("uint16x16", r)

        @T.macro
        def store_bf16_32(dst, off, tmp):
            dst[T.Ramp(off, 1, 16)] = bf16_bits(tmp[T.Ramp(0, 1, 16)])
            dst[T.Ramp(off + 16, 1, 16)] = bf16_bits(tmp[T.Ramp(16, 1, 16)])
    else:
        @T.macro
        def store_bf16_32(dst, off, tmp):
            dst[T.Ramp(off, 1, 32)] = T.reinterpret("uint16x32", T.call_llvm_pure_intrin(
                "int16x32", "llvm.x86.avx512bf16.cvtne2ps2bf16.512", tmp[T.Ramp(16, 1, 16)],
                tmp[T.Ramp(0, 1, 16)]))

    # ---- phases 1 / 3: convert + gather rows into column blocks ------------------------------
    @T.macro
    def convert_row(src, kd, b, jj, row, act32):
        """src[row, 0:kd] -> column jj of block b (bf16 pairs, one uint32 each; with 2 levels
        the residual in column jj + PPB)."""
        tmp = T.alloc_buffer((32,), "float32", **ALLOC)
        bits = T.alloc_buffer((32 * L,), "uint16", **ALLOC)
        base = T.Bind(i64(b) * (NCOL * kd // 2))
        for k32 in range(kd // 32):
            for v in T.vectorized(32):
                tmp[v] = src[row, k32 * 32 + v]
            store_bf16_32(bits, 0, tmp)
            if L == 2:
                for v in T.vectorized(32):
                    tmp[v] = tmp[v] - bf(bits[v])
                store_bf16_32(bits, 32, tmp)
            for lv in range(L):
                for p in range(16):
                    act32[base + i64((k32 * 16 + p) * NCOL + jj + lv * PPB)] = T.bitwise_or(
                        T.Cast("uint32", bits[lv * 32 + 2 * p]),
                        T.shift_left(T.Cast("uint32", bits[lv * 32 + 2 * p + 1]), T.uint32(16)))

    @T.macro
    def convert_phase(src, kd, from_x, iw, act32, o_cum, o_bseg):
        nb_tot = T.Bind(iw[o_cum + iw[O_NSEG]])
        for b in T.parallel(nb_tot):
            s = T.Bind(iw[o_bseg + b])
            lb = T.Bind(b - iw[o_cum + s])
            p0 = T.Bind(iw[O_SEGSTART + s])
            cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
            for jj in range(PPB):
                if lb * PPB + jj < cnt:
                    if from_x:
                        convert_row(src, kd, b, jj, iw[O_SORTED + p0 + lb * PPB + jj] // K, act32)
                    else:
                        convert_row(src, kd, b, jj, p0 + lb * PPB + jj, act32)

    # ---- dequantize an item's 32 weight rows to bf16 -----------------------------------------
    @T.macro
    def dequant_rows(wq, wqf, ws, e, nrows, r0a, r0b, kd, wsc):
        tmp = T.alloc_buffer((32,), "float32", **ALLOC)
        for q in range(ITEM_ROWS):
            row = T.Bind(wrow(r0a, r0b, q))
            for g in range(kd // G):
                sc = T.Bind(ws[i64(e), i64(row), i64(g)])
                for k32 in range(G // 32):
                    if int4:
                        for v in T.vectorized(16):
                            tmp[v] = T.Cast("float32", T.Cast("int32", T.bitwise_xor(T.bitwise_and(
                                wq[i64(e), i64(row), i64((g * G + k32 * 32) // 2 + v)], T.uint8(15)), T.uint8(8)))
                                - 8) * sc
                        for v in T.vectorized(16):
                            tmp[16 + v] = T.Cast("float32", T.Cast("int32", T.bitwise_xor(T.shift_right(
                                wq[i64(e), i64(row), i64((g * G + k32 * 32) // 2 + v)], T.uint8(4)), T.uint8(8)))
                                - 8) * sc
                    else:
                        for v in T.vectorized(32):
                            tmp[v] = T.Cast("float32", wqf[(i64(e) * nrows + i64(row)) * kd
                                                           + i64(g * G + k32 * 32 + v)]) * sc
                    store_bf16_32(wsc, q * kd + g * G + k32 * 32, tmp)

    # ---- tile operations: real AMX, or emulated with plain loops -----------------------------
    if not emu:
        tl_config, tl_release, tl_zero, tl_load, tl_dp, tl_store = tile_ops(
            "llvm.x86.tdpbf16ps", [(16, 64)] * 8)     # every tile: 16 rows x 64 bytes
    else:
        tl_config, tl_release = emu_config, emu_release

        @T.macro
        def tl_zero(c, creg):
            for i in range(256):
                creg[c * 256 + i] = T.float32(0)

        @T.macro
        def tl_load(t, buf, off, stride, treg):
            for m in range(16):
                for cc in range(32):
                    treg[(t - 4) * 512 + m * 32 + cc] = buf[off + i64(m * (stride // 2) + cc)]

        @T.macro
        def tl_dp(c, a, bt, treg, creg):
            for m in range(16):
                for nn in range(16):
                    for kp in range(16):
                        for i in range(2):
                            creg[c * 256 + m * 16 + nn] = creg[c * 256 + m * 16 + nn] + bf(
                                treg[(a - 4) * 512 + m * 32 + kp * 2 + i]) * bf(
                                treg[(bt - 4) * 512 + kp * 32 + nn * 2 + i])

        @T.macro
        def tl_store(c, cbuf, creg):
            for i in range(256):
                cbuf[c * 256 + i] = creg[c * 256 + i]

    # ---- C[4 tiles] = W(32 rows of wsc) . act(column blocks cb0, cb0 + 1) over all of K -------
    @T.macro
    def products(wsc, kd, act16, cb0, two, cbuf, treg, creg):
        tl_zero(0, creg)
        tl_zero(1, creg)
        if two:
            tl_zero(2, creg)
            tl_zero(3, creg)
        for ks in range(kd // KT):
            tl_load(4, wsc, ks * KT, kd * 2, treg)
            tl_load(5, wsc, RT * kd + ks * KT, kd * 2, treg)
            tl_load(6, act16, i64(cb0) * (NCOL * kd) + i64(ks * KT * NCOL), 64, treg)
            tl_dp(0, 4, 6, treg, creg)
            tl_dp(1, 5, 6, treg, creg)
            if two:
                tl_load(7, act16, i64(cb0 + 1) * (NCOL * kd) + i64(ks * KT * NCOL), 64, treg)
                tl_dp(2, 4, 7, treg, creg)
                tl_dp(3, 5, 7, treg, creg)
        tl_store(0, cbuf, creg)
        tl_store(1, cbuf, creg)
        if two:
            tl_store(2, cbuf, creg)
            tl_store(3, cbuf, creg)

    # ---- phases 2 and 4: one work item ------------------------------------------------------
    # cbuf[(cbi * 2 + wt) * 256 + q * 16 + jj]: column block cbi of the pair, weight tile wt
    # (rows 0-15 / 16-31 of the item), tile row q, column jj
    @T.macro
    def gu_item(s, r, gq, gs, gqf, hbuf, iw, act16, o_cum, cbuf, treg, creg, wsc):
        e = T.Bind(iw[O_SEGEXP + s])
        p0 = T.Bind(iw[O_SEGSTART + s])
        cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
        b0 = T.Bind(iw[o_cum + s])
        nb = T.Bind(iw[o_cum + s + 1] - b0)
        i0 = T.Bind(r * RT)
        dequant_rows(gq, gqf, gs, e, 2 * I, i0, I + i0, H, wsc)
        for cbp in range((nb + 1) // 2):
            products(wsc, H, act16, b0 + 2 * cbp, 2 * cbp + 1 < nb, cbuf, treg, creg)
            for cbi in range(2):
                for jj in range(PPB):
                    if 2 * cbp + cbi < nb and (2 * cbp + cbi) * PPB + jj < cnt:
                        for q in range(RT):
                            hbuf[p0 + (2 * cbp + cbi) * PPB + jj, i0 + q] = silu(
                                col(cbuf, cbi * 2, q, jj)) * col(cbuf, cbi * 2 + 1, q, jj)

    @T.macro
    def dn_item(s, r, dq, ds, dqf, ybuf, iw, act16, o_cum, cbuf, treg, creg, wsc):
        e = T.Bind(iw[O_SEGEXP + s])
        p0 = T.Bind(iw[O_SEGSTART + s])
        cnt = T.Bind(iw[O_SEGSTART + s + 1] - p0)
        b0 = T.Bind(iw[o_cum + s])
        nb = T.Bind(iw[o_cum + s + 1] - b0)
        h0 = T.Bind(r * ITEM_ROWS)
        dequant_rows(dq, dqf, ds, e, H, h0, h0 + RT, I, wsc)
        for cbp in range((nb + 1) // 2):
            products(wsc, I, act16, b0 + 2 * cbp, 2 * cbp + 1 < nb, cbuf, treg, creg)
            for cbi in range(2):
                for jj in range(PPB):
                    if 2 * cbp + cbi < nb and (2 * cbp + cbi) * PPB + jj < cnt:
                        for wt in range(2):
                            for q in range(RT):
                                ybuf[p0 + (2 * cbp + cbi) * PPB + jj, h0 + wt * RT + q] = col(
                                    cbuf, cbi * 2 + wt, q, jj)

    def items_phase(item, nr, kd):
        """The parallel loop of phase 2 (item gu_item, nr = NR1, K = H) or 4 (dn_item, NR2, I): each
        task claims the items of its share (an item costs its column blocks + DEQUANT_COST), then
        those left in the others' (codegen/tir_schedule)."""
        @T.macro
        def phase(wq, ws, wqf, out, iw, act16, o_cum, ntask, o_sched):
            for tsk in T.parallel(ntask):
                cfg = T.alloc_buffer((64,), "uint8", **ALLOC)
                treg = T.alloc_buffer((2048 if emu else 1,), "uint16", **ALLOC)
                creg = T.alloc_buffer((1024 if emu else 1,), "float32", **ALLOC)
                cbuf = T.alloc_buffer((1024,), "float32", **ALLOC)
                wsc = T.alloc_buffer((ITEM_ROWS * kd,), "uint16", **ALLOC)
                cur = T.alloc_buffer((1,), "int32", **ALLOC)
                tl_config(cfg)
                for vo in range(ntask if STEAL else 1):
                    v = T.Bind((tsk + vo) % ntask)
                    cur[0] = tir_schedule.claim(iw, o_sched, v)
                    while cur[0] < tir_schedule.share_end(iw, o_sched, v):
                        item(cur[0] // nr, cur[0] % nr, wq, ws, wqf, out, iw, act16, o_cum, cbuf, treg, creg, wsc)
                        cur[0] = tir_schedule.claim(iw, o_sched, v)
                tl_release()
        return phase

    task_starts = tir_schedule.make_task_starts(O_NSEG, DEQUANT_COST)
    gu_phase = items_phase(gu_item, NR1, H)
    dn_phase = items_phase(dn_item, NR2, I)

    @T.macro
    def prefill_body(x, gq, gs, gc, dq, ds, dc, hbuf, ybuf, iw, act, asc, nthr, o_cum, o_bseg, gqf, dqf, o_sched):
        act16 = T.decl_buffer((act.shape[0] // 2,), "uint16", data=act.data)
        act32 = T.decl_buffer((act.shape[0] // 4,), "uint32", data=act.data)
        # block bookkeeping: cum[s] = first column block of segment s, bseg[b] = its segment
        iw[o_cum] = 0
        for s in range(iw[O_NSEG]):
            for b in range(((iw[O_SEGSTART + s + 1] - iw[O_SEGSTART + s]) * L + NCOL - 1) // NCOL):
                iw[o_bseg + iw[o_cum + s] + b] = s
            iw[o_cum + s + 1] = iw[o_cum + s] + ((iw[O_SEGSTART + s + 1] - iw[O_SEGSTART + s]) * L + NCOL - 1) // NCOL
        # 1. x rows -> bf16 column blocks
        convert_phase(x, H, True, iw, act32, o_cum, o_bseg)
        ntask = T.Bind(tir_schedule.ntasks(nthr))
        # 2. gate/up, items (segment, 16 intermediate rows)
        task_starts(iw, o_cum, NR1, ntask, o_sched)
        gu_phase(gq, gs, gqf, hbuf, iw, act16, o_cum, ntask, o_sched)
        # 3. h rows -> bf16 column blocks
        convert_phase(hbuf, I, False, iw, act32, o_cum, o_bseg)
        # 4. down, items (segment, 32 hidden rows)
        task_starts(iw, o_cum, NR2, ntask, o_sched)
        dn_phase(dq, ds, dqf, ybuf, iw, act16, o_cum, ntask, o_sched)

    return prefill_body
