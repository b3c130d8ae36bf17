"""The TVM-built CPU expert kernels, run on every target this host can execute, against a
float64 torch reference."""

from __future__ import annotations

import pytest
import torch

from ktc.codegen.cpu_experts import PREFILL_PAIRS_PER_EXPERT, pack_expert_weights, unpack_expert_weights
from ktc.errors import HostError, InputError
from ktc.runtime.cpu_experts import CpuExpertKernels, check_host, num_threads
from tests.codegen.cpu_builds import (
    EMU,
    EMU_BF16,
    EMU_BF16X1,
    EMU_SHARED,
    INT4_G128,
    SPECS,
    TILE_VARIANTS,
    TILES,
    builds,
    reference_moe,
    rel,
    specs_for,
    target_for,
)

NAMES = ("x86-avx2", "x86-avx512", "x86-amx", EMU, EMU_BF16, EMU_BF16X1, EMU_SHARED)
RUNNABLE = [n for n in NAMES if target_for(n).runs_here()]
TARGET_PARAMS = [
    pytest.param(n, marks=pytest.mark.skipif(n not in RUNNABLE, reason=f"this host cannot run {n} kernels"))
    for n in NAMES
]
# quantized formats: vs the dequantized weights, and vs the original ones. The int-dot prefill
# path (x86-avx512 / x86-amx, int8 / int4, enough pairs per expert) also quantizes the
# activations: int8 in two levels (~15 bits), int4 in one (8 bits); so does their decode
# path (gate/up on vpdpbusd) at any batch size.
TOL_DEQ = {"float32": 1e-5, "bfloat16": 1e-5, "float16": 1e-5, "int8": 1e-4, "int4": 1e-4}
TOL_DEQ_INTDOT = {"int8": 5e-4, "int4": 4e-2}
TOL_DEQ_BF16 = 1e-2      # the AMX-BF16 prefill path: bf16 weights and activations (~2^-9 each)
TOL_ORIG = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3, "int8": 2e-2, "int4": 0.15}


def tol_deq(target: str, fmt: str, T: int) -> float:
    spec = SPECS[fmt]
    if target != "x86-avx2" and fmt == "int4":
        return TOL_DEQ_INTDOT[fmt]     # int4 decode on VNNI quantizes the activations too (one level)
    if target != "x86-avx2" and fmt in TOL_DEQ_INTDOT and T * spec.top_k >= PREFILL_PAIRS_PER_EXPERT * spec.num_experts:
        return max(TOL_DEQ_INTDOT[fmt], TOL_DEQ_BF16) if target in (EMU_BF16, EMU_BF16X1) else TOL_DEQ_INTDOT[fmt]
    return TOL_DEQ[fmt]


def _need(target, fmt):
    if SPECS[fmt] not in specs_for(target):
        pytest.skip(f"{target} builds no {fmt} kernel")


@pytest.fixture(scope="session")
def loaded():
    """target name -> CpuExpertKernels (all runnable targets built concurrently, once)."""
    if not RUNNABLE:
        return {}
    return {n: CpuExpertKernels.load(*b) for n, b in builds(RUNNABLE).items()}


@pytest.fixture(scope="session")
def weights():
    """format -> (original gate_up, down, packed parts, dequantized gate_up, down)."""
    out = {}
    gen = torch.Generator().manual_seed(1234)
    for fmt, spec in SPECS.items():
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size  # noqa: E741
        # uniform weights: int4 symmetric absmax (scale = max|w|/7) keeps the output within 15%
        # of the unquantized one (gaussian weights, heavier tails: ~17%, see the report)
        gu = (torch.rand(E, 2 * I, H, generator=gen) * 2 - 1) * (3 / H) ** 0.5
        dn = (torch.rand(E, H, I, generator=gen) * 2 - 1) * (3 / I) ** 0.5
        parts = pack_expert_weights(spec, gu, dn)
        out[fmt] = (gu, dn, parts, *unpack_expert_weights(spec, parts))
    return out


