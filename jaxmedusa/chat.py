"""Interactive chat and streamed text: the model's replies printed as their tokens are accepted.

The conversation is rendered with the tokenizer's chat template, or FastChat's Vicuna v1.1 conversation
for models without one (what Vicuna and the published Medusa heads were trained on). Each reply streams
through `stream()` (the same jitted steps as `generate()`), so with heads a step may print several tokens.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, TextIO

from .generate import stream
from .loading import Model


def renderer_for(tokenizer):
    """The chat renderer: the tokenizer's template when it has one, else Vicuna v1.1."""
    from jaxmedusa.train.data import ChatRenderer

    return ChatRenderer(tokenizer, "auto" if getattr(tokenizer, "chat_template", None) else "vicuna")


def stream_text(model: Model, prompt: str | list[int], out: TextIO, **kw) -> tuple[str, dict]:
    """Streams one prompt's reply (text or token ids, as generate() takes) to `out` as text, decoding the whole
    reply each step so characters split across tokens print whole. Returns (text, stats: new_tokens, seconds,
    tokens_per_second, steps, tokens_per_step)."""
    tok = model.tokenizer
    tokens: list[int] = []
    shown, steps = "", 0
    t0 = time.perf_counter()
    for chunk in stream(model, [prompt], **kw):
        if not chunk[0]:
            continue
        tokens += chunk[0]
        steps += 1
        text = tok.decode(tokens, skip_special_tokens=True)
        if text.startswith(shown):  # print the new tail; a rewritten tail (rare) is printed at the end
            out.write(text[len(shown):])
            out.flush()
            shown = text
    seconds = time.perf_counter() - t0
    text = tok.decode(tokens, skip_special_tokens=True)
    if text != shown:
        out.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
    stats = dict(new_tokens=len(tokens), seconds=seconds, steps=steps,
                 tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
                 tokens_per_step=len(tokens) / steps if steps else 0.0)
    return text, stats


def status_line(stats: dict, medusa: bool) -> str:
    per_step = f", {stats['tokens_per_step']:.2f} accepted tokens/step" if medusa else ""
    return f"[{stats['new_tokens']} tokens, {stats['tokens_per_second']:.1f} tokens/s{per_step}]"


def chat(model: Model, *, lines: Iterable[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         prompt: Callable[[], None] | None = None, **kw) -> int:
    """Runs a chat: each line is a user message; /reset clears the history, /stats shows the last reply's
    numbers, /quit (or end of input) ends. `kw` go to stream() (max_new_tokens, temperature, medusa, tree...)."""
    from jaxmedusa.train.data import Message

    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer; chat needs one")
    renderer = renderer_for(model.tokenizer)
    medusa = model.heads is not None and kw.get("medusa") is not False
    messages: list[Message] = []
    last: dict | None = None
    source = iter(lines) if lines is not None else None
    while True:
        if prompt is not None:
            prompt()
        try:
            line = next(source) if source is not None else input()
        except (StopIteration, EOFError):
            break
        command = line.strip()
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            messages, last = [], None
            print("[conversation cleared]", file=err)
            continue
        if command == "/stats":
            print(status_line(last, medusa) if last else "[no reply yet]", file=err)
            continue
        if not command:
            continue
        try:
            text, last = stream_text(model, renderer.prompt_ids(messages + [Message("user", line)]), out, **kw)
        except ValueError as e:  # the conversation no longer fits the model's max_len
            print(f"[{e}; /reset to start over]", file=err)
            continue
        out.write("\n")
        out.flush()
        messages += [Message("user", line), Message("assistant", text.strip())]
        print(status_line(last, medusa), file=err)
    return 0
