"""Tuning logic with a fake timer (deterministic winners), records, host keys, resumption, the
runtime's nearest-bucket lookup (_cfg on a fake node), and the GPU task builder's candidate lists
(built on the CPU, kernels run once each in Triton's interpreter, never timed here)."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ktc.runtime.tuning import (
    BATCH_BUCKETS,
    Candidate,
    Task,
    TuningKey,
    TuningRecord,
    TuningRecords,
    apply_artifact_records,
    batch_bucket,
    bucket_order,
    bucket_table,
    host_key,
    load_host_records,
    nearest_bucket,
    parse_batch_sizes,
    parse_budget,
    tune,
    tuning_summary,
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
    t3, times3 = make_task("matmul", 256, {32: 1.0, 64: 0.99, 128: 5.0}, calls)
    recs = TuningRecords(HOST)
    timer = fake_timer({"calls": calls, "times": {("matmul", 1): times1, ("matmul", 64): times2,
                                                  ("matmul", 256): times3}})
    done = tune([t1, t2, t3], recs, timer)
    assert done == [t1.key.id(), t2.key.id(), t3.key.id()]
    r1, r2, r3 = (recs.records[t.key.id()] for t in (t1, t2, t3))
    assert r1.config == {"block": 64} and r1.speedup == pytest.approx(3.0) and r1.default == {"block": 32}
    assert r2.config == {"block": 32} and r2.speedup == 1.0      # tuned never slower than the default
    assert r3.config == {"block": 32} and r3.speedup == 1.0      # 1% faster is noise: the default stays
    assert all(r.status == "pending" for r in (r1, r2, r3))
    assert recs.lookup("matmul", (64, 128), "bfloat16", 1) is None     # not validated: not applied
    for r in (r1, r2, r3):
        r.status = "kept"
    assert recs.lookup("matmul", (64, 128), "bfloat16", 1) == {"block": 64}
    assert recs.lookup("matmul", (64, 128), "bfloat16", 50) == {"block": 32}    # bucket 64
    assert recs.lookup("matmul", (64, 128), "bfloat16", 2) == {"block": 64}     # bucket 2: nearest is 1
    assert recs.lookup("matmul", (64, 128), "bfloat16", 3) is None     # bucket 4: two octaves away, the default
    assert recs.lookup("matmul", (1, 1), "bfloat16", 1) is None


def test_candidates_are_warmed_first_and_the_fastest_are_timed_again():
    """A timer that is slow on its first reading (a cold GPU): candidates are timed in interleaved
    rounds and keep their best, so a config that is no faster does not win on measurement order."""
    log: list = []
    seen: set = set()

    def timer(run):
        cfg = run()
        first = cfg not in seen
        seen.add(cfg)
        return {32: 1.0, 64: 1.05, 128: 3.0}[cfg] * (5.0 if first and cfg == 32 else 1.0)

    def cand(b):
        return Candidate({"block": b}, lambda: (log.append(b), b)[1])

    task = Task(TuningKey("k", (1,), "f", 1), {"block": 32}, lambda: [cand(32), cand(64), cand(128)])
    recs = TuningRecords(HOST)
    tune([task], recs, timer)
    assert log[:3] == [32, 64, 128]                               # each compiled / warmed before any timing
    rec = recs.records[task.key.id()]
    assert rec.config == {"block": 32} and rec.default_seconds == 1.0 and rec.candidates == 3


def test_failing_candidates_are_skipped_and_a_failing_default_records_nothing():
    def boom():
        raise RuntimeError("out of shared memory")

    ok = Task(TuningKey("k", (1,), "f", 1), {"block": 32},
              lambda: [Candidate({"block": 32}, lambda: None), Candidate({"block": 256}, boom)])
    bad = Task(TuningKey("k", (2,), "f", 1), {"block": 32}, lambda: [Candidate({"block": 32}, boom)])
    recs = TuningRecords(HOST)
    assert tune([ok, bad], recs, timer=lambda run: (run(), 1.0)[1]) == [ok.key.id()]
    assert recs.records[ok.key.id()].candidates == 1


def _counting_tasks(n: int, built: list, per_task: int = 2):
    def task(i):
        def candidates():
            built.append(i)
            return [Candidate({"block": 32 * (c + 1)}, lambda: None) for c in range(per_task)]
        return Task(TuningKey("k", (i,), "f", 1), {"block": 32}, candidates)
    return [task(i) for i in range(n)]


def test_budget_stops_the_search_and_a_rerun_resumes_it():
    """A fake clock that only the timer advances, 1 s a timing: a task of 2 candidates takes 6 s (3
    rounds), so a 13 s budget finishes two tasks, drops the third it ran out in, and a rerun does
    the rest only."""
    now = [0.0]

    def timer(run):
        run()
        now[0] += 1.0
        return 1.0

    built: list = []
    recs = TuningRecords(HOST)
    done = tune(_counting_tasks(5, built), recs, timer, budget_s=13, clock=lambda: now[0])
    assert built == [0, 1, 2] and len(done) == 2 and set(recs.records) == set(done)   # task 2 not recorded
    done2 = tune(_counting_tasks(5, built), recs, timer, clock=lambda: now[0])
    assert built == [0, 1, 2, 2, 3, 4] and len(done2) == 3 and len(recs.records) == 5


def test_an_interrupted_tune_keeps_finished_records_and_resumes(tmp_path):
    """Ctrl-C in the middle of a task: the records saved after each earlier task survive on disk."""
    path = tmp_path / "t.json"
    calls = [0]

    def timer(run):
        calls[0] += 1
        if calls[0] == 13:                 # the first timing of the third task (2 candidates x 3 rounds a task)
            raise KeyboardInterrupt
        return 1.0

    built: list = []
    recs = TuningRecords(HOST)
    with pytest.raises(KeyboardInterrupt):
        tune(_counting_tasks(4, built), recs, timer, on_record=lambda r: recs.save(path))
    again, why = TuningRecords.load(path, HOST)
    assert why is None and len(again.records) == 2          # tasks 0 and 1 finished
    built.clear()
    assert len(tune(_counting_tasks(4, built), again, lambda run: 1.0)) == 2 and built == [2, 3]


def test_records_round_trip_and_other_hosts_are_ignored(tmp_path):
    recs = TuningRecords(HOST, {"a": TuningRecord("a", {"block": 64}, 1.0, 2.0, 3, {"block": 32})})
    path = tmp_path / "t.json"
    recs.save(path)
    again, why = TuningRecords.load(path, HOST)
    assert why is None and again.to_json() == recs.to_json() and again.records["a"].speedup == 2.0
    other, why = TuningRecords.load(path, dict(HOST, gpu="Other GPU sm80"))
    assert other.records == {} and "another host" in why
    path.write_text("{broken")
    empty, why = TuningRecords.load(path, HOST)
    assert empty.records == {} and "unreadable" in why
    path.write_text('{"version": 1, "host": {}, "records": {"a": {"key": "b", "config": {}, "seconds": 1, '
                    '"default_seconds": 1, "candidates": 1}}}')
    assert "unreadable" in TuningRecords.load(path, HOST)[1]         # a record filed under another key
    assert TuningRecords.load(tmp_path / "none.json", HOST) == (TuningRecords(HOST), None)


def test_artifact_records_of_another_host_are_ignored_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("KTC_CACHE_DIR", str(tmp_path / "cache"))
    art = tmp_path / "a.ktc"
    here = host_key()
    from ktc.runtime.tuning import artifact_records_path, host_id

    mine = TuningRecords(here, {"k|1|f|b1": TuningRecord("k|1|f|b1", {"x": 1}, 1.0, 2.0, 2)})
    mine.save(artifact_records_path(art, here))
    other_host = dict(here, gpu="Some Other GPU sm80")
    TuningRecords(other_host, {"k|1|f|b1": TuningRecord("k|1|f|b1", {"x": 9}, 1.0, 9.0, 2)}).save(
        art / "tuning" / f"{host_id(other_host)}.json")
    recs, notes = load_host_records(art, here)
    assert recs.records["k|1|f|b1"].config == {"x": 1}
    assert len(notes) == 1 and "another host (Some Other GPU sm80" in notes[0]
    summary = tuning_summary(art)
    assert "used on this host" in summary and "another host's records: ignored here" in summary
    assert "1 records for" in summary and "(1 pending)" in summary
    model = SimpleNamespace(graph=SimpleNamespace(nodes=[]), cpu_kernels=None)
    info = apply_artifact_records(model, art)
    assert model.tuning is info and info["records"] == 1 and info["applied"] == 0 and len(info["notes"]) == 1
    monkeypatch.setenv("KTC_TUNING", "0")
    assert apply_artifact_records(model, art)["records"] == 0


def test_buckets_nearest_and_tables():
    assert [batch_bucket(n) for n in (1, 2, 3, 100, 5000)] == [1, 2, 4, 128, 2048]
    assert nearest_bucket([1, 64], 2) == 1 and nearest_bucket([1, 64], 20) == 64
    assert nearest_bucket([1, 64], 3) is None                      # bucket 4: two octaves from 1, the default
    assert nearest_bucket([2, 8], 4) == 2                          # a tie in log2 distance: the smaller
    assert nearest_bucket([1, 2], 2048, split=16) is None          # no prefill bucket tuned: the default
    assert nearest_bucket([1, 2048], 1024, split=16) == 2048
    assert nearest_bucket([1, 2048], 256, split=16) is None        # 2048's records are not 256's
    table = bucket_table({1: "a", 2048: "z"}, split=16)
    assert [table.get(b) for b in BATCH_BUCKETS] == ["a"] * 2 + [None] * 8 + ["z"] * 2
    assert bucket_order([1, 2, 4, 2048, 64]) == [1, 2048, 2, 4, 64]
    key = host_key(gpu=False)
    assert set(key) == {"cpu", "cpu_features", "gpu"} and key["gpu"] == ""


def test_parse_budget_and_batch_sizes():
    from ktc.errors import InputError

    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1h30m") == 5400
    assert parse_budget("45") == 45 and parse_budget(None) is None
    for bad in ("ten", "5x", "0s", "m"):
        with pytest.raises(InputError):
            parse_budget(bad)
    assert parse_batch_sizes("1,2,3,100") == [1, 2, 4, 128] and parse_batch_sizes(None) == list(BATCH_BUCKETS)
    for bad in ("a,b", "0", ""):
        with pytest.raises(InputError):
            parse_batch_sizes(bad)


# -- the runtime's choice: _cfg ---------------------------------------------------------------------
def _ctx(batch: int, seq: int):
    from ktc.runtime.gpu.ops import GpuRunContext

    return GpuRunContext(kernels=None, cache=None, positions=None, batch=batch, seq=seq, past=0)


def test_cfg_picks_the_tuned_config_of_the_nearest_bucket_else_the_phase_default():
    from ktc.ir import Node
    from ktc.runtime.gpu.ops import _cfg

    dec, pre = {"BLOCK_M": 16}, {"BLOCK_M": 128}
    node = Node("l", "linear", ["x"], ["y"], attrs={"gpu_config": {"decode": {"linear": dec, "attention": {"a": 1}},
                                                                    "prefill": {"linear": pre, "attention": {"a": 2}}}})
    assert _cfg(node, _ctx(1, 1), "linear") is dec and _cfg(node, _ctx(1, 512), "linear") is pre
    tuned1, tuned64 = {"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 64}
    node.attrs["gpu_tuned"] = {"linear": bucket_table({1: tuned1, 64: tuned64}, 16),
                               "attention.decode": bucket_table({1: {"d": 1}}, 16)}
    assert _cfg(node, _ctx(1, 1), "linear") is tuned1
    assert _cfg(node, _ctx(2, 1), "linear") is tuned1              # bucket 2: nearest tuned is 1
    assert _cfg(node, _ctx(4, 1), "linear") is dec                 # bucket 4: two octaves from 1, the default
    assert _cfg(node, _ctx(2, 50), "linear") is tuned64            # bucket 128: nearest is 64
    assert _cfg(node, _ctx(1, 2048), "linear") is pre              # 64 is five octaves away: the default
    assert _cfg(node, _ctx(2, 1), "attention") == {"d": 1}         # decode kernel (seq 1): its table
    assert _cfg(node, _ctx(1, 4), "attention") == {"a": 1}         # prefill kernel, not tuned: the default
    assert _cfg(node, _ctx(1, 64), "attention", phase="prefill") == {"a": 2}
    node.attrs["gpu_tuned"] = {"linear": bucket_table({1: tuned1}, 16)}
    assert _cfg(node, _ctx(1, 512), "linear") is pre               # only decode tuned: prefill keeps its default


# -- the GPU task builder, on the CPU ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_artifacts(tiny_models, tmp_path_factory):
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("tune-gpu")
    out = {}
    for arch, gq in (("qwen2_moe", None), ("qwen3_moe", "int4")):
        out[arch] = root / f"{arch}.ktc"
        compile_model(tiny_models[arch], out[arch], target="cuda", gpu_quant=gq)
    return out


def _kernels(path):
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.gpu.kernels import load_kernels

    m = read_manifest(path)
    return m, load_kernels(path / m.gpu["dir"] / "src")


def _valid(family: str, cfg: dict, t, max_shared: int) -> bool:
    """Independent checks of a candidate: powers of two, tl.dot's 16 minimum, shared memory."""
    blocks = {k: v for k, v in cfg.items() if k.isupper() and isinstance(v, int) and k != "SPLITS"}
    if any(v & (v - 1) for v in blocks.values()):
        return False
    if family == "matmul":
        bm, bn, bk, st = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]
        return min(bm, bn, bk) >= 16 and st * (bm * bk + bk * bn) * 2 <= max_shared
    if family == "moe":
        ok = cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N_UP"] >= 16 and cfg["BLOCK_N_DOWN"] >= 16
        return ok and (t.params["group"] is None or cfg["BLOCK_K"] == t.params["group"])
    if family == "norm":
        return cfg["BLOCK"] >= t.shape[0]
    return cfg["BLOCK_N"] >= 16 and cfg.get("BLOCK_M", 16) >= 16


