"""Symmetric group-wise quantizers and the int4 packer (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ktc.quantize import choose_group_size, dequantize_symmetric, pack_int4, quantize_symmetric, unpack_int4

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def weights_and_group(draw):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    group = draw(st.integers(1, 48))
    k = group * draw(st.integers(1, 4))
    elems = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    if draw(st.booleans()):   # mix in whole zero groups and repeated values
        elems = st.one_of(elems, st.just(0.0))
    arr = draw(hnp.arrays(np.float32, (*lead, k), elements=elems))
    return torch.from_numpy(arr), group


@given(weights_and_group(), st.sampled_from([8, 4]))
@SETTINGS
def test_round_trip_error_is_at_most_half_a_step(wg, bits):
    w, group = wg
    q, scales = quantize_symmetric(w, bits, group, clip=False)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (*w.shape[:-1], w.shape[-1] // group)
    assert int(q.abs().max()) <= qmax
    deq = dequantize_symmetric(q, scales, group)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    step = scales.repeat_interleave(group, dim=-1)
    # |w - deq| <= scale / 2, up to float32 rounding of the division and the product
    bound = step / 2 * (1 + 1e-5) + w.abs() * 1e-6
    assert bool(((w - deq).abs() <= bound).all())
    # each group's largest magnitude is represented exactly at +-qmax
    amax = w.reshape(*w.shape[:-1], -1, group).abs().amax(-1)
    torch.testing.assert_close(scales, amax / qmax, rtol=0, atol=0)


@given(weights_and_group(), st.sampled_from([8, 4]))
@SETTINGS
def test_clip_search_bounds(wg, bits):
    """MSE-clipped groups: every element within max(scale / 2, max|w| - qmax * scale) of w, the
    scale between 0.6 and 1 times the absmax one, and the group's squared error never above
    the absmax quantization's."""
    w, group = wg
    q, scales = quantize_symmetric(w, bits, group, clip=True)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= qmax
    deq = dequantize_symmetric(q, scales, group)
    wg_ = w.reshape(*w.shape[:-1], -1, group)
    amax = wg_.abs().amax(-1)
    assert bool((scales <= amax / qmax * (1 + 1e-6)).all()) and bool((scales >= 0.6 * amax / qmax * (1 - 1e-6)).all())
    bound = torch.maximum(scales / 2, amax - qmax * scales).repeat_interleave(group, dim=-1)
    assert bool(((w - deq).abs() <= bound * (1 + 1e-5) + w.abs() * 1e-6).all())
    qa, sa = quantize_symmetric(w, bits, group, clip=False)
    err = (w.double() - deq.double()).reshape(wg_.shape).square().sum(-1)
    err_abs = (w.double() - dequantize_symmetric(qa, sa, group).double()).reshape(wg_.shape).square().sum(-1)
    assert bool((err <= err_abs * (1 + 1e-5) + 1e-30).all())


def test_int4_defaults_to_clip_search_and_lowers_the_error():
    torch.manual_seed(0)
    w = torch.randn(64, 1024)
    q, s = quantize_symmetric(w, 4, 128)
    qa, sa = quantize_symmetric(w, 4, 128, clip=False)
    e_clip = float((dequantize_symmetric(q, s, 128) - w).norm() / w.norm())
    e_abs = float((dequantize_symmetric(qa, sa, 128) - w).norm() / w.norm())
    assert e_clip < 0.95 * e_abs and e_clip < 0.11
    q8, s8 = quantize_symmetric(w, 8, 128)             # int8 stays absmax
    torch.testing.assert_close(s8, w.reshape(64, 8, 128).abs().amax(-1) / 127, rtol=0, atol=0)


@given(st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(1, 40), st.data())
@SETTINGS
def test_pack_unpack_int4_is_exact(lead, half_k, data):
    arr = data.draw(hnp.arrays(np.int8, (*lead, 2 * half_k), elements=st.integers(-8, 7)))
    q = torch.from_numpy(arr)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, half_k)
    assert torch.equal(unpack_int4(packed), q)
    # low nibble = element 2j, high nibble = element 2j + 1
    lo = (packed.to(torch.int16) & 15)
    assert torch.equal(torch.where(lo >= 8, lo - 16, lo).to(torch.int8), q[..., 0::2])


def test_zero_groups_get_zero_scale():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    q, s = quantize_symmetric(w, 4, 32, clip=False)
    assert s.tolist() == [[0.0, 0.0], [0.0, pytest.approx(1 / 7)]]
    assert int(q[:, :32].abs().sum()) == 0 and int(q[1, 32:].abs().max()) == 7


@pytest.mark.parametrize("k,g", [(4096, 128), (1408, 128), (2048, 128), (192, 64), (96, 32), (160, 32)])
def test_choose_group_size(k, g):
    assert choose_group_size(k) == g


@pytest.mark.parametrize("k", [48, 100, 31, 1])
def test_choose_group_size_refuses(k):
    with pytest.raises(ValueError):
        choose_group_size(k)


def test_bad_arguments():
    with pytest.raises(ValueError):
        quantize_symmetric(torch.zeros(4, 64), 3, 32)
    with pytest.raises(ValueError):
        quantize_symmetric(torch.zeros(4, 64), 8, 48)
    with pytest.raises(ValueError):
        dequantize_symmetric(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3), 32)
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([9, 0], dtype=torch.int8))