def _routing(T, K, E, gen, dup_within=False):
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    if dup_within and K > 1:
        ids[:, 1] = ids[:, 0]          # the same expert twice for one token
    tw = torch.rand(T, K, generator=gen)
    return tw / tw.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt", list(SPECS))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_moe_experts_matches_reference(loaded, weights, target, fmt, T):
    _need(target, fmt)
    spec = SPECS[fmt]
    gu, dn, parts, gud, dnd = weights[fmt]
    gen = torch.Generator().manual_seed(T * 31 + len(fmt))
    x = torch.randn(T, spec.hidden_size, generator=gen)
    tw, ids = _routing(T, spec.top_k, spec.num_experts, gen)   # T=17: experts shared by many tokens
    y = loaded[target].moe_experts(spec.name, x, tw, ids, parts)
    assert y.shape == (T, spec.hidden_size) and y.dtype == torch.float32
    assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < tol_deq(target, fmt, T)
    assert rel(y, reference_moe(x, tw, ids, gu, dn)) < TOL_ORIG[fmt]


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt", ["int8", "int4", "bfloat16"])
def test_prefill_sized_batches_and_skipped_ids(loaded, weights, target, fmt):
    """Many tokens per expert (full token blocks and every tail size), an expert repeated
    within a token, and ids outside [0, E) (skipped: they contribute nothing)."""
    _need(target, fmt)
    spec = SPECS[fmt]
    _, _, parts, gud, dnd = weights[fmt]
    gen = torch.Generator().manual_seed(7)
    for T in (5, 40, 64):
        x = torch.randn(T, spec.hidden_size, generator=gen)
        tw, ids = _routing(T, spec.top_k, spec.num_experts, gen, dup_within=True)
        ids[::3, -1] = -1
        ids[1::5, 0] = spec.num_experts + 3
        y = loaded[target].moe_experts(spec.name, x, tw, ids, parts)
        assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < tol_deq(target, fmt, T)
    # a token whose experts all run elsewhere gets exactly zero (decode and prefill sizes)
    for T in (2, 40):
        ids = _routing(T, spec.top_k, spec.num_experts, gen)[1]
        ids[0] = -1
        y = loaded[target].moe_experts(spec.name, torch.randn(T, spec.hidden_size), torch.rand(T, spec.top_k), ids,
                                       parts)
        assert torch.equal(y[0], torch.zeros(spec.hidden_size)) and y[1].abs().sum() > 0


@pytest.mark.skipif(EMU not in RUNNABLE, reason=f"this host cannot run {EMU} kernels")
def test_int4_prefill_in_group_units(loaded):
    """int4 at group 128 on the AMX path: weights unpacked a group at a time in the packed nibble order, for
    up to 4 column-block pairs at once (T = 300: ~200 pairs an expert, two rounds of them; duplicates and
    skipped ids as above), against the float64 reference on the dequantized weights."""
    spec = INT4_G128
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size  # noqa: E741
    gen = torch.Generator().manual_seed(11)
    parts = pack_expert_weights(spec, torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5,
                                torch.randn(E, H, I, generator=gen) / I ** 0.5)
    gud, dnd = unpack_expert_weights(spec, parts)
    for T in (12, 40, 300):
        x = torch.randn(T, H, generator=gen)
        tw, ids = _routing(T, spec.top_k, E, gen, dup_within=T == 40)
        ids[::7, -1] = -1
        y = loaded[EMU].moe_experts(spec.name, x, tw, ids, parts)
        assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < TOL_DEQ_INTDOT["int4"]


