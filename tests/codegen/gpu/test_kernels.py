"""Every GPU kernel against a float64 torch reference, on tiny shapes.

Without a GPU these run in Triton's interpreter, which computes bf16 tl.dot wrongly: inputs
are float16 / float32 here (the kernels upcast or keep the operand dtype, never assume bf16).
"""

from __future__ import annotations

import pytest
import torch

from ktc.codegen.gpu import activation, attention, embedding, matmul, moe, norm, rope, router, sampling

from .conftest import HAS_CUDA

DEV = "cuda" if HAS_CUDA else "cpu"
# float32 tl.dot is exact-ish in the interpreter and TF32 (~1e-3 relative) on a GPU
DOT32 = 3e-3 if HAS_CUDA else 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_and_add(dtype):
    x, r, w = rnd(5, 48, dtype=dtype, seed=1), rnd(5, 48, dtype=dtype, seed=2), rnd(48, dtype=dtype, seed=3)
    ref = lambda v: w.double() * v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    y = norm.rms_norm(x, w, 1e-6)
    assert rel(y, ref(x.double())) < 2e-3
    y2, s = norm.add_rms_norm(x, r, w, 1e-6)
    assert rel(s, x.double() + r.double()) < 1e-3
    assert rel(y2, ref(s.double())) < 2e-3


def test_embedding_and_activations():
    table = rnd(40, 24, seed=4)
    ids = torch.tensor([[3, 39, 0], [7, 7, 12]], device=DEV)
    assert torch.equal(embedding.embedding(ids, table), table[ids])
    gu = rnd(3, 2 * 20, seed=5)
    g, u = gu.double().chunk(2, -1)
    assert rel(activation.silu_mul(gu), torch.nn.functional.silu(g) * u) < 1e-6
    y, gate = rnd(3, 20, seed=6), rnd(3, 1, seed=7)
    assert rel(activation.sigmoid_gate_mul(y, gate), y.double() * torch.sigmoid(gate.double())) < 1e-6


@pytest.mark.parametrize("m,n,k,bias", [(3, 40, 72, True), (37, 33, 64, False)])
def test_linear(m, n, k, bias):
    x, w = rnd(m, k, seed=8), rnd(n, k, seed=9)
    b = rnd(n, seed=10) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
    assert rel(matmul.linear(x, w, b, config=cfg), ref) < DOT32
    assert rel(matmul.linear(x.half(), w.half(), None if b is None else b.half(), config=cfg, out_dtype=torch.float32),
               ref) < 2e-3


@pytest.mark.parametrize("m,n,k,block_k,bias", [
    (1, 37, 72, 32, True),       # K steps past K (masked), N not a multiple of the block
    (2, 24, 96, 256, False),     # one K step wider than K
    (1, 16, 3000, 1024, False),  # several steps, K not a power of two
])
def test_gemv_linear(m, n, k, block_k, bias):
    """The decode GEMV (matmul.gemv_kernel) against float64; float32 products, so no TF32 on a GPU."""
    x, w = rnd(m, k, seed=11), rnd(n, k, seed=12)
    b = rnd(n, seed=13) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    cfg = {"GEMV": 1, "BLOCK_N": 4, "BLOCK_K": block_k, "num_warps": 4}
    assert rel(matmul.linear(x, w, b, config=cfg), ref) < 1e-5
    y16 = matmul.linear(x.half(), w.half(), None if b is None else b.half(), config=cfg, out_dtype=torch.float32)
    assert rel(y16, ref) < 2e-3


def test_gemv_serves_few_rows_and_hands_more_to_the_tiles():
    assert matmul.default_config(1, 5120, 2048).get("GEMV") and matmul.default_config(2, 5120, 2048).get("GEMV")
    assert not matmul.default_config(matmul.GEMV_ROWS + 1, 5120, 2048).get("GEMV")
    assert any(c.get("GEMV") for c in matmul.candidate_configs(1, 5120, 2048))
    assert not any(c.get("GEMV") for c in matmul.candidate_configs(4, 5120, 2048))
    # a decode-phase config (compiled for one token) at a bigger decode batch: the tiles, same result
    x, w = rnd(5, 64, seed=14), rnd(24, 64, seed=15)
    y = matmul.linear(x, w, config={"GEMV": 1, "BLOCK_N": 4, "BLOCK_K": 64, "num_warps": 4})
    assert rel(y, x.double() @ w.double().T) < DOT32


