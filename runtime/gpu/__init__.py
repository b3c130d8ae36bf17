"""The GPU runtime: runs a graph whose nodes are all placed on a CUDA GPU with Triton kernels.

kernels.py loads the kernel sources an artifact carries; ops.py runs each IR op with them;
executor.py runs a graph (static KV cache, prefill and decode); model.py is the user-facing
model with generate() and a CUDA graph for decode steps.
"""
