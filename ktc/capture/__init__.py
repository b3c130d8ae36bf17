"""Capture: a Hugging Face MoE model folder -> ktc IR Graph (ktc.ir), weights never loaded.

    from ktc.capture import capture
    graph = capture("./Qwen3-30B-A3B")            # checks every weight against the safetensors headers
    graph = capture(cfg_dir, weights_free=True)   # plan from config.json alone

Steps: read config.json; build the transformers model on the meta device; swap its
RMSNorms, rotary embedding, attention, sparse MoE blocks and dense MLPs for ktc capture
ops (ktc.capture.ops); torch.export with dynamic batch and sequence dims
(ktc.capture.export); import the ExportedProgram into IR (ktc.capture.importer); name
every weight by its checkpoint key and check its source against the checkpoint headers.
One module per architecture family says what to swap and how weights are named:
qwen_moe (qwen2_moe, qwen3_moe), mixtral, deepseek (deepseek_v2, deepseek_v3).
Needs torch and transformers (compile-time dependencies), never used by the runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktc.checkpoint import Checkpoint, read_config
from ktc.errors import KtcError

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")

__all__ = ["SUPPORTED_MODEL_TYPES", "capture", "check_weights"]


def _arch(model_type: str):
    if model_type in ("qwen2_moe", "qwen3_moe"):
        from ktc.capture import qwen_moe as arch
    elif model_type == "mixtral":
        from ktc.capture import mixtral as arch
    else:
        from ktc.capture import deepseek as arch
    return arch


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


def _eos_ids(model_dir: Path, cfg: dict[str, Any], hf_config) -> list[int]:
    """eos ids of config.json, plus those of generation_config.json (where chat models keep
    their end-of-turn ids), in order, without repeats."""
    out: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", cfg.get("eos_token_id"))]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise KtcError(f"{gen} is not valid JSON: fix or delete it") from None
    for ids in sources:
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def _hf_config(model_dir: Path, cfg: dict[str, Any]):
    import transformers as tf

    try:
        return tf.AutoConfig.for_model(**cfg)
    except Exception as e:  # transformers raises many types for a bad config
        raise KtcError(f"{model_dir / 'config.json'} is not a valid {cfg['model_type']} config "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def capture(model_dir: str | Path, checkpoint: Checkpoint | None = None, *, weights_free: bool = False,
            dynamic_batch: bool = True):
    """The ktc IR Graph of the model in `model_dir` (a Hugging Face folder).

    checkpoint: the folder's Checkpoint (headers only); default Checkpoint(model_dir).
    weights_free: plan from config.json alone: no checkpoint is read (unless one is given,
    then it is used to choose between key layouts) and no weight is checked; weight dtypes
    are config.json's dtype.
    Raises KtcError for an unsupported model_type, a bad config.json, a missing checkpoint
    tensor or a tensor whose shape does not match the config."""
    from ktc.capture.export import build_meta_model, export_model, swap_modules
    from ktc.capture.importer import import_program
    from ktc.capture.ops import CaptureRope

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KtcError(f"model_type {model_type!r} in {model_dir / 'config.json'} is not supported; "
                       f"ktc captures: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?") if isinstance(
            cfg["quantization_config"], dict) else "?"
        raise KtcError(f"{model_dir.name} is a pre-quantized checkpoint (quantization_config: {method}); "
                       "ktc reads bf16 / fp16 / fp32 checkpoints and quantizes them itself")
    if checkpoint is None and not weights_free:
        checkpoint = Checkpoint(model_dir)
    keys = None if checkpoint is None else checkpoint.tensors.keys()

    hf_config = _hf_config(model_dir, cfg)
    default_dtype = _dtype_name(getattr(hf_config, "dtype", None))   # before the meta build sets float32
    arch = _arch(model_type)
    model = build_meta_model(hf_config)
    swap_modules(model, hf_config, arch)
    extra = {f"model.{name}.inv_freq": {"values": m.values, "dtype": "float32"}
             for name, m in model.model.named_modules() if isinstance(m, CaptureRope)}
    ep = export_model(model, dynamic_batch=dynamic_batch)

    def resolve(fqn: str):
        r = arch.weight(fqn, hf_config, keys)
        if r is not None:
            return r
        if fqn in extra:
            return fqn, extra[fqn]
        return fqn, {"load": fqn}

    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    lm_head_source = {"load": "model.embed_tokens.weight" if tied else "lm_head.weight"}

    def dtype_of(source):
        return source.get("dtype", "float32") if "values" in source else default_dtype

    config = {
        "model_type": model_type,
        "vocab_size": int(hf_config.vocab_size),
        "hidden_size": int(hf_config.hidden_size),
        "num_hidden_layers": int(hf_config.num_hidden_layers),
        "max_position_embeddings": int(hf_config.max_position_embeddings),
        "bos_token_id": getattr(hf_config, "bos_token_id", None),
        "eos_token_id": _eos_ids(model_dir, cfg, hf_config),
        "pad_token_id": getattr(hf_config, "pad_token_id", None),
        "tie_word_embeddings": tied,
        "hf_config": cfg,
    }
    graph = import_program(ep, resolve, lm_head_source, dtype_of, config)
    if checkpoint is not None and not weights_free:
        check_weights(graph, checkpoint)
    graph.validate()
    return graph


def _source_shape(ckpt: Checkpoint, source: dict[str, Any], weight: str) -> tuple[list[int], str]:
    """Shape and dtype of a source from headers, checking that the parts agree."""
    if "load" in source:
        info = ckpt.info(source["load"])          # KtcError naming the key when it is missing
        return list(info.shape), info.dtype
    if "values" in source:
        return [len(source["values"])], source.get("dtype", "float32")
    parts = [_source_shape(ckpt, s, weight) for s in source.get("stack") or source.get("concat") or []]
    if not parts:
        raise KtcError(f"weight {weight} has an empty source")
    keys = [k for s in (source.get("stack") or source.get("concat")) for k in _keys(s)]
    if len({p[1] for p in parts}) > 1:
        raise KtcError(f"the tensors of weight {weight} ({keys[0]}, ...) have different dtypes in the checkpoint")
    if "stack" in source:
        if any(p[0] != parts[0][0] for p in parts):
            raise KtcError(f"the tensors of weight {weight} ({keys[0]}, ...) have different shapes in the checkpoint")
        return [len(parts), *parts[0][0]], parts[0][1]
    dim = source["dim"]
    shape = list(parts[0][0])
    if any(len(p[0]) != len(shape) or [d for i, d in enumerate(p[0]) if i != dim]
           != [d for i, d in enumerate(shape) if i != dim] for p in parts):
        raise KtcError(f"the tensors of weight {weight} ({keys[0]}, ...) cannot be concatenated: shapes differ")
    shape[dim] = sum(p[0][dim] for p in parts)
    return shape, parts[0][1]


def _keys(source: dict[str, Any]) -> list[str]:
    from ktc.checkpoint import source_keys

    return source_keys(source)


def check_weights(graph, ckpt: Checkpoint) -> None:
    """Check every weight's source against the checkpoint headers (keys present, shapes equal
    to the declared shape) and set each weight's dtype to the checkpoint's."""
    for w in graph.weights.values():
        shape, dtype = _source_shape(ckpt, w.source, w.name)
        if list(shape) != list(w.shape):
            key = (_keys(w.source) or [w.name])[0]
            raise KtcError(f"weight {w.name} ({key}) has shape {list(shape)} in the checkpoint but config.json "
                           f"implies {list(w.shape)}: the folder's weights do not match its config.json")
        w.dtype = dtype
