"""End-to-end validation of `ktc tune` records: the whole model step at each tuned batch bucket,
with the bucket's records and without, so that the tuned model is never slower than the untuned one.

    bench = ModelBench(load_model(manifest, buckets))        # random weights for a weights-free plan
    outcomes = validate(records, bench, model_id(manifest.data["graph"]), over=budget_spent)

Why: each record's config won alone, on random inputs with a flushed L2 cache; in a step kernels run
back to back, share caches and clocks, and meet the model's own routing, so a config that wins alone
can lose there (measured on an H100, a 2-layer Qwen3-30B-A3B-shaped model: a prefill of 2048 tokens
took 3.23 ms untuned and 3.50 ms with the per-kernel winners, while decode got faster).

What is timed, per bucket b with records to validate (runtime/tuning.py TO_VALIDATE):
    untuned     the model with no records at all (the compiled defaults)
    tuned       the model as ktc.load would run it with b's records accepted (other buckets' applied
                records included: a kernel without a record at b borrows its nearest bucket's)
    step        b <= DECODE_TOKENS (and the model's max batch): a decode step at batch b after a prompt
                of DECODE_CONTEXT tokens per sequence (GpuModel.step: a CUDA graph is captured per
                variant, then the variants' graphs are swapped between rounds, not recaptured;
                CompiledModel.decode on the CPU); otherwise a prefill of b tokens (one sequence, or
                several where the model's context is shorter)
Variants run in `rounds` interleaved rounds (A B, B A, ...: drift cancels), each round the mean of as
many steps as take about target_s; a variant's time is the median over rounds.

Decision, with no slack: b keeps its records when tuned < untuned. Otherwise records are dropped one
at a time: one ablation measurement (untuned, all records, all but record k for each k, interleaved)
ranks the records by what removing each gains; the most harmful is dropped, then the next, the rest
re-measured against untuned after each drop, until the step is faster than untuned or none is left
(the bucket then runs the defaults). A dropped record stays in the file (so it is not searched again)
with status "dropped": its bucket runs the default config. Records whose config is the default change
nothing at b and are kept untimed. Records of one kernel are shared by every layer, so a drop is per
kernel (and shape, format) and bucket.

Budget: over() is checked between measurements and between rounds; a bucket the budget runs out in
keeps its records pending (not applied at load) and is validated by the next `ktc tune`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ktc.errors import KtcError

from .gpu.ops import DECODE_TOKENS
from .tuning import DROPPED, KEPT, PENDING, TO_VALIDATE, TuningRecords, apply_records, bucket_order

DECODE_CONTEXT = 512      # prompt tokens per sequence before the timed decode steps
MAX_STEPS = 64            # decode steps per round at most
MAX_DECODE = 2048         # decode steps of one measurement at most, all rounds and variants (the cache holds them)
MAX_REPS = 8              # prefills per round at most


class BudgetOut(Exception):
    """The budget ran out while a bucket was being validated."""


class Bench(Protocol):
    def variant(self, records: TuningRecords | None) -> Any:
        """The model's tuned state with `records` applied (None: no records), to switch to cheaply."""

    def measure(self, bucket: int, variants: Sequence[Any], over: Callable[[], bool] | None = None) -> list[float]:
        """Milliseconds of one step at `bucket` for each variant (interleaved rounds, median)."""

    def describe(self, bucket: int) -> str:
        """What is timed at `bucket`, e.g. "decode b4" or "prefill 2048"."""


# -- the decision ---------------------------------------------------------------------------------------
def buckets_to_validate(records: TuningRecords, keep: Callable[[str], bool] | None = None) -> list[int]:
    """Buckets with records to validate (pending or unchecked), in bucket_order."""
    return bucket_order({r.bucket for k, r in records.records.items()
                         if r.status in TO_VALIDATE and (keep is None or keep(k))})


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 5)


