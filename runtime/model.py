"""CompiledModel: a lowered graph with its weights, run on the CPU with a KV cache.

    m = CompiledModel(graph, weights, cpu_kernels=kernels)
    logits = m(input_ids)                         # [batch, seq, vocab], a fresh forward
    out = m.generate(input_ids, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=0)

generate prefills the whole prompt in one pass, then decodes one token per step from the
KV cache; prefill() and decode() are those two steps on their own (for benchmarks and
servers that drive the loop themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ktc.errors import InputError
from ktc.ir import Graph

from .executor import Executor
from .kv_cache import KVCache, layer_specs
from .sampling import check_options, make_generator, sample


def _token_set(ids: int | Iterable[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class CompiledModel:
    def __init__(self, graph: Graph, weights: Mapping[str, Any], cpu_kernels: Any = None, tokenizer: Any = None,
                 max_batch_size: int = 8, max_context: int | None = None):
        self.graph = graph
        self.config = dict(graph.config)
        self.tokenizer = tokenizer
        self.cpu_kernels = cpu_kernels
        self.executor = Executor(graph, weights, cpu_kernels)
        self._set_limits(graph, max_batch_size, max_context)
        self._cache = self._new_cache()

    def _set_limits(self, graph: Graph, max_batch_size: int, max_context: int | None) -> None:
        """Vocabulary size, context and batch limits, and the cache layout (shared with the GPU model)."""
        vocab = self.config.get("vocab_size")
        if vocab is None:
            emb = graph.nodes_of("embedding")
            vocab = graph.weights[emb[0].weights["weight"]].shape[0] if emb else None
        self.vocab_size = int(vocab) if vocab is not None else None
        limit = max_context if max_context is not None else self.config.get("max_position_embeddings")
        self.max_context = int(limit) if limit else None
        self.max_batch_size = int(max_batch_size)
        self._specs = layer_specs(graph)

    def _new_cache(self) -> KVCache:
        return KVCache(self._specs, max_batch_size=self.max_batch_size, max_context=self.max_context)

    # -- input checks ---------------------------------------------------------------
    def _check_ids(self, input_ids: Any, what: str = "input_ids") -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"{what} must be a torch tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise InputError(f"{what} must hold integer token ids (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise InputError(f"{what} must have shape [batch, seq], got shape {list(input_ids.shape)}")
        batch, seq = input_ids.shape
        if batch == 0 or seq == 0:
            raise InputError(f"{what} is empty (shape {list(input_ids.shape)})")
        if batch > self.max_batch_size:
            raise InputError(f"batch of {batch} is larger than max_batch_size ({self.max_batch_size})")
        ids = input_ids.to(torch.long)
        if self.vocab_size is not None:
            bad = (ids < 0) | (ids >= self.vocab_size)
            if bool(bad.any()):
                tid = int(ids[bad][0])
                raise InputError(f"token id {tid} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def _check_length(self, length: int, what: str) -> None:
        if self.max_context is not None and length > self.max_context:
            raise InputError(f"{what} is longer than the model context ({self.max_context} tokens)")

    # -- forward ----------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] (float32) of a fresh forward; no cache is kept."""
        ids = self._check_ids(input_ids)
        self._check_length(ids.shape[1], f"the input ({ids.shape[1]} tokens)")
        return self.executor.forward(ids, self._new_cache())

    @property
    def past_length(self) -> int:
        """How many tokens the generation cache holds."""
        return self._cache.length

    def reset(self) -> None:
        """Forget the cached tokens and free the cache."""
        self._cache.reset()

    def prefill(self, input_ids: torch.Tensor, reserve: int = 0) -> torch.Tensor:
        """Start over with `input_ids` [batch, seq] as the prompt; logits of its last token [batch, vocab].
        `reserve` more tokens are preallocated in the cache for decode steps."""
        ids = self._check_ids(input_ids)
        self._check_length(ids.shape[1] + reserve, f"the prompt ({ids.shape[1]} tokens) + {reserve} new tokens")
        self.reset()
        self._cache.reserve(ids.shape[0], ids.shape[1] + reserve)
        return self.executor.forward(ids, self._cache, last_only=True)[:, -1]

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (`token_ids` [batch]) to the cache; their logits [batch, vocab]."""
        if self._cache.length == 0:
            raise InputError("decode() needs a prompt first: call prefill()")
        ids = self._check_ids(token_ids.reshape(-1, 1) if isinstance(token_ids, torch.Tensor) else token_ids,
                              "token_ids")
        self._check_length(self._cache.length + 1, f"the sequence ({self._cache.length + 1} tokens)")
        return self.executor.forward(ids, self._cache, last_only=True)[:, -1]

    # -- generation -----------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Iterable[int] | None = None,
                 stream: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """Prompt [batch, seq] -> [batch, seq + new] token ids (new <= max_new_tokens).

        Greedy when temperature == 0, else sampling with top_k / top_p (seeded by `seed`).
        A sequence stops at an eos token (default: the model's eos_token_id); later positions
        of a stopped sequence hold pad_token_id (or its eos), and generation ends when every
        sequence has stopped. `stream` is called with each step's new tokens [batch]."""
        ids = self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens}")
        max_new_tokens = int(max_new_tokens)
        check_options(temperature, top_k, top_p)
        batch, seq = ids.shape
        self._check_length(seq + max_new_tokens, f"prompt ({seq} tokens) + max_new_tokens ({max_new_tokens})")
        if max_new_tokens == 0:
            return ids.clone()
        eos = _token_set(eos_token_id if eos_token_id is not None else self.config.get("eos_token_id"))
        eos_t = torch.tensor(eos, dtype=torch.long)
        pad = self.config.get("pad_token_id")
        pad = int(pad) if pad is not None else (eos[0] if eos else 0)
        generator = make_generator(seed)

        logits = self._first_logits(ids, reserve=max_new_tokens)
        finished = torch.zeros(batch, dtype=torch.bool)
        new: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            token, token_dev = self._choose_token(logits, temperature, top_k, top_p, generator)
            if eos:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= torch.isin(token, eos_t)
                token_dev = self._to_device(token)
            new.append(token)
            if stream is not None:
                stream(token)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = self._next_logits(token_dev)
        return torch.cat((ids, torch.stack(new, dim=1)), dim=1)

    # Hooks of the generation loop: where logits live and how a token is chosen. The CPU model
    # keeps everything on the CPU; the GPU model (runtime/gpu/model.py) keeps logits on the GPU.
    def _first_logits(self, ids: torch.Tensor, reserve: int) -> torch.Tensor:
        return self.prefill(ids, reserve=reserve)

    def _choose_token(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      generator: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids on the CPU, the same on the model's device) for the step."""
        token = sample(logits, temperature, top_k, top_p, generator)
        return token, token

    def _to_device(self, token: torch.Tensor) -> torch.Tensor:
        return token

    def _next_logits(self, token: torch.Tensor) -> torch.Tensor:
        return self.executor.forward(token[:, None], self._cache, last_only=True)[:, -1]
