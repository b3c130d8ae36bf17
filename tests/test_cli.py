"""The command line: happy paths, and every bad input as one line on stderr with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ktc.cli import main
from ktc.targets import get as get_target


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("error:") and "Traceback" not in err
    assert pattern in lines[0], lines[0]


# -- happy paths -------------------------------------------------------------------------

def test_run_prompt_streams_text_and_tokens_prints_ids(capsys, compiled):
    art = str(compiled("qwen3_moe", "int8"))
    rc, out, _ = run_cli(capsys, "run", art, "--prompt", "hello", "--max-new-tokens", "6")
    assert rc == 0 and out.startswith("hello") and len(out.strip()) > len("hello")
    rc, out, _ = run_cli(capsys, "run", art, "--tokens", "1,2,3", "--max-new-tokens", "4")
    ids = out.strip().split(",")
    assert rc == 0 and len(ids) == 4 and all(0 <= int(i) < 256 for i in ids)


def test_inspect_and_targets(capsys, compiled):
    rc, out, _ = run_cli(capsys, "inspect", str(compiled("deepseek_v3", "int8")), "--graph")
    assert rc == 0
    for text in ("deepseek_v3", "moe_experts", "int8", "attention", "runs on this host", "add_rms_norm"):
        assert text in out
    rc, out, _ = run_cli(capsys, "targets")
    assert rc == 0 and "x86-avx2" in out and "x86-amx" in out


# -- bad compile input ------------------------------------------------------------------

def test_missing_and_malformed_config(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "compile", str(tmp_path), "-o", str(tmp_path / "o.ktc"))[::2],
                          "config.json is missing")
    (tmp_path / "config.json").write_text("{oops")
    assert_one_line_error(*run_cli(capsys, "compile", str(tmp_path), "-o", str(tmp_path / "o.ktc"))[::2],
                          "not valid JSON")
    assert not (tmp_path / "o.ktc").exists()


def test_unsupported_architecture_lists_the_supported_ones(capsys, tmp_path, tiny_models):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_models["mixtral"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "compile", str(folder), "-o", str(tmp_path / "o.ktc"))
    assert_one_line_error(rc, err, "llama")
    assert "qwen3_moe" in err and "deepseek_v3" in err


def test_truncated_and_missing_shards(capsys, tmp_path, tiny_models):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["mixtral"], folder)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_one_line_error(*run_cli(capsys, "compile", str(folder), "-o", str(tmp_path / "o.ktc"))[::2], "truncated")
    shard.unlink()
    assert_one_line_error(*run_cli(capsys, "compile", str(folder), "-o", str(tmp_path / "o.ktc"))[::2],
                          "no *.safetensors")


def test_existing_output_is_refused_without_force(capsys, tmp_path, tiny_models):
    out = tmp_path / "o.ktc"
    out.mkdir()
    assert_one_line_error(*run_cli(capsys, "compile", str(tiny_models["mixtral"]), "-o", str(out))[::2], "--force")


def test_bad_options(capsys, tmp_path, tiny_models):
    m = str(tiny_models["mixtral"])
    assert_one_line_error(*run_cli(capsys, "compile", m, "-o", str(tmp_path / "a"), "--quant", "int3")[::2],
                          "--quant")
    assert_one_line_error(*run_cli(capsys, "compile", m, "-o", str(tmp_path / "a"), "--target", "tpu")[::2],
                          "--target")
    assert_one_line_error(*run_cli(capsys, "compile", m, "-o", str(tmp_path / "a"), "--group-size", "48")[::2],
                          "--group-size 48 is not one of 128, 64, 32")
    # the tiny Qwen3-MoE's experts are 32 wide: a group of 64 does not divide them
    q = str(tiny_models["qwen3_moe"])
    assert_one_line_error(*run_cli(capsys, "compile", q, "-o", str(tmp_path / "a"), "--group-size", "64")[::2],
                          "choose 32")
    assert not (tmp_path / "a").exists()


def test_ctrl_c_during_compile_leaves_no_artifact(tmp_path, tiny_models):
    out = tmp_path / "o.ktc"
    # A shell's background jobs inherit SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the child the default disposition, as a terminal's foreground job has.
    # KTC_CACHE_DIR=off: a real kernel build, not the session's cached one, keeps the compile running long
    # enough to be interrupted
    proc = subprocess.Popen([sys.executable, "-m", "ktc", "compile", str(tiny_models["deepseek_v3"]), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KTC_CACHE_DIR": "off"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".ktc-tmp-") for p in tmp_path.iterdir()):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "compile finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


# -- bad artifacts and bad run input ------------------------------------------------------

@pytest.mark.parametrize("damage", ["change", "truncate", "delete"])
def test_damaged_artifact_is_refused(capsys, tmp_path, compiled, damage):
    art = tmp_path / "a.ktc"
    shutil.copytree(compiled("mixtral", "int8"), art)
    victim = next((art / "kernels" / "cpu").glob("*.so")) if damage == "delete" else \
        next((art / "weights").glob("*.safetensors"))
    if damage == "change":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x55
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-7])
    else:
        victim.unlink()
    rc, _, err = run_cli(capsys, "run", str(art), "--tokens", "1,2")
    assert_one_line_error(rc, err, {"change": "sha256", "truncate": "truncated", "delete": "missing"}[damage])


def test_artifact_for_cpu_features_this_host_lacks_is_refused_before_running(capsys, tmp_path, tiny_models):
    amx = get_target("x86-amx")
    if not amx.missing_features():
        pytest.skip("this host has AMX: no foreign target to test against")
    art = tmp_path / "amx.ktc"
    # --quant none: bf16 experts, whose x86-amx kernels need AMX as much as int8 ones and build in a third of
    # the time (int8 adds the AMX prefill paths and tile variants: ~90 s more on a 2-core host)
    rc, _, err = run_cli(capsys, "compile", str(tiny_models["qwen3_moe"]), "-o", str(art), "--target", "x86-amx",
                         "--quant", "none")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "run", str(art), "--tokens", "1,2")
    assert_one_line_error(rc, err, "amx")


def test_bad_token_ids_and_too_long_prompts(capsys, compiled):
    art = str(compiled("qwen3_moe", "int8"))
    assert_one_line_error(*run_cli(capsys, "run", art, "--tokens", "1,999")[::2], "999")
    assert_one_line_error(*run_cli(capsys, "run", art, "--tokens", "1,x")[::2], "--tokens")
    long = ",".join(["1"] * 300)
    assert_one_line_error(*run_cli(capsys, "run", art, "--tokens", long, "--max-new-tokens", "4")[::2], "context")
    assert_one_line_error(*run_cli(capsys, "run", art, "--prompt", "hi", "--tokens", "1")[::2], "exactly one")


def test_prompt_without_tokenizer_says_to_use_tokens(capsys, compiled):
    assert_one_line_error(*run_cli(capsys, "run", str(compiled("mixtral", "int8")), "--prompt", "hi")[::2],
                          "--tokens")


def test_missing_artifact(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "run", str(tmp_path / "nope.ktc"), "--tokens", "1")[::2], "does not exist")


def test_python_api_mirrors_cli(tmp_path, tiny_models):
    import ktc

    report = ktc.compile(str(tiny_models["qwen2_moe"]), str(tmp_path / "q.ktc"), quant="int4")
    assert os.path.isdir(report.output)
    m = ktc.load(report.output)
    import torch

    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)


def test_usage_errors_are_usage_errors_not_internal_errors(capsys):
    from ktc.cli import main

    assert main(["inspect"]) == 2
    text = capsys.readouterr().err
    assert "Missing" in text and "internal error" not in text


def test_demo_makes_compiles_and_runs_a_tiny_model(tmp_path, capsys):
    """The README's first command ends in `ktc demo`: it must work on a fresh machine."""
    from ktc.cli import main

    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "With a real model" in text and (tmp_path / "demo" / "tiny-qwen3_moe.ktc" / "manifest.json").is_file()


def test_compile_ships_tuning_records_and_refuses_a_bad_file(tmp_path, tiny_models, capsys):
    from ktc.cli import main
    from ktc.runtime.tuning import TuningRecord, TuningRecords, artifact_records_path, host_key

    host = host_key()
    recs = TuningRecords(host)
    recs.add(TuningRecord(key="matmul.linear|8x8|bfloat16|b1", config={"BLOCK_N": 32}, seconds=1e-6,
                          default_seconds=2e-6, candidates=3, status="kept"))
    good = tmp_path / "records.json"
    recs.save(good)
    out = tmp_path / "t.ktc"
    assert main(["compile", str(tiny_models["qwen3_moe"]), "-o", str(out), "--tuning", str(good)]) == 0
    shipped = artifact_records_path(out, host)
    assert shipped.is_file() and TuningRecords.from_json(shipped.read_text()).records.keys() == recs.records.keys()
    assert main(["inspect", str(out)]) == 0
    assert "used on this host" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["compile", str(tiny_models["qwen3_moe"]), "-o", str(tmp_path / "u.ktc"), "--tuning", str(bad)]) == 1
    assert "not a ktc tuning records file" in capsys.readouterr().err
    assert not (tmp_path / "u.ktc").exists()
