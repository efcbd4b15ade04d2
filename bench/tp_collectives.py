"""Collectives in the compiled tensor-parallel programs, per layout of the fused q/k/v and gate/up columns, on
a CPU host mesh (no GPUs needed): what each device would send to the others every layer.

    python bench/tp_collectives.py            # tiny Llama (2 layers, 4 KV heads), 4 host devices

Rows: the decode step of `load(..., mesh=4)` and a medusa2 training step on a 2-way tensor mesh, each with
the columns interleaved per device (what load and the trainer do) and in the checkpoint's order (the layout
before: `sharding.interleave_fused` switched off). Counts are ops in the optimised HLO text. Prints a table
and writes bench/results/tp-collectives-DATE-DEVICE.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

OPS = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def count(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in OPS}


def decode_hlo(path: str) -> str:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmedusa
    from jaxmedusa.cache import KVCache

    tp = jaxmedusa.load(path, max_len=64, mesh=4)
    graphdef, state = nnx.split(tp.lm)

    def step(state, cache, tok):
        m = nnx.merge(graphdef, state)
        h, cache = m(tok, cache.lengths[:, None], cache, jnp.ones((1, 1), bool))
        return m.logits(h), cache

    with jaxmedusa.sharding.active(tp.mesh):
        return jax.jit(step).lower(state, KVCache.create(tp.config, 2, 64), jnp.zeros((2, 1), jnp.int32)) \
            .compile().as_text()


def train_hlo(d: str) -> str:
    import jax

    from jaxmedusa.train import Trainer
    from jaxmedusa.train.config import MeshConfig
    from test_train import make_cfg

    cfg = dataclasses.replace(make_cfg(d, tempfile.mkdtemp(dir=d), steps=3, mode="medusa2"),
                              mesh=MeshConfig(data=1, fsdp=1, tensor=2))
    t = Trainer(cfg, devices=jax.devices()[:2])
    tokens, mask = t.batch(0)
    return t._step_fn(True).lower(t.state, t.frozen, tokens, mask).compile().as_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import jax

    import jaxmedusa
    from conftest import random_lm, save_word_tokenizer
    from decode import device_name, write_result
    from jaxmedusa import sharding
    from test_train import write_chat_data

    rows = []
    with tempfile.TemporaryDirectory() as d:
        jaxmedusa.save(random_lm(0, vocab_size=96, num_key_value_heads=4), d + "/model")
        save_word_tokenizer(d + "/model", vocab_size=96)
        write_chat_data(d + "/data.jsonl")
        interleave = sharding.interleave_fused
        for layout in ("checkpoint order", "interleaved"):
            sharding.interleave_fused = interleave if layout == "interleaved" else (lambda lm, params, n: dict(params))
            for program, hlo in (("decode step, tensor 4", decode_hlo(d + "/model")),
                                 ("medusa2 train step, tensor 2", train_hlo(d))):
                rows.append(dict(program=program, layout=layout, layers=2, **count(hlo)))
                print(f"{program:30} {layout:17} " + " ".join(f"{op} {rows[-1][op]}" for op in OPS), flush=True)
        sharding.interleave_fused = interleave
    write_result(dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                      rows=rows), "tp-collectives", args.out)


if __name__ == "__main__":
    main()
