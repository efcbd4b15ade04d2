"""Simulated Medusa speedup over the number of tree nodes, as in the Medusa paper's figure:

    speedup(T) = E[tokens per step | best tree of T nodes] / (verify-step time(T) / vanilla step time)

    python bench/speedup_sim.py --e2e bench/results/e2e-...json \
        --model runs/tiny-cpu/model --heads runs/tiny-cpu/heads --data configs/train/data/tiny-chat-heldout.jsonl

Acceptance comes from measured per-head top-k accuracies acc[k][r] (the probability that head k's rank-r
token is the one the model emits k+2 positions ahead), measured here on held-out data with teacher
forcing, or read from a JSON file (--accuracies: a [K][top_k] list). A node whose path is (r_1 .. r_d) is
accepted with probability prod_i acc[i][r_i] (heads taken as independent, as in the paper), so a tree's
expected tokens per step is 1 + the sum of its nodes' probabilities, and the best tree of each size is
grown greedily (a child is never likelier than its parent, so greedy is optimal under this model).
Step-time ratios are the GPU measurements of bench/e2e.py at the same T (its timing trees have the
same node counts; the verify cost depends on T, barely on the shape). Prints a table, writes
bench/results/speedup_sim-DATE.json and a PNG (matplotlib) with one line per sequence length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import numpy as np

from jaxmedusa.atomic import write_json
from jaxmedusa.tree import grow_tree

HERE = os.path.dirname(os.path.abspath(__file__))


def measure_accuracies(model_dir: str, heads_dir: str, data: str, top_k: int, seq_len: int = 256, *,
                       packing: bool = False, limit: int | None = None) -> np.ndarray:
    """acc [K, top_k] of trained heads on conversations or documents (the first `limit`; targets in the
    loss mask only: assistant replies, or every token of a plain-text document)."""
    import jax
    import jax.numpy as jnp

    import jaxmedusa
    from jaxmedusa.train.data import ChatRenderer, load_conversations, tokenize

    model = jaxmedusa.load(model_dir, heads=heads_dir)
    examples = tokenize(load_conversations(data)[:limit], ChatRenderer(model.tokenizer), seq_len, packing=packing)
    k = model.heads.num_heads
    hits = np.zeros((k, top_k))
    counts = np.zeros(k)

    @jax.jit
    def head_top(tokens):
        t = tokens.shape[1]
        hidden, _ = model.lm(tokens, jnp.broadcast_to(jnp.arange(t), tokens.shape), None, None)
        return jax.lax.top_k(model.heads(hidden, model.lm.logits), top_k)[1]  # [K, B, T, top_k]

    for i in range(0, len(examples), 16):
        tok, mask = examples.tokens[i:i + 16], examples.mask[i:i + 16]
        top = np.asarray(head_top(jnp.asarray(tok)))
        for h in range(k):
            shift = h + 2
            target = tok[:, shift:]
            valid = mask[:, shift:]
            match = top[h, :, :-shift] == target[..., None]  # [B, T - shift, top_k]
            hits[h] += (match & valid[..., None]).sum(axis=(0, 1))
            counts[h] += valid.sum()
    return hits / counts[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", required=True, help="bench/e2e.py JSON with the verify-step ratios")
    ap.add_argument("--accuracies", default=None, help="JSON [K][top_k] of per-head top-k accuracies")
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--label", default=None, help="name of the heads in the table and plot")
    ap.add_argument("--batch", type=int, default=4, help="the e2e batch whose ratios to use (the paper: 4)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.accuracies:
        with open(args.accuracies) as f:
            acc = np.asarray(json.load(f), np.float64)
        label = args.label or os.path.basename(args.accuracies)
    else:
        if not (args.model and args.heads and args.data):
            ap.error("give --accuracies, or --model, --heads and --data to measure them")
        acc = measure_accuracies(args.model, args.heads, args.data, args.top_k)
        label = args.label or args.heads
    with open(args.e2e) as f:
        e2e = json.load(f)
    ratios = {(r["prompt"], r["tree_nodes"]): r["ratio"] for r in e2e["verify"] if r["batch"] == args.batch}
    if not ratios:
        raise SystemExit(f"{args.e2e} has no verify-step ratios at batch {args.batch}")
    sizes = sorted({t for _, t in ratios})
    prompts = sorted({p for p, _ in ratios})
    _, expected = grow_tree(acc, max(sizes))
    rows = []
    for p in prompts:
        for t in sizes:
            e = expected[min(t, len(expected)) - 1]
            rows.append(dict(prompt=p, tree_nodes=t, expected_tokens_per_step=e, step_ratio=ratios[(p, t)],
                             speedup=e / ratios[(p, t)]))
    print(f"heads: {label}; top-1 accuracy per head: {', '.join(f'{a:.3f}' for a in acc[:, 0])}")
    print(f"step ratios: {e2e['device']}, {e2e['model']}, batch {args.batch}")
    print(f"{'prompt':>6} " + " ".join(f"T={t:<6}" for t in sizes))
    for p in prompts:
        print(f"{p:>6} " + " ".join(f"{r['speedup']:<8.2f}" for r in rows if r["prompt"] == p))
    print("expected tokens/step: " + " ".join(f"T={t}:{expected[min(t, len(expected)) - 1]:.2f}" for t in sizes))
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"speedup_sim-{date}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, dict(date=date, heads=label, accuracies=acc.tolist(), e2e=os.path.basename(args.e2e),
                         device=e2e["device"], batch=args.batch, rows=rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out} (no matplotlib: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in prompts:
        pts = [r for r in rows if r["prompt"] == p]
        ax.plot([r["tree_nodes"] for r in pts], [r["speedup"] for r in pts], marker="o", label=f"seq len {p}")
    ax.set_xlabel("tree nodes (candidate tokens verified per step)")
    ax.set_ylabel("simulated speedup")
    ax.set_title(f"{e2e['model']} step times on {e2e['device']}, batch {args.batch}\nacceptance: {label}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = os.path.splitext(out)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
