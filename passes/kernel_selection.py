"""Kernel selection: give every node that needs generated code a kernel name.

A moe_experts node on the CPU gets the TVM expert kernel specialised for its shapes and
format; its two weights are marked as packed in that kernel's layout, so the artifact
writer packs them and the runtime hands them to the kernel untouched. Dense CPU ops run on
the runtime's built-in implementations and get no kernel name.

Every GPU-placed node gets a Triton kernel from ktc.codegen.gpu and its configs (see
passes/gpu_kernels.py); int4 GPU weights (experts, and dense linears with --gpu-dense-quant
int4) are marked as packed in the w4a16 layout, fp8 ones (--gpu-quant / --gpu-dense-quant fp8)
in the fp8 layout (moe.pack_fp8: float8_e4m3fn values + float32 group scales).
"""

from __future__ import annotations

from ktc.codegen.cpu_experts import ExpertKernelSpec
from ktc.ir import Graph, Node
from ktc.passes.manager import PassContext

CPU_EXPERT_LAYOUT = "cpu_experts"
GPU_W4A16_LAYOUT = "gpu_w4a16"
GPU_FP8_LAYOUT = "gpu_fp8"
GPU_LAYOUTS = {"int4": GPU_W4A16_LAYOUT, "fp8": GPU_FP8_LAYOUT}   # quantized GPU weight format -> layout


def expert_kernel_spec(graph: Graph, node: Node) -> ExpertKernelSpec:
    a = node.attrs
    group = graph.weights[node.weights["gate_up"]].group_size
    return ExpertKernelSpec(
        hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"], num_experts=a["num_experts"],
        top_k=a["top_k"], format=node.format, group_size=group,
    )


def kernel_selection(graph: Graph, ctx: PassContext) -> Graph:
    graph = graph.copy()
    gpu_nodes = [n for n in graph.nodes if n.device not in (None, "cpu")]
    if gpu_nodes:
        from ktc.passes.gpu_kernels import select_gpu_kernel

        for node in gpu_nodes:
            select_gpu_kernel(graph, node)
            if node.op == "moe_experts" and node.format in GPU_LAYOUTS:
                for role in ("gate_up", "down"):
                    graph.weights[node.weights[role]].layout = GPU_LAYOUTS[node.format]
            elif node.op != "moe_experts":
                for name in node.weights.values():
                    if graph.weights[name].format in GPU_LAYOUTS:
                        graph.weights[name].layout = GPU_LAYOUTS[graph.weights[name].format]
    for node in graph.nodes_of("moe_experts"):
        if node.device != "cpu":
            continue
        spec = expert_kernel_spec(graph, node)
        node.kernel = spec.name
        node.attrs["kernel_target"] = ctx.cpu_target
        for role in ("gate_up", "down"):
            graph.weights[node.weights[role]].layout = CPU_EXPERT_LAYOUT
    return graph
