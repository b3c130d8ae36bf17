"""The artifact format, write side (read side and layout: ktc.runtime.artifact).

Everything is written into a temporary folder beside the output and renamed into place
at the end, so a crash or Ctrl-C never leaves a half artifact under the output's name.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ktc.errors import KtcError
from ktc.runtime.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, sha256_file

SHARD_BYTES = 1 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def packed_key(weight_name: str, part: str) -> str:
    """Stored name of one part of a weight packed for a kernel (e.g. its int8 values, its scales)."""
    return f"{weight_name}::{part}"


class ShardWriter:
    """Writes tensors into safetensors shards of about SHARD_BYTES, one shard in memory at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.key_to_file: dict[str, str] = {}

    def add(self, key: str, tensor) -> None:
        if key in self.key_to_file or key in self.pending:
            raise ValueError(f"tensor {key} written twice")
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"weights/model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder.parent / name), metadata={"format": "pt"})
        self.files.append(name)
        for key in self.pending:
            self.key_to_file[key] = name
        self.pending, self.pending_bytes = {}, 0


@contextmanager
def staging_folder(output: Path, force: bool) -> Iterator[Path]:
    """A temporary folder that becomes `output` if the block finishes, and vanishes if not."""
    output = output.absolute()
    if output.exists() and not force:
        raise KtcError(f"{output} already exists: choose another -o path or pass --force to replace it")
    if not output.parent.is_dir():
        raise KtcError(f"{output.parent} does not exist: create it or choose another -o path")
    tmp = output.parent / f".ktc-tmp-{output.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists():
            old = output.parent / f".ktc-old-{output.name}-{os.getpid()}"
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(model_dir: Path, folder: Path) -> str | None:
    """Copy the tokenizer files the model folder has; the path of tokenizer.json, if any."""
    found = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    if not found:
        return None
    (folder / "tokenizer").mkdir()
    for n in found:
        shutil.copyfile(model_dir / n, folder / "tokenizer" / n)
    return "tokenizer/tokenizer.json" if "tokenizer.json" in found else None


def write_manifest(folder: Path, data: dict[str, Any], on_file: Callable[[str], None] | None = None) -> None:
    """Hash every file in `folder` into data['files'] and write manifest.json."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if on_file:
            on_file(rel)
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **data,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
