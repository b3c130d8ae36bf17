"""Which int8 group size meets issue 3's 1e-2 layer error, and do the activations need two levels? (CPU, seconds)

    python bench/int8_error_groups.py

One routed expert of the Qwen3-30B-A3B shape (hidden 2048, inter 768), Gaussian weights (randn / sqrt(K),
rounded to bf16 as bench/cpu_moe.py makes them) and activations; the layer silu(x Wg) * (x Wu) Wd against the
same layer in float32:
  - int8 weights, symmetric, group-wise absmax scales, and the same with a per-group MSE-optimal scale search,
    for groups of 32, 64 and 128 (activations exact: ktc's int8 kernels quantize them in two levels, ~15 bits);
  - g32 weights with one-level int8 activations (per token, or per token and group of 32) for the
    integer-dot path, which would halve its tile products.
"""

from __future__ import annotations

import torch
from int4_error_bound import layer, rel, symmetric


def int8(w: torch.Tensor, group: int, search: bool = False) -> torch.Tensor:
    return symmetric(w, group, 127, [1 - 0.005 * i for i in range(60)] if search else [1.0])


def act_int8(group: int | None):
    """One-level int8 activations: per row (token), or per row and group of `group` values."""
    return lambda a: symmetric(a, group or a.shape[1], 127, [1.0])


def main() -> None:
    torch.manual_seed(0)
    h, inter, t = 2048, 768, 256
    x = torch.randn(t, h)
    g, u = (torch.randn(inter, h) / h ** 0.5).bfloat16().float(), (torch.randn(inter, h) / h ** 0.5).bfloat16().float()
    d = (torch.randn(h, inter) / inter ** 0.5).bfloat16().float()
    ref = layer(x, g, u, d)
    print(f"{'weights / activations':58s} {'layer rel err':>14s}")
    for group in (32, 64, 128):
        for search in (False, True):
            name = f"int8 g{group}, {'MSE-optimal scales' if search else 'absmax scales'}, exact activations"
            print(f"{name:58s} {rel(layer(x, *[int8(w, group, search) for w in (g, u, d)]), ref):14.4f}")
    w32 = [int8(w, 32) for w in (g, u, d)]
    for agroup, label in ((32, "per token and group of 32"), (None, "per token")):
        name = f"int8 g32, one-level int8 activations {label}"
        print(f"{name:58s} {rel(layer(x, *w32, quant_act=act_int8(agroup)), ref):14.4f}")


if __name__ == "__main__":
    main()
