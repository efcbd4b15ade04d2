"""Self-distillation throughput at real model shapes: `jaxmedusa.train.distill` (batched vanilla generation
of every assistant turn) on a random bf16 model, generated tokens per second for each --batch.

    python bench/distill.py                          # Llama-2-7B shapes, 128 one-turn conversations
    python bench/distill.py --smoke                  # tiny shapes, any backend (checks the script)

The model is random (no hub), so it rarely emits EOS: every reply runs to --new tokens, the worst case of a
real dataset. The tokenizer is a word-level one over the whole vocabulary (w3 .. wV), so every generated id
decodes and re-encodes to one token; prompts are --prompt random words. Each batch size runs once to compile,
then is timed on the same conversations. Writes bench/results/distill-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer ('<unk>', '<s>', '</s>', w3 ... w{V-1}) as transformers loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    with tempfile.TemporaryDirectory() as d:
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, local_files_only=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--conversations", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=256, help="words per user turn")
    ap.add_argument("--new", type=int, default=256, help="max_new_tokens per reply")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.conversations, args.prompt, args.new, args.batch = "smoke", 6, 12, 8, [2, 4]
        args.max_len = 64

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmedusa
    from decode import device_name, write_result
    from e2e import MODELS
    from jaxmedusa.models import ModelConfig, create_lm
    from jaxmedusa.train.data import Message
    from jaxmedusa.train.distill import distill

    cfg = ModelConfig.from_hf_dict(MODELS[args.model])
    lm = create_lm(cfg, dtype=jnp.float32 if args.smoke else jnp.bfloat16, rngs=nnx.Rngs(0))
    tokenizer = word_tokenizer(cfg.vocab_size)
    model = jaxmedusa.Model(lm=lm, tokenizer=tokenizer, max_len=args.max_len)
    rng = random.Random(0)
    convs = [[Message("user", " ".join(f"w{rng.randrange(3, cfg.vocab_size)}" for _ in range(args.prompt))),
              Message("assistant", "")] for _ in range(args.conversations)]
    rows = []
    for b in args.batch:
        distill(model, convs[:b], max_new_tokens=args.new, batch_size=b, template="plain")  # compile
        t0 = time.perf_counter()
        out = distill(model, convs, max_new_tokens=args.new, batch_size=b, template="plain")
        seconds = time.perf_counter() - t0
        generated = sum(len(tokenizer(c[-1].content, add_special_tokens=False)["input_ids"]) for c in out)
        rows.append(dict(batch=b, conversations=len(out), seconds=seconds, generated_tokens=generated,
                         tokens_per_s=generated / seconds, replies_per_s=len(out) / seconds))
        print(f"distill B={b}: {len(out)} replies, {generated} tokens in {seconds:.1f} s: "
              f"{generated / seconds:.0f} tok/s, {len(out) / seconds:.2f} replies/s", flush=True)
    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  model=args.model, args={k: v for k, v in vars(args).items() if k != "out"}, rows=rows)
    write_result(result, f"distill-{args.model}", args.out)


if __name__ == "__main__":
    main()