def test_gpu_tasks_list_valid_candidates_default_first_and_each_runs(cuda_artifacts):
    from ktc.runtime.gpu.tune import DEFAULT_MAX_SHARED, candidate_configs, gpu_tasks, node_tunables

    for path in cuda_artifacts.values():
        m, kernels = _kernels(path)
        g = m.graph
        seen = {}
        sizes: list[int] = []
        for node in g.nodes:
            for t in node_tunables(g, node, kernels):
                seen.setdefault((t.kernel, t.shape, t.fmt), (node, t))
        tables = {t.table for node in g.nodes for t in node_tunables(g, node, kernels)}
        assert {"norm", "qkv", "o", "moe", "attention.decode", "attention.prefill", "logits", "linear"} <= tables
        for node, t in seen.values():
            for b in BATCH_BUCKETS:
                if not t.runs_at(b):
                    continue
                cands = candidate_configs(node, t, b, kernels, max_shared=101376)      # a 99 KiB GPU
                phase = "decode" if b <= 16 else "prefill"
                default = node.attrs["gpu_config"]["prefill" if t.table == "attention.prefill" else phase][t.cfg_key]
                assert cands[0] == {**default, **({"SPLITS": cands[0]["SPLITS"]} if "SPLITS" in cands[0] else {})}
                assert all(c not in cands[:i] for i, c in enumerate(cands))
                sizes.append(len(cands))
                assert all(_valid(t.family, c, t, 101376) for c in cands[1:]), (t.table, b)
                assert len(candidate_configs(node, t, b, kernels, DEFAULT_MAX_SHARED)) >= len(cands)
        assert sum(n > 1 for n in sizes) > 0.9 * len(sizes)      # tiny shapes leave a few with the default only
        # every candidate at bucket 1 (a few for decode attention, slow in the interpreter) runs and agrees
        tasks = [t for t in gpu_tasks(g, kernels, [1], device="cpu", dtype=torch.float32)]
        assert tasks and all(t.key.batch == 1 for t in tasks)
        for task in tasks:
            cands = task.candidates()
            assert cands[0].config == task.default
            if "attention_decode" in task.key.kernel:
                cands = cands[:3]
            ref = _out(cands[0].run())
            for c in cands[1:]:
                got = _out(c.run())
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (task.key.id(), c.config)


