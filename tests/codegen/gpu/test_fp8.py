"""fp8 (e4m3) kernels against float64 references: matmul.linear_fp8 (--gpu-dense-quant fp8), moe.fused_moe on
fp8 experts (--gpu-quant fp8), and the packer moe.pack_fp8 they read. Both products are weight-only
(w8a16) at decode and w8a8 (activations quantized per row and group first, quant_fp8) from their W8A8_MIN_*
rows / tokens on; the w8a8 references quantize the activations the same way (fake_quant_rows).

Without a GPU the kernels run in Triton's interpreter (conftest), which loads float8_e4m3fn CPU tensors
and converts them; activations are float16 / float32 (it multiplies bf16 wrongly), shapes tiny and odd.
The references multiply by the dequantized weight (unpack_fp8), so what is checked is the kernels'
arithmetic; the packer's error is checked on its own (a property test). Ahead-of-time builds: test_aot.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktc.codegen.gpu import matmul, moe

from .test_kernels import DEV, DOT32, GEMV_Q, HAS_CUDA, moe_ref, rel

FP8 = torch.float8_e4m3fn


def rnd(*shape, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def packed(shape: tuple[int, ...], group: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(pack_fp8 parts on DEV, the float64 weight they stand for)."""
    parts = moe.pack_fp8(rnd(*shape, seed=seed, scale=0.2).float(), group)
    deq = moe.unpack_fp8(parts["qweight"], parts["scales"]).double()
    return {p: t.to(DEV) for p, t in parts.items()}, deq


def cfg(bm: int, bn: int, bk: int, group_m: int = 2) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": 4, "num_stages": 1}


# -- the packer --------------------------------------------------------------------------------------
def test_pack_fp8_layout_and_round_trip():
    w = rnd(3, 5, 96, seed=1).float()
    w[0, 0, :32] = 0.0                                   # an all-zero group: scale 0, values 0
    parts = moe.pack_fp8(w, 32)
    assert parts["qweight"].shape == (3, 5, 96) and parts["qweight"].dtype == FP8
    assert parts["scales"].shape == (3, 5, 3) and parts["scales"].dtype == torch.float32
    assert float(parts["scales"][0, 0, 0]) == 0.0 and not parts["qweight"][0, 0, :32].float().any()
    q = parts["qweight"].float()
    assert q.abs().amax() <= 448 and torch.isfinite(q).all()
    # every non-zero group uses the full e4m3 range: its largest value is +-448 exactly
    assert torch.equal(q.reshape(3, 5, 3, 32).abs().amax(-1)[parts["scales"] > 0],
                       torch.full_like(parts["scales"][parts["scales"] > 0], 448.0))
    deq = moe.unpack_fp8(parts["qweight"], parts["scales"])
    assert rel(deq, w) < 0.04                            # e4m3: 3 mantissa bits
    again = moe.pack_fp8(deq, 32)                        # the dequantized weight packs to itself
    assert torch.equal(again["qweight"].float(), q) and torch.allclose(again["scales"], parts["scales"])


def test_pack_fp8_refuses_a_group_that_does_not_divide_k():
    with pytest.raises(ValueError, match="does not divide K=48"):
        moe.pack_fp8(torch.ones(2, 48), 32)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), groups=st.integers(1, 3), group=st.sampled_from([16, 32]),
       data=st.data())
