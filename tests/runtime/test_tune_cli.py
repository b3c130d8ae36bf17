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
    return " ".join(text.split())


def _records(path):
    recs, why = TuningRecords.load(artifact_records_path(path, host_key()), host_key())
    assert why is None
    return recs


def test_tune_writes_records_reports_them_and_load_applies_them(artifact, capsys):
    assert main(["tune", str(artifact), "--budget", "20s", "--batch-sizes", "1,2"]) == 0
    recs = _records(artifact)
    assert sorted(int(k.rsplit("|b", 1)[1]) for k in recs.records) == [1, 2]
    assert all(k.startswith("cpu.moe_experts_int8_") for k in recs.records)
    cache, _ = TuningRecords.load(user_records_path(host_key()), host_key())
    assert cache.records.keys() == recs.records.keys()
    capsys.readouterr()

    assert main(["tune", str(artifact), "--report"]) == 0
    report = capsys.readouterr().out
    for needle in ("default", "tuned", "speedup", "int8-g32", "2 records"):
        assert needle in report

    assert main(["tune", str(artifact), "--batch-sizes", "1,2"]) == 0     # all recorded: nothing to do
    assert "0 kernel x batch tasks to measure, 2 already recorded" in _flat(capsys.readouterr().out)

    model = ktc.load(str(artifact))
    assert model.tuning["records"] == 2 and model.tuning["applied"] == 1 and model.tuning["notes"] == []
    name = model.cpu_kernels.kernel_names[0]
    threads = model.cpu_kernels._tuned_threads[name]
    assert set(threads) == {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048}
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert out.shape == (1, 6)


def test_cache_only_leaves_the_artifact_alone_and_load_uses_the_cache(artifact, capsys):
    assert main(["tune", str(artifact), "--batch-sizes", "4", "--cache-only"]) == 0
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
    assert len(again) == 4 and all(again[k] == first[k] for k in first)


def test_the_budget_stops_a_tune_and_says_how_to_continue(artifact, monkeypatch, capsys):
    import ktc.cli.tune as cli_tune

    ticks = iter(range(0, 10_000))            # a clock that moves 1 s each time it is read
    monkeypatch.setattr(cli_tune, "_clock", lambda: float(next(ticks)))
    assert main(["tune", str(artifact), "--budget", "20s"]) == 0
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
