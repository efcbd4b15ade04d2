"""The host's fixed cost of the public API: what a generate() call or a stream() token costs beyond the device.

    python bench/call_overhead.py                      # 32 layers (Llama-2-7B's structure), hidden 64
    python bench/call_overhead.py --layers 80          # Llama-2-70B's structure

The model has a real model's number of layers (so its GraphDef and state have as many nodes and leaves) but a
tiny width, so device time is small and what is timed is mostly Python: building the request, the compile
cache's key, jit's static-argument hashing, argument flattening, dispatch and the copy back. Times are medians
over --calls calls after a warm-up (compiles excluded). The parts are timed alone too. Prints a table and writes
bench/results/call-overhead-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxmedusa
from jaxmedusa.compile_cache import cache_key, unwrap
from jaxmedusa.generate import prefill
from jaxmedusa.heads import MedusaHeads
from jaxmedusa.models import ModelConfig

from decode import device_name, write_result


def median_ms(fn, calls: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def build(layers: int, hidden: int, num_heads: int) -> jaxmedusa.Model:
    cfg = ModelConfig.from_hf_dict(dict(
        architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
    lm = jaxmedusa.LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    heads = MedusaHeads.for_model(lm, num_heads, 1, rngs=nnx.Rngs(1))
    return jaxmedusa.Model(lm, max_len=256, heads=heads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--medusa-heads", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per stream() call")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--label", default="", help="appended to the JSON's name (before/after an A/B)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model = build(args.layers, args.hidden, args.medusa_heads)
    prompt = list(range(3, 3 + args.prompt))
    graphdef, state = model.split()
    heads_graphdef, _ = model.split_heads()
    n = args.calls
    rows = []

    def row(what: str, ms: float) -> None:
        rows.append(dict(what=what, ms=ms))
        print(f"{what:<58} {ms:>9.3f}", flush=True)

    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.medusa_heads} Medusa heads, "
          f"{len(jax.tree_util.tree_leaves(state))} state leaves; device {device_name()}; jax {jax.__version__}")
    print(f"{'what':<58} {'ms':>9}")
    for what, g in (("LM", graphdef), ("heads'", heads_graphdef)):
        row(f"hash of the {what} GraphDef (by content)", median_ms(lambda: hash(unwrap(g)), n))
        row(f"hash of Model.split()'s {what} graphdef (what jit hashes)", median_ms(lambda: hash(g), n))
    args_ = (state, jnp.zeros((1, args.prompt), jnp.int32), jnp.full((1,), args.prompt, jnp.int32))
    row("compile-cache key of a prefill call (hashed)",
        median_ms(lambda: hash(cache_key(prefill, args_, dict(graphdef=graphdef, max_len=256, attn_impl=None))), n))
    for medusa in (False, True):
        name = "medusa" if medusa else "vanilla"
        for new in (1, args.tokens):
            row(f"generate() {name}, {new} new token(s), a call",
                median_ms(lambda: jaxmedusa.generate(model, prompt, max_new_tokens=new, medusa=medusa,
                                                     eos_token_id=[]), n))
        # chunks, not tokens, for Medusa: a step can emit several
        def drain() -> int:
            return sum(1 for _ in jaxmedusa.stream(model, prompt, max_new_tokens=args.tokens, medusa=medusa,
                                                   eos_token_id=[]))
        steps = drain()
        row(f"stream() {name}, a step ({steps} steps a call)", median_ms(drain, max(n // 3, 3)) / steps)

    date = datetime.date.today().isoformat()
    result = dict(date=date, device=device_name(), jax=jax.__version__, config=vars(args), rows=rows)
    write_result(result, "call-overhead" + (f"-{args.label}" if args.label else ""), args.out)


if __name__ == "__main__":
    main()
