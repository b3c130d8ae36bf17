"""Calibration: how many routed slots each expert of each MoE layer receives on some prompts.

    data = calibrate("./Qwen3-30B-A3B", prompts)         # text, tokenized with the folder's tokenizer.json
    data = count_experts("./Qwen3-30B-A3B", [[1, 2, 3]])  # token ids
    write_calibration("calib.json", data)
    counts = read_calibration("calib.json")               # {decoder layer index: [count per expert]}

The placement pass (passes/placement.py) puts the hottest experts of each layer on the GPU.

The hidden states come from transformers' own model (loaded from the folder, forward passes
only, one prompt at a time), but the expert choice is ktc's: a forward pre-hook on each sparse
MoE block takes its input (the post-attention-norm hidden state, which is what the router op
sees in the captured graph) and routes it with the runtime's router op (ktc.runtime.ops.router)
using the graph's router attrs and the router weights read through the graph's weight sources.
So the counts are those of the compiled model's router, whatever transformers' own routing code
does. Needs torch and transformers (compile-time dependencies), never used by the runtime.

File format (JSON): {"format": "ktc-calibration", "version": 1, "model_type", "source" (the
model folder's name), "prompts" (sequences used), "tokens", "top_k", "layers": {"<decoder layer
index>": [slots of expert 0, 1, ...]}}; every layer's counts sum to tokens * top_k.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ktc.errors import KtcError

FORMAT = "ktc-calibration"
VERSION = 1
DEVICES = ("auto", "cpu", "cuda")
_LAYER = re.compile(r"layers\.(\d+)\.")

# progress(sequences done, sequences to run, tokens used so far)
Progress = Callable[[int, int, int], None]


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a CUDA GPU is visible, else "cpu"; KtcError for an unusable choice."""
    import torch

    if device not in DEVICES:
        raise KtcError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KtcError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return device


def load_tokenizer(model_dir: str | Path):
    """The folder's tokenizer.json (a `tokenizers.Tokenizer`, as `ktc run --prompt` uses it)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise KtcError(f"{model_dir} has no tokenizer.json: add the model's tokenizer files to the folder "
                       "(calibration tokenizes the prompts with it)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise KtcError(f"cannot read {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                       "re-download the tokenizer files") from None


def router_layers(graph) -> dict[int, Any]:
    """{decoder layer index: router node} of a captured graph."""
    out = {}
    for node in graph.nodes_of("router"):
        m = _LAYER.search(node.name)
        if m is None:
            raise KtcError(f"router node {node.name} has no decoder layer index in its name: a ktc capture bug")
        out[int(m.group(1))] = node
    return out


def calibrate(model_dir: str | Path, prompts: Sequence[str], max_tokens: int = 4096, device: str = "auto",
              progress: Progress | None = None) -> dict[str, Any]:
    """Expert counts of the model in `model_dir` on text prompts (see the module docstring)."""
    tokenizer = load_tokenizer(model_dir)
    if not prompts:
        raise KtcError("no prompts: give at least one non-empty prompt")
    ids = [tokenizer.encode(p).ids for p in prompts]
    if not any(ids):
        raise KtcError("every prompt encodes to no tokens: give some text")
    return count_experts(model_dir, ids, max_tokens=max_tokens, device=device, progress=progress)


def count_experts(model_dir: str | Path, token_ids: Sequence[Sequence[int]], max_tokens: int = 4096,
                  device: str = "auto", progress: Progress | None = None) -> dict[str, Any]:
    """Expert counts on token-id sequences: one forward pass per sequence, until `max_tokens`
    tokens are used (the last sequence used is cut to fit; each is cut to the model's context)."""
    import torch

    from ktc.capture import capture
    from ktc.capture.export import is_sparse
    from ktc.checkpoint import Checkpoint, evaluate_source, read_config

    if int(max_tokens) < 1:
        raise KtcError(f"--max-tokens must be at least 1, got {max_tokens}")
    dev = resolve_device(device)
    model_dir = Path(model_dir)
    read_config(model_dir)    # its errors first: a folder without config.json has no weights either
    ckpt = Checkpoint(model_dir)
    graph = capture(model_dir, ckpt)
    routers = router_layers(graph)
    if not routers:
        raise KtcError(f"{model_dir.name} has no MoE layers: there is nothing to calibrate")
    vocab = int(graph.config["vocab_size"])
    context = int(graph.config["max_position_embeddings"])
    batches = _plan(token_ids, int(max_tokens), context, vocab)

    model = _load_model(model_dir, dev)
    layers = model.model.layers
    counts = {i: torch.zeros(int(n.attrs["num_experts"]), dtype=torch.int64, device=dev) for i, n in routers.items()}
    hooks = []
    try:
        for i, node in routers.items():
            if i >= len(layers) or not is_sparse(layers[i].mlp):
                raise KtcError(f"layer {i} of {model_dir.name} is a MoE layer in ktc's graph but not in "
                               "transformers' model: a ktc capture bug")
            weight = evaluate_source(ckpt, graph.weights[node.weights["weight"]].source).to(dev)
            bias = node.weights.get("bias")
            bias = None if bias is None else evaluate_source(ckpt, graph.weights[bias].source).to(dev)
            hooks.append(layers[i].mlp.register_forward_pre_hook(
                _counting_hook(node.attrs, weight, bias, counts[i]), with_kwargs=True))
        used = 0
        if progress is not None:
            progress(0, len(batches), 0)
        with torch.inference_mode():
            for done, ids in enumerate(batches, 1):
                model.model(input_ids=torch.tensor([ids], dtype=torch.long, device=dev), use_cache=False)
                used += len(ids)
                if progress is not None:
                    progress(done, len(batches), used)
    finally:
        for h in hooks:
            h.remove()
    top_k = {int(n.attrs["top_k"]) for n in routers.values()}
    return {
        "format": FORMAT, "version": VERSION, "model_type": str(graph.config["model_type"]),
        "source": model_dir.resolve().name, "prompts": len(batches), "tokens": used,
        "top_k": max(top_k),
        "layers": {str(i): [int(c) for c in counts[i].tolist()] for i in sorted(counts)},
    }


def _plan(token_ids: Sequence[Sequence[int]], max_tokens: int, context: int, vocab: int) -> list[list[int]]:
    """The sequences to run: empty ones skipped, each cut to the context and the token budget."""
    out: list[list[int]] = []
    left = max_tokens
    for seq in token_ids:
        if left <= 0:
            break
        ids = [int(t) for t in seq][:min(context, left)]
        if not ids:
            continue
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise KtcError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}): "
                           "use the model's own tokenizer")
        out.append(ids)
        left -= len(ids)
    if not out:
        raise KtcError("no tokens to run: give at least one non-empty prompt")
    return out


