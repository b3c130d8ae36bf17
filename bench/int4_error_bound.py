"""How small can the int4 MoE layer error be? (CPU, seconds; the issue-3 accuracy target is <= 0.10.)

    python bench/int4_error_bound.py

One routed expert of the Qwen3-30B-A3B shape (hidden 2048, inter 768), Gaussian weights (randn / sqrt(K),
as bench/cpu_moe.py makes them) and activations. The layer output silu(x Wg) * (x Wu) Wd is compared,
relative to its norm, with the same layer on perturbed weights:
  - the rate-distortion bound: any code of 4 bits per Gaussian weight leaves at least 2^-4 = 6.25% rms
    error per weight (Shannon's D(R) = sigma^2 2^(-2R)); modelled as independent noise of that size,
    and with no bits spent on scales;
  - the best scalar 16-level quantizer for a Gaussian (Lloyd-Max: 9.75% rms);
  - ktc's int4 (symmetric, group-wise absmax scales, groups of 32 and 128) and the same with a
    per-group MSE-optimal clipping search.
"""

from __future__ import annotations

import torch


def layer(x, g, u, d, quant_act=None):
    """silu(x Wg) * (x Wu) Wd; quant_act (if given) rounds x and the intermediate h as a kernel would."""
    qa = quant_act or (lambda a: a)
    h = torch.nn.functional.silu(qa(x) @ g.T) * (qa(x) @ u.T)
    return qa(h) @ d.T


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def int4(w: torch.Tensor, group: int, search: bool = False) -> torch.Tensor:
    return symmetric(w, group, 7, [1 - 0.02 * i for i in range(25)] if search else [1.0])


def symmetric(w: torch.Tensor, group: int, levels: int, factors: list[float]) -> torch.Tensor:
    """w rounded to integers in [-levels, levels] times a scale per group of `group` values along K: absmax /
    levels times whichever of `factors` leaves the group the least squared error."""
    wg = w.reshape(w.shape[0], -1, group)
    amax = wg.abs().amax(-1, keepdim=True)
    best, best_err = None, None
    for f in factors:
        s = amax * f / levels
        q = (wg / s).round().clamp(-levels, levels) * s
        e = (q - wg).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, e
        else:
            better = e < best_err
            best, best_err = torch.where(better, q, best), torch.where(better, e, best_err)
    return best.reshape(w.shape)


def main() -> None:
    torch.manual_seed(0)
    h, inter, t = 2048, 768, 256
    x = torch.randn(t, h)
    g, u = torch.randn(inter, h) / h ** 0.5, torch.randn(inter, h) / h ** 0.5
    d = torch.randn(h, inter) / inter ** 0.5
    ref = layer(x, g, u, d)

    def noisy(rms: float):
        return [w + torch.randn_like(w) * w.std() * rms for w in (g, u, d)]

    rows = [("rate-distortion bound, 4 bits/weight (6.25% rms per weight)", noisy(2 ** -4)),
            ("Lloyd-Max 16 levels (9.75% rms per weight)", noisy(0.0975))]
    for group in (32, 128):
        rows.append((f"ktc int4 g{group} (absmax)", [int4(w, group) for w in (g, u, d)]))
        rows.append((f"ktc int4 g{group}, MSE-optimal clipping", [int4(w, group, True) for w in (g, u, d)]))
    print(f"{'weights':62s} {'per-weight rms':>14s} {'layer rel err':>14s}")
    for name, (gq, uq, dq) in rows:
        print(f"{name:62s} {rel(gq, g):14.4f} {rel(layer(x, gq, uq, dq), ref):14.4f}")


if __name__ == "__main__":
    main()
