import json

import pytest
import torch
from safetensors.torch import save_file

from ktc.checkpoint import Checkpoint, evaluate_source, read_config, source_shape
from ktc.errors import KtcError


def _folder(tmp_path, tensors=None, sharded=False):
    tensors = tensors or {"a": torch.randn(4, 8), "b": torch.randn(3)}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    if sharded:
        save_file({"a": tensors["a"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
        save_file({"b": tensors["b"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    else:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("sharded", [False, True])
def test_index_reads_headers_and_sources_evaluate(tmp_path, sharded):
    ckpt = Checkpoint(_folder(tmp_path, sharded=sharded))
    assert ckpt.info("a").shape == (4, 8) and ckpt.info("b").dtype == "float32"
    src = {"concat": [{"load": "a"}, {"load": "a"}], "dim": 0}
    assert source_shape(ckpt, src) == ([8, 8], "float32")
    assert torch.equal(evaluate_source(ckpt, src), torch.cat([ckpt.load("a")] * 2))
    assert evaluate_source(ckpt, {"stack": [{"load": "b"}, {"load": "b"}]}).shape == (2, 3)
    assert evaluate_source(ckpt, {"values": [1.0, 2.0], "dtype": "float32"}).tolist() == [1.0, 2.0]


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(KtcError, match="config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(KtcError, match="not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(KtcError, match="is not a folder"):
        read_config(tmp_path / "nope")


def test_truncated_shard_is_refused(tmp_path):
    folder = _folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(KtcError, match="truncated"):
        Checkpoint(folder)
    (folder / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(KtcError, match="truncated"):
        Checkpoint(folder)


def test_missing_shard_and_missing_weights_are_refused(tmp_path):
    folder = _folder(tmp_path, sharded=True)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KtcError, match="missing"):
        Checkpoint(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KtcError, match="no \\*.safetensors"):
        Checkpoint(empty)


def test_missing_tensor_names_the_key(tmp_path):
    ckpt = Checkpoint(_folder(tmp_path))
    with pytest.raises(KtcError, match="tensor zzz is missing"):
        ckpt.info("zzz")


def test_take_reads_only_the_chosen_experts(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ktc.checkpoint import Checkpoint, evaluate_source, source_keys, source_shape

    tensors = {f"e{i}": torch.full((2, 3), float(i)) for i in range(4)}
    tensors["fused"] = torch.arange(24.0).reshape(4, 2, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    stacked = {"take": {"stack": [{"load": f"e{i}"} for i in range(4)]}, "index": [3, 1]}
    assert source_keys(stacked) == ["e3", "e1"]
    assert source_shape(ckpt, stacked) == ([2, 2, 3], "float32")
    assert evaluate_source(ckpt, stacked)[:, 0, 0].tolist() == [3.0, 1.0]
    fused = {"take": {"load": "fused"}, "index": [2]}
    assert torch.equal(evaluate_source(ckpt, fused), tensors["fused"][2:3])
