"""Compiled tiny models of every architecture against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

import ktc
from ktc.tiny import ARCHITECTURES

ERRORS: dict[str, float] = {}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def prompts(vocab: int, seq: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + seq)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("quant,tol", [("none", 1e-3), ("int8", 2e-2)])
def test_logits_match_transformers(arch, quant, tol, tiny_models, compiled):
    model = ktc.load(str(compiled(arch, quant)))
    ref = hf_model(tiny_models[arch])
    worst = 0.0
    for seq, batch in ((1, 1), (7, 2), (23, 1)):
        ids = prompts(ref.config.vocab_size, seq, batch)
        with torch.no_grad():
            expected = ref(ids).logits
        got = model(ids)
        assert got.shape == expected.shape and got.dtype == torch.float32
        worst = max(worst, rel_err(got, expected))
    ERRORS[f"{arch}/{quant}"] = worst
    print(f"\n{arch} --quant {quant}: worst relative logits error {worst:.2e} (tolerance {tol})")
    assert worst < tol


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generate_matches_transformers(arch, tiny_models, compiled):
    model = ktc.load(str(compiled(arch, "none")))
    ref = hf_model(tiny_models[arch])
    ids = prompts(ref.config.vocab_size, 5, seed=3)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10,
                                pad_token_id=0, eos_token_id=None)
    got = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert got.tolist() == expected.tolist()


def test_int4_is_close(tiny_models, compiled):
    model = ktc.load(str(compiled("qwen3_moe", "int4")))
    ref = hf_model(tiny_models["qwen3_moe"])
    ids = prompts(ref.config.vocab_size, 9)
    with torch.no_grad():
        err = rel_err(model(ids), ref(ids).logits)
    print(f"\nqwen3_moe --quant int4: relative logits error {err:.2e}")
    assert err < 0.1


def test_group_size_option_compiles_and_runs(tiny_models, tmp_path):
    """--group-size 32 on the tiny Mixtral (whose experts would take group 64): the int8 expert weights and
    kernels use groups of 32 and the logits match transformers as the default group's do."""
    import json

    from ktc.compiler import compile_model

    out = tmp_path / "g32.ktc"
    compile_model(tiny_models["mixtral"], out, target="cpu", quant="int8", group_size=32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compile"]["group_size"] == 32
    experts = [w for w in manifest["graph"]["weights"].values() if w.get("format") == "int8"]
    assert experts and {w["group_size"] for w in experts} == {32}
    model = ktc.load(str(out))
    ref = hf_model(tiny_models["mixtral"])
    ids = prompts(ref.config.vocab_size, 7, 2)
    with torch.no_grad():
        err = rel_err(model(ids), ref(ids).logits)
    print(f"\nmixtral --quant int8 --group-size 32: relative logits error {err:.2e}")
    assert err < 2e-2
