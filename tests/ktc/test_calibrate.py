"""`ktc calibrate`: expert counts with ktc's router semantics, the calibration file, the CLI, and
placement putting the hottest experts on the GPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ktc.calibrate import calibrate, count_experts, read_calibration, write_calibration
from ktc.cli import main
from ktc.errors import KtcError
from ktc.tiny import ARCHITECTURES

PROMPTS = ["hello world, this is a tiny mixture of experts model.", "the quick brown fox jumps over the lazy dog.",
           "experts on the cpu, attention on the gpu, overlapped."]


def _sequences(n: int = 3, length: int = 24, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (length + 5 * i,), generator=g).tolist() for i in range(n)]


def _transformers_counts(model_dir, sequences) -> dict[str, list[int]]:
    """Independent counts: the expert ids transformers' own router modules (mlp.gate) choose."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    counts: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            e = int(layer.mlp.experts.num_experts)
            counts[str(i)] = torch.zeros(e, dtype=torch.int64)

            def hook(module, args, output, c=counts[str(i)]):
                c.add_(torch.bincount(output[-1].reshape(-1), minlength=c.numel()))

            hooks.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.inference_mode():
        for ids in sequences:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v.tolist() for k, v in counts.items()}


@pytest.fixture(scope="module")
def qwen_calibration(tiny_models, tmp_path_factory):
    """(calibration file, its data) of the tiny qwen3_moe model on PROMPTS."""
    data = calibrate(tiny_models["qwen3_moe"], PROMPTS, device="cpu")
    path = tmp_path_factory.mktemp("calib") / "calib.json"
    write_calibration(path, data)
    return path, data


# -- counting -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_counts_match_transformers_routing(tiny_models, arch):
    seqs = _sequences()
    data = count_experts(tiny_models[arch], seqs, device="cpu")
    tokens = sum(len(s) for s in seqs)
    assert data["format"] == "ktc-calibration" and data["version"] == 1 and data["model_type"] == arch
    assert data["tokens"] == tokens and data["prompts"] == len(seqs) and data["top_k"] == 2
    # deepseek's first layer is dense: only MoE layers are counted
    assert list(data["layers"]) == (["1"] if arch.startswith("deepseek") else ["0", "1"])
    for counts in data["layers"].values():
        assert len(counts) == 8 and sum(counts) == tokens * data["top_k"]
    assert data["layers"] == _transformers_counts(tiny_models[arch], seqs)


def test_max_tokens_cuts_the_prompts(tiny_models):
    from tokenizers import Tokenizer

    folder = tiny_models["qwen3_moe"]
    lengths = [len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(p).ids) for p in PROMPTS]
    budget = lengths[0] + 3
    data = calibrate(folder, ["", *PROMPTS], max_tokens=budget, device="cpu")
    assert data["tokens"] == budget and data["prompts"] == 2
    assert all(sum(c) == budget * 2 for c in data["layers"].values())
    seen = []
    calibrate(folder, PROMPTS, device="cpu", progress=lambda *a: seen.append(a))
    assert seen[0] == (0, 3, 0) and seen[-1] == (3, 3, sum(lengths))


def test_calibrate_bad_input(tiny_models, tmp_path):
    with pytest.raises(KtcError, match="no tokenizer.json: add the model's tokenizer files"):
        calibrate(tiny_models["mixtral"], PROMPTS, device="cpu")
    qwen = tiny_models["qwen3_moe"]
    with pytest.raises(KtcError, match="no prompts"):
        calibrate(qwen, [], device="cpu")
    with pytest.raises(KtcError, match="encodes to no tokens"):
        calibrate(qwen, ["", ""], device="cpu")
    with pytest.raises(KtcError, match="--max-tokens must be at least 1"):
        count_experts(qwen, [[1, 2]], max_tokens=0)
    with pytest.raises(KtcError, match="--device 'tpu' is not one of auto, cpu, cuda"):
        count_experts(qwen, [[1, 2]], device="tpu")
    with pytest.raises(KtcError, match="token id 256 is outside the model's vocabulary"):
        count_experts(qwen, [[1, 256]], device="cpu")
    with pytest.raises(KtcError, match="no tokens to run"):
        count_experts(qwen, [[], []], device="cpu")
    with pytest.raises(KtcError, match="config.json is missing"):
        count_experts(tmp_path, [[1]], device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(KtcError, match="no CUDA GPU is visible to torch; use --device cpu"):
            count_experts(qwen, [[1]], device="cuda")


# -- the file -----------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path, qwen_calibration):
    _, data = qwen_calibration
    path = tmp_path / "c.json"
    write_calibration(path, data)
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]    # no temporary file left behind
    assert json.loads(path.read_text()) == data
    assert read_calibration(path) == {int(k): v for k, v in data["layers"].items()}
    with pytest.raises(KtcError, match="does not exist: create it"):
        write_calibration(tmp_path / "no" / "c.json", data)


_GOOD = {"format": "ktc-calibration", "version": 1, "layers": {"0": [3, 1]}}


