"""The CPU kernel cache (codegen/kernel_cache): a second build with the same inputs is a copy, anything
that changes the bytes changes the key, and a broken or unusable cache means a build, never an error."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import ktc.targets as kt
from ktc.codegen import cpu_experts, kernel_cache
from ktc.codegen.cpu_experts import build_cpu_kernels
from tests.codegen.cpu_builds import SPECS

SPEC = SPECS["float32"]


class BuildRan(Exception):
    pass


def _no_build(monkeypatch):
    """Make a build (the TVM subprocess) raise BuildRan."""
    real = subprocess.run

    def run(args, *a, **k):
        if "ktc.codegen.cpu_build" in args:
            raise BuildRan
        return real(args, *a, **k)
    monkeypatch.setattr(cpu_experts.subprocess, "run", run)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache dir, the first build's out dir and entry): one real x86-avx2 build into a cache of its own."""
    root = tmp_path_factory.mktemp("kcache")
    out = tmp_path_factory.mktemp("first")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KTC_CACHE_DIR", str(root))
        entry = build_cpu_kernels([SPEC], kt.get("x86-avx2"), out)
    return root, out, entry


def test_the_same_build_again_is_a_copy(built, tmp_path, monkeypatch):
    root, first, entry = built
    monkeypatch.setenv("KTC_CACHE_DIR", str(root))
    _no_build(monkeypatch)
    again = build_cpu_kernels([SPEC, SPEC], kt.get("x86-avx2"), tmp_path / "again")
    assert again == entry
    for name in [entry["lib"], *entry["runtime_libs"]]:
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes()
    stored = [p for p in (root / "cpu-kernels").iterdir()]
    assert len(stored) == 1 and not stored[0].name.startswith(".")     # one entry, no temporary left


def test_what_changes_the_bytes_changes_the_key():
    target = kt.get("x86-avx2")
    base = {"specs": [SPEC.to_dict()], "target": {"name": target.name, "tvm_target": target.tvm_target},
            "config": cpu_experts.kernel_config(target), "abi": cpu_experts.ABI_VERSION}
    key = kernel_cache.build_key(base)
    assert kernel_cache.build_key(json.loads(json.dumps(base))) == key
    for change in ({"specs": [SPECS["int8"].to_dict()]},
                   {"target": {"name": target.name, "tvm_target": {**target.tvm_target, "mcpu": "znver4"}}},
                   {"config": {**base["config"], "tile_rows": 8}},
                   {"abi": cpu_experts.ABI_VERSION + 1}):
        assert kernel_cache.build_key({**base, **change}) != key, change


def test_a_damaged_entry_is_rebuilt(built, tmp_path, monkeypatch):
    root, _, entry = built
    copy = tmp_path / "cache"
    shutil.copytree(root / "cpu-kernels", copy / "cpu-kernels")
    (folder,) = (copy / "cpu-kernels").iterdir()
    (folder / entry["lib"]).unlink()
    monkeypatch.setenv("KTC_CACHE_DIR", str(copy))
    _no_build(monkeypatch)
    with pytest.raises(BuildRan):
        build_cpu_kernels([SPEC], kt.get("x86-avx2"), tmp_path / "out")
    (folder / "entry.json").write_text("{not json")
    with pytest.raises(BuildRan):
        build_cpu_kernels([SPEC], kt.get("x86-avx2"), tmp_path / "out")


@pytest.mark.parametrize("setting", ["off", ""])
def test_off_means_no_lookup_and_no_files(built, tmp_path, monkeypatch, setting):
    monkeypatch.setenv("KTC_CACHE_DIR", setting)
    assert kernel_cache.cache_root() is None
    _no_build(monkeypatch)
    with pytest.raises(BuildRan):
        build_cpu_kernels([SPEC], kt.get("x86-avx2"), tmp_path / "out")


def test_default_location_is_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("KTC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_cache.cache_root() == tmp_path / "ktc" / "cpu-kernels"


def test_a_cache_that_cannot_be_written_is_skipped(built, tmp_path, monkeypatch):
    _, first, entry = built
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("KTC_CACHE_DIR", str(blocker))
    kernel_cache.store("k" * 32, first, [entry["lib"]], entry)      # no error
    assert kernel_cache.lookup("k" * 32, tmp_path / "out") is None


def test_no_home_folder_means_no_cache(monkeypatch):
    monkeypatch.delenv("KTC_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(kernel_cache.Path, "home", staticmethod(no_home))
    assert kernel_cache.cache_root() is None