def _out(res):
    return (res[0] if isinstance(res, tuple) else res).detach().clone().float()


def test_prefill_tasks_run_in_the_interpreter(cuda_artifacts):
    from ktc.runtime.gpu.tune import gpu_tasks

    m, kernels = _kernels(cuda_artifacts["qwen3_moe"])
    tasks = gpu_tasks(m.graph, kernels, [32], device="cpu", dtype=torch.float32)
    kinds = {t.key.kernel.split("#")[0] for t in tasks}
    assert "attention.attention_prefill" in kinds and "matmul.linear" in kinds      # logits past FUSED_TOKENS
    for task in tasks:
        if "attention_decode" in task.key.kernel:
            continue
        cands = task.candidates()
        ref = _out(cands[0].run())
        got = _out(cands[-1].run())
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (task.key.id(), cands[-1].config)


def test_apply_gpu_records_sets_tables_and_ignores_configs_that_are_no_candidates(cuda_artifacts):
    from ktc.runtime.gpu.ops import _cfg
    from ktc.runtime.gpu.tune import apply_gpu_records, candidate_configs, node_tunables

    m, kernels = _kernels(cuda_artifacts["qwen2_moe"])
    g = m.graph
    node = next(n for n in g.nodes if n.op == "attention")
    qkv = next(t for t in node_tunables(g, node, kernels) if t.table == "qkv")
    o = next(t for t in node_tunables(g, node, kernels) if t.table == "o")
    good = candidate_configs(node, qkv, 1, kernels)[-1]
    recs = TuningRecords(HOST)
    for t, cfg in ((qkv, good), (o, {"BLOCK_M": 3, "BLOCK_N": 5, "BLOCK_K": 7, "GROUP_M": 1, "num_warps": 4,
                                      "num_stages": 4})):
        key = TuningKey(t.kernel, t.shape, t.fmt, 1).id()
        recs.add(TuningRecord(key, cfg, 1.0, 2.0, 5, status="kept"))
    assert apply_gpu_records(g, kernels, recs) == 1
    attn = [n for n in g.nodes if n.op == "attention"]
    assert all(set(n.attrs["gpu_tuned"]) == {"qkv"} for n in attn)     # every layer shares the record
    assert _cfg(node, _ctx(2, 1), "qkv") == good and _cfg(node, _ctx(2, 1), "o") == node.attrs["gpu_config"][
        "decode"]["o"]
    assert _cfg(node, _ctx(1, 64), "qkv") == node.attrs["gpu_config"]["prefill"]["qkv"]
    assert apply_gpu_records(g, kernels, TuningRecords(HOST)) == 0 and "gpu_tuned" not in node.attrs
    qkv_key = TuningKey(qkv.kernel, qkv.shape, qkv.fmt, 1).id()
    default = node.attrs["gpu_config"]["decode"]["qkv"]
    for status, applied, want in (("pending", 0, None), ("unchecked", 1, good), ("dropped", 0, default)):
        recs = TuningRecords(HOST, {qkv_key: TuningRecord(qkv_key, good, 1.0, 2.0, 5, default, status)})
        assert apply_gpu_records(g, kernels, recs) == applied, status
        assert node.attrs.get("gpu_tuned", {}).get("qkv", {}).get(1) == want, status


