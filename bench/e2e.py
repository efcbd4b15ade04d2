"""End-to-end decoding speed at real model shapes: vanilla decode vs the weight + KV streaming bound, the
Medusa verify step's cost relative to a vanilla step for T tree nodes, and transformers' generate.

    python bench/e2e.py                         # Llama-2-7B shapes, bf16, on the GPU
    python bench/e2e.py --hf                    # + transformers' PyTorch generate (run in its own process)
    python bench/e2e.py --api                   # + the verify step through jaxmedusa.generate()
    python bench/e2e.py --smoke                 # tiny shapes, any backend (checks the script itself)

Weights are random (no hub is reachable) at the real shapes; speed does not depend on their values. The
KV cache is filled with random values up to each prompt length instead of running a prefill, so every
(batch, prompt) pair reuses one compiled loop per batch: the attention kernels split over the *live*
length, so the capacity does not cost time. Vanilla: `decode_loop` (the same jitted while-loop generate
uses) over N steps. Medusa: `medusa_loop` over N steps with random heads, so nothing is accepted and
every step verifies the whole tree; its time per step / vanilla's is the verify-step ratio the
speedup simulation (bench/speedup_sim.py) needs. Prints tables and writes
bench/results/e2e-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                 rms_norm_eps=1e-5)
LLAMA2_13B = dict(LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40)
OPT_6_7B = dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272, hidden_size=4096,
                ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                word_embed_proj_dim=4096, do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
SMOKE = dict(LLAMA2_7B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4)
QWEN2_5_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                  intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=False)
CHATGLM2_6B = dict(architectures=["ChatGLMModel"], model_type="chatglm", num_layers=28, padded_vocab_size=65024,
                   hidden_size=4096, ffn_hidden_size=13696, kv_channels=128, num_attention_heads=32,
                   multi_query_attention=True, multi_query_group_num=2, seq_length=32768, layernorm_epsilon=1e-5,
                   add_qkv_bias=True, add_bias_linear=False, tie_word_embeddings=False)
VICUNA_33B = dict(LLAMA2_7B, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                  num_key_value_heads=52, rms_norm_eps=1e-6)  # LLaMA-33B / Vicuna-33B v1.3 shapes
MODELS = {"llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B, "vicuna-33b": VICUNA_33B, "opt-6.7b": OPT_6_7B, "qwen2.5-7b": QWEN2_5_7B,
          "qwen3-8b": QWEN3_8B, "chatglm2-6b": CHATGLM2_6B, "smoke": SMOKE}


def hf_config_dict(name: str) -> dict:
    """MODELS[name] as transformers reads it: the THUDM ChatGLM layout as its transformers twin (GlmForCausalLM)."""
    d = dict(MODELS[name])
    if d.get("model_type") == "chatglm":
        import dataclasses

        from jaxmedusa.models import ModelConfig

        d = dataclasses.replace(ModelConfig.from_hf_dict(d), architecture="GlmForCausalLM").to_hf_dict()
    return d


def tree_of_size(t: int) -> list[list[int]]:
    """A prefix-closed tree of t nodes (root included): the first t - 1 paths, in (depth, path) order, of
    the cartesian tree of top-(10, 5, 3, 2) ranks, so wide near the root like the published trees."""
    import jaxmedusa

    paths = sorted(jaxmedusa.cartesian_tree([10, 5, 3, 2]), key=lambda p: (len(p), p))
    return paths[:t - 1]


def copy_bandwidth(n_bytes: int = 4 << 30) -> float:
    """Bytes moved per second (read + write) by a device copy of a large array: the streaming ceiling."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * n_bytes / best


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxmedusa.models import ModelConfig, create_lm
    from jaxmedusa.cache import KVCache
    from jaxmedusa.compile_cache import call_compiled
    from jaxmedusa.generate import decode_loop
    from jaxmedusa.heads import MedusaHeads
    from jaxmedusa.kernels.dispatch import loop_compiler_options
    from jaxmedusa.medusa import AcceptanceParams, medusa_loop
    from jaxmedusa.tree import build_tree

    cfg = ModelConfig.from_hf_dict(MODELS[args.model])
    dtype = jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    lm = create_lm(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    heads = MedusaHeads.for_model(lm, 4, 1, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(lm)
    heads_graphdef, heads_state = nnx.split(heads)
    jax.block_until_ready(state)
    print(f"init {time.perf_counter() - t0:.1f}s", flush=True)
    # the embedding tables are gathered, not streamed (a tied one is streamed once, as the LM head)
    gathered = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.embed_dim
    if cfg.family == "opt":
        gathered += (cfg.max_position_embeddings + 2) * cfg.hidden_size
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) - gathered * dtype.itemsize
    bw = copy_bandwidth() if not args.smoke else 1e11
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    n = args.steps
    t_max = max(args.tree_sizes)
    max_len = max(args.prompts) + n * (1 + 4) + t_max + 16
    kv_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize  # bytes of K+V per token
    rows, ratios = [], []
    key = jax.random.key(0)
    eos = jnp.asarray([-1], jnp.int32)
    for b in args.batch:
        block = jax.random.normal(key, (cfg.num_layers, 1, 256, cfg.num_kv_heads, cfg.head_dim), dtype)
        shape = (cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim)
        reps = (1, b, -(-max_len // 256), 1, 1)
        # one jitted fill: the tiled array and its slice never exist eagerly side by side (B=8 at 8k OOMed)
        k, v = jax.jit(lambda blk: (jnp.tile(blk, reps)[:, :, :max_len], jnp.tile(blk * 0.5, reps)[:, :, :max_len]))(block)
        del block
        assert k.shape == shape
        hidden = jax.random.normal(key, (b, cfg.embed_dim), dtype)
        cache = KVCache(k, v, jnp.zeros((b,), jnp.int32))
        del k, v

        # the loop's scalar arguments made once: jnp.float32(x) runs a kernel and waits for it (~0.5 ms on the
        # H200's host), which the timed calls below would otherwise pay, as generate() no longer does
        one = jax.device_put(np.float32(1.0))
        params = AcceptanceParams(one, one, *jax.device_put((np.float32(0.09), np.float32(0.3))))

        def vanilla(cache, p):
            cache = cache._replace(lengths=jax.device_put(np.full((b,), p, np.int32)))  # async, unlike jnp.full
            args_ = (state, cache, hidden, key, eos, one, one)
            static = dict(graphdef=graphdef, max_new_tokens=n, greedy=True, use_top_p=False, attn_impl=None)
            options = loop_compiler_options(tree=False)
            (out, counts, steps, cache), c = call_compiled(decode_loop, args_, static, options)
            jax.block_until_ready(out)
            return cache, c, int(steps)

        def medusa(cache, p, tree):
            cache = cache._replace(lengths=jax.device_put(np.full((b,), p, np.int32)))
            args_ = (state, heads_state, cache, hidden, key, eos, params)
            static = dict(graphdef=graphdef, heads_graphdef=heads_graphdef, tree=tree, max_new_tokens=n,
                          acceptance="greedy", use_top_p=False, attn_impl=None)
            options = loop_compiler_options(tree=True, rows=b * tree.size)  # as generate() compiles it
            (out, counts, st, cache), c = call_compiled(medusa_loop, args_, static, options)
            jax.block_until_ready(out)
            return cache, c, int(st.steps)

        def timed(fn, cache, *a):
            cache, compile_s, _ = fn(cache, *a)  # warm-up (and compile)
            best, steps = float("inf"), 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                cache, _, steps = fn(cache, *a)
                best = min(best, time.perf_counter() - t0)
            return cache, best / steps, compile_s

        for p in args.prompts:
            cache, step_s, compile_s = timed(vanilla, cache, p)
            kv = kv_row * b * (p + n / 2)  # the cache read per step, averaged over the run
            bound_s = (param_bytes + kv) / bw
            row = dict(batch=b, prompt=p, step_ms=step_s * 1e3, tokens_per_s=b / step_s,
                       bound_tokens_per_s=b / bound_s, fraction_of_bound=bound_s / step_s, compile_s=compile_s)
            rows.append(row)
            print(f"vanilla B={b} P={p}: {row['step_ms']:.2f} ms/step, {row['tokens_per_s']:.1f} tok/s, "
                  f"{100 * row['fraction_of_bound']:.0f}% of the {row['bound_tokens_per_s']:.1f} tok/s bound "
                  f"(compile {compile_s:.1f}s)", flush=True)
        if b not in args.tree_batch:
            continue
        vanilla_ms = {r["prompt"]: r["step_ms"] for r in rows if r["batch"] == b}
        for t in args.tree_sizes:
            tree = build_tree(tree_of_size(t), num_heads=4)
            for p in args.tree_prompts:
                cache, step_s, compile_s = timed(medusa, cache, p, tree)
                r = dict(batch=b, prompt=p, tree_nodes=t, step_ms=step_s * 1e3,
                         ratio=step_s * 1e3 / vanilla_ms[p] if p in vanilla_ms else None, compile_s=compile_s)
                ratios.append(r)
                print(f"medusa B={b} P={p} T={t}: {r['step_ms']:.2f} ms/step, "
                      f"{r['ratio'] if r['ratio'] is None else round(r['ratio'], 3)}x vanilla (compile {compile_s:.1f}s)",
                      flush=True)
        del cache
    return dict(copy_bandwidth=bw, param_bytes=param_bytes, vanilla=rows, verify=ratios)


def run_api(args) -> list[dict]:
    """Through the public API: jaxmedusa.generate() on a Model with random heads, second call of each
    configuration; a step is the call's decode_seconds / steps, so it carries the call's fixed costs (the heads
    on the prompt's last state, the copy to the host) spread over the steps taken, which are fewer when random
    heads on a random model get tokens accepted. Prompt tokens are random; generate() times the prefill apart.
    Each configuration also runs with 4x the new tokens: the two calls' difference gives the cost of a step
    inside a call (slope_ms) and what a call costs beyond its steps (fixed_ms), which the per-step time mixes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxmedusa
    from jaxmedusa.heads import MedusaHeads
    from jaxmedusa.models import ModelConfig, create_lm

    cfg = ModelConfig.from_hf_dict(MODELS[args.model])
    lm = create_lm(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
    n = args.steps
    model = jaxmedusa.Model(lm, max_len=max(args.tree_prompts) + 4 * n + max(args.tree_sizes) + 64,
                            heads=MedusaHeads.for_model(lm, 4, 1, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    rows = []
    for b in args.tree_batch:
        for p in args.tree_prompts:
            prompts = [rng.integers(3, cfg.vocab_size, size=p).tolist() for _ in range(b)]
            base = None
            for t in [1] + list(args.tree_sizes):
                kw = dict(max_new_tokens=n, eos_token_id=[], **(dict(medusa=False) if t == 1 else
                                                                 dict(tree=tree_of_size(t))))
                jaxmedusa.generate(model, prompts, **kw)  # compile and warm up
                st = jaxmedusa.generate(model, prompts, **kw).stats
                long_kw = dict(kw, max_new_tokens=4 * n)
                jaxmedusa.generate(model, prompts, **long_kw)
                lst = jaxmedusa.generate(model, prompts, **long_kw).stats
                step_ms = st["decode_seconds"] / st["steps"] * 1e3
                slope_ms, fixed_ms = call_fit(st, lst)
                base = step_ms if t == 1 else base
                row = dict(batch=b, prompt=p, tree_nodes=t, step_ms=step_ms, steps=st["steps"],
                           tokens_per_step=st["tokens_per_step"], ratio=step_ms / base,
                           prefill_ms=st["prefill_seconds"] * 1e3, slope_ms=slope_ms, fixed_ms=fixed_ms,
                           long_steps=lst["steps"])
                rows.append(row)
                print(f"api B={b} P={p} T={t}: {step_ms:.3f} ms/step ({st['steps']} steps, "
                      f"{st['tokens_per_step']:.2f} tokens/step), {row['ratio']:.3f}x vanilla; "
                      f"in-call step {slope_ms:.3f} ms + {fixed_ms:.2f} ms a call", flush=True)
    del model, lm
    jax.clear_caches()
    return rows


def call_fit(short: dict, long: dict) -> tuple[float, float]:
    """(ms a step, ms a call beyond its steps) from two generate() calls' stats that took different step counts;
    (nan, nan) when they took the same number of steps."""
    ds = long["steps"] - short["steps"]
    if ds <= 0:
        return float("nan"), float("nan")
    slope = (long["decode_seconds"] - short["decode_seconds"]) / ds
    return slope * 1e3, (short["decode_seconds"] - slope * short["steps"]) * 1e3


def run_hf(args) -> list[dict]:
    """transformers' generate (greedy, bf16, sdpa) at the same shapes, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = hf_config_dict(args.model)
    d.pop("architectures")
    cfg = AutoConfig.for_model(d.pop("model_type", "llama"), **d)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows = []
    for b in args.batch:
        for p in args.prompts:
            ids = torch.randint(3, cfg.vocab_size, (b, p), device=dev)
            kw = dict(max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
            with torch.no_grad():
                model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))
                sync()
                t0 = time.perf_counter()
                model.generate(ids, **dict(kw, max_new_tokens=1, min_new_tokens=1))  # prefill alone
                sync()
                t1 = time.perf_counter()
                model.generate(ids, **kw)
                sync()
                t2 = time.perf_counter()
            decode_s = (t2 - t1) - (t1 - t0)
            row = dict(batch=b, prompt=p, tokens_per_s=b * (args.steps - 1) / decode_s,
                       step_ms=decode_s / (args.steps - 1) * 1e3)
            rows.append(row)
            print(f"transformers B={b} P={p}: {row['step_ms']:.2f} ms/step, {row['tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def run_hf_subprocess(args) -> list[dict] | dict:
    """run_hf in its own process, so PyTorch and JAX never hold the GPU's memory at the same time."""
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-only", "--model", args.model, "--batch",
           *map(str, args.batch), "--prompts", *map(str, args.prompts), "--steps", str(args.steps)]
    sys.path.insert(0, HERE)
    from decode import json_subprocess

    return json_subprocess(cmd, "[")


def device_name() -> str:
    sys.path.insert(0, HERE)
    from decode import device_name as name

    return name()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 1024, 4096, 8192])
    ap.add_argument("--tree-batch", type=int, nargs="+", default=[1, 4], help="batches to sweep T on")
    ap.add_argument("--tree-prompts", type=int, nargs="+", default=[128, 1024, 4096, 8192])
    ap.add_argument("--tree-sizes", type=int, nargs="+", default=[2, 16, 32, 48, 64, 80, 96, 112])
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (in a subprocess)")
    ap.add_argument("--api", action="store_true",
                    help="also time the verify step through jaxmedusa.generate() (--tree-batch x --tree-prompts)")
    ap.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.dtype, args.prompts, args.tree_prompts = "smoke", "float32", [16, 64], [16, 64]
        args.batch, args.tree_batch, args.tree_sizes, args.steps = [1, 2], [2], [2, 16], 4
    if args.hf_only:
        print(json.dumps(run_hf(args)))
        return
    hf_rows = run_hf_subprocess(args) if args.hf else None  # before JAX takes the GPU's memory
    import jax

    from jaxmedusa.atomic import write_json

    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  model=args.model, dtype=args.dtype, args=vars(args))
    out = args.out or os.path.join(HERE, "results", f"e2e-{result['date']}-{result['device'].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if args.api:
        result["api"] = run_api(args)
    result.update(run_jax(args))
    if hf_rows is not None:
        result["transformers"] = hf_rows
    write_json(out, result)
    print(f"\nmodel {args.model} {args.dtype}, {result['device']}, jax {jax.__version__}; "
          f"copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s")
    print(f"{'B':>3} {'prompt':>6} {'ms/step':>8} {'tok/s':>8} {'bound tok/s':>11} {'% bound':>8} {'HF tok/s':>9} {'vs HF':>6}")
    hf_list = result.get("transformers")
    hf = {(r["batch"], r["prompt"]): r for r in hf_list} if isinstance(hf_list, list) else {}
    for r in result["vanilla"]:
        h = hf.get((r["batch"], r["prompt"]))
        print(f"{r['batch']:>3} {r['prompt']:>6} {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['bound_tokens_per_s']:>11.1f} {100 * r['fraction_of_bound']:>7.0f}% "
              f"{h['tokens_per_s'] if h else float('nan'):>9.1f} "
              f"{r['tokens_per_s'] / h['tokens_per_s'] if h else float('nan'):>6.2f}")
    print("\nverify step / vanilla step (random heads: the whole tree every step)")
    for b in sorted({r["batch"] for r in result["verify"]}):
        sizes = sorted({r["tree_nodes"] for r in result["verify"] if r["batch"] == b})
        print(f"B={b}  {'prompt':>6} " + " ".join(f"T={t:<5}" for t in sizes))
        for p in sorted({r["prompt"] for r in result["verify"] if r["batch"] == b}):
            cells = {r["tree_nodes"]: r["ratio"] for r in result["verify"] if r["batch"] == b and r["prompt"] == p}
            print(f"     {p:>6} " + " ".join(f"{cells[t]:<7.3f}" if cells.get(t) else f"{'-':<7}" for t in sizes))
    if result.get("api"):
        print("\nthrough jaxmedusa.generate(): ms per step (ratio to vanilla); a step inside a call and a call's "
              "fixed cost, from calls of n and 4n new tokens")
        for r in result["api"]:
            print(f"B={r['batch']} P={r['prompt']} T={r['tree_nodes']:<4} {r['step_ms']:8.3f} ({r['ratio']:.3f})"
                  f"  in-call step {r['slope_ms']:7.3f}  fixed {r['fixed_ms']:6.2f}")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
