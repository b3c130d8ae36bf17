"""The MLA kernels (ktc.codegen.gpu.mla) against float64 torch references, on tiny shapes.

Without a GPU these run in Triton's interpreter (float32 / float16 inputs: its bf16 tl.dot is wrong).
"""

from __future__ import annotations

import pytest
import torch

from ktc.codegen.gpu import mla
from ktc.runtime.ops.rope import apply_rope

from .test_kernels import DEV, DOT32, rel, rnd

H, R, DN, DR, DV = 4, 32, 16, 16, 24


def rope_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    f = positions.double().cpu()[..., None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().float().to(DEV), emb.sin().float().to(DEV)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("interleave", [False, True])
def test_rope_cache_writes_latent_and_k_pe(interleave):
    b, s, past, cap = 2, 3, 4, 10
    t = b * s
    fused = rnd(t, H * (DN + DR) + R + DR + 5, seed=1)          # q | kv_a | padding: strided row views
    q, kv_a = fused[:, :H * (DN + DR)], fused[:, H * (DN + DR):H * (DN + DR) + R + DR]
    norm_w = rnd(R, seed=2)
    positions = (past + torch.arange(s)).expand(b, s).contiguous().to(DEV)
    cos, sin = rope_tables(past + torch.arange(s + 2).expand(b, s + 2), DR)
    cos, sin = cos[:, :s], sin[:, :s]                           # rows of [B, S + 2, DR] tables: strided
    cache = torch.full((b, cap, R + DR), 7.0, device=DEV)
    q_pe = torch.empty(t, H, R + DR, device=DEV)[..., R:]       # a strided destination, as decode uses
    mla.rope_cache(q, kv_a, norm_w, cos, sin, positions, cache, q_pe, H, DN, R, s, 1e-6, interleave,
                   mla.rope_cache_config(R, DR))
    c64, s64 = cos.double().cpu().reshape(t, DR), sin.double().cpu().reshape(t, DR)
    q_ref = apply_rope(q.double().cpu().view(t, H, DN + DR)[..., DN:], c64[:, None], s64[:, None], interleave)
    assert rel(q_pe, q_ref) < 1e-6
    lat_ref = rms(kv_a[:, :R].cpu(), norm_w.cpu(), 1e-6).view(b, s, R)
    pe_ref = apply_rope(kv_a[:, R:].double().cpu(), c64, s64, interleave).view(b, s, DR)
    got = cache.cpu()
    assert rel(got[:, past:past + s, :R], lat_ref) < 1e-6
    assert rel(got[:, past:past + s, R:], pe_ref) < 1e-6
    assert (got[:, :past] == 7.0).all() and (got[:, past + s:] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_matmul_reads_kv_b_in_place(dtype):
    t = 3
    kv_b = rnd(H * (DN + DV), R, dtype=dtype, seed=3)
    per_head = kv_b.view(H, DN + DV, R)
    q = rnd(t, H * (DN + DR), dtype=dtype, seed=4).view(t, H, DN + DR)
    out = torch.zeros(t, H, R + DR, dtype=dtype, device=DEV)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    # absorb q_nope through W_uk (read transposed: [H, R, DN] with strides (.., 1, R))
    mla.head_matmul(q[..., :DN], per_head[:, :DN].transpose(1, 2), out[..., :R], cfg)
    ref = torch.einsum("thd,hdr->thr", q[..., :DN].double().cpu(), per_head[:, :DN].double().cpu())
    tol = DOT32 if dtype == torch.float32 else 2e-3
    assert rel(out[..., :R], ref) < tol
    assert (out[..., R:] == 0).all()
    # absorb o_lat back through W_uv ([H, DV, R], read as stored)
    o_lat = rnd(t, H, R, dtype=dtype, seed=5)
    o = mla.head_matmul(o_lat, per_head[:, DN:], torch.empty(t, H, DV, dtype=dtype, device=DEV))
    ref = torch.einsum("thr,hvr->thv", o_lat.double().cpu(), per_head[:, DN:].double().cpu())
    assert rel(o, ref) < tol


def decode_ref(q: torch.Tensor, cache: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    q, cache = q.double().cpu(), cache.double().cpu()
    out = []
    for i, n in enumerate(lengths):
        rows = cache[i, :n]                                        # [n, R + DR]
        p = torch.softmax(q[i] @ rows.T * scale, dim=-1)           # [H, n]
        out.append(p @ rows[:, :R])
    return torch.stack(out)


@pytest.mark.parametrize("heads,lengths,splits", [(4, [1, 5], 1), (4, [37, 20], 3), (20, [37, 9], 2)])
def test_attention_decode_absorbed(heads, lengths, splits):
    b, cap = len(lengths), 48
    q = rnd(b, heads, R + DR, seed=6)
    cache = rnd(b, cap, R + DR, seed=7)
    pos = torch.tensor([n - 1 for n in lengths], device=DEV)
    cfg = {"BLOCK_H": 16, "BLOCK_N": 16, "SPLITS": splits, "num_warps": 4, "num_stages": 1}
    o = mla.attention_decode(q, cache, pos, R, 0.2, cfg)
    assert o.shape == (b, heads, R)
    assert rel(o, decode_ref(q, cache, lengths, 0.2)) < DOT32


def test_attention_decode_default_config():
    q, cache = rnd(1, H, R + DR, seed=8), rnd(1, 8, R + DR, seed=9)
    o = mla.attention_decode(q, cache, torch.tensor([[5]], device=DEV), R, 0.3)
    assert rel(o, decode_ref(q, cache, [6], 0.3)) < DOT32


def prefill_ref(q, q_pe, kv, cache, b, s, past, scale):
    q = q.double().cpu().view(b, s, H, DN + DR)[..., :DN]
    q_pe = q_pe.double().cpu().view(b, s, H, DR)
    total = past + s
    kv = kv.double().cpu()[:, :total].view(b, total, H, DN + DV)
    k_pe = cache.double().cpu()[:, :total, R:]
    scores = torch.einsum("bshd,bthd->bhst", q, kv[..., :DN]) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
    vis = torch.arange(total)[None, :] <= (past + torch.arange(s))[:, None]
    p = torch.softmax((scores * scale).masked_fill(~vis, float("-inf")), dim=-1)
    return torch.einsum("bhst,bthv->bshv", p, kv[..., DN:]).reshape(b * s, H, DV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("past,seq", [(0, 6), (5, 3), (0, 1)])
def test_attention_prefill(dtype, past, seq):
    b, cap = 2, 16
    q = rnd(b * seq, H * (DN + DR) + 8, dtype=dtype, seed=10)[:, :H * (DN + DR)]   # strided rows
    q_pe = rnd(b * seq, H, DR, dtype=dtype, seed=11)
    kv = rnd(b, past + seq + 2, H * (DN + DV), dtype=dtype, seed=12)
    cache = rnd(b, cap, R + DR, dtype=dtype, seed=13)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    o = mla.attention_prefill(q, q_pe, kv, cache, b, seq, past, DN, 0.25, cfg)
    assert o.shape == (b * seq, H, DV)
    ref = prefill_ref(q, q_pe, kv, cache, b, seq, past, 0.25)
    assert rel(o, ref) < (DOT32 if dtype == torch.float32 else 2e-3)


def test_configs_cover_the_real_shapes():
    """DeepSeek-V3's layer: R 512, DR 64, DN 128, DV 128, 128 heads."""
    dc = mla.decode_config(128, 512, 4096)
    assert dc["BLOCK_H"] >= 16 and 1 <= dc["SPLITS"] <= 32
    assert mla.decode_config(16, 512, 1)["SPLITS"] == 1
    pc = mla.prefill_config(128, 64, 128)
    assert pc["BLOCK_M"] >= 16 and pc["BLOCK_N"] >= 16
    rc = mla.rope_cache_config(512, 64)
    assert rc["BLOCK_R"] == 512 and rc["BLOCK_HALF"] == 32
