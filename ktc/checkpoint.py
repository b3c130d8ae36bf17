"""Read a Hugging Face model folder: config.json and safetensors shards, lazily and checked.

Only headers are read up front (key -> shape, dtype, file), so capture can plan from a
60 GB checkpoint without loading it; tensors are read one at a time when the artifact is
written. Missing, truncated or malformed shards become one-line KtcErrors.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktc.errors import KtcError

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str
    file: Path


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json as a dict; KtcError if it is missing or not a JSON object."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise KtcError(f"{model_dir} is not a folder: give a Hugging Face model folder (config.json + *.safetensors)")
    if not path.is_file():
        raise KtcError(f"{path} is missing: a Hugging Face model folder needs config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise KtcError(f"{path} is not valid JSON ({reason}): fix or re-download it") from None
    if not isinstance(cfg, dict):
        raise KtcError(f"{path} must hold a JSON object")
    return cfg


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data offset) of a safetensors file, checking it is whole."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KtcError(f"{file} is truncated ({size} bytes): re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise KtcError(f"{file} is truncated or not a safetensors file: re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise KtcError(f"{file} has a malformed header: re-download it") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise KtcError(f"{file} is truncated ({size} of {8 + n + end} bytes): re-download it")
    return header, 8 + n


class Checkpoint:
    """The tensors of a model folder, indexed from safetensors headers."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise KtcError(f"{index} is malformed: re-download the model") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise KtcError(f"shard {missing[0]} listed in {index.name} is missing from {self.dir}: "
                               "download every shard")
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                    raise KtcError(f"{self.dir} has only pickle weights (*.bin): ktc reads safetensors only; "
                                   "convert with transformers' save_pretrained(safe_serialization=True)")
                raise KtcError(f"no *.safetensors in {self.dir}: a model folder needs its weights")
        for name in files:
            file = self.dir / name
            header, _ = _read_header(file)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(meta.get("dtype"))
                if dtype is None:
                    raise KtcError(f"{file}: tensor {key} has unsupported dtype {meta.get('dtype')}")
                self.tensors[key] = TensorInfo(key, tuple(meta["shape"]), dtype, file)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise KtcError(f"tensor {key} is missing from the checkpoint in {self.dir}: "
                           "the folder is incomplete or does not match config.json") from None

    def load(self, key: str):
        """One tensor, read from its shard."""
        from safetensors import safe_open

        info = self.info(key)
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise KtcError(f"cannot read {key} from {info.file.name} ({e}): re-download it") from None

    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in {t.file for t in self.tensors.values()})


def source_keys(source: dict[str, Any]) -> list[str]:
    """Checkpoint keys a weight source expression reads."""
    if "load" in source:
        return [source["load"]]
    if "values" in source:
        return []
    if "take" in source:
        inner = source["take"]
        if "stack" in inner:   # only the chosen rows are read
            return [k for i in source["index"] for k in source_keys(inner["stack"][i])]
        return source_keys(inner)
    items = source.get("stack") or source.get("concat") or []
    return [k for s in items for k in source_keys(s)]


def source_shape(ckpt: Checkpoint, source: dict[str, Any]) -> tuple[list[int], str]:
    """Shape and dtype a source expression evaluates to, from headers only."""
    if "load" in source:
        info = ckpt.info(source["load"])
        return list(info.shape), info.dtype
    if "values" in source:
        return [len(source["values"])], source.get("dtype", "float32")
    if "take" in source:
        shape, dtype = source_shape(ckpt, source["take"])
        return [len(source["index"]), *shape[1:]], dtype
    if "stack" in source:
        parts = [source_shape(ckpt, s) for s in source["stack"]]
        return [len(parts), *parts[0][0]], parts[0][1]
    if "concat" in source:
        parts = [source_shape(ckpt, s) for s in source["concat"]]
        dim = source["dim"]
        shape = list(parts[0][0])
        shape[dim] = sum(p[0][dim] for p in parts)
        return shape, parts[0][1]
    raise ValueError(f"bad weight source {source}")


def evaluate_source(ckpt: Checkpoint, source: dict[str, Any]):
    """The tensor a weight source expression describes."""
    import torch

    if "load" in source:
        return ckpt.load(source["load"])
    if "values" in source:
        return torch.tensor(source["values"], dtype=getattr(torch, source.get("dtype", "float32")))
    if "take" in source:
        inner, index = source["take"], list(source["index"])
        if "stack" in inner:   # read only the chosen rows
            return torch.stack([evaluate_source(ckpt, inner["stack"][i]) for i in index])
        return evaluate_source(ckpt, inner)[torch.tensor(index, dtype=torch.long)]
    if "stack" in source:
        return torch.stack([evaluate_source(ckpt, s) for s in source["stack"]])
    if "concat" in source:
        return torch.cat([evaluate_source(ckpt, s) for s in source["concat"]], dim=source["dim"])
    raise ValueError(f"bad weight source {source}")
