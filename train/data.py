"""Training data: ShareGPT-style conversations -> token ids with an assistant-only loss mask -> batches.

Records are `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}` (ShareGPT),
`{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}`, or a plain document
`{"text": ...}` (pretraining: `<bos>text<eos>`, every token in the loss), in a JSON list or JSONL.
A conversation is rendered as one string, with the tokenizer's chat template or a plain
Vicuna-style template (`USER: ...` / `ASSISTANT: ...`), and the character span of every assistant reply
(its end-of-turn marker included) is recorded; after tokenisation, exactly the tokens that start inside
those spans are in the loss mask. So user, system and template tokens never count.

Examples are packed (concatenated and cut into seq_len windows) or padded one conversation each.
Batches follow a permutation per epoch drawn from (seed, epoch); a batch is fully determined by its
position (examples consumed so far), which is what a checkpoint stores for exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from jaxmedusa.atomic import atomic_open

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


class DataError(ValueError):
    """Unusable training data; the message names the file, the record and the field."""


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant", or "text" for a plain document
    content: str


def _parse_record(rec: Any, where: str) -> list[Message]:
    if isinstance(rec, dict):
        if "text" in rec and "conversations" not in rec and "messages" not in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: 'text' must be a string")
            return [Message("text", rec["text"])]
        if "conversations" in rec:
            turns, role_key, text_key = rec["conversations"], "from", "value"
        elif "messages" in rec:
            turns, role_key, text_key = rec["messages"], "role", "content"
        else:
            raise DataError(f"{where}: expected a 'conversations' or 'messages' list or a 'text' string, "
                            f"found keys {sorted(rec)}")
    elif isinstance(rec, list):
        turns, role_key, text_key = rec, "role", "content"
    else:
        raise DataError(f"{where}: expected an object with 'conversations' or 'messages', got {type(rec).__name__}")
    if not isinstance(turns, list):
        raise DataError(f"{where}: the conversation is not a list of turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}, turn {j}: expected an object, got {type(turn).__name__}")
        rk = role_key if role_key in turn else ("role" if "role" in turn else "from")
        tk = text_key if text_key in turn else ("content" if "content" in turn else "value")
        if rk not in turn or tk not in turn:
            raise DataError(f"{where}, turn {j}: needs '{role_key}' and '{text_key}' (or role/content)")
        role = _ROLES.get(str(turn[rk]).lower())
        if role is None:
            raise DataError(f"{where}, turn {j}: unknown role {turn[rk]!r}; known: {', '.join(sorted(_ROLES))}")
        if not isinstance(turn[tk], str):
            raise DataError(f"{where}, turn {j}: '{tk}' must be a string")
        out.append(Message(role, turn[tk]))
    return out


def load_conversations(path: str) -> list[list[Message]]:
    """Reads a JSON list or a JSONL file of conversations."""
    if not os.path.isfile(path):
        raise DataError(f"no data file at {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None
        where = [f"{path}, record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e})") from None
            where.append(f"{path}, line {n}")
    return [_parse_record(r, w) for r, w in zip(records, where)]


def save_conversations(path: str, conversations: Iterable[Sequence[Message]]) -> None:
    """Writes JSONL records in the messages (role/content) form."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in conv]},
                               ensure_ascii=False) + "\n")


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


