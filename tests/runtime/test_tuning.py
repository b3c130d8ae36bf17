"""Tuning logic with a fake timer: deterministic winners, records, host keys, resumption."""

import pytest

from ktc.runtime.tuning import (
    Candidate,
    Task,
    TuningKey,
    TuningRecord,
    TuningRecords,
    batch_bucket,
    host_key,
    tune,
)

HOST = {"cpu": "test cpu", "cpu_features": "abc", "gpu": "Test GPU sm90"}


def make_task(kernel: str, batch: int, times: dict[int, float], calls: list):
    """A task whose candidate with block size b 'takes' times[b] seconds."""
    key = TuningKey(kernel, (64, 128), "bfloat16", batch)

    def candidates():
        return [Candidate({"block": b}, (lambda b=b: calls.append((kernel, batch, b)))) for b in times]

    return Task(key, {"block": 32}, candidates), times


def fake_timer(times_by_call):
    def timer(run):
        run()
        kernel, batch, block = times_by_call["calls"][-1]
        return times_by_call["times"][(kernel, batch)][block]
    return timer


def test_fastest_candidate_wins_and_speedup_is_against_the_default():
    calls: list = []
    t1, times1 = make_task("matmul", 1, {32: 3.0, 64: 1.0, 128: 2.0}, calls)
    t2, times2 = make_task("matmul", 64, {32: 1.0, 64: 4.0, 128: 5.0}, calls)
    recs = TuningRecords(HOST)
    timer = fake_timer({"calls": calls, "times": {("matmul", 1): times1, ("matmul", 64): times2}})
    done = tune([t1, t2], recs, timer)
    assert done == [t1.key.id(), t2.key.id()]
    r1, r2 = recs.records[t1.key.id()], recs.records[t2.key.id()]
    assert r1.config == {"block": 64} and r1.speedup == pytest.approx(3.0)
    assert r2.config == {"block": 32} and r2.speedup == 1.0      # tuned never slower than the default
    assert recs.lookup("matmul", (64, 128), "bfloat16", 1) == {"block": 64}
    assert recs.lookup("matmul", (64, 128), "bfloat16", 50) == {"block": 32}    # bucket 64
    assert recs.lookup("matmul", (64, 128), "bfloat16", 3) == {"block": 64}     # bucket 4: nearest is 1
    assert recs.lookup("matmul", (1, 1), "bfloat16", 1) is None


def test_failing_candidates_are_skipped_and_a_failing_default_records_nothing():
    def boom():
        raise RuntimeError("out of shared memory")

    ok = Task(TuningKey("k", (1,), "f", 1), {"block": 32},
              lambda: [Candidate({"block": 32}, lambda: None), Candidate({"block": 256}, boom)])
    bad = Task(TuningKey("k", (2,), "f", 1), {"block": 32}, lambda: [Candidate({"block": 32}, boom)])
    recs = TuningRecords(HOST)
    assert tune([ok, bad], recs, timer=lambda run: (run(), 1.0)[1]) == [ok.key.id()]
    assert recs.records[ok.key.id()].candidates == 1


def test_resumption_skips_recorded_tasks_and_the_budget_stops_between_tasks():
    built = []

    def task(i):
        def candidates():
            built.append(i)
            return [Candidate({"block": 32}, lambda: None)]
        return Task(TuningKey("k", (i,), "f", 1), {"block": 32}, candidates)

    recs = TuningRecords(HOST)
    ticks = iter(range(100))
    tune([task(i) for i in range(5)], recs, timer=lambda run: 1.0, budget_s=3, clock=lambda: next(ticks))
    assert built == [0, 1]                            # the budget ran out after two tasks
    tune([task(i) for i in range(5)], recs, timer=lambda run: 1.0)
    assert built == [0, 1, 2, 3, 4]                   # resumed: 0 and 1 were not tuned again
    assert len(recs.records) == 5


def test_records_round_trip_and_other_hosts_are_ignored(tmp_path):
    recs = TuningRecords(HOST, {"a": TuningRecord("a", {"block": 64}, 1.0, 2.0, 3)})
    path = tmp_path / "t.json"
    recs.save(path)
    again, why = TuningRecords.load(path, HOST)
    assert why is None and again.to_json() == recs.to_json()
    other, why = TuningRecords.load(path, dict(HOST, gpu="Other GPU sm80"))
    assert other.records == {} and "another host" in why
    path.write_text("{broken")
    empty, why = TuningRecords.load(path, HOST)
    assert empty.records == {} and "unreadable" in why
    assert TuningRecords.load(tmp_path / "none.json", HOST) == (TuningRecords(HOST), None)


def test_buckets_and_host_key():
    assert [batch_bucket(n) for n in (1, 2, 3, 100, 5000)] == [1, 2, 4, 128, 2048]
    key = host_key(gpu=False)
    assert set(key) == {"cpu", "cpu_features", "gpu"} and key["gpu"] == ""
