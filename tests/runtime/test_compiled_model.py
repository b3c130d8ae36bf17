"""CompiledModel end to end on hand-built graphs of tiny transformers models: logits, the KV
cache (prefill + decode == one full forward), and greedy generation."""

from __future__ import annotations

import pytest
import torch

from ktc.runtime.model import CompiledModel
from tests.runtime.helpers import TorchExperts, graph_from_hf, hf_model, rel_err

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"]


def _compiled(arch, **kw):
    model = hf_model(arch)
    graph, weights = graph_from_hf(model, fuse_norms=arch != "mixtral")   # mixtral: unfused add + rms_norm
    return model, CompiledModel(graph, weights, cpu_kernels=TorchExperts(), **kw)


def _ids(batch, seq, seed=3):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_and_cache_is_consistent(arch):
    model, cm = _compiled(arch)
    ids = _ids(2, 13)
    full = cm(ids)
    with torch.no_grad():
        ref = model(ids).logits
    assert full.shape == (2, 13, 256) and full.dtype == torch.float32
    assert rel_err(full, ref) < 1e-5, rel_err(full, ref)

    n = 8
    last = cm.prefill(ids[:, :n], reserve=13 - n)
    steps = [last]
    for t in range(n, 13):
        steps.append(cm.decode(ids[:, t]))
    assert cm.past_length == 13
    dec = torch.stack(steps, dim=1)                      # logits at positions n-1 .. 12
    err = rel_err(dec, full[:, n - 1:])
    assert err < 1e-5, err


def test_call_keeps_no_cache_and_reset_frees():
    _, cm = _compiled("qwen3_moe")
    cm.prefill(_ids(1, 4))
    assert cm.past_length == 4
    cm(_ids(1, 6))                                       # a fresh forward does not touch the generation cache
    assert cm.past_length == 4
    cm.reset()
    assert cm.past_length == 0 and cm._cache.nbytes == 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_greedy_generate_matches_transformers(arch):
    model, cm = _compiled(arch)
    ids = _ids(2, 6, seed=5)
    out = cm.generate(ids, max_new_tokens=8)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 14)
    assert torch.equal(out, ref)


def test_generate_preallocates_the_cache_once():
    _, cm = _compiled("mixtral")
    seen = []
    cm.generate(_ids(2, 5), max_new_tokens=6, stream=lambda t: seen.append((t.clone(), cm._cache.capacity)))
    assert [c for _, c in seen] == [11] * 6
    assert all(t.shape == (2,) and t.dtype == torch.long for t, _ in seen)


def test_generate_stops_at_eos_and_pads():
    _, cm = _compiled("qwen3_moe")
    ids = _ids(2, 5)
    free = cm.generate(ids, max_new_tokens=6)
    eos = int(free[0, 6])                                # row 0's second new token becomes the eos
    out = cm.generate(ids, max_new_tokens=6, eos_token_id=[eos])
    # expected: each row as without eos up to its first eos, then eos (the pad, as the graph has
    # no pad_token_id); generation ends once every row has stopped
    expected, stops = free.clone(), []
    for r in range(2):
        new = free[r, 5:].tolist()
        stop = new.index(eos) if eos in new else 5
        expected[r, 5 + stop + 1:] = eos
        stops.append(stop)
    assert stops[0] <= 1
    assert torch.equal(out, expected[:, :5 + max(stops) + 1])


def test_generate_zero_new_tokens():
    _, cm = _compiled("mixtral")
    ids = _ids(1, 3)
    assert torch.equal(cm.generate(ids, max_new_tokens=0), ids)
