"""Mean accepted tokens per Medusa step on held-out prompts: trained heads vs untrained heads.

    python bench/acceptance.py --model runs/tiny-cpu/model --heads runs/tiny-cpu/heads \
        --data configs/train/data/tiny-chat-heldout.jsonl

The prompts are the first user turn of each held-out conversation, rendered with the same chat template
as training. "Untrained" heads are fresh ones for the same base (identity ResBlocks, projections copied
from the lm_head: what training starts from). Greedy decoding, so both runs must emit the vanilla
tokens; the script checks that. Prints a table and writes bench/results/acceptance-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax

import jaxmedusa
from jaxmedusa.atomic import write_json
from jaxmedusa.heads import MedusaHeads
from jaxmedusa.train.data import ChatRenderer, load_conversations

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import device_name  # noqa: E402


def held_out_prompts(model, data: str, limit: int, template: str) -> list[list[int]]:
    renderer = ChatRenderer(model.tokenizer, template)
    convs = load_conversations(data)[:limit]
    prompts = []
    for conv in convs:
        first_user = next(i for i, m in enumerate(conv) if m.role == "user")
        text = renderer.prompt(conv[:first_user + 1])
        prompts.append(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def measure(model, prompts, tree, max_new_tokens: int, batch: int) -> dict:
    """Greedy Medusa generation over all prompts in batches; returns summed acceptance stats and tokens."""
    tokens, steps, emitted = [], 0, 0
    for i in range(0, len(prompts), batch):
        r = jaxmedusa.generate(model, prompts[i:i + batch], max_new_tokens=max_new_tokens, tree=tree)
        tokens += r.tokens
        active = sum(r.stats["accepted_histogram"])
        steps += active
        emitted += sum((j + 1) * h for j, h in enumerate(r.stats["accepted_histogram"]))
    return {"mean_accepted_tokens_per_step": emitted / steps, "steps": steps, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tree", default=None, help="default: mc_sim_7b_63 trimmed to the heads")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--template", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model = jaxmedusa.load(args.model, heads=args.heads, max_len=512)
    prompts = held_out_prompts(model, args.data, args.limit, args.template)
    trained = measure(model, prompts, args.tree, args.max_new_tokens, args.batch)
    model.heads = MedusaHeads.for_model(model.lm, model.heads.num_heads, model.heads.num_layers,
                                        shared_lm_head=model.heads.shared_lm_head)
    fresh = measure(model, prompts, args.tree, args.max_new_tokens, args.batch)
    vanilla = []
    for i in range(0, len(prompts), args.batch):
        vanilla += jaxmedusa.generate(model, prompts[i:i + args.batch], max_new_tokens=args.max_new_tokens,
                                      medusa=False).tokens
    same = trained["tokens"] == vanilla and fresh["tokens"] == vanilla
    rows = [dict(heads="trained", **{k: v for k, v in trained.items() if k != "tokens"}),
            dict(heads="untrained", **{k: v for k, v in fresh.items() if k != "tokens"})]
    print(f"{len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, greedy; device {device_name()}")
    print(f"{'heads':>10} {'mean accepted tokens/step':>26} {'steps':>7}")
    for r in rows:
        print(f"{r['heads']:>10} {r['mean_accepted_tokens_per_step']:>26.3f} {r['steps']:>7}")
    print(f"tokens identical to vanilla greedy: {same}")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"acceptance-{date}-{device_name().replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, dict(date=date, device=device_name(), jax=jax.__version__, args=vars(args), rows=rows,
                         identical_to_vanilla=same))
    print(f"wrote {out}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
