"""Weights-free compile, `ktc pack` and random weights (ktc.pack).

Two plans of one tiny tied-embedding Qwen3-MoE folder, each compiled twice (with its weights,
and --weights-free from a folder holding config.json and the tokenizer only): --target cpu
int8, and --target cuda with a GPU budget that leaves half of every layer's experts on the
CPU (CPU-packed int8 experts, GPU w4a16 experts, "take" sources, bf16 dense weights).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ktc
from ktc.errors import ArtifactError, KtcError
from ktc.ir import Graph

HAS_CUDA = torch.cuda.is_available()
TOKENIZER_FILES = ("tokenizer.json", "generation_config.json")


def _graph(plan: Path) -> Graph:
    return Graph.from_dict(json.loads((plan / "manifest.json").read_text())["graph"])


def _manifest(plan: Path) -> dict:
    return json.loads((plan / "manifest.json").read_text())


def _weight_files(plan: Path) -> dict[str, str]:
    return {rel: meta["sha256"] for rel, meta in _manifest(plan)["files"].items() if rel.startswith("weights/")}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny qwen3_moe folder with tied embeddings (so the lm_head is an alias) and a tokenizer."""
    import transformers as tf

    from ktc.tiny import randomize_weights, tiny_config, write_tiny_tokenizer

    out = tmp_path_factory.mktemp("pack") / "tied"
    torch.manual_seed(3)
    config = tiny_config("qwen3_moe")
    config.tie_word_embeddings = True
    randomize_weights(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()).save_pretrained(out)
    write_tiny_tokenizer(out, vocab_size=config.vocab_size)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    return out