# -- parallel precompile (runtime/gpu/precompile.py) ---------------------------------------------------
def test_precompile_jobs_are_the_distinct_configs_per_token_class_split_without_overlap(cuda_artifacts):
    import json

    from ktc.runtime.gpu.precompile import distinct_jobs, split_jobs, token_class
    from ktc.runtime.gpu.tune import gpu_tasks

    m, kernels = _kernels(cuda_artifacts["qwen2_moe"])
    tasks = gpu_tasks(m.graph, kernels, [1, 2, 32, 64], device="cpu", dtype=torch.float32)
    want = {(t.key.kernel, t.key.format, json.dumps(c, sort_keys=True), token_class(t.key.batch))
            for t in tasks for c in t.configs}
    jobs = distinct_jobs(tasks)
    by_id = {t.key.id(): t for t in tasks}
    got = [(by_id[j.key].key.kernel, by_id[j.key].key.format, j.config, token_class(by_id[j.key].key.batch))
           for j in jobs]
    assert len(got) == len(set(got)) and set(got) == want
    assert sum(t.key.batch == 1 for t in tasks) and {token_class(b) for b in (32, 64)} == {16}
    assert len(jobs) < sum(len(t.configs) for t in tasks)        # 64's configs are 32's: compiled once
    for workers in (1, 3, 1000):
        shares = split_jobs(jobs, workers)
        assert len(shares) == min(workers, len(jobs))
        assert sorted((j for s in shares for j in s), key=str) == sorted(jobs, key=str)


