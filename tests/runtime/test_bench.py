"""`ktc bench` and runtime/bench.py: figures from a tiny compiled CPU model, the overlap
arithmetic on a fake heterogeneous model, and bad options as one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ktc.cli import main
from ktc.errors import InputError
from ktc.runtime.bench import bench_decode, bench_prefill, cpu_model_name, layer_overlap, overlap
from ktc.runtime.loader import load_artifact


@pytest.fixture(scope="module")
def artifact(compiled):
    return compiled("qwen3_moe", "int8")


@pytest.fixture(scope="module")
def model(artifact):
    return load_artifact(artifact, verify="sizes", max_batch_size=2, max_context=64)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


# -- the measuring functions on a real (tiny, CPU) model -------------------------------------------
def test_bench_prefill_one_row_per_length(model):
    rows = bench_prefill(model, [4, 12], batch=2, repeats=2, seed=1)
    assert [(r["length"], r["batch"]) for r in rows] == [(4, 2), (12, 2)]
    for r in rows:
        assert len(r["runs_ms"]) == 2 and all(_positive(ms) for ms in r["runs_ms"])
        assert _positive(r["ms"]) and min(r["runs_ms"]) <= r["ms"] <= max(r["runs_ms"])
        assert r["tokens_per_s"] == pytest.approx(2 * r["length"] / r["ms"] * 1e3)
        assert r["layers"] is None                       # a CPU-only model has no CPU/GPU overlap to show
    assert model.past_length == 0                        # the cache is freed afterwards


def test_bench_decode_figures(model):
    d = bench_decode(model, context=10, steps=3, repeats=2, seed=0)
    assert (d["context"], d["batch"], d["steps"]) == (10, 1, 3)
    assert len(d["runs_ms_per_token"]) == 2
    assert _positive(d["ms_per_token"]) and _positive(d["prefill_ms"])
    assert d["tokens_per_s"] == pytest.approx(1e3 / d["ms_per_token"])
    assert d["layers"] is None and model.past_length == 0


def test_bench_rejects_nonsense(model):
    with pytest.raises(InputError, match="repeats"):
        bench_prefill(model, [4], repeats=0)
    with pytest.raises(InputError, match="prompt length"):
        bench_prefill(model, [0])
    with pytest.raises(InputError, match="context"):
        bench_decode(model, context=0, steps=2)
    with pytest.raises(InputError, match="longer than the model context"):
        bench_decode(model, context=63, steps=4, repeats=1)


# -- overlap ------------------------------------------------------------------------------------------
def test_overlap_is_the_share_of_cpu_time_with_gpu_work_beside_it():
    assert overlap(4.0, 1.0) == pytest.approx(0.25)
    assert overlap(4.0, 6.0) == 1.0                      # the GPU was busy longer than the CPU worked
    assert overlap(2.0, 0.0) == 0.0
    assert overlap(2.0, None) is None                    # no GPU timings (no CUDA)


def test_layer_overlap_rows_and_summary():
    stats = [{"layer": 3, "calls": 4, "cpu_ms": 2.0, "wait_ms": 1.0, "gpu_ms": 2.0, "tokens": 1.0},
             {"layer": 1, "calls": 4, "cpu_ms": 1.0, "wait_ms": 0.0, "gpu_ms": 0.5, "tokens": 1.0}]
    res = layer_overlap(stats, step_ms=10.0, steps=4)
    assert [r["layer"] for r in res["rows"]] == [1, 3]
    assert [r["overlap"] for r in res["rows"]] == [0.5, 1.0]
    s = res["summary"]
    assert (s["layers"], s["overlap_min"], s["overlap_max"]) == (2, 0.5, 1.0)
    assert s["overlap_mean"] == pytest.approx(0.75)
    assert s["cpu_ms_sum"] == pytest.approx(3.0) and s["wait_ms_sum"] == pytest.approx(1.0)
    assert s["overall_overlap"] == pytest.approx(2.5 / 3)
    assert s["cpu_share"] == pytest.approx(0.3) and s["wait_share"] == pytest.approx(0.1)
    twice = layer_overlap([dict(r, calls=8) for r in stats], steps=4)["summary"]   # two calls per pass
    assert twice["cpu_ms_sum"] == pytest.approx(6.0)
    assert layer_overlap([]) == {"rows": [], "summary": None}


class FakeHeteroModel:
    """A model with the CPU-expert profiler of heterogeneous models; records when profiling is on."""

    vocab_size = 32
    max_batch_size = 1

    def __init__(self):
        self.profiling = False
        self.profiled_calls = 0
        self.length = 0

    def profile(self, on: bool) -> None:
        self.profiling = on
        if on:
            self.profiled_calls = 0

    def layer_stats(self) -> list[dict]:
        assert self.profiling, "layer_stats read after profile(False)"
        n = self.profiled_calls
        return [{"layer": 0, "calls": n, "cpu_ms": 2.0, "wait_ms": 0.5, "gpu_ms": 1.5, "tokens": 1.0},
                {"layer": 1, "calls": n, "cpu_ms": 1.0, "wait_ms": 1.5, "gpu_ms": 0.0, "tokens": 1.0}]

    def _forward(self, n: int) -> torch.Tensor:
        self.profiled_calls += self.profiling
        self.length += n
        return torch.zeros(1, self.vocab_size)

    def prefill(self, ids: torch.Tensor, reserve: int = 0) -> torch.Tensor:
        self.length = 0
        return self._forward(ids.shape[1])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(1)

    def reset(self) -> None:
        self.length = 0


def test_profiled_runs_give_layer_overlap():
    fake = FakeHeteroModel()
    d = bench_decode(fake, context=5, steps=6, repeats=2)
    rows = d["layers"]["rows"]
    assert [r["calls"] for r in rows] == [6, 6]          # only the profiled run's decode steps were counted
    assert [r["overlap"] for r in rows] == [0.75, 0.0]
    assert d["layers"]["summary"]["step_ms"] == d["ms_per_token"] and not fake.profiling
    rows = bench_prefill(fake, [3], repeats=2)[0]["layers"]["rows"]
    assert [r["calls"] for r in rows] == [1, 1] and not fake.profiling


def _stats(layers: int) -> list[dict]:
    return [{"layer": i, "calls": 2, "cpu_ms": 1.0, "wait_ms": 0.1, "gpu_ms": 0.25 * (i % 3), "tokens": 1.0}
            for i in range(layers)]


def test_layer_tables_rows_or_summary(capsys):
    from ktc.cli.bench import MANY_LAYERS, _print

    prefill = [{"length": 8, "batch": 1, "ms": 2.0, "tokens_per_s": 4e3, "layers": layer_overlap(_stats(3), 2.0, 1)}]
    decode = {"context": 8, "steps": 2, "ms_per_token": 1.0, "tokens_per_s": 1e3, "prefill_ms": 2.0,
              "layers": layer_overlap(_stats(MANY_LAYERS + 4), 40.0, 2)}
    _print(prefill, decode)
    text = capsys.readouterr().out
    assert "CPU experts, decode" in text and "CPU experts, prefill of 8 tokens" in text
    assert "overlap mean" in text and f"{MANY_LAYERS + 4}" in text   # many layers: one summary row
    assert "50%" in text and "wait ms" in text                      # few layers: a row per layer
    decode["layers"] = prefill[0]["layers"] = None
    _print(prefill, decode)
    assert "CPU experts" not in capsys.readouterr().out


def test_cpu_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Fancy CPU @ 3.0GHz\nflags\t: avx2\n")
    assert cpu_model_name(info) == "Fancy CPU @ 3.0GHz"
    assert cpu_model_name(tmp_path / "missing")          # falls back to platform facts


# -- the command line -----------------------------------------------------------------------------------
def test_cli_prints_tables_and_writes_json(capsys, artifact, tmp_path):
    path = tmp_path / "bench.json"
    rc = main(["bench", str(artifact), "--prompt-lengths", "8,16", "--decode-steps", "4", "--repeats", "1",
               "--json", str(path)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "prefill" in cap.out and "decode" in cap.out and "tokens/s" in cap.out
    data = json.loads(path.read_text())
    assert {"host", "compile", "prefill", "decode", "artifact", "options"} <= data.keys()
    assert [r["length"] for r in data["prefill"]] == [8, 16]
    assert all(_positive(r["tokens_per_s"]) for r in data["prefill"])
    assert data["decode"]["steps"] == 4 and _positive(data["decode"]["tokens_per_s"])
    assert data["decode"]["context"] == 256 - 4 - 2      # default 1024, clipped to the tiny model's 256
    assert data["compile"]["target"] == "cpu" and data["compile"]["quant"] == "int8"
    assert {"cpu", "cores", "gpu", "torch", "ktc", "date"} <= data["host"].keys()


@pytest.mark.parametrize("args, message", [
    (["--prompt-lengths", "12,x"], "not a comma-separated list"),
    (["--prompt-lengths", ","], "empty"),
    (["--prompt-lengths", "0,4"], "at least 1"),
    (["--prompt-lengths", "8,300"], "longer than the model context (256 tokens)"),
    (["--context", "252"], "longer than the model context"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--decode-steps", "0"], "--decode-steps must be at least 1"),
])
def test_cli_bad_options_are_one_line_errors(capsys, artifact, args, message):
    rc = main(["bench", str(artifact), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]


def test_cli_missing_artifact(capsys, tmp_path):
    rc = main(["bench", str(tmp_path / "nope.ktc")])
    assert rc == 1 and capsys.readouterr().err.startswith("error:")