def rope_ref(x, cos, sin, rot):
    half = rot // 2
    r, rest = x[..., :rot], x[..., rot:]
    rh = torch.cat((-r[..., half:], r[..., :half]), -1)
    return torch.cat((r * cos + rh * sin, rest), -1)


@pytest.mark.parametrize("qk_norm,rot", [(True, 16), (False, 8)])
def test_qk_rope_cache(qk_norm, rot):
    b, s, h, hkv, d, cap, past = 2, 3, 4, 2, 16, 8, 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)).to(DEV)
    pos = (past + torch.arange(s)).expand(b, s).contiguous().to(DEV)
    cos, sin = rope.rope_tables(pos, inv_freq, 1.0)
    freqs = pos.double()[..., None] * inv_freq.double()
    emb = torch.cat((freqs, freqs), -1)
    assert rel(cos, emb.cos()) < 1e-5 and rel(sin, emb.sin()) < 1e-5
    qkv = rnd(b * s, (h + 2 * hkv) * d, seed=11)
    qn, kn = (rnd(d, seed=12), rnd(d, seed=13)) if qk_norm else (None, None)
    kc = torch.full((b, hkv, cap, d), float("nan"), device=DEV)
    vc = torch.full((b, hkv, cap, d), float("nan"), device=DEV)
    q = rope.qk_rope_cache(qkv, cos.reshape(-1, rot), sin.reshape(-1, rot), pos, kc, vc, h, hkv, d, s, qn, kn, 1e-6)
    x = qkv.double().view(b, s, h + 2 * hkv, d)
    qx, kx, vx = x[:, :, :h], x[:, :, h:h + hkv], x[:, :, h + hkv:]
    if qk_norm:
        qx = qn.double() * qx / torch.sqrt((qx * qx).mean(-1, keepdim=True) + 1e-6)
        kx = kn.double() * kx / torch.sqrt((kx * kx).mean(-1, keepdim=True) + 1e-6)
    c, sn = emb.cos()[:, :, None], emb.sin()[:, :, None]
    assert rel(q.view(b, s, h, d), rope_ref(qx, c, sn, rot)) < 1e-5
    assert rel(kc[:, :, past:past + s].transpose(1, 2), rope_ref(kx, c, sn, rot)) < 1e-5
    assert rel(vc[:, :, past:past + s].transpose(1, 2), vx) < 1e-6
    assert torch.isnan(kc[:, :, :past]).all()      # nothing else written