def validate_bucket(records: TuningRecords, bench: Bench, bucket: int, keep: Callable[[str], bool] | None = None,
                    over: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Validate the records of one bucket (see the module docstring): sets their statuses in `records`
    and returns the outcome {"step", "untuned_ms", "tuned_ms", "all_ms", "records", "kept", "dropped",
    "state": "validated", "note"}. Raises BudgetOut (statuses untouched) when over() turns true."""
    recs = records.records
    cands = sorted(k for k, r in recs.items() if r.bucket == bucket and r.status != DROPPED and (keep is None
                                                                                                 or keep(k)))
    effective = [k for k in cands if recs[k].config != recs[k].default]

    def check() -> None:
        if over is not None and over():
            raise BudgetOut

    def with_active(active: set[str]) -> TuningRecords:
        out = {}
        for k, r in recs.items():
            if k in cands:
                st = KEPT if k in active or k not in effective else DROPPED
            else:
                st = PENDING if r.status in TO_VALIDATE else r.status   # other buckets: as ktc.load runs them now
            out[k] = replace(r, status=st)
        return TuningRecords(records.host, out)

    def finish(active: set[str], untuned: float | None, tuned: float | None, all_ms: float | None,
               note: str = "") -> dict[str, Any]:
        for k in cands:
            recs[k].status = KEPT if k in active or k not in effective else DROPPED
        dropped = [k for k in effective if k not in active]
        return {"step": bench.describe(bucket), "untuned_ms": _round(untuned), "tuned_ms": _round(tuned),
                "all_ms": _round(all_ms), "records": len(cands), "kept": len(cands) - len(dropped),
                "dropped": dropped, "state": "validated", "note": note}

    if not effective:
        return finish(set(), None, None, None, "every record is the compiled default: nothing to time")
    check()
    untuned = bench.variant(None)
    full = set(effective)
    u, t = bench.measure(bucket, [untuned, bench.variant(with_active(full))], over)
    u_all, all_ms = u, t
    if t < u:
        return finish(full, u, t, all_ms)
    if len(effective) == 1:
        return finish(set(), u, t, all_ms, "slower with its record: dropped")
    check()
    times = bench.measure(bucket, [untuned, bench.variant(with_active(full)),
                                   *(bench.variant(with_active(full - {k})) for k in effective)], over)
    u_abl, t_abl, without = times[0], times[1], dict(zip(effective, times[2:], strict=True))
    order = sorted(effective, key=lambda k: (without[k] - t_abl, k))     # most harmful first
    active = full - {order[0]}
    if without[order[0]] < u_abl:
        return finish(active, u_abl, without[order[0]], all_ms, f"dropped {len(effective) - len(active)} by ablation")
    for k in order[1:]:
        active = active - {k}
        if not active:
            break
        check()
        u, t = bench.measure(bucket, [untuned, bench.variant(with_active(active))], over)
        if t < u:
            return finish(active, u, t, all_ms, f"dropped {len(effective) - len(active)} by ablation")
    return finish(set(), u_all, all_ms, all_ms, "slower with every subset of its records tried: all dropped")


def validate(records: TuningRecords, bench: Bench, model: str, keep: Callable[[str], bool] | None = None,
             over: Callable[[], bool] | None = None, on_bucket: Callable[[int, dict[str, Any]], None] | None = None,
             on_start: Callable[[int, str], None] | None = None) -> dict[int, dict[str, Any]]:
    """Validate every bucket with records to validate (`keep`: which record keys belong to the model);
    outcomes go to records.validation[model][str(bucket)] and to on_bucket(bucket, outcome) as each
    bucket ends (to save the file). A bucket the budget runs out in, or whose step fails to run, keeps
    its statuses (pending records stay unapplied) and gets the outcome state "unvalidated" / "error"."""
    out: dict[int, dict[str, Any]] = {}
    for b in buckets_to_validate(records, keep):
        n = sum(1 for k, r in records.records.items() if r.bucket == b and r.status in TO_VALIDATE
                and (keep is None or keep(k)))
        if on_start:
            on_start(b, bench.describe(b))
        try:
            if over is not None and over():
                raise BudgetOut
            entry = validate_bucket(records, bench, b, keep, over)
        except BudgetOut:
            entry = {"step": bench.describe(b), "state": "unvalidated", "records": n,
                     "note": "the budget ran out: its records are not applied until `ktc tune` validates them"}
        except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory for this step: the bucket stays unapplied
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            entry = {"step": bench.describe(b), "state": "error", "records": n,
                     "note": f"the step failed to run ({type(e).__name__}: {first}): its records are not validated"}
        records.validation.setdefault(model, {})[str(b)] = entry
        out[b] = entry
        if on_bucket:
            on_bucket(b, entry)
    return out


# -- timing the real model ----------------------------------------------------------------------------
@dataclass
class _State:
    """A tuned state of a loaded model: each node's gpu_tuned tables and each CPU kernel's threads
    and prefill paths."""

    nodes: list[tuple[Any, Any]] = field(default_factory=list)
    threads: dict[str, dict[int, int] | None] = field(default_factory=dict)
    prefill: dict[str, dict[int, str] | None] = field(default_factory=dict)


def _on_gpu(model: Any) -> bool:
    device = getattr(model, "device", None)
    return hasattr(model, "step") and device is not None and torch.device(device).type == "cuda"


class ModelBench:
    """Bench of a loaded model (GpuModel or CompiledModel): variants are snapshots of the tuned state
    that apply_records leaves (node.attrs["gpu_tuned"], the CPU kernels' thread and prefill tables)."""

    def __init__(self, model: Any, rounds: int = 5, target_s: float = 0.02, context: int = DECODE_CONTEXT,
                 min_steps: int = 4, seed: int = 0):
        self.model = model
        self.rounds = max(1, int(rounds))
        self.target_s = target_s
        self.context = context
        self.min_steps = max(1, int(min_steps))
        self.seed = seed
        self.gpu = _on_gpu(model)
        self.graphs = self.gpu and bool(getattr(model, "cuda_graphs", False))
        self._per_round: dict[int, int] = {}

    # variants
    def variant(self, records: TuningRecords | None) -> _State:
        apply_records(self.model, records if records is not None else TuningRecords({}))
        return self.current()

    def current(self) -> _State:
        """The model's tuned state as it is now (e.g. as ktc.load left it)."""
        state = _State([(n, n.attrs.get("gpu_tuned")) for n in self.model.graph.nodes])
        cpu = getattr(self.model, "cpu_kernels", None)
        if cpu is not None and hasattr(cpu, "set_tuned_threads"):
            tuned = cpu.__dict__.get("_tuned_threads", {})
            state.threads = {name: dict(tuned[name]) if name in tuned else None for name in cpu.kernel_names}
            paths = cpu.__dict__.get("_tuned_prefill", {})
            state.prefill = {name: dict(paths[name]) if name in paths else None for name in cpu.kernel_names}
        return state

    def _switch(self, state: _State) -> None:
        for node, tables in state.nodes:
            if tables:
                node.attrs["gpu_tuned"] = tables
            else:
                node.attrs.pop("gpu_tuned", None)
        for name, table in state.threads.items():
            self.model.cpu_kernels.set_tuned_threads(name, table)
        for name, paths in state.prefill.items():
            self.model.cpu_kernels.set_tuned_prefill(name, paths)

    # what runs
    def _decodes(self, bucket: int) -> bool:
        return bucket <= DECODE_TOKENS and bucket <= int(self.model.max_batch_size)

    def _prefill_shape(self, bucket: int) -> tuple[int, int]:
        limit = self.model.max_context or bucket
        n = 1
        while bucket // n > limit and n < bucket:
            n *= 2
        if n > int(self.model.max_batch_size) or bucket // n > limit:
            raise KtcError(f"a prefill of {bucket} tokens does not fit the model's batch and context limits")
        return n, bucket // n

    def describe(self, bucket: int) -> str:
        if self._decodes(bucket):
            return f"decode b{bucket}"
        try:
            n, s = self._prefill_shape(bucket)
        except KtcError:
            return f"prefill {bucket}"
        return f"prefill {bucket}" + (f" ({n}x{s})" if n > 1 else "")

    def _ids(self, batch: int, length: int) -> torch.Tensor:
        vocab = int(getattr(self.model, "vocab_size", None) or 256)
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(self.seed))

    def _sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.model.device)

    def _ms(self, fn: Callable[[], Any], n: int) -> float:
        """Mean milliseconds of fn over n calls, the device synchronised around them."""
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self._sync()
        return (time.perf_counter() - t0) * 1e3 / n

    def _count(self, ms: float, least: int, most: int) -> int:
        return max(least, min(most, int(self.target_s * 1e3 / max(ms, 1e-6))))

    def measure(self, bucket: int, variants: Sequence[_State], over: Callable[[], bool] | None = None
                ) -> list[float]:
        if self._decodes(bucket):
            return self._measure_decode(bucket, list(variants), over)
        return self._measure_prefill(bucket, list(variants), over)

    def _rounds(self, variants: list[_State], run: Callable[[int], float], over: Callable[[], bool] | None
                ) -> list[float]:
        samples: list[list[float]] = [[] for _ in variants]
        for r in range(self.rounds):
            if over is not None and over():
                raise BudgetOut
            for i in (range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))):
                samples[i].append(run(i))
        return [statistics.median(s) for s in samples]

    def _measure_decode(self, b: int, variants: list[_State], over: Callable[[], bool] | None) -> list[float]:
        m = self.model
        tok = self._ids(b, 1).reshape(b)
        if self.gpu:
            tok = tok.to(m.device)
        step = m.step if self.gpu else m.decode

        def start(state: _State, length: int, reserve: int) -> Any:
            """A prompt, then `state` switched in and two steps (the first captures its CUDA graph)."""
            if length:
                m.prefill(self._ids(b, length), reserve=reserve)
            self._switch(state)
            if self.graphs:
                m._cuda_graph = None
            step(tok)
            step(tok)
            return m._cuda_graph if self.graphs else None

        limit = m.max_context or (self.context + 4096)
        if b not in self._per_round:
            start(variants[0], max(1, min(self.context, limit - 8)), 8)
            self._per_round[b] = self._count(self._ms(lambda: step(tok), 4), self.min_steps, MAX_STEPS)
        v = len(variants)
        steps = max(self.min_steps, min(self._per_round[b], (MAX_DECODE - 2 * v) // (self.rounds * v) - 1))
        fits = (limit - 4 - 2 * v) // (self.rounds * v) - 1   # most steps that leave a 1-token prompt in context
        steps = min(steps, fits)
        if steps < 1:
            raise KtcError(f"{self.rounds} rounds of {v} variants do not fit the model's context ({limit} tokens)")
        reserve = 2 * v + self.rounds * v * (1 + steps) + 2
        if reserve >= limit:
            raise KtcError(f"{reserve} decode steps do not fit the model's context ({limit} tokens)")
        length = max(1, min(self.context, limit - reserve))
        graphs = [start(v, length if i == 0 else 0, reserve) for i, v in enumerate(variants)]

        def run(i: int) -> float:
            self._switch(variants[i])
            if self.graphs:
                m._cuda_graph = graphs[i]
            step(tok)                       # a step after the switch, untimed
            return self._ms(lambda: step(tok), steps)

        try:
            return self._rounds(variants, run, over)
        finally:
            m.reset()

    def _measure_prefill(self, b: int, variants: list[_State], over: Callable[[], bool] | None) -> list[float]:
        m = self.model
        n, s = self._prefill_shape(b)
        ids = self._ids(n, s)
        graphs = []
        for v in variants:                  # warm-up: compiles kernels of configs not run yet, and captures
            self._switch(v)                 # each variant's prefill CUDA graph (kept per variant, as decode's)
            if self.graphs:
                m._prefill_graphs = {}
            m.prefill(ids)
            graphs.append(m._prefill_graphs if self.graphs else None)

        def use(i: int) -> None:
            self._switch(variants[i])
            if self.graphs:
                m._prefill_graphs = graphs[i]

        if b not in self._per_round:
            use(0)
            self._per_round[b] = self._count(self._ms(lambda: m.prefill(ids), 1), 1, MAX_REPS)
        reps = self._per_round[b]

        def run(i: int) -> float:
            use(i)
            return self._ms(lambda: m.prefill(ids), reps)

        try:
            return self._rounds(variants, run, over)
        finally:
            m.reset()


def load_model(manifest: Any, buckets: Iterable[int]) -> Any:
    """The artifact's model for validation (this host's records are applied, then overridden by the
    variants): random weights for a weights-free plan (timings do not depend on the values), a max
    batch that lets every decode bucket run as a decode step."""
    from .loader import load_artifact

    weights = None
    if manifest.data["weights"].get("state") == "pending":
        from ktc.pack import random_weights

        weights = random_weights(manifest.graph, device="cuda" if manifest.gpu else "cpu")
    max_batch = max([8, *(b for b in buckets if b <= DECODE_TOKENS)])
    return load_artifact(manifest.path, verify="sizes", max_batch_size=max_batch, weights=weights)


def load_bench(manifest: Any, buckets: Iterable[int]) -> Bench:
    """What `ktc tune` validates with: a ModelBench of the artifact's model."""
    return ModelBench(load_model(manifest, buckets))


def validation_rows(records: TuningRecords, model: str) -> list[tuple[int, dict[str, Any]]]:
    """(bucket, outcome) of `model` in bucket order."""
    return sorted(((int(b), e) for b, e in records.validation.get(model, {}).items()), key=lambda x: x[0])
