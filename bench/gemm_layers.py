"""The decoder's projection GEMMs at M = B x T rows, as the model runs them, against the weight-streaming bound.

    python bench/gemm_layers.py                                  # Llama-2-7B shapes, bf16, GPU
    python bench/gemm_layers.py --flags "" " --xla_gpu_enable_triton_gemm=false"  # XLA flag variants
                                  # (the leading space keeps argparse from reading a flag set as an option)
    python bench/gemm_layers.py --smoke                          # tiny shapes, any backend

One jitted call runs every layer's projections (q, k, v, o, gate, up, down; or the fused qkv and
gate_up products) on its own weights, chained through cheap elementwise ops the way a decoder chains
them, so each GEMM streams its weights from HBM once, as in the real step (no L2 reuse between layers).
The time of one call is compared with the bytes of all weights at the read bandwidth measured in the
same process (a 4 GiB sum). Variants: `layout` separate | fused (qkv and gate_up concatenated, the layout GLM ships) | fused_t
(the same, stored [out, in] as in HF files, XLA only),
`impl` xla | pallas (kernels.flat_gemm; `--split-k auto 1 2 4 8` runs it once per K split, auto = the
dispatcher's default tiling); each XLA flag set runs in its own subprocess. `--per-gemm` also times each
projection alone (that projection of every layer, one input, the outputs summed): the per-shape numbers a
split-K default is chosen from. The breakdown
(bench/verify_breakdown.py) is the in-model check of these numbers. `err` is the final hidden state's difference from XLA's
after all layers. The flat GEMM reads 1.4-1.7 there on an H200 while its products match the reference one by
one at these shapes (tests/test_kernels_gpu.py): a random 32-layer chain does not keep bf16 rounding
differences small, so read err as a correctness check only on short stacks (--smoke). Writes
bench/results/gemm-layers-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {"llama2-7b": (32, 4096, 4096, 4096, 11008), "llama2-13b": (40, 5120, 5120, 5120, 13824),
          "smoke": (2, 256, 256, 128, 512)}  # layers, hidden, q width, kv width, intermediate


def _timed(fn, *args, repeats: int) -> float:
    """Best wall time of one call, in ms, after a warm-up (one dispatch of a multi-ms program)."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def read_bandwidth(repeats: int) -> float:
    """Bytes/s of streaming a 4 GiB array once (a sum), the pure-read rate a GEMM's weights can reach."""
    import jax
    import jax.numpy as jnp

    n = (4 << 30) // 2 if jax.default_backend() == "gpu" else 1 << 22
    x = jnp.ones((n // 4096, 4096), jnp.bfloat16)
    ms = _timed(jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32)), x, repeats=repeats)
    return x.nbytes / (ms * 1e-3)


def make_weights(key, shape, layout: str, dtype):
    import jax
    import jax.numpy as jnp

    layers, h, qw, kvw, inter = shape
    widths = ({"q": (h, qw), "k": (h, kvw), "v": (h, kvw), "o": (qw, h), "gate": (h, inter), "up": (h, inter),
               "down": (inter, h)} if layout == "separate" else
              {"qkv": (h, qw + 2 * kvw), "o": (qw, h), "gate_up": (h, 2 * inter), "down": (inter, h)})
    if layout == "fused_t":  # stored [out, in] like HF/PyTorch (K contiguous), used as x @ w.T
        widths = {name: wh[::-1] for name, wh in widths.items()}
    out = []
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), len(widths))
        out.append({name: (jax.random.normal(k, wh, jnp.float32) * 0.02).astype(dtype)
                    for k, (name, wh) in zip(ks, widths.items())})
    return out


