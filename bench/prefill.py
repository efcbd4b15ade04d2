"""Prompt prefill speed at real model shapes: ours (each attention path) against transformers' forward with
torch SDPA on the same GPU, side by side.

    python bench/prefill.py                      # Llama-2-7B shapes, bf16, GPU, + transformers (subprocess)
    python bench/prefill.py --no-hf              # ours only
    python bench/prefill.py --smoke              # tiny shapes, any backend (checks the script)

Ours: the jitted `prefill` generate() runs (prompt through a fresh request-sized cache, K/V written in
place, last hidden state out), best of --repeats after a compile, for the attention paths "auto" (cuDNN
flash attention on GPU) and "blockwise" (the reference, query blocks; short prompts only); plus one
public-API row: `jaxmedusa.generate(..., max_new_tokens=1)`'s own prefill_seconds. transformers: the
model's forward with attn_implementation="sdpa", use_cache=True and logits_to_keep=1 (so it computes what
ours does), run first in its own process so the two never share the GPU's memory. Effective TFLOP/s
counts 2 x (non-embedding parameters) per token + the causal attention's 2 x layers x hidden x T^2.
Before timing, cuDNN's attention is checked against the blockwise reference on random inputs (odd
length, MHA and GQA). Writes bench/results/prefill-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def model_flops(cfg, batch: int, t: int) -> float:
    """Matmul FLOPs of a causal forward over t tokens (projections + QK^T/PV over the causal half, x2)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token = 2 * layers * (2 * h * qd + 2 * h * kvd + 3 * h * i)
    return batch * (per_token * t + 2 * layers * qd * t * t)


