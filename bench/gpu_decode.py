"""GPU benchmark of a --target cuda compile of the Qwen3-30B-A3B shape (random bf16 weights).

    python bench/gpu_decode.py [--layers 48] [--out DIR]       (on a machine with an H100/H200)

No 60 GB folder is written: the graph comes from a weights-free capture of the real
config.json (written here), transformers' own Qwen3-MoE model is built on the GPU with its
random init, and the compiled model runs on THE SAME tensors (its layout is transformers'
in-memory one: q/k/v/o, experts gate_up [E, 2I, H] and down [E, H, I]), so one copy of the
weights serves both and the same-run comparison fits on one 80 GB GPU.

Prints and writes (JSON) in order:
  1. correctness on a smaller shape (4 layers, real dims, one or more weight seeds): logits of prefill + decode steps of
     the compiled model vs transformers bf16, both vs transformers float32 on the same weights;
  2. decode tokens/s at batch 1 after a 1K-token prompt: ktc (CUDA graph) vs transformers eager
     vs transformers under torch.compile, same run, same weights, static caches;
  3. prefill tokens/s of a 2K prompt: ktc vs transformers eager;
  4. per-kernel achieved GB/s (decode shapes) and TFLOP/s (prefill shapes) vs measured ceilings;
  5. the w4a16 / fp8 linears and MoE beside the bf16 ones, and the sampler beside torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "decoder_sparse_step": 1,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}

DEV = torch.device("cuda")


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def compiled_graph(cfg: dict):
    """The lowered graph of a --target cuda compile (weights-free capture + the default passes)."""
    from ktc.capture import capture
    from ktc.passes.manager import PassContext, PassManager
    from ktc.passes.pipeline import DEFAULT_PIPELINE

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        graph = capture(d, weights_free=True)
    return PassManager(DEFAULT_PIPELINE).run(graph, PassContext(target="cuda", quant="none"))


def hf_model(cfg: dict, dtype=torch.bfloat16, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")},
                                     model_type=cfg["model_type"])
    with torch.device(DEV):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def shared_weights(graph, model) -> dict:
    """graph weight name -> the transformers parameter it is (same storage)."""
    sd = model.state_dict()
    out = {}
    for name, w in graph.weights.items():
        if "values" in w.source:
            out[name] = torch.tensor(w.source["values"], dtype=torch.float32, device=DEV)
            continue
        key = name + "_proj" if name.endswith((".experts.gate_up", ".experts.down")) else name
        t = sd[key]
        assert list(t.shape) == list(w.shape), (name, t.shape, w.shape)
        out[name] = t
    return out


def ktc_model(graph, weights):
    from ktc.codegen.gpu import SOURCE_DIR
    from ktc.runtime.gpu.kernels import load_kernels
    from ktc.runtime.gpu.model import GpuModel

    return GpuModel(graph, weights, load_kernels(SOURCE_DIR), max_batch_size=1, max_context=8192)


def cuda_time(fn, reps: int) -> float:
    """Seconds per call, events around `reps` back-to-back calls after one warm call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