def test_precompile_workers_run_every_job_and_failures_or_the_time_limit_do_not_raise(cuda_artifacts, tmp_path):
    from ktc.runtime.gpu.precompile import distinct_jobs, precompile
    from ktc.runtime.gpu.tune import gpu_tasks

    path = cuda_artifacts["qwen2_moe"]
    m, kernels = _kernels(path)
    tasks = [t for t in gpu_tasks(m.graph, kernels, [1], device="cpu", dtype=torch.float32) if "norm." in t.key.kernel]
    res = precompile(path, [1], tasks, workers=2, device="cpu")        # Triton's interpreter: runs, compiles nothing
    assert res.finished and res.error is None and res.workers == 2
    assert res.ran == res.jobs == len(distinct_jobs(tasks)) > 2 and res.failed == 0
    res = precompile(tmp_path / "missing.ktc", [1], tasks, workers=2, device="cpu")
    assert res.finished and res.ran == 0 and res.failed == res.jobs and "missing.ktc" in res.error
    res = precompile(path, [1], tasks, workers=2, device="cpu", timeout_s=0.01)
    assert not res.finished and res.ran == 0 and res.seconds < 30


# -- CPU thread counts --------------------------------------------------------------------------------
def test_cpu_thread_tuning_with_a_real_timer_and_applied_thread_counts(compiled, monkeypatch):
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.cpu_experts import num_threads
    from ktc.runtime.cpu_tune import (
        _paths_at,
        apply_cpu_records,
        cpu_tasks,
        load_cpu_kernels,
        thread_candidates,
        wall_timer,
    )

    assert thread_candidates(16) == [16, 15, 12, 8] and thread_candidates(2) == [2, 1]
    assert thread_candidates(1) == [1]
    m = read_manifest(compiled("qwen3_moe", "int8"))
    kernels = load_cpu_kernels(m)
    tasks = cpu_tasks(m, kernels, buckets=[1, 8])
    assert [t.key.batch for t in tasks] == [1] * len(kernels.kernel_names) + [8] * len(kernels.kernel_names)
    recs = TuningRecords(HOST)
    done = tune(tasks, recs, wall_timer(target_s=0.01))
    assert len(done) == len(tasks)
    n = num_threads()
    for task in tasks:     # threads x the functions worth a candidate there (tile variants: x86-avx512 hosts)
        r = recs.records[task.key.id()]
        fns = _paths_at(kernels, task.key.kernel.split(".", 1)[1].split("#")[0], task.key.batch)
        assert r.default == ({"threads": n} if fns == [None] else {"threads": n, "prefill": fns[0]})
        assert r.config["threads"] in thread_candidates(n) and r.config.get("prefill") in fns
        assert r.candidates == len(thread_candidates(n)) * len(fns) and r.seconds > 0
    assert apply_cpu_records(kernels, m.graph, recs, m.files) == 0        # pending: not applied
    assert not kernels.__dict__.get("_tuned_threads")
    for r in recs.records.values():
        r.status = "kept"
    assert apply_cpu_records(kernels, m.graph, recs, m.files) == len(kernels.kernel_names)
    # a record asking for more threads than this host has is never applied
    name = kernels.kernel_names[0]
    for r in recs.records.values():
        r.config = {**r.config, "threads": n + 5}
    assert apply_cpu_records(kernels, m.graph, recs, m.files) == 0
    assert name not in kernels.__dict__.get("_tuned_threads", {})