def attn_ref(q, kc, vc, past, scale, window=None):
    """q [B, S, H, D], caches [B, Hkv, L, D] -> [B, S, H, D] float64."""
    b, s, h, d = q.shape
    hkv = kc.shape[1]
    total = past + s
    k = kc[:, :, :total].double().repeat_interleave(h // hkv, 1)
    v = vc[:, :, :total].double().repeat_interleave(h // hkv, 1)
    scores = q.double().transpose(1, 2) @ k.transpose(-1, -2) * scale
    qp = torch.arange(past, total, device=q.device)[:, None]
    kp = torch.arange(total, device=q.device)[None, :]
    vis = kp <= qp
    if window:
        vis &= kp > qp - window
    scores = scores.masked_fill(~vis, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("past,seq,window", [(0, 20, None), (5, 9, None), (3, 17, 6)])
def test_attention_prefill(dtype, past, seq, window):
    b, h, hkv, d, cap = 2, 4, 2, 16, 40
    q = rnd(b * seq, h, d, dtype=dtype, seed=14)
    kc, vc = rnd(b, hkv, cap, d, dtype=dtype, seed=15), rnd(b, hkv, cap, d, dtype=dtype, seed=16)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    o = attention.attention_prefill(q, kc, vc, b, seq, past, 0.3, window, config=cfg)
    ref = attn_ref(q.view(b, seq, h, d), kc, vc, past, 0.3, window)
    assert rel(o.view(b, seq, h, d), ref) < (DOT32 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("length,window", [(1, None), (37, None), (37, 10)])
def test_attention_decode(length, window):
    b, h, hkv, d, cap = 2, 8, 2, 16, 48
    q = rnd(b, h, d, seed=17)
    kc, vc = rnd(b, hkv, cap, d, seed=18), rnd(b, hkv, cap, d, seed=19)
    pos = torch.full((b,), length - 1, dtype=torch.int64, device=DEV)
    cfg = {"BLOCK_N": 16, "SPLITS": 3, "num_warps": 4, "num_stages": 1}
    o = attention.attention_decode(q, kc, vc, pos, 0.25, window, config=cfg)
    ref = attn_ref(q.view(b, 1, h, d), kc, vc, length - 1, 0.25, window)
    assert rel(o.view(b, 1, h, d), ref) < DOT32


def router_ref(logits, attrs, bias=None):
    from ktc.runtime.ops.router import route

    eye = torch.eye(logits.shape[1], dtype=torch.float64)
    return route(logits.double().cpu(), eye, None if bias is None else bias.double().cpu(), attrs)


@pytest.mark.parametrize("attrs,has_bias", [
    ({"scoring": "softmax", "topk_method": "greedy", "top_k": 3, "norm_topk_prob": True}, False),
    ({"scoring": "softmax", "topk_method": "greedy", "top_k": 2, "norm_topk_prob": False}, False),
    ({"scoring": "softmax", "topk_method": "group_limited_greedy", "top_k": 3, "n_group": 4, "topk_group": 2,
      "routed_scaling_factor": 1.5}, False),
    ({"scoring": "sigmoid", "topk_method": "noaux_tc", "top_k": 4, "n_group": 4, "topk_group": 2,
      "norm_topk_prob": True, "routed_scaling_factor": 2.5}, True),
])
def test_router(attrs, has_bias):
    e = 20 if attrs["topk_method"] != "greedy" else 24
    logits = rnd(6, e, seed=20, scale=2.0)
    bias = rnd(e, seed=21, scale=0.2) if has_bias else None
    w, ids = router.router_topk(logits, attrs, bias)
    ref_w, ref_ids = router_ref(logits, attrs, bias)
    assert ids.cpu().long().tolist() == ref_ids.tolist()
    assert rel(w, ref_w) < 1e-5


@pytest.mark.parametrize("e,attrs", [
    (160, {"scoring": "softmax", "topk_method": "greedy", "top_k": 6, "norm_topk_prob": False}),
    (160, {"scoring": "softmax", "topk_method": "group_limited_greedy", "top_k": 6, "n_group": 8, "topk_group": 3,
           "routed_scaling_factor": 16.0}),
])
def test_router_past_128_experts(e, attrs):
    """More than 128 (padded) experts take the repeated-argmax top-k instead of the one-tile ranking."""
    logits = rnd(5, e, seed=22, scale=2.0)
    w, ids = router.router_topk(logits, attrs)
    ref_w, ref_ids = router_ref(logits, attrs)
    assert ids.cpu().long().tolist() == ref_ids.tolist()
    assert rel(w, ref_w) < 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_router_ties_go_to_the_lower_id(fused):
    """Equal scores: the lower expert id first, in both top-k forms (ranking and repeated argmax)."""
    attrs = {"scoring": "softmax", "topk_method": "greedy", "top_k": 5, "norm_topk_prob": True}
    for e in (24, 200):
        logits = (rnd(4, e, seed=23) * 2).round() / 2          # a handful of distinct values: many ties
        if fused:
            w, ids = router.router_fused(logits, torch.eye(e, device=DEV), attrs, None,
                                         {"ROWS": 4, "BLOCK_H": 32, "num_warps": 4})
        else:
            w, ids = router.router_topk(logits, attrs)
        choice = logits.double().cpu().softmax(-1)
        ref_ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :5]
        assert ids.cpu().long().tolist() == ref_ids.tolist()
        ref_w = choice.gather(1, ref_ids)
        assert rel(w, ref_w / ref_w.sum(-1, keepdim=True)) < 1e-5


@pytest.mark.parametrize("attrs,has_bias", [
    ({"scoring": "softmax", "topk_method": "greedy", "top_k": 3, "norm_topk_prob": True}, False),
    ({"scoring": "sigmoid", "topk_method": "noaux_tc", "top_k": 4, "n_group": 4, "topk_group": 2,
      "norm_topk_prob": True, "routed_scaling_factor": 2.5}, True),
])
def test_router_fused(attrs, has_bias):
    """Logits GEMV + top-k in one launch (arrival counter); twice, so the counter's reset is checked."""
    e, h, t = (20 if attrs["topk_method"] != "greedy" else 24), 40, 3
    gate = rnd(e, h, seed=30, scale=0.5)
    bias = rnd(e, seed=31, scale=0.2) if has_bias else None
    for seed in (32, 33):
        x = rnd(t, h, seed=seed)
        cfg = {"ROWS": 4, "BLOCK_H": 16, "num_warps": 4}
        w, ids = router.router_fused(x, gate, attrs, bias, cfg)
        ref_w, ref_ids = router_ref((x.double() @ gate.double().T).float(), attrs, bias)
        assert ids.cpu().long().tolist() == ref_ids.tolist()
        assert rel(w, ref_w) < 1e-4
    assert int(router._counter(x.device, t).abs().sum()) == 0


def moe_ref(x, tw, ids, gate_up, down):
    """float64 routed experts; an id < 0 (an expert run elsewhere) adds nothing."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    inter = down.shape[-1]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = gate_up[e].double() @ x[t].double()
            y[t] += float(tw[t, j]) * (down[e].double() @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
    return y


@pytest.mark.parametrize("tokens,block_m", [(1, 16), (13, 16), (300, 16), (700, 64)])
def test_moe_align(tokens, block_m):
    """300 / 700 tokens (600 / 1400 slots) take the parallel count / offsets / scatter alignment."""
    e, k = 6, 2
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32).to(DEV)
    sorted_slots, block_expert, total = moe.moe_align(ids, e, block_m)
    flat = ids.reshape(-1).cpu()
    ss, be, tot = sorted_slots.cpu(), block_expert.cpu(), int(total.cpu())
    assert tot % block_m == 0
    seen = []
    for blk in range(tot // block_m):
        rows = ss[blk * block_m:(blk + 1) * block_m]
        real = rows[rows < flat.numel()]
        assert (flat[real.long()] == be[blk]).all()
        seen += real.tolist()
    assert sorted(seen) == list(range(flat.numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,decode", [(1, "dot"), (3, "dot"), (3, "gemv"), (2, "mixed"), (11, "gemv")])
def test_fused_moe_dense(dtype, tokens, decode):
    """1 and 3 tokens take the two-launch decode path (weighted sum inside the down pass), 11 the grouped GEMM."""
    e, k, h, inter = 5, 2, 32, 48
    x = rnd(tokens, h, dtype=dtype, seed=22)
    gate_up, down = rnd(e, 2 * inter, h, dtype=dtype, seed=23, scale=0.2), rnd(e, h, inter, dtype=dtype, seed=24,
                                                                                scale=0.2)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32).to(DEV)
    tw = torch.rand(tokens, k).to(DEV)
    cfg = {"BLOCK_M": 16, "BLOCK_N_UP": 16, "BLOCK_N_DOWN": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1,
           "GEMV_N_UP": 16, "GEMV_K_UP": 16, "GEMV_N_DOWN": 8, "GEMV_K_DOWN": 32, "gemv_warps": 4,
           "DECODE": decode, "DOWN_SUM_N": 16, "DOWN_SUM_K": 32, "down_sum_warps": 4, "down_sum_stages": 2}
    y = moe.fused_moe(x, tw, ids, {"gate_up": gate_up, "down": down}, e, inter, config=cfg)
    ref = moe_ref(x.cpu(), tw.cpu(), ids.cpu(), gate_up.cpu(), down.cpu())
    assert rel(y.cpu(), ref) < (DOT32 if dtype == torch.float32 else 3e-3)


GEMV_Q = {"GEMV_N_UP": 4, "GEMV_K_UP": 32, "GEMV_N_DOWN": 8, "GEMV_K_DOWN": 64, "gemv_warps": 4}


@pytest.mark.parametrize("tokens,decode", [(5, None), (1, "gemv"), (3, "gemv"), (2, "grouped")])
def test_fused_moe_w4a16(tokens, decode):
    """The grouped GEMM (prefill; decode with DECODE "grouped") and the decode GEMV pair (moe_gemv_*_q:
    one group a gate_up step, a down step of two groups past K), against the dequantized weights."""
    e, k, h, inter, group = 4, 2, 64, 32, 32
    x = rnd(tokens, h, dtype=torch.float16, seed=25)
    gate_up, down = rnd(e, 2 * inter, h, seed=26, scale=0.2), rnd(e, h, inter, seed=27, scale=0.2)
    pu, pd = moe.pack_w4a16(gate_up, group), moe.pack_w4a16(down, group)
    deq_u, deq_d = moe.unpack_w4a16(pu["qweight"], pu["scales"]), moe.unpack_w4a16(pd["qweight"], pd["scales"])
    assert rel(deq_u, gate_up) < 0.15          # int4 error, and proof that unpack inverts pack
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32).to(DEV)
    tw = torch.rand(tokens, k).to(DEV)
    weights = {"gate_up.qweight": pu["qweight"], "gate_up.scales": pu["scales"],
               "down.qweight": pd["qweight"], "down.scales": pd["scales"]}
    cfg = {"BLOCK_M": 16, "BLOCK_N_UP": 16, "BLOCK_N_DOWN": 16, "BLOCK_K": group, "num_warps": 4, "num_stages": 1,
           **({"DECODE": decode, **GEMV_Q} if decode else {})}
    y = moe.fused_moe(x, tw, ids, weights, e, inter, config=cfg)
    ref = moe_ref(x.cpu(), tw.cpu(), ids.cpu(), deq_u.cpu(), deq_d.cpu())
    # float16 activations and output; the tiles also round the dequantized weight to float16
    assert rel(y.cpu(), ref) < (1e-3 if decode == "gemv" else 3e-3)


def test_fused_moe_on_the_cpu_kernels_int8_layout():
    """Long prefills stream CPU experts (int8, group-wise scales, the CPU kernels' layout) to the GPU."""
    from ktc.codegen.cpu_experts import ExpertKernelSpec, pack_expert_weights, unpack_expert_weights

    e, k, h, inter, tokens = 4, 2, 64, 32, 9
    spec = ExpertKernelSpec(hidden_size=h, intermediate_size=inter, num_experts=e, top_k=k, format="int8",
                            group_size=32)
    gate_up, down = rnd(e, 2 * inter, h, seed=31, scale=0.2).cpu(), rnd(e, h, inter, seed=32, scale=0.2).cpu()
    parts = pack_expert_weights(spec, gate_up, down)
    deq_u, deq_d = unpack_expert_weights(spec, parts)
    x = rnd(tokens, h, dtype=torch.float16, seed=33)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32).to(DEV)
    tw = torch.rand(tokens, k).to(DEV)
    weights = {name: t.to(DEV) for name, t in parts.items()}
    cfg = {"BLOCK_M": 16, "BLOCK_N_UP": 16, "BLOCK_N_DOWN": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    y = moe.fused_moe(x, tw, ids, weights, e, inter, config=cfg)       # BLOCK_K is cut to the group (32)
    ref = moe_ref(x.cpu(), tw.cpu(), ids.cpu(), deq_u, deq_d)
    assert rel(y.cpu(), ref) < 3e-3


@pytest.mark.parametrize("group", [32, 64])
def test_fused_moe_on_the_cpu_kernels_int4_layout(group):
    """Long prefills stream int4 CPU experts too: values paired in blocks of 32 (not per group),
    a float32 scale per group; the w4a16 path reads them as they are."""
    from ktc.codegen.cpu_experts import ExpertKernelSpec, pack_expert_weights, unpack_expert_weights

    e, k, h, inter, tokens = 4, 2, 128, 64, 9
    spec = ExpertKernelSpec(hidden_size=h, intermediate_size=inter, num_experts=e, top_k=k, format="int4",
                            group_size=group)
    gate_up, down = rnd(e, 2 * inter, h, seed=41, scale=0.2).cpu(), rnd(e, h, inter, seed=42, scale=0.2).cpu()
    parts = pack_expert_weights(spec, gate_up, down)
    assert parts["gate_up.q"].dtype == torch.uint8
    deq_u, deq_d = unpack_expert_weights(spec, parts)
    x = rnd(tokens, h, dtype=torch.float16, seed=43)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32).to(DEV)
    tw = torch.rand(tokens, k).to(DEV)
    weights = {name: t.to(DEV) for name, t in parts.items()}
    cfg = {"BLOCK_M": 16, "BLOCK_N_UP": 16, "BLOCK_N_DOWN": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    y = moe.fused_moe(x, tw, ids, weights, e, inter, config=cfg)       # BLOCK_K becomes the pair block (32)
    ref = moe_ref(x.cpu(), tw.cpu(), ids.cpu(), deq_u, deq_d)
    assert rel(y.cpu(), ref) < 3e-3


@pytest.mark.parametrize("tokens", [2, 9])
def test_fused_moe_partial_skips_slots_of_experts_held_elsewhere(tokens):
    """ids -1 (an expert another device holds) add nothing, on the decode and the grouped path."""
    e, k, h, inter = 4, 3, 32, 16
    x = rnd(tokens, h, dtype=torch.float32, seed=34)
    gate_up, down = rnd(e, 2 * inter, h, seed=35, scale=0.2), rnd(e, h, inter, seed=36, scale=0.2)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)]).to(torch.int32)
    ids[0, 0] = -1
    ids[-1, 1:] = -1
    tw = torch.rand(tokens, k)
    y = moe.fused_moe(x, tw.to(DEV), ids.to(DEV), {"gate_up": gate_up, "down": down}, e, inter, partial=True)
    keep = ids >= 0
    ref = moe_ref(x.cpu(), tw * keep, ids.clamp(min=0), gate_up.cpu(), down.cpu())
    assert rel(y.cpu(), ref) < DOT32


@pytest.mark.parametrize("fmt,group,tokens", [("int8", 32, 1), ("int8", 64, 3), ("int4", 32, 1), ("int4", 64, 2)])
def test_moe_decode_cpu_layout_reads_only_the_slots_it_is_given(fmt, group, tokens):
    """The GPU's share of a decode step's CPU experts, on the CPU kernels' packed layout: slots with id -1
    add nothing, and their experts' weights are not read (here: poisoned with NaN scales)."""
    from ktc.codegen.cpu_experts import ExpertKernelSpec, pack_expert_weights, unpack_expert_weights

    e, k, h, inter = 4, 3, 128, 64
    spec = ExpertKernelSpec(hidden_size=h, intermediate_size=inter, num_experts=e, top_k=k, format=fmt,
                            group_size=group)
    gate_up, down = rnd(e, 2 * inter, h, seed=51, scale=0.2).cpu(), rnd(e, h, inter, seed=52, scale=0.2).cpu()
    parts = pack_expert_weights(spec, gate_up, down)
    deq_u, deq_d = unpack_expert_weights(spec, parts)
    ids = torch.tensor([[0, -1, 2], [-1, -1, 1], [2, 0, -1]][:tokens], dtype=torch.int32)
    for part in ("gate_up.scales", "down.scales"):
        parts[part][3] = float("nan")            # expert 3 is never named: reading it would poison y
    x = rnd(tokens, h, dtype=torch.float16, seed=53)
    tw = torch.rand(tokens, k)
    weights = {name: t.to(DEV) for name, t in parts.items()}
    cfg = {"GEMV_N_UP": 4, "GEMV_K_UP": group, "GEMV_N_DOWN": 8, "GEMV_K_DOWN": 2 * group}
    y = moe.moe_decode_cpu_layout(x, tw.to(DEV), ids.to(DEV), weights, inter, config=cfg)
    assert y.dtype == torch.float32
    keep = ids >= 0
    ref = moe_ref(x.cpu(), tw * keep, ids.clamp(min=0), deq_u, deq_d)
    assert rel(y.cpu(), ref) < 1e-3


@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("has_x", [False, True])
def test_stage_decode(table, split, has_x):
    """One launch hands a decode step to the CPU kernel: this node's rows of the router ids (table: odd experts
    held here), of which the first take[n] of a token's n go to the GPU (split), plus x as float32 and the
    weights (has_x); rows held elsewhere are -1."""
    k, h = 6, 40
    ids = torch.tensor([[5, 1, 7, 0, 3, 2], [7, 6, 5, 4, 3, 2], [0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    tab = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32) if table else None
    take = torch.tensor([0, 0, 1, 1, 2, 2, 3], dtype=torch.int32)
    x, tw = rnd(3, h, dtype=torch.float16, seed=4), rnd(3, k, seed=5)
    x_out, tw_out = torch.zeros(3, h, device=DEV), torch.zeros(3, k, device=DEV)
    cpu_ids, gpu_ids = torch.zeros_like(ids).to(DEV), torch.full_like(ids, 99).to(DEV)
    if has_x:
        moe.stage_decode(ids.to(DEV), None if tab is None else tab.to(DEV), cpu_ids, x, tw, x_out, tw_out,
                         take.to(DEV) if split else None, gpu_ids if split else None)
    else:
        moe.stage_decode(ids.to(DEV), None if tab is None else tab.to(DEV), cpu_ids,
                         take=take.to(DEV) if split else None, gpu_ids=gpu_ids if split else None)
    rows = tab[ids.long()] if table else ids
    for t in range(ids.shape[0]):
        held = [j for j in range(k) if rows[t, j] >= 0]
        n_gpu = int(take[len(held)]) if split else 0
        want_gpu = [int(rows[t, j]) if j in held[:n_gpu] else -1 for j in range(k)]
        want_cpu = [int(rows[t, j]) if j in held[n_gpu:] else -1 for j in range(k)]
        assert cpu_ids[t].tolist() == want_cpu
        assert gpu_ids[t].tolist() == (want_gpu if split else [99] * k)
    assert torch.equal(x_out.cpu(), x.float().cpu() if has_x else torch.zeros(3, h))
    assert torch.equal(tw_out.cpu(), tw.cpu() if has_x else torch.zeros(3, k))


def test_argmax():
    logits = rnd(3, 5000, seed=28)
    logits[1, 4999] = 100.0
    logits[2, 17] = logits[2, 4000] = 100.0      # a tie: the lowest index wins, as in torch
    cfg = {"BLOCK": 1024, "num_warps": 4}
    assert sampling.argmax(logits, cfg).cpu().tolist() == logits.cpu().argmax(-1).tolist()



def test_add():
    a, b = rnd(3, 1100, seed=29), rnd(3, 1100, seed=30)
    assert rel(activation.add(a, b), a.double() + b.double()) < 1e-7


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])
def test_wait_gather(extra, tokens):
    """The host's step count one past the kernel's: out = y (+ extra) in out's dtype, and the kernel's count
    advances. A count never reached: the kernel gives up after max_spins reads and writes NaN, never stale values."""
    h = 40
    y, more = rnd(tokens, h, seed=1), rnd(tokens, h, seed=2)
    out = torch.empty(tokens, h, dtype=torch.float16, device=DEV)
    flag = torch.zeros(16, dtype=torch.int32, device=DEV)
    seen = torch.full((1,), 6, dtype=torch.int32, device=DEV)
    flag[0] = 7
    moe.wait_gather(flag, seen, y, out, more if extra else None)
    want = y.double() + (more.double() if extra else 0)
    assert rel(out, want) < 1e-3
    assert int(seen[0]) == 7
    moe.wait_gather(flag, seen, y, out, None, max_spins=5)      # the host has not counted to 8
    assert bool(out.isnan().all())
