"""moe_experts on the CPU runtime: a node holding a subset of the router's experts (attrs
"experts", set by the expert_split pass) hands its kernel local rows, -1 for the others."""

import torch

from ktc.ir import Node
from ktc.runtime.ops.base import RunContext
from ktc.runtime.ops.moe import MOE_EXPERTS, expert_table


class RecordingKernels:
    def moe_experts(self, name, x, tw, ids, packed):
        self.ids = ids.clone()
        return torch.zeros_like(x)


def _node(experts=None):
    attrs = {"num_experts": 3 if experts else 8, "hidden_size": 4, "intermediate_size": 2, "top_k": 2,
             "act": "silu"}
    if experts:
        attrs.update(experts=experts, num_global_experts=8)
    return Node("l0.experts.cpu", "moe_experts", ["x", "tw", "ti"], ["y"], {"gate_up": "g", "down": "d"}, attrs,
                device="cpu", kernel="k")


def test_subset_node_maps_router_ids_to_its_rows_and_the_rest_to_minus_one():
    node = _node([1, 5, 6])
    assert expert_table(node).tolist() == [-1, 0, -1, -1, -1, 1, 2, -1]
    assert expert_table(_node()) is None
    w = MOE_EXPERTS.prepare(node, {"gate_up": torch.zeros(3, 4, 4), "down": torch.zeros(3, 4, 2)})
    k = RecordingKernels()
    ids = torch.tensor([[[5, 0], [6, 1], [2, 3]]], dtype=torch.int32)
    MOE_EXPERTS.run(node, [torch.zeros(1, 3, 4), torch.ones(1, 3, 2), ids], w, RunContext(cpu_kernels=k))
    assert k.ids.tolist() == [[1, -1], [2, 0], [-1, -1]]