@pytest.fixture(scope="module")
def config_only(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "config-only"
    out.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copyfile(model / name, out / name)
    return out


def _hetero_options(model: Path) -> dict:
    """--target cuda options that put 4 of the 8 experts of each of the 2 layers on the GPU."""
    from ktc.capture import capture
    from ktc.passes.placement import GPU_RESERVE_BYTES, expert_gpu_bytes, gpu_model_bytes, kv_cache_bytes

    g = capture(model, weights_free=True)
    moe = g.nodes_of("moe_experts")
    per_expert = expert_gpu_bytes(moe[0], "int4")
    dense = gpu_model_bytes(g, "int4") - per_expert * sum(int(n.attrs["num_experts"]) for n in moe)
    budget = dense + kv_cache_bytes(g, 64) + GPU_RESERVE_BYTES + per_expert * 4 * len(moe) + 16
    return {"target": "cuda", "gpu_memory": int(budget), "gpu_quant": "int4", "max_context": 64}


@pytest.fixture(scope="module")
def plans(model, config_only, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{"cpu" | "cuda": {"normal": artifact, "free": weights-free plan}}; the CPU plan via the CLI."""
    from ktc.cli import main
    from ktc.compiler import compile_model

    root = tmp_path_factory.mktemp("pack-plans")
    out = {"cpu": {"normal": root / "cpu.ktc", "free": root / "cpu-free.ktc"},
           "cuda": {"normal": root / "cuda.ktc", "free": root / "cuda-free.ktc"}}
    compile_model(model, out["cpu"]["normal"], target="cpu", quant="int8")
    assert main(["compile", str(config_only), "-o", str(out["cpu"]["free"]), "--target", "cpu", "--quant", "int8",
                 "--weights-free"]) == 0
    options = _hetero_options(model)
    compile_model(model, out["cuda"]["normal"], **options)
    compile_model(config_only, out["cuda"]["free"], weights_free=True, **options)
    return out


def test_weights_free_compile_plans_from_config_alone(plans, config_only):
    assert not list(config_only.glob("*.safetensors"))
    for kind in ("cpu", "cuda"):
        free, normal = _manifest(plans[kind]["free"]), _manifest(plans[kind]["normal"])
        assert free["weights"] == {"state": "pending", "files": [], "map": {}, "aliases": {}}
        assert not (plans[kind]["free"] / "weights").exists()
        assert free["compile"]["weights_free"] is True and normal["compile"]["weights_free"] is False
        assert free["graph"] == normal["graph"]           # config dtype float32 = the checkpoint's
        assert free["targets"] == normal["targets"] and free["tokenizer"] == "tokenizer/tokenizer.json"
        assert {r: m for r, m in free["files"].items() if r.startswith("kernels/")} == \
               {r: m for r, m in normal["files"].items() if r.startswith("kernels/")}
    g = _graph(plans["cuda"]["free"])
    layouts = {w.layout for w in g.weights.values()}
    assert {"cpu_experts", "gpu_w4a16"} <= layouts, "the cuda plan must be heterogeneous"
    assert any("take" in w.source for w in g.weights.values())
    assert _manifest(plans["cpu"]["normal"])["weights"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_loading_a_weights_free_plan_says_how_to_pack_it(plans):
    plan = plans["cpu"]["free"]
    with pytest.raises(ArtifactError) as e:
        ktc.load(str(plan))
    assert e.value.message == f"{plan} is a weights-free plan: run `ktc pack {plan} --weights MODEL_DIR`"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_packed_weights_are_byte_identical_to_a_normal_compile(kind, plans, model, tmp_path):
    from ktc.pack import pack

    free = plans[kind]["free"]
    before = (free / "manifest.json").read_bytes()
    out = tmp_path / "packed.ktc"
    report = pack(free, model, out)
    assert (free / "manifest.json").read_bytes() == before and not (free / "weights").exists()
    packed, normal = _manifest(out), _manifest(plans[kind]["normal"])
    assert _weight_files(out) == _weight_files(plans[kind]["normal"]) and _weight_files(out)
    assert packed["weights"] == {**normal["weights"], "origin": {"checkpoint": model.name}}
    assert packed["weights"]["state"] == "packed" and packed["graph"] == normal["graph"]
    assert report.weight_bytes == sum(normal["files"][f]["size"] for f in normal["weights"]["files"])


def test_packed_plan_gives_the_normal_artifacts_logits(plans, model, tmp_path):
    from ktc.pack import pack

    out = tmp_path / "packed.ktc"
    pack(plans["cpu"]["free"], model, out)
    ids = torch.tensor([[5, 17, 200, 3, 42]])
    assert torch.equal(ktc.load(str(out))(ids), ktc.load(str(plans["cpu"]["normal"]))(ids))


def test_pack_in_place_is_atomic(plans, model, tmp_path, monkeypatch):
    import ktc.artifact
    from ktc.pack import pack

    plan = tmp_path / "plan.ktc"
    shutil.copytree(plans["cpu"]["free"], plan)
    before = {p.relative_to(plan): p.read_bytes() for p in plan.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ktc.artifact, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(plan, model)
    assert {p.relative_to(plan): p.read_bytes() for p in plan.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.ktc"]
    monkeypatch.undo()
    pack(plan, model)
    assert _weight_files(plan) == _weight_files(plans["cpu"]["normal"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.ktc"]
    ktc.load(str(plan))
    with pytest.raises(KtcError, match="already exists"):
        pack(plans["cpu"]["free"], model, plan)


def _rewrite(model: Path, dest: Path, change) -> Path:
    """A copy of `model` whose tensors are change(dict of tensors) (config.json and tokenizer as they are)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copyfile(f, dest / f.name)
    tensors = {}
    for f in model.glob("*.safetensors"):
        tensors.update(load_file(f))
    save_file(change(tensors), dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_pack_refuses_weights_that_are_not_the_plans(plans, model, tmp_path):
    from ktc.pack import pack

    free = plans["cpu"]["free"]
    key, expert = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"

    def drop(t):
        return {k: v for k, v in t.items() if "experts" not in k}

    def reshape(t):
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
        return t

    cases = [
        (_rewrite(model, tmp_path / "missing", drop), "is missing from the checkpoint"),
        (_rewrite(model, tmp_path / "shape", reshape), "has shape [64, 32] in"),
        (_rewrite(model, tmp_path / "ints", lambda t: {**t, key: t[key].to(torch.int8)}), "is int8 in"),
        (_rewrite(model, tmp_path / "mixed", lambda t: {**t, expert: t[expert].half()}), "have different dtypes"),
    ]
    config = json.loads((model / "config.json").read_text())
    other = _rewrite(model, tmp_path / "config", lambda t: t)
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    cases.append((other, "differs from the plan's at 'rms_norm_eps'"))
    for folder, message in cases:
        with pytest.raises(KtcError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
            pack(free, folder, tmp_path / "out.ktc")
        assert "\n" not in e.value.message
        assert not (tmp_path / "out.ktc").exists()
    with pytest.raises(KtcError, match="--weights MODEL_DIR or --random"):
        pack(free)


def test_pack_converts_a_checkpoint_in_another_float_dtype(plans, model, tmp_path):
    from ktc.pack import pack
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.loader import load_weights

    bf16 = _rewrite(model, tmp_path / "bf16", lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    out = tmp_path / "packed.ktc"
    pack(plans["cpu"]["free"], bf16, out)
    weights = load_weights(read_manifest(out))
    emb = weights["model.embed_tokens.weight"]
    assert emb.dtype == torch.float32     # the plan's format (config.json said float32)
    from safetensors.torch import load_file

    expected = load_file(bf16 / "model.safetensors")["model.embed_tokens.weight"].float()
    assert torch.equal(emb, expected)


BLOCKED_IMPORTS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "tvm"):
            raise ImportError(f"{name} is blocked")
        return None
sys.meta_path.insert(0, Block())
from ktc.cli import main
rc = main(sys.argv[1:])
import json
print(json.dumps(sorted(sys.modules)))
sys.exit(rc)
"""


def test_ktc_pack_needs_neither_transformers_nor_tvm(plans, model, tmp_path):
    out = tmp_path / "packed.ktc"
    r = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, "pack", str(plans["cuda"]["free"]), "--weights",
                        str(model), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    modules = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert not modules & {"transformers", "tvm", "ktc.capture", "ktc.compiler"}, modules
    assert _weight_files(out) == _weight_files(plans["cuda"]["normal"])


# ---- random weights ------------------------------------------------------------------------------

def _same_layout(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(y, dict):
            assert isinstance(x, dict) and x.keys() == y.keys(), name
            for part in y:
                assert x[part].shape == y[part].shape and x[part].dtype == y[part].dtype, (name, part)
        else:
            assert x.shape == y.shape and x.dtype == y.dtype, name


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_random_weights_have_the_runtime_layout(kind, plans):
    from ktc.codegen.cpu_experts import unpack_expert_weights
    from ktc.pack import random_weights, weight_units
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.loader import load_weights

    graph = _graph(plans[kind]["free"])
    loaded = load_weights(read_manifest(plans[kind]["normal"]))
    rnd = random_weights(graph, seed=1, std=0.02)
    _same_layout(rnd, loaded)
    assert rnd["lm_head.weight"] is rnd["model.embed_tokens.weight"]
    seen_quant = set()
    for unit in weight_units(graph)[0]:
        if unit.kind == "cpu_experts":
            gu, dn = (rnd[n] for n in unit.names)
            parts = {f"gate_up.{p}": t for p, t in gu.items()} | {f"down.{p}": t for p, t in dn.items()}
            for w in unpack_expert_weights(unit.spec, parts):
                assert abs(float(w.std()) - 0.02) < 0.002
            for role, p in (("gate_up", gu), ("down", dn)):   # comp as pack_expert_weights computes it
                g = unit.spec.group_size
                q = p["q"].to(torch.int32)
                qsum = q.reshape(*q.shape[:-1], -1, g).sum(-1).double()
                comp = (128.0 * 257.0 * (qsum * p["scales"].double()).sum(-1)).float()
                assert torch.equal(p["comp"], comp), role
            seen_quant.add("cpu_experts")
        elif unit.kind == "gpu_w4a16":
            from ktc.codegen.gpu.moe import unpack_w4a16

            p = rnd[unit.names[0]]
            assert abs(float(unpack_w4a16(p["qweight"], p["scales"]).std()) - 0.02) < 0.002
            seen_quant.add("gpu_w4a16")
    assert seen_quant == ({"cpu_experts"} if kind == "cpu" else {"cpu_experts", "gpu_w4a16"})
    for name, w in graph.weights.items():
        t = rnd[name]
        if "values" in w.source:
            assert torch.equal(t, torch.tensor(w.source["values"], dtype=t.dtype))
        elif "norm" in name and w.layout is None:
            assert torch.equal(t, torch.ones_like(t))
        elif w.layout is None and t.numel() > 1000:
            assert abs(float(t.float().std()) - 0.02) < 0.002, name
    again = random_weights(graph, seed=1)
    other = random_weights(graph, seed=2)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(again[name], rnd[name]) and not torch.equal(other[name], rnd[name])


def test_random_blocks_tile_past_their_period():
    from ktc.pack import RANDOM_PERIOD, _RandomBlocks

    blocks = _RandomBlocks(seed=0, std=0.02)
    cpu = torch.device("cpu")
    n = RANDOM_PERIOD * 2 + 12_345
    t = blocks.fill("int8", (n,), cpu, "k")
    block = blocks.block("int8", cpu)[:RANDOM_PERIOD]
    idx = (blocks.offset("k") + torch.arange(n)) % RANDOM_PERIOD
    assert torch.equal(t, block[idx])
    for kind, k in (("int8", 256), ("int4", 128)):
        shape = (5, 3001, k)   # crosses the period more than once
        q = blocks.fill(kind, shape, cpu, "w")
        if kind == "int4":
            b = q.to(torch.int16)
            values = (((b & 0xF) ^ 8) - 8) + ((((b >> 4) & 0xF) ^ 8) - 8)
            expected = values.reshape(5, 3001, k // 16, 16).sum(-1)
            sums = blocks.group_sums(kind, shape, "w", 32)
        else:
            expected = q.to(torch.int64).reshape(5, 3001, k // 32, 32).sum(-1)
            sums = blocks.group_sums(kind, shape, "w", 32)
        assert torch.equal(sums, expected.to(torch.int64)), kind
    f = blocks.fill("bfloat16", (3, RANDOM_PERIOD), cpu, "x")
    assert f.dtype == torch.bfloat16 and math.isclose(float(f.float().std()), 0.02, rel_tol=0.05)


def test_ktc_pack_random_writes_what_random_weights_makes(plans, tmp_path):
    from ktc.cli import main
    from ktc.pack import random_weights
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.loader import load_weights

    free = plans["cpu"]["free"]
    out = tmp_path / "random.ktc"
    assert main(["pack", str(free), "--random", "--seed", "5", "-o", str(out)]) == 0
    assert _manifest(out)["weights"]["origin"] == {"random": {"seed": 5, "std": 0.02}}
    graph = _graph(free)
    expected = random_weights(graph, seed=5)
    stored = load_weights(read_manifest(out))
    for name, t in expected.items():
        if isinstance(t, dict):
            assert all(torch.equal(stored[name][p], v) for p, v in t.items()), name
        else:
            assert torch.equal(stored[name], t), name
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = ktc.load(str(out))(ids)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, ktc.load(str(free), weights=expected)(ids))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_random_weights_put_gpu_weights_on_the_gpu(plans):
    from ktc.pack import random_weights

    graph = _graph(plans["cuda"]["free"])
    on_cpu, on_gpu = random_weights(graph, "cpu", seed=4), random_weights(graph, "cuda", seed=4)
    for name, w in graph.weights.items():
        want = "cuda" if w.device == "cuda" else "cpu"
        t, ref = on_gpu[name], on_cpu[name]
        for part, x in (t.items() if isinstance(t, dict) else [(None, t)]):
            assert x.device.type == want, (name, part)
            assert torch.equal(x.cpu(), ref[part] if part else ref), (name, part)


def test_tune_times_a_weights_free_plans_cpu_kernels_on_random_weights(plans, tmp_path, monkeypatch, capsys):
    """A plan with no weights yet is tunable: the CPU expert kernels run on random weights in the packed
    layout (their time does not depend on the values), as tune validation runs such a plan."""
    from ktc.cli import main
    from ktc.runtime.artifact import read_manifest
    from ktc.runtime.cpu_tune import node_weights
    from ktc.runtime.tuning import TuningRecords, artifact_records_path, host_key

    monkeypatch.setenv("KTC_CACHE_DIR", str(tmp_path / "cache"))
    plan = tmp_path / "free.ktc"
    shutil.copytree(plans["cpu"]["free"], plan)
    m = read_manifest(plan)
    node = next(n for n in m.graph.nodes_of("moe_experts") if n.device == "cpu")
    normal = read_manifest(plans["cpu"]["normal"])
    real = node_weights(normal, next(n for n in normal.graph.nodes_of("moe_experts") if n.name == node.name))
    made = node_weights(m, node)
    assert {k: (v.shape, v.dtype) for k, v in made.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    assert main(["tune", str(plan), "--budget", "20s", "--batch-sizes", "1", "--no-validate"]) == 0
    assert "timed on random weights" in capsys.readouterr().err
    recs, why = TuningRecords.load(artifact_records_path(plan, host_key()), host_key())
    assert why is None and any(k.startswith("cpu.moe_experts_") for k in recs.records)
