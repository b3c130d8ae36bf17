"""router against the transformers router modules: same expert set per token, same weights."""

from __future__ import annotations

import pytest
import torch

from ktc.runtime.executor import Executor
from tests.runtime.helpers import Builder, hf_model, rel_err, router_attrs

CASES = [
    ("qwen2_moe", {}),                                   # softmax, no norm_topk_prob
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {}),                                   # softmax, norm_topk_prob
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("mixtral", {}),                                     # softmax, always normalised
    ("deepseek_v2", {}),                                 # group_limited_greedy, routed_scaling_factor
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v3", {}),                                 # noaux_tc sigmoid + e_score_correction_bias
    ("deepseek_v3", {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}),
]


def _router_module(model):
    layer = next(la for la in model.model.layers if hasattr(la.mlp, "experts"))
    return layer.mlp.gate


@pytest.mark.parametrize("arch,overrides", CASES)
def test_router_matches_transformers(arch, overrides):
    model = hf_model(arch, **overrides)
    gate = _router_module(model)
    x = torch.randn(3, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ref_w, ref_ids = gate(x)
    attrs = router_attrs(model.config)
    b = Builder()
    tw, ti = b.node("router", [b.input("x")], n_out=2,
                    weights=dict(weight=gate.weight, bias=getattr(gate, "e_score_correction_bias", None)), **attrs)
    graph, weights = b.graph([tw, ti])
    out = Executor(graph, weights).execute({"x": x})
    w, ids = out[tw], out[ti]
    k = attrs["top_k"]
    assert w.shape == (3, 11, k) and w.dtype == torch.float32
    assert ids.shape == (3, 11, k) and ids.dtype == torch.int32
    w, ids = w.reshape(-1, k), ids.reshape(-1, k).long()
    # the same SET of experts per token (order may differ: transformers' topk is unsorted for DeepSeek)
    ours_sorted, our_order = ids.sort(dim=-1)
    ref_sorted, ref_order = ref_ids.sort(dim=-1)
    assert torch.equal(ours_sorted, ref_sorted)
    err = rel_err(w.gather(1, our_order), ref_w.float().gather(1, ref_order))
    assert err < 1e-5, err


def test_noaux_tc_bias_only_chooses():
    """With a huge bias on expert 0 it is always chosen, but its weight is its unbiased score."""
    b = Builder()
    weight = torch.randn(8, 16)
    bias = torch.zeros(8)
    bias[0] = 100.0
    attrs = dict(num_experts=8, top_k=2, scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                 norm_topk_prob=False, routed_scaling_factor=1.0)
    tw, ti = b.node("router", [b.input("x")], n_out=2, weights=dict(weight=weight, bias=bias), **attrs)
    graph, weights = b.graph([tw, ti])
    x = torch.randn(1, 5, 16)
    out = Executor(graph, weights).execute({"x": x})
    ids = out[ti][0].long()
    assert (ids == 0).any(dim=-1).all()                 # the biased expert always wins
    assert (ids < 4).all()                              # and only its group is open
    scores = torch.sigmoid(x[0] @ weight.T)
    assert torch.allclose(out[tw][0], scores.gather(1, ids))
