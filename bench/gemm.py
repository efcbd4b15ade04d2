"""XLA's GEMMs at the few-row shapes of decode and tree verification, against the weight-streaming bound.

    python bench/gemm.py                  # Llama-2 7B and 13B weight shapes, bf16, M = 1 .. 256, GPU
    python bench/gemm.py --smoke          # tiny shapes, any backend

x [M, K] @ W [K, N] for each projection of the model. To time the GEMMs as the decode loop runs them
(weights streamed from HBM, not from the 50 MB L2) one jitted call runs R independent products over R
distinct weights and inputs (R x the weight > 1 GB), so per-product time = call time / R, and the best of
--repeats calls is kept. The bound is (K*N + M*K + M*N) * 2 bytes at the measured copy bandwidth.
Writes bench/results/gemm-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
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
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.models, args.m, args.repeats = ["smoke"], [1, 16], 2

    import jax
    import jax.numpy as jnp

    from e2e import copy_bandwidth, device_name

    dtype = jnp.bfloat16
    bw = copy_bandwidth() if not args.smoke else 1e11
    rows = []
    for model in args.models:
        for name, (k, n) in SHAPES[model].items():
            r = max(4, int((1 << 30) // (k * n * 2)))
            if args.smoke:
                r = 4
            keys = jax.random.split(jax.random.key(0), r)
            ws = [jax.random.normal(kk, (k, n), dtype) for kk in keys]
            for m in args.m:
                xs = [jax.random.normal(kk, (m, k), dtype) for kk in jax.random.split(jax.random.key(m), r)]
                f = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws)])
                jax.block_until_ready(f(xs, ws))
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(xs, ws))
                    best = min(best, time.perf_counter() - t0)
                per = best / r
                bound = (k * n + m * k + m * n) * 2 / bw
                row = dict(model=model, proj=name, m=m, k=k, n=n, us=per * 1e6, bound_us=bound * 1e6,
                           fraction_of_bound=bound / per, tflops=2 * m * k * n / per / 1e12)
                rows.append(row)
                print(f"{model} {name:<8} M={m:<4} {row['us']:8.1f} us  bound {row['bound_us']:7.1f} us  "
                      f"{100 * row['fraction_of_bound']:5.1f}%  {row['tflops']:6.1f} TFLOP/s", flush=True)
            del ws
    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  copy_bandwidth=bw, rows=rows)
    out = args.out or os.path.join(HERE, "results", f"gemm-{result['date']}-{result['device'].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(out + ".tmp", out)
    print(f"\n% of the streaming bound ({result['device']}, copy {bw / 1e12:.2f} TB/s)")
    ms = sorted({r["m"] for r in rows})
    print(f"{'shape':<16}" + "".join(f"{'M=' + str(m):>8}" for m in ms))
    for model in args.models:
        for name in SHAPES[model]:
            cells = {r["m"]: r for r in rows if r["model"] == model and r["proj"] == name}
            print(f"{model + ' ' + name:<16}" + "".join(f"{100 * cells[m]['fraction_of_bound']:>7.0f}%" for m in ms))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
