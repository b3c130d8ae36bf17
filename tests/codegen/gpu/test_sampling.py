"""The device sampler (codegen/gpu/sampling.py: sample, kept_mask) against runtime/sampling.py.

Without a GPU the kernels run in Triton's interpreter at ~5-30 ms a program (one program per row
and block of the vocabulary, up to 11 launches a call): vocabularies of 5-150 and few rows here.
Logits are drawn without ties (which filter_logits and the kernels may break differently), and
top_p values are checked to lie clear of every cumulative probability (float rounding there may
differ between torch's cumsum and the kernels' fixed-point sums).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ktc.codegen.gpu import sampling
from ktc.runtime.sampling import filter_logits, make_generator

from .conftest import HAS_CUDA

DEV = "cuda" if HAS_CUDA else "cpu"
CFG = {"BLOCK": 64, "num_warps": 4}     # several blocks per row at these vocabularies


def distinct_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int, scales=(1.0, 3.0, 6.0, 2.0)) -> torch.Tensor:
    """[rows, vocab] logits whose values in `dtype` are all different within a row, on DEV."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rows):
        pool = (torch.randn(8 * vocab, generator=g) * scales[r % len(scales)]).to(dtype).unique()
        assert pool.numel() >= vocab
        out.append(pool[torch.randperm(pool.numel(), generator=g)[:vocab]])
    return torch.stack(out).to(DEV)


def reference_support(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """bool [B, V]: what runtime.sampling.sample may draw (its filter, on the CPU)."""
    return torch.isfinite(filter_logits(logits.cpu().to(torch.float32) / temperature, top_k, top_p))


def top_p_margin(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> float:
    """Distance from top_p to the nearest mass-before-a-token of any row (rank 0 excluded: always kept)."""
    x = filter_logits(logits.cpu().to(torch.float32) / temperature, top_k, 1.0).double()
    probs = x.sort(dim=-1, descending=True).values.softmax(-1)
    before = (probs.cumsum(-1) - probs)[:, 1:]
    return float((before - top_p).abs().min()) if before.numel() else math.inf


def check(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, steps=(0, 1), seed: int = 5,
          config: dict | None = CFG) -> None:
    """The support sample() uses (what kept_mask returns) equals the reference, and every drawn token lies in it."""
    ref = reference_support(logits, temperature, top_k, top_p)
    for step in steps:
        ids, thr = sampling._sample(logits, temperature, top_k, top_p, seed, step, config)
        assert ids.dtype == torch.int64 and ids.device == logits.device and ids.shape == (logits.shape[0],)
        ids = ids.cpu()
        assert ref[torch.arange(len(ids)), ids].all(), (ids.tolist(), ref.sum(-1).tolist())
        got = sampling._kept(logits, temperature, thr).cpu()
        assert torch.equal(got, ref), (got.sum(-1).tolist(), ref.sum(-1).tolist())


CASES = [   # temperature, top_k, top_p, dtype
    (1.0, 0, 1.0, torch.float32),        # plain softmax
    (0.7, 1, 1.0, torch.float32),        # top_k = 1: the argmax
    (1.0, 0, 1e-6, torch.bfloat16),      # top_p tiny: the argmax
    (0.8, 5, 1.0, torch.bfloat16),
    (1.2, 0, 0.7, torch.float32),
    (0.9, 10, 0.8, torch.bfloat16),
    (1.5, 500, 0.9, torch.float32),      # top_k >= V: off
    (2.0, 149, 0.95, torch.float32),     # top_k = V - 1
]


@pytest.mark.parametrize("temperature,top_k,top_p,dtype", CASES)
def test_support_matches_filter_logits(temperature, top_k, top_p, dtype):
    logits = distinct_logits(4, 150, dtype, seed=11)
    assert top_p == 1.0 or top_p_margin(logits, temperature, top_k, top_p) > 1e-5
    check(logits, temperature, top_k, top_p)


def test_support_strided_rows_and_ties_at_kth():
    """Rows with a stride > V; ties at the k-th value are all kept, as filter_logits keeps them."""
    wide = distinct_logits(3, 150 + 37, torch.float32, seed=12)
    check(wide[:, :150], 0.6, 7, 0.9, steps=(3,))
    tied = distinct_logits(2, 100, torch.float32, seed=13)
    top = tied.sort(-1, descending=True).values
    tied[0, tied[0] < top[0, 2]] = float(top[0, 5])    # rank 3 of row 0 shared by 97 tokens
    tied[1, :6] = top[1, 0]                            # row 1 starts with 6 copies of its max
    check(tied, 1.0, 4, 1.0, steps=(0,))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), vocab=st.integers(2, 60), temperature=st.floats(0.25, 4.0),
       top_k=st.integers(0, 64), top_p=st.floats(1e-3, 1.0))