# -- 1. correctness -------------------------------------------------------------------------
class Float32Gemms(torch.overrides.TorchFunctionMode):
    """Within it, a bf16 F.linear is a float32 GEMM of the same bf16 values, rounded to bf16: the model's
    rounding points unchanged, only the order in which each GEMM sums its products (float32 tensor cores
    off: torch's default) differs from cuBLAS's bf16 kernels."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and args[0].dtype == torch.bfloat16:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            y = x.float() @ w.float().T
            return (y if b is None else y + b.float()).to(torch.bfloat16)
        return func(*args, **kwargs)


def _logits_one_seed(cfg: dict, graph, seed: int, steps: int) -> dict:
    """One weight seed: ktc's logits at the prompt's last position and `steps` - 1 greedy decode steps
    against transformers bf16 (its default kernels and its other ones) and transformers float32, all on the
    same bf16 weights. Distances over the first 4 positions (the check's original span) and over all."""
    ref = hf_model(cfg, seed=seed)
    m = ktc_model(graph, shared_weights(graph, ref))
    g = torch.Generator().manual_seed(seed - 1)     # seed 1: the prompt the one-seed check used
    ids = torch.randint(0, cfg["vocab_size"], (1, 100), generator=g)
    spans = {"first4": slice(0, 4), "all": slice(0, steps)}

    def dist(a, b):
        return {k: rel(a[s], b[s]) for k, s in spans.items()}

    with torch.no_grad():
        ours = [m._prefill(ids, reserve=steps)]
        toks = [ours[-1].argmax(-1)]
        for _ in range(steps - 1):
            ours.append(m.step(toks[-1]).clone())
            toks.append(ours[-1].argmax(-1))
        ours_t = torch.cat(ours, 0).float()
        full = torch.cat((ids.to(DEV), torch.stack(toks[:-1], 1)), 1)
        positions = [ids.shape[1] - 1 + i for i in range(steps)]

        def hf_logits():
            """transformers' logits at the checked positions, with its kernels and settings as they are now."""
            return ref(full).logits[0, positions].float()

        hf_bf16 = hf_logits()
        # transformers bf16 against itself with its other attention / experts implementations: how far two
        # bf16 implementations of this model land apart on this test (random weights, 4 layers)
        default = (ref.config._attn_implementation, getattr(ref.config, "_experts_implementation", None))
        variants = {}
        for attn, experts in (("eager", default[1]), (default[0], "eager"), ("eager", "eager")):
            try:
                ref.set_attn_implementation(attn)
                if experts is not None:
                    ref.set_experts_implementation(experts)
                variants[f"{attn} attention, {experts} experts"] = dist(hf_logits(), hf_bf16)
            except (AttributeError, ValueError) as e:
                variants[f"{attn} attention, {experts} experts"] = f"unavailable: {e}"[:200]
        # the same rounding points, only the GEMMs' sums in another order: eager experts (every matmul an
        # F.linear), each bf16 F.linear once as cuBLAS's bf16 GEMM, once as a float32 GEMM rounded to bf16
        ref.set_attn_implementation(default[0])
        try:
            ref.set_experts_implementation("eager")
            eager_experts = hf_logits()
            with Float32Gemms():
                float32_sums = hf_logits()
            variants["eager experts, float32 GEMM sums vs bf16 GEMMs"] = dist(float32_sums, eager_experts)
        except (AttributeError, ValueError) as e:
            variants["eager experts, float32 GEMM sums vs bf16 GEMMs"] = f"unavailable: {e}"[:200]
        if default[1] is not None:
            ref.set_experts_implementation(default[1])
        # the default kernels again, cuBLAS told to reduce split-K partial sums in float32 (torch's default lets
        # it reduce them in bf16): a switch a user may flip, and another summation order
        flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = not flag
        try:
            variants[f"default kernels, allow_bf16_reduced_precision_reduction={not flag}"] = dist(hf_logits(),
                                                                                                  hf_bf16)
        finally:    # the variants and the float32 reference after it run with torch's own setting
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
        # the same rounding points, other summation orders in attention too: sdpa's other fused backends (the
        # same bf16 inputs and outputs, other tilings), alone and with the float32 GEMM sums above
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            name = backend.name.lower()
            try:
                with sdpa_kernel(backend):
                    variants[f"sdpa {name}, default experts"] = dist(hf_logits(), hf_bf16)
                    ref.set_experts_implementation("eager")
                    with Float32Gemms():
                        variants[f"sdpa {name}, eager experts, float32 GEMM sums"] = dist(hf_logits(), hf_bf16)
            except (AttributeError, ValueError, RuntimeError) as e:
                variants[f"sdpa {name}"] = f"unavailable: {e}"[:200]
            if default[1] is not None:
                ref.set_experts_implementation(default[1])
        hf_f32 = ref.float()(full).logits[0, positions]
    out = {"seed": seed, "ktc_vs_hf_bf16": dist(ours_t, hf_bf16), "ktc_vs_hf_fp32": dist(ours_t, hf_f32),
           "hf_bf16_vs_hf_fp32": dist(hf_bf16, hf_f32),
           "hf_bf16_default": f"{default[0]} attention, {default[1]} experts",
           "hf_bf16_variants_vs_hf_bf16": variants,
           "argmax_agree_bf16": float((ours_t.argmax(-1) == hf_bf16.argmax(-1)).float().mean()),
           "argmax_agree_fp32": float((ours_t.argmax(-1) == hf_f32.argmax(-1)).float().mean())}
    m = ref = None
    torch.cuda.empty_cache()
    return out


def check_logits(results: dict, seeds: list[int], steps: int) -> None:
    """Logits of a 4-layer, real-dims compile vs transformers, for each weight seed (seed 1 alone, 4
    positions, was the check until the eleventh session: one seed's distance swings 2x between seeds)."""
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=4)
    graph = compiled_graph(cfg)
    per_seed = []
    for seed in seeds:
        per_seed.append(_logits_one_seed(cfg, graph, seed, steps))
        log("correctness seed", seed, json.dumps(per_seed[-1]))
    # name -> that distance in every seed ({span: value} each; a variant unavailable in any seed is left out)
    series = {key: [s[key] for s in per_seed] for key in ("ktc_vs_hf_bf16", "ktc_vs_hf_fp32", "hf_bf16_vs_hf_fp32")}
    for name in per_seed[0]["hf_bf16_variants_vs_hf_bf16"]:
        series[name] = [s["hf_bf16_variants_vs_hf_bf16"][name] for s in per_seed]
    summary = {}
    for name, dists in series.items():
        if all(isinstance(d, dict) for d in dists):
            for span in ("first4", "all"):
                v = [d[span] for d in dists]
                summary[f"{name}_{span}"] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
    out = {"shape": "Qwen3-30B-A3B dims, 4 layers", "tokens": f"prefill 100 + {steps - 1} decode steps",
           "seeds": seeds, "summary": summary, "per_seed": per_seed}
    results["correctness"] = out
    log("correctness summary:", json.dumps(summary, indent=1))


