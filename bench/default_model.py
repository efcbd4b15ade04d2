"""The embedded default model's numbers: held-out bits per byte, acceptance, parse rate, vanilla vs Medusa speed.

    python bench/default_model.py --heldout runs/default-model/corpus/heldout.jsonl [--sweep] [--repeats 5]

- bits per byte and perplexity: the next-token loss summed over every predicted token of the held-out
  files (packed windows), over the UTF-8 bytes those tokens spell; needs the corpus that
  configs/default-model/build.py writes (skipped without --heldout; --heldout-deps adds the held-out
  dependency files).
- acceptance and speed on the shipped held-out prompts (jaxmedusa/assets/default/heldout_prompts.json),
  one prompt at a time as `jaxmedusa generate` runs them, greedy: Medusa with the shipped tree and with
  mc_sim_7b_63 (trimmed to the heads there are), and vanilla, interleaved per prompt after a warm-up of
  each, so the ratio is measured side by side; --repeats rounds over all prompts give the median speedup
  and its spread (min..max). The script fails if any Medusa output differs from vanilla.
- parse rate: each prompt (the first lines of a held-out function) continued greedily until its function
  ends (the first statement back at column 0, found by Python's tokenizer) or --parse-tokens run out; the
  fraction whose function ends and parses with ast.parse.
- --sweep: trees of several sizes grown from the heads' measured top-k accuracies (build.json).
- --int8-heads: the heads also as Medusa-1 heads (each with its own copy of the lm_head, so the same
  proposals) in float and with int8 projections (jaxmedusa.quantize_heads), on the shipped tree.
Prints a table; writes bench/results/default_model[-sweep]-DATE-DEVICE.json (and --out, when given).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import json
import math
import os
import sys
import tokenize

import jax
import jax.numpy as jnp
import numpy as np

import jaxmedusa
from jaxmedusa.atomic import write_json
from jaxmedusa.heads import MedusaHeads
from jaxmedusa.loading import DEFAULT_MODEL_DIR
from jaxmedusa.tree import DEFAULT_TREE, grow_tree, published_trees

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import device_name  # noqa: E402


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id spells, for a byte-level BPE tokenizer (special tokens spell none)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = np.zeros(len(vocab), np.int64)
    for i, tok in enumerate(vocab):
        if i in special or tok is None:
            continue
        if not set(tok) <= alphabet:
            raise ValueError(f"token {i} ({tok!r}) is not byte-level BPE; bits per byte needs a byte-level tokenizer")
        out[i] = len(tok)
    return out


def heldout_loss(model, path: str, seq_len: int = 512) -> dict:
    """Perplexity and bits per byte over a JSONL of {"text": ...} documents: the summed next-token NLL of every
    predicted token (packed windows; a window's first token is not predicted) over the bytes they spell."""
    from jaxmedusa.train.data import ChatRenderer, load_conversations, tokenize

    data = tokenize(load_conversations(path), ChatRenderer(model.tokenizer), seq_len, packing=True)
    lm = model.lm
    nbytes = jnp.asarray(token_bytes(model.tokenizer))

    @jax.jit
    def nll(tokens, mask):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = lm(tokens, pos, None, None)
        logp = jax.nn.log_softmax(lm.logits(hidden[:, :-1]), axis=-1)
        tok_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        m = mask[:, 1:]
        return -jnp.sum(tok_logp * m), jnp.sum(m), jnp.sum(nbytes[tokens[:, 1:]] * m)

    total, count, size = 0.0, 0, 0
    for i in range(0, len(data), 8):
        s, n, nb = nll(jnp.asarray(data.tokens[i:i + 8]), jnp.asarray(data.mask[i:i + 8], jnp.float32))
        total, count, size = total + float(s), count + int(n), size + int(nb)
    return dict(perplexity=math.exp(total / count), bits_per_byte=total / math.log(2) / size, tokens=count,
                bytes=size, bytes_per_token=size / count)


def function_block(text: str) -> str | None:
    """The top-level function at the start of text: the lines up to the statement that dedents to column 0
    (found by Python's tokenizer, so strings and comments at column 0 do not end it); None when the text
    ends inside the function (its end was not generated)."""
    depth = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.INDENT:
                depth += 1
            elif tok.type == tokenize.DEDENT:
                depth -= 1
                if depth == 0:
                    return "\n".join(text.split("\n")[:tok.start[0] - 1])
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        if isinstance(e, tokenize.TokenError):  # EOF inside a string, bracket or the function
            return None
        line = e.lineno or 0  # a dedent to no enclosing level: the block ends broken there
        return "\n".join(text.split("\n")[:line])
    return None


def parse_rate(model, prompts: list[str], max_new_tokens: int) -> dict:
    """Greedy continuations of function headers: how many end their block within max_new_tokens and parse."""
    r = jaxmedusa.generate(model, prompts, max_new_tokens=max_new_tokens, medusa=False)
    ended = parsed = 0
    for p, t in zip(prompts, r.texts):
        block = function_block(p + t)
        if block is None:
            continue
        ended += 1
        try:
            ast.parse(block)
            parsed += 1
        except SyntaxError:
            pass
    return dict(prompts=len(prompts), max_new_tokens=max_new_tokens, block_ended=ended, parsed=parsed,
                parse_fraction=parsed / len(prompts))


def first_differences(outputs: list[list[int]], reference: list[list[int]]) -> list[dict]:
    """{prompt, token}: each prompt whose tokens differ from the reference's, and the first position they do."""
    out = []
    for i, (a, b) in enumerate(zip(outputs, reference)):
        if a != b:
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(dict(prompt=i, token=j))
    return out


def own_projection_heads(model) -> MedusaHeads:
    """The model's shared-lm_head heads as Medusa-1 heads: the same residual blocks, each head with its own copy
    of the lm_head as its vocab projection. They propose what the shared heads propose, in the layout that
    quantize_heads() takes."""
    shared = model.heads
    own = MedusaHeads.for_model(model.lm, shared.num_heads, shared.num_layers, shared_lm_head=False)
    for src, dst in zip(shared.heads, own.heads):
        for a, b in zip(src.blocks, dst.blocks):
            b.linear.kernel.set_value(a.linear.kernel[...])
            b.linear.bias.set_value(a.linear.bias[...])
    return own


def run_prompts(model, prompts, max_new_tokens: int, kinds: dict, repeats: int = 1) -> dict:
    """Greedy generation of every prompt (batch 1) with vanilla and each kind (generate() keyword arguments, and
    optionally "heads" to run with), interleaved per prompt, in `repeats` rounds over all prompts; each round
    gives one speedup per kind (its tokens/s over vanilla's)."""
    kinds = {"vanilla": dict(medusa=False), **kinds}
    original_heads = model.heads

    def generate(p, kw):
        model.heads = kw.get("heads", original_heads)
        return jaxmedusa.generate(model, p, max_new_tokens=max_new_tokens,
                                  **{k: v for k, v in kw.items() if k != "heads"})

    for kw in kinds.values():  # compile every (kind, prompt bucket) first
        for p in prompts:
            generate(p, kw)
    acc = {k: dict(seconds=[], tokens=0, steps=0, emitted=0, outputs=[]) for k in kinds}
    for round_ in range(repeats):
        for a in acc.values():
            a["seconds"].append(0.0)
        for i, p in enumerate(prompts):
            for k, kw in kinds.items():
                r = generate(p, kw)
                a = acc[k]
                a["seconds"][-1] += r.stats["seconds"]
                if round_:
                    if r.tokens[0] != a["outputs"][i]:
                        raise RuntimeError(f"{k}: prompt {i} gave other tokens in round {round_ + 1} than in round 1")
                    continue
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
        tps = [a["tokens"] / sec for sec in a["seconds"]]
        row = dict(kind=k, tokens=a["tokens"], seconds=[round(x, 4) for x in a["seconds"]],
                   tokens_per_second=float(np.median(tps)))
        if k != "vanilla":
            speedups = [vs / ms for ms, vs in zip(a["seconds"], v["seconds"])]  # same tokens, per round
            differing = first_differences(a["outputs"], v["outputs"])
            row.update(tree_nodes=a["tree_nodes"], mean_accepted_tokens_per_step=a["emitted"] / a["steps"],
                       speedup=float(np.median(speedups)), speedup_min=min(speedups), speedup_max=max(speedups),
                       speedups=[round(x, 4) for x in speedups], identical_to_vanilla=not differing,
                       differing=differing)
        rows.append(row)
    model.heads = original_heads
    return {"rows": rows, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", default=None, help="held-out corpus JSONL (build.py's corpus/heldout.jsonl)")
    ap.add_argument("--heldout-deps", default=None, help="also the held-out dependency files (heldout_deps.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--parse-tokens", type=int, default=384, help="new tokens a function may take to end (parse rate)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over all prompts (median and spread)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N shipped prompts")
    ap.add_argument("--sweep", action="store_true", help="also time trees of other sizes grown from accuracies")
    ap.add_argument("--sweep-sizes", type=int, nargs="+", default=[2, 4, 8, 12, 16, 24, 32, 48, 64])
    ap.add_argument("--int8-heads", action="store_true",
                    help="also run the heads as Medusa-1 heads (own lm_head copies), in float and int8 "
                         "(quantize_heads), with the shipped tree")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: load()'s (float32 on CPU, the checkpoint's fp16 on a GPU)")
    ap.add_argument("--out", default=None, help="also merge the results into this JSON file")
    args = ap.parse_args()

    model = jaxmedusa.load(dtype=args.dtype)
    with open(os.path.join(DEFAULT_MODEL_DIR, "heldout_prompts.json")) as f:
        prompts = json.load(f)[:args.limit]
    with open(os.path.join(DEFAULT_MODEL_DIR, "build.json")) as f:
        build = json.load(f)
    k = model.heads.num_heads
    trees = {"shipped": model.tree, DEFAULT_TREE: [p for p in published_trees()[DEFAULT_TREE] if len(p) <= k]}
    if args.sweep:
        acc = np.asarray(build["head_topk_accuracy"])
        for size in args.sweep_sizes:
            trees[f"grown-{size}"] = grow_tree(acc, size)[0]

    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  dtype=jnp.dtype(model.dtype).name, prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                  max_len=model.max_len)
    for key, path in (("heldout", args.heldout), ("heldout_deps", args.heldout_deps)):
        if path:
            result[key] = heldout_loss(model, path)
            print(f"{key}: {result[key]['bits_per_byte']:.4f} bits/byte, perplexity {result[key]['perplexity']:.3f} "
                  f"over {result[key]['tokens']} tokens ({result[key]['bytes_per_token']:.2f} bytes/token)")
    result["parse"] = parse_rate(model, prompts, args.parse_tokens)
    print(f"parse: {result['parse']['parsed']} of {len(prompts)} continued functions parse "
          f"({result['parse']['block_ended']} ended within {args.parse_tokens} tokens)")
    kinds = {name: dict(tree=t) for name, t in trees.items()}
    if args.int8_heads:
        own = own_projection_heads(model)
        kinds["own-float"] = dict(tree=model.tree, heads=own)
        kinds["own-int8"] = dict(tree=model.tree, heads=jaxmedusa.quantize_heads(own))
    result.update(run_prompts(model, prompts, args.max_new_tokens, kinds, args.repeats))
    print(f"{len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, greedy, batch 1, {args.repeats} "
          f"rounds; device {device_name()}; jax {jax.__version__}")
    print(f"{'kind':>14} {'nodes':>6} {'tokens/s':>9} {'accepted/step':>14} {'speedup':>8} {'min..max':>11} "
          f"{'== vanilla':>10}")
    for r in result["rows"]:
        spread = f"{r['speedup_min']:.2f}..{r['speedup_max']:.2f}" if "speedup" in r else ""
        print(f"{r['kind']:>14} {r.get('tree_nodes', 1):>6} {r['tokens_per_second']:>9.1f} "
              f"{r.get('mean_accepted_tokens_per_step', 1.0):>14.3f} {r.get('speedup', 1.0):>7.2f}x {spread:>11} "
              f"{'yes' if not r.get('differing') else str(len(r['differing'])) + ' differ':>10}")
    name = (f"default_model{'-sweep' if args.sweep else ''}{'-int8-heads' if args.int8_heads else ''}{'-' + args.dtype if args.dtype else ''}-{result['date']}-"
            f"{device_name().replace(' ', '_')}.json")
    outs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)] + ([args.out] if args.out else [])
    for out in outs:
        merged = {}
        if out == args.out and os.path.isfile(out):
            with open(out) as f:
                merged = json.load(f)
        merged.update(result)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json(out, merged, indent=1)
        print(f"wrote {out}")
    if not all(r.get("identical_to_vanilla", True) for r in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
