"""Choosing the next token on the device: greedy argmax, and temperature / top-k / top-p sampling.

    argmax(logits [B, V]) -> ids [B] int64
Pass 1: one program per (row, block of V) writes its block's max and the lowest index that
holds it; pass 2: one program per row reduces the blocks (ties go to the lowest index, as
torch.argmax does).

    sample(logits [B, V], temperature, top_k, top_p, seed, step) -> ids [B] int64, on the device
The support is that of runtime/sampling.py (filter_logits): x = logits / T (float32, rounded as
torch rounds it), keep x >= the k-th largest x, then keep the tokens whose more likely tokens hold
less than top_p of the top-k-filtered softmax (the most likely token always stays). Both rules keep
every token at or above a threshold value, so each is found by a radix select on order-preserving
int32 keys of x, 8 bits (256 bins) per level, 4 levels, no sort and no host synchronisation:
  - top-k: per level one pass over the row; each program histograms the digit of the tokens whose
    key matches the prefix chosen so far (a local tl.histogram, then one atomic per non-empty
    bin). The next pass's programs choose the bin holding the k-th largest from those counts.
    A level whose chosen bin is taken whole ends the select (the later passes return at once).
  - top-p: the same descent over histograms of probability mass exp(x - max) of the tokens the
    top-k kept, in 2**-40 fixed point (int64 atomics: integer sums do not depend on the order
    the atomics land in, so the threshold, and with it the token, is deterministic); the chosen
    bin is the lowest whose higher bins hold less than top_p of the total.
  - draw: Gumbel-max, argmax over kept tokens of x - log(-log(u)) with u = tl.rand(seed, (step,
    row * V + token)) (an exact draw from the renormalised softmax over the kept tokens), as the
    argmax's two passes.
No launch reads the result of one of its own programs: a program recomputes the thresholds from
the histograms earlier launches completed (at most 8 scans of 256 bins, cheap beside its block).
Launches per call: 2 (temperature only), 6 (+ top-k), 7 (+ top-p), 10 (both), plus a memset of
the histograms when filtering. Draw programs whose block holds no kept token skip the Philox rounds.

Ties: every token equal to the k-th largest value is kept (as filter_logits does); tokens tied
at the top-p boundary are all kept (a sort would keep some of them: either is a valid support).
Near the top-p boundary the mass sums are rounded differently from torch's float32 cumsum, so a
token whose preceding mass lies within ~1e-6 of top_p may be kept by one and dropped by the other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def argmax_blocks_kernel(x_ptr, val_ptr, idx_ptr, vocab, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    nblk = tl.num_programs(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    best = tl.max(x, axis=0)
    idx = tl.min(tl.where(x == best, cols, vocab), axis=0)
    tl.store(val_ptr + row * nblk + blk, best)
    tl.store(idx_ptr + row * nblk + blk, idx)


@triton.jit
def argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, nblk, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK)
    mask = b < nblk
    v = tl.load(val_ptr + row * nblk + b, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * nblk + b, mask=mask, other=vocab)
    best = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == best, i, vocab), axis=0).to(tl.int64))


# -- sampling --------------------------------------------------------------------------------
# Histogram layout per row: [2 (counts, masses), LEVELS, BINS] int64.
BINS = tl.constexpr(256)
LEVELS = tl.constexpr(4)
FIXED_ONE = tl.constexpr(1099511627776.0)    # 2**40: the fixed-point unit of the mass histograms
KEY_MIN = tl.constexpr(-2147483648)          # below every key: "no threshold"
U_MIN = tl.constexpr(2.3283064e-10)          # tl.rand can return 0; log(0) would make a kept token -inf


@triton.jit
def _keys(x_ptr, row, cols, vocab, x_stride, temperature):
    """x = logits / temperature (float32, correctly rounded like torch's division) and its int32
    key, ordered as x is (signed compare); -inf where cols >= vocab."""
    mask = cols < vocab
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.math.div_rn(x, temperature)
    x = tl.where(x == 0.0, 0.0, x)                   # -0.0 == 0.0 must get one key
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)         # negative floats: reverse their order
    return tl.where(mask, x, float("-inf")), key, mask


@triton.jit
def _level_digit(key, level, prefix):
    """The level's 8-bit digit of each key, 0..255 in key order (level 0 holds the sign), and whether
    the key's top 8 * level bits are `prefix` (every key at level 0)."""
    if level == 0:
        d = (key >> 24) + 128
        m = key == key
    else:
        d = (key >> (24 - 8 * level)) & 255
        m = (key >> (32 - 8 * level)) == prefix
    return d, m


@triton.jit
def _topk_state(h_ptr, levels, k):
    """The top-k select after `levels` levels, from the count histograms at h_ptr: (prefix of the
    bin holding the k-th largest key, threshold key, done). Keys >= the threshold are the top-k
    (with every tie of the k-th) once done or levels == LEVELS; done: the chosen bin was taken
    whole, so no finer level is needed."""
    bins = tl.arange(0, BINS)
    prefix = tl.zeros((), tl.int32)
    thr = tl.full((), KEY_MIN, tl.int32)
    need = k.to(tl.int64)
    done = tl.zeros((), tl.int32)
    for lvl in range(0, levels):
        if done == 0:
            h = tl.load(h_ptr + lvl * BINS + bins)
            incl = tl.cumsum(h, 0, reverse=True)                  # tokens in bins >= b
            b = tl.max(tl.where(incl >= need, bins, -1), 0)
            sel = bins == b
            cnt = tl.sum(tl.where(sel, h, 0), 0)
            need = need - (tl.sum(tl.where(sel, incl, 0), 0) - cnt)
            prefix = tl.where(lvl == 0, b - 128, (prefix << 8) | b)
            thr = prefix << (24 - 8 * lvl)
            done = (cnt == need).to(tl.int32)
    return prefix, thr, done


@triton.jit
def _topp_state(h_ptr, levels, top_p):
    """The top-p select after `levels` levels, from the mass histograms at h_ptr: (prefix, threshold
    key; valid once levels == LEVELS). Keeps the tokens whose strictly larger tokens hold less than
    top_p of the total mass."""
    bins = tl.arange(0, BINS)
    total = tl.sum(tl.load(h_ptr + bins), 0)
    target = tl.maximum((total.to(tl.float64) * top_p).to(tl.int64), 1)
    prefix = tl.zeros((), tl.int32)
    thr = tl.full((), KEY_MIN, tl.int32)
    for lvl in range(0, levels):
        h = tl.load(h_ptr + lvl * BINS + bins)
        above = tl.cumsum(h, 0, reverse=True) - h                # mass in bins > b
        b = tl.min(tl.where(above < target, bins, BINS), 0)      # the lowest bin still inside
        target = target - tl.sum(tl.where(bins == b, above, 0), 0)
        prefix = tl.where(lvl == 0, b - 128, (prefix << 8) | b)
        thr = prefix << (24 - 8 * lvl)
    return prefix, thr


@triton.jit(do_not_specialize=["top_k", "level"])
def sample_count_kernel(x_ptr, bmax_ptr, hist_ptr, vocab, x_stride, nblk, temperature, top_k, level,
                        BLOCK: tl.constexpr):
    """Top-k level `level` (grid [B, nblk]): count the digits of the keys inside the prefix chosen
    so far. Level 0 also writes each block's max of x (for the softmax of the top-p passes) and
    histograms only when top_k > 0."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    h_row = hist_ptr + row * (2 * LEVELS * BINS)
    prefix, thr, done = _topk_state(h_row, level, top_k)
    if done != 0:
        return
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x, key, mask = _keys(x_ptr, row, cols, vocab, x_stride, temperature)
    if level == 0:
        tl.store(bmax_ptr + row * nblk + blk, tl.max(x, 0))
    if top_k > 0:
        digit, match = _level_digit(key, level, prefix)
        match = match & mask
        h = tl.histogram(tl.where(match, digit, 0), BINS)
        bins = tl.arange(0, BINS)
        h = h - tl.where(bins == 0, BLOCK - tl.sum(match.to(tl.int32), 0), 0)    # the lanes sent to bin 0
        tl.atomic_add(h_row + level * BINS + bins, h.to(tl.int64), mask=h > 0, sem="relaxed")


@triton.jit(do_not_specialize=["top_k", "level"])
def sample_mass_kernel(x_ptr, bmax_ptr, hist_ptr, vocab, x_stride, nblk, temperature, top_k, top_p, level,
                       BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """Top-p level `level` (grid [B, nblk]): add the fixed-point softmax mass exp(x - max) of the
    top-k-kept keys inside the prefix chosen so far to their digit's bin."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    h_row = hist_ptr + row * (2 * LEVELS * BINS)
    kthr = tl.full((), KEY_MIN, tl.int32)
    if top_k > 0:
        _, kthr, _ = _topk_state(h_row, LEVELS, top_k)
    prefix, _ = _topp_state(h_row + LEVELS * BINS, level, top_p)
    b = tl.arange(0, BLOCK_B)
    xmax = tl.max(tl.load(bmax_ptr + row * nblk + b, mask=b < nblk, other=float("-inf")), 0)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x, key, mask = _keys(x_ptr, row, cols, vocab, x_stride, temperature)
    w = (tl.exp(x - xmax) * FIXED_ONE).to(tl.int64)
    digit, match = _level_digit(key, level, prefix)
    match = match & mask & (key >= kthr) & (w > 0)
    tl.atomic_add(h_row + (LEVELS + level) * BINS + digit, w, mask=match, sem="relaxed")


@triton.jit(do_not_specialize=["top_k", "seed", "step"])
def sample_draw_kernel(x_ptr, hist_ptr, val_ptr, idx_ptr, thr_ptr, vocab, x_stride, nblk, temperature, top_k, top_p,
                       seed, step, BLOCK: tl.constexpr):
    """Gumbel-max over the kept tokens (grid [B, nblk]): each block's best x - log(-log(u)) and the
    lowest index holding it; argmax_reduce_kernel then picks the row's token. The row's threshold
    key goes to thr_ptr (kept_mask() reads it)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    h_row = hist_ptr + row * (2 * LEVELS * BINS)
    thr = tl.full((), KEY_MIN, tl.int32)
    if top_k > 0:
        _, kthr, _ = _topk_state(h_row, LEVELS, top_k)
        thr = tl.maximum(thr, kthr)
    if top_p < 1.0:
        _, pthr = _topp_state(h_row + LEVELS * BINS, LEVELS, top_p)
        thr = tl.maximum(thr, pthr)
    if blk == 0:
        tl.store(thr_ptr + row, thr)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x, key, mask = _keys(x_ptr, row, cols, vocab, x_stride, temperature)
    kept = mask & (key >= thr)
    if tl.max(kept.to(tl.int32), 0) == 0:        # most blocks under a small top-k: skip the Philox rounds
        tl.store(val_ptr + row * nblk + blk, float("-inf"))
        tl.store(idx_ptr + row * nblk + blk, vocab)
        return
    offset = (step.to(tl.int64) << 32) + row * vocab + cols      # Philox counter: (row, token) low, step high
    u = tl.maximum(tl.rand(seed, offset), U_MIN)
    score = tl.maximum(x - tl.log(-tl.log(u)), -3.0e38)           # finite for every kept token
    score = tl.where(kept, score, float("-inf"))
    best = tl.max(score, 0)
    tl.store(val_ptr + row * nblk + blk, best)
    tl.store(idx_ptr + row * nblk + blk, tl.min(tl.where(score == best, cols, vocab), 0))


KERNELS = {"argmax_blocks_kernel": argmax_blocks_kernel, "argmax_reduce_kernel": argmax_reduce_kernel,
           "sample_count_kernel": sample_count_kernel, "sample_mass_kernel": sample_mass_kernel,
           "sample_draw_kernel": sample_draw_kernel}


def default_config(vocab: int) -> dict:
    return {"BLOCK": 4096 if vocab >= 4096 else triton.next_power_of_2(vocab), "num_warps": 8 if vocab >= 4096 else 1}


def sample_config(batch: int, vocab: int) -> dict:
    """Block size and warps of the sampling passes: with few rows, smaller blocks give more programs
    (at V = 152K: 75 programs per row below 4 rows, else 38). Untuned."""
    if vocab >= 8192:
        return {"BLOCK": 2048 if batch < 4 else 4096, "num_warps": 8}
    return {"BLOCK": max(256, triton.next_power_of_2(vocab)), "num_warps": 4}


def argmax(logits: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    b, vocab = logits.shape
    cfg = config or default_config(vocab)
    nblk = triton.cdiv(vocab, cfg["BLOCK"])
    vals = torch.empty(b, nblk, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b, nblk, dtype=torch.int32, device=logits.device)
    argmax_blocks_kernel[(b, nblk)](logits, vals, idx, vocab, logits.stride(0), BLOCK=cfg["BLOCK"],
                                    num_warps=cfg["num_warps"])
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    argmax_reduce_kernel[(b,)](vals, idx, out, nblk, vocab, BLOCK=triton.next_power_of_2(nblk), num_warps=1)
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           step: int = 0, config: dict | None = None) -> torch.Tensor:
    """Token ids [B] int64 drawn from softmax(logits [B, V] / temperature) restricted to the top_k (0: off)
    / top_p (1.0: off) support, on the logits' device, without a host synchronisation.

    The draw is a function of (seed, step, row, logits): the same arguments give the same tokens.
    Use a new `step` (or seed) per token. seed and step are taken modulo 2**31."""
    return _sample(logits, temperature, top_k, top_p, seed, step, config)[0]


def kept_mask(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
              config: dict | None = None) -> torch.Tensor:
    """bool [B, V]: the tokens sample() may draw with these options (its support), for tests and
    debugging; the threshold comes from the very launches sample() makes."""
    return _kept(logits, temperature, _sample(logits, temperature, top_k, top_p, 0, 0, config)[1])


def _kept(logits: torch.Tensor, temperature: float, thr: torch.Tensor) -> torch.Tensor:
    """bool [B, V]: the keys of logits / temperature (as _keys computes them) >= the threshold keys thr [B]."""
    # a tensor divisor: CUDA torch multiplies by the reciprocal of a Python scalar (not div_rn's rounding)
    x = logits.to(torch.float32) / torch.full((), float(temperature), dtype=torch.float32, device=logits.device)
    bits = torch.where(x == 0.0, 0.0, x).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >= thr[:, None]


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, step: int,
            config: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, threshold key [B] int32): the launches of sample()."""
    b, vocab = logits.shape
    if not temperature > 0.0:
        raise ValueError(f"sample() needs temperature > 0 (use argmax for greedy), got {temperature}")
    if logits.stride(1) != 1:
        raise ValueError("sample() needs logits with unit stride along the vocabulary")
    if b * vocab >= 2**31:
        raise ValueError(f"sample(): {b} x {vocab} logits exceed the 2**31 tokens one Philox stream numbers")
    cfg = config or sample_config(b, vocab)
    block, warps = cfg["BLOCK"], cfg["num_warps"]
    nblk = triton.cdiv(vocab, block)
    k = int(top_k) if 0 < top_k < vocab else 0
    p = float(top_p) if top_p < 1.0 else 1.0
    dev = logits.device
    hist = torch.zeros(b, 2, 4, 256, dtype=torch.int64, device=dev) if (k or p < 1.0) else \
        torch.empty(1, dtype=torch.int64, device=dev)
    bmax = torch.empty(b, nblk, dtype=torch.float32, device=dev)
    args = (logits, bmax, hist, vocab, logits.stride(0), nblk, float(temperature))
    grid = (b, nblk)
    if k or p < 1.0:
        for level in range(4 if k else 1):       # level 0 also writes the block maxima the top-p passes need
            sample_count_kernel[grid](*args, k, level, BLOCK=block, num_warps=warps)
    if p < 1.0:
        for level in range(4):
            sample_mass_kernel[grid](*args, k, p, level, BLOCK=block, BLOCK_B=triton.next_power_of_2(nblk),
                                     num_warps=warps)
    vals = torch.empty(b, nblk, dtype=torch.float32, device=dev)
    idx = torch.empty(b, nblk, dtype=torch.int32, device=dev)
    thr = torch.empty(b, dtype=torch.int32, device=dev)
    sample_draw_kernel[grid](logits, hist, vals, idx, thr, vocab, logits.stride(0), nblk, float(temperature), k, p,
                             int(seed) % 2**31, int(step) % 2**31, BLOCK=block, num_warps=warps)
    out = torch.empty(b, dtype=torch.int64, device=dev)
    argmax_reduce_kernel[(b,)](vals, idx, out, nblk, vocab, BLOCK=triton.next_power_of_2(nblk), num_warps=1)
    return out, thr