class ChatRenderer:
    """Renders conversations to text, with the character spans of assistant replies.

    template "auto" uses the tokenizer's chat template when it has one, else the plain template:
    `[system\\n]USER: u\\nASSISTANT: a<eos>\\n...`; "vicuna" is FastChat's Vicuna v1.1 conversation
    (`<system> USER: u ASSISTANT: a<eos>USER: ...`, with Vicuna's default system prompt), what Vicuna and the
    Medusa heads trained on it expect. A generation prompt ends with `ASSISTANT:`.
    """

    def __init__(self, tokenizer, template: str = "auto"):
        self.tokenizer = tokenizer
        self.use_chat_template = template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.vicuna = template == "vicuna"
        self.eos = tokenizer.eos_token or ""
        self.bos = tokenizer.bos_token or ""

    def _template(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)

    def _plain_turn(self, m: Message) -> str:
        if self.vicuna:
            if m.role == "system":
                return ""  # the system prompt leads the conversation (_start)
            return f"USER: {m.content} " if m.role == "user" else f"ASSISTANT: {m.content}{self.eos}"
        if m.role == "system":
            return m.content + "\n"
        if m.role == "user":
            return f"USER: {m.content}\n"
        return f"ASSISTANT: {m.content}{self.eos}\n"

    def _start(self, messages: Sequence[Message]) -> str:
        if not self.vicuna:
            return self.bos
        system = next((m.content for m in messages if m.role == "system"), VICUNA_SYSTEM)
        return self.bos + system + " "

    def prompt(self, messages: Sequence[Message]) -> str:
        """The text that precedes the next assistant reply (a generation prompt)."""
        if self.use_chat_template:
            return self._template(messages, True)
        return self._start(messages) + "".join(self._plain_turn(m) for m in messages) + "ASSISTANT:"

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The generation prompt's token ids (the rendered text carries its own special tokens)."""
        return list(self.tokenizer(self.prompt(messages), add_special_tokens=False)["input_ids"])

    def render(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character span of each assistant reply]); a plain document is all one span."""
        if len(messages) == 1 and messages[0].role == "text":
            text = self.bos + messages[0].content + self.eos
            return text, [(len(self.bos), len(text))]
        spans = []
        if not self.use_chat_template:
            text = self._start(messages)
            for m in messages:
                if m.role == "assistant":
                    start = len(text) + len("ASSISTANT:")
                    text += self._plain_turn(m)
                    spans.append((start, len(text) - (0 if self.vicuna else 1)))  # reply + eos, not a newline
                else:
                    text += self._plain_turn(m)
            return text, spans
        text = self._template(messages, False)
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self._template(messages[:i], True) if i else self._template([], True)
            upto = self._template(messages[:i + 1], False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError("the tokenizer's chat template does not render conversations incrementally "
                                "(a prefix of the conversation is not a prefix of its text); use chat_template: plain")
            spans.append((len(before), len(upto)))
        return text, spans

    def encode(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """Token ids and the loss mask (True where the token belongs to an assistant reply)."""
        text, spans = self.render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        mask = []
        for a, b in offsets:
            mask.append(b > a and any(s <= a < e for s, e in spans))
        return list(ids), mask


@dataclasses.dataclass
class TokenizedData:
    """Examples [N, seq_len] int32 and their loss masks [N, seq_len] bool."""

    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize(conversations: Sequence[Sequence[Message]], renderer: ChatRenderer, seq_len: int, *,
             packing: bool, pad_id: int = 0) -> TokenizedData:
    """Encodes, then packs into seq_len windows or pads/truncates one conversation per example.

    Examples with no assistant token are dropped.
    """
    encoded = [renderer.encode(c) for c in conversations]
    if packing:
        ids = np.array([t for e in encoded for t in e[0]], np.int32)
        mask = np.array([m for e in encoded for m in e[1]], bool)
        n = len(ids) // seq_len
        if n == 0:
            raise DataError(f"the data holds {len(ids)} tokens, fewer than one packed example of seq_len {seq_len}")
        tokens, masks = ids[:n * seq_len].reshape(n, seq_len), mask[:n * seq_len].reshape(n, seq_len)
    else:
        tokens = np.full((len(encoded), seq_len), pad_id, np.int32)
        masks = np.zeros((len(encoded), seq_len), bool)
        for i, (t, m) in enumerate(encoded):
            t, m = t[:seq_len], m[:seq_len]
            tokens[i, :len(t)], masks[i, :len(m)] = t, m
    keep = masks.any(axis=1)
    if not keep.any():
        raise DataError("no example has an assistant token within seq_len; nothing to train on")
    return TokenizedData(tokens[keep], masks[keep])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, position: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the batch that starts `position` examples into the stream of shuffled epochs."""
    epochs, offsets = np.divmod(position + np.arange(batch_size), n)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(n, seed, int(e))[offsets[sel]]
    return out


def get_batch(data: TokenizedData, position: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, L], mask [B, L]) of the batch at `position`."""
    idx = batch_indices(len(data), position, batch_size, seed)
    return data.tokens[idx], data.mask[idx]
