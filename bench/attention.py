"""Attention over the KV cache: correctness and speed of jaxmedusa's Pallas kernels against baselines.

    python bench/attention.py            # on a GPU: the full table (bf16, D = 128, H = 32)
    python bench/attention.py --smoke    # tiny shapes, interpret mode: runs on CPU so the script cannot rot

Decode attention (one query token) is timed against (a) the pure-JAX reference under XLA, (b) jax's own
Pallas decode attention (jax.experimental.pallas.ops.gpu.decode_attention.gqa) where it imports, (c)
jax.nn.dot_product_attention with cuDNN, (d) torch SDPA when torch has CUDA. Tree attention (T query
tokens with a tree mask) is timed against the reference and reported as a ratio to decode attention on the
same cache. Every kernel's output is checked against the reference on ragged lengths first.

Timing: each measurement runs the op N times back to back inside one jit (each call's query depends on the
previous output, so nothing is elided), best of several repeats, divided by N. Achieved GB/s counts the
K and V bytes of the live cache (2 * B * S * KVH * D * bytes); the fraction is of the copy bandwidth this
script measures on the same device. Writes a JSON result (default bench/results/attention-DATE-DEVICE.json).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmedusa.atomic import write_json
from jaxmedusa.kernels import attention_pallas as ap
from jaxmedusa.kernels.reference import decode_attention_reference, tree_attention_reference


def device_name() -> str:
    d = jax.devices()[0]
    return d.device_kind.replace(" ", "_") if d.platform != "cpu" else "cpu"


def chain(fn, n: int):
    """jit of n dependent calls of fn(q, *rest) -> out shaped like q."""

    def run(q, *rest):
        for _ in range(n):
            q = q + (fn(q, *rest) * 1e-6).astype(q.dtype)
        return q

    return jax.jit(run)


def time_op(fn, args, n: int, repeats: int) -> float:
    """Seconds per call."""
    f = chain(fn, n)
    jax.block_until_ready(f(*args))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s (read + write) of the fastest of a device copy and elementwise passes over nbytes."""
    best_bw = 0.0
    for dtype, fn in ((jnp.float32, lambda a: a + 1.0), (jnp.bfloat16, lambda a: a + jnp.bfloat16(1)),
                      (jnp.float32, jnp.copy)):
        x = jnp.ones((nbytes // jnp.dtype(dtype).itemsize,), dtype)
        f = jax.jit(fn)
        jax.block_until_ready(f(x))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            best_bw = max(best_bw, 2 * nbytes / (time.perf_counter() - t0))
        del x
    return best_bw


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_tree_mask(t: int, rng) -> np.ndarray:
    """Ancestor-or-self mask of a random tree on t nodes in topological order (node 0 the root)."""
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
    mask = np.eye(t, dtype=bool)
    for i in range(1, t):
        mask[i] = mask[parent[i]]
        mask[i, i] = True
    return mask


def baselines(interpret: bool):
    """Name -> fn(q [B, H, D], k, v, lengths) for the decode comparisons available here."""
    out = {"reference (XLA)": lambda q, k, v, ln: decode_attention_reference(q, k, v, ln)}
    if interpret:
        return out
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

        out["jax pallas gqa"] = lambda q, k, v, ln: jax_decode.gqa(q, k, v, kv_seq_len=ln)
    except Exception as e:  # noqa: BLE001 - report, do not fail the run
        print(f"(jax pallas decode_attention unavailable: {e})")

    def cudnn(q, k, v, ln):
        o = jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=ln, implementation="cudnn")
        return o[:, 0]

    out["cudnn (jax.nn)"] = cudnn
    return out


def torch_sdpa_time(b, s, h, kvh, d, repeats) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, kvh, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=kvh != h)
    torch.cuda.synchronize()
    best = math.inf
    n = 20
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=kvh != h)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / n)
    del q, k, v
    torch.cuda.empty_cache()
    return best


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    ap_.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap_.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap_.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap_.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    ap_.add_argument("--tree-seq", type=int, nargs="+", default=[1024, 4096, 16384])
    ap_.add_argument("--heads", type=int, default=32)
    ap_.add_argument("--head-dim", type=int, default=128)
    ap_.add_argument("--iters", type=int, default=10)
    ap_.add_argument("--repeats", type=int, default=5)
    ap_.add_argument("--no-torch", action="store_true")
    ap_.add_argument("--out", default=None)
    args = ap_.parse_args()
    interpret = args.smoke or jax.default_backend() == "cpu"
    if interpret:
        args.batch, args.seq, args.kv_heads, args.tree_sizes, args.tree_seq = [2], [256], [4, 2], [1, 5], [256]
        args.heads, args.head_dim, args.iters, args.repeats = 8, 64, 2, 1
    dtype = jnp.float32 if interpret else jnp.bfloat16
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    rng = np.random.default_rng(0)
    h, d = args.heads, args.head_dim
    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  interpret=interpret, dtype=str(jnp.dtype(dtype)), decode=[], tree=[], checks=[])

    bw = None
    if not interpret:
        bw = copy_bandwidth(2 << 30, args.repeats)
        print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write, 2 GiB buffers)")
    result["copy_bandwidth_Bps"] = bw
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"attention-{result['date']}-{device_name()}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    def save() -> None:  # after every shape, so a run cut short still leaves its rows
        write_json(out_path, result, indent=1)

    ours = {
        "jaxmedusa unified-max": lambda q, k, v, ln: ap.decode_attention(q, k, v, ln, interpret=interpret),
        "jaxmedusa exact": lambda q, k, v, ln: ap.decode_attention(q, k, v, ln, unified_max=None,
                                                                   interpret=interpret),
    }
    others = baselines(interpret)

    def arrays(b, s, kvh):
        q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
        k = jnp.asarray(rng.standard_normal((b, s, kvh, d)), dtype)
        v = jnp.asarray(rng.standard_normal((b, s, kvh, d)), dtype)
        return q, k, v

    print(f"\nDECODE ATTENTION  H={h} D={d} {jnp.dtype(dtype).name}  (us per call; GB/s of live K+V; % of copy BW)")
    print(f"{'B':>3} {'S':>6} {'KVH':>4}  {'impl':<24} {'us':>9} {'GB/s':>8} {'%BW':>6} {'rel err':>9}")
    for kvh in args.kv_heads:
        for b in args.batch:
            for s in args.seq:
                q, k, v = arrays(b, s, kvh)
                full = jnp.full((b,), s, jnp.int32)
                ragged = jnp.asarray(rng.integers(1, s + 1, size=b).astype(np.int32)).at[0].set(1)
                ref = decode_attention_reference(q, k, v, ragged)
                nbytes = 2 * b * s * kvh * d * jnp.dtype(dtype).itemsize
                for name, fn in {**ours, **others}.items():
                    err = rel_err(fn(q, k, v, ragged), ref) if not name.startswith("reference") else 0.0
                    try:
                        sec = time_op(fn, (q, k, v, full), args.iters, args.repeats)
                    except Exception as e:  # noqa: BLE001 - a baseline failing to run is reported, not fatal
                        print(f"{b:>3} {s:>6} {kvh:>4}  {name:<24} failed: {str(e).splitlines()[0][:60]}")
                        continue
                    if name.startswith("jaxmedusa"):
                        result["checks"].append(dict(op="decode", impl=name, b=b, s=s, kvh=kvh, rel_err=err,
                                                     ok=err < tol))
                    row = dict(b=b, s=s, kvh=kvh, impl=name, us=sec * 1e6, GBps=nbytes / sec / 1e9,
                               frac_bw=(nbytes / sec / bw) if bw else None, rel_err=err)
                    result["decode"].append(row)
                    frac = f"{100 * row['frac_bw']:.0f}" if bw else "-"
                    print(f"{b:>3} {s:>6} {kvh:>4}  {name:<24} {row['us']:>9.1f} {row['GBps']:>8.0f} {frac:>6} "
                          f"{err:>9.1e}")
                if not args.no_torch and not interpret:
                    sec = torch_sdpa_time(b, s, h, kvh, d, args.repeats)
                    if sec is not None:
                        result["decode"].append(dict(b=b, s=s, kvh=kvh, impl="torch sdpa", us=sec * 1e6,
                                                     GBps=nbytes / sec / 1e9, frac_bw=nbytes / sec / bw))
                        print(f"{b:>3} {s:>6} {kvh:>4}  {'torch sdpa':<24} {sec * 1e6:>9.1f} "
                              f"{nbytes / sec / 1e9:>8.0f} {100 * nbytes / sec / bw:>6.0f}")
                del q, k, v
                save()

    print(f"\nTREE ATTENTION  H={h} D={d}  (us per call; ratio = tree time / our decode time on the same cache)")
    print(f"{'B':>3} {'S':>6} {'KVH':>4} {'T':>4}  {'ours us':>9} {'ratio':>6} {'ref us':>9} {'rel err':>9}")
    for kvh in args.kv_heads:
        for b in args.batch:
            for s in args.tree_seq:
                q1, k, v = arrays(b, s, kvh)
                full_dec = jnp.full((b,), s, jnp.int32)
                dec = time_op(ours["jaxmedusa unified-max"], (q1, k, v, full_dec), args.iters, args.repeats)
                for t in args.tree_sizes:
                    qt = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
                    mask = jnp.asarray(random_tree_mask(t, rng))
                    ragged = jnp.asarray(rng.integers(0, s - t + 1, size=b).astype(np.int32))
                    out = ap.tree_attention(qt, k, v, ragged, mask, interpret=interpret)
                    err = rel_err(out, tree_attention_reference(qt, k, v, ragged, mask))
                    lens = jnp.full((b,), s - t, jnp.int32)
                    fn = lambda q_, k_, v_, ln, m=mask: ap.tree_attention(q_, k_, v_, ln, m, interpret=interpret)
                    rfn = lambda q_, k_, v_, ln, m=mask: tree_attention_reference(q_, k_, v_, ln, m)
                    sec = time_op(fn, (qt, k, v, lens), args.iters, args.repeats)
                    rsec = time_op(rfn, (qt, k, v, lens), args.iters, args.repeats)
                    result["checks"].append(dict(op="tree", b=b, s=s, kvh=kvh, t=t, rel_err=err, ok=err < tol))
                    result["tree"].append(dict(b=b, s=s, kvh=kvh, t=t, us=sec * 1e6, ratio_to_decode=sec / dec,
                                               ref_us=rsec * 1e6, rel_err=err))
                    print(f"{b:>3} {s:>6} {kvh:>4} {t:>4}  {sec * 1e6:>9.1f} {sec / dec:>6.2f} {rsec * 1e6:>9.1f} "
                          f"{err:>9.1e}")
                del k, v
                save()

    bad = [c for c in result["checks"] if not c["ok"]]
    print(f"\ncorrectness: {len(result['checks']) - len(bad)}/{len(result['checks'])} kernel checks within "
          f"{tol:g} relative error")
    save()
    print(f"wrote {out_path}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
