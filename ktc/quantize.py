"""Weight quantizers and packers (pure torch; used when the artifact is written).

Symmetric group-wise quantization along the last dim K: each run of `group_size` consecutive
elements shares one float32 scale, ``scale = max|w| / qmax`` with ``qmax = 2^(bits-1) - 1``
(127 for int8, 7 for int4), and ``q = clamp(round(w / scale), -qmax, qmax)``. So
``|w - q * scale| <= scale / 2`` everywhere, and a group of zeros gets scale 0 (q = 0).

int4 values are stored two per byte by `pack_int4`: byte j holds element 2j in its low nibble
and element 2j+1 in its high nibble, both two's complement. Kernels that want another
nibble order permute K before packing (see ktc.codegen.cpu_experts.pack_expert_weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_SIZES = (128, 64, 32)


def choose_group_size(k: int) -> int:
    """The largest of 128, 64, 32 that divides `k`; ValueError if none does."""
    for g in GROUP_SIZES:
        if k % g == 0:
            return g
    raise ValueError(f"no quantization group size in {GROUP_SIZES} divides K={k}")


def _check(w: Tensor, bits: int, group_size: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if w.dim() < 1:
        raise ValueError("w must have at least one dimension")
    k = w.shape[-1]
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    return (1 << (bits - 1)) - 1


def quantize_symmetric(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """w [..., K] float -> (q int8 [..., K] in [-qmax, qmax], scales float32 [..., K // group_size])."""
    qmax = _check(w, bits, group_size)
    k = w.shape[-1]
    wg = w.detach().to(torch.float32).reshape(*w.shape[:-1], k // group_size, group_size)
    amax = wg.abs().amax(dim=-1)
    scales = amax / qmax
    # Divide by the scale itself (not multiply by its reciprocal) so that round() sees the
    # same quotient the bound |w - q*s| <= s/2 is stated in; zero groups divide by 1.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(wg / safe.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scales.contiguous()


def dequantize_symmetric(q: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """Inverse of quantize_symmetric (up to rounding): float32 [..., K]."""
    k = q.shape[-1]
    if k % group_size != 0 or scales.shape[-1] != k // group_size:
        raise ValueError(f"scales {tuple(scales.shape)} do not match q {tuple(q.shape)} with group {group_size}")
    qg = q.to(torch.float32).reshape(*q.shape[:-1], k // group_size, group_size)
    return (qg * scales.to(torch.float32).unsqueeze(-1)).reshape(q.shape)


def pack_int4(q: Tensor) -> Tensor:
    """int values in [-8, 7], [..., K] (K even) -> uint8 [..., K // 2]: low nibble = element 2j."""
    if q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    qi = q.to(torch.int16)
    if qi.numel() and (int(qi.min()) < -8 or int(qi.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    nib = qi & 0xF
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.to(torch.uint8).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., K // 2] -> int8 [..., K]; exact inverse of pack_int4."""
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    both = torch.where(both >= 8, both - 16, both)
    return both.to(torch.int8).contiguous()
