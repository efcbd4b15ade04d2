"""The `jaxmedusa` command: one entry point, subcommands. Bad input gives one line and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or token ids) from prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="prompt text; with --ids, comma-separated token ids (e.g. 1,15,27)")
    p.add_argument("--model", default=None, help="model directory, or a hub id in the local Hugging Face cache "
                                                 "(default: the embedded model, a small Llama trained on Python's "
                                                 "standard library, with its heads)")
    p.add_argument("--revision", default=None, help="with a hub id: branch, tag or commit (default main)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=None,
                   help="upper limit on KV cache slots per sequence (default: the model's maximum length); "
                        "each request's cache is sized to what its prompts, new tokens and tree need")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="split the model across N devices (attention heads, MLP columns, vocabulary, KV cache)")
    p.add_argument("--ids", action="store_true", help="prompts are comma-separated token ids")
    p.add_argument("--heads", default=None, help="Medusa heads-only directory (official format), or a hub id in the "
                                                  "local Hugging Face cache")
    p.add_argument("--no-medusa", action="store_true", help="vanilla decoding even when heads are loaded")
    p.add_argument("--heads-int8", action="store_true",
                   help="store the heads' own vocab projections as int8 (half the bytes a step reads for them; "
                        "greedy output is unchanged, acceptance may move slightly)")
    p.add_argument("--tree", default=None, help="published tree name, chain-N, or a JSON file of paths")
    p.add_argument("--acceptance", choices=["greedy", "typical", "rejection"], default="greedy")
    p.add_argument("--top-k", type=int, default=10, help="candidates per head")
    p.add_argument("--compare", action="store_true",
                   help="also run vanilla decoding and print both speeds, the speedup and mean accepted length")
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, texts, stats)")
    p.add_argument("--chat", action="store_true", help="each prompt is one user message, rendered with the "
                                                       "tokenizer's chat template (Vicuna v1.1 when it has none)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt)")
    p.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat, streaming each reply as its tokens are accepted "
                                    "(/reset clears the conversation, /stats shows the last reply's speed, /quit)")
    p.add_argument("--model", default=None, help="model directory or hub id in the local Hugging Face cache "
                                                 "(default: the embedded model)")
    p.add_argument("--revision", default=None)
    p.add_argument("--heads", default=None, help="Medusa heads directory or hub id")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N", help="split the model across N devices")
    p.add_argument("--no-medusa", action="store_true")
    p.add_argument("--heads-int8", action="store_true", help="the heads' own vocab projections as int8")
    p.add_argument("--tree", default=None)
    p.add_argument("--acceptance", choices=["greedy", "typical", "rejection"], default="greedy")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    import jaxmedusa
    from .chat import chat

    model = jaxmedusa.load(args.model, heads=args.heads, dtype=args.dtype, max_len=args.max_len, revision=args.revision,
                           mesh=args.tensor_parallel)
    _quantize_heads(model, args.heads_int8)
    interactive = sys.stdin.isatty()
    if interactive:
        print("jaxmedusa chat: /reset clears the conversation, /stats shows speed, /quit ends", file=sys.stderr)
    return chat(model, prompt=(lambda: print("USER: ", end="", flush=True)) if interactive else None,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                medusa=None if not args.no_medusa else False, tree=args.tree, acceptance=args.acceptance)


def _quantize_heads(model, int8: bool) -> None:
    """--heads-int8: the model's heads with int8 vocab projections, or one clear line why not."""
    if not int8:
        return
    import jaxmedusa

    if model.heads is None:
        raise CLIError("--heads-int8 needs Medusa heads (--heads DIR or a Medusa-2 model directory)")
    try:
        model.heads = jaxmedusa.quantize_heads(model.heads)
    except ValueError as e:
        raise CLIError(f"--heads-int8: {e}") from None


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--ids prompt {text!r} is not a comma-separated list of integers") from None


