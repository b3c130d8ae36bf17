"""Could the CPU prefetch the next layer's experts during the serial GPU work? Only if the next layer's
choice can be guessed early: this measures how many of layer L+1's top-k experts its router picks when fed
layer L's hidden state (before L's MoE, when the hand-off to the CPU happens) instead of its own.

    python bench/next_layer_routing_overlap.py [--layers 6] [--tokens 64]     (CPU is enough)

transformers' Qwen3-MoE at the Qwen3-30B-A3B dims, its random init (the benchmarks' weights), bf16.
Random choice shares top_k^2 / E = 0.5 experts of 8 with the real one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import QWEN3_30B_A3B  # noqa: E402


def main() -> None:
    import transformers as tf

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=args.layers)
    config = tf.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")},
                                     model_type=cfg["model_type"])
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(0))
    mid: dict[int, torch.Tensor] = {}     # layer -> the input of its post-attention norm (MoE input, unnormed)
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(lambda mod, a, i=i: mid.__setitem__(i, a[0]))
    k = cfg["num_experts_per_tok"]

    def top(h, layer):
        x = layer.post_attention_layernorm(h)
        return torch.topk(torch.nn.functional.linear(x, layer.mlp.gate.weight).float()[0], k, -1).indices

    with torch.no_grad():
        model(ids)
        for i in range(args.layers - 1):
            nxt = model.model.layers[i + 1]
            actual, guess = top(mid[i + 1], nxt), top(mid[i], nxt)
            pairs = zip(actual.tolist(), guess.tolist(), strict=True)
            shared = sum(len(set(a) & set(g)) for a, g in pairs) / len(actual)
            first = float((guess[:, :1] == actual).any(-1).float().mean())
            print(f"layer {i} -> {i + 1}: of the {k} experts, {shared:.2f} guessed right on average; the guess's "
                  f"first among the real ones for {first:.0%} of tokens (random: {k * k / cfg['num_experts']:.2f}, "
                  f"{k / cfg['num_experts']:.0%})")


if __name__ == "__main__":
    main()