def _raw_call(kernels, spec, parts, x, tw, ids, nthr, gen):
    """The kernel itself, with NaN in y and float scratch and random bytes in the rest: every
    element of y must be written, nothing may be read from scratch before it is written."""
    k = kernels._kernels[spec.name]
    T = x.shape[0]
    y = torch.full((T, spec.hidden_size), float("nan"))
    scratch = []
    for _, dt, fixed, per in k["scratch"]:
        n = fixed + per * T
        if dt == torch.float32:
            scratch.append(torch.full((n,), float("nan")))
        else:
            lo, hi = (-(2**31), 2**31 - 1) if dt == torch.int32 else (0, 255)
            scratch.append(torch.randint(lo, hi, (n,), dtype=dt, generator=gen))
    k["fn"](x, tw, ids, *[parts[n] for n in spec.weight_parts()], y, *scratch, nthr)
    return y


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt", list(SPECS))
def test_single_token_with_no_active_expert_writes_zeros(loaded, weights, target, fmt):
    """T=1 whose every id is outside [0, E) (all its experts run elsewhere): y is exactly 0,
    over a poisoned y, whatever the task count (the decode path wakes no thread for it)."""
    _need(target, fmt)
    spec = SPECS[fmt]
    parts = weights[fmt][2]
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(1, spec.hidden_size, generator=gen)
    tw = torch.rand(1, spec.top_k, generator=gen)
    for bad in (-1, spec.num_experts, -5):
        ids = torch.full((1, spec.top_k), -1, dtype=torch.int32)
        ids[0, -1] = bad
        for nthr in (1, 2, 7):
            y = _raw_call(loaded[target], spec, parts, x, tw, ids, nthr, gen)
            assert torch.equal(y, torch.zeros(1, spec.hidden_size))
        assert torch.equal(loaded[target].moe_experts(spec.name, x, tw, ids, parts), torch.zeros(1, spec.hidden_size))


def _single_token_routings(spec, gen):
    """T=1 routings mixing valid ids with -1 and other ids outside [0, E): one valid pair
    (first, last), several, a repeated expert, every pair valid."""
    E, K = spec.num_experts, spec.top_k
    out = []
    for pattern in ("first", "last", "mixed", "repeat", "all"):
        ids = torch.randperm(E, generator=gen)[:K].to(torch.int32)[None].clone()
        if pattern == "first":
            ids[0, 1:] = -1
        elif pattern == "last":
            ids[0, :-1] = -1
            ids[0, 0] = E + 3
        elif pattern == "mixed":
            ids[0, ::2] = -1
            ids[0, -1] = E if K > 2 else ids[0, -1]
        elif pattern == "repeat" and K > 1:
            ids[0, 1] = ids[0, 0]
            ids[0, -1] = -1 if K > 2 else ids[0, -1]
        tw = torch.rand(1, K, generator=gen)
        out.append((pattern, tw / tw.sum(-1, keepdim=True), ids))
    return out


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt", list(SPECS))
def test_single_token_with_skipped_ids_matches_reference(loaded, weights, target, fmt):
    """T=1 with a mix of -1, out-of-range and valid ids against the float64 reference, for task
    counts below, at and above the number of work units: the split must neither drop nor
    double a row, so every task count gives the same bits."""
    _need(target, fmt)
    spec = SPECS[fmt]
    _, _, parts, gud, dnd = weights[fmt]
    gen = torch.Generator().manual_seed(23)
    for pattern, tw, ids in _single_token_routings(spec, gen):
        x = torch.randn(1, spec.hidden_size, generator=gen)
        ref = reference_moe(x, tw, ids, gud, dnd)
        first = None
        for nthr in (1, 2, 3, 5, 64, 1000):
            y = _raw_call(loaded[target], spec, parts, x, tw, ids, nthr, gen)
            assert rel(y, ref) < tol_deq(target, fmt, 1), (pattern, nthr)
            if first is None:
                first = y
            assert torch.equal(y, first), (pattern, nthr)
        assert torch.equal(loaded[target].moe_experts(spec.name, x, tw, ids, parts), first), pattern


# the other single-token decode paths (tir_experts.KernelConfig.decode), built for the best
# target this host runs: the benchmarks compare them with the fused path, so they must agree
DECODE_BASE = next((n for n in ("x86-avx512", "x86-avx2") if n in RUNNABLE), None)


