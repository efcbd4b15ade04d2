"""The host's fixed cost of the public API: what a generate() call or a stream() token costs beyond the device.

    python bench/call_overhead.py                      # 32 layers (Llama-2-7B's structure), hidden 64
    python bench/call_overhead.py --layers 80          # Llama-2-70B's structure
    python bench/call_overhead.py --parts --shapes llama2-7b --prompt 1024 --tokens 32
                                                       # a generate() call part by part, 7B shapes (GPU)
    python bench/call_overhead.py --profile --shapes llama2-7b --prompt 1024 --tokens 32
                                                       # one loop call's host events under the profiler

The model has a real model's number of layers (so its GraphDef and state have as many nodes and leaves) but a
tiny width, so device time is small and what is timed is mostly Python: building the request, the compile
cache's key, jit's static-argument hashing, argument flattening, dispatch and the copy back. Times are medians
over --calls calls after a warm-up (compiles excluded). The parts are timed alone too. Prints a table and writes
bench/results/call-overhead-DATE-DEVICE.json.

--parts times one generate() call's parts apart, in the order generate() runs them (request checks and host
values, the prefill, the loop's arguments with its random key, the compile-cache key, the on-device loop, the
copy back; the loop's arguments through generate()'s own _loop_call), vanilla and
Medusa (the default tree), at --tokens and 4x --tokens new tokens: the two loop calls' difference gives the
loop's cost a step and what the loop call costs beyond its steps; two stream() calls the same way give a streamed
step's cost, to compare with the loop's. With --shapes llama2-7b the model has real widths (random bf16 weights), for
the GPU, where every small host-to-device value is a round trip. --profile also records one loop call of --tokens
new tokens (vanilla and Medusa, after two untraced ones) with the JAX profiler, command buffers kept on
(xla_enable_command_buffers_during_profiling, set in XLA_FLAGS before jax starts), and prints the host's events
summed by name: where the call's time goes on the host, e.g. `command_buffer::update`, the loop body's CUDA graph
recorded again because its buffers moved. The profiler slows every launch, so its times are for finding, not timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxmedusa
from jaxmedusa.compile_cache import cache_key, call_compiled, unwrap
from jaxmedusa.generate import prefill
from jaxmedusa.heads import MedusaHeads
from jaxmedusa.models import ModelConfig, create_lm

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


def build(layers: int, hidden: int, num_heads: int, shapes: str = "tiny", max_len: int = 256) -> jaxmedusa.Model:
    """A model of `layers` layers and width `hidden` (float32), or a real model's shapes (bfloat16, random)."""
    if shapes == "tiny":
        cfg = ModelConfig.from_hf_dict(dict(
            architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
        dtype = jnp.float32
    else:
        from e2e import MODELS

        cfg, dtype = ModelConfig.from_hf_dict(MODELS[shapes]), jnp.bfloat16
    lm = create_lm(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    heads = MedusaHeads.for_model(lm, num_heads, 1, rngs=nnx.Rngs(1))
    return jaxmedusa.Model(lm, max_len=max_len, heads=heads)


def call_parts(model: jaxmedusa.Model, prompt: list[int], medusa: bool, new: int, calls: int) -> dict:
    """Median ms of each part of a generate() call, timed the way _generate runs them (same internals), plus the
    whole call through the public API; "steps" is the call's step count."""
    import importlib

    g = importlib.import_module("jaxmedusa.generate")  # the module; jaxmedusa.generate is the function
    parts: dict[str, list[float]] = {k: [] for k in ("generate", "request", "prefill", "loop_args", "cache_key",
                                                     "loop", "copy_back")}
    kw = dict(max_new_tokens=new, medusa=medusa, eos_token_id=[])
    jaxmedusa.generate(model, prompt, **kw)
    steps = 0
    for _ in range(calls):
        t0 = time.perf_counter()
        steps = jaxmedusa.generate(model, prompt, **kw).stats["steps"]
        t1 = time.perf_counter()
        run = g._prepare(model, prompt, new, 0.0, 1.0, 0, [], medusa, None, "greedy", g.DEFAULT_TOP_K, 0.09, 0.3)
        t2 = time.perf_counter()
        with g.traced_calls(model):
            cache, hidden, _ = g._run_prefill(run, None)
        t3 = time.perf_counter()
        fn, args, static, options = g._loop_call(model, run, cache, hidden, 0, new, 0.0, 1.0, None)
        t4 = time.perf_counter()
        hash(cache_key(fn, args, static, options))
        t5 = time.perf_counter()
        with g.traced_calls(model):
            out = call_compiled(fn, args, static, options)[0]  # computes the key again: subtracted below
        t6 = time.perf_counter()
        jax.device_get(out[:3])
        t7 = time.perf_counter()
        for name, (a, b) in dict(generate=(t0, t1), request=(t1, t2), prefill=(t2, t3), loop_args=(t3, t4),
                                 cache_key=(t4, t5), loop=(t5, t6), copy_back=(t6, t7)).items():
            parts[name].append(b - a)
    med = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
    med["loop"] -= med["cache_key"]
    return dict(steps=steps, **med)


def stream_call(model: jaxmedusa.Model, prompt: list[int], medusa: bool, new: int, calls: int) -> dict:
    """Median ms of a whole stream() call (every chunk taken) and its steps (chunks)."""
    def drain() -> int:
        return sum(1 for _ in jaxmedusa.stream(model, prompt, max_new_tokens=new, medusa=medusa, eos_token_id=[]))

    steps = drain()
    return dict(steps=steps, ms=median_ms(drain, calls))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--medusa-heads", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per stream() call")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--label", default="", help="appended to the JSON's name (before/after an A/B)")
    ap.add_argument("--parts", action="store_true", help="time a generate() call part by part (see above)")
    ap.add_argument("--shapes", choices=["tiny", "llama2-7b", "llama2-13b"], default="tiny",
                    help="tiny: --layers x --hidden in float32; else that model's shapes, random bf16 weights")
    ap.add_argument("--profile", action="store_true", help="profile one loop call (see above), after --parts if given")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.profile:  # read when jax starts its backend, which building the model does
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_enable_command_buffers_during_profiling=true").strip()
    model = build(args.layers, args.hidden, args.medusa_heads, args.shapes,
                  max(256, args.prompt + 4 * args.tokens + 128))
    prompt = list(range(3, 3 + args.prompt))
    if args.parts or args.profile:
        return main_parts(args, model, prompt)
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


def profile_loop(model: jaxmedusa.Model, prompt: list[int], medusa: bool, new: int, top: int = 25) -> dict:
    """The host's events of one generate() loop call under the JAX profiler (the third call; two warm it up),
    summed by name: [(name, ms, count)] of the `top` costliest (the loop's per-iteration spans left out), and the
    call's wall ms."""
    import collections
    import glob
    import importlib
    import tempfile

    from jax.profiler import ProfileData

    g = importlib.import_module("jaxmedusa.generate")
    trace_root = tempfile.TemporaryDirectory(prefix="call-overhead-trace-")
    trace_dir = trace_root.name
    run = g._prepare(model, prompt, new, 0.0, 1.0, 0, [], medusa, None, "greedy", g.DEFAULT_TOP_K, 0.09, 0.3)
    for i in range(3):
        with g.traced_calls(model):
            cache, hidden, _ = g._run_prefill(run, None)
        fn, args, static, options = g._loop_call(model, run, cache, hidden, 0, new, 0.0, 1.0, None)
        jax.block_until_ready(args)
        if i == 2:
            jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        with g.traced_calls(model):
            jax.block_until_ready(call_compiled(fn, args, static, options)[0])
        wall = time.perf_counter() - t0
        if i == 2:
            jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    host = collections.defaultdict(lambda: [0.0, 0])
    for plane in ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for ev in line.events:
                if not ev.name.startswith(("$", "[iter=")):  # Python frames (the Python tracer's) left out
                    host[ev.name][0] += ev.duration_ns / 1e6
                    host[ev.name][1] += 1
    trace_root.cleanup()
    events = sorted(((k, v[0], v[1]) for k, v in host.items()), key=lambda e: -e[1])[:top]
    return dict(medusa=medusa, new_tokens=new, wall_ms=1e3 * wall, host_events=events)


def main_parts(args, model: jaxmedusa.Model, prompt: list[int]) -> None:
    """--parts: the table of a generate() call's parts, vanilla and Medusa, at --tokens and 4x --tokens; --profile:
    one loop call of each profiled."""
    rows = []
    print(f"generate() {'part by part' if args.parts else 'loop calls profiled'}, ms (medians of {args.calls}); "
          f"{args.shapes} shapes, prompt {args.prompt}; device {device_name()}; jax {jax.__version__}")
    names = ("steps", "generate", "request", "prefill", "loop_args", "cache_key", "loop", "copy_back")
    if args.parts:
        print(f"{'call':<22}" + "".join(f"{n:>10}" for n in names))
    for medusa in (False, True) if args.parts else ():
        timed = [call_parts(model, prompt, medusa, new, args.calls) for new in (args.tokens, 4 * args.tokens)]
        short, long = timed
        slope = (long["loop"] + long["copy_back"] - short["loop"] - short["copy_back"]) / max(
            long["steps"] - short["steps"], 1)
        for new, r in zip((args.tokens, 4 * args.tokens), timed):
            what = f"{'medusa' if medusa else 'vanilla'} {new} tokens"
            print(f"{what:<22}" + "".join(f"{r[n]:>10.2f}" if n != "steps" else f"{r[n]:>10d}" for n in names))
        fixed = short["loop"] + short["copy_back"] - slope * short["steps"]
        print(f"{'':<22}loop {slope:.3f} ms a step + {fixed:.2f} ms a call (with the copy back)")
        streamed = [stream_call(model, prompt, medusa, new, args.calls) for new in (args.tokens, 4 * args.tokens)]
        stream_step = (streamed[1]["ms"] - streamed[0]["ms"]) / max(streamed[1]["steps"] - streamed[0]["steps"], 1)
        print(f"{'':<22}stream() {stream_step:.3f} ms a step (" + ", ".join(
            f"{s['steps']} steps {s['ms']:.2f} ms" for s in streamed) + ")")
        rows.append(dict(medusa=medusa, short=short, long=long, loop_step_ms=slope, loop_call_fixed_ms=fixed,
                         stream=streamed, stream_step_ms=stream_step))
    profiles = []
    for medusa in (False, True) if args.profile else ():
        p = profile_loop(model, prompt, medusa, args.tokens)
        profiles.append(p)
        print(f"{'medusa' if medusa else 'vanilla'} loop call under the profiler, {p['wall_ms']:.2f} ms; host events, "
              f"ms (count):")
        for name, ms, count in p["host_events"]:
            print(f"  {name[:70]:<70} {ms:>9.3f} ({count})")
    date = datetime.date.today().isoformat()
    result = dict(date=date, device=device_name(), jax=jax.__version__, config=vars(args), parts=rows,
                  profiles=profiles)
    write_result(result, "call-overhead-parts" + (f"-{args.label}" if args.label else ""), args.out)


if __name__ == "__main__":
    main()
