"""How many of a token's CPU experts the GPU takes over PCIe at decode (runtime/gpu/offload.py): the cost
model and the KTC_PCIE_EXPERTS setting. The split itself runs in tests/runtime/gpu/test_hybrid.py (CUDA)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktc.errors import InputError
from ktc.runtime.gpu import offload


def test_model_moves_nothing_while_the_cpu_alone_is_faster_and_some_experts_of_a_qwen3_layer():
    int8 = offload.pcie_take_model(8, 4_866_048)        # one Qwen3-30B-A3B expert, int8 g128 with its scales
    assert int8[:3] == (0, 0, 0)                          # one or two experts: the GPU's fixed latency loses
    assert 1 <= int8[5] <= 2 and int8[8] >= int8[5]
    assert offload.pcie_take_model(8, 10_000) == (0,) * 9   # tiny experts: never worth a PCIe round


@given(top_k=st.integers(1, 16), mb=st.floats(0.01, 64.0))
def test_model_takes_at_most_n_and_only_what_the_model_says_is_faster(top_k, mb):
    b = int(mb * 1e6)
    take = offload.pcie_take_model(top_k, b)
    assert len(take) == top_k + 1 and take[0] == 0
    assert all(0 <= c <= n for n, c in enumerate(take))
    for n, c in enumerate(take):
        if c:   # the GPU's side alone, fixed latency included, must beat the CPU running all n
            assert offload.PCIE_GPU_FIXED_S + c * b / offload.PCIE_GPU_BW < n * b / offload.PCIE_HOST_BW


@pytest.mark.parametrize("value,want", [("off", None), ("0", None), ("0,0,1,1,2", (0, 0, 1, 1, 2, 2, 2, 2, 2)),
                                        ("1", (0, 1, 1, 1, 1, 1, 1, 1, 1)), ("0,0,0", None)])
def test_setting(monkeypatch, value, want):
    monkeypatch.setenv("KTC_PCIE_EXPERTS", value)
    assert offload.pcie_take_setting(8, 4_866_048) == want


def test_setting_auto_is_the_model(monkeypatch):
    monkeypatch.setenv("KTC_PCIE_EXPERTS", "auto")
    assert offload.pcie_take_setting(8, 4_866_048) == offload.pcie_take_model(8, 4_866_048)


@pytest.mark.parametrize("value", ["two", "1,-1", "0.5"])
def test_bad_setting_is_one_line(monkeypatch, value):
    monkeypatch.setenv("KTC_PCIE_EXPERTS", value)
    with pytest.raises(InputError, match="KTC_PCIE_EXPERTS"):
        offload.pcie_take_setting(8, 4_866_048)


def test_auto_setting_leaves_cold_cpu_experts_alone(monkeypatch):
    """A calibrated placement whose CPU experts get almost no slots would only pay the share's launches."""
    monkeypatch.delenv("KTC_PCIE_EXPERTS", raising=False)
    b = 4_866_048
    assert offload.pcie_take_setting(8, b, cpu_share=80 / 128) == offload.pcie_take_model(8, b)
    assert offload.pcie_take_setting(8, b, cpu_share=0.01) is None
    assert offload.pcie_expected_saving(8, b, 0.0, offload.pcie_take_model(8, b)) == -offload.PCIE_STEP_COST_S
    monkeypatch.setenv("KTC_PCIE_EXPERTS", "1")           # an explicit table is taken as given
    assert offload.pcie_take_setting(8, b, cpu_share=0.01) == (0,) + (1,) * 8


def test_slot_share_from_calibrated_load_or_expert_count():
    from ktc.ir import Node

    def node(**attrs):
        return Node(name="layers.0.mlp.experts.cpu", op="moe_experts", inputs=[], outputs=[], attrs=attrs)

    assert offload._slot_share(node(num_experts=4)) == 1.0
    assert offload._slot_share(node(experts=[0, 2], num_global_experts=8)) == 0.25
    load = [0.5, 0.0, 0.25, 0.0, 0.0, 0.125, 0.125, 0.0]
    assert offload._slot_share(node(experts=[0, 2], num_global_experts=8, expert_load=load)) == 0.75


def test_graphs_wait_on_the_gpu_only_where_the_cpu_experts_have_work():
    """The GPU-side wait for the CPU kernel pays where a token gives the node's experts a slot on average; a
    calibrated placement whose CPU experts are almost never routed to keeps the plain launch order."""
    from ktc.ir import Node

    def node(**attrs):
        return Node(name="layers.0.mlp.experts.cpu", op="moe_experts", inputs=[], outputs=[], attrs=attrs)

    assert offload.host_wait_pays(node(experts=list(range(80)), num_global_experts=128, top_k=8))
    assert offload.host_wait_pays(node(experts=[0, 1], num_global_experts=16, top_k=8))          # 1 slot a token
    cold = [0.0] * 120 + [0.125] * 8                                                            # experts 0-79 unused
    assert not offload.host_wait_pays(node(experts=list(range(80)), num_global_experts=128, top_k=8,
                                           expert_load=cold))