# -- 2./3. end-to-end speed -------------------------------------------------------------------
def hf_decode_fns(model, cfg, ctx: int, steps: int):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ctx + steps + 16)
    ids = torch.randint(0, cfg["vocab_size"], (1, ctx), device=DEV)
    state = {}

    def prefill():
        cache.reset()
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ctx, device=DEV),
                    use_cache=True, logits_to_keep=1)
        state["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["pos"] = ctx

    def make_step(fwd):
        def step():
            pos = torch.tensor([state["pos"]], device=DEV)
            out = fwd(input_ids=state["tok"], past_key_values=cache, cache_position=pos, use_cache=True)
            state["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)
            state["pos"] += 1
        return step

    return prefill, make_step


def bench_e2e(results: dict, layers: int, ctx: int, steps: int, prefill_len: int, do_compile: bool) -> None:
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    t = time.perf_counter()
    graph = compiled_graph(cfg)
    model = hf_model(cfg, seed=2)
    m = ktc_model(graph, shared_weights(graph, model))
    log(f"built {layers}-layer model in {time.perf_counter() - t:.0f}s; GPU memory "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    e2e = {"layers": layers, "context": ctx}
    results[f"e2e_{layers}"] = e2e
    save = results["_save"]
    prompt = torch.randint(0, cfg["vocab_size"], (1, ctx))

    # ktc decode: prefill the 1K prompt, then CUDA-graph steps
    with torch.no_grad():
        logits = m._prefill(prompt, reserve=steps * 3 + 8)
        tok = logits.argmax(-1)
        state = {"tok": tok}

        def ktc_step():
            state["tok"] = m.step(state["tok"]).argmax(-1)

        ktc_step()
        ktc_step()     # captured now
        e2e["ktc_decode_ms"] = cuda_time(ktc_step, steps) * 1e3
        log(f"ktc decode: {e2e['ktc_decode_ms']:.2f} ms/token ({1e3 / e2e['ktc_decode_ms']:.0f} tok/s)")
        save()

        pl = torch.randint(0, cfg["vocab_size"], (1, prefill_len))
        e2e["ktc_prefill_s"] = cuda_time(lambda: m._prefill(pl, reserve=1), 3)
        log(f"ktc prefill {prefill_len}: {e2e['ktc_prefill_s'] * 1e3:.1f} ms "
            f"({prefill_len / e2e['ktc_prefill_s']:.0f} tok/s)")
    m.reset()

    with torch.no_grad():
        prefill, make_step = hf_decode_fns(model, cfg, ctx, steps * 2 + 8)
        prefill()
        e2e["hf_eager_decode_ms"] = cuda_time(make_step(model), max(5, steps // 5)) * 1e3
        log(f"transformers eager decode: {e2e['hf_eager_decode_ms']:.1f} ms/token")
        ids = torch.randint(0, cfg["vocab_size"], (1, prefill_len), device=DEV)
        e2e["hf_eager_prefill_s"] = cuda_time(
            lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 2)
        log(f"transformers eager prefill {prefill_len}: {e2e['hf_eager_prefill_s'] * 1e3:.1f} ms")
        save()
        if do_compile:
            try:
                t = time.perf_counter()
                compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
                prefill()
                step = make_step(compiled)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                e2e["compile_seconds"] = time.perf_counter() - t
                e2e["hf_compile_decode_ms"] = cuda_time(step, steps) * 1e3
                log(f"transformers torch.compile decode: {e2e['hf_compile_decode_ms']:.2f} ms/token "
                    f"(compiled in {e2e['compile_seconds']:.0f}s)")
            except Exception as e:  # report, keep the other numbers
                e2e["hf_compile_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                log("torch.compile failed:", e2e["hf_compile_error"])
    m = model = None
    torch.cuda.empty_cache()


# -- 4. kernels -------------------------------------------------------------------------------
def graph_ms(fns, rep: int = 100) -> float:
    """Median ms of one call when `fns` (different inputs each) are replayed back to back in a CUDA graph:
    what a decode step inside ktc's graph pays (no Python launch cost). rep: do_bench's, in ms."""
    from triton.testing import do_bench

    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return do_bench(g.replay, warmup=25, rep=rep, return_mode="median") / len(fns)


def _row_adder(rows: list, width: int):
    """add(name, ms, nbytes=0, flops=0): a kernel row (us, GB/s, TFLOP/s) appended to `rows` and logged."""
    def add(name, ms, nbytes=0, flops=0, err=None):
        rows.append({"kernel": name, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6 if nbytes else None,
                     "TFLOP/s": flops / ms / 1e9 if flops else None, "rel_err": err})
        log(f"  {name:{width}s} {ms * 1e3:8.1f} us" + (f" {nbytes / ms / 1e6:7.0f} GB/s" if nbytes else "")
            + (f" {flops / ms / 1e9:6.0f} TFLOP/s" if flops else "") + (f"  err {err:.2e}" if err is not None else ""))
    return add


def _bench(fn) -> float:
    """Median ms of fn (triton's do_bench: 25 ms warm-up, 100 ms of calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_kernels(results: dict) -> None:
    import triton

    from ktc.codegen.gpu import attention, matmul, moe

    h, inter, e, k, v = 2048, 768, 128, 8, 151936
    rows = []
    bf = torch.bfloat16
    add = _row_adder(rows, 44)
    bench = _bench

    # ceilings
    a = torch.empty(2 * 2**30 // 2, dtype=bf, device=DEV).normal_()
    b = torch.empty_like(a)
    add("ceiling: device copy 2 GiB (read+write)", bench(lambda: b.copy_(a)), nbytes=2 * a.numel() * 2)
    a = b = None
    x = torch.randn(8192, 8192, dtype=bf, device=DEV)
    add("ceiling: torch bf16 matmul 8192^3", bench(lambda: x @ x), flops=2 * 8192**3)
    x = None

    for m_rows, n, kk, what in ((1, 5120, h, "qkv"), (1, h, 4096, "o"), (1, v, h, "lm_head"),
                                (2048, 5120, h, "qkv"), (2048, h, 4096, "o")):
        ws = [torch.randn(n, kk, dtype=bf, device=DEV) * 0.02 for _ in range(4 if m_rows == 1 else 1)]
        xx = torch.randn(m_rows, kk, dtype=bf, device=DEV)
        it = iter(range(10**9))
        ms = bench(lambda xx=xx, ws=ws, it=it: matmul.linear(xx, ws[next(it) % len(ws)]))
        add(f"matmul.linear {what} M={m_rows} N={n} K={kk}", ms, nbytes=n * kk * 2 if m_rows == 1 else 0,
            flops=2 * m_rows * n * kk if m_rows > 1 else 0)

    from ktc.codegen.gpu import router

    gate = torch.randn(e, h, dtype=bf, device=DEV) * 0.02
    rattrs = {"scoring": "softmax", "topk_method": "greedy", "top_k": k, "norm_topk_prob": True}
    xs = [torch.randn(1, h, dtype=bf, device=DEV) for _ in range(32)]
    ms = graph_ms([lambda x=x: router.router_topk(matmul.linear(x, gate, out_dtype=torch.float32), rattrs)
                      for x in xs])
    add("router logits GEMM + top-k (2 launches) T=1, in graph", ms, nbytes=e * h * 2)
    ms = graph_ms([lambda x=x: router.router_fused(x, gate, rattrs) for x in xs])
    add("router.router_fused (1 launch) T=1, in graph", ms, nbytes=e * h * 2)

    w_up = torch.randn(e, 2 * inter, h, dtype=bf, device=DEV) * 0.02
    w_dn = torch.randn(e, h, inter, dtype=bf, device=DEV) * 0.02
    dense = {"gate_up": w_up, "down": w_dn}
    sets = [(torch.randn(1, h, dtype=bf, device=DEV), torch.rand(1, k, device=DEV),
             torch.randperm(e, device=DEV)[:k].to(torch.int32)[None]) for _ in range(16)]
    nb = k * 3 * inter * h * 2
    gemv_default = moe.GEMV_TOKENS
    for label, gemv, cfg in (("align+up+down+sum, 4 launches (before)", 0, None),
                             ("GEMV up + GEMV down with sum, 2 launches (default)", gemv_default, None),
                             ("mixed: tensor-core up + GEMV down", gemv_default, {"DECODE": "mixed"}),
                             ("dot: tensor-core up + down_sum K=256", gemv_default,
                              {"DECODE": "dot", "DOWN_SUM_K": 256, "down_sum_stages": 3}),
                             ("GEMV N_DOWN=4 K_DOWN=512", gemv_default, {"GEMV_N_DOWN": 4, "GEMV_K_DOWN": 512}),
                             ("GEMV N_UP=32", gemv_default, {"GEMV_N_UP": 32})):
        moe.GEMV_TOKENS = gemv
        full = None if cfg is None else {**moe.default_config(k, h, inter), **cfg}
        ms = graph_ms([lambda xx=xx, tw=tw, ids=ids, full=full: moe.fused_moe(xx, tw, ids, dense, e, inter, full)
                          for xx, tw, ids in sets])
        add(f"moe.fused_moe T=1 {label}, in graph", ms, nbytes=nb)
    moe.GEMV_TOKENS = gemv_default

    t = 2048
    xx = torch.randn(t, h, dtype=bf, device=DEV)
    ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)]).to(torch.int32)
    tw = torch.rand(t, k, device=DEV)
    base = moe.default_config(t * k, h, inter)
    sweep = [dict(BLOCK_M=64, BLOCK_N_UP=64, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=4, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N_UP=64, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N_UP=64, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N_UP=128, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N_UP=64, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=4, num_stages=4),
             dict(BLOCK_M=128, BLOCK_N_UP=128, BLOCK_N_DOWN=128, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N_UP=64, BLOCK_N_DOWN=64, BLOCK_K=128, num_warps=4, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N_UP=64, BLOCK_N_DOWN=256, BLOCK_K=64, num_warps=8, num_stages=3)]
    inter_act = torch.randn(t * k, inter, dtype=bf, device=DEV)
    out = torch.empty(t * k, h, dtype=bf, device=DEV)
    twf = tw.reshape(-1)
    for cfg in (base, sweep[2]):
        align = moe.moe_align(ids, e, cfg["BLOCK_M"])
        add(f"moe gate_up pass alone T=2048 BM={cfg['BLOCK_M']}", bench(lambda cfg=cfg, align=align: moe._gemm(
            xx, w_up, None, inter_act, align, twf, inter, h, k, True, False, cfg["BLOCK_N_UP"], cfg)),
            flops=2 * t * k * 2 * inter * h)
        add(f"moe down pass alone T=2048 BM={cfg['BLOCK_M']}", bench(lambda cfg=cfg, align=align: moe._gemm(
            inter_act, w_dn, None, out, align, twf, h, inter, 1, False, True, cfg["BLOCK_N_DOWN"], cfg)),
            flops=2 * t * k * inter * h)
        add(f"moe_align alone T=2048 BM={cfg['BLOCK_M']}", bench(lambda cfg=cfg: moe.moe_align(ids, e, cfg["BLOCK_M"])))
    slots, bm = t * k, base["BLOCK_M"]
    chunk = max(256, triton.next_power_of_2(triton.cdiv(slots, 128)))
    chunks, blocks = triton.cdiv(slots, chunk), moe.max_blocks(slots, e, bm)
    counts = torch.empty(chunks, e, dtype=torch.int32, device=DEV)
    offsets, flat = torch.empty_like(counts), ids.reshape(-1)
    srt, bexp, tot = (torch.empty(blocks * bm, dtype=torch.int32, device=DEV),
                      torch.empty(blocks, dtype=torch.int32, device=DEV), torch.empty(1, dtype=torch.int32, device=DEV))
    add("  moe_count_kernel", graph_ms([lambda: moe.moe_count_kernel[(chunks,)](
        flat, counts, slots, BLOCK_E=e, CHUNK=chunk, SUB=64, num_warps=4)] * 8))
    add("  moe_offsets_kernel", graph_ms([lambda: moe.moe_offsets_kernel[(1,)](
        counts, offsets, srt, bexp, tot, slots, chunks, blocks * bm, blocks, NUM_EXPERTS=e, BLOCK_M=bm, BLOCK_E=e,
        BLOCK_P=triton.next_power_of_2(chunks), CHUNK=64, FILL=1024, num_warps=8)] * 8))
    add("  moe_scatter_kernel", graph_ms([lambda: moe.moe_scatter_kernel[(chunks,)](
        flat, offsets, srt, slots, BLOCK_E=e, CHUNK=chunk, SUB=64, num_warps=4)] * 8))
    for cfg in [base] + [c for c in sweep if c != {kk: base[kk] for kk in c}]:
        try:
            ms = bench(lambda cfg=cfg: moe.fused_moe(xx, tw, ids, dense, e, inter, cfg))
        except Exception as ex:  # a config that does not fit (shared memory) is skipped
            log(f"  moe sweep {cfg}: {type(ex).__name__}")
            continue
        add("moe.fused_moe T=2048 " + ("default " if cfg is base else "")
            + " ".join(f"{kk.replace('BLOCK_', '')}={v}" for kk, v in cfg.items()), ms, flops=2 * t * k * 3 * inter * h)
    for t in (1, 2048):
        xx = torch.randn(t, h, dtype=bf, device=DEV)
        ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)]).to(torch.int32)
        tw = torch.rand(t, k, device=DEV)
        ms = bench(lambda xx=xx, tw=tw, ids=ids, dense=dense: moe.fused_moe(xx, tw, ids, dense, e, inter))
        active = len(torch.unique(ids))
        add(f"moe.fused_moe T={t} (default path)", ms, nbytes=active * 3 * inter * h * 2 if t == 1 else 0,
            flops=2 * t * k * 3 * inter * h if t > 1 else 0)
    packed = {f"{r}.{p}": tt for r, w in (("gate_up", w_up), ("down", w_dn))
              for p, tt in moe.pack_w4a16(w, 128).items()}
    w_up = w_dn = dense = None
    xx = torch.randn(1, h, dtype=bf, device=DEV)
    ids = torch.randperm(e, device=DEV)[:k].to(torch.int32)[None]
    tw = torch.rand(1, k, device=DEV)
    ms = bench(lambda: moe.fused_moe(xx, tw, ids, packed, e, inter))
    add("moe.fused_moe w4a16 T=1", ms, nbytes=k * 3 * inter * h * (0.5 + 4 / 128))

    for ctx_len in (1024, 8192):
        kc = torch.randn(1, 4, ctx_len + 64, 128, dtype=bf, device=DEV)
        vc = torch.randn_like(kc)
        q = torch.randn(1, 32, 128, dtype=bf, device=DEV)
        pos = torch.tensor([ctx_len - 1], device=DEV)
        ms = bench(lambda q=q, kc=kc, vc=vc, pos=pos: attention.attention_decode(q, kc, vc, pos, 0.088))
        add(f"attention.decode ctx={ctx_len}", ms, nbytes=2 * 4 * ctx_len * 128 * 2)
    s = 2048
    q = torch.randn(s, 32, 128, dtype=bf, device=DEV)
    kc = torch.randn(1, 4, s, 128, dtype=bf, device=DEV)
    vc = torch.randn_like(kc)
    ms = bench(lambda: attention.attention_prefill(q, kc, vc, 1, s, 0, 0.088))
    add("attention.prefill S=2048 causal", ms, flops=4 * s * s * 128 * 32 / 2)
    results["kernels"] = rows



# w8a8 tiles beside the defaults (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); a first H100 sweep found 128 x 128
# tiles with 8 warps 1.4x slower than 64 x 128 with 4, and 128-row MoE blocks 2.7-3.2x slower than 64
W8A8_LINEAR_SWEEP = ((128, 128, 128, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 3), (64, 128, 128, 4, 5),
                     (64, 256, 128, 4, 3), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4))
W8A8_MOE_SWEEP = ((64, 64, 128, 4, 4), (64, 128, 256, 8, 3), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4),
                  (64, 32, 128, 4, 4))


def bench_quant_kernels(results: dict) -> None:
    """The quantized linears (w4a16 g128, fp8 g128) and MoE beside the bf16 ones at the same shapes (fp8
    prefill: w8a8, the default there, and weight-only), prefill rows with their error against float32 on
    the unquantized weights, and the sampler beside torch's: decode shapes in a CUDA graph (graph_ms) over
    enough weight copies that nothing is served from L2, prefill shapes with do_bench."""

    from ktc.codegen.gpu import matmul, moe, sampling

    rows = []
    bf = torch.bfloat16
    add = _row_adder(rows, 52)
    bench = _bench

    group = 128
    formats = {"bf16": lambda w: {"w": w.to(bf)}, "w4a16": lambda w: moe.pack_w4a16(w, group),
               "fp8": lambda w: moe.pack_fp8(w, group)}

    def run_linear(fmt, x, p, cfg=None):
        if fmt == "bf16":
            return matmul.linear(x, p["w"], config=cfg)
        fn = matmul.linear_w4a16 if fmt == "w4a16" else matmul.linear_fp8
        return fn(x, p["qweight"], p["scales"], config=cfg)

    for n, kk, what in ((5120, 2048, "qkv"), (2048, 4096, "o")):
        base = torch.randn(n, kk, device=DEV) * 0.02
        for fmt, pack in formats.items():
            p = pack(base)
            nbytes = sum(t.numel() * t.element_size() for t in p.values())
            copies = [p] + [{k: t.clone() for k, t in p.items()} for _ in range(-(-(160 << 20) // nbytes) - 1)]
            x1 = torch.randn(1, kk, dtype=bf, device=DEV)
            ms = graph_ms([lambda p=p, fmt=fmt, x1=x1: run_linear(fmt, x1, p) for p in copies])
            add(f"linear {fmt} {what} M=1 N={n} K={kk}, in graph", ms, nbytes=nbytes)
            if fmt != "bf16":     # the tensor-core tiles (the M=1 default before the GEMV kernels), and a GEMV sweep
                tiles = (matmul.default_config_w4a16 if fmt == "w4a16" else matmul.default_config_fp8)(4, n, kk)
                for cfg in [tiles, *matmul._gemv_candidates(1, kk, 1)]:
                    ms = graph_ms([lambda p=p, fmt=fmt, x1=x1, cfg=cfg: run_linear(fmt, x1, p, cfg) for p in copies])
                    add(f"  {fmt} {what} M=1 " + " ".join(f"{a}={b}" for a, b in cfg.items()), ms, nbytes=nbytes)
            x = torch.randn(2048, kk, dtype=bf, device=DEV)
            exact = x.float() @ base.T
            # fp8 prefill: w8a8 by default (A8), weight-only beside it; error vs float32 on the unquantized weight
            for label, cfg in ((fmt + (" w8a8" if fmt == "fp8" else ""), None),
                               *((("fp8 w8a16 (A8 off)", {**matmul.default_config_fp8(2048, n, kk), "A8": False}),)
                                 if fmt == "fp8" else ())):
                err = rel(run_linear(fmt, x, p, cfg), exact)
                add(f"linear {label} {what} M=2048 N={n} K={kk}",
                    bench(lambda p=p, x=x, fmt=fmt, cfg=cfg: run_linear(fmt, x, p, cfg)), flops=2 * 2048 * n * kk,
                    err=err)
            if fmt == "fp8":      # w8a8 tiles (the `ktc tune` candidates' kind of sweep)
                for bm, bn, bk, warps, stages in W8A8_LINEAR_SWEEP:
                    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps,
                           "num_stages": stages, "A8": True}
                    add(f"  fp8 w8a8 {what} M=2048 " + " ".join(f"{a}={b}" for a, b in cfg.items() if a != "A8"),
                        bench(lambda p=p, x=x, cfg=cfg: run_linear("fp8", x, p, cfg)), flops=2 * 2048 * n * kk)
            copies = p = None
        base = None

    h, inter, e, k = 2048, 768, 128, 8
    up = torch.randn(e, 2 * inter, h, device=DEV, dtype=bf) * 0.02
    dn = torch.randn(e, h, inter, device=DEV, dtype=bf) * 0.02
    for fmt in formats:
        if fmt == "bf16":
            w = {"gate_up": up, "down": dn}
        else:
            pk = moe.pack_w4a16 if fmt == "w4a16" else moe.pack_fp8
            w = {f"{r}.{q}": t for r, t0 in (("gate_up", up), ("down", dn)) for q, t in pk(t0, group).items()}
        per_expert = sum(t.numel() * t.element_size() for t in w.values()) / e
        sets = [(torch.randn(1, h, dtype=bf, device=DEV), torch.rand(1, k, device=DEV),
                 torch.randperm(e, device=DEV)[:k].to(torch.int32)[None]) for _ in range(16)]
        ms = graph_ms([lambda xx=xx, tw=tw, ids=ids, w=w: moe.fused_moe(xx, tw, ids, w, e, inter)
                       for xx, tw, ids in sets])
        add(f"moe.fused_moe {fmt} T=1 (8 experts), in graph", ms, nbytes=k * per_expert)
        if fmt != "bf16":     # the grouped GEMM (the decode path before the GEMV pair), and the GEMV pair's sweep
            cands = moe.candidate_configs(1, k, e, h, inter, group)
            grouped = next(c for c in cands if c["DECODE"] == "grouped")
            for cfg in [grouped, *(c for c in cands if c["DECODE"] == "gemv")]:
                ms = graph_ms([lambda xx=xx, tw=tw, ids=ids, w=w, cfg=cfg: moe.fused_moe(xx, tw, ids, w, e, inter,
                                                                                         cfg)
                               for xx, tw, ids in sets])
                keys = ("DECODE", "GEMV_N_UP", "GEMV_K_UP", "GEMV_N_DOWN", "GEMV_K_DOWN", "gemv_warps")
                add(f"  {fmt} T=1 " + " ".join(f"{a}={cfg[a]}" for a in keys), ms, nbytes=k * per_expert)
        for t in (512, 2048):
            xx = torch.randn(t, h, dtype=bf, device=DEV)
            ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)]).to(torch.int32)
            tw = torch.rand(t, k, device=DEV)
            exact = moe.fused_moe(xx.float(), tw, ids, {"gate_up": up.float(), "down": dn.float()}, e, inter)
            for label, cfg in ((fmt + (" w8a8" if fmt == "fp8" else ""), None),
                               *((("fp8 w8a16 (A8 off)", {**moe.default_config(t * k, h, inter, group), "A8": False}),)
                                 if fmt == "fp8" else ())):
                err = rel(moe.fused_moe(xx, tw, ids, w, e, inter, cfg), exact)
                ms = bench(lambda w=w, xx=xx, tw=tw, ids=ids, cfg=cfg: moe.fused_moe(xx, tw, ids, w, e, inter, cfg))
                add(f"moe.fused_moe {label} T={t}", ms, flops=2 * t * k * 3 * inter * h, err=err)
            if fmt == "fp8" and t == 2048:
                for bm, bn_up, bn_down, warps, stages in W8A8_MOE_SWEEP:
                    cfg = {**moe.default_config(t * k, h, inter, group), "BLOCK_M": bm, "BLOCK_N_UP": bn_up,
                           "BLOCK_N_DOWN": bn_down, "num_warps": warps, "num_stages": stages, "A8": True}
                    ms = bench(lambda w=w, xx=xx, tw=tw, ids=ids, cfg=cfg: moe.fused_moe(xx, tw, ids, w, e, inter,
                                                                                         cfg))
                    add(f"  fp8 w8a8 T={t} BLOCK_M={bm} N_UP={bn_up} N_DOWN={bn_down} warps={warps} "
                        f"stages={stages}", ms, flops=2 * t * k * 3 * inter * h)
        w = None
    up = dn = None

    vocab = 151936

    def torch_sample(logits, temperature, top_k, top_p):
        """transformers' order: temperature, top-k, top-p (sorted cumulative), softmax, multinomial."""
        x = logits / temperature
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
        srt, idx = torch.sort(x, descending=False, dim=-1)
        drop = srt.softmax(-1).cumsum(-1) <= (1 - top_p)
        x = x.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
        return torch.multinomial(x.softmax(-1), 1)

    for b in (1, 8):
        logits = [torch.randn(b, vocab, device=DEV) * 3 for _ in range(8)]
        nbytes = b * vocab * 4
        add(f"sampling.argmax B={b}, in graph", graph_ms([lambda x=x: sampling.argmax(x) for x in logits]),
            nbytes=nbytes)
        add(f"torch.argmax B={b}, in graph", graph_ms([lambda x=x: torch.argmax(x, -1) for x in logits]),
            nbytes=nbytes)
        add(f"sampling.sample T=0.7 top-k 50 top-p 0.9 B={b}, in graph",
            graph_ms([lambda x=x, i=i: sampling.sample(x, 0.7, 50, 0.9, seed=1, step=i)
                      for i, x in enumerate(logits)]), nbytes=nbytes)
        add(f"sampling.sample T=0.7 (no top-k / top-p) B={b}, in graph",
            graph_ms([lambda x=x, i=i: sampling.sample(x, 0.7, seed=1, step=i) for i, x in enumerate(logits)]),
            nbytes=nbytes)
        add(f"sampling.sample T=0.7 top-k 50 top-p 0.9 B={b}, eager",
            bench(lambda x=logits[0]: sampling.sample(x, 0.7, 50, 0.9, seed=1)), nbytes=nbytes)
        add(f"torch (transformers' processors) top-k 50 top-p 0.9 B={b}, eager",
            bench(lambda x=logits[0]: torch_sample(x, 0.7, 50, 0.9)), nbytes=nbytes)
    results["quant_kernels"] = rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--logit-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6],
                   help="weight seeds of the logits check")
    p.add_argument("--logit-steps", type=int, default=16,
                   help="positions checked: the prompt's last + decode steps")
    p.add_argument("--skip", default="", help="comma list of: correctness, e2e, kernels, quant")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    import transformers
    import triton

    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
               "command": " ".join(sys.argv)}
    log(json.dumps(results))
    skip = set(args.skip.split(","))
    out = Path(args.out) / "gpu_decode.json"
    results["_save"] = lambda: out.write_text(json.dumps({k: v for k, v in results.items() if k != "_save"},
                                                         indent=1))
    for name, fn in (("correctness", lambda: check_logits(results, args.logit_seeds, args.logit_steps)),
                     ("kernels", lambda: bench_kernels(results)),
                     ("quant", lambda: bench_quant_kernels(results)),
                     ("e2e", lambda: bench_e2e(results, args.layers, args.context, args.steps, args.prefill,
                                               not args.no_compile))):
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:
            import traceback

            traceback.print_exc()
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"[:1000]
        log(f"[{name} took {time.perf_counter() - t:.0f}s]")
        results["_save"]()
    e2e = results.get(f"e2e_{args.layers}", {})
    if "ktc_decode_ms" in e2e:
        log("\nSUMMARY")
        log(f"decode tok/s: ktc {1e3 / e2e['ktc_decode_ms']:.1f}, eager {1e3 / e2e['hf_eager_decode_ms']:.1f}"
            + (f", torch.compile {1e3 / e2e['hf_compile_decode_ms']:.1f}" if "hf_compile_decode_ms" in e2e else ""))
        log(f"prefill {args.prefill} tok/s: ktc {args.prefill / e2e['ktc_prefill_s']:.0f}, "
            f"eager {args.prefill / e2e['hf_eager_prefill_s']:.0f}")


if __name__ == "__main__":
    main()
