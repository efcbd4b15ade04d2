"""Sweep the tree-attention kernel's tuning parameters on a few shapes (GPU).

    python bench/tune_tree.py                  # (block_m, block_k, num_warps)
    python bench/tune_tree.py --sweep splits   # num_splits (auto first) at the default blocks

Prints microseconds per call for each setting and the decode-attention time on the same cache; writes
bench/results/tune_tree[-splits]-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

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


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--sweep", choices=["blocks", "splits"], default="blocks")
    args = ap_.parse_args()
    rng = np.random.default_rng(0)
    h, d = 32, 128
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
    name = "tune_tree" + ("-splits" if args.sweep == "splits" else "")
    with open(os.path.join(out, f"{name}-{date}-{device_name()}.json"), "w") as f:
        json.dump(dict(date=date, device=device_name(), jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
