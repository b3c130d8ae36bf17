"""Router: scores (softmax or sigmoid of float32 logits) + grouped top-k, one program per token.

The logits come from matmul.linear with a float32 output. The kernel holds a token's E
scores as an [n_group, E / n_group] tile (padded to powers of two, so DeepSeek-V2's 160
experts in 8 groups of 20 work too), optionally adds the selection bias, keeps the
topk_group best groups (group score = max, or sum of the top 2 for noaux_tc), then picks the
top_k experts (ties go to the lowest id): up to 128 (padded) experts by ranking them all in one
comparison tile, more by repeated argmax. Weights are the unbiased
scores of the chosen experts, optionally renormalised and scaled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


@triton.jit
def _route(logits_ptr, bias_ptr, w_ptr, ids_ptr, t, num_experts, scaling,
           TOP_K: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
           TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr, METHOD: tl.constexpr,
           HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr,
           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, VOLATILE: tl.constexpr):
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_E)[None, :]
    valid = (g < N_GROUP) & (j < GROUP_SIZE)
    e = g * GROUP_SIZE + j
    x = tl.load(logits_ptr + t * num_experts + e, mask=valid, other=float("-inf"), volatile=VOLATILE)
    x = x.to(tl.float32)
    if SIGMOID:
        scores = tl.where(valid, tl.sigmoid(x), 0.0)
    else:
        mx = tl.max(tl.max(x, axis=1), axis=0)
        ex = tl.where(valid, tl.exp(x - mx), 0.0)
        scores = ex / tl.sum(tl.sum(ex, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    big: tl.constexpr = BLOCK_G * BLOCK_E
    if METHOD != 0:
        top1 = tl.max(choice, axis=1)
        if METHOD == 1:
            gscore = top1
        else:
            first = tl.min(tl.where(choice == top1[:, None], j, big), axis=1)
            top2 = tl.max(tl.where(j == first[:, None], float("-inf"), choice), axis=1)
            gscore = top1 + tl.where(top2 == float("-inf"), 0.0, top2)
        gi = tl.arange(0, BLOCK_G)
        gscore = tl.where(gi < N_GROUP, gscore, float("-inf"))
        keep = gi < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, axis=0)
            pick = tl.min(tl.where(gscore == best, gi, BLOCK_G), axis=0)
            keep = keep | (gi == pick)
            gscore = tl.where(gi == pick, float("-inf"), gscore)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    if big <= 128:
        # rank of every expert (how many beat it; ties go to the lower id) in one reduction: the
        # top_k are the ranks below top_k, each stored at its rank (no top_k serial argmax rounds)
        p = tl.arange(0, big)
        flat = tl.reshape(choice, (big,))
        beats = (flat[None, :] > flat[:, None]) | ((flat[None, :] == flat[:, None]) & (p[None, :] < p[:, None]))
        rank = tl.sum(beats.to(tl.int32), axis=1)
        sel = rank < TOP_K
        wsel = tl.where(sel, tl.reshape(scores, (big,)), 0.0)
        if NORM:
            wsel = wsel / (tl.sum(wsel, axis=0) + 1e-20)
        wsel = wsel * scaling
        tl.store(w_ptr + t * TOP_K + rank, wsel, mask=sel)
        tl.store(ids_ptr + t * TOP_K + rank, tl.reshape(e, (big,)), mask=sel)
        return
    kk = tl.arange(0, BLOCK_K)
    wvec = tl.zeros((BLOCK_K,), tl.float32)
    idvec = tl.zeros((BLOCK_K,), tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == best, e, big), axis=1), axis=0)
        w = tl.sum(tl.sum(tl.where(e == pick, scores, 0.0), axis=1), axis=0)
        wvec = tl.where(kk == k, w, wvec)
        idvec = tl.where(kk == k, pick, idvec)
        choice = tl.where(e == pick, float("-inf"), choice)
    if NORM:
        wvec = wvec / (tl.sum(wvec, axis=0) + 1e-20)
    wvec = wvec * scaling
    tl.store(w_ptr + t * TOP_K + kk, wvec, mask=kk < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kk, idvec, mask=kk < TOP_K)


@triton.jit
def router_topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, num_experts, scaling,
                       TOP_K: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr, METHOD: tl.constexpr,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _route(logits_ptr, bias_ptr, w_ptr, ids_ptr, t, num_experts, scaling, TOP_K, N_GROUP, GROUP_SIZE, TOPK_GROUP,
           SIGMOID, METHOD, HAS_BIAS, NORM, BLOCK_G, BLOCK_E, BLOCK_K, False)


@triton.jit
def router_fused_kernel(x_ptr, gate_ptr, logits_ptr, count_ptr, bias_ptr, w_ptr, ids_ptr, hidden, num_experts,
                        x_stride, scaling,
                        TOP_K: tl.constexpr, N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr, METHOD: tl.constexpr,
                        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token, expert block): ROWS float32 logits of the token; the token's last program to
    finish (a per-token arrival counter, reset by it for the next launch) then routes the token."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    rmask = rows < num_experts
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((ROWS,), tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        hh = h0 + offs_h
        hmask = hh < hidden
        xv = tl.load(x_ptr + t * x_stride + hh, mask=hmask, other=0.0).to(tl.float32)[None, :]
        w = tl.load(gate_ptr + rows.to(tl.int64)[:, None] * hidden + hh[None, :], mask=rmask[:, None] & hmask[None, :],
                    other=0.0)
        acc += tl.sum(w.to(tl.float32) * xv, axis=1)
    tl.store(logits_ptr + t * num_experts + rows, acc, mask=rmask)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + t, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        tl.store(count_ptr + t, 0)
        _route(logits_ptr, bias_ptr, w_ptr, ids_ptr, t, num_experts, scaling, TOP_K, N_GROUP, GROUP_SIZE,
               TOPK_GROUP, SIGMOID, METHOD, HAS_BIAS, NORM, BLOCK_G, BLOCK_E, BLOCK_K, True)


KERNELS = {"router_topk_kernel": router_topk_kernel, "router_fused_kernel": router_fused_kernel}
FUSED_TOKENS = 16         # steps with at most this many tokens use router_fused (one launch)
_COUNTERS: dict = {}


def _counter(device: torch.device, t: int) -> torch.Tensor:
    """A zeroed int32 arrival counter per token, kept per device (every launch leaves it zeroed)."""
    key = str(device)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < t:
        c = _COUNTERS[key] = torch.zeros(max(t, FUSED_TOKENS), dtype=torch.int32, device=device)
    return c


def default_config(num_experts: int, n_group: int) -> dict:
    return {"num_warps": 4 if num_experts > 64 else 1, "num_stages": 1}


def _consts(attrs: dict, e: int) -> dict:
    k = int(attrs["top_k"])
    method = METHODS[attrs["topk_method"]]
    n_group = int(attrs["n_group"]) if method else 1
    topk_group = int(attrs["topk_group"]) if method else 1
    return dict(TOP_K=k, N_GROUP=n_group, GROUP_SIZE=e // n_group, TOPK_GROUP=topk_group,
                SIGMOID=attrs["scoring"] == "sigmoid", METHOD=method, NORM=bool(attrs.get("norm_topk_prob")),
                BLOCK_G=triton.next_power_of_2(n_group), BLOCK_E=triton.next_power_of_2(e // n_group),
                BLOCK_K=triton.next_power_of_2(k))


def fused_config(num_experts: int, hidden: int) -> dict:
    """2 experts a program and the whole hidden row in one step (in-graph sweep on an H100)."""
    return {"ROWS": 2, "BLOCK_H": min(2048, triton.next_power_of_2(hidden)), "num_warps": 4}


def router_fused(x: torch.Tensor, gate: torch.Tensor, attrs: dict, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (T <= FUSED_TOKENS), gate [E, H] -> (weights [T, K] float32, ids [T, K] int32): the
    router's logits GEMV and its top-k in one launch."""
    t, h = x.shape
    e = gate.shape[0]
    c = _consts(attrs, e)
    cfg = config or fused_config(e, h)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = torch.empty(t, c["TOP_K"], dtype=torch.float32, device=x.device)
    ids = torch.empty(t, c["TOP_K"], dtype=torch.int32, device=x.device)
    logits = torch.empty(t, e, dtype=torch.float32, device=x.device)
    factor = attrs.get("routed_scaling_factor")
    router_fused_kernel[(t, triton.cdiv(e, cfg["ROWS"]))](
        x, gate, logits, _counter(x.device, t), logits if bias is None else bias, w, ids, h, e, x.stride(0),
        float(1.0 if factor is None else factor), HAS_BIAS=bias is not None, ROWS=cfg["ROWS"],
        BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"], **c)
    return w, ids


def router_topk(logits: torch.Tensor, attrs: dict, bias: torch.Tensor | None = None,
                config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (weights [T, K] float32, ids [T, K] int32)."""
    t, e = logits.shape
    k = int(attrs["top_k"])
    method = METHODS[attrs["topk_method"]]
    n_group = int(attrs["n_group"]) if method else 1
    topk_group = int(attrs["topk_group"]) if method else 1
    cfg = config or default_config(e, n_group)
    w = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int32, device=logits.device)
    factor = attrs.get("routed_scaling_factor")
    router_topk_kernel[(t,)](
        logits, logits if bias is None else bias, w, ids, e, float(1.0 if factor is None else factor),
        TOP_K=k, N_GROUP=n_group, GROUP_SIZE=e // n_group, TOPK_GROUP=topk_group,
        SIGMOID=attrs["scoring"] == "sigmoid", METHOD=method, HAS_BIAS=bias is not None,
        NORM=bool(attrs.get("norm_topk_prob")), BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_E=triton.next_power_of_2(e // n_group), BLOCK_K=triton.next_power_of_2(k),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return w, ids