@pytest.mark.parametrize("content,message", [
    ("{oops", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "is not a ktc calibration file"),
    (dict(_GOOD, format="other"), "is not a ktc calibration file"),
    (dict(_GOOD, version=2), "of version 2, this ktc reads version 1"),
    (dict(_GOOD, layers={}), "has no \"layers\""),
    (dict(_GOOD, layers=[[1, 2]]), "has no \"layers\""),
    (dict(_GOOD, layers={"x": [1, 2]}), "layer key 'x' is not a decoder layer index"),
    (dict(_GOOD, layers={"-1": [1, 2]}), "layer key '-1'"),
    (dict(_GOOD, layers={"0": [1, -2]}), "must be a list of non-negative integers"),
    (dict(_GOOD, layers={"0": [1, 2.5]}), "must be a list of non-negative integers"),
    (dict(_GOOD, layers={"0": [1, "2"]}), "must be a list of non-negative integers"),
    (dict(_GOOD, layers={"0": [True, 2]}), "must be a list of non-negative integers"),
    (dict(_GOOD, layers={"0": []}), "must be a list of non-negative integers"),
    (dict(_GOOD, layers={"0": 5}), "must be a list of non-negative integers"),
])
def test_read_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "c.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(KtcError, match=message) as e:
        read_calibration(path)
    assert "\n" not in e.value.message and "ktc calibrate" in e.value.message


def test_read_missing_file(tmp_path):
    with pytest.raises(KtcError, match="does not exist: run `ktc calibrate"):
        read_calibration(tmp_path / "none.json")
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_GOOD))
    assert read_calibration(path) == {0: [3, 1]}


# -- the command line ---------------------------------------------------------------------

def _error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_cli_writes_the_file(tiny_models, tmp_path, capsys, qwen_calibration):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["", *PROMPTS, "   ", ""]), encoding="utf-8")
    out = tmp_path / "calib.json"
    args = ["calibrate", str(tiny_models["qwen3_moe"]), "--prompts", str(prompts), "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    _, expected = qwen_calibration
    assert data["layers"] == expected["layers"] and data["prompts"] == 3 and data["source"] == "qwen3_moe"
    assert f"{data['tokens']} tokens" in text and "hottest 25% of experts" in text
    assert "already exists" in _error_line(capsys, main(args))
    assert main([*args, "--force", "--max-tokens", "5"]) == 0
    assert json.loads(out.read_text())["tokens"] == 5


def test_cli_bad_prompts(tiny_models, tmp_path, capsys):
    model = str(tiny_models["qwen3_moe"])
    out = str(tmp_path / "c.json")
    line = _error_line(capsys, main(["calibrate", model, "--prompts", str(tmp_path / "none.txt"), "-o", out]))
    assert "none.txt does not exist" in line
    (tmp_path / "blank.txt").write_text("\n  \n")
    line = _error_line(capsys, main(["calibrate", model, "--prompts", str(tmp_path / "blank.txt"), "-o", out]))
    assert "has no prompts" in line
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    line = _error_line(capsys, main(["calibrate", model, "--prompts", str(tmp_path / "latin1.txt"), "-o", out]))
    assert "is not UTF-8" in line
    mixtral = tmp_path / "mixtral"
    shutil.copytree(tiny_models["mixtral"], mixtral)
    (tmp_path / "p.txt").write_text("hello\n")
    line = _error_line(capsys, main(["calibrate", str(mixtral), "--prompts", str(tmp_path / "p.txt"), "-o", out]))
    assert "no tokenizer.json" in line
    assert not (tmp_path / "c.json").exists()


# -- placement ----------------------------------------------------------------------------

def test_placement_puts_the_hottest_experts_on_the_gpu(tiny_models, qwen_calibration):
    from ktc.capture import capture
    from ktc.passes.manager import PassContext
    from ktc.passes.placement import GPU_RESERVE_BYTES, expert_gpu_bytes, gpu_model_bytes, kv_cache_bytes, placement

    path, data = qwen_calibration
    calib = read_calibration(path)
    graph = capture(tiny_models["qwen3_moe"])
    moe = graph.nodes_of("moe_experts")
    per_gpu = 3   # experts of each layer the budget leaves room for
    expert = expert_gpu_bytes(moe[0], "none")
    dense = gpu_model_bytes(graph, "none") - sum(expert * int(n.attrs["num_experts"]) for n in moe)
    budget = int(dense + kv_cache_bytes(graph, 64) + GPU_RESERVE_BYTES + per_gpu * len(moe) * expert)
    ctx = PassContext(target="cuda", quant="none", gpu_memory_bytes=budget,   # no int8: no prefill staging buffer
                      options={"calibration": calib, "max_context": 64})
    placed = placement(graph, ctx)
    uniform_choice = True
    for node in placed.nodes_of("moe_experts"):
        counts = calib[node.attrs["layer"]]
        hottest = sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:per_gpu]
        uniform_choice &= sorted(hottest) == list(range(per_gpu))
        assert node.device == "mixed" and node.attrs["gpu_experts"] == sorted(hottest)
        assert node.attrs["expert_load"] == pytest.approx([c / sum(counts) for c in counts])
    assert not uniform_choice, "calibration should pick other experts than the uncalibrated default"
    assert placed.config["placement"]["calibrated"]
