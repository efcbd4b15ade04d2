"""Sweep the tree-attention kernel's tuning parameters on a few shapes (GPU).

    python bench/tune_tree.py

Prints microseconds per call for each (block_m, block_k, num_warps) and the decode-attention time on
the same cache; writes bench/results/tune_tree-DATE-DEVICE.json.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmedusa.kernels import attention_pallas as ap

from attention import device_name, random_tree_mask, time_op  # bench/attention.py beside this file


def main() -> None:
    rng = np.random.default_rng(0)
    h, d = 32, 128
    rows = []
    for b, s, kvh, t in ((1, 4096, 8, 64), (1, 16384, 8, 64), (8, 1024, 8, 64), (1, 4096, 32, 64)):
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
    with open(os.path.join(out, f"tune_tree-{date}-{device_name()}.json"), "w") as f:
        json.dump(dict(date=date, device=device_name(), jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
