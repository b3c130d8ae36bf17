"""Sampling: greedy is argmax, seeds reproduce, top-k / top-p restrict the support."""

from __future__ import annotations

import pytest
import torch

from ktc.errors import InputError
from ktc.runtime.model import CompiledModel
from ktc.runtime.sampling import check_options, filter_logits, make_generator, sample
from tests.runtime.helpers import TorchExperts, graph_from_hf, hf_model


def _logits(batch=4, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.0, top_k=3, top_p=0.5), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = _logits()
    draws = [torch.stack([sample(logits, 1.0, generator=g) for _ in range(20)])
             for g in (make_generator(7), make_generator(7))]
    assert torch.equal(draws[0], draws[1])
    other = torch.stack([sample(logits, 1.0, generator=make_generator(8)) for _ in range(20)])
    assert not torch.equal(draws[0], other)


def test_top_k_restricts_support():
    logits = _logits()
    allowed = logits.topk(5, dim=-1).indices
    g = make_generator(0)
    for _ in range(200):
        tok = sample(logits, temperature=5.0, top_k=5, generator=g)
        assert (allowed == tok[:, None]).any(-1).all()


def test_top_p_restricts_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]          # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1   # the top token always stays
    g = make_generator(1)
    toks = {int(sample(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert toks == {0, 1}


def test_high_temperature_flattens():
    logits = _logits(batch=1, vocab=4)
    g = make_generator(3)
    assert len({int(sample(logits, 100.0, generator=g)) for _ in range(300)}) == 4


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                                dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_options(kw):
    opts = dict(temperature=1.0, top_k=0, top_p=1.0) | kw
    with pytest.raises(InputError):
        check_options(**opts)


def test_generate_seeded_sampling_reproducible():
    model = hf_model("mixtral")
    graph, weights = graph_from_hf(model)
    cm = CompiledModel(graph, weights, cpu_kernels=TorchExperts())
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95, seed=123)
    a, b = cm.generate(ids, **kw), cm.generate(ids, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, cm.generate(ids, **(kw | dict(seed=124))))