def cmd_generate(args) -> int:
    import jaxmedusa

    prompts = [_parse_ids(p) for p in args.prompts] if args.ids else list(args.prompts)
    if args.chat and args.ids:
        raise CLIError("--chat renders text messages; it cannot take --ids")
    if args.stream and (len(prompts) > 1 or args.json or args.compare or args.ids):
        raise CLIError("--stream prints one text prompt's reply as it is generated; give one prompt, without "
                       "--ids/--json/--compare")
    model = jaxmedusa.load(args.model, heads=args.heads, dtype=args.dtype, max_len=args.max_len, revision=args.revision,
                           mesh=args.tensor_parallel)
    _quantize_heads(model, args.heads_int8)
    if not args.ids and model.tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer; pass token ids with --ids")
    if args.chat:
        from .chat import renderer_for
        from .train.data import Message

        renderer = renderer_for(model.tokenizer)
        prompts = [renderer.prompt_ids([Message("user", p)]) for p in prompts]
    use_medusa = model.heads is not None and not args.no_medusa
    if args.compare and not use_medusa:
        raise CLIError("--compare needs Medusa heads (--heads DIR or a Medusa-2 model directory)")
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    mkw = dict(kw, medusa=use_medusa, tree=args.tree, acceptance=args.acceptance, top_k=args.top_k)
    if args.stream:
        from .chat import status_line, stream_text

        if not args.chat:
            print(args.prompts[0], end="", flush=True)
        _, stats = stream_text(model, prompts[0], sys.stdout, **mkw)
        print(flush=True)
        print(status_line(stats, use_medusa), file=sys.stderr)
        return 0
    result = jaxmedusa.generate(model, prompts, **mkw)
    compile_seconds = result.stats["compile_seconds"]
    vanilla = None
    if args.compare:
        result, vanilla, speedups = compare_runs(model, prompts, mkw, kw)
    if args.json:
        payload = {"tokens": result.tokens, "texts": result.texts, "stats": result.stats}
        if vanilla is not None:
            payload["vanilla"] = {"tokens": vanilla.tokens, "stats": vanilla.stats}
            payload["speedups"] = speedups
        print(json.dumps(payload))
        return 0
    for i, toks in enumerate(result.tokens):
        body = result.texts[i] if result.texts is not None else " ".join(map(str, toks))
        prefix = "" if args.ids or args.chat else args.prompts[i]
        print(prefix + body)
    s = result.stats
    if s["medusa"]:
        kind = (f"medusa {s['acceptance']}, {s['mean_accepted_tokens_per_step']:.2f} accepted tokens/step, "
                f"tree {s['tree_nodes']} nodes")
    else:
        kind = "vanilla"
    sys.stdout.flush()  # the text first, then the stats lines on stderr
    print(f"[{s['new_tokens']} tokens in {s['seconds']:.2f}s, {s['tokens_per_second']:.1f} tokens/s; {kind}; "
          f"compile {compile_seconds:.1f}s]", file=sys.stderr)
    if vanilla is not None:
        v = vanilla.stats
        same = "identical" if vanilla.tokens == result.tokens else "different"
        print(f"[vanilla: {v['new_tokens']} tokens in {v['seconds']:.2f}s, {v['tokens_per_second']:.1f} tokens/s; "
              f"medusa speedup {statistics.median(speedups):.2f}x (median of {len(speedups)} runs of each, "
              f"{min(speedups):.2f}..{max(speedups):.2f}); {same} tokens]", file=sys.stderr)
    return 0


COMPARE_MIN_RUNS, COMPARE_MAX_RUNS, COMPARE_MIN_SECONDS = 5, 50, 1.0


