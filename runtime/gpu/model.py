"""GpuModel: a compiled model run wholly on one CUDA GPU, with the API of CompiledModel.

    m = ktc.load("qwen.ktc")                  # an artifact compiled with --target cuda
    logits = m(input_ids)                     # [batch, seq, vocab] float32 on the CPU
    out = m.generate(input_ids, max_new_tokens=64)

prefill runs the prompt in one pass (flash attention over the static cache); each decode
step after the first replays a CUDA graph captured for this batch and cache (token ids and
positions are copied into static device buffers, the graph's kernels read them there).
`step(tokens)` is one decode step on device tensors, for benchmarks and servers.

Short prompts (batch x padded length <= PREFILL_GRAPH_TOKENS) prefill in CUDA graphs too: without
one, a short prefill is bound by the host launching its ~14 kernels a layer (an H100, the 48-layer
Qwen3-30B-A3B shape, 32 tokens: 49.9 ms of wall time for 10.8 ms of GPU work; bench/gpu_prefill_host.py).
The prompt is padded to a power of two (at least PREFILL_GRAPH_MIN) and one graph per (batch,
padded length) is captured at its first use; the padding sits after the prompt, so causal
attention keeps it out of every real token, and the head reads the last real position, whose index
is a device tensor. The pads' cache entries lie past the prompt: the next decode step overwrites the
first and no kernel reads past its own position. A new prompt keeps the cache's buffers when they
are big enough (KVCache.clear), so the captured graphs stay valid across prompts. Artifacts with
CPU experts prefill without a graph (their CPU part is host work).

Heterogeneous artifacts (routed experts partly on the CPU) run the same way: the executor's
schedule has host actions (wait for a layer's inputs, run its CPU experts) between stretches of
stream work, and a decode step is captured as one CUDA graph per stretch (one per MoE layer),
replayed in order with the host actions between them. Where the CPU experts have work (a slot per
token on average), each graph is launched before the previous layer's CPU kernel runs (_replay_ahead):
it starts with a kernel that waits on the GPU for the step count the host writes to pinned memory when
that kernel is done, so the launch no longer stands between the CPU's result and the GPU's next work.
`profile(True)` / `layer_stats()` report per MoE layer the CPU kernel time, the wait for its inputs and the
GPU time spent beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ktc.errors import HostError, InputError
from ktc.ir import Graph

from ..model import CompiledModel
from ..sampling import sample
from .executor import GpuExecutor
from .kv_cache import GpuKVCache

PREFILL_GRAPH_TOKENS = 2048   # the most batch x padded-length tokens a prefill CUDA graph serves
PREFILL_GRAPH_MIN = 16        # the shortest padded length (shorter prompts share its graph)


class GpuModel(CompiledModel):
    def __init__(self, graph: Graph, weights: Mapping[str, Any], kernels: Any, tokenizer: Any = None,
                 max_batch_size: int = 8, max_context: int | None = None, device: str | torch.device = "cuda",
                 cuda_graphs: bool = True, cpu_kernels: Any = None):
        if not torch.cuda.is_available():
            raise HostError("this model was compiled for --target cuda and this host has no CUDA GPU "
                            "(torch.cuda.is_available() is False): recompile it with --target cpu")
        self.graph = graph
        self.config = dict(graph.config)
        self.tokenizer = tokenizer
        self.cpu_kernels = cpu_kernels
        self.device = torch.device(device)
        self.kernels = kernels
        self._set_limits(graph, max_batch_size, max_context)
        self.executor = GpuExecutor(graph, weights, kernels, self.device, cpu_kernels=cpu_kernels,
                                    max_batch_size=self.max_batch_size)
        self._cache = self._new_cache()
        self.cuda_graphs = cuda_graphs
        self._cuda_graph: dict[str, Any] | None = None
        self._prefill_graphs: dict[tuple[int, int], dict[str, Any]] = {}
        self._prefill_pool: Any = None
        self._prefill_uncapturable: set[tuple[int, int]] = set()   # shapes whose capture failed: eager
        self._sample_stream: tuple[torch.Generator | None, int, int] | None = None   # see _sampling_stream
        self._host_wait_works: bool | None = None    # see _can_launch_ahead

    def _new_cache(self) -> GpuKVCache:
        return GpuKVCache(self._specs, self.device, self.max_batch_size, self.max_context)

    # -- forward passes on device tensors -------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache: GpuKVCache, last_only: bool) -> torch.Tensor:
        b, s = ids.shape
        cache.reserve(b, cache.length + s)
        ids_d = ids.to(self.device, non_blocking=True)
        pos = (cache.length + torch.arange(s, device=self.device)).expand(b, s).contiguous()
        out = self.executor.run(ids_d, pos, cache, cache.length, last_only)
        cache.advance(s)
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: `tokens` [batch] (any device) -> logits [batch, vocab] float32 on the GPU."""
        cache = self._cache
        b = tokens.shape[0]
        cache.reserve(b, cache.length + 1)
        if not self.cuda_graphs:
            return self._forward(tokens.reshape(b, 1), cache, True)[:, -1]
        g = self._cuda_graph
        if g is None or g["batch"] != b or g["generation"] != cache.generation:
            out = self._forward(tokens.reshape(b, 1), cache, True)[:, -1]   # compiles the decode kernels
            self._capture(b)
            return out
        g["ids"].copy_(tokens.reshape(b, 1), non_blocking=True)
        g["pos"].fill_(cache.length)
        if g["ahead"]:
            self._replay_ahead(g["plan"], b)
        else:
            for kind, item in g["plan"]:
                if kind == "graph":
                    item.replay()
                else:
                    item.run(b)
        cache.advance(1)
        return g["out"]

    @staticmethod
    def _replay_ahead(plan: list[tuple[str, Any]], b: int) -> None:
        """A decode step whose graphs (graph, run, graph, ..., graph) wait on the GPU for each layer's CPU kernel:
        each graph is launched before the previous layer's kernel runs, so the launch is off the critical path
        and the GPU starts on the layer's result the moment the host releases it. If the host stops half way
        (an error, an interrupt), every layer is released so no kernel spins on, and the counts are made equal
        again once the GPU is done."""
        graphs = [item for kind, item in plan[0::2]]
        runs = [item for kind, item in plan[1::2]]
        ahead = runs[0].launch_ahead
        graphs[0].replay()
        try:
            for graph, off in zip(graphs[1:], runs, strict=True):
                if ahead:
                    graph.replay()
                off.run(b)
                off.release()
                if not ahead:
                    graph.replay()
        except BaseException:
            for off in runs:
                off.release()
            torch.cuda.synchronize()
            for off in runs:
                off.resync()
            raise

    def _capture(self, b: int) -> None:
        """Capture a decode step at batch b: one CUDA graph per stretch of stream work of the
        executor's schedule (one in all for a model without CPU experts)."""
        cache = self._cache
        ex = self.executor
        ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        pos = torch.full((b, 1), cache.length, dtype=torch.long, device=self.device)
        torch.cuda.synchronize()
        state = ex.start(ids, pos, cache, cache.length, True)
        pool = torch.cuda.graph_pool_handle()
        segments = ex.segments()
        ahead = self._can_launch_ahead(segments, b)
        plan: list[tuple[str, Any]] = []
        out = None
        try:
            for off in ex.offloads:
                off.await_host = ahead
            with torch.no_grad():
                for n, (kind, actions) in enumerate(segments):
                    if kind == "host":
                        action, i = ex.actions[actions[0]]
                        plan.append((action, ex.steps[i][1]))    # the CpuExpertsOffload: acts at replay only
                        continue
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        for k in actions:
                            ex.do(k, state)
                        if n == len(segments) - 1:
                            out = ex.finish(state)[:, -1]
                    plan.append(("graph", graph))
        finally:
            for off in ex.offloads:
                off.await_host = False
        self._cuda_graph = {"plan": plan, "ids": ids, "pos": pos, "out": out, "batch": b,
                            "generation": cache.generation, "ahead": ahead}

    def _can_launch_ahead(self, segments: list[tuple[str, list[int]]], b: int) -> bool:
        """Whether the decode graphs can be launched a layer ahead (_replay_ahead): stream and host stretches
        alternate, each host stretch is one CPU run, every CPU layer can and should wait on the GPU for its
        kernel (CpuExpertsOffload.can_await_host), and a kernel waiting on pinned memory does see the host's
        write here (checked once)."""
        ex = self.executor
        kinds = [kind for kind, _ in segments]
        if not ex.offloads or kinds[0::2] != ["stream"] * len(kinds[0::2]) or kinds[-1] != "stream":
            return False
        if kinds[1::2] != ["host"] * len(kinds[1::2]) or not all(len(a) == 1 for k, a in segments if k == "host"):
            return False
        if not all(off.can_await_host(b) for off in ex.offloads):
            return False
        if self._host_wait_works is None:
            self._host_wait_works = ex.offloads[0].check_host_wait()
        return self._host_wait_works

    # -- the CPU experts' timings (heterogeneous artifacts) ------------------------------------
    def profile(self, on: bool = True) -> None:
        """Start (on) or stop collecting per-layer CPU expert timings; starting clears them."""
        self.executor.profile(on)

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per MoE layer with CPU experts, since profile(True): calls, mean tokens, and per call
        cpu_ms (the CPU kernel), wait_ms (waiting for the GPU to deliver the inputs) and gpu_ms
        (GPU work running beside the kernel); see runtime/gpu/offload.py LayerStats."""
        return self.executor.layer_stats()

    # -- the CompiledModel API ---------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = self._check_ids(input_ids)
        self._check_length(ids.shape[1], f"the input ({ids.shape[1]} tokens)")
        return self._forward(ids, self._new_cache(), False).cpu()

    def reset(self) -> None:
        self._cache.reset()
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured CUDA graphs (they hold the launches of the configs in force when captured:
        runtime.tuning.apply_records calls this)."""
        self._cuda_graph = None
        self._prefill_graphs = {}

    def prefill(self, input_ids: torch.Tensor, reserve: int = 0) -> torch.Tensor:
        return self._prefill(input_ids, reserve).cpu()

    def _prefill(self, input_ids: torch.Tensor, reserve: int = 0) -> torch.Tensor:
        """Last-position logits [batch, vocab] float32 on the GPU (from a prefill graph: valid until the
        next prefill of that shape)."""
        ids = self._check_ids(input_ids)
        b, n = ids.shape
        self._check_length(n + reserve, f"the prompt ({n} tokens) + {reserve} new tokens")
        padded = self._prefill_graph_length(b, n)
        need = max(n + reserve, padded or 0)
        cache = self._cache
        if cache.batch == b and cache.capacity >= need:
            cache.clear()
        else:
            self.reset()
            cache.reserve(b, need)
        if padded is None:
            return self._forward(ids, cache, True)[:, -1]
        return self._prefill_in_graph(ids, padded)

    def _prefill_graph_length(self, b: int, n: int) -> int | None:
        """The padded length a prompt of b rows x n tokens prefills at in a CUDA graph, or None (eager)."""
        if not self.cuda_graphs or self.executor.offloads:
            return None
        padded = max(PREFILL_GRAPH_MIN, 1 << (n - 1).bit_length())
        if b * padded > PREFILL_GRAPH_TOKENS or (self.max_context is not None and padded > self.max_context):
            return None
        return None if (b, padded) in self._prefill_uncapturable else padded

    def _prefill_in_graph(self, ids: torch.Tensor, padded: int) -> torch.Tensor:
        b, n = ids.shape
        cache = self._cache
        g = self._prefill_graphs.get((b, padded))
        if g is not None and g["generation"] == cache.generation:
            g["ids"][:, :n].copy_(ids)
            g["last"].fill_(n - 1)
            g["graph"].replay()
            cache.advance(n)
            return g["out"]
        g = {"ids": torch.zeros(b, padded, dtype=torch.long, device=self.device),
             "pos": torch.arange(padded, device=self.device).expand(b, padded).contiguous(),
             "last": torch.full((1,), n - 1, dtype=torch.long, device=self.device), "generation": cache.generation}
        g["ids"][:, :n].copy_(ids)
        out = self.executor.run(g["ids"], g["pos"], cache, 0, True, g["last"])[:, -1]   # compiles the kernels
        try:
            self._capture_prefill(g)
            self._prefill_graphs[(b, padded)] = g
        except RuntimeError:            # an op that cannot be captured: this shape stays eager
            self._prefill_uncapturable.add((b, padded))
        cache.advance(n)
        return out

    def _capture_prefill(self, g: dict[str, Any]) -> None:
        torch.cuda.synchronize()
        ex = self.executor
        state = ex.start(g["ids"], g["pos"], self._cache, 0, True, g["last"])
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._prefill_pool):
            for k in range(len(ex.actions)):
                ex.do(k, state)
            g["out"] = ex.finish(state)[:, -1]
        g["graph"] = graph

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._cache.length == 0:
            raise InputError("decode() needs a prompt first: call prefill()")
        ids = self._check_ids(token_ids.reshape(-1, 1) if isinstance(token_ids, torch.Tensor) else token_ids,
                              "token_ids")
        self._check_length(self._cache.length + 1, f"the sequence ({self._cache.length + 1} tokens)")
        return self.step(ids[:, 0]).clone().cpu()

    # Hooks of CompiledModel.generate: logits stay on the GPU and the token is chosen there (Triton
    # argmax, or the Triton sampler for temperature > 0); only the chosen ids [batch] come back.
    def _first_logits(self, ids: torch.Tensor, reserve: int) -> torch.Tensor:
        return self._prefill(ids, reserve)

    def _choose_token(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      generator: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if temperature == 0.0:
            token_dev = self.kernels.sampling.argmax(logits)
            return token_dev.cpu(), token_dev
        device_sample = getattr(self.kernels.sampling, "sample", None)
        if device_sample is None:       # an artifact whose kernel sources predate the device sampler
            token = sample(logits.cpu(), temperature, top_k, top_p, generator)
            return token, token.to(self.device)
        seed, step = self._sampling_stream(generator)
        token_dev = device_sample(logits, temperature, top_k, top_p, seed, step)
        return token_dev.cpu(), token_dev

    def _sampling_stream(self, generator: torch.Generator | None) -> tuple[int, int]:
        """(kernel seed, step) for the next sampled token. generate() makes one generator per call
        from the user's seed: its first token draws the kernel seed from it (so the same seed gives
        the same tokens), later tokens with the same generator advance the step. Without a seed
        every token draws a fresh kernel seed from torch's global RNG, as the CPU sampler would."""
        stream = self._sample_stream
        if generator is not None and stream is not None and stream[0] is generator:
            self._sample_stream = (generator, stream[1], stream[2] + 1)
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            self._sample_stream = (generator, seed, 0)
        return self._sample_stream[1], self._sample_stream[2]

    def _to_device(self, token: torch.Tensor) -> torch.Tensor:
        return token.to(self.device)

    def _next_logits(self, token: torch.Tensor) -> torch.Tensor:
        return self.step(token)
