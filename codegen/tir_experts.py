"""TIR for the routed experts of one MoE layer (`moe_experts`), written in TVMScript.

Imported only by the build subprocess (codegen/cpu_build.py imports `tvm`); the spec, weight
packing and build driver live in ktc.codegen.cpu_experts, which never imports tvm itself.

One PrimFunc per ExpertKernelSpec computes, for a symbolic number of tokens n,

    y[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),   e = ids[t,k]

in four steps inside the one function (ABI v2; argument order in cpu_experts):

1. serial: a counting sort of the n*K (token, k) pairs by expert into the int32 workspace:
   the active experts ("segments"), each with the contiguous list of its pairs. Pairs whose
   id is outside [0, E) are skipped: they contribute nothing (a caller may mark experts it
   runs elsewhere, e.g. on the GPU, with -1).
2. parallel over (segment x tile of `tile_rows` intermediate rows):
   h[pair, i] = silu(gate_i . x[t]) * (up_i . x[t]) for every pair of the segment.
3. parallel over (segment x tile of `tile_rows` hidden rows): yp[pair, j] = down_j . h[pair].
4. parallel over (token x chunk of hidden): y[t] = sum_k w[t,k] * yp[pair(t,k)]. Every element
   of y is written, so y may come uninitialised.
Steps 2 and 3 hand their items to the threads as equal shares that a thread, done with its own,
steals from (codegen/tir_schedule; KernelConfig.item_schedule), so one slow thread does not hold
the others at the step's end.

Work items are segment-major, so each thread streams contiguous weight rows of one expert.
Within a work item the tokens of the segment go in blocks: a weight tile is read (from
memory) once for all its tokens, which is what makes prefill cheaper than T decodes.

One token (n == 1, KernelConfig.decode "fused", the default) takes its own path, because a
decode call reads only ~K experts and the steps above cost a fixed amount on top of that
(measured on a 16-core Xeon: 0.12 ms of a ~0.35 ms call with every id -1, growing with the
thread count): the E-bucket sort, and a fork/join of the thread pool per parallel phase.
  - serial, K steps: the valid pairs j (ids in [0, E), in k order) are listed in the int32
    workspace; none: y = 0 and no thread is woken.
  - one launch of the pool, `nthr` tasks (the last argument), two loops with a barrier
    between them (TVM's parallel_launch_point / parallel_barrier_when_finish: the tasks
    wait for each other in place instead of a join by the caller and a second launch):
    A. gate/up: the nv * I / decode_rows units (decode_rows row pairs of one pair j) are cut
       into nthr contiguous spans, so every task gets work however few experts are active
       and streams consecutive rows of at most a few experts; h[j] into hbuf.
    B. down: the H / (2 decode_rows) units of hidden rows are cut into nthr spans; each task
       quantizes all nv rows of h itself (nv * I values: cheaper than a phase of its own),
       then for every pair j adds w_j * (down_e rows . h[j]) into its rows of y. No yp, no
       weighted-sum phase; y is written whole (zeros where no pair contributes).
  The micro-kernels are those of single tokens below (vpdpbusd where DV_GU / DV_DN allow,
  FMA otherwise, also on the "fma" variant), so results match the phased path's up to the
  order of float additions (except for a token routed twice to one expert: the phased path
  runs those two pairs as a token block on the FMA micro-kernels). decode "regions" runs A
  and B as two parallel regions, "phased" sends n == 1 down the four steps above; both exist
  to measure the fused path against.

Micro-kernels ("fma" variant, what AVX2 and AVX512 do well): weight rows are read in steps of
32 elements along K, dequantized in registers to float32 (int8: sign-extend + convert; int4:
nibble extract + sign fix; bf16/f16: widen), and FMA'd into float32 vector accumulators that
stay in registers (local buffers < 1 KiB of scope "global" become LLVM allocas that SROA
promotes; larger ones, or scope "local", become heap workspace here). Two shapes:
  - token blocks (`block_tokens`, and 2 / half-size blocks for the tail of a segment, with
    clamped token indices): the group scale is folded into the dequantized weight vector,
    one multiply amortised over the block; accumulators rows x tokens;
  - single tokens (decode, and a lone tail token): per-group partial sums, scaled once per
    group, `decode_rows` rows at a time.
The accumulators are reduced across lanes with a shuffle tree (transpose-and-add: VL vectors
of VL lanes -> one vector of VL sums in log2(VL) steps) rather than lane by lane.
Variants "vnni", "amx" (and "amx-emu", the AMX code with its tile instructions emulated by
loops, for testing on hosts without AMX) add, for int8/int4, an integer-dot-product prefill
path (codegen/tir_intdot.py) taken when a call carries at least PREFILL_PAIRS_PER_EXPERT
(token, expert) pairs per expert on average: activations quantized on the fly, VNNI
vpdpbusd or AMX tdpbsud. Decode (fewer pairs) on these variants: single tokens (decode, and
the lone tail token of a segment) run gate/up and down on vpdpbusd micro-kernels
(mk_single_vnni: x quantized once per token, h once per pair in a short parallel phase, int8
in two u8 levels, int4 in one) where the shapes allow (int8: K a multiple of 64; int4: of 128,
group >= 64); token blocks of 2-8 stay on the FMA micro-kernels (float32 activations).
On "amx" / "amx-emu", `prefill = "bf16"` takes the AMX-BF16 prefill path instead
(codegen/tir_amx_bf16.py: weights dequantized to bf16 per work item, tdpbf16ps, no
activation quantization and no per-group fold).

Int4 layout (see cpu_experts.pack_expert_weights): along K, blocks of 32 values are 16 bytes;
byte j of a block holds value j (low nibble) and value j + 16 (high nibble), two's complement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from ktc.codegen import tir_amx_bf16, tir_intdot, tir_schedule
from ktc.codegen.cpu_experts import PREFILL_PAIRS_PER_EXPERT, SCHED_SLOTS, scratch_parts_of_paths


def bf16_levels(prefill: str, fmt: str) -> int:
    """bf16 terms per activation value of a bf16 prefill path (see KernelConfig.prefill)."""
    return {"bf16x1": 1, "bf16x2": 2}.get(prefill, 2 if fmt == "int8" else 1)


KS = 32  # elements of K per inner step (one int4 block); H and I must be multiples

QUANTIZED = ("int8", "int4")
DECODE_PATHS = ("fused", "regions", "phased")   # KernelConfig.decode
PREFILL_PATHS = ("int", "bf16", "bf16x1", "bf16x2", "fma")  # KernelConfig.prefill
PROBES = ("", "nofold", "nostore", "nounpack", "noprod", "noact", "noblocks",
          "upto0", "upto1", "upto2", "upto3", "upto4")  # KernelConfig.probe (bench only)


@dataclass(frozen=True)
class KernelConfig:
    """How a target's micro-kernels are shaped."""

    variant: str = "fma"     # "fma" | "vnni" | "amx" | "amx-emu" (see the module docstring)
    vl: int = 8              # float32 lanes per vector register (8: AVX2, 16: AVX512)
    tile_rows: int = 4       # rows per parallel work item (gate/up: row pairs)
    block_rows: int = 1      # gate/up row pairs per token-block micro-kernel (down: twice that)
    block_tokens: int = 4    # tokens per block
    decode_rows: int = 2     # gate/up row pairs per single-token micro-kernel (down: twice)
    # T == 1 (see the module docstring): "fused" gate/up and down in one launch of the thread
    # pool with a barrier between them; "regions" the same as two parallel regions; "phased"
    # the path of every other T (sort, gate/up, h quantization, down, weighted sum): what the
    # benchmark compares the others with
    decode: str = "fused"
    # row groups ahead whose weight rows the VNNI single-token micro-kernel prefetches (prefetcht0,
    # same column: one 64-byte line a row per line it loads); 0: none, the hardware prefetchers only
    decode_prefetch: int = 0
    # int8/int4 prefill on the vnni / amx variants: "int" integer dot products on quantized
    # activations (tir_intdot), "bf16" AMX-BF16 tiles on dequantized weights (amx only) with
    # activations as precise as the format needs (int8: two bf16 terms, keeping it within 1e-2 at
    # group 32; int4: one), "bf16x1" / "bf16x2" one / two terms whatever the format, "fma" none:
    # every batch on the token-block micro-kernels (the decode / prefill crossover moved to never)
    prefill: str = "int"
    # "int" prefill on amx: K steps (64 bytes) ahead whose weight lines the tile loop prefetches
    # (prefetcht0, each of the work item's 32 rows) on its first pass over an item (int4 "step": 128-value
    # units ahead whose packed rows the unpack prefetches); 0: none
    prefill_prefetch: int = 0
    # int4 "int" prefill on amx: each unit of a work item's first pass also prefetches its share of the next
    # item's packed rows (the share's next item: contiguous rows, into L2; tir_intdot)
    prefill_prefetch_next: bool = False
    # where that prefetch puts the weight lines: llvm.prefetch locality 3 (prefetcht0: L1), 2 (prefetcht1: L2)
    # or 1 (prefetcht2). Same-process medians on the H100 host's Xeon, prefill-512: int8 faster with
    # prefetcht0 than prefetcht2 in 7 of 8, int4 in 5 of 10 (no difference), so prefetcht0 for both
    prefill_prefetch_hint: int = 3
    # "int" prefill on amx: K steps ahead whose activation tile lines the tile loop prefetches into L1 (a
    # segment's column blocks outgrow L1 and every work item of the segment reads them again); 0: none
    prefill_act_prefetch: int = 0
    # work items of the gate/up and down phases of a batch (the int8/int4 prefill paths, and the token
    # blocks of every other T > 1) over the threads: "static" each thread runs its share, "steal" and
    # then claims what is left of the others' shares (codegen/tir_schedule)
    item_schedule: str = "steal"
    # int8 "int" prefill on amx: where the two activation levels of a pair go. "split": level 1 and
    # level 2 in two column blocks of 16 pairs each, so a group's products fold 16 pairs per vector
    # (tir_intdot); "shared": both in one block of 8 pairs (columns 0-7, 8-15), folded 8 at a time
    # (the layout before 2026-11-23, kept to time against)
    act_levels: str = "split"
    # int4 "int" prefill on amx: when a work item's int4 rows are unpacked to int8 for the weight tiles.
    # "step": each 128 values of K (or group, if larger) just before their tile products for up to 4
    # column-block pairs, into one of two small buffers (the unpack, vector work, runs beside the
    # previous unit's tile products); "item": the item's whole rows first (the path before 2026-11-23)
    int4_unpack: str = "step"
    # "int" prefill: the gate/up and down epilogues (facc -> silu(gate) * up, -> ybuf) on 16-lane vectors
    # over a column's rows gathered by single-lane loads ("vector"), the same with the columns transposed in
    # registers 16 x 16 at a time ("transpose": faster on the 2-core AMD development host, 4-14% slower on the
    # H100 host's Xeon, kept to time against), or one value at a time ("scalar", the path before 2026-11-23)
    prefill_epilogue: str = "vector"
    # "int" prefill: how phases 1 and 3 fill the activation blocks. "row": each row of x (a token) and of h
    # quantized once, then copied into the blocks of its pairs by 16 x 16 word transposes; "pair": each pair
    # quantizes its row into its block (x K times a token; the path before, kept to time against)
    act_quant: str = "row"
    # bench only, results wrong: "nofold" / "nostore" build the split int8 AMX path without its
    # folds / without its folds and tile stores (and the int4 "step" path the same), "nounpack" the int4
    # "step" path without its unpack, "noprod" (amx) without its unpack, tile products and folds (what is left:
    # the quantization, sort, epilogue and weighted-sum phases), "noact" (amx) with every activation tile loaded
    # from one L1-resident place instead of the blocks (L2), "noblocks" (amx, "row" act_quant) without copying the
    # quantized rows into the column blocks (the tiles read the blocks the previous call left), to time what
    # those steps cost; "uptoN" (the "int" prefill path) stops after phase N (0: the sort; 1: x's blocks; 2:
    # gate/up; 3: h's blocks; 4: down, without the weighted sum), to time each phase by difference
    # (bench/cpu_moe.py)
    probe: str = ""

    def __post_init__(self) -> None:
        if self.variant not in ("fma", "vnni", "amx", "amx-emu"):
            raise ValueError(f"unknown kernel variant {self.variant!r}")
        if self.prefill not in PREFILL_PATHS:
            raise ValueError(f"unknown prefill path {self.prefill!r}; expected one of {PREFILL_PATHS}")
        if self.prefill.startswith("bf16") and self.variant not in ("amx", "amx-emu"):
            raise ValueError("the bf16 prefill paths need the amx (or amx-emu) variant")
        if self.prefill_prefetch_hint not in (1, 2, 3):
            raise ValueError(f"prefill_prefetch_hint must be 1, 2 or 3, got {self.prefill_prefetch_hint}")
        if self.decode_prefetch < 0 or self.prefill_prefetch < 0 or self.prefill_act_prefetch < 0:
            raise ValueError("decode_prefetch, prefill_prefetch and prefill_act_prefetch must be >= 0")
        if self.item_schedule not in ("static", "steal"):
            raise ValueError(f"unknown item_schedule {self.item_schedule!r}; expected 'static' or 'steal'")
        if self.act_levels not in ("split", "shared"):
            raise ValueError(f"unknown act_levels {self.act_levels!r}; expected 'split' or 'shared'")
        if self.prefill_epilogue not in ("transpose", "vector", "scalar"):
            raise ValueError(f"unknown prefill_epilogue {self.prefill_epilogue!r}; "
                             "expected 'transpose', 'vector' or 'scalar'")
        if self.act_quant not in ("row", "pair"):
            raise ValueError(f"unknown act_quant {self.act_quant!r}; expected 'row' or 'pair'")
        if self.int4_unpack not in ("step", "item"):
            raise ValueError(f"unknown int4_unpack {self.int4_unpack!r}; expected 'step' or 'item'")
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; expected one of {PROBES}")
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"unknown decode path {self.decode!r}; expected one of {DECODE_PATHS}")
        if KS % self.vl or 16 % self.vl or self.vl < 4:
            raise ValueError(f"vl must be 4, 8 or 16, got {self.vl}")
        for r in (self.block_rows, self.decode_rows):
            if r < 1 or self.tile_rows % (2 * r):
                raise ValueError("2 * block_rows and 2 * decode_rows must divide tile_rows")
        if self.block_tokens < 2 or self.block_tokens & (self.block_tokens - 1):
            raise ValueError("block_tokens must be a power of two >= 2")
        if 2 * self.block_rows * self.block_tokens * self.vl * 4 > 2 * 1020:
            raise ValueError("accumulators of a token block exceed two 1 KiB stack buffers")