@pytest.mark.skipif(DECODE_BASE is None, reason="this host runs no x86 CPU kernels")
@pytest.mark.parametrize("decode", ["regions", "phased"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_paths_agree(loaded, weights, decode, fmt):
    name = f"{DECODE_BASE}@{decode}"
    (out, entry), = builds([name]).values()
    assert entry["config"]["decode"] == decode and loaded[DECODE_BASE].entry["config"]["decode"] == "fused"
    other = CpuExpertKernels.load(out, entry)
    spec = SPECS[fmt]
    _, _, parts, gud, dnd = weights[fmt]
    gen = torch.Generator().manual_seed(29)
    for pattern, tw, ids in _single_token_routings(spec, gen):
        x = torch.randn(1, spec.hidden_size, generator=gen)
        fused = loaded[DECODE_BASE].moe_experts(spec.name, x, tw, ids, parts)
        y = other.moe_experts(spec.name, x, tw, ids, parts)
        assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < tol_deq(DECODE_BASE, fmt, 1), pattern
        if decode == "regions":   # the same tasks and micro-kernels, one launch more
            assert torch.equal(y, fused), pattern
        elif pattern != "repeat":  # a repeated expert is a token block on the phased path
            # the same quantized math; only the compiler's fusing of multiply-adds in the
            # activation quantization may differ between the two paths' code (a flipped rounding)
            assert rel(y, fused) < 1e-3, pattern
    # T > 1 takes the phased path in every build: the same function
    x = torch.randn(5, spec.hidden_size, generator=gen)
    tw, ids = _routing(5, spec.top_k, spec.num_experts, gen)
    assert torch.equal(other.moe_experts(spec.name, x, tw, ids, parts),
                       loaded[DECODE_BASE].moe_experts(spec.name, x, tw, ids, parts))


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_kernel_writes_every_output_and_ignores_scratch_contents(loaded, weights, target):
    """Call the raw kernel with poisoned output and scratch buffers."""
    fmt = "int8"
    spec = SPECS[fmt]
    _, _, parts, gud, dnd = weights[fmt]
    kernels = loaded[target]
    gen = torch.Generator().manual_seed(3)
    T, K, E = 17, spec.top_k, spec.num_experts
    x = torch.randn(T, spec.hidden_size, generator=gen)
    tw, ids = _routing(T, K, E, gen)
    y = _raw_call(kernels, spec, parts, x, tw, ids, 2, gen)
    assert torch.isfinite(y).all()
    assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < tol_deq(target, fmt, T)
    # any task count (the batch phases' work stealing, past its MAX_TASKS too) gives the same bits:
    # each output is summed by one work item whichever thread claims it
    for nthr in (1, 7, 600):
        assert torch.equal(_raw_call(kernels, spec, parts, x, tw, ids, nthr, gen), y)
    # and the wrapper's reused scratch gives the same answer twice
    a = kernels.moe_experts(spec.name, x, tw, ids, parts)
    b = kernels.moe_experts(spec.name, x, tw, ids, parts)
    assert torch.equal(a, b) and torch.allclose(a, y, rtol=0, atol=0)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts 4 bytes past a 64-byte boundary (safetensors
    hands out tensors at arbitrary offsets)."""
    flat = t.reshape(-1)
    pad = max(1, 4 // flat.element_size())
    base = torch.zeros(flat.numel() + 64, dtype=t.dtype)
    skip = (-base.data_ptr() // flat.element_size()) % (64 // flat.element_size()) + pad
    out = base[skip:skip + flat.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 != 0 and out.is_contiguous()
    return out


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt", ["int4", "float16"])
def test_unaligned_tensors(loaded, weights, target, fmt):
    _need(target, fmt)
    spec = SPECS[fmt]
    _, _, parts, gud, dnd = weights[fmt]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, spec.hidden_size, generator=gen)
    tw, ids = _routing(9, spec.top_k, spec.num_experts, gen)
    y = loaded[target].moe_experts(spec.name, _misaligned(x), _misaligned(tw), _misaligned(ids),
                                   {n: _misaligned(t) for n, t in parts.items()})
    assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < tol_deq(target, fmt, 9)


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_huge_batches_are_split(loaded, weights, target, monkeypatch):
    from ktc.runtime import cpu_experts as rt

    spec = SPECS["int8"]
    parts = weights["int8"][2]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(23, spec.hidden_size, generator=gen)
    tw, ids = _routing(23, spec.top_k, spec.num_experts, gen)
    whole = loaded[target].moe_experts(spec.name, x, tw, ids, parts)
    k = loaded[target]._kernels[spec.name]
    per = max(p for _, _, _, p in k["scratch"])
    fixed = max(f for _, _, f, _ in k["scratch"])
    monkeypatch.setattr(rt, "MAX_INDEX", fixed + 5 * per)   # 5 tokens a call
    # same function; the rounding differs (token blocks of other sizes, decode vs prefill path)
    assert rel(loaded[target].moe_experts(spec.name, x, tw, ids, parts), whole) < 2 * tol_deq(target, "int8", 23)


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bound_call_computes_what_is_in_its_buffers_at_each_call(loaded, weights, target, fmt):
    """bind (the decode path of heterogeneous runs): the same result as moe_experts, on whatever
    the bound buffers hold when it is called; a tuning change is visible to the caller."""
    _need(target, fmt)
    spec, kern = SPECS[fmt], loaded[target]
    _, _, parts, gud, dnd = weights[fmt]
    T = 2
    x, y = torch.empty(T, spec.hidden_size), torch.full((T, spec.hidden_size), float("nan"))
    tw, ids = torch.empty(T, spec.top_k), torch.empty(T, spec.top_k, dtype=torch.int32)
    call = kern.bind(spec.name, x, tw, ids, parts, y)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):   # new contents every call, as a decode step's pinned buffers get
        x.copy_(torch.randn(T, spec.hidden_size, generator=gen))
        tw_new, ids_new = _routing(T, spec.top_k, spec.num_experts, gen)
        tw.copy_(tw_new)
        ids.copy_(ids_new)
        ids[1, 0] = -1
        call()
        assert torch.equal(y, kern.moe_experts(spec.name, x, tw, ids, parts))
        assert rel(y, reference_moe(x, tw, ids, gud, dnd)) < tol_deq(target, fmt, T)
    before = kern.tuning
    kern.set_tuned_threads(spec.name, {1: 1})
    kern.set_tuned_threads(spec.name, None)
    assert kern.tuning != before and call.tuning == before


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_bind_refuses_what_it_would_have_to_copy(loaded, weights, target):
    spec = SPECS["int8"]
    parts, k = weights["int8"][2], loaded[target]
    x, y = torch.randn(2, spec.hidden_size), torch.empty(2, spec.hidden_size)
    tw, ids = torch.rand(2, spec.top_k), torch.zeros(2, spec.top_k, dtype=torch.int32)
    with pytest.raises(InputError, match="contiguous"):
        k.bind(spec.name, x.double(), tw, ids, parts, y)
    with pytest.raises(InputError, match="contiguous"):
        k.bind(spec.name, x, tw, ids.long(), parts, y)
    with pytest.raises(InputError, match="out must be"):
        k.bind(spec.name, x, tw, ids, parts, y.t())
    with pytest.raises(InputError, match="lack part"):
        k.bind(spec.name, x, tw, ids, {"gate_up.q": parts["gate_up.q"]}, y)
    with pytest.raises(InputError, match="1 to"):
        k.bind(spec.name, x[:0], tw[:0], ids[:0], parts, y[:0])


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_bad_inputs_are_input_errors(loaded, weights, target):
    spec = SPECS["int8"]
    parts = weights["int8"][2]
    k = loaded[target]
    x, tw = torch.randn(2, spec.hidden_size), torch.rand(2, spec.top_k)
    ids = torch.zeros(2, spec.top_k, dtype=torch.int32)
    with pytest.raises(InputError):
        k.moe_experts("no_such_kernel", x, tw, ids, parts)
    with pytest.raises(InputError):
        k.moe_experts(spec.name, torch.randn(2, spec.hidden_size + 32), tw, ids, parts)
    with pytest.raises(InputError):
        k.moe_experts(spec.name, x, tw[:1], ids, parts)
    with pytest.raises(InputError):
        k.moe_experts(spec.name, x, tw, ids, {"gate_up.q": parts["gate_up.q"]})
    bad = dict(parts, **{"down.q": parts["down.q"][:-1]})
    with pytest.raises(InputError):
        k.moe_experts(spec.name, x, tw, ids, bad)
    assert k.moe_experts(spec.name, x[:0], tw[:0], ids[:0], parts).shape == (0, spec.hidden_size)


def test_host_check_names_missing_features():
    entry = {"target": "x86-future", "required_features": ["avx2", "no_such_feature_x"]}
    with pytest.raises(HostError) as e:
        check_host(entry)
    assert "no_such_feature_x" in e.value.message and "avx2," not in e.value.message
    assert "--target x86-" in e.value.message and "\n" not in e.value.message


def test_thread_count_from_environment(monkeypatch):
    monkeypatch.delenv("KTC_NUM_THREADS", raising=False)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    assert num_threads() == 3
    monkeypatch.setenv("KTC_NUM_THREADS", "5")
    assert num_threads() == 5
    monkeypatch.setenv("KTC_NUM_THREADS", "zero")
    with pytest.raises(InputError):
        num_threads()
    monkeypatch.delenv("KTC_NUM_THREADS")
    monkeypatch.delenv("TVM_NUM_THREADS")
    assert num_threads() >= 1


def test_tile_variants_are_functions_tuning_chooses_at_every_bucket(weights):
    """A library built with tile variants (TARGET_CONFIGS "tile_variants") holds each kernel with the
    other micro-kernel shapes too; they compute the same layer, `ktc tune` times them at every bucket
    (prefill paths only from the crossover on), and records pick one per bucket."""
    from ktc.runtime.cpu_tune import _paths_at, apply_cpu_records, kernel_key, lib_hash
    from ktc.runtime.tuning import TuningKey, TuningRecord, TuningRecords

    kern = CpuExpertKernels.load(*builds([TILES])[TILES])
    n = num_threads()
    for fmt in ("float32", "int8"):
        spec = SPECS[fmt]
        name = spec.name
        _, _, parts, gud, dnd = weights[fmt]
        assert kern.tile_variants(name) == list(TILE_VARIANTS) and kern.prefill_paths(name) == ["int"]
        assert _paths_at(kern, name, 1) == _paths_at(kern, name, 512) == ["int", *TILE_VARIANTS]
        gen = torch.Generator().manual_seed(5)
        for t in (1, 3, 11):            # one token, a short token block, two blocks and a tail
            x = torch.randn(t, spec.hidden_size, generator=gen)
            tw, ids = _routing(t, spec.top_k, spec.num_experts, gen)
            ref = reference_moe(x, tw, ids, gud, dnd)
            for variant in TILE_VARIANTS:
                kern.set_tuned_prefill(name, {1: variant, 4: variant, 16: variant})
                try:
                    assert rel(kern.moe_experts(name, x, tw, ids, parts), ref) < TOL_DEQ[fmt], (fmt, t, variant)
                finally:
                    kern.set_tuned_prefill(name, None)
        # records: tr8 at bucket 1 (below the prefill crossover: a tile variant applies there), a name
        # this build lacks at bucket 4 (ignored)
        kernel, shape, f = kernel_key(kern.entry, name, lib_hash(kern.entry, kern.kernel_dir), n)
        recs = TuningRecords({"cpu": "test"})
        for b, fn in ((1, "tr8"), (4, "bt16")):
            recs.add(TuningRecord(TuningKey(kernel, shape, f, b).id(), {"threads": n, "prefill": fn}, 1.0, 2.0, 9,
                                  {"threads": n, "prefill": "int"}, "kept"))
        try:
            apply_cpu_records(kern, None, recs)
            table = kern.__dict__["_tuned_prefill"][name]
            assert table[1] == table[2] == "tr8" and "bt16" not in table.values()
        finally:
            kern.set_tuned_prefill(name, None)
            kern.set_tuned_threads(name, None)


@pytest.mark.skipif(EMU not in RUNNABLE, reason=f"this host cannot run {EMU} kernels")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_prefill_paths_are_chosen_per_bucket_by_tuning_records(loaded, weights, fmt):
    """x86-amx libraries carry the kernel with both prefill paths; `ktc tune` records pick one per
    batch bucket, from the prefill crossover on, and the default runs elsewhere."""
    from ktc.runtime.cpu_tune import _paths_at, apply_cpu_records, kernel_key, lib_hash
    from ktc.runtime.tuning import TuningKey, TuningRecord, TuningRecords

    kern, spec = loaded[EMU], SPECS[fmt]
    name = spec.name
    _, _, parts, gud, dnd = weights[fmt]
    assert kern.prefill_paths(name) == ["int", "bf16", "fma"]
    start = kern.prefill_from_tokens(name)
    assert start == -(-PREFILL_PAIRS_PER_EXPERT * spec.num_experts // spec.top_k)
    assert _paths_at(kern, name, 1) == [None] and _paths_at(kern, name, 64) == ["int", "bf16", "fma"]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(40, spec.hidden_size, generator=gen)
    tw, ids = _routing(40, spec.top_k, spec.num_experts, gen)
    ref = reference_moe(x, tw, ids, gud, dnd)
    y_default = kern.moe_experts(name, x, tw, ids, parts)
    ys = {}
    for path in ("bf16", "fma"):
        kern.set_tuned_prefill(name, dict.fromkeys([64], path))
        try:
            ys[path] = kern.moe_experts(name, x, tw, ids, parts)
        finally:
            kern.set_tuned_prefill(name, None)
    y_bf16 = ys["bf16"]
    assert not torch.equal(y_default, y_bf16) and not torch.equal(y_default, ys["fma"])   # other code paths ran
    assert rel(y_default, ref) < tol_deq(EMU, fmt, 40) and rel(y_bf16, ref) < TOL_DEQ_BF16
    assert rel(ys["fma"], ref) < tol_deq(EMU, fmt, 40)           # token blocks: float32 activations

    # records: bf16 at bucket 64 (kept); the decode bucket's record has no path
    n = num_threads()
    kernel, shape, f = kernel_key(kern.entry, name, lib_hash(kern.entry, kern.kernel_dir), n)
    recs = TuningRecords({"cpu": "test"})
    recs.add(TuningRecord(TuningKey(kernel, shape, f, 64).id(), {"threads": n, "prefill": "bf16"}, 1.0, 2.0, 8,
                          {"threads": n, "prefill": "int"}, "kept"))
    recs.add(TuningRecord(TuningKey(kernel, shape, f, 1).id(), {"threads": n}, 1.0, 1.1, 4, {"threads": n}, "kept"))
    try:
        assert apply_cpu_records(kern, None, recs) == 1
        assert torch.equal(kern.moe_experts(name, x, tw, ids, parts), y_bf16)
        table = kern.__dict__["_tuned_prefill"][name]
        # 32..128 borrow bucket 64's bf16 (one octave); bucket 1 has no path choice and 2048 is five
        # octaves from 64: both run the default path
        assert table.get(32) == table.get(128) == "bf16" and table.get(1, "int") == "int" and 2048 not in table
    finally:
        kern.set_tuned_prefill(name, None)
        kern.set_tuned_threads(name, None)