def run_hf(args) -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from e2e import hf_config_dict

    d = hf_config_dict(args.model)
    d.pop("architectures")
    d["max_position_embeddings"] = max(d.get("max_position_embeddings", 0), max(args.prompts) + 16)
    cfg = AutoConfig.for_model(d.pop("model_type", "llama"), **d)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16).eval()
    rows = []
    for b, t in args.cases:
        ids = torch.randint(3, cfg.vocab_size, (b, t), device="cuda")
        try:
            with torch.no_grad():
                model(ids, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    model(ids, use_cache=True, logits_to_keep=1)
                    torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
            rows.append(dict(batch=b, prompt=t, ms=best * 1e3))
        except torch.OutOfMemoryError as e:
            rows.append(dict(batch=b, prompt=t, error=str(e).splitlines()[0][:200]))
        torch.cuda.empty_cache()
        print(f"transformers B={b} T={t}: {rows[-1]}", flush=True)
    return rows


def check_cudnn() -> list[dict]:
    """cuDNN's causal attention vs the blockwise reference (float32 math) on random inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmedusa.kernels import causal_attention_blockwise, prefill_attention

    out = []
    rng = np.random.default_rng()
    for b, t, h, kvh, dtype in [(2, 1000, 32, 32, jnp.bfloat16), (2, 1000, 32, 8, jnp.bfloat16),
                                (1, 4099, 8, 2, jnp.float16)]:
        q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, 128)), dtype) for n in (h, kvh, kvh))
        got = prefill_attention(q, k, v)
        want = causal_attention_blockwise(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
        err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
        out.append(dict(batch=b, t=t, heads=h, kv_heads=kvh, dtype=jnp.dtype(dtype).name, rel_err=err,
                        finite=bool(jnp.isfinite(got.astype(jnp.float32)).all())))
        print(f"cuDNN vs reference B={b} T={t} H={h} KVH={kvh} {jnp.dtype(dtype).name}: rel err {err:.2e}",
              flush=True)
    jax.clear_caches()
    return out


def run_jax(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmedusa
    from e2e import MODELS
    from jaxmedusa.models import ModelConfig, create_lm
    from jaxmedusa.generate import prefill
    from jaxmedusa.memory import cache_bucket

    cfg = ModelConfig.from_hf_dict(MODELS[args.model])
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, max(args.prompts) + 256))
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    lm = create_lm(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(lm)
    rows = []
    for b, t in args.cases:
        tokens = jax.random.randint(jax.random.key(t), (b, t), 3, cfg.vocab_size, jnp.int32)
        lens = jnp.full((b,), t, jnp.int32)
        slots = cache_bucket(t + 128 + 64, 1 << 30)
        for impl in ("auto", "blockwise"):
            if impl == "blockwise" and t > args.blockwise_max:
                continue
            static = dict(graphdef=graphdef, max_len=slots, attn_impl=None if impl == "auto" else "reference")
            row = dict(impl=impl, batch=b, prompt=t, cache_slots=slots)
            try:
                t0 = time.perf_counter()
                compiled = prefill.lower(state, tokens, lens, **static).compile()
                row["compile_s"] = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                if mem is not None:
                    row["temp_bytes"] = int(mem.temp_size_in_bytes)
                jax.block_until_ready(compiled(state, tokens, lens))
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(state, tokens, lens))
                    best = min(best, time.perf_counter() - t0)
                row["ms"] = best * 1e3
                row["tflops"] = model_flops(cfg, b, t) / best / 1e12
                del compiled
            except Exception as e:  # an out-of-memory case is a result too
                row["error"] = str(e).splitlines()[0][:300]
            rows.append(row)
            print(f"ours[{impl}] B={b} T={t}: {row.get('ms', float('nan')):.1f} ms, "
                  f"{row.get('tflops', float('nan')):.0f} TFLOP/s, temp {row.get('temp_bytes', 0) / 2**30:.2f} GiB"
                  f"{'  ' + row['error'] if 'error' in row else ''}", flush=True)
    # the public API: generate()'s own prefill timing, second call (compiled already)
    b, t = args.cases[0]
    model = jaxmedusa.Model(lm, max_len=t + 256)
    prompts = [[int(x) for x in jax.random.randint(jax.random.key(7), (t,), 3, cfg.vocab_size)]] * b
    jaxmedusa.generate(model, prompts, max_new_tokens=1)
    runs = [jaxmedusa.generate(model, prompts, max_new_tokens=1).stats for _ in range(args.repeats)]
    best = min(r["prefill_seconds"] for r in runs)
    rows.append(dict(impl="generate()", batch=b, prompt=t, ms=best * 1e3, tflops=model_flops(cfg, b, t) / best / 1e12,
                     all_ms=[r["prefill_seconds"] * 1e3 for r in runs], cache_slots=runs[0]["cache_slots"]))
    print(f"generate() B={b} T={t}: prefill {rows[-1]['ms']:.1f} ms (runs: "
          f"{', '.join(f'{x:.1f}' for x in rows[-1]['all_ms'])})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--cases", default="1x1024,1x4096,1x8192,1x16384,1x32768,4x1024,4x4096,8x2048",
                    help="comma-separated BATCHxPROMPT")
    ap.add_argument("--blockwise-max", type=int, default=4096, help="longest prompt timed on the blockwise path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.cases, args.no_hf, args.repeats = "smoke", "1x64,2x128", True, 1
    args.cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    args.prompts = [t for _, t in args.cases]
    if args.hf_only:
        print("JSON " + json.dumps(run_hf(args)))
        return
    hf = None
    if not args.no_hf:
        cmd = [sys.executable, os.path.abspath(__file__), "--hf-only", "--model", args.model, "--cases",
               ",".join(f"{b}x{t}" for b, t in args.cases), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("JSON ")), flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("JSON ")]
        hf = json.loads(lines[-1][5:]) if lines else {"error": proc.stderr[-2000:]}
    import jax

    from e2e import device_name

    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  model=args.model)
    if jax.default_backend() == "gpu":
        result["cudnn_check"] = check_cudnn()
    result["ours"] = run_jax(args)
    result["transformers"] = hf
    out = args.out or os.path.join(HERE, "results", f"prefill-{result['date']}-{result['device'].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    from jaxmedusa.atomic import write_json

    write_json(out, result)
    from e2e import MODELS
    from jaxmedusa.models import ModelConfig

    mcfg = ModelConfig.from_hf_dict(MODELS[args.model])
    hf_rows = {(r["batch"], r["prompt"]): r for r in hf} if isinstance(hf, list) else {}
    print(f"\n{args.model} prefill, {result['device']}, jax {jax.__version__}: ms (effective TFLOP/s)")
    print(f"{'B':>3} {'prompt':>6} {'ours (auto)':>16} {'blockwise':>16} {'transformers SDPA':>18} {'ours/HF':>8}")
    for b, t in args.cases:
        cell = {}
        for impl in ("auto", "blockwise"):
            r = next((r for r in result["ours"] if r["impl"] == impl and r["batch"] == b and r["prompt"] == t), None)
            cell[impl] = ("-" if r is None else r.get("error", "")[:14] if "ms" not in r
                          else f"{r['ms']:.1f} ({r['tflops']:.0f})")
        h = hf_rows.get((b, t))
        hcell = "-" if not h else h.get("error", "")[:16] if "ms" not in h else \
            f"{h['ms']:.1f} ({model_flops(mcfg, b, t) / h['ms'] / 1e9:.0f})"
        ours = next((r for r in result["ours"] if r["impl"] == "auto" and r["batch"] == b and r["prompt"] == t), {})
        ratio = f"{ours['ms'] / h['ms']:.2f}" if h and "ms" in h and "ms" in ours else "-"
        print(f"{b:>3} {t:>6} {cell['auto']:>16} {cell['blockwise']:>16} {hcell:>18} {ratio:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