def test_tuned_thread_counts_change_nothing_but_the_split(compiled):
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.cpu_tune import load_cpu_kernels, node_weights

    m = read_manifest(compiled("qwen3_moe", "int8"))
    kernels = load_cpu_kernels(m)
    name = kernels.kernel_names[0]
    node = next(n for n in m.graph.nodes if n.kernel == name)
    packed = node_weights(m, node)
    e, h, k = int(node.attrs["num_experts"]), int(node.attrs["hidden_size"]), int(node.attrs["top_k"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, h, generator=gen)
    ids = torch.rand(5, e, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
    tw = torch.softmax(torch.randn(5, k, generator=gen), dim=-1)
    ref = kernels.moe_experts(name, x, tw, ids, packed)
    kernels.set_tuned_threads(name, dict.fromkeys(BATCH_BUCKETS, 1))
    try:
        assert torch.allclose(kernels.moe_experts(name, x, tw, ids, packed), ref, rtol=1e-5, atol=1e-6)
    finally:
        kernels.set_tuned_threads(name, None)


# -- validation: the whole step with and without a bucket's records -------------------------------------
class FakeBench:
    """Step time at a bucket = base + the sum of the deltas of the records that run their searched
    config there; records the time of every measurement."""

    def __init__(self, base: dict[int, float], delta: dict[str, float], fail_at: int | None = None):
        self.base, self.delta, self.fail_at = base, delta, fail_at
        self.measured: list[tuple[int, int]] = []

    def variant(self, records):
        if records is None:
            return frozenset()
        return frozenset(k for k, r in records.records.items() if r.status in ("kept", "unchecked"))

    def measure(self, bucket, variants, over=None):
        if bucket == self.fail_at:
            raise RuntimeError("CUDA out of memory\nmore")
        self.measured.append((bucket, len(variants)))
        return [self.base[bucket] + sum(self.delta.get(k, 0.0) for k in v if k.endswith(f"|b{bucket}"))
                for v in variants]

    def describe(self, bucket):
        return f"decode b{bucket}" if bucket <= 16 else f"prefill {bucket}"


def _recs(spec: dict[str, int], status: str = "pending") -> TuningRecords:
    """Records kernel@bucket -> a searched config that differs from the default."""
    out = TuningRecords(HOST)
    for name, b in spec.items():
        key = TuningKey(name, (8,), "f", b).id()
        out.add(TuningRecord(key, {"block": 64}, 1.0, 2.0, 3, {"block": 32}, status))
    return out


def _key(name: str, b: int) -> str:
    return TuningKey(name, (8,), "f", b).id()


def test_validation_keeps_a_faster_bucket_and_drops_a_slower_one():
    from ktc.runtime.tune_validate import validate

    recs = _recs({"mm": 1, "moe": 2048})
    bench = FakeBench({1: 0.43, 2048: 3.23}, {_key("mm", 1): -0.01, _key("moe", 2048): +0.27})
    saved = []
    out = validate(recs, bench, "m1", on_bucket=lambda b, e: saved.append(b))
    assert saved == [1, 2048] and set(recs.validation["m1"]) == {"1", "2048"}
    assert recs.records[_key("mm", 1)].status == "kept" and recs.records[_key("moe", 2048)].status == "dropped"
    e1, e2 = out[1], out[2048]
    assert e1["untuned_ms"] == 0.43 and e1["tuned_ms"] == pytest.approx(0.42) and e1["kept"] == 1
    assert e2["step"] == "prefill 2048" and e2["tuned_ms"] == pytest.approx(3.5) and e2["kept"] == 0
    assert e2["dropped"] == [_key("moe", 2048)]
    # a dropped record runs the default at its bucket: the prefill side does not borrow another bucket's
    assert recs.lookup("moe", (8,), "f", 2048) == {"block": 32} and recs.lookup("mm", (8,), "f", 1) == {"block": 64}
    assert validate(recs, bench, "m1") == {}                  # nothing left to validate: nothing timed again
    assert len(bench.measured) == 2


def test_equal_times_drop_the_records_no_slack():
    from ktc.runtime.tune_validate import validate

    recs = _recs({"mm": 4})
    validate(recs, FakeBench({4: 1.0}, {_key("mm", 4): 0.0}), "m")
    assert recs.records[_key("mm", 4)].status == "dropped"


def test_validation_drops_the_harmful_record_of_a_bucket_and_keeps_the_others():
    from ktc.runtime.tune_validate import validate

    recs = _recs({"a": 2048, "b": 2048, "c": 2048, "d": 1})
    delta = {_key("a", 2048): -0.2, _key("b", 2048): +0.5, _key("c", 2048): -0.1, _key("d", 1): -0.1}
    bench = FakeBench({1: 1.0, 2048: 3.0}, delta)
    out = validate(recs, bench, "m")
    st = {k.split("|")[0] + "@" + k.rsplit("b", 1)[1]: r.status for k, r in recs.records.items()}
    assert st == {"a@2048": "kept", "b@2048": "dropped", "c@2048": "kept", "d@1": "kept"}
    e = out[2048]
    assert e["kept"] == 2 and e["records"] == 3 and e["dropped"] == [_key("b", 2048)]
    assert e["all_ms"] == pytest.approx(3.2) and e["tuned_ms"] == pytest.approx(2.7) and e["untuned_ms"] == 3.0
    assert bench.measured == [(1, 2), (2048, 2), (2048, 5)]       # all vs none, then one ablation round-up


def test_validation_drops_greedily_until_faster_or_all_dropped():
    from ktc.runtime.tune_validate import validate

    # two records hurt: dropping the worst (by ablation) is not enough, the greedy loop drops the next
    recs = _recs({"a": 64, "b": 64, "c": 64})
    delta = {_key("a", 64): +0.3, _key("b", 64): +0.2, _key("c", 64): -0.1}
    bench = FakeBench({64: 1.0}, delta)
    out = validate(recs, bench, "m")
    assert [recs.records[_key(n, 64)].status for n in "abc"] == ["dropped", "dropped", "kept"]
    assert out[64]["kept"] == 1 and out[64]["tuned_ms"] == pytest.approx(0.9)
    assert bench.measured == [(64, 2), (64, 5), (64, 2)]
    bad = _recs({"a": 8, "b": 8})
    out = validate(bad, FakeBench({8: 1.0}, {_key("a", 8): 0.1, _key("b", 8): 0.1}), "m")
    assert {r.status for r in bad.records.values()} == {"dropped"} and out[8]["kept"] == 0
    assert out[8]["tuned_ms"] == pytest.approx(1.2) and "all dropped" in out[8]["note"]


def test_default_configs_are_kept_untimed_and_dropped_records_are_not_validated_again():
    from ktc.runtime.tune_validate import validate

    recs = _recs({"a": 16})
    recs.records[_key("a", 16)].config = {"block": 32}               # the search kept the default
    bench = FakeBench({16: 1.0}, {})
    out = validate(recs, bench, "m")
    assert bench.measured == [] and out[16]["kept"] == 1 and out[16]["untuned_ms"] is None
    assert recs.records[_key("a", 16)].status == "kept"
    # a new record joins a validated bucket (resumed search): the bucket is validated again, the
    # record dropped before stays dropped, the kept one is timed again with the new one
    recs.add(TuningRecord(_key("b", 16), {"block": 64}, 1.0, 2.0, 3, {"block": 32}))
    recs.add(TuningRecord(_key("c", 16), {"block": 64}, 1.0, 2.0, 3, {"block": 32}, "dropped"))
    out = validate(recs, FakeBench({16: 1.0}, {_key("b", 16): -0.5, _key("c", 16): -0.5}), "m")
    assert out[16]["records"] == 2 and out[16]["tuned_ms"] == 0.5
    assert recs.records[_key("c", 16)].status == "dropped" and recs.records[_key("b", 16)].status == "kept"


def test_validation_budget_and_errors_leave_records_pending():
    from ktc.runtime.tune_validate import validate

    recs = _recs({"a": 1, "b": 2048, "c": 4})
    reads = [0]

    def over():             # the budget runs out after the first bucket's first check
        reads[0] += 1
        return reads[0] > 2

    bench = FakeBench({1: 1.0, 4: 1.0, 2048: 1.0}, {_key("a", 1): -0.5, _key("b", 2048): -0.5}, fail_at=4)
    out = validate(recs, bench, "m", over=over)
    assert out[1]["state"] == "validated" and recs.records[_key("a", 1)].status == "kept"
    assert out[2048]["state"] == "unvalidated" and recs.records[_key("b", 2048)].status == "pending"
    assert out[4]["state"] == "unvalidated"
    assert recs.lookup("b", (8,), "f", 2048) is None                 # pending: never applied
    out = validate(recs, bench, "m")                                   # the rerun: no budget
    assert out[2048]["state"] == "validated" and recs.records[_key("b", 2048)].status == "kept"
    assert out[4]["state"] == "error" and "CUDA out of memory" in out[4]["note"] and "more" not in out[4]["note"]
    assert recs.records[_key("c", 4)].status == "pending" and set(out) == {2048, 4}
    again = TuningRecords.from_json(recs.to_json())
    assert again.validation == recs.validation and again.records[_key("c", 4)].status == "pending"


def test_records_files_without_statuses_are_pending_and_bad_statuses_unreadable(tmp_path):
    import json

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": 1, "host": HOST, "records": {"k|8|f|b1": {
        "key": "k|8|f|b1", "config": {"x": 1}, "seconds": 1, "default_seconds": 2, "candidates": 2}}}))
    recs, why = TuningRecords.load(path, HOST)
    assert why is None and recs.records["k|8|f|b1"].status == "pending" and recs.validation == {}
    data = json.loads(path.read_text())
    data["records"]["k|8|f|b1"]["status"] = "great"
    path.write_text(json.dumps(data))
    assert "unreadable" in TuningRecords.load(path, HOST)[1]


