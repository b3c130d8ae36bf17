"""Tiny random-weight Hugging Face model folders, one per supported architecture.

They are what the README's first command compiles (no download needed) and what the
end-to-end tests compare against transformers. Every dimension is a multiple of 32 so
that group-wise quantization (group 32) applies to every expert weight.
Needs transformers (a compile-time dependency), never used by the runtime.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_config(arch: str, num_layers: int = 2):
    """A transformers config object for a tiny model of `arch`."""
    import transformers as tf

    common = dict(_COMMON, num_hidden_layers=num_layers)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
            qkv_bias=True,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        )
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)
    if arch in ("deepseek_v2", "deepseek_v3"):
        mla = dict(
            kv_lora_rank=32, q_lora_rank=None if arch == "deepseek_v2" else 32, qk_nope_head_dim=16,
            qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1, moe_intermediate_size=32,
            intermediate_size=96, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, routed_scaling_factor=1.5,
        )
        common = dict(common, num_hidden_layers=max(num_layers, 2), num_key_value_heads=4)
        if arch == "deepseek_v2":
            return tf.DeepseekV2Config(**common, **mla, topk_method="group_limited_greedy")
        return tf.DeepseekV3Config(**common, **mla, norm_topk_prob=True)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def make_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, num_layers: int = 2,
                    tokenizer: bool = False, dtype: str = "float32"):
    """Write a random-weight `arch` model to `out_dir` with save_pretrained; returns the model.

    Router weights get a larger scale than the default init so that routing is decisive
    (near-ties between experts would make top-k choices flip under tiny numeric noise).
    """
    import torch
    import transformers as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers=num_layers)
    model = randomize_weights(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    if tokenizer:
        write_tiny_tokenizer(out, vocab_size=config.vocab_size)
    return model


def randomize_weights(model):
    """Fill a transformers model with test weights in place (see make_tiny_model); returns it."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 if name.endswith("gate.weight") else 0.08)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 256) -> None:
    """Train a byte-level BPE tokenizer of `vocab_size` on a few sentences; save tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [
        "hello world, this is a tiny mixture of experts model compiled by ktc.",
        "the quick brown fox jumps over the lazy dog.",
        "experts on the cpu, attention on the gpu, overlapped.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer=trainer)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
