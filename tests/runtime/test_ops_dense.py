"""rope, norms, mlp, linear, embedding and moe_experts against transformers / torch."""

from __future__ import annotations

import pytest
import torch

from ktc.errors import ArtifactError, KtcError
from ktc.ir import Weight
from ktc.runtime.executor import Executor
from tests.runtime.helpers import REF_KERNEL, Builder, TorchExperts, dense_mlp, hf_model, moe_block, rel_err

TOL = 1e-5
ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"]


def _one(op, inputs, n_out=1, **kw):
    b = Builder()
    names = [b.input(f"in{i}") for i in range(len(inputs))]
    out = b.node(op, names, n_out=n_out, **kw)
    outs = out if n_out > 1 else [out]
    graph, weights = b.graph(outs)
    res = Executor(graph, weights, cpu_kernels=kw.get("cpu_kernels")).execute(
        {n: t for n, t in zip(names, inputs, strict=True)})
    return [res[o] for o in outs]


def _rope(rot, pos):
    b = Builder()
    cos, sin = b.node("rope", [b.input("positions", "int64")], n_out=2, weights=dict(inv_freq=rot.inv_freq),
                      scaling=rot.attention_scaling)
    graph, weights = b.graph([cos, sin])
    out = Executor(graph, weights).execute({"positions": pos})
    return out[cos], out[sin]


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_matches_rotary_embedding(arch):
    model = hf_model(arch)
    rot = model.model.rotary_emb
    pos = torch.tensor([[0, 1, 2, 3, 100, 255], [7, 8, 9, 10, 11, 12]])
    cos, sin = _rope(rot, pos)
    x = torch.zeros(2, 6, 4)
    if arch == "deepseek_v2":                       # complex freqs_cis: e^{i theta} per pair
        cis = rot(x, pos)
        half = cos.shape[-1] // 2
        assert rel_err(cos[..., :half], cis.real) < TOL and rel_err(sin[..., :half], cis.imag) < TOL
    else:
        ref_cos, ref_sin = rot(x, pos)
        assert rel_err(cos, ref_cos) < TOL and rel_err(sin, ref_sin) < TOL


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_rms_norm_and_add_rms_norm(arch):
    model = hf_model(arch)
    mod = model.model.layers[0].post_attention_layernorm
    x, r = torch.randn(2, 5, 64) * 3, torch.randn(2, 5, 64)
    (y,) = _one("rms_norm", [x], weights=dict(weight=mod.weight), eps=mod.variance_epsilon)
    with torch.no_grad():
        assert rel_err(y, mod(x)) < TOL
        y, s = _one("add_rms_norm", [x, r], n_out=2, weights=dict(weight=mod.weight), eps=mod.variance_epsilon)
        assert torch.equal(s, x + r) and rel_err(y, mod(x + r)) < TOL


def test_mlp_output_gate_matches_qwen2_shared_expert():
    block = next(la.mlp for la in hf_model("qwen2_moe").model.layers)
    x = torch.randn(2, 7, 64)
    b = Builder()
    y = dense_mlp(b, b.input("x"), block.shared_expert, output_gate=block.shared_expert_gate)
    graph, weights = b.graph([y])
    out = Executor(graph, weights).execute({"x": x})[y]
    with torch.no_grad():
        flat = x.view(-1, 64)
        ref = torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    assert rel_err(out, ref.view(2, 7, 64)) < TOL


@pytest.mark.parametrize("fused", [False, True])
def test_mlp_gate_up_fused_or_not(fused):
    mlp = hf_model("deepseek_v3").model.layers[0].mlp          # the dense first layer
    x = torch.randn(3, 4, 64)
    b = Builder()
    y = dense_mlp(b, b.input("x"), mlp, fused=fused)
    graph, weights = b.graph([y])
    with torch.no_grad():
        assert rel_err(Executor(graph, weights).execute({"x": x})[y], mlp(x)) < TOL


