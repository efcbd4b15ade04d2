"""The embedded default model's numbers: held-out perplexity, acceptance, and vanilla vs Medusa speed.

    python bench/default_model.py --heldout runs/default-model/corpus/heldout.jsonl [--sweep]

- perplexity: exp(mean next-token loss) over every token of the held-out stdlib files (packed windows);
  needs the corpus that configs/default-model/build.py writes (skipped without --heldout).
- acceptance and speed on the shipped held-out prompts (jaxmedusa/assets/default/heldout_prompts.json),
  one prompt at a time as `jaxmedusa generate` runs them, greedy: Medusa with the shipped tree and with
  mc_sim_7b_63 (trimmed to 4 heads), and vanilla, interleaved per prompt after a warm-up of each, so the
  ratio is measured side by side. The script fails if any Medusa output differs from vanilla.
- --sweep: trees of several sizes grown from the heads' measured top-k accuracies (build.json).
Prints a table; writes bench/results/default_model[-sweep]-DATE-DEVICE.json (and --out, when given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxmedusa
from jaxmedusa.loading import DEFAULT_MODEL_DIR
from jaxmedusa.tree import DEFAULT_TREE, grow_tree, published_trees

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import device_name  # noqa: E402


def perplexity(model, path: str, seq_len: int = 512) -> tuple[float, int]:
    """(exp of the mean next-token NLL, number of predicted tokens) over a JSONL of {"text": ...} documents."""
    from jaxmedusa.train.data import ChatRenderer, load_conversations, tokenize

    data = tokenize(load_conversations(path), ChatRenderer(model.tokenizer), seq_len, packing=True)
    lm = model.lm

    @jax.jit
    def nll(tokens, mask):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = lm(tokens, pos, None, None)
        logp = jax.nn.log_softmax(lm.logits(hidden[:, :-1]), axis=-1)
        tok_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        m = mask[:, 1:]
        return -jnp.sum(tok_logp * m), jnp.sum(m)

    total, count = 0.0, 0
    for i in range(0, len(data), 8):
        s, n = nll(jnp.asarray(data.tokens[i:i + 8]), jnp.asarray(data.mask[i:i + 8], jnp.float32))
        total, count = total + float(s), count + int(n)
    return math.exp(total / count), count


def run_prompts(model, prompts, max_new_tokens: int, trees: dict) -> dict:
    """Greedy generation of every prompt (batch 1) with vanilla and each tree, interleaved per prompt."""
    kinds = {"vanilla": dict(medusa=False), **{name: dict(tree=t) for name, t in trees.items()}}
    for kw in kinds.values():  # compile every (kind, prompt bucket) first
        for p in prompts:
            jaxmedusa.generate(model, p, max_new_tokens=max_new_tokens, **kw)
    acc = {k: dict(seconds=0.0, tokens=0, steps=0, emitted=0, outputs=[]) for k in kinds}
    for p in prompts:
        for k, kw in kinds.items():
            r = jaxmedusa.generate(model, p, max_new_tokens=max_new_tokens, **kw)
            a = acc[k]
            a["seconds"] += r.stats["seconds"]
            a["tokens"] += r.stats["new_tokens"]
            a["outputs"].append(r.tokens[0])
            if k != "vanilla":
                hist = r.stats["accepted_histogram"]
                a["steps"] += sum(hist)
                a["emitted"] += sum((j + 1) * h for j, h in enumerate(hist))
                a["tree_nodes"] = r.stats["tree_nodes"]
    v = acc["vanilla"]
    rows = []
    for k, a in acc.items():
        row = dict(kind=k, tokens=a["tokens"], seconds=round(a["seconds"], 4),
                   tokens_per_second=a["tokens"] / a["seconds"])
        if k != "vanilla":
            row.update(tree_nodes=a["tree_nodes"], mean_accepted_tokens_per_step=a["emitted"] / a["steps"],
                       speedup=row["tokens_per_second"] / (v["tokens"] / v["seconds"]),
                       identical_to_vanilla=a["outputs"] == v["outputs"])
        rows.append(row)
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", default=None, help="held-out corpus JSONL (build.py's corpus/heldout.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="only the first N shipped prompts")
    ap.add_argument("--sweep", action="store_true", help="also time trees of other sizes grown from accuracies")
    ap.add_argument("--out", default=None, help="also merge the results into this JSON file")
    args = ap.parse_args()

    model = jaxmedusa.load()
    with open(os.path.join(DEFAULT_MODEL_DIR, "heldout_prompts.json")) as f:
        prompts = json.load(f)[:args.limit]
    with open(os.path.join(DEFAULT_MODEL_DIR, "build.json")) as f:
        build = json.load(f)
    k = model.heads.num_heads
    trees = {"shipped": model.tree, DEFAULT_TREE: [p for p in published_trees()[DEFAULT_TREE] if len(p) <= k]}
    if args.sweep:
        acc = np.asarray(build["head_topk_accuracy"])
        for size in (2, 4, 8, 12, 24, 32, 48, 64):
            trees[f"grown-{size}"] = grow_tree(acc, size)[0]

    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  prompts=len(prompts), max_new_tokens=args.max_new_tokens, max_len=model.max_len)
    if args.heldout:
        ppl, n = perplexity(model, args.heldout)
        result.update(heldout_perplexity=ppl, heldout_tokens=n)
        print(f"held-out perplexity {ppl:.3f} over {n} tokens")
    result.update(run_prompts(model, prompts, args.max_new_tokens, trees))
    print(f"{len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, greedy, batch 1; "
          f"device {device_name()}; jax {jax.__version__}")
    print(f"{'kind':>14} {'nodes':>6} {'tokens/s':>9} {'accepted/step':>14} {'speedup':>8} {'== vanilla':>10}")
    for r in result["rows"]:
        print(f"{r['kind']:>14} {r.get('tree_nodes', 1):>6} {r['tokens_per_second']:>9.1f} "
              f"{r.get('mean_accepted_tokens_per_step', 1.0):>14.3f} {r.get('speedup', 1.0):>7.2f}x "
              f"{str(r.get('identical_to_vanilla', True)):>10}")
    name = f"default_model{'-sweep' if args.sweep else ''}-{result['date']}-{device_name().replace(' ', '_')}.json"
    outs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)] + ([args.out] if args.out else [])
    for out in outs:
        merged = {}
        if out == args.out and os.path.isfile(out):
            with open(out) as f:
                merged = json.load(f)
        merged.update(result)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(merged, f, indent=1)
        print(f"wrote {out}")
    if not all(r.get("identical_to_vanilla", True) for r in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