def compare_runs(model, prompts, medusa_kw: dict, vanilla_kw: dict):
    """(Medusa result, vanilla result, per-run speedups): after a compiling run of each, runs of the two
    alternate, at least COMPARE_MIN_RUNS and until each side has run COMPARE_MIN_SECONDS in all, so a
    short generation's timer noise and one-off stalls do not decide the figure. The results returned are
    the runs whose time is the median of their side."""
    import jaxmedusa

    jaxmedusa.generate(model, prompts, medusa=False, **vanilla_kw)  # the Medusa side compiled in the first run
    runs = {"medusa": [], "vanilla": []}
    while len(runs["vanilla"]) < COMPARE_MAX_RUNS and (
            len(runs["vanilla"]) < COMPARE_MIN_RUNS
            or min(sum(r.stats["seconds"] for r in side) for side in runs.values()) < COMPARE_MIN_SECONDS):
        runs["medusa"].append(jaxmedusa.generate(model, prompts, **medusa_kw))
        runs["vanilla"].append(jaxmedusa.generate(model, prompts, medusa=False, **vanilla_kw))
    speedups = [m.stats["tokens_per_second"] / v.stats["tokens_per_second"]
                for m, v in zip(runs["medusa"], runs["vanilla"])]

    def median_run(side):
        ordered = sorted(side, key=lambda r: r.stats["seconds"])
        return ordered[len(ordered) // 2]

    return median_run(runs["medusa"]), median_run(runs["vanilla"]), speedups


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between PyTorch formats and jaxmedusa")
    csub = p.add_subparsers(dest="what", required=True)
    h = csub.add_parser("heads", help="Medusa heads: official .pt/.safetensors (any key variant) or vLLM's layout "
                                      "-> official safetensors layout (.pt with --pt) or vLLM's (--to vllm)")
    h.add_argument("src")
    h.add_argument("dst")
    h.add_argument("--model", default=None, help="base model directory (for hidden/vocab sizes); default: "
                                                  "read them from the heads")
    h.add_argument("--pt", action="store_true", help="write medusa_lm_head.pt (torch) instead of safetensors")
    h.add_argument("--to", choices=["official", "vllm"], default="official",
                   help="official: FasterDecoding's layout (PyTorch Medusa, TensorRT-LLM's Medusa converter); "
                        "vllm: vLLM's Medusa draft model (config model_type medusa + model.safetensors; vLLM "
                        "proposes each head's top-1 only, no tree)")
    h.add_argument("--from", dest="source", choices=["auto", "official", "vllm"], default="auto",
                   help="the source layout (default: recognised from its config.json)")
    h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    h.set_defaults(func=cmd_convert_heads)
    m = csub.add_parser("model", help="HF model directory (.bin, sharded, Medusa-2) -> safetensors directory; "
                                      "embedded Medusa heads go to --heads-out in the heads-only layout")
    m.add_argument("src")
    m.add_argument("dst")
    m.add_argument("--heads", default=None, help="heads-only directory to convert alongside")
    m.add_argument("--heads-out", default=None)
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    m.add_argument("--max-shard-mb", type=int, default=None)
    m.set_defaults(func=cmd_convert_model)


def _np_dtype(name):
    if name is None:
        return None
    import jax.numpy as jnp

    return jnp.dtype(name)


def cmd_convert_heads(args) -> int:
    import jax.numpy as jnp

    from .heads_io import (configured_layers, configured_tree, heads_from_state_dict, read_heads_tensors, save_heads,
                           save_heads_vllm)

    tensors, config = read_heads_tensors(args.src)
    found = "vllm" if config.get("model_type") == "medusa" else "official"
    if args.source not in ("auto", found):
        raise CLIError(f"{args.src} holds heads in the {found} layout, not {args.source}")
    hidden, vocab = _heads_sizes(tensors, config, args.model)
    source = f"heads in {args.src}"
    heads = heads_from_state_dict(tensors, hidden=hidden, vocab=vocab, dtype=jnp.float32,
                                  num_layers=configured_layers(config), source=source)
    if args.to == "vllm":
        if args.pt:
            raise CLIError("--pt writes the official layout; vLLM's layout is safetensors")
        lm_head = _base_lm_head(args.model) if heads.shared_lm_head and args.model else None
        save_heads_vllm(heads, args.dst, lm_head=lm_head, dtype=_np_dtype(args.dtype))
    else:
        save_heads(heads, args.dst, base_model=config.get("base_model_name_or_path"), dtype=_np_dtype(args.dtype),
                   tree=configured_tree(config, source), pt=args.pt)
    print(f"wrote {heads.num_heads} heads x {heads.num_layers} layers to {args.dst} ({args.to} layout)")
    return 0


def _base_lm_head(model_dir: str) -> np.ndarray:
    """The base model's LM head as HF stores it, [vocab, hidden] (the embeddings when tied)."""
    import jaxmedusa

    lm = jaxmedusa.load(model_dir, dtype="float32", max_len=16).lm
    if lm.lm_head is None:
        return np.asarray(lm.embed_tokens.embedding[...])
    return np.asarray(lm.lm_head.kernel[...]).T


def _heads_sizes(tensors, config, model_dir):
    if model_dir is not None:
        from .loading import resolve_dir
        from .models import ModelConfig

        cfg = ModelConfig.from_json(resolve_dir(model_dir))
        return cfg.embed_dim, cfg.vocab_size
    if config.get("hidden_size") and config.get("vocab_size"):  # jaxmedusa's and vLLM's heads configs say
        return int(config["hidden_size"]), int(config["vocab_size"])
    for key, arr in tensors.items():
        if key.endswith(".linear.bias"):
            hidden = arr.shape[0]
            vocab = next((a.shape[0] for k, a in tensors.items() if k.endswith(".weight") and "linear" not in k),
                         None)
            if vocab is None:
                raise CLIError("these heads reuse the base lm_head; pass --model to give the vocabulary size")
            return hidden, vocab
    raise CLIError("cannot tell the hidden size from these heads; pass --model")


def cmd_convert_model(args) -> int:
    import jaxmedusa

    from .heads_io import save_heads

    model = jaxmedusa.load(args.src, heads=args.heads, dtype=args.dtype or "float32", max_len=16)
    shard = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    jaxmedusa.save(model, args.dst, max_shard_bytes=shard)
    msg = f"wrote {args.dst}"
    if model.heads is not None:
        if not args.heads_out:
            raise CLIError("the model has Medusa heads; pass --heads-out DIR to write them")
        save_heads(model.heads, args.heads_out, base_model=args.dst, tree=model.tree)
        msg += f" and {model.heads.num_heads} heads to {args.heads_out}"
    print(msg)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train Medusa heads (medusa1), heads and base jointly (medusa2), or a base LM "
                                     "(pretrain) from a YAML config; resumes from the latest checkpoint")
    p.add_argument("config", help="YAML training config (see configs/train/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; mesh.fsdp=2 for nested keys)")
    p.add_argument("--restart", action="store_true",
                   help="start over in output_dir, removing an earlier run's checkpoints, metrics and exports "
                        "(a run resumes by default, and refuses other settings than it was started with)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from jaxmedusa.train import load_config, train
    from jaxmedusa.train.sharding import maybe_initialize_distributed

    cfg = load_config(args.config, args.overrides)
    maybe_initialize_distributed()
    result = train(cfg, restart=args.restart)
    last = next((h for h in reversed(result.history) if h.get("split") != "eval"), {})
    summary = {"step": result.step, "loss": last.get("loss"), "head_acc": last.get("head_acc"),
               "lm_acc": last.get("lm_acc"), "heads": result.heads_dir, "model": result.model_dir}
    print(json.dumps({k: v for k, v in summary.items() if v is not None}))
    return 0


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="self-distillation: regenerate a dataset's assistant turns with the model")
    p.add_argument("--model", required=True, help="local HF model directory (with its tokenizer)")
    p.add_argument("--data", required=True, nargs="+", help="ShareGPT-style JSON/JSONL files")
    p.add_argument("--out", required=True, help="output JSONL (messages with role/content)")
    p.add_argument("--heads", default=None,
                   help="Medusa heads directory: decode with them (faster; greedy replies equal vanilla's, sampled "
                        "ones use lossless rejection acceptance)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048, help="KV cache slots per sequence")
    p.add_argument("--chat-template", choices=["auto", "plain"], default="auto")
    p.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    p.add_argument("--too-long", choices=["skip", "truncate"], default="skip",
                   help="a conversation with a turn that does not fit in --max-len: leave it out, or keep its "
                        "replies that fit (either way it is named on stderr)")
    p.add_argument("--restart", action="store_true",
                   help="start over, discarding the progress of a stopped run (OUT.partial); by default a run "
                        "started again with the same settings resumes from it")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    import jaxmedusa
    from jaxmedusa.train.data import load_conversations
    from jaxmedusa.train.distill import DistillProgress, distill

    convs, where = [], []
    for path in args.data:
        loaded = load_conversations(path)
        convs += loaded
        where += [f"{path}, conversation {n + 1}" for n in range(len(loaded))]
    convs, where = convs[:args.limit], where[:args.limit]
    settings = dict(model=os.path.abspath(args.model), data=[os.path.abspath(p) for p in args.data], limit=args.limit,
                    heads=args.heads and os.path.abspath(args.heads),
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, max_len=args.max_len, chat_template=args.chat_template, too_long=args.too_long)
    progress = DistillProgress(args.out, settings, restart=args.restart)
    todo = progress.pending(len(convs))
    if len(todo) < len(convs):
        print(f"jaxmedusa distill: resuming from {progress.path}: {len(progress.done)} conversations finished, "
              f"{len(progress.skipped)} left out, {len(todo)} to go", file=sys.stderr)
    model = jaxmedusa.load(args.model, heads=args.heads, max_len=args.max_len) if todo else None

    def skipped(j: int, why: str) -> None:
        print(f"jaxmedusa distill: {where[todo[j]]}: {why}", file=sys.stderr)
        progress.record_skipped(todo[j], why)

    try:
        if todo:
            distill(model, [convs[i] for i in todo], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, template=args.chat_template,
                    too_long=args.too_long, on_skip=skipped,
                    on_done=lambda j, conv: progress.record_done(todo[j], conv))
    except BaseException:
        print(f"jaxmedusa distill: stopped; {len(progress.done)} finished conversations are kept in {progress.path}: "
              f"run the same command again to resume", file=sys.stderr)
        raise
    out = progress.finish()
    print(f"wrote {len(out)} conversations to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmedusa", description="Medusa speculative decoding in JAX")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_chat(sub)
    _add_convert(sub)
    _add_train(sub)
    _add_distill(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("jaxmedusa: interrupted", file=sys.stderr)
        return 2
    except (CLIError, ValueError, FileNotFoundError, OSError, MemoryError, OverflowError, RuntimeError) as e:
        if args.debug:
            raise
        # known failures: bad input, damaged or foreign files, a run that stopped on NaN, out of memory
        print(f"jaxmedusa: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback under --debug
        if args.debug:
            raise
        print(f"jaxmedusa: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
