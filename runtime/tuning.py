"""Autotuning records and the search that fills them (what `ktc tune` runs on the target host).

A record says: on this host (GPU name + compute capability, CPU model + features), for this
kernel at this shape and format and this batch bucket, this config was fastest (and how
much faster than the default). Records live in the artifact's tuning/ folder and in a user
cache directory; the runtime looks them up by the nearest batch bucket and ignores records
of other hosts. Needs only the runtime's dependencies: no compiler on the tuned host.

Where records live and why they are not in the manifest's hash list:
    ARTIFACT/tuning/<host id>.json    one file per host that tuned this artifact
    $KTC_CACHE_DIR (else $XDG_CACHE_HOME/ktc, else ~/.cache/ktc)/tuning/<host id>.json
                                      every artifact tuned on this host (`ktc tune --cache-only`
                                      writes only here, for read-only artifacts)
The manifest hashes what the compiler wrote; records are measurements a host adds later (and
several hosts may add theirs), so tuning/ stays outside manifest["files"]: verify_files checks
only the files the manifest lists, and rewriting the manifest after compile would break the
"hash everything the compiler wrote" guarantee. Records are untrusted input instead: a file
must parse, carry this host's key and this format version, and each config must be one the
kernel itself lists as a candidate at that shape (GPU) or a thread count within this host's
cores (CPU); anything else is ignored, never run. A kernel name in a record carries a hash of
its source (GPU) or library (CPU), so records made for other kernel code never apply.

Lookup: a step of T tokens uses the record of batch_bucket(T) if there is one, else the one of
the nearest tuned bucket (in log2 distance) on the same side of the decode / prefill split if it
is at most MAX_BORROW_OCTAVES away, else the compiled default. Farther borrowing was measured to
hurt: the 48-layer Qwen3-30B-A3B shape on an H200 ran prefill 256 up to 8% slower on the records
validated at 2048 tokens. `KTC_TUNING=0` turns records off at load.

Validation (runtime/tune_validate.py): per-kernel winners combined can make the whole step slower,
so `ktc tune` then times the whole model at each tuned bucket with and without its records. Each
record has a status: "pending" (searched, not yet validated: never applied), "kept" (validated:
its config applies), "dropped" (validation found the step faster without it: the compiled default
applies at its bucket, so the bucket does not borrow a neighbour's config either), "unchecked"
(`ktc tune --no-validate`: applied unvalidated; a later validating tune checks it). A record file
without statuses (older ones) is pending throughout. The outcome per bucket is kept in the file's
"validation" section, per model (model_id: a hash of the artifact's graph).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_BORROW_OCTAVES = 1      # a bucket uses a tuned neighbour's records at most this far away (log2)
RECORDS_VERSION = 1
TUNING_DIR = "tuning"
PENDING, KEPT, DROPPED, UNCHECKED = "pending", "kept", "dropped", "unchecked"
STATUSES = (PENDING, KEPT, DROPPED, UNCHECKED)
APPLIED = (KEPT, UNCHECKED)          # statuses whose searched config runs
TO_VALIDATE = (PENDING, UNCHECKED)   # statuses a validating `ktc tune` checks


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


def host_label(key: Mapping[str, str]) -> str:
    return f"{key.get('gpu')} + {key.get('cpu')}" if key.get("gpu") else str(key.get("cpu"))


def batch_bucket(tokens: int) -> int:
    """The smallest bucket >= tokens (the largest bucket beyond it)."""
    for b in BATCH_BUCKETS:
        if tokens <= b:
            return b
    return BATCH_BUCKETS[-1]


def nearest_bucket(tuned: Iterable[int], tokens: int, split: int | None = None) -> int | None:
    """The tuned bucket nearest (log2 distance, ties to the smaller) to batch_bucket(tokens), if it is
    at most MAX_BORROW_OCTAVES away; with `split`, only buckets on the same side of it (b <= split or
    b > split) count."""
    want = batch_bucket(tokens)
    same = [b for b in tuned if (split is None or (b <= split) == (want <= split))
            and abs(math.log2(b) - math.log2(want)) <= MAX_BORROW_OCTAVES]
    if not same:
        return None
    return min(same, key=lambda b: (abs(math.log2(b) - math.log2(want)), b))


def bucket_table(by_bucket: Mapping[int, Any], split: int | None = None) -> dict[int, Any]:
    """bucket -> value for every bucket of BATCH_BUCKETS: the value of its nearest tuned bucket (a
    dict lookup at run time instead of a search); buckets with none on their side are left out."""
    out: dict[int, Any] = {}
    for b in BATCH_BUCKETS:
        near = nearest_bucket(by_bucket, b, split)
        if near is not None:
            out[b] = by_bucket[near]
    return out


@dataclass(frozen=True)
class TuningKey:
    """One thing to tune: a kernel at a shape and format, for a batch bucket."""

    kernel: str
    shape: tuple[int, ...]
    format: str
    batch: int

    def prefix(self) -> str:
        return key_prefix(self.kernel, self.shape, self.format)

    def id(self) -> str:
        return f"{self.prefix()}{self.batch}"


def key_prefix(kernel: str, shape: Sequence[int], fmt: str) -> str:
    return f"{kernel}|{'x'.join(map(str, shape))}|{fmt}|b"


@dataclass
class TuningRecord:
    key: str
    config: dict[str, Any]
    seconds: float
    default_seconds: float
    candidates: int
    default: dict[str, Any] | None = None
    status: str = PENDING

    @property
    def speedup(self) -> float:
        return self.default_seconds / self.seconds if self.seconds > 0 else 1.0

    @property
    def bucket(self) -> int:
        return int(self.key[self.key.rindex("|b") + 2:])

    @property
    def active_config(self) -> dict[str, Any] | None:
        """What runs at this record's bucket: the searched config (kept, unchecked), the compiled
        default (dropped), nothing (pending: the record is not applied)."""
        if self.status in APPLIED:
            return self.config
        return self.default if self.status == DROPPED else None


@dataclass
class TuningRecords:
    """Records for one host, stored as JSON; merging and lookup by nearest batch bucket."""

    host: dict[str, str]
    records: dict[str, TuningRecord] = field(default_factory=dict)
    validation: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)   # model id -> bucket -> outcome

    def add(self, record: TuningRecord) -> None:
        self.records[record.key] = record

    def by_bucket(self, kernel: str, shape: Sequence[int], fmt: str) -> dict[int, TuningRecord]:
        """bucket -> record of this kernel, shape and format."""
        prefix = key_prefix(kernel, shape, fmt)
        out = {}
        for k, r in self.records.items():
            if k.startswith(prefix) and k[len(prefix):].isdigit():
                out[int(k[len(prefix):])] = r
        return out

    def active_by_bucket(self, kernel: str, shape: Sequence[int], fmt: str) -> dict[int, dict[str, Any]]:
        """bucket -> the config that runs there (TuningRecord.active_config); pending records left out."""
        out = {}
        for b, r in self.by_bucket(kernel, shape, fmt).items():
            cfg = r.active_config
            if cfg is not None:
                out[b] = cfg
        return out

    def lookup(self, kernel: str, shape: Sequence[int], fmt: str, tokens: int,
               split: int | None = None) -> dict[str, Any] | None:
        """The tuned config for `tokens` tokens: its bucket, else the nearest tuned bucket (records
        that apply: not pending)."""
        tuned = self.active_by_bucket(kernel, shape, fmt)
        best = nearest_bucket(tuned, tokens, split)
        return None if best is None else tuned[best]

    def to_json(self) -> str:
        return json.dumps({"version": RECORDS_VERSION, "host": self.host,
                           "records": {k: asdict(r) for k, r in sorted(self.records.items())},
                           "validation": {m: {str(b): e for b, e in sorted(v.items(), key=lambda x: int(x[0]))}
                                          for m, v in sorted(self.validation.items())}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TuningRecords:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("version") != RECORDS_VERSION:
            raise ValueError(f"tuning records version {d.get('version') if isinstance(d, dict) else None} "
                             f"is not {RECORDS_VERSION}")
        recs = {}
        for k, r in d["records"].items():
            rec = TuningRecord(**r)
            if rec.key != k or not isinstance(rec.config, dict) or rec.status not in STATUSES:
                raise ValueError(f"record {k!r} is malformed")
            recs[k] = rec
        validation = {str(m): {str(b): dict(e) for b, e in dict(v).items()}
                      for m, v in dict(d.get("validation") or {}).items()}
        return cls({str(a): str(b) for a, b in dict(d["host"]).items()}, recs, validation)

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
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            return cls(host), f"{path} is unreadable ({e}); ignored"
        if recs.host != host:
            return cls(host), f"{path} holds records of another host ({host_label(recs.host)}); ignored"
        return recs, None


# -- where records are kept --------------------------------------------------------------------
def user_cache_dir() -> Path:
    base = os.environ.get("KTC_CACHE_DIR")
    if base:
        return Path(base) / "tuning"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ktc" / "tuning"


def artifact_records_path(artifact: str | Path, host: dict[str, str]) -> Path:
    return Path(artifact) / TUNING_DIR / f"{host_id(host)}.json"


def user_records_path(host: dict[str, str]) -> Path:
    return user_cache_dir() / f"{host_id(host)}.json"


def load_host_records(artifact: str | Path, host: dict[str, str]) -> tuple[TuningRecords, list[str]]:
    """This host's records for an artifact: its tuning/ file over the user cache's; notes say what
    was ignored (other hosts' files, unreadable ones)."""
    notes: list[str] = []
    merged = TuningRecords(host)
    for path in (user_records_path(host), artifact_records_path(artifact, host)):
        recs, why = TuningRecords.load(path, host)
        if why:
            notes.append(why)
        merged.records.update(recs.records)
        for model, outcomes in recs.validation.items():
            merged.validation.setdefault(model, {}).update(outcomes)
    folder = Path(artifact) / TUNING_DIR
    if folder.is_dir():
        mine = artifact_records_path(artifact, host).name
        for other in sorted(folder.glob("*.json")):
            if other.name != mine:
                notes.append(f"{other} holds records of another host ({_file_host(other)}); ignored")
    return merged, notes


def _file_host(path: Path) -> str:
    try:
        return host_label(json.loads(path.read_text()).get("host", {}))
    except (ValueError, OSError, AttributeError):
        return "unreadable"


def save_merged(path: Path, records: TuningRecords) -> None:
    """Save `records` into the file at `path`, keeping the records it already holds for other keys
    (another tune of another artifact may have written the user cache meanwhile)."""
    current, _ = TuningRecords.load(path, records.host)
    current.records.update(records.records)
    for model, outcomes in records.validation.items():
        current.validation.setdefault(model, {}).update(outcomes)
    current.save(path)


def model_id(graph_data: Mapping[str, Any]) -> str:
    """The key of a model's validation outcomes: a hash of its lowered graph (manifest["graph"])."""
    return hashlib.sha256(json.dumps(graph_data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- the search ----------------------------------------------------------------------------------
@dataclass
class Candidate:
    config: dict[str, Any]
    run: Callable[[], None]      # runs the kernel once with this config


@dataclass
class Task:
    key: TuningKey
    default: dict[str, Any]
    candidates: Callable[[], list[Candidate]]   # built lazily: only for tasks that are tuned
    configs: list[dict[str, Any]] | None = None  # the candidates' configs, where known before building them


Timer = Callable[[Callable[[], None]], float]


def tune(tasks: Iterable[Task], records: TuningRecords, timer: Timer, budget_s: float | None = None,
         on_record: Callable[[TuningRecord], None] | None = None, clock: Callable[[], float] = time.monotonic,
         on_task: Callable[[Task], None] | None = None, min_gain: float = 0.02,
         on_error: Callable[[Task, dict[str, Any], Exception], None] | None = None, rounds: int = 3) -> list[str]:
    """Time every candidate of every task not yet in `records`, keep the fastest: the default
    unless another is faster by more than `min_gain` (a fraction: timing noise does not count).

    Per task: every candidate runs once first (compiles, warms up; one that raises, e.g. a config
    that does not fit the hardware, is dropped), then all are timed in `rounds` interleaved rounds
    and each keeps its best time, so that no config wins or loses by when it was measured (a GPU
    still clocking up, a neighbour's load). A failing default records nothing.

    Resumable: a task whose key is already recorded is skipped. The budget is checked before each
    task and between candidates: a task the budget runs out in is dropped whole (not recorded, so a
    rerun tunes it from the start) and the search stops. on_task(task) is called as each task
    starts, on_error(task, config, exception) for each candidate that raised. Returns the keys
    tuned in this call.
    """
    start = clock()

    def over() -> bool:
        return budget_s is not None and clock() - start >= budget_s

    done: list[str] = []
    for task in tasks:
        kid = task.key.id()
        if kid in records.records:
            continue
        if over():
            break
        if on_task:
            on_task(task)
        live: list[Candidate] = []
        times: dict[int, float] = {}
        stopped = False
        for cand in task.candidates():
            if over():
                stopped = True
                break
            try:
                cand.run()
                live.append(cand)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this tile shape
                if on_error:
                    on_error(task, cand.config, e)
        failed: set[int] = set()
        for _ in range(0 if stopped else max(1, rounds)):
            for i, cand in enumerate(live):
                if over():
                    stopped = True
                    break
                if i in failed:
                    continue
                try:
                    t = timer(cand.run)
                except Exception as e:  # noqa: BLE001
                    if on_error:
                        on_error(task, cand.config, e)
                    failed.add(i)
                    times.pop(i, None)
                    continue
                times[i] = min(times.get(i, t), t)
            if stopped:
                break
        if stopped:
            break
        default_i = next((i for i in times if live[i].config == task.default), None)
        if default_i is None:
            continue
        default_s = times[default_i]
        best_i = min(times, key=lambda i: (times[i], i))
        if times[best_i] > default_s * (1.0 - min_gain):
            best_i = default_i
        rec = TuningRecord(kid, live[best_i].config, times[best_i], default_s, len(times), task.default)
        records.add(rec)
        done.append(kid)
        if on_record:
            on_record(rec)
    return done


def bucket_order(buckets: Iterable[int]) -> list[int]:
    """The order tasks are tuned in, so that a budget that runs out leaves the most useful buckets
    done: the smallest (decode), the largest (prefill chunks), then the rest ascending."""
    bs = sorted(set(int(b) for b in buckets))
    if len(bs) <= 2:
        return bs
    return [bs[0], bs[-1], *bs[1:-1]]


def parse_batch_sizes(text: str | None) -> list[int]:
    """'1,2,4' -> bucket sizes (each rounded up to its bucket); None -> every bucket."""
    from ktc.errors import InputError

    if text is None:
        return list(BATCH_BUCKETS)
    try:
        sizes = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--batch-sizes {text!r} is not a comma-separated list of token counts, "
                         f"e.g. 1,2,4,8") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch-sizes {text!r} needs token counts of at least 1, e.g. 1,2,4,8")
    return sorted({batch_bucket(s) for s in sizes})


def parse_budget(text: str | None) -> float | None:
    """'10m', '90s', '1h', '1h30m', '45' (seconds) -> seconds; None -> no limit."""
    from ktc.errors import InputError

    if text is None:
        return None
    s = text.strip().lower()
    total, num = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    try:
        for ch in s:
            if ch.isdigit() or ch == ".":
                num += ch
            elif ch in units and num:
                total += float(num) * units[ch]
                num = ""
            else:
                raise ValueError(ch)
        if num:
            total += float(num)
    except ValueError:
        raise InputError(f"--budget {text!r} is not a duration such as 10m, 90s or 1h") from None
    if total <= 0:
        raise InputError(f"--budget {text!r} must be more than zero")
    return total


# -- applying records at load ------------------------------------------------------------------------
def apply_records(model: Any, records: TuningRecords) -> int:
    """Give a loaded model its tuned configs: GPU nodes get attrs["gpu_tuned"] (read by
    runtime.gpu.ops._cfg), CPU expert kernels their tuned thread counts. Returns how many
    (kernel, shape, format) entries took effect."""
    applied = 0
    kernels = getattr(model, "kernels", None)
    if kernels is not None and any(n.device == "cuda" for n in model.graph.nodes):
        from ktc.runtime.gpu.tune import apply_gpu_records

        applied += apply_gpu_records(model.graph, kernels, records)
    cpu = getattr(model, "cpu_kernels", None)
    if cpu is not None:
        from ktc.runtime.cpu_tune import apply_cpu_records

        manifest = getattr(model, "manifest", None)
        applied += apply_cpu_records(cpu, model.graph, records, manifest.get("files") if manifest else None)
    drop = getattr(model, "drop_graphs", None)
    if callable(drop):
        drop()          # CUDA graphs captured the previous configs' launches
    return applied


def apply_artifact_records(model: Any, artifact: str | Path) -> dict[str, Any]:
    """Load this host's records for the artifact (its tuning/ folder and the user cache), apply them,
    and note on the model what happened: model.tuning = {"host", "records", "applied", "notes"}."""
    info: dict[str, Any] = {"host": "", "records": 0, "applied": 0, "notes": []}
    if os.environ.get("KTC_TUNING", "").strip() == "0":
        info["notes"].append("KTC_TUNING=0: tuning records not used")
    else:
        host = host_key()
        records, notes = load_host_records(artifact, host)
        info.update(host=host_label(host), records=len(records.records), notes=notes)
        if records.records:
            info["applied"] = apply_records(model, records)
    try:
        model.tuning = info
    except AttributeError:
        pass
    return info


def tuning_summary(artifact_path: str | Path) -> str:
    """What `ktc inspect` prints about tuning: the record files in the artifact's tuning/ folder,
    which host each is for, and which ones this host would use or ignore."""
    folder = Path(artifact_path) / TUNING_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    host = host_key()
    mine = artifact_records_path(artifact_path, host).name
    lines = []
    for path in files:
        try:
            recs = TuningRecords.from_json(path.read_text())
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            lines.append(f"  {path.name}: unreadable ({e}); ignored")
            continue
        n = len(recs.records)
        gain = [r.speedup for r in recs.records.values()]
        mean = math.exp(sum(math.log(g) for g in gain) / len(gain)) if gain else 1.0
        state = ("used on this host" if path.name == mine and recs.host == host
                 else "another host's records: ignored here")
        by_status = ", ".join(f"{sum(r.status == st for r in recs.records.values())} {st}" for st in STATUSES
                              if any(r.status == st for r in recs.records.values()))
        lines.append(f"  {path.name}: {n} records for {host_label(recs.host)} ({by_status or 'none'}), "
                     f"mean speedup {mean:.2f}x: {state}")
    cache, _ = TuningRecords.load(user_records_path(host), host)
    head = (f"tuning: {len(files)} record file(s) in {folder}" if files
            else f"tuning: none in the artifact (run `ktc tune {artifact_path}`)")
    tail = f"  user cache {user_records_path(host)}: {len(cache.records)} records for this host"
    return "\n".join([head, *lines, tail])