def test_linear_and_embedding():
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 3, 64)
    (y,) = _one("linear", [x], weights=dict(weight=lin.weight, bias=lin.bias))
    with torch.no_grad():
        assert rel_err(y, lin(x)) < TOL
    table = torch.randn(10, 8, dtype=torch.bfloat16)                # any float dtype: float32 at load
    ids = torch.tensor([[1, 9, 0]])
    (h,) = _one("embedding", [ids], weights=dict(weight=table))
    assert h.dtype == torch.float32 and torch.equal(h, table.float()[ids])


def test_qwen2_sparse_moe_block():
    """router + moe_experts (through the kernel object) + gated shared expert + add == the HF block."""
    model = hf_model("qwen2_moe")
    block = model.model.layers[1].mlp
    x = torch.randn(2, 9, 64)
    b = Builder()
    y = moe_block(b, b.input("x"), block, model.config)
    graph, weights = b.graph([y])
    kernels = TorchExperts()
    out = Executor(graph, weights, cpu_kernels=kernels).execute({"x": x})[y]
    with torch.no_grad():
        assert rel_err(out, block(x)) < TOL
    assert kernels.calls == [(REF_KERNEL, ("down", "gate_up"))]


def _moe_graph(kernel=REF_KERNEL, packed=False):
    b = Builder()
    x, w, ids = b.input("x"), b.input("w"), b.input("ids", "int32")
    gate_up, down = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    y = b.node("moe_experts", [x, w, ids], weights=dict(gate_up=gate_up, down=down), kernel=kernel, num_experts=4,
               hidden_size=8, intermediate_size=8, top_k=2, act="silu")
    graph, weights = b.graph([y])
    if packed:
        for role, t in (("gate_up", gate_up), ("down", down)):
            name = graph.nodes[0].weights[role]
            graph.weights[name] = Weight(name, list(t.shape), "float32", {"load": name}, format="float32",
                                         layout="reference")
            weights[name] = {"w": t, "scales": torch.ones(1)}
    return graph, weights, gate_up, down


@pytest.mark.parametrize("packed", [False, True])
def test_moe_experts_dispatches_to_kernel(packed):
    graph, weights, gate_up, down = _moe_graph(packed=packed)
    kernels = TorchExperts()
    x, w = torch.randn(2, 3, 8), torch.rand(2, 3, 2)
    ids = torch.randint(0, 4, (2, 3, 2), dtype=torch.int32)
    out = Executor(graph, weights, cpu_kernels=kernels).execute({"x": x, "w": w, "ids": ids})
    y = out[graph.outputs[0]]
    assert y.shape == x.shape
    keys = ("down.scales", "down.w", "gate_up.scales", "gate_up.w") if packed else ("down", "gate_up")
    assert kernels.calls == [(REF_KERNEL, keys)]
    ref = TorchExperts().moe_experts("", x.view(-1, 8), w.view(-1, 2), ids.view(-1, 2),
                                     {"gate_up": gate_up, "down": down})
    assert rel_err(y.view(-1, 8), ref) < TOL


def test_moe_experts_never_falls_back_to_torch():
    graph, weights, _, _ = _moe_graph(kernel=None)
    with pytest.raises(ArtifactError, match="no kernel"):
        Executor(graph, weights, cpu_kernels=TorchExperts())
    graph, weights, _, _ = _moe_graph()
    with pytest.raises(KtcError, match="no.*CPU kernels|none are loaded"):
        Executor(graph, weights, cpu_kernels=None)


def test_packed_weight_on_a_dense_op_is_refused():
    b = Builder()
    y = b.node("linear", [b.input("x")], weights=dict(weight=torch.randn(4, 4)))
    graph, weights = b.graph([y])
    name = graph.nodes[0].weights["weight"]
    weights[name] = {"q": torch.zeros(4, 4, dtype=torch.int8)}
    with pytest.raises(ArtifactError, match="packed"):
        Executor(graph, weights)
