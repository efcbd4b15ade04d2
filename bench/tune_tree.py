"""Sweep the tree-attention kernel's tuning parameters on a few shapes (GPU).

    python bench/tune_tree.py                  # (block_m, block_k, num_warps)
    python bench/tune_tree.py --sweep splits   # num_splits (auto first) at the default blocks
    python bench/tune_tree.py --sweep layers   # (splits, block_k, stages) over 32 layers' caches, as a model
    python bench/tune_tree.py --sweep decode   # decode attention: (block_k, stages, warps, splits) over 32 layers

Prints microseconds per call for each setting and the decode-attention time on the same cache; writes
bench/results/tune_tree[-splits|-layers|-decode]-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmedusa.atomic import write_json
from jaxmedusa.kernels import attention_pallas as ap

from attention import device_name, random_tree_mask, time_op  # bench/attention.py beside this file


SPLIT_SHAPES = ((1, 1024, 32, 1), (1, 1024, 32, 16), (1, 1024, 32, 64), (4, 1024, 32, 64), (1, 8192, 32, 64),
                (4, 8192, 32, 64), (1, 1024, 8, 64), (1, 4096, 8, 64), (8, 1024, 32, 16), (1, 1024, 32, 112))


def sweep_splits(rng, h: int, d: int) -> list[dict]:
    """Time every num_splits (None = the default heuristic) per shape; T = 1 is decode attention."""
    rows = []
    for b, s, kvh, t in SPLIT_SHAPES:
        k = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((b, max(t, 1), h, d)), jnp.bfloat16)
        mask = jnp.asarray(random_tree_mask(t, rng))
        lens = jnp.full((b,), s - t, jnp.int32)
        for ns in (None, 1, 2, 3, 4, 6, 8, 12, 16, 24):
            if t == 1:
                fn = lambda q_, k_, v_, ln, ns=ns: ap.decode_attention(q_[:, 0], k_, v_, ln + 1, num_splits=ns)[:, None]
            else:
                fn = lambda q_, k_, v_, ln, ns=ns: ap.tree_attention(q_, k_, v_, ln, mask, num_splits=ns)
            sec = time_op(fn, (q, k, v, lens), 20, 5)
            rows.append(dict(b=b, s=s, kvh=kvh, t=t, num_splits=ns or "auto", us=sec * 1e6))
            print(f"b={b} s={s:>5} kvh={kvh:>2} t={t:>3} splits={ns or 'auto'}: {sec * 1e6:8.1f} us", flush=True)
    return rows


LAYER_SHAPES = ((1, 1024, 32, 1), (1, 1024, 32, 64), (1, 1024, 8, 64), (1, 1024, 8, 1))
LAYER_CONFIGS = tuple(dict(num_splits=ns, block_k=bk, num_stages=st)
                      for ns, bk, st in itertools.product((None, 2, 4, 8, 16), (64, 128), (2, 3)))
DECODE_SHAPES = ((1, 1024, 32, 1), (4, 1024, 32, 1), (1, 8192, 32, 1), (1, 1024, 8, 1))


# Decode tiles: the default, then block_k x stages x warps x splits (None: the default count). Tiles of fewer than
# 16 rows without tensor cores (broadcast products summed on the CUDA cores) were measured 2-3x slower on an H200
# and dropped (tune_tree-decode-vector-2026-12-02-NVIDIA_H200.log).
DECODE_CONFIGS = ({},) + tuple(dict(block_k=bk, num_stages=st, num_warps=w, num_splits=ns)
                               for bk, st, w, ns in itertools.product((64, 128), (2, 3, 4), (4, 8), (None, 8)))


def sweep_layers(rng, h: int, d: int, layers: int = 32, iters: int = 10, shapes=LAYER_SHAPES,
                 configs=LAYER_CONFIGS) -> list[dict]:
    """Attention as the model runs it: one call per layer, each on its own [B, S, KVH, D] cache, so every
    layer's K/V comes from HBM (a 1k-slot 7B cache is 0.5 GB, ten times the L2), not from the L2 that a
    one-layer microbenchmark keeps hitting. (Separate arrays rather than the model's stacked cache read with
    layer=l: one kernel to compile per setting instead of one per layer.) Microseconds per layer, the query
    pad and the merge included."""
    rows = []
    for b, s, kvh, t in shapes:
        shape = (b, s, kvh, d)
        ks = [jax.random.normal(jax.random.key(2 * i), shape, jnp.bfloat16) for i in range(layers)]
        vs = [jax.random.normal(jax.random.key(2 * i + 1), shape, jnp.bfloat16) for i in range(layers)]
        q0 = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
        mask = jnp.asarray(random_tree_mask(t, rng))
        lens = jnp.full((b,), s - t - 1, jnp.int32)
        for kw in configs:
            def one(q, k_, v_, ln, kw=kw):
                if t == 1:
                    return ap.decode_attention(q[:, 0], k_, v_, ln + 1, **kw)[:, None]
                return ap.tree_attention(q, k_, v_, ln, mask, **kw)

            def layers_loop(q, ks_, vs_, ln):
                def body(_, q):
                    for k_, v_ in zip(ks_, vs_):
                        q = q + (one(q, k_, v_, ln) * 1e-6).astype(q.dtype)
                    return q
                return lax.fori_loop(0, iters, body, q)

            try:  # time_op: one jitted call of the loop (its own warm-up first), best of 5
                sec = time_op(layers_loop, (q0, ks, vs, lens), 1, 5)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported
                print(f"b={b} s={s} kvh={kvh} t={t} {kw}: failed {str(e)[:80]}")
                continue
            us = sec / (iters * layers) * 1e6
            tb_s = 2 * b * s * kvh * d * 2 / us / 1e6  # the live K/V bytes a layer reads, TB/s
            named = {k_: ("auto" if val is None else val) for k_, val in kw.items()}
            rows.append(dict(b=b, s=s, kvh=kvh, t=t, **named, us=us, kv_tb_s=tb_s))
            print(f"b={b} s={s:>5} kvh={kvh:>2} t={t:>3} {named}: {us:7.2f} us/layer ({tb_s:.2f} TB/s of K/V)",
                  flush=True)
        del ks, vs
    return rows


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--sweep", choices=["blocks", "splits", "layers", "decode"], default="blocks")
    ap_.add_argument("--repeats", type=int, default=1, help="run the layers sweep this many times (rows carry `rep`)")
    args = ap_.parse_args()
    rng = np.random.default_rng(0)
    h, d = 32, 128
    if args.sweep in ("layers", "decode"):
        kw = dict(shapes=DECODE_SHAPES, configs=DECODE_CONFIGS) if args.sweep == "decode" else {}
        rows = [dict(r, rep=i) for i in range(args.repeats) for r in sweep_layers(rng, h, d, **kw)]
    else:
        rows = sweep_splits(rng, h, d) if args.sweep == "splits" else []
    for b, s, kvh, t in ((1, 4096, 8, 64), (1, 16384, 8, 64), (8, 1024, 8, 64), (1, 4096, 32, 64)):
        if args.sweep != "blocks":
            break
        q1 = jnp.asarray(rng.standard_normal((b, h, d)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.bfloat16)
        qt = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
        mask = jnp.asarray(random_tree_mask(t, rng))
        dec = time_op(lambda q, k_, v_, ln: ap.decode_attention(q, k_, v_, ln), (q1, k, v, jnp.full((b,), s)), 10, 3)
        lens = jnp.full((b,), s - t, jnp.int32)
        for bm, bk, nw in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
            fn = lambda q, k_, v_, ln: ap.tree_attention(q, k_, v_, ln, mask, block_m=bm, block_k=bk, num_warps=nw)
            try:
                sec = time_op(fn, (qt, k, v, lens), 10, 3)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported
                print(f"b={b} s={s} kvh={kvh} t={t} bm={bm} bk={bk} nw={nw}: failed {str(e)[:80]}")
                continue
            rows.append(dict(b=b, s=s, kvh=kvh, t=t, block_m=bm, block_k=bk, num_warps=nw, us=sec * 1e6,
                             decode_us=dec * 1e6, ratio=sec / dec))
            print(f"b={b} s={s:>5} kvh={kvh:>2} t={t} bm={bm:>3} bk={bk:>3} nw={nw}: {sec * 1e6:8.1f} us "
                  f"(decode {dec * 1e6:6.1f}, ratio {sec / dec:.2f})", flush=True)
    date = datetime.date.today().isoformat()
    out = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    name = "tune_tree" + ("" if args.sweep == "blocks" else f"-{args.sweep}")
    write_json(os.path.join(out, f"{name}-{date}-{device_name()}.json"),
               dict(date=date, device=device_name(), jax=jax.__version__, rows=rows), indent=1)


if __name__ == "__main__":
    main()