def test_pack_fp8_error_is_bounded_by_e4m3_rounding(rows, groups, group, data):
    """|dequant - w| <= |w| / 16 (round to nearest with 3 mantissa bits) + scale / 1024 (half the smallest
    subnormal step, for values below e4m3's normal range), plus float32 slack."""
    values = st.one_of(st.just(0.0), st.floats(1e-6, 1e4), st.floats(-1e4, -1e-6))
    flat = data.draw(st.lists(values, min_size=rows * groups * group, max_size=rows * groups * group))
    w = torch.tensor(flat, dtype=torch.float32).reshape(rows, groups * group)
    parts = moe.pack_fp8(w, group)
    deq = moe.unpack_fp8(parts["qweight"], parts["scales"])
    scale = parts["scales"].repeat_interleave(group, dim=-1)
    bound = w.abs() / 16 + scale / 1024
    assert ((deq - w).abs() <= bound * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(parts["scales"], w.reshape(rows, groups, group).abs().amax(-1) / 448)


# -- the linear -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k,group,block_k,bias,dtype", [
    (1, 40, 96, 32, 32, True, torch.float16),        # decode row, step = group (scale after the dot), 3 groups
    (1, 24, 128, 128, 64, False, torch.float32),     # step inside a group
    (3, 33, 128, 64, 128, True, torch.float32),      # step = two groups (every value scaled before the dot)
    (5, 17, 64, 32, 256, False, torch.float16),      # step past K (masked), several groups
    (19, 24, 192, 64, 128, True, torch.float16),     # two M blocks, GROUP_M ordering, a K step past K
])
def test_linear_fp8_matches_float64(m, n, k, group, block_k, bias, dtype):
    w, deq = packed((n, k), group, seed=m + n + k)
    x = rnd(m, k, seed=1).to(dtype)
    b = rnd(n, seed=2, scale=0.5).to(dtype) if bias else None
    ref = x.double() @ deq.T + (b.double() if bias else 0)
    y = matmul.linear_fp8(x.to(DEV), w["qweight"], w["scales"], None if b is None else b.to(DEV),
                          cfg(16, 16, block_k), out_dtype=torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # within a group the fp8 values are exact in the activation dtype; across groups the scaled weight is
    # rounded to it before the dot
    assert rel(y, ref) < (DOT32 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("m,n,k,group,block_k,block_n,bias,dtype", [
    (1, 40, 96, 32, 32, 4, True, torch.float16),      # a step = one group, 3 groups
    (1, 21, 256, 16, 128, 8, False, torch.float32),   # 8 groups a step, N not a multiple of BLOCK_N
    (2, 24, 384, 128, 512, 4, True, torch.float32),   # two rows, a step past K (masked groups)
    (2, 9, 128, 128, 64, 2, False, torch.float16),    # a step below the group: the kernel takes one group
])
def test_gemv_fp8_matches_float64(m, n, k, group, block_k, block_n, bias, dtype):
    """The decode GEMV (matmul.gemv_grouped_kernel, FP8): float32 products, scaled once per group."""
    w, deq = packed((n, k), group, seed=m + n + k)
    x = rnd(m, k, seed=1).to(dtype)
    b = rnd(n, seed=2, scale=0.5).to(dtype) if bias else None
    ref = x.double() @ deq.T + (b.double() if bias else 0)
    gemv = {"GEMV": 1, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4}
    y = matmul.linear_fp8(x.to(DEV), w["qweight"], w["scales"], None if b is None else b.to(DEV), gemv,
                          out_dtype=torch.float32)
    assert y.shape == (m, n) and rel(y, ref) < 1e-5
    x3 = rnd(3, k, seed=3).to(dtype)          # a GEMV config meeting more rows than it serves runs the tiles
    y3 = matmul.linear_fp8(x3.to(DEV), w["qweight"], w["scales"], config=gemv, out_dtype=torch.float32)
    assert rel(y3, x3.double() @ deq.T) < (DOT32 if dtype == torch.float32 else 2e-3)


def test_linear_fp8_default_configs_and_leading_dims():
    w, deq = packed((48, 256), 128, seed=7)
    for shape in ((1, 1, 256), (2, 11, 256)):          # decode (M <= 16) and prefill default configs
        x = rnd(*shape, seed=8).half()
        y = matmul.linear_fp8(x.to(DEV), w["qweight"], w["scales"])
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float16
        assert rel(y, x.double() @ deq.T) < 2e-3
    out = torch.empty(3, 48, dtype=torch.float32, device=DEV)
    x = rnd(3, 256, seed=9).float().to(DEV)
    assert matmul.linear_fp8(x, w["qweight"], w["scales"], out=out).data_ptr() == out.data_ptr()
    assert rel(out, x.double().cpu() @ deq.T) < DOT32


def test_linear_fp8_refuses_mismatched_parts():
    w, _ = packed((16, 64), 32, seed=3)
    with pytest.raises(ValueError, match="do not fit K=128"):
        matmul.linear_fp8(torch.zeros(1, 128, device=DEV), w["qweight"], w["scales"])
    with pytest.raises(ValueError, match="not float8_e4m3fn"):
        matmul.linear_fp8(torch.zeros(1, 64, device=DEV), w["qweight"].view(torch.uint8), w["scales"])


def test_fp8_configs_and_candidates():
    gemv, dec, pre = (matmul.default_config_fp8(m, 4096, 2048) for m in (1, 4, 2048))
    assert gemv == matmul.gemv_config(1, 4096, 2048) and matmul.default_config_fp8(2, 4096, 2048)["GEMV"]
    assert dec["BLOCK_M"] == 16 and dec["GROUP_M"] == 1 and dec["BLOCK_K"] == 256
    assert 4096 // dec["BLOCK_N"] >= matmul.NUM_SMS               # many programs, each streams its rows once
    # prefill (w8a8): 64 x 128 tiles, K steps of 128
    assert (pre["BLOCK_M"], pre["BLOCK_N"], pre["BLOCK_K"], pre["GROUP_M"]) == (64, 128, 128, 8)
    assert matmul.default_config_fp8(matmul.W8A8_MIN_ROWS - 1, 4096, 2048)["BLOCK_M"] == 64
    assert matmul.default_config_fp8(4, 64, 32)["BLOCK_K"] == 32
    for m in (1, 4, 16, 64, 2048):
        cands = matmul.candidate_configs_fp8(m, 4096, 2048, max_shared=101376)
        assert cands[0] == matmul.default_config_fp8(m, 4096, 2048) and len(cands) > 4
        assert all(c not in cands[:i] for i, c in enumerate(cands))
        tiles = [c for c in cands if not c.get("GEMV")]
        assert (len(tiles) < len(cands)) == (m <= matmul.GEMV_ROWS)
        a_bytes = 1 if m >= matmul.W8A8_MIN_ROWS else 2     # w8a8: e4m3 activation tiles
        assert all(c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] * a_bytes + c["BLOCK_N"] * c["BLOCK_K"]) <= 101376
                   for c in tiles)


