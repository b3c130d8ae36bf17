import json

import pytest
import torch

from ktc.artifact import ShardWriter, staging_folder, write_manifest
from ktc.errors import ArtifactError, HostError, KtcError
from ktc.runtime.artifact import check_host, read_manifest, verify_files
from tests.passes.graphs import one_layer_moe


def _artifact(folder, cpu=None):
    w = ShardWriter(folder / "weights")
    w.add("x", torch.arange(10, dtype=torch.float32))
    w.flush()
    write_manifest(folder, {"graph": one_layer_moe().to_dict(), "targets": {"cpu": cpu} if cpu else {},
                            "weights": {"files": w.files, "map": w.key_to_file}})


def test_staging_folder_renames_into_place_only_on_success(tmp_path):
    out = tmp_path / "m.ktc"
    with staging_folder(out, force=False) as folder:
        _artifact(folder)
        assert not out.exists()
    m = read_manifest(out)
    verify_files(m)
    assert m.graph.to_dict() == one_layer_moe().to_dict()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ktc-")]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_nothing(tmp_path, exc):
    out = tmp_path / "m.ktc"
    with pytest.raises(exc), staging_folder(out, force=False) as folder:
        _artifact(folder)
        raise exc()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_force_replaces(tmp_path):
    out = tmp_path / "m.ktc"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(KtcError, match="--force"), staging_folder(out, force=False):
        pass
    with staging_folder(out, force=True) as folder:
        _artifact(folder)
    assert not (out / "old").exists() and (out / "manifest.json").exists()


def test_changed_truncated_or_missing_files_are_refused(tmp_path):
    out = tmp_path / "m.ktc"
    with staging_folder(out, force=False) as folder:
        _artifact(folder)
    shard = out / "weights" / "model-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        verify_files(read_manifest(out))
    verify_files(read_manifest(out), hashes=False)   # same size: only the hash can tell
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(ArtifactError, match="truncated or changed"):
        verify_files(read_manifest(out), hashes=False)
    shard.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_files(read_manifest(out))


def test_damaged_or_foreign_manifest_is_refused(tmp_path):
    out = tmp_path / "m.ktc"
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(out)
    out.mkdir()
    with pytest.raises(ArtifactError, match="not a ktc artifact"):
        read_manifest(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="damaged"):
        read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({"format": "ktc-artifact", "format_version": 999}))
    with pytest.raises(ArtifactError, match="recompile it with this ktc"):
        read_manifest(out)


def test_host_lacking_cpu_features_is_refused(tmp_path):
    out = tmp_path / "m.ktc"
    with staging_folder(out, force=False) as folder:
        _artifact(folder, cpu={"target": "x86-future", "required_features": ["avx2", "no_such_feature_9"]})
    with pytest.raises(HostError, match="lacks no_such_feature_9"):
        check_host(read_manifest(out))
