"""A content-addressed cache of built CPU expert kernel libraries.

Building the CPU kernels is most of a compile's time (TVM + LLVM, single-threaded: minutes for an
x86-amx library of real shapes), and recompiling a model with another GPU budget, rules or
calibration asks for the very same kernels again. build_cpu_kernels keys a build by everything that
decides its bytes: the specs, the target (its TVM JSON and the instructions it is checked for), the
kernel config, the ABI, the source of this package's kernel generators and the TVM version. A hit
copies the stored library files into the artifact folder and returns the stored manifest entry;
only builds that passed the instruction check are stored.

Where: $KTC_CACHE_DIR, else $XDG_CACHE_HOME/ktc, else ~/.cache/ktc (under cpu-kernels/).
KTC_CACHE_DIR=off (or empty) turns it off. Entries are written to a temporary folder and renamed
into place, so an interrupted compile never leaves a half entry, and two compiles racing for one
key both succeed. The cache is an optimisation: a folder that cannot be read or written means a
build, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

ENTRY = "entry.json"
OFF = ("", "off", "0", "none")


def cache_root() -> Path | None:
    """The cpu-kernels cache folder, or None when the cache is off."""
    env = os.environ.get("KTC_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env) / "cpu-kernels"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:        # no home folder to be found: no cache
            return None
    return Path(base) / "ktc" / "cpu-kernels"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of the kernel generators' source (every module of this package but the GPU ones)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if path.name.startswith("gpu"):
            continue
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _tvm_version() -> str:
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_key(request: dict[str, Any]) -> str:
    """The key of a build `request` (JSON-able): it, the generators' source and the TVM version."""
    payload = json.dumps({"request": request, "source": source_digest(), "tvm": _tvm_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def lookup(key: str, out_dir: Path) -> dict[str, Any] | None:
    """On a hit, copy the entry's files into `out_dir` and return its manifest entry; else None."""
    root = cache_root()
    if root is None:
        return None
    folder = root / key
    try:
        stored = json.loads((folder / ENTRY).read_text())
        files, entry = stored["files"], stored["entry"]
        for name in files:
            if not (folder / name).is_file():
                return None
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(folder / name, out_dir / name)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry


def store(key: str, out_dir: Path, files: list[str], entry: dict[str, Any]) -> None:
    """Keep `files` (names in `out_dir`) and `entry` under `key`; failures are ignored."""
    root = cache_root()
    if root is None:
        return
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if (root / key / ENTRY).is_file():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        for name in files:
            shutil.copyfile(out_dir / name, tmp / name)
        (tmp / ENTRY).write_text(json.dumps({"files": files, "entry": entry}))
        os.replace(tmp, root / key)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
