"""Bad inputs are InputErrors with one-line messages; broken graphs and weights are ArtifactErrors."""

from __future__ import annotations

import pytest
import torch

from ktc.errors import ArtifactError, InputError
from ktc.runtime.model import CompiledModel
from tests.runtime.helpers import Builder, TorchExperts, graph_from_hf, hf_model


@pytest.fixture(scope="module")
def cm():
    graph, weights = graph_from_hf(hf_model("qwen3_moe"))
    return CompiledModel(graph, weights, cpu_kernels=TorchExperts(), max_batch_size=2)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_token_outside_vocabulary(cm):
    with pytest.raises(InputError, match=r"^token id 999 is outside the vocabulary \(0\.\.255\)$") as e:
        cm(torch.tensor([[1, 999, 2]]))
    _one_line(e)
    with pytest.raises(InputError, match="token id -1 is outside"):
        cm.generate(torch.tensor([[-1, 3]]))


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.tensor([[True]]), "integer token ids"),
    (torch.tensor([1, 2, 3]), r"shape \[batch, seq\]"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \[batch, seq\]"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    ([[1, 2]], "torch tensor"),
    (torch.zeros(3, 2, dtype=torch.long), "max_batch_size"),
])
def test_bad_input_ids(cm, bad, match):
    for call in (cm, cm.generate):
        with pytest.raises(InputError, match=match) as e:
            call(bad)
        _one_line(e)


def test_int32_ids_are_fine(cm):
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(cm(ids.to(torch.int32)), cm(ids))


def test_too_long(cm):
    ids = torch.zeros(1, 250, dtype=torch.long)
    with pytest.raises(InputError, match=r"prompt \(250 tokens\) \+ max_new_tokens \(7\).*context \(256 tokens\)"):
        cm.generate(ids, max_new_tokens=7)
    with pytest.raises(InputError, match="context"):
        cm(torch.zeros(1, 257, dtype=torch.long))


def test_max_context_overrides_config():
    graph, weights = graph_from_hf(hf_model("qwen3_moe"))
    m = CompiledModel(graph, weights, cpu_kernels=TorchExperts(), max_context=8)
    m.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(InputError, match=r"context \(8 tokens\)"):
        m.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=5)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=-1), dict(max_new_tokens=1.5), dict(temperature=-0.1),
                                dict(top_p=2.0), dict(top_k=-3)])
def test_bad_generate_options(cm, kw):
    with pytest.raises(InputError):
        cm.generate(torch.tensor([[1, 2]]), **kw)


def test_decode_needs_prefill(cm):
    cm.reset()
    with pytest.raises(InputError, match="prefill"):
        cm.decode(torch.tensor([1]))


def test_missing_or_misshapen_weight():
    graph, weights = graph_from_hf(hf_model("mixtral"))
    name = next(iter(weights))
    with pytest.raises(ArtifactError, match="missing"):
        CompiledModel(graph, {k: v for k, v in weights.items() if k != name}, cpu_kernels=TorchExperts())
    with pytest.raises(ArtifactError, match="shape"):
        CompiledModel(graph, weights | {name: weights[name][:1]}, cpu_kernels=TorchExperts())


def test_unsupported_attention_kind_and_bad_graph():
    b = Builder()
    y = b.node("attention", [b.input("x"), b.input("cos"), b.input("sin")], weights={}, kind="sparse", layer=0,
               num_heads=1, scaling=1.0)
    graph, weights = b.graph([y])
    with pytest.raises(ArtifactError, match="attention kind 'sparse'"):
        CompiledModel(graph, weights)
    graph.nodes[0].op = "conv"
    with pytest.raises(ArtifactError, match="invalid graph"):
        CompiledModel(graph, weights)