# -- w8a8 (prefill): activations quantized per row and group (quant_fp8), fp8 x fp8 products -----------------
# the fp8 dots are exact in the interpreter; on a GPU, Triton's float32 division may round a quotient one
# e4m3 step the other way, and a K step's fp8 tensor-core sum is kept to ~14 bits
A8_TOL = 2e-3 if HAS_CUDA else 1e-5


def fake_quant_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """float64 x [R, K] as the w8a8 kernels see it: quant_fp8 rounds activations exactly as pack_fp8 rounds a
    weight (per row and group, e4m3 values of x / (amax / 448)), so the packer's round trip is the reference."""
    parts = moe.pack_fp8(x.float(), group)
    return moe.unpack_fp8(parts["qweight"], parts["scales"]).double()


@pytest.mark.parametrize("m,n,k,group,block_k,bias", [
    (40, 24, 128, 64, 64, True),       # the default rule (>= W8A8_MIN_ROWS rows), a step = a group
    (33, 17, 192, 64, 32, False),      # steps of half a group (both scale the same group), odd N / M
    (48, 40, 128, 32, 128, True),      # a step past the group: cut to it
])
def test_linear_w8a8_matches_quantized_reference(m, n, k, group, block_k, bias):
    assert m >= matmul.W8A8_MIN_ROWS
    w, deq = packed((n, k), group, seed=m + n)
    x = rnd(m, k, seed=4).float()
    x[1] = 0.0                                           # a zero row: scale 1, zero output (plus bias)
    b = rnd(n, seed=5, scale=0.5).float() if bias else None
    ref = fake_quant_rows(x.double(), group) @ deq.T + (b.double() if bias else 0)
    y = matmul.linear_fp8(x.to(DEV), w["qweight"], w["scales"], None if b is None else b.to(DEV),
                          cfg(16, 16, block_k))
    assert rel(y, ref) < A8_TOL
    # the activations really are quantized: the weight-only product (A8 off) differs by e4m3 rounding
    w16 = matmul.linear_fp8(x.to(DEV), w["qweight"], w["scales"], None if b is None else b.to(DEV),
                            {**cfg(16, 16, block_k), "A8": False})
    exact = x.double() @ deq.T + (b.double() if bias else 0)
    assert rel(w16, exact) < DOT32 and 2e-3 < rel(y, exact) < 0.05