def _counting_hook(attrs: dict[str, Any], weight, bias, counts):
    """A forward pre-hook that routes the block's input with ktc's router and adds the choices."""
    import torch

    from ktc.runtime.ops.router import route

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        _, ids = route(x.reshape(-1, x.shape[-1]), weight, bias, attrs)
        counts.add_(torch.bincount(ids.reshape(-1), minlength=counts.numel()))
        return None

    return hook


def _load_model(model_dir: Path, device: str):
    """transformers' CausalLM of the folder: bf16 on CUDA, float32 on the CPU, eval mode."""
    import torch
    import transformers as tf

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()   # its tqdm bar would break the CLI's progress display
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise KtcError(f"transformers cannot load {model_dir} ({str(e).splitlines()[0] if str(e) else ''}): "
                       "check the folder's config.json and weights") from None
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()
    try:
        return model.to(device).eval()
    except torch.cuda.OutOfMemoryError:
        raise KtcError("the model does not fit in GPU memory for calibration: use --device cpu") from None


def write_calibration(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` atomically (a temporary file in the same folder, renamed)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise KtcError(f"folder {path.parent} does not exist: create it or choose another -o path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_to_json(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_json(data: dict[str, Any]) -> str:
    """JSON with one line per field and per layer (a layer's counts stay on one line)."""
    fields = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k != "layers"]
    layers = [f"  {json.dumps(str(k))}: {json.dumps(v)}" for k, v in data.get("layers", {}).items()]
    fields.append(' "layers": {\n' + ",\n".join(layers) + "\n }")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def read_calibration(path: str | Path) -> dict[int, list[int]]:
    """{decoder layer index: slots per expert} of a `ktc calibrate` file; KtcError if it is not one."""
    path = Path(path)
    again = f"run `ktc calibrate MODEL_DIR --prompts FILE -o {path}` to make it again"
    if not path.is_file():
        raise KtcError(f"calibration file {path} does not exist: run `ktc calibrate MODEL_DIR --prompts FILE -o "
                       f"{path}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KtcError(f"{path} is not valid JSON: {again}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KtcError(f"{path} is not a ktc calibration file (no \"format\": \"{FORMAT}\"): {again}")
    if data.get("version") != VERSION:
        raise KtcError(f"{path} is a calibration file of version {data.get('version')!r}, this ktc reads version "
                       f"{VERSION}: {again}")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise KtcError(f"{path} has no \"layers\" with expert counts: {again}")
    out: dict[int, list[int]] = {}
    for key, counts in layers.items():
        if not (isinstance(key, str) and re.fullmatch(r"[0-9]+", key)):
            raise KtcError(f"{path}: layer key {key!r} is not a decoder layer index: {again}")
        if (not isinstance(counts, list) or not counts
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)):
            raise KtcError(f"{path}: the counts of layer {key} must be a list of non-negative integers: {again}")
        out[int(key)] = list(counts)
    return out
