"""`ktc tune` on a tiny CPU artifact (real timer: the kernels are cheap), its records, `--report`,
resumption after Ctrl-C, and ktc.load applying the records (or ignoring another host's)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ktc
from ktc.cli import main
from ktc.runtime.tuning import TuningRecords, artifact_records_path, host_id, host_key, user_records_path


@pytest.fixture
def artifact(compiled, tmp_path, monkeypatch):
    """A private copy of the tiny int8 artifact (tuning writes into it) and a private user cache."""
    monkeypatch.setenv("KTC_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "q.ktc"
    shutil.copytree(compiled("qwen3_moe", "int8"), path)
    return path


def _flat(text: str) -> str:
    """Words of the text, one space apart (table rules and borders left out)."""
    return " ".join(w for w in text.translate({ord(c): " " for c in "┃│━─╇┼╋┡┩"}).split())


def _records(path):
    recs, why = TuningRecords.load(artifact_records_path(path, host_key()), host_key())
    assert why is None
    return recs


def test_tune_writes_records_reports_them_and_load_applies_them(artifact, capsys):
    assert main(["tune", str(artifact), "--budget", "20s", "--batch-sizes", "1,2", "--no-validate"]) == 0
    recs = _records(artifact)
    assert {r.status for r in recs.records.values()} == {"unchecked"}     # applied without validation
    assert sorted(int(k.rsplit("|b", 1)[1]) for k in recs.records) == [1, 2]
    assert all(k.startswith("cpu.moe_experts_int8_") for k in recs.records)
    cache, _ = TuningRecords.load(user_records_path(host_key()), host_key())
    assert cache.records.keys() == recs.records.keys()
    capsys.readouterr()

    assert main(["tune", str(artifact), "--report"]) == 0
    report = capsys.readouterr().out
    for needle in ("default", "tuned", "speedup", "int8-g32", "2 records"):
        assert needle in report

    assert main(["tune", str(artifact), "--batch-sizes", "1,2", "--no-validate"]) == 0   # all recorded: nothing to do
    assert "0 kernel x batch tasks to measure, 2 already recorded" in _flat(capsys.readouterr().out)

    model = ktc.load(str(artifact))
    assert model.tuning["records"] == 2 and model.tuning["applied"] == 1 and model.tuning["notes"] == []
    name = model.cpu_kernels.kernel_names[0]
    threads = model.cpu_kernels._tuned_threads[name]
    assert set(threads) == {1, 2, 4}      # the tuned buckets and those one octave away; the rest: defaults
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert out.shape == (1, 6)


def test_cache_only_leaves_the_artifact_alone_and_load_uses_the_cache(artifact, capsys):
    # --no-validate: whether whole-step validation keeps a record depends on this host's timing noise,
    # which is not what this test is about (validation has its own tests, with a fake bench)
    assert main(["tune", str(artifact), "--batch-sizes", "4", "--cache-only", "--no-validate"]) == 0
    assert not (artifact / "tuning").exists()
    assert ktc.load(str(artifact)).tuning["applied"] == 1
    capsys.readouterr()
    assert main(["tune", str(artifact), "--report", "--cache-only"]) == 0
    assert "1 records" in capsys.readouterr().out
    # another artifact of the same kernels reuses the cache: nothing left to measure, joined into its tuning/
    assert main(["tune", str(artifact), "--batch-sizes", "4"]) == 0
    assert "0 kernel x batch tasks to measure" in _flat(capsys.readouterr().out)
    assert len(_records(artifact).records) == 1


def test_an_interrupted_tune_resumes_where_it_stopped(artifact, monkeypatch, capsys):
    import ktc.runtime.cpu_tune as cpu_tune

    real = cpu_tune.wall_timer

    def interrupting_timer(**kw):
        timer = real(target_s=0.005)

        def t(run):
            if (artifact / "tuning").is_dir() and len(_records(artifact).records) == 2:
                raise KeyboardInterrupt      # Ctrl-C in the third task, two records on disk
            return timer(run)
        return t

    monkeypatch.setattr(cpu_tune, "wall_timer", interrupting_timer)
    monkeypatch.setattr(cpu_tune, "thread_candidates", lambda n: [n, 1] if n > 1 else [1, 1])
    assert main(["tune", str(artifact), "--batch-sizes", "1,2,4,8"]) == 130
    first = _records(artifact).records
    assert len(first) == 2
    monkeypatch.setattr(cpu_tune, "wall_timer", real)
    capsys.readouterr()
    assert main(["tune", str(artifact), "--batch-sizes", "1,2,4,8"]) == 0
    assert "2 kernel x batch tasks to measure, 2 already recorded" in _flat(capsys.readouterr().out)
    again = _records(artifact).records
    assert len(again) == 4 and all((again[k].config, again[k].seconds) == (first[k].config, first[k].seconds)
                                   for k in first)


def test_the_budget_stops_a_tune_and_says_how_to_continue(artifact, monkeypatch, capsys):
    import ktc.cli.tune as cli_tune

    # a clock that moves 1 s each time it is read (a CPU task reads it about 4 times per candidate:
    # thread counts x functions, 2 x 3 on a host whose kernels have tile variants)
    ticks = iter(range(0, 10_000))
    monkeypatch.setattr(cli_tune, "_clock", lambda: float(next(ticks)))
    assert main(["tune", str(artifact), "--budget", "80s"]) == 0
    text = _flat(capsys.readouterr().out)
    assert "the budget ran out" in text and "again to continue" in text
    assert 0 < len(_records(artifact).records) < 12


def test_records_of_another_host_are_ignored_at_load(artifact, capsys):
    assert main(["tune", str(artifact), "--batch-sizes", "1"]) == 0
    mine = artifact_records_path(artifact, host_key())
    other = dict(host_key(), cpu="Another CPU 9000")
    data = json.loads(mine.read_text())
    data["host"] = other
    mine.rename(artifact / "tuning" / f"{host_id(other)}.json")
    (artifact / "tuning" / f"{host_id(other)}.json").write_text(json.dumps(data))
    shutil.rmtree(user_records_path(host_key()).parent)
    model = ktc.load(str(artifact))
    assert model.tuning["applied"] == 0 and "Another CPU 9000" in model.tuning["notes"][0]
    assert not model.cpu_kernels.__dict__.get("_tuned_threads")
    from ktc.runtime.tuning import tuning_summary

    assert "another host's records: ignored here" in tuning_summary(artifact)
    capsys.readouterr()
    assert main(["tune", str(artifact), "--report"]) == 0
    io = capsys.readouterr()
    assert "no tuning records" in io.out and "Another CPU 9000" in io.err


def test_bad_options_are_one_line_errors(artifact, capsys):
    assert main(["tune", str(artifact), "--budget", "soon"]) == 1
    assert main(["tune", str(artifact), "--batch-sizes", "0"]) == 1
    assert main(["tune", str(artifact.parent / "missing.ktc")]) == 1
    errs = capsys.readouterr().err
    assert "--budget 'soon'" in errs and "--batch-sizes '0'" in errs and "does not exist" in errs


# -- validation ----------------------------------------------------------------------------------------
class StepBench:
    """A fake whole-model bench: the step at a bucket takes 1 ms untuned, 0.1 ms less with the bucket's
    records where `faster` says so and 0.1 ms more elsewhere."""

    def __init__(self, faster: set[int]):
        self.faster = faster
        self.measured: list[int] = []

    def variant(self, records):
        return frozenset() if records is None else frozenset(
            k for k, r in records.records.items() if r.status in ("kept", "unchecked"))

    def measure(self, bucket, variants, over=None):
        self.measured.append(bucket)
        return [1.0 + (0.0 if not any(k.endswith(f"|b{bucket}") for k in v) else -0.1 if bucket in self.faster
                       else 0.1) for v in variants]

    def describe(self, bucket):
        return f"decode b{bucket}"


@pytest.fixture
def searched(artifact, monkeypatch):
    """The search finds 1 thread faster than the default 2 at every bucket (a fake timer), so every
    record differs from the default and validation has something to time."""
    import ktc.runtime.cpu_tune as cpu_tune

    monkeypatch.setenv("KTC_NUM_THREADS", "2")
    monkeypatch.setattr(cpu_tune, "thread_candidates", lambda n: [n, 1])

    def parity_timer(**kw):
        calls = [0]

        def timer(run):
            run()
            calls[0] += 1
            return 1e-3 if calls[0] % 2 else 0.5e-3      # candidates are timed in order: the default first
        return timer

    monkeypatch.setattr(cpu_tune, "wall_timer", parity_timer)
    return artifact


def _status(path) -> dict[int, str]:
    return {r.bucket: r.status for r in _records(path).records.values()}


def test_validation_drops_a_slower_bucket_and_keeps_a_faster_one(searched, monkeypatch, capsys):
    import ktc.runtime.tune_validate as tune_validate

    bench = StepBench(faster={1})
    monkeypatch.setattr(tune_validate, "load_bench", lambda manifest, buckets: bench)
    assert main(["tune", str(searched), "--batch-sizes", "1,2"]) == 0
    text = _flat(capsys.readouterr().out)
    assert _status(searched) == {1: "kept", 2: "dropped"} and sorted(bench.measured) == [1, 2]
    assert "validated 2 of 2 buckets" in text
    model = ktc.load(str(searched))
    threads = model.cpu_kernels._tuned_threads[model.cpu_kernels.kernel_names[0]]
    assert threads[1] == 1 and threads[2] == 2 and threads[4] == 2     # bucket 2 runs the default, and 4 borrows it
    assert model.tuning["applied"] == 1

    assert main(["tune", str(searched), "--report"]) == 0
    report = _flat(capsys.readouterr().out)
    for needle in ("validation: whole step, median", "bucket step untuned tuned ratio kept",
                   "1 decode b1 1.000 ms 0.900 ms 0.900 yes (1/1)", "2 decode b2 1.000 ms 1.100 ms 1.100 no (0/1)",
                   " kept ", " dropped "):
        assert needle in report, needle
    assert "not validated yet" not in report


def test_the_budget_leaves_records_unvalidated_and_unapplied_and_a_rerun_validates_them(searched, monkeypatch,
                                                                                         capsys):
    import ktc.cli.tune as cli_tune
    import ktc.runtime.tune_validate as tune_validate

    clock = [0.0]
    monkeypatch.setattr(cli_tune, "_clock", lambda: clock[0])

    def slow_load(manifest, buckets):
        clock[0] = 100.0                  # loading the model spent the rest of the budget
        return StepBench(faster={1, 2})

    monkeypatch.setattr(tune_validate, "load_bench", slow_load)
    assert main(["tune", str(searched), "--batch-sizes", "1,2", "--budget", "60s"]) == 0
    assert "are not applied: run `ktc tune" in _flat(capsys.readouterr().out)
    assert _status(searched) == {1: "pending", 2: "pending"}
    model = ktc.load(str(searched))
    assert model.tuning["records"] == 2 and model.tuning["applied"] == 0
    assert not model.cpu_kernels.__dict__.get("_tuned_threads")
    assert main(["tune", str(searched), "--report"]) == 0
    report = _flat(capsys.readouterr().out)
    assert "2 records not validated yet" in report and "1 decode b1 - - - unvalidated" in report

    bench = StepBench(faster={1, 2})
    monkeypatch.setattr(tune_validate, "load_bench", lambda manifest, buckets: bench)
    assert main(["tune", str(searched), "--batch-sizes", "1,2"]) == 0          # resumed: validation only
    text = _flat(capsys.readouterr().out)
    assert "0 kernel x batch tasks to measure, 2 already recorded" in text and "validated 2 of 2" in text
    assert _status(searched) == {1: "kept", 2: "kept"} and sorted(bench.measured) == [1, 2]
    assert ktc.load(str(searched)).tuning["applied"] == 1


def test_no_validate_applies_records_unchecked_and_a_later_tune_checks_them(searched, monkeypatch, capsys):
    import ktc.runtime.tune_validate as tune_validate

    def no_load(manifest, buckets):
        raise AssertionError("--no-validate loads no model")

    monkeypatch.setattr(tune_validate, "load_bench", no_load)
    assert main(["tune", str(searched), "--batch-sizes", "1,2", "--no-validate"]) == 0
    assert "2 records applied without validation" in _flat(capsys.readouterr().out)
    assert _status(searched) == {1: "unchecked", 2: "unchecked"}
    model = ktc.load(str(searched))
    assert model.cpu_kernels._tuned_threads[model.cpu_kernels.kernel_names[0]][2] == 1
    monkeypatch.setattr(tune_validate, "load_bench", lambda manifest, buckets: StepBench(faster={2}))
    assert main(["tune", str(searched), "--batch-sizes", "1,2"]) == 0
    assert _status(searched) == {1: "dropped", 2: "kept"}


def test_validation_with_the_real_model_on_the_tiny_artifact(searched, monkeypatch, capsys):
    """The real bench (few, short rounds): each bucket's outcome is timed and decides its records."""
    import ktc.runtime.tune_validate as tune_validate

    def small(manifest, buckets):
        return tune_validate.ModelBench(tune_validate.load_model(manifest, buckets), rounds=3, target_s=0.001,
                                        min_steps=1, context=8)

    monkeypatch.setattr(tune_validate, "load_bench", small)
    assert main(["tune", str(searched), "--batch-sizes", "2,32"]) == 0
    recs = _records(searched)
    outcomes = next(iter(recs.validation.values()))
    assert set(outcomes) == {"2", "32"}
    for r in recs.records.values():
        e = outcomes[str(r.bucket)]
        assert e["state"] == "validated" and e["step"] == ("decode b2" if r.bucket == 2 else "prefill 32")
        assert r.status == ("kept" if e["tuned_ms"] < e["untuned_ms"] else "dropped")
    text = _flat(capsys.readouterr().out)
    assert "decode b2" in text and "prefill 32" in text and " ms " in text


def test_decode_validation_of_a_fast_step_fits_a_short_context(artifact, monkeypatch):
    """A fast host times many steps per round; the rounds still fit the artifact's 256-token context
    (CI once failed with '336 decode steps do not fit')."""
    import ktc.runtime.tune_validate as tv

    monkeypatch.setattr(tv, "MAX_STEPS", 1000)
    model = ktc.load(str(artifact))
    assert model.max_context == 256
    bench = tv.ModelBench(model, rounds=5)
    bench._per_round[4] = 1000                  # as if one step took microseconds
    state = bench.current()
    times = bench.measure(4, [state, state])
    assert len(times) == 2 and all(t > 0 for t in times)