def test_w8a8_rule():
    dev = torch.device("cpu")
    assert not matmul.w8a8({}, matmul.W8A8_MIN_ROWS - 1, 128, dev)
    assert matmul.w8a8({}, matmul.W8A8_MIN_ROWS, 128, dev)
    assert not matmul.w8a8({"A8": False}, 2048, 128, dev) and matmul.w8a8({"A8": True}, 3, 128, dev)
    assert not matmul.w8a8({"A8": True}, 2048, 16, dev)       # an fp8 dot needs K steps of >= 32
    assert not moe.w8a8({}, moe.W8A8_MIN_TOKENS - 1, 128, dev) and moe.w8a8({}, moe.W8A8_MIN_TOKENS, 128, dev)
    assert not moe.w8a8({"A8": False}, 4096, 128, dev) and not moe.w8a8({"A8": True}, 4096, 16, dev)


def test_linear_w8a8_forced_at_few_rows():
    """A config's "A8" decides below the row rule too (what a tuned record would say)."""
    w, deq = packed((24, 64), 32, seed=11)
    x = rnd(3, 64, seed=12).float()
    y = matmul.linear_fp8(x.to(DEV), w["qweight"], w["scales"], config={**cfg(16, 16, 32), "A8": True})
    assert rel(y, fake_quant_rows(x.double(), 32) @ deq.T) < A8_TOL


@pytest.mark.parametrize("tokens,block_k,partial", [(40, 32, False), (37, 64, True)])
def test_fused_moe_w8a8_matches_quantized_reference(tokens, block_k, partial):
    """Prefill on fp8 experts (>= W8A8_MIN_TOKENS tokens): x and the silu(gate) * up rows are quantized per
    row and group before each pass."""
    assert tokens >= moe.W8A8_MIN_TOKENS
    e, k, h, inter, group = 5, 2, 64, 64, 64
    pu, deq_u = packed((e, 2 * inter, h), group, seed=61)
    pd, deq_d = packed((e, h, inter), group, seed=62)
    x = rnd(tokens, h, seed=63).float()
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    if partial:
        ids[0, 0] = -1
    tw = torch.rand(tokens, k, generator=g)
    weights = {"gate_up.qweight": pu["qweight"], "gate_up.scales": pu["scales"],
               "down.qweight": pd["qweight"], "down.scales": pd["scales"]}
    config = {"BLOCK_M": 16, "BLOCK_N_UP": 16, "BLOCK_N_DOWN": 32, "BLOCK_K": block_k, "num_warps": 4,
              "num_stages": 1}
    y = moe.fused_moe(x.to(DEV), tw.to(DEV), ids.to(DEV), weights, e, inter, config=config, partial=partial)
    xq = fake_quant_rows(x.double(), group)
    ref = torch.zeros(tokens, h, dtype=torch.float64)
    for t in range(tokens):
        for j in range(k):
            ex = int(ids[t, j])
            if ex < 0:
                continue
            gu = deq_u[ex] @ xq[t]
            act = (torch.nn.functional.silu(gu[:inter]) * gu[inter:]).float().double()
            ref[t] += float(tw[t, j]) * (deq_d[ex] @ fake_quant_rows(act[None], group)[0])
    assert rel(y, ref) < A8_TOL
    w16 = moe.fused_moe(x.to(DEV), tw.to(DEV), ids.to(DEV), weights, e, inter, config={**config, "A8": False},
                        partial=partial)
    exact = moe_ref(x, tw, ids, deq_u, deq_d)
    assert rel(w16, exact) < DOT32 and 2e-3 < rel(y, exact) < 0.06