def product(layout: str, impl: str, split: str = "auto"):
    """x @ w as the variant computes it: XLA, or the flat GEMM with the default tiling or split_k = split."""
    import jax

    from jaxmedusa.kernels import flat_gemm, matmul

    if impl == "pallas" and jax.default_backend() != "gpu":
        impl = "interpret"
    if layout == "fused_t":
        return lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
    if impl == "xla" or split == "auto":
        return lambda x, w: matmul(x, w, impl=impl)
    # a fixed split, at most one per 128-deep K step (o's K of 4096 takes up to 32)
    return lambda x, w: flat_gemm(x, w, split_k=min(int(split), w.shape[0] // 128), interpret=impl == "interpret")


def single_fn(layout: str, impl: str, name: str, split: str = "auto"):
    """One projection of every layer on one input, the outputs summed in float32: that GEMM shape's time."""
    import jax
    import jax.numpy as jnp

    mm = product(layout, impl, split)

    def run(x, weights):
        acc = jnp.zeros((x.shape[0], weights[0][name].shape[1]), jnp.float32)
        for w in weights:
            acc = acc + mm(x[:, :w[name].shape[0]], w[name]).astype(jnp.float32)
        return acc

    return jax.jit(run)


def stack_fn(shape, layout: str, impl: str, split: str = "auto"):
    """x [M, H] through every layer's projections; returns the last hidden state."""
    import jax
    import jax.numpy as jnp

    _, h, qw, kvw, inter = shape
    mm = product(layout, impl, split)

    def norm(x):  # keeps the chain finite over many random layers, as RMSNorm does in the model
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)

    def run(x, weights):
        for w in weights:
            x = norm(x)
            if layout == "separate":
                q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
                a = q + jnp.tile(k + v, (1, qw // kvw))
            else:
                qkv = mm(x, w["qkv"])
                a = qkv[:, :qw] + jnp.tile(qkv[:, qw:qw + kvw] + qkv[:, qw + kvw:], (1, qw // kvw))
            x = norm(x + mm(a, w["o"]))
            if layout == "separate":
                g, u = mm(x, w["gate"]), mm(x, w["up"])
            else:
                gu = mm(x, w["gate_up"])
                g, u = gu[:, :inter], gu[:, inter:]
            x = x + mm(jax.nn.silu(g) * u, w["down"])
        return x

    return jax.jit(run)


def run_variants(args) -> list[dict]:
    """Every (layout, impl, M) in this process (its XLA_FLAGS already set)."""
    import jax
    import jax.numpy as jnp

    shape = SHAPES["smoke" if args.smoke else args.model]
    dtype = jnp.bfloat16
    bw = read_bandwidth(args.repeats)
    rows = []
    for layout in args.layouts:
        weights = make_weights(jax.random.key(0), shape, layout, dtype)
        # what is timed: the whole stack, then (--per-gemm) each projection alone
        parts = [("stack", None)] + ([(name, name) for name in weights[0]] if args.per_gemm and layout != "fused_t"
                                     else [])
        for part, name in parts:
            wbytes = sum(w[name].nbytes if name else sum(a.nbytes for a in w.values()) for w in weights)
            make = (lambda impl, split: stack_fn(shape, layout, impl, split)) if name is None else \
                (lambda impl, split: single_fn(layout, impl, name, split))
            ref_fn, refs = make("xla", "auto"), {}
            for impl in args.impls:
                for split in (args.split_k if impl == "pallas" else ["auto"]):
                    fn = make(impl, split)
                    for m in args.rows:
                        x = (jax.random.normal(jax.random.key(m), (m, shape[1] if name is None else
                                                                   max(w.shape[0] for w in weights[0].values())),
                                               jnp.float32)).astype(dtype)
                        tag = {"layout": layout, "part": part, "impl": impl, "split_k": split, "m": m}
                        try:
                            ms = _timed(fn, x, weights, repeats=args.repeats)
                        except Exception as e:  # a variant that does not compile is a row, not the end of the run
                            rows.append(dict(tag, error=f"{type(e).__name__}: {e}"[:800]))
                            print(f"{layout} {part} {impl} split {split} M={m}: {type(e).__name__}: {str(e)[:300]}",
                                  flush=True)
                            continue
                        if m not in refs:
                            refs[m] = ref_fn(x, weights).astype(jnp.float32)
                        got = fn(x, weights).astype(jnp.float32)
                        err = float(jnp.max(jnp.abs(got - refs[m])) / jnp.max(jnp.abs(refs[m])))
                        bound = wbytes / bw * 1e3
                        rows.append(dict(tag, ms=ms, bound_ms=bound, rel_err_vs_xla=err, of_bound=bound / ms,
                                         tflops=2 * m * wbytes / 2 / (ms * 1e-3) / 1e12))
                        print(f"{os.environ.get('XLA_FLAGS', '') or '(default)':30s} {layout:8s} {part:8s} {impl:6s} "
                              f"split {split:>4} M={m:4d} {ms:7.3f} ms  bound {bound:6.3f} ms  {bound / ms:5.1%}  "
                              f"err {err:.1e}", flush=True)
                    del fn
        del weights
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[k for k in SHAPES if k != "smoke"], default="llama2-7b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128, 256])
    p.add_argument("--layouts", nargs="+", choices=["separate", "fused", "fused_t"], default=["separate", "fused"])
    p.add_argument("--impls", nargs="+", choices=["xla", "pallas"], default=["xla"])
    p.add_argument("--split-k", nargs="+", default=["auto"], help="the flat GEMM's K splits: auto (the "
                   "dispatcher's default tiling) and/or numbers")
    p.add_argument("--per-gemm", action="store_true", help="also time each projection alone")
    p.add_argument("--flags", nargs="+", default=[""], help="XLA_FLAGS sets, one subprocess each; start one with a space "
                   "(\" --xla_...\") so it is not read as an option")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print("ROWS " + json.dumps(run_variants(args)), flush=True)
        return

    import jax

    rows = []
    for flags in args.flags:
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--repeats",
               str(args.repeats), "--rows", *map(str, args.rows), "--layouts", *args.layouts, "--impls", *args.impls,
               "--split-k", *args.split_k]
        if args.smoke:
            cmd.append("--smoke")
        if args.per_gemm:
            cmd.append("--per-gemm")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stdout.write("".join(l + "\n" for l in proc.stdout.splitlines() if not l.startswith("ROWS ")))
        got = [l for l in proc.stdout.splitlines() if l.startswith("ROWS ")]
        if proc.returncode or not got:
            print(f"flags {flags!r} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            rows.append({"flags": flags, "error": proc.stderr.strip()[-2000:]})
            continue
        rows += [dict(r, flags=flags) for r in json.loads(got[-1][5:])]
    device = jax.devices()[0].device_kind.replace(" ", "_")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"gemm-layers-{date}-{device}.json")
    result = {"date": date, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "model": "smoke" if args.smoke else args.model, "rows": rows}
    from jaxmedusa.atomic import write_json

    write_json(out, result, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