def _vload(buf, start, lanes):
    return tirx.BufferLoad(buf, [tirx.Ramp(tirx.const(int(start), "int32"), tirx.const(1, "int32"), lanes)])


def _transpose_reduce(vectors, vl):
    """vl vectors of vl lanes -> one vector whose lane i is the lane-sum of vectors[i]."""
    width = vl
    m = 1
    vs = list(vectors)
    while len(vs) > 1:
        nxt = []
        for i in range(0, len(vs), 2):
            lo, hi = [], []
            for src in range(2 * m):
                b = src * width
                lo += range(b, b + width // 2)
                hi += range(b + width // 2, b + width)
            pair = [vs[i], vs[i + 1]]
            nxt.append(tirx.Shuffle(pair, [tirx.const(j, "int32") for j in lo])
                       + tirx.Shuffle(pair, [tirx.const(j, "int32") for j in hi]))
        vs = nxt
        width //= 2
        m *= 2
    return vs[0]


def fast_exp(x):
    """exp(x) for float32 expressions (scalar or vector lanes), vectorizable: Cephes' expf
    (range reduction by ln 2, degree-5 polynomial, 2^n through the exponent bits), ~1 ulp.
    LLVM would otherwise call libm's expf once per lane."""
    x = T.max(T.min(x, T.float32(88.3762626647949)), T.float32(-87.3365478515625))
    fx = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - fx * T.float32(0.693359375) + fx * T.float32(2.12194440e-4)
    p = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.float32(c)
    p = p * r * r + r + T.float32(1)
    lanes = x.ty.dtype.lanes
    ity, fty = ("int32", "float32") if lanes == 1 else (f"int32x{lanes}", f"float32x{lanes}")
    return p * T.reinterpret(fty, T.shift_left(T.Cast(ity, fx) + 127, 23))


def make_moe_prim_func(hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                       fmt: str, group_size: int | None, cfg: KernelConfig, symbol: str,
                       scratch_paths: list[str] | None = None):
    """The PrimFunc computing `moe_experts` for one spec (see the module docstring). Its scratch
    buffers are sized for every prefill path of `scratch_paths` (default: its own), so that the
    functions of one library built with several paths take the same buffers."""
    H, I, E, K = hidden_size, intermediate_size, num_experts, top_k  # noqa: E741
    VL = cfg.vl
    NSUB = KS // VL
    quant = fmt in QUANTIZED
    G = group_size if quant else KS
    if H % KS or I % KS:
        raise ValueError(f"hidden and intermediate sizes must be multiples of {KS}")
    if quant and (G is None or G % KS or H % G or I % G):
        raise ValueError(f"group size {G} must be a multiple of {KS} dividing H and I")
    TR = cfg.tile_rows
    if I % TR or H % TR:
        raise ValueError(f"tile_rows {TR} must divide H and I")
    BR, BT, DR = cfg.block_rows, cfg.block_tokens, cfg.decode_rows
    MID = BT // 2 if BT >= 8 else 0        # an intermediate tail block size, if any
    NT1 = I // TR
    NT2 = H // TR
    HC = next(c for c in (256, 128, 64, 32) if H % c == 0)
    NHC = H // HC
    RES = -(-max(2 * BR * BT, 2 * DR) // VL) * VL   # dot products per micro-kernel call, padded
    # workspace offsets
    O_SEGEXP = E
    O_SEGSTART = 2 * E
    O_NSEG = 3 * E + 1
    O_SORTED = 3 * E + 2
    ALLOC = {"scope": "global", "annotations": {"disable_lower_builtin": True}}

    def cast64(v):
        return T.Cast("int64", v)

    def emit_hsums(parts, res):
        """Store the lane sums of the accumulators [(buffer, count), ...] into res[0:...]."""
        vecs = [_vload(buf, a * VL, VL) for buf, cnt in parts for a in range(int(cnt))]
        zero = tirx.Broadcast(tirx.const(0, "float32"), VL)
        while len(vecs) % VL:
            vecs.append(zero)
        for j in range(len(vecs) // VL):
            T.buffer_store(res, _transpose_reduce(vecs[j * VL:(j + 1) * VL], VL), [slice(j * VL, (j + 1) * VL)])

    # ---- dequantization of VL consecutive weights of a row into wv ---------------------------
    # load_raw: without the group scale; load_scaled: times the group scale.
    if fmt == "int8":
        @T.macro
        def load_raw(wq, e64, row, k0, c, wv):
            for v in T.vectorized(VL):
                wv[v] = T.Cast("float32", wq[e64, cast64(row), cast64(k0 + c * VL + v)])
    elif fmt == "int4":
        # sign-extend the byte, then: high nibble = b >> 4, low nibble = (b << 28) >> 28
        # (arithmetic shifts); sub-vectors c < 16 / VL read low nibbles, the rest high ones.
        @T.macro
        def load_raw(wq, e64, row, k0, c, wv):
            for v in T.vectorized(VL):
                wv[v] = T.Cast("float32", T.shift_right(T.shift_left(
                    T.Cast("int32", T.reinterpret("int8", wq[e64, cast64(row), cast64(k0 // 2 + (c * VL) % 16 + v)])),
                    28 - 4 * ((c * VL) // 16)), 28))
    else:
        @T.macro
        def load_raw(wq, e64, row, k0, c, wv):
            for v in T.vectorized(VL):
                wv[v] = T.Cast("float32", wq[e64, cast64(row), cast64(k0 + c * VL + v)])

    if quant:
        @T.macro
        def load_scaled(wq, ws, e64, row, k0, c, wv):
            sc = T.Bind(ws[e64, cast64(row), cast64(k0 // G)])
            load_raw(wq, e64, row, k0, c, wv)
            for v in T.vectorized(VL):
                wv[v] = wv[v] * sc
    else:
        @T.macro
        def load_scaled(wq, ws, e64, row, k0, c, wv):
            load_raw(wq, e64, row, k0, c, wv)

    # ---- micro-kernels ---------------------------------------------------------------------
    # Rows are  rr * stride + base + r  (rr < nrr, r < nr): gate/up passes nrr=2, stride=I
    # (gate row i and up row i together); down passes nrr=1. Input rows: inp[tok[t], :].
    # res[(rr * nr + r) * tt + t] receives the dot products. The accumulators live in two
    # buffers (first / second half of the rows) so that each stays under the 1 KiB limit.
    @T.macro
    def mk_block(wq, ws, e64, base, stride, nrr, nr, tt, inp, tok, kdim, res):
        acc_a = T.alloc_buffer(((nrr * nr) // 2 * tt * VL,), "float32", **ALLOC)
        acc_b = T.alloc_buffer(((nrr * nr - (nrr * nr) // 2) * tt * VL,), "float32", **ALLOC)
        wv = T.alloc_buffer((VL,), "float32", **ALLOC)
        for a in T.unroll((nrr * nr) // 2 * tt):
            for v in T.vectorized(VL):
                acc_a[a * VL + v] = T.float32(0)
        for a in T.unroll((nrr * nr - (nrr * nr) // 2) * tt):
            for v in T.vectorized(VL):
                acc_b[a * VL + v] = T.float32(0)
        for kb in range(kdim // KS):
            for rr in T.unroll(nrr):
                for r in T.unroll(nr):
                    for c in T.unroll(NSUB):
                        load_scaled(wq, ws, e64, rr * stride + base + r, kb * KS, c, wv)
                        for t in T.unroll(tt):
                            if rr * nr + r < (nrr * nr) // 2:
                                for v in T.vectorized(VL):
                                    acc_a[((rr * nr + r) * tt + t) * VL + v] = (
                                        acc_a[((rr * nr + r) * tt + t) * VL + v]
                                        + wv[v] * inp[tok[t], kb * KS + c * VL + v])
                            else:
                                for v in T.vectorized(VL):
                                    acc_b[((rr * nr + r - (nrr * nr) // 2) * tt + t) * VL + v] = (
                                        acc_b[((rr * nr + r - (nrr * nr) // 2) * tt + t) * VL + v]
                                        + wv[v] * inp[tok[t], kb * KS + c * VL + v])
        emit_hsums([(acc_a, (nrr * nr) // 2 * tt), (acc_b, (nrr * nr - (nrr * nr) // 2) * tt)], res)

    if quant:
        @T.macro
        def mk_single(wq, ws, e64, base, stride, nrr, nr, inp, row_in, kdim, res):
            acc = T.alloc_buffer((nrr * nr * VL,), "float32", **ALLOC)
            gacc = T.alloc_buffer((nrr * nr * VL,), "float32", **ALLOC)
            wv = T.alloc_buffer((VL,), "float32", **ALLOC)
            for a in T.unroll(nrr * nr):
                for v in T.vectorized(VL):
                    acc[a * VL + v] = T.float32(0)
            for g in range(kdim // G):
                for a in T.unroll(nrr * nr):
                    for v in T.vectorized(VL):
                        gacc[a * VL + v] = T.float32(0)
                for kk in range(G // KS):
                    for rr in T.unroll(nrr):
                        for r in T.unroll(nr):
                            for c in T.unroll(NSUB):
                                load_raw(wq, e64, rr * stride + base + r, g * G + kk * KS, c, wv)
                                for v in T.vectorized(VL):
                                    gacc[(rr * nr + r) * VL + v] = (
                                        gacc[(rr * nr + r) * VL + v]
                                        + wv[v] * inp[row_in, g * G + kk * KS + c * VL + v])
                for rr in T.unroll(nrr):
                    for r in T.unroll(nr):
                        sc = T.Bind(ws[e64, cast64(rr * stride + base + r), cast64(g)])
                        for v in T.vectorized(VL):
                            acc[(rr * nr + r) * VL + v] = (acc[(rr * nr + r) * VL + v]
                                                           + gacc[(rr * nr + r) * VL + v] * sc)
            emit_hsums([(acc, nrr * nr)], res)
    else:
        @T.macro
        def mk_single(wq, ws, e64, base, stride, nrr, nr, inp, row_in, kdim, res):
            acc = T.alloc_buffer((nrr * nr * VL,), "float32", **ALLOC)
            wv = T.alloc_buffer((VL,), "float32", **ALLOC)
            for a in T.unroll(nrr * nr):
                for v in T.vectorized(VL):
                    acc[a * VL + v] = T.float32(0)
            for kb in range(kdim // KS):
                for rr in T.unroll(nrr):
                    for r in T.unroll(nr):
                        for c in T.unroll(NSUB):
                            load_raw(wq, e64, rr * stride + base + r, kb * KS, c, wv)
                            for v in T.vectorized(VL):
                                acc[(rr * nr + r) * VL + v] = (acc[(rr * nr + r) * VL + v]
                                                               + wv[v] * inp[row_in, kb * KS + c * VL + v])
            emit_hsums([(acc, nrr * nr)], res)

    # ---- decode on VNNI: one token's gate/up and down with vpdpbusd -------------------------
    # x[t] is quantized once per call (dquant) into act, scale asc[t], and after gate/up each
    # h row (pair p) at act[n * L * H + p * L * I:], scale asc[n + p], as the prefill path
    # does: int8 in two u8 levels (~15 bits, level 2 KD bytes after level 1), int4 in one, in
    # the nibble order of the packed weights (within 128
    # values: blocks of 32 -> low halves at 0-63, high halves at 64-127, 16 per block), so
    # that 64 packed bytes give two 64-byte vpdpbusd operands with one and + one shift-and.
    # Per row and 64 weight bytes: int8 one load, two vpdpbusd (one per level); int4 one load,
    # xor/and/shift/and/sub/sub, two vpdpbusd; the int32 lane sums are folded into float32
    # (times the group scale, per lane where a vector spans two groups) every FU values; at
    # the end (sum - comp[row]) * asc. A few instructions per 64 weights instead of ~12
    # (int8) / ~20 (int4) with convert + FMA.
    I8D = fmt == "int8"
    L_D = 2 if I8D else 1
    VB = 64 if I8D else 128                 # values per 64-byte weight vector
    PFU = cfg.decode_prefetch
    FU = max(G, VB)
    DVNNI = (quant and cfg.variant != "fma" and VL == 16 and (I8D or G >= 64)
             and (G % VB == 0 or 2 * G == VB))
    DV_GU = DVNNI and H % FU == 0          # gate/up (K = H) on vpdpbusd
    DV_DN = DVNNI and I % FU == 0          # down (K = I) on vpdpbusd

    def perm4(k16):
        """int4: act position of x[k16 * 16 : k16 * 16 + 16] (see above)."""
        return (k16 // 8) * 128 + (k16 % 2) * 64 + ((k16 % 8) // 2) * 16

    @T.macro
    def dquant(src, row, KD, aoff, act, asc, sidx):
        """src[row, 0:KD] -> act[aoff:] (int8: two levels; int4: one, nibble order), scale asc[sidx]."""
        accv = T.alloc_buffer((16,), "float32", **ALLOC)
        amax = T.alloc_buffer((1,), "float32", **ALLOC)
        for v in T.vectorized(16):
            accv[v] = T.float32(0)
        for k16 in range(KD // 16):
            for v in T.vectorized(16):
                accv[v] = T.max(accv[v], T.abs(src[row, k16 * 16 + v]))
        amax[0] = T.float32(1e-30)
        for v in range(16):
            amax[0] = T.max(amax[0], accv[v])
        inv = T.Bind(T.float32(127) / amax[0])
        if I8D:
            asc[sidx] = amax[0] / T.float32(127 * 256)
            for k16 in range(KD // 16):
                for v in T.vectorized(16):
                    act[cast64(aoff + k16 * 16 + v)] = T.Cast("uint8", T.Cast("int32", T.max(T.min(
                        T.nearbyint(src[row, k16 * 16 + v] * inv), T.float32(127)), T.float32(-127))) + 128)
                for v in T.vectorized(16):
                    act[cast64(aoff + KD + k16 * 16 + v)] = T.Cast("uint8", T.Cast("int32", T.max(T.min(
                        T.nearbyint((src[row, k16 * 16 + v] * inv - T.Cast(
                            "float32", T.Cast("int32", act[cast64(aoff + k16 * 16 + v)]) - 128))
                            * T.float32(256)), T.float32(127)), T.float32(-128))) + 128)
        else:
            asc[sidx] = amax[0] / T.float32(127)
            for k16 in range(KD // 16):
                for v in T.vectorized(16):
                    act[cast64(aoff + perm4(k16) + v)] = T.Cast("uint8", T.Cast("int32", T.max(T.min(
                        T.nearbyint(src[row, k16 * 16 + v] * inv), T.float32(127)), T.float32(-127))) + 128)

    def vdp(acc_vec, a, w):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_vec, a, w)

    # rows rr * stride + base + r (rr < nrr, r < nr) of an (E, NROWS, KD) weight; res as mk_single
    @T.macro
    def mk_single_vnni(wqf, ws, wc, e64, NROWS, base, stride, nrr, nr, KD, aoff, act, asc, sidx, res):
        acc = T.alloc_buffer((nrr * nr * 16,), "float32", **ALLOC)
        ci = T.alloc_buffer((L_D * nrr * nr * 16,), "int32", **ALLOC)
        for a in T.unroll(nrr * nr):
            for v in T.vectorized(16):
                acc[a * 16 + v] = T.float32(0)
        for u in range(KD // FU):
            for a in T.unroll(L_D * nrr * nr):
                for v in T.vectorized(16):
                    ci[a * 16 + v] = 0
            for kc in T.unroll(FU // VB):
                if PFU > 0:
                    for rr in T.unroll(nrr):
                        for r in T.unroll(nr):
                            T.evaluate(tir_intdot.prefetch_line(T.address_of(wqf[
                                (e64 * T.int64(NROWS) + cast64(rr * stride + base + r + nr * PFU))
                                * T.int64(KD if I8D else KD // 2)
                                + cast64((u * FU + kc * VB) if I8D else (u * FU + kc * VB) // 2)]), 3))
                if I8D:
                    a1 = T.Bind(tirx.BufferLoad(act, [tirx.Ramp(cast64(aoff + u * FU + kc * 64), T.int64(1), 64)]))
                    a2 = T.Bind(tirx.BufferLoad(act, [tirx.Ramp(
                        cast64(aoff + KD + u * FU + kc * 64), T.int64(1), 64)]))
                    for rr in T.unroll(nrr):
                        for r in T.unroll(nr):
                            wv = T.Bind(tirx.BufferLoad(wqf, [tirx.Ramp(
                                (e64 * T.int64(NROWS) + cast64(rr * stride + base + r)) * T.int64(KD)
                                + cast64(u * FU + kc * 64), T.int64(1), 64)]))
                            ci[T.Ramp((rr * nr + r) * 16, 1, 16)] = vdp(ci[T.Ramp((rr * nr + r) * 16, 1, 16)], a1, wv)
                            ci[T.Ramp((nrr * nr + rr * nr + r) * 16, 1, 16)] = vdp(
                                ci[T.Ramp((nrr * nr + rr * nr + r) * 16, 1, 16)], a2, wv)
                else:
                    alo = T.Bind(tirx.BufferLoad(act, [tirx.Ramp(cast64(aoff + u * FU + kc * 128), T.int64(1), 64)]))
                    ahi = T.Bind(tirx.BufferLoad(act, [tirx.Ramp(
                        cast64(aoff + u * FU + kc * 128 + 64), T.int64(1), 64)]))
                    for rr in T.unroll(nrr):
                        for r in T.unroll(nr):
                            bx = T.Bind(T.bitwise_xor(tirx.BufferLoad(wqf, [tirx.Ramp(
                                (e64 * T.int64(NROWS) + cast64(rr * stride + base + r)) * T.int64(KD // 2)
                                + cast64((u * FU + kc * 128) // 2), T.int64(1), 64)]),
                                tirx.Broadcast(T.uint8(0x88), 64)))
                            ci[T.Ramp((rr * nr + r) * 16, 1, 16)] = vdp(
                                ci[T.Ramp((rr * nr + r) * 16, 1, 16)], alo,
                                T.reinterpret("int8x64", T.bitwise_and(bx, tirx.Broadcast(T.uint8(15), 64)))
                                - tirx.Broadcast(T.int8(8), 64))
                            ci[T.Ramp((rr * nr + r) * 16, 1, 16)] = vdp(
                                ci[T.Ramp((rr * nr + r) * 16, 1, 16)], ahi,
                                T.reinterpret("int8x64", T.bitwise_and(T.shift_right(
                                    bx, tirx.Broadcast(T.uint8(4), 64)), tirx.Broadcast(T.uint8(15), 64)))
                                - tirx.Broadcast(T.int8(8), 64))
            for rr in T.unroll(nrr):
                for r in T.unroll(nr):
                    if FU // G == 2:
                        s0 = T.Bind(ws[e64, cast64(rr * stride + base + r), cast64(u * 2)])
                        s1 = T.Bind(ws[e64, cast64(rr * stride + base + r), cast64(u * 2 + 1)])
                        if I8D:
                            for v in T.vectorized(16):
                                acc[(rr * nr + r) * 16 + v] = acc[(rr * nr + r) * 16 + v] + T.Cast(
                                    "float32", T.shift_left(ci[(rr * nr + r) * 16 + v], 8)
                                    + ci[(nrr * nr + rr * nr + r) * 16 + v]) * T.if_then_else(v < 8, s0, s1)
                        else:
                            for v in T.vectorized(16):
                                acc[(rr * nr + r) * 16 + v] = acc[(rr * nr + r) * 16 + v] + T.Cast(
                                    "float32", ci[(rr * nr + r) * 16 + v]) * T.if_then_else(v < 8, s0, s1)
                    else:
                        sc = T.Bind(ws[e64, cast64(rr * stride + base + r), cast64((u * FU) // G)])
                        if I8D:
                            for v in T.vectorized(16):
                                acc[(rr * nr + r) * 16 + v] = acc[(rr * nr + r) * 16 + v] + T.Cast(
                                    "float32", T.shift_left(ci[(rr * nr + r) * 16 + v], 8)
                                    + ci[(nrr * nr + rr * nr + r) * 16 + v]) * sc
                        else:
                            for v in T.vectorized(16):
                                acc[(rr * nr + r) * 16 + v] = acc[(rr * nr + r) * 16 + v] + T.Cast(
                                    "float32", ci[(rr * nr + r) * 16 + v]) * sc
        emit_hsums([(acc, nrr * nr)], res)
        for rr in T.unroll(nrr):
            for r in T.unroll(nr):
                res[rr * nr + r] = (res[rr * nr + r] - wc[e64, cast64(rr * stride + base + r)]) * asc[sidx]

    # ---- epilogues ---------------------------------------------------------------------------
    # res holds the gate dot products first (nr * tt of them), then the up ones
    @T.macro
    def silu_mul_store(res, nr, tt, nvalid, hbuf, q0, i0):
        hv = T.alloc_buffer((RES,), "float32", **ALLOC)
        for v in T.vectorized(nr * tt):
            hv[v] = res[v] / (T.float32(1) + fast_exp(T.float32(0) - res[v])) * res[nr * tt + v]
        for t in T.unroll(tt):
            if t < nvalid:
                for r in T.unroll(nr):
                    hbuf[q0 + t, i0 + r] = hv[r * tt + t]

    @T.macro
    def rows_store(res, nr, tt, nvalid, ybuf, q0, h0):
        for t in T.unroll(tt):
            if t < nvalid:
                for r in T.unroll(nr):
                    ybuf[q0 + t, h0 + r] = res[r * tt + t]

    # ---- one block of tt tokens (j0 .. j0 + tt of the segment; indices clamped to the
    # segment, only the first nvalid stored) for a gate/up or a down work item --------------
    @T.macro
    def gu_tokens(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, j0, tt, nvalid):
        for t in T.unroll(tt):
            tok[t] = iw[O_SORTED + p0 + T.min(j0 + t, cnt - 1)] // K
        for sub in range(TR // BR):
            mk_block(gq, gs, e64, i0 + sub * BR, I, 2, BR, tt, x, tok, H, res)
            silu_mul_store(res, BR, tt, nvalid, hbuf, p0 + j0, i0 + sub * BR)

    @T.macro
    def dn_tokens(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, j0, tt, nvalid):
        for t in T.unroll(tt):
            tok[t] = p0 + T.min(j0 + t, cnt - 1)
        for sub in range(TR // (2 * BR)):
            mk_block(dq, ds, e64, h0 + sub * 2 * BR, 0, 1, 2 * BR, tt, hbuf, tok, I, res)
            rows_store(res, 2 * BR, tt, nvalid, ybuf, p0 + j0, h0 + sub * 2 * BR)

    @T.macro
    def gu_item(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, gqf, gc, act, asc):
        nb = T.Bind(cnt // BT)
        for jb in range(nb):
            gu_tokens(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, jb * BT, BT, BT)
        rem = T.Bind(cnt - nb * BT)
        if rem == 1:
            row_in = T.Bind(iw[O_SORTED + p0 + nb * BT] // K)
            for sub in range(TR // DR):
                if DV_GU:
                    mk_single_vnni(gqf, gs, gc, e64, 2 * I, i0 + sub * DR, I, 2, DR, H, row_in * L_D * H, act, asc,
                                   row_in, res)
                else:
                    mk_single(gq, gs, e64, i0 + sub * DR, I, 2, DR, x, row_in, H, res)
                silu_mul_store(res, DR, 1, 1, hbuf, p0 + nb * BT, i0 + sub * DR)
        elif rem == 2:
            gu_tokens(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, nb * BT, 2, 2)
        elif rem > 2:
            if MID > 2:
                if rem <= MID:
                    gu_tokens(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, nb * BT, MID, rem)
                else:
                    gu_tokens(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, nb * BT, BT, rem)
            else:
                gu_tokens(x, gq, gs, iw, hbuf, e64, p0, cnt, i0, tok, res, nb * BT, BT, rem)

    @T.macro
    def dn_item(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, dqf, dc, act, asc, n):
        nb = T.Bind(cnt // BT)
        for jb in range(nb):
            dn_tokens(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, jb * BT, BT, BT)
        rem = T.Bind(cnt - nb * BT)
        if rem == 1:
            for sub in range(TR // (2 * DR)):
                if DV_DN:
                    mk_single_vnni(dqf, ds, dc, e64, H, h0 + sub * 2 * DR, 0, 1, 2 * DR, I,
                                   n * L_D * H + (p0 + nb * BT) * L_D * I, act, asc, n + p0 + nb * BT, res)
                else:
                    mk_single(dq, ds, e64, h0 + sub * 2 * DR, 0, 1, 2 * DR, hbuf, p0 + nb * BT, I, res)
                rows_store(res, 2 * DR, 1, 1, ybuf, p0 + nb * BT, h0 + sub * 2 * DR)
        elif rem == 2:
            dn_tokens(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, nb * BT, 2, 2)
        elif rem > 2:
            if MID > 2:
                if rem <= MID:
                    dn_tokens(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, nb * BT, MID, rem)
                else:
                    dn_tokens(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, nb * BT, BT, rem)
            else:
                dn_tokens(dq, ds, hbuf, ybuf, e64, p0, cnt, h0, tok, res, nb * BT, BT, rem)

    # ---- the whole layer -----------------------------------------------------------------------
    intdot = quant and cfg.variant != "fma"
    use_prefill = intdot and cfg.prefill != "fma"     # the int8/int4 prefill path is built and taken
    sp = {d["name"]: d for d in scratch_parts_of_paths(H, I, E, K, fmt, intdot, scratch_paths or [cfg.prefill])}

    def ssize(name, n):
        return sp[name]["fixed"] + sp[name]["per_token"] * n

    STOP_EARLY = use_prefill and cfg.prefill == "int" and cfg.probe.startswith("upto")
    if use_prefill:
        if cfg.prefill == "int":
            make = functools.partial(tir_intdot.make_prefill_body, prefetch=cfg.prefill_prefetch,
                                     schedule=cfg.item_schedule, split=cfg.act_levels == "split",
                                     probe=cfg.probe, int4_unpack=cfg.int4_unpack, epilogue=cfg.prefill_epilogue,
                                     act_quant=cfg.act_quant, prefetch_next=cfg.prefill_prefetch_next,
                                     prefetch_hint=cfg.prefill_prefetch_hint,
                                     act_prefetch=cfg.prefill_act_prefetch)
        else:
            make = functools.partial(tir_amx_bf16.make_prefill_body, levels=bf16_levels(cfg.prefill, fmt),
                                     schedule=cfg.item_schedule)
        prefill_body = make(
            H=H, I=I, E=E, K=K, G=G, fmt=fmt, variant=cfg.variant, O_SEGEXP=O_SEGEXP, O_SEGSTART=O_SEGSTART,
            O_NSEG=O_NSEG, O_SORTED=O_SORTED, silu=lambda v: v / (T.float32(1) + fast_exp(T.float32(0) - v)))

    STEAL = cfg.item_schedule == "steal"
    CHUNK = 4          # token-block items (row tiles) claimed at a time

    # the two item kinds of the token-block path under one signature, for block_phase
    @T.macro
    def gu_block(wq, ws, wqf, wc, src, out, iw, e64, p0, cnt, r0, tok, res, act, asc, n):
        gu_item(src, wq, ws, iw, out, e64, p0, cnt, r0, tok, res, wqf, wc, act, asc)

    @T.macro
    def dn_block(wq, ws, wqf, wc, src, out, iw, e64, p0, cnt, r0, tok, res, act, asc, n):
        dn_item(wq, ws, src, out, e64, p0, cnt, r0, tok, res, wqf, wc, act, asc, n)

    def block_phase(item, nt):
        """Step 2 (item gu_block, nt = NT1 row tiles per segment) or 3 (dn_block, NT2) of the
        token-block path: equal shares of the (segment, row tile) items, claimed CHUNK at a time from
        this task's share, then from the others' (codegen/tir_schedule)."""
        @T.macro
        def phase(wq, ws, wqf, wc, src, out, iw, act, asc, n, ntask, o_sched):
            tir_schedule.even_starts(iw, iw[O_NSEG] * nt, ntask, o_sched)
            for tsk in T.parallel(ntask):
                tok = T.alloc_buffer((BT,), "int32", **ALLOC)
                res = T.alloc_buffer((RES,), "float32", **ALLOC)
                cur = T.alloc_buffer((1,), "int32", **ALLOC)
                for vo in range(ntask if STEAL else 1):
                    v = T.Bind((tsk + vo) % ntask)
                    cur[0] = tir_schedule.claim(iw, o_sched, v, CHUNK)
                    while cur[0] < tir_schedule.share_end(iw, o_sched, v):
                        for w in range(cur[0], T.min(cur[0] + CHUNK, tir_schedule.share_end(iw, o_sched, v))):
                            s = T.Bind(w // nt)
                            p0 = T.Bind(iw[O_SEGSTART + s])
                            item(wq, ws, wqf, wc, src, out, iw, T.Cast("int64", iw[O_SEGEXP + s]), p0,
                                 iw[O_SEGSTART + s + 1] - p0, (w % nt) * TR, tok, res, act, asc, n)
                        cur[0] = tir_schedule.claim(iw, o_sched, v, CHUNK)
        return phase

    gu_blocks = block_phase(gu_block, NT1)
    dn_blocks = block_phase(dn_block, NT2)

    @T.macro
    def fma_body(gq, gs, dq, ds, x, hbuf, ybuf, iw, n, gqf, gc, act, asc, dqf, dc, nthr, o_sched):
        S = T.Bind(iw[O_NSEG])
        if DV_GU:
            for t in range(n):
                dquant(x, t, H, t * L_D * H, act, asc, t)
        ntask = T.Bind(tir_schedule.ntasks(nthr))
        # 2. h = silu(gate x) * (up x), per (segment, tile of intermediate rows)
        gu_blocks(gq, gs, gqf, gc, x, hbuf, iw, act, asc, n, ntask, o_sched)
        if DV_DN:
            # h rows quantized for the down projection (all pairs; only single-token tails read them)
            for p in T.parallel(iw[O_SEGSTART + S]):
                dquant(hbuf, p, I, n * L_D * H + p * L_D * I, act, asc, n + p)
        # 3. yp = down h, per (segment, tile of hidden rows)
        dn_blocks(dq, ds, dqf, dc, hbuf, ybuf, iw, act, asc, n, ntask, o_sched)

    # ---- one token (decode): gate/up and down in one parallel launch, no sort, no yp -------------
    NU1 = I // DR          # gate/up units (DR row pairs each) per pair
    NU2 = H // (2 * DR)    # down units (2 DR hidden rows each)
    O_NV = K               # iw[0:K]: k of the token's valid pairs, in k order; iw[K]: their number
    DECODE = cfg.decode

    @T.macro
    def task_span(tsk, total, nthr, lohi):
        """lohi[0:2] = [lo, hi) of task tsk's units when `total` units go to nthr tasks, contiguous."""
        lohi[0] = T.Cast("int32", cast64(tsk) * cast64(total) // cast64(nthr))
        lohi[1] = T.Cast("int32", (cast64(tsk) + T.int64(1)) * cast64(total) // cast64(nthr))

    @T.macro
    def decode1_gu(x, ids, gq, gs, gc, hbuf, iw, nthr, gqf):
        # h[j] = silu(gate_e x) * (up_e x) for the valid pairs j: the nv * NU1 units split into
        # nthr contiguous spans (each task streams consecutive rows of one or two experts)
        for tsk in T.parallel(nthr):
            nv = T.Bind(iw[O_NV])
            xq = T.alloc_buffer((L_D * H if DV_GU else 1,), "uint8", **ALLOC)
            xs = T.alloc_buffer((1,), "float32", **ALLOC)
            res = T.alloc_buffer((RES,), "float32", **ALLOC)
            lohi = T.alloc_buffer((2,), "int32", **ALLOC)
            task_span(tsk, nv * NU1, nthr, lohi)
            if lohi[0] < lohi[1]:
                if DV_GU:
                    dquant(x, 0, H, 0, xq, xs, 0)   # every task its own copy: no serial phase
                # loops from 0 only: TVM 0.27's CanonicalizeLoop shifts a loop starting elsewhere
                # but not the bounds of the loops nested in it that use its variable
                j0 = T.Bind(lohi[0] // NU1)
                for jj in range((lohi[1] - 1) // NU1 + 1 - j0):
                    j = T.Bind(j0 + jj)
                    e64 = T.Bind(cast64(ids[0, iw[j]]))
                    u0 = T.Bind(T.max(lohi[0], j * NU1) - j * NU1)
                    for uu in range(T.min(lohi[1], j * NU1 + NU1) - j * NU1 - u0):
                        u = T.Bind(u0 + uu)
                        if DV_GU:
                            mk_single_vnni(gqf, gs, gc, e64, 2 * I, u * DR, I, 2, DR, H, 0, xq, xs, 0, res)
                        else:
                            mk_single(gq, gs, e64, u * DR, I, 2, DR, x, 0, H, res)
                        silu_mul_store(res, DR, 1, 1, hbuf, j, u * DR)

    @T.macro
    def decode1_dn(tw, ids, dq, ds, dc, y, hbuf, iw, nthr, dqf):
        # y[rows] = sum_j w_j * down_e[rows] . h[j]: the NU2 units of hidden rows split into nthr
        # spans; every task quantizes all nv h rows itself (nv * I values) rather than a phase of
        # its own doing it once, and writes its rows of y: no yp, no weighted-sum phase
        for tsk in T.parallel(nthr):
            nv = T.Bind(iw[O_NV])
            hq = T.alloc_buffer((K * L_D * I if DV_DN else 1,), "uint8", **ALLOC)
            hs = T.alloc_buffer((K,), "float32", **ALLOC)
            res = T.alloc_buffer((RES,), "float32", **ALLOC)
            lohi = T.alloc_buffer((2,), "int32", **ALLOC)
            task_span(tsk, NU2, nthr, lohi)
            if lohi[0] < lohi[1]:
                for r in range((lohi[1] - lohi[0]) * 2 * DR):
                    y[0, lohi[0] * 2 * DR + r] = T.float32(0)
                if DV_DN:
                    for j in range(nv):
                        dquant(hbuf, j, I, j * L_D * I, hq, hs, j)
                for j in range(nv):
                    e64 = T.Bind(cast64(ids[0, iw[j]]))
                    wt = T.Bind(tw[0, iw[j]])
                    for uu in range(lohi[1] - lohi[0]):
                        u = T.Bind(lohi[0] + uu)
                        if DV_DN:
                            mk_single_vnni(dqf, ds, dc, e64, H, u * 2 * DR, 0, 1, 2 * DR, I, j * L_D * I, hq, hs, j,
                                           res)
                        else:
                            mk_single(dq, ds, e64, u * 2 * DR, 0, 1, 2 * DR, hbuf, j, I, res)
                        for r in T.unroll(2 * DR):
                            y[0, u * 2 * DR + r] = y[0, u * 2 * DR + r] + wt * res[r]

    @T.macro
    def decode1_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, iw, nthr, gqf, dqf):
        iw[O_NV] = 0
        for k in range(K):
            e = T.Bind(ids[0, k])
            if e >= 0 and e < E:
                iw[iw[O_NV]] = k
                iw[O_NV] = iw[O_NV] + 1
        if iw[O_NV] == 0:
            # nothing routed here (e.g. every expert on the GPU): y = 0, no parallel region
            for hv in range(H // VL):
                for v in T.vectorized(VL):
                    y[0, hv * VL + v] = T.float32(0)
        elif DECODE == "fused":
            # one launch of the thread pool; its tasks meet at a barrier between the two loops
            # (cheaper than a join and a second launch: no round trip through the calling thread)
            with T.attr(0, "pragma_parallel_launch_point", 1):
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    decode1_gu(x, ids, gq, gs, gc, hbuf, iw, nthr, gqf)
                decode1_dn(tw, ids, dq, ds, dc, y, hbuf, iw, nthr, dqf)
        else:
            decode1_gu(x, ids, gq, gs, gc, hbuf, iw, nthr, gqf)
            decode1_dn(tw, ids, dq, ds, dc, y, hbuf, iw, nthr, dqf)

    @T.macro
    def weighted_sum(tw, y, ybuf, iw, n):
        # 4. y[t] = sum_k w[t, k] * yp[pair(t, k)]
        for w in T.parallel(n * NHC):
            t = T.Bind(w // NHC)
            hc0 = T.Bind((w % NHC) * HC)
            o = T.alloc_buffer((VL,), "float32", **ALLOC)
            for hv in range(HC // VL):
                for v in T.vectorized(VL):
                    o[v] = T.float32(0)
                for k in T.unroll(K):
                    pos = T.Bind(iw[O_SORTED + n * K + t * K + k])
                    if pos >= 0:
                        wt = T.Bind(tw[t, k])
                        for v in T.vectorized(VL):
                            o[v] = o[v] + wt * ybuf[pos, hc0 + hv * VL + v]
                for v in T.vectorized(VL):
                    y[t, hc0 + hv * VL + v] = o[v]

    @T.macro
    def phased_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, ybuf, iw, act, asc, n, nthr, gqf, dqf):
        # 1. counting sort of the (token, k) pairs by expert
        for e in range(E):
            iw[e] = 0
        for p in range(n * K):
            e = T.Bind(ids[p // K, p % K])
            if e >= 0 and e < E:
                iw[e] = iw[e] + 1
        iw[O_NSEG] = 0
        iw[O_SEGSTART] = 0
        for e in range(E):
            if iw[e] > 0:
                s = T.Bind(iw[O_NSEG])
                c = T.Bind(iw[e])
                iw[O_SEGEXP + s] = e
                iw[e] = iw[O_SEGSTART + s]
                iw[O_SEGSTART + s + 1] = iw[O_SEGSTART + s] + c
                iw[O_NSEG] = s + 1
        for p in range(n * K):
            e = T.Bind(ids[p // K, p % K])
            if e >= 0 and e < E:
                pos = T.Bind(iw[e])
                iw[e] = pos + 1
                iw[O_SORTED + pos] = p
                iw[O_SORTED + n * K + p] = pos
            else:
                iw[O_SORTED + n * K + p] = -1
        o_sched = T.Bind(ssize("iwork", n) - SCHED_SLOTS)    # the last SCHED_SLOTS int32 of iw
        # the decode / prefill crossover: enough pairs an expert for the int8/int4 prefill path (if built)
        many = T.Bind(n * K >= PREFILL_PAIRS_PER_EXPERT * E)
        if use_prefill:
            if many:
                prefill_body(x, gq, gs, gc, dq, ds, dc, hbuf, ybuf, iw, act, asc, nthr, O_SORTED + 2 * n * K,
                             O_SORTED + 2 * n * K + E + 1, gqf, dqf, o_sched)
            else:
                fma_body(gq, gs, dq, ds, x, hbuf, ybuf, iw, n, gqf, gc, act, asc, dqf, dc, nthr, o_sched)
        else:
            fma_body(gq, gs, dq, ds, x, hbuf, ybuf, iw, n, gqf, gc, act, asc, dqf, dc, nthr, o_sched)
        if not STOP_EARLY or not many:    # (a probe that stopped the prefill path skips the sum)
            weighted_sum(tw, y, ybuf, iw, n)

    @T.macro
    def moe_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, ybuf, iw, act, asc, n, nthr, gqf, dqf):
        if DECODE != "phased":
            if n == 1:
                decode1_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, iw, nthr, gqf, dqf)
            else:
                phased_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, ybuf, iw, act, asc, n, nthr, gqf, dqf)
        else:
            phased_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, ybuf, iw, act, asc, n, nthr, gqf, dqf)

    # ---- the PrimFunc ---------------------------------------------------------------------------
    if fmt == "int4":
        wdt, gq_k, dq_k = "uint8", H // 2, I // 2
    elif fmt == "int8":
        wdt, gq_k, dq_k = "int8", H, I
    else:
        wdt, gq_k, dq_k = fmt, H, I
    WALIGN = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2}.get(wdt, 4)
    i64 = T.int64
    gu_shape = (i64(E), i64(2 * I), i64(gq_k))
    dn_shape = (i64(E), i64(H), i64(dq_k))
    if quant:
        gs_shape = (i64(E), i64(2 * I), i64(H // G))
        ds_shape = (i64(E), i64(H), i64(I // G))

        @T.prim_func
        def moe(x_h: T.handle, tw_h: T.handle, ids_h: T.handle, gq_h: T.handle, gs_h: T.handle, gc_h: T.handle,
                dq_h: T.handle, ds_h: T.handle, dc_h: T.handle, y_h: T.handle, hb_h: T.handle, yb_h: T.handle,
                iw_h: T.handle, act_h: T.handle, asc_h: T.handle, nthr: T.int32):
            T.func_attr({"global_symbol": symbol, "tir.noalias": True})
            n = T.int32()
            x = T.match_buffer(x_h, (n, H), "float32", align=4)
            tw = T.match_buffer(tw_h, (n, K), "float32", align=4)
            ids = T.match_buffer(ids_h, (n, K), "int32", align=4)
            gq = T.match_buffer(gq_h, gu_shape, wdt, align=WALIGN)
            gs = T.match_buffer(gs_h, gs_shape, "float32", align=4)
            gc = T.match_buffer(gc_h, (i64(E), i64(2 * I)), "float32", align=4)
            dq = T.match_buffer(dq_h, dn_shape, wdt, align=WALIGN)
            ds = T.match_buffer(ds_h, ds_shape, "float32", align=4)
            dc = T.match_buffer(dc_h, (i64(E), i64(H)), "float32", align=4)
            y = T.match_buffer(y_h, (n, H), "float32", align=4)
            hb1 = T.match_buffer(hb_h, (ssize("hbuf", n),), "float32", align=4)
            yb1 = T.match_buffer(yb_h, (ssize("ybuf", n),), "float32", align=4)
            iw = T.match_buffer(iw_h, (ssize("iwork", n),), "int32", align=4)
            act = T.match_buffer(act_h, (ssize("act", n),), "uint8", align=1)
            asc = T.match_buffer(asc_h, (ssize("asc", n),), "float32", align=4)
            hbuf = T.decl_buffer((n * K, I), "float32", data=hb1.data)
            ybuf = T.decl_buffer((n * K, H), "float32", data=yb1.data)
            gqf = T.decl_buffer((i64(E * 2 * I * gq_k),), wdt, data=gq.data)
            dqf = T.decl_buffer((i64(E * H * dq_k),), wdt, data=dq.data)
            moe_body(x, tw, ids, gq, gs, gc, dq, ds, dc, y, hbuf, ybuf, iw, act, asc, n, nthr, gqf, dqf)
    else:
        @T.prim_func
        def moe(x_h: T.handle, tw_h: T.handle, ids_h: T.handle, gq_h: T.handle, dq_h: T.handle,
                y_h: T.handle, hb_h: T.handle, yb_h: T.handle, iw_h: T.handle, act_h: T.handle, asc_h: T.handle,
                nthr: T.int32):
            T.func_attr({"global_symbol": symbol, "tir.noalias": True})
            n = T.int32()
            x = T.match_buffer(x_h, (n, H), "float32", align=4)
            tw = T.match_buffer(tw_h, (n, K), "float32", align=4)
            ids = T.match_buffer(ids_h, (n, K), "int32", align=4)
            gq = T.match_buffer(gq_h, gu_shape, wdt, align=WALIGN)
            dq = T.match_buffer(dq_h, dn_shape, wdt, align=WALIGN)
            y = T.match_buffer(y_h, (n, H), "float32", align=4)
            hb1 = T.match_buffer(hb_h, (ssize("hbuf", n),), "float32", align=4)
            yb1 = T.match_buffer(yb_h, (ssize("ybuf", n),), "float32", align=4)
            iw = T.match_buffer(iw_h, (ssize("iwork", n),), "int32", align=4)
            act = T.match_buffer(act_h, (ssize("act", n),), "uint8", align=1)
            asc = T.match_buffer(asc_h, (ssize("asc", n),), "float32", align=4)
            hbuf = T.decl_buffer((n * K, I), "float32", data=hb1.data)
            ybuf = T.decl_buffer((n * K, H), "float32", data=yb1.data)
            moe_body(x, tw, ids, gq, None, None, dq, None, None, y, hbuf, ybuf, iw, act, asc, n, nthr, None, None)

    return moe