# -- fused MoE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,dtype,block_k,partial", [
    (1, torch.float16, None, False),      # decode: the GEMV pair (moe_gemv_*_q), default config
    (3, torch.float32, None, True),       # decode with experts held elsewhere (ids -1)
    (2, torch.float32, "gemv", True),     # the GEMV pair with small steps (one group; two, past K)
    (2, torch.float16, "grouped", False),  # decode on the grouped GEMM (a tuning candidate)
    (9, torch.float16, 64, False),        # BLOCK_K past the group: cut to it
    (11, torch.float32, 16, True),        # K steps of half a group
])
def test_fused_moe_fp8_matches_float64(tokens, dtype, block_k, partial):
    e, k, h, inter, group = 5, 2, 64, 32, 32
    pu, deq_u = packed((e, 2 * inter, h), group, seed=51)
    pd, deq_d = packed((e, h, inter), group, seed=52)
    x = rnd(tokens, h, seed=53).to(dtype).to(DEV)
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    if partial:
        ids[0, 0] = -1
        ids[-1, 1:] = -1
    tw = torch.rand(tokens, k, generator=g)
    weights = {"gate_up.qweight": pu["qweight"], "gate_up.scales": pu["scales"],
               "down.qweight": pd["qweight"], "down.scales": pd["scales"]}
    tiles = {"BLOCK_M": 16, "BLOCK_N_UP": 16, "BLOCK_N_DOWN": 32, "num_warps": 4, "num_stages": 1}
    config = {None: None, "gemv": {**tiles, "BLOCK_K": group, "DECODE": "gemv", **GEMV_Q},
              "grouped": {**tiles, "BLOCK_K": group, "DECODE": "grouped", **GEMV_Q}}.get(
        block_k, {**tiles, "BLOCK_K": block_k})
    y = moe.fused_moe(x, tw.to(DEV), ids.to(DEV), weights, e, inter, config=config, partial=partial)
    assert y.shape == (tokens, h) and y.dtype == dtype
    ref = moe_ref(x.cpu(), tw, ids, deq_u, deq_d)
    assert rel(y, ref) < (DOT32 if dtype == torch.float32 else 3e-3)
    if not partial:                                         # and close to the unquantized experts
        full = moe_ref(x.cpu(), tw, ids, rnd(e, 2 * inter, h, seed=51, scale=0.2), rnd(e, h, inter, seed=52,
                                                                                         scale=0.2))
        assert rel(y, full) < 0.06


def test_fp8_moe_configs_walk_whole_groups():
    cfg = moe.default_config(8, 2048, 768, 128)
    assert cfg["BLOCK_K"] == 128 and cfg["DECODE"] == "gemv"
    cands = moe.candidate_configs(1, 8, 128, 2048, 768, 128)
    assert cands[0] == cfg and all(c["BLOCK_K"] == 128 for c in cands)
    modes = [c["DECODE"] for c in cands]       # decode: the GEMV pair's blocks and the grouped GEMM's tiles
    assert modes.count("gemv") > 4 and modes.count("grouped") > 4 and set(modes) == {"gemv", "grouped"}
    assert all(c["DECODE"] == "gemv" for c in moe.candidate_configs(64, 8, 128, 2048, 768, 128))   # unused there
    assert math.isclose(moe.FP8_MAX, float(torch.finfo(FP8).max))
