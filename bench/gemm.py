"""GEMMs at the few-row shapes of decode and tree verification, XLA's and the Pallas flat GEMM
(kernels/gemm_pallas.py) in a few tile configurations, against the weight-streaming bound.

    python bench/gemm.py                  # Llama-2 7B and 13B weight shapes, bf16, M = 1 .. 256, GPU
    python bench/gemm.py --smoke          # tiny shapes, any backend

x [M, K] @ W [K, N] for each projection of the model. To time the GEMMs as the decode loop runs them
(weights streamed from HBM, not from the 50 MB L2) one jitted lax.scan runs R products over R distinct
weight slices and inputs (R x the weight > 1 GB), so per-product time = call time / R, and the best of
--repeats calls is kept. (bench/verify_breakdown.py times the same GEMMs inside the model's loop.) The bound is (K*N + M*K + M*N) * 2 bytes at the measured copy bandwidth.
Writes bench/results/gemm-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPES = {
    "7b": {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096), "lm_head": (4096, 32000)},
    "13b": {"q/k/v/o": (5120, 5120), "gate/up": (5120, 13824), "down": (13824, 5120), "lm_head": (5120, 32000)},
    "smoke": {"proj": (128, 256)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["7b", "13b"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--block-k", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--pallas-min-m", type=int, default=16, help="smallest M the Pallas kernel is timed at")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.models, args.m, args.repeats, args.block_k = ["smoke"], [1, 16], 2, [128]

    import jax
    import jax.numpy as jnp

    from e2e import copy_bandwidth, device_name
    from jaxmedusa.kernels.gemm_pallas import flat_gemm, flat_gemm_reference, flat_gemm_supports

    dtype = jnp.bfloat16
    bw = copy_bandwidth() if not args.smoke else 1e11
    interpret = jax.default_backend() != "gpu"
    configs = [("xla", None)] + [(f"pallas bn{bn} bk{bk}", dict(block_n=bn, block_k=bk, interpret=interpret))
                                 for bn in args.block_n for bk in args.block_k]
    rows = []
    for model in args.models:
        for name, (k, n) in SHAPES[model].items():
            r = 4 if args.smoke else max(4, int((1 << 30) // (k * n * 2)))
            ws = jax.random.normal(jax.random.key(0), (r, k, n), dtype)
            for m in args.m:
                xs = jax.random.normal(jax.random.key(m), (r, m, k), dtype)
                for impl, kw in configs:
                    if kw is not None and (m < args.pallas_min_m or not flat_gemm_supports(m, k, n, kw["block_k"])
                                           or n % kw["block_n"]):
                        continue
                    op = (lambda x, w: x @ w) if kw is None else functools.partial(flat_gemm, **kw)
                    # one product per scan step, each over its own weight slice: the weights stream from HBM
                    f = jax.jit(lambda xs, ws: jax.lax.scan(lambda c, xw: (c, op(xw[0], xw[1])), 0, (xs, ws))[1])
                    out = jax.block_until_ready(f(xs, ws))
                    ref = flat_gemm_reference(xs[0], ws[0]).astype(jnp.float32)
                    err = float(jnp.abs(out[0].astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
                    best = float("inf")
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        jax.block_until_ready(f(xs, ws))
                        best = min(best, time.perf_counter() - t0)
                    per = best / r
                    bound = (k * n + m * k + m * n) * 2 / bw
                    row = dict(model=model, proj=name, impl=impl, m=m, k=k, n=n, us=per * 1e6, bound_us=bound * 1e6,
                               fraction_of_bound=bound / per, tflops=2 * m * k * n / per / 1e12, rel_err=err)
                    rows.append(row)
                    print(f"{model} {name:<8} M={m:<4} {impl:<20} {row['us']:8.1f} us  bound {row['bound_us']:7.1f} us  "
                          f"{100 * row['fraction_of_bound']:5.1f}%  err {err:.1e}", flush=True)
            del ws
    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  copy_bandwidth=bw, rows=rows)
    out = args.out or os.path.join(HERE, "results", f"gemm-{result['date']}-{result['device'].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(out + ".tmp", out)
    print(f"\n% of the streaming bound ({result['device']}, copy {bw / 1e12:.2f} TB/s): XLA / best Pallas config")
    ms = sorted({r["m"] for r in rows})
    print(f"{'shape':<16}" + "".join(f"{'M=' + str(m):>14}" for m in ms))
    for model in args.models:
        for name in SHAPES[model]:
            cells = []
            for m in ms:
                sel = [r for r in rows if r["model"] == model and r["proj"] == name and r["m"] == m]
                x = next((r["fraction_of_bound"] for r in sel if r["impl"] == "xla"), float("nan"))
                p = max((r["fraction_of_bound"] for r in sel if r["impl"] != "xla"), default=float("nan"))
                cells.append(f"{100 * x:5.0f}/{100 * p:3.0f}%")
            print(f"{model + ' ' + name:<16}" + "".join(f"{c:>14}" for c in cells))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
