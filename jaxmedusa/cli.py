"""The `jaxmedusa` command: one entry point, subcommands. Bad input gives one line and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or token ids) from prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="prompt text; with --ids, comma-separated token ids (e.g. 1,15,27)")
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048, help="KV cache slots per sequence")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--ids", action="store_true", help="prompts are comma-separated token ids")
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, texts, stats)")
    p.set_defaults(func=cmd_generate)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--ids prompt {text!r} is not a comma-separated list of integers") from None


def cmd_generate(args) -> int:
    import jaxmedusa

    model = jaxmedusa.load(args.model, dtype=args.dtype, max_len=args.max_len)
    prompts = [_parse_ids(p) for p in args.prompts] if args.ids else list(args.prompts)
    if not args.ids and model.tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; pass token ids with --ids")
    result = jaxmedusa.generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    if args.json:
        print(json.dumps({"tokens": result.tokens, "texts": result.texts, "stats": result.stats}))
        return 0
    for i, toks in enumerate(result.tokens):
        body = result.texts[i] if result.texts is not None else " ".join(map(str, toks))
        prefix = "" if args.ids else args.prompts[i]
        print(prefix + body)
    s = result.stats
    print(f"[{s['new_tokens']} tokens in {s['seconds']:.2f}s, {s['tokens_per_second']:.1f} tokens/s, "
          f"{s['tokens_per_step']:.2f} tokens/step, compile {s['compile_seconds']:.1f}s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmedusa", description="Medusa speculative decoding in JAX")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, OSError) as e:
        if args.debug:
            raise
        print(f"jaxmedusa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
