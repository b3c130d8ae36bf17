"""The w4a16 linear (matmul.linear_w4a16) against a float64 reference (its ahead-of-time builds: test_aot).

Without a GPU the kernel runs in Triton's interpreter (conftest): activations are float16 /
float32 (the interpreter multiplies bf16 wrongly), shapes tiny and odd (M = 1, N and M not
multiples of the blocks, K steps smaller than, equal to and larger than the group, a K step
past K). The weights are packed by moe.pack_w4a16, the GPU experts' packer the artifact writer
uses for int4 dense weights too; the reference multiplies by its dequantized weight.
"""

from __future__ import annotations

import pytest
import torch

from ktc.codegen.gpu import matmul, moe

from .test_kernels import DEV, DOT32, rel


def rnd(*shape, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def packed(n: int, k: int, group: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(pack_w4a16 parts on DEV, the float64 weight they stand for)."""
    parts = moe.pack_w4a16(rnd(n, k, seed=seed, scale=0.2).float(), group)
    deq = moe.unpack_w4a16(parts["qweight"], parts["scales"]).double()
    return {p: t.to(DEV) for p, t in parts.items()}, deq


def cfg(bm: int, bn: int, bk: int, group_m: int = 2) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("m,n,k,group,block_k,bias,dtype", [
    (1, 40, 96, 32, 32, True, torch.float16),        # decode row, step = group, 3 groups
    (1, 24, 128, 128, 64, False, torch.float32),     # step inside a group
    (3, 33, 128, 64, 128, True, torch.float32),      # step = two groups
    (5, 17, 64, 32, 256, False, torch.float16),      # step past K (masked), several groups
    (19, 24, 192, 64, 64, True, torch.float16),      # two M blocks, GROUP_M ordering, K not a power of two
])
def test_linear_w4a16_matches_float64(m, n, k, group, block_k, bias, dtype):
    w, deq = packed(n, k, group, seed=m + n + k)
    x = rnd(m, k, seed=1).to(dtype)
    b = rnd(n, seed=2, scale=0.5).to(dtype) if bias else None
    ref = x.double() @ deq.T + (b.double() if bias else 0)
    y = matmul.linear_w4a16(x.to(DEV), w["qweight"], w["scales"], None if b is None else b.to(DEV),
                            cfg(16, 16, block_k), out_dtype=torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # fp16: the dequantized weight is rounded to the activation dtype before the dot
    assert rel(y, ref) < (DOT32 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("m,n,k,group,block_k,block_n,bias,dtype", [
    (1, 40, 96, 32, 32, 4, True, torch.float16),      # a step = one group, 3 groups, N a multiple of BLOCK_N
    (1, 21, 256, 64, 128, 8, False, torch.float32),   # two groups a step, N not a multiple of BLOCK_N
    (2, 24, 384, 128, 512, 4, True, torch.float32),   # two rows, a step past K (masked groups)
    (2, 9, 128, 128, 64, 2, False, torch.float16),    # a step below the group: the kernel takes one group
])
def test_gemv_w4a16_matches_float64(m, n, k, group, block_k, block_n, bias, dtype):
    """The decode GEMV (matmul.gemv_grouped_kernel, int4): float32 products, scaled once per group."""
    w, deq = packed(n, k, group, seed=m + n + k)
    x = rnd(m, k, seed=1).to(dtype)
    b = rnd(n, seed=2, scale=0.5).to(dtype) if bias else None
    ref = x.double() @ deq.T + (b.double() if bias else 0)
    gemv = {"GEMV": 1, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4}
    y = matmul.linear_w4a16(x.to(DEV), w["qweight"], w["scales"], None if b is None else b.to(DEV), gemv,
                            out_dtype=torch.float32)
    assert y.shape == (m, n) and rel(y, ref) < 1e-5
    x3 = rnd(3, k, seed=3).to(dtype)          # a GEMV config meeting more rows than it serves runs the tiles
    y3 = matmul.linear_w4a16(x3.to(DEV), w["qweight"], w["scales"], config=gemv, out_dtype=torch.float32)
    assert rel(y3, x3.double() @ deq.T) < (DOT32 if dtype == torch.float32 else 2e-3)


def test_linear_w4a16_default_configs_and_leading_dims():
    w, deq = packed(48, 256, 128, seed=7)
    for shape in ((1, 1, 256), (2, 11, 256)):          # decode (M <= 16) and prefill default configs
        x = rnd(*shape, seed=8).half()
        y = matmul.linear_w4a16(x.to(DEV), w["qweight"], w["scales"])
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float16
        assert rel(y, x.double() @ deq.T) < 2e-3
    out = torch.empty(3, 48, dtype=torch.float32, device=DEV)
    x = rnd(3, 256, seed=9).float().to(DEV)
    assert matmul.linear_w4a16(x, w["qweight"], w["scales"], out=out).data_ptr() == out.data_ptr()
    assert rel(out, x.double().cpu() @ deq.T) < DOT32


def test_linear_w4a16_refuses_mismatched_parts():
    w, _ = packed(16, 64, 32, seed=3)
    with pytest.raises(ValueError, match="do not fit K=128"):
        matmul.linear_w4a16(torch.zeros(1, 128, device=DEV), w["qweight"], w["scales"])


def test_configs_decode_and_prefill_and_candidates():
    gemv, dec, pre = (matmul.default_config_w4a16(m, 4096, 2048) for m in (1, 4, 2048))
    assert gemv == matmul.gemv_config(1, 4096, 2048) and matmul.default_config_w4a16(2, 4096, 2048)["GEMV"]
    assert dec["BLOCK_M"] == 16 and dec["BLOCK_K"] == 512 and dec["GROUP_M"] == 1
    assert 4096 // dec["BLOCK_N"] >= matmul.NUM_SMS               # many programs, each streams its rows once
    assert pre["BLOCK_M"] == 128 and pre["GROUP_M"] == 8
    assert matmul.default_config_w4a16(4, 64, 32)["BLOCK_K"] == 32
    for m in (1, 4, 16, 64, 2048):
        cands = matmul.candidate_configs_w4a16(m, 4096, 2048, max_shared=101376)
        assert cands[0] == matmul.default_config_w4a16(m, 4096, 2048) and len(cands) > 4
        assert all(c not in cands[:i] for i, c in enumerate(cands))
        tiles = [c for c in cands if not c.get("GEMV")]
        assert (len(tiles) < len(cands)) == (m <= matmul.GEMV_ROWS)
        assert all(c["BLOCK_K"] >= 32 for c in tiles)
        assert all(c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] * 2 + c["BLOCK_N"] * c["BLOCK_K"] // 2) <= 101376
                   for c in tiles)


def test_pack_w4a16_round_trips_a_2d_weight():
    w = rnd(5, 96, seed=4).float()
    parts = moe.pack_w4a16(w, 32)
    assert parts["qweight"].shape == (5, 48) and parts["qweight"].dtype == torch.uint8
    assert parts["scales"].shape == (5, 3) and parts["scales"].dtype == torch.float32
    deq = moe.unpack_w4a16(parts["qweight"], parts["scales"])
    assert (deq - w).abs().max() <= parts["scales"].max() / 2 + 1e-6
    assert torch.equal(moe.pack_w4a16(deq, 32)["qweight"], parts["qweight"])
