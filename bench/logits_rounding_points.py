"""Which bf16 rounding points decide how close a Qwen3-MoE implementation lands to transformers bf16.

    python3 bench/logits_rounding_points.py [--layers 4] [--seeds 1 2 3] [--out FILE]   (CUDA or CPU)

The correctness check of bench/gpu_decode.py compares ktc's logits with transformers bf16 on random
weights (target 1e-2). This script replays the same model as a float32 functional forward in which
each of transformers' bf16 rounding points can be switched on or off, and reports each set's relative
logits distance to transformers bf16 (its default sdpa attention / grouped_mm experts) on the same
weights: "all" is transformers' arithmetic with only the GEMMs' summation order changed; "ktc" rounds
where ktc's GPU kernels round today; "ktc + X" adds one of transformers' points to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import QWEN3_30B_A3B  # noqa: E402

# transformers' rounding points (bf16 model): each name rounds one kind of intermediate to bf16
TRANSFORMERS = ("norm", "proj", "qknorm", "cossin", "rope", "attn", "resid", "router", "rweight",
                "expert_gu", "expert_act", "expert_down", "expert_weighted", "moe_sum", "head")
# where ktc's kernels round: norm outputs, GEMM outputs, q/k once after norm + rotary, attention output,
# residual sums, silu(gate) * up once (gate/up stay float32), the weighted expert sum once, the logits
KTC = ("norm", "proj", "rope_out", "attn", "resid", "expert_act", "moe_sum", "head")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def forward(sd: dict, ids: torch.Tensor, layers: int, points: set, cfg: dict) -> torch.Tensor:
    """Float32 logits [T, V] of transformers' Qwen3-MoE with bf16 rounding at `points` only."""
    def rnd(x, p):
        return x.bfloat16().float() if p in points else x

    def rms(x, w, p):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
        return rnd(w * rnd(x, p), p)

    t = ids.shape[0]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inter, k_top = cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    dev = ids.device
    h = sd["model.embed_tokens.weight"][ids]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    freqs = torch.arange(t, device=dev).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = rnd(emb.cos(), "cossin"), rnd(emb.sin(), "cossin")

    def rope(x):
        half = torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), -1)
        y = rnd(rnd(x * cos[:, None], "rope") + rnd(half * sin[:, None], "rope"), "rope")
        return rnd(y, "rope_out")

    for layer in range(layers):
        p = f"model.layers.{layer}."
        x = rms(h, sd[p + "input_layernorm.weight"], "norm")
        q = rnd(x @ sd[p + "self_attn.q_proj.weight"].T, "proj").view(t, nh, hd)
        k = rnd(x @ sd[p + "self_attn.k_proj.weight"].T, "proj").view(t, nkv, hd)
        v = rnd(x @ sd[p + "self_attn.v_proj.weight"].T, "proj").view(t, nkv, hd)
        q = rope(rms(q, sd[p + "self_attn.q_norm.weight"], "qknorm"))
        k = rope(rms(k, sd[p + "self_attn.k_norm.weight"], "qknorm"))
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        a = rnd(a.transpose(0, 1).reshape(t, nh * hd), "attn")
        h = rnd(h + rnd(a @ sd[p + "self_attn.o_proj.weight"].T, "proj"), "resid")
        x = rms(h, sd[p + "post_attention_layernorm.weight"], "norm")
        probs = rnd(x @ sd[p + "mlp.gate.weight"].T, "router").softmax(-1)
        top_w, top_i = torch.topk(probs, k_top, dim=-1)
        top_w = rnd(top_w / top_w.sum(-1, keepdim=True), "rweight")
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        outs = torch.zeros(t, k_top, h.shape[-1], device=dev)
        for e in top_i.unique().tolist():
            rows, slot = torch.where(top_i == e)
            gu = rnd(x[rows] @ gate_up[e].T, "expert_gu")
            act = rnd(rnd(F.silu(gu[:, :inter]), "expert_gu") * gu[:, inter:], "expert_act")
            y = rnd(act @ down[e].T, "expert_down")
            outs[rows, slot] = rnd(y * top_w[rows, slot, None], "expert_weighted")
        h = rnd(h + rnd(outs.sum(1), "moe_sum"), "resid")
    x = rms(h, sd["model.norm.weight"], "head")
    return rnd(x @ sd["lm_head.weight"].T, "head")


def main() -> None:
    import transformers as tf

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, default=103)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=args.layers)
    config = tf.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")},
                                     model_type=cfg["model_type"])
    sets = {"float32 (no rounding)": (), "all of transformers' points": TRANSFORMERS, "ktc": KTC}
    for extra in ("qknorm", "cossin", "rope", "router", "rweight", "expert_gu", "expert_down", "expert_weighted"):
        sets[f"ktc + {extra}"] = KTC + (extra,)
    sets["ktc + router + rweight"] = KTC + ("router", "rweight")
    sets["ktc + router + rweight + cossin"] = KTC + ("router", "rweight", "cossin")
    last4 = list(range(args.tokens - 4, args.tokens))
    tail = list(range(20, args.tokens))
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "layers": args.layers,
               "tokens": args.tokens, "seeds": {}}
    for seed in args.seeds:
        torch.manual_seed(seed)
        with torch.device(dev):
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, cfg["vocab_size"], (args.tokens,), generator=torch.Generator().manual_seed(seed),
                            ).to(dev)
        row = {}
        with torch.no_grad():
            ref = model(ids[None]).logits[0].float()
            try:
                model.set_experts_implementation("eager")
                other = model(ids[None]).logits[0].float()
                row["transformers eager experts"] = [rel(other[last4], ref[last4]), rel(other[tail], ref[tail])]
            except (AttributeError, ValueError) as e:
                print("no eager experts:", e)
            sd = {k: v.float() for k, v in model.state_dict().items()}
            model = None
            for name, pts in sets.items():
                y = forward(sd, ids, args.layers, set(pts), cfg)
                row[name] = [rel(y[last4], ref[last4]), rel(y[tail], ref[tail])]
                print(f"seed {seed}  {name:36s} last 4: {row[name][0]:.3e}  positions 20+: {row[name][1]:.3e}",
                      flush=True)
        results["seeds"][seed] = row
        sd = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    names = list(next(iter(results["seeds"].values())).keys())
    results["mean"] = {n: [sum(r[n][i] for r in results["seeds"].values()) / len(results["seeds"]) for i in (0, 1)]
                       for n in names}
    print("\nmean over seeds (relative logits distance to transformers bf16): last 4 positions, positions 20+")
    for n in names:
        print(f"  {n:36s} {results['mean'][n][0]:.3e}  {results['mean'][n][1]:.3e}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