def test_support_property(seed, vocab, temperature, top_k, top_p):
    """kept_mask (sample()'s support) equals filter_logits' for any options, 1 to 4 blocks a row."""
    logits = distinct_logits(1, vocab, torch.float32, seed)
    assume(top_p == 1.0 or top_p_margin(logits, temperature, top_k, top_p) > 1e-5)
    got = sampling.kept_mask(logits, temperature, top_k, top_p, {"BLOCK": 16, "num_warps": 1}).cpu()
    assert torch.equal(got, reference_support(logits, temperature, top_k, top_p))


def _chi2_critical_even_df(df: int, alpha: float) -> float:
    """x with P(chi2_df > x) = alpha, for even df: the survival function is exp(-x/2) * sum_{i<df/2} (x/2)^i / i!."""
    sf = lambda x: math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(df // 2))  # noqa: E731
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sf(mid) > alpha else (lo, mid)
    return hi


def test_distribution_chi_square():
    """Frequencies of 480 draws (480 rows of the same logits: each row has its own noise) against the
    softmax of logits / T. The threshold is the chi-square tail of 1e-8 (df = 4), below 1e-6 with
    room for the asymptotic approximation (expected counts >= 40); the draws are a fixed function
    of the seed, so the test is deterministic."""
    n, temperature = 480, 0.8
    logits = torch.tensor([1.0, 0.6, 0.3, 0.0, -0.2])
    probs = (logits / temperature).double().softmax(-1)
    assert float(probs.min()) * n >= 40
    ids = sampling.sample(logits.expand(n, -1).contiguous().to(DEV), temperature, seed=2024, step=3)
    counts = torch.bincount(ids.cpu(), minlength=5).double()
    expected = probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical_even_df(4, 1e-8), (counts.tolist(), expected.tolist(), chi2)


def test_deterministic_per_seed_and_step():
    logits = distinct_logits(8, 100, torch.float32, seed=14, scales=(0.3,))      # near-uniform rows
    a = sampling.sample(logits, 1.0, seed=9, step=4, config=CFG).cpu()
    assert torch.equal(a, sampling.sample(logits, 1.0, seed=9, step=4, config=CFG).cpu())
    assert not torch.equal(a, sampling.sample(logits, 1.0, seed=9, step=5, config=CFG).cpu())
    assert not torch.equal(a, sampling.sample(logits, 1.0, seed=10, step=4, config=CFG).cpu())
    filtered = [sampling.sample(logits[:2], 1.0, 40, 0.5, seed=9, step=4, config=CFG).cpu() for _ in range(2)]
    assert torch.equal(*filtered)


def test_rejects_bad_arguments():
    logits = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample(logits, 0.0)
    with pytest.raises(ValueError, match="unit stride"):
        sampling.sample(torch.zeros(8, 2, device=DEV).t(), 1.0)


def test_gpu_model_choose_token_uses_device_sampler():
    """GpuModel._choose_token (no GPU needed: a bare instance on DEV): one kernel seed per generator
    (generate() makes one per call from the user's seed), one step per token; an artifact without
    the device sampler falls back to the CPU one."""
    from ktc.runtime.gpu.model import GpuModel

    model = object.__new__(GpuModel)
    model.kernels = SimpleNamespace(sampling=sampling)
    model.device = torch.device(DEV)
    model._sample_stream = None
    logits = distinct_logits(2, 40, torch.float32, seed=15, scales=(0.5,))

    def run(seed):
        gen = make_generator(seed)
        return [model._choose_token(logits, 1.0, 0, 1.0, gen) for _ in range(3)]

    first, again = run(123), run(123)
    kseed = int(torch.randint(0, 2**31 - 1, (1,), generator=make_generator(123)))
    for step, ((tok, tok_dev), (tok2, _)) in enumerate(zip(first, again, strict=True)):
        assert tok.device.type == "cpu" and tok_dev.device == logits.device
        assert torch.equal(tok, tok2) and torch.equal(tok, tok_dev.cpu())
        assert torch.equal(tok, sampling.sample(logits, 1.0, seed=kseed, step=step).cpu())
    assert model._sample_stream[1:] == (kseed, 2)

    model.kernels = SimpleNamespace(sampling=SimpleNamespace(argmax=sampling.argmax))   # an older artifact
    tok, tok_dev = model._choose_token(logits, 1.0, 3, 1.0, make_generator(1))
    assert reference_support(logits, 1.0, 3, 1.0)[torch.arange(2), tok].all()
