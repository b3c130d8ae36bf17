"""Autotuning records and the search that fills them (what `ktc tune` runs on the target host).

A record says: on this host (GPU name + compute capability, CPU model + features), for this
kernel at this shape and format and this batch bucket, this config was fastest (and how
much faster than the default). Records live in the artifact's tuning/ folder and in a user
cache directory; the runtime looks them up by the nearest batch bucket and ignores records
of other hosts. Needs only the runtime's dependencies: no compiler on the tuned host.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
RECORDS_VERSION = 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key(gpu: bool | None = None) -> dict[str, str]:
    """What makes timings comparable: CPU model and features, GPU name and compute capability."""
    from ktc.targets import host_cpu_features

    key = {
        "cpu": cpu_model(),
        "cpu_features": hashlib.sha256(" ".join(sorted(host_cpu_features())).encode()).hexdigest()[:16],
        "gpu": "",
    }
    if gpu is not False:
        try:
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability(0)
                key["gpu"] = f"{torch.cuda.get_device_name(0)} sm{major}{minor}"
        except Exception:  # noqa: BLE001 - no usable GPU stack: a CPU-only host key
            pass
    return key


def host_id(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def batch_bucket(tokens: int) -> int:
    """The smallest bucket >= tokens (the largest bucket beyond it)."""
    for b in BATCH_BUCKETS:
        if tokens <= b:
            return b
    return BATCH_BUCKETS[-1]


@dataclass(frozen=True)
class TuningKey:
    """One thing to tune: a kernel at a shape and format, for a batch bucket."""

    kernel: str
    shape: tuple[int, ...]
    format: str
    batch: int

    def id(self) -> str:
        return f"{self.kernel}|{'x'.join(map(str, self.shape))}|{self.format}|b{self.batch}"


@dataclass
class TuningRecord:
    key: str
    config: dict[str, Any]
    seconds: float
    default_seconds: float
    candidates: int

    @property
    def speedup(self) -> float:
        return self.default_seconds / self.seconds if self.seconds > 0 else 1.0


@dataclass
class TuningRecords:
    """Records for one host, stored as JSON; merging and lookup by nearest batch bucket."""

    host: dict[str, str]
    records: dict[str, TuningRecord] = field(default_factory=dict)

    def add(self, record: TuningRecord) -> None:
        self.records[record.key] = record

    def lookup(self, kernel: str, shape: Sequence[int], fmt: str, tokens: int) -> dict[str, Any] | None:
        """The tuned config for `tokens` tokens: its bucket, else the nearest tuned bucket."""
        prefix = f"{kernel}|{'x'.join(map(str, shape))}|{fmt}|b"
        tuned = {int(k[len(prefix):]): r for k, r in self.records.items() if k.startswith(prefix)}
        if not tuned:
            return None
        want = batch_bucket(tokens)
        best = min(tuned, key=lambda b: (abs(b - want), b))
        return tuned[best].config

    def to_json(self) -> str:
        return json.dumps({"version": RECORDS_VERSION, "host": self.host,
                           "records": {k: asdict(r) for k, r in sorted(self.records.items())}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TuningRecords:
        d = json.loads(text)
        if d.get("version") != RECORDS_VERSION:
            raise ValueError(f"tuning records version {d.get('version')} is not {RECORDS_VERSION}")
        return cls(dict(d["host"]), {k: TuningRecord(**r) for k, r in d["records"].items()})

    def save(self, path: Path) -> None:
        """Write atomically, so an interrupted tune keeps every record finished before it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, host: dict[str, str]) -> tuple[TuningRecords, str | None]:
        """Records at `path` for `host`; (empty records, why) if absent, unreadable or another host's."""
        if not path.is_file():
            return cls(host), None
        try:
            recs = cls.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as e:
            return cls(host), f"{path} is unreadable ({e}); ignored"
        if recs.host != host:
            other = recs.host.get("gpu") or recs.host.get("cpu")
            return cls(host), f"{path} holds records of another host ({other}); ignored"
        return recs, None


def user_cache_dir() -> Path:
    base = os.environ.get("KTC_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ktc" / "tuning"


@dataclass
class Candidate:
    config: dict[str, Any]
    run: Callable[[], None]      # runs the kernel once with this config


@dataclass
class Task:
    key: TuningKey
    default: dict[str, Any]
    candidates: Callable[[], list[Candidate]]   # built lazily: only for tasks that are tuned


Timer = Callable[[Callable[[], None]], float]


def tune(tasks: Iterable[Task], records: TuningRecords, timer: Timer, budget_s: float | None = None,
         on_record: Callable[[TuningRecord], None] | None = None, clock: Callable[[], float] = time.monotonic,
         ) -> list[str]:
    """Time every candidate of every task not yet in `records`, keep the fastest.

    Resumable: a task whose key is already recorded is skipped. The budget is checked between
    tasks. A candidate that raises (a config that does not fit the hardware) is skipped; if
    the default itself fails the task is not recorded. Returns the keys tuned in this call.
    """
    start = clock()
    done: list[str] = []
    for task in tasks:
        kid = task.key.id()
        if kid in records.records:
            continue
        if budget_s is not None and clock() - start >= budget_s:
            break
        timings: list[tuple[float, dict[str, Any]]] = []
        default_s = None
        for cand in task.candidates():
            try:
                t = timer(cand.run)
            except Exception:  # noqa: BLE001 - e.g. out of shared memory for this tile shape
                continue
            timings.append((t, cand.config))
            if cand.config == task.default:
                default_s = t
        if default_s is None or not timings:
            continue
        best_s, best_cfg = min(timings, key=lambda tc: tc[0])
        rec = TuningRecord(kid, best_cfg, best_s, default_s, len(timings))
        records.add(rec)
        done.append(kid)
        if on_record:
            on_record(rec)
    return done