def test_model_bench_times_the_tiny_cpu_model_with_and_without_records(compiled, monkeypatch):
    """The real bench on the tiny CPU artifact: variants switch the kernels' thread tables, decode and
    prefill buckets are timed, and the decision follows the times."""
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.cpu_experts import num_threads
    from ktc.runtime.cpu_tune import kernel_key, lib_hash
    from ktc.runtime.tune_validate import ModelBench, load_model, validate

    monkeypatch.setenv("KTC_NUM_THREADS", "2")
    m = read_manifest(compiled("qwen3_moe", "int8"))
    model = load_model(m, [1, 32])
    kernels = model.cpu_kernels
    name = kernels.kernel_names[0]
    assert num_threads() == 2 and model.max_batch_size == 8
    kernel, shape, fmt = kernel_key(kernels.entry, name, lib_hash(kernels.entry, kernels.kernel_dir, m.files), 2)
    recs = TuningRecords(HOST)
    for b in (1, 32):
        key = TuningKey(kernel, shape, fmt, b).id()
        recs.add(TuningRecord(key, {"threads": 1}, 1e-4, 2e-4, 2, {"threads": 2}))
    bench = ModelBench(model, rounds=3, target_s=0.001, min_steps=1, context=8)
    assert bench.describe(1) == "decode b1" and bench.describe(32) == "prefill 32"
    assert model.max_context == 256 and bench.describe(1024) == "prefill 1024 (4x256)"    # split to fit the context
    tuned = bench.variant(TuningRecords(HOST, {k: replace(r, status="kept") for k, r in recs.records.items()}))
    untuned = bench.variant(None)
    bench._switch(tuned)
    assert kernels._tuned_threads[name][1] == 1 and kernels._tuned_threads[name][32] == 1
    assert 2048 not in kernels._tuned_threads[name]          # six octaves from 32: the default
    bench._switch(untuned)
    assert name not in kernels._tuned_threads
    out = validate(recs, bench, "tiny")
    for b in (1, 32):
        e = out[b]
        assert e["state"] == "validated" and e["untuned_ms"] > 0 and e["tuned_ms"] > 0
        key = TuningKey(kernel, shape, fmt, b).id()
        assert recs.records[key].status == ("kept" if e["tuned_ms"] < e["untuned_ms"] else "dropped")
    assert model.past_length == 0                       # the bench leaves the model reset
