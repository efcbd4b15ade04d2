"""Builds the tiny chat dataset and word-level tokenizer that configs/train/tiny-cpu.yaml trains on.

    python configs/train/data/make_tiny_chat.py      # rewrites the files next to this script

Deterministic (seeded). Conversations are short instructions with long, regular answers (counting,
repeating, spelling, reciting sequences), so a tiny model learns them in minutes on a CPU and the
answers are predictable several tokens ahead, which is what Medusa heads exploit. Output:
tiny-chat-train.jsonl (ShareGPT `conversations`), tiny-chat-heldout.jsonl (role/content `messages`, other
seed), and tokenizer/ (an HF word-level tokenizer that AutoTokenizer loads; no chat template, so the
plain USER:/ASSISTANT: template is used).
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
WORDS = ["cat", "dog", "tree", "house", "river", "stone", "light", "music", "paper", "garden", "window", "apple",
         "bird", "cloud", "road", "ship", "star", "table", "water", "yellow"]


def _count(rng):
    a = rng.randrange(0, 80)
    b = a + rng.randrange(5, 20)
    return f"count from {a} to {b}", "sure : " + " ".join(str(i) for i in range(a, b + 1)) + " . done"


def _count_down(rng):
    b = rng.randrange(0, 60)
    a = b + rng.randrange(5, 20)
    return f"count down from {a} to {b}", "sure : " + " ".join(str(i) for i in range(a, b - 1, -1)) + " . done"


def _steps(rng):
    s = rng.choice([2, 3, 5, 10])
    a = rng.randrange(0, 20)
    n = rng.randrange(5, 12)
    return f"count from {a} in steps of {s} , {n} numbers", \
        "sure : " + " ".join(str(a + s * i) for i in range(n)) + " . done"


def _repeat(rng):
    w, n = rng.choice(WORDS), rng.randrange(3, 12)
    return f"repeat the word {w} {n} times", "here you go : " + " ".join([w] * n) + " . done"


def _spell(rng):
    w = rng.choice(WORDS)
    return f"spell the word {w}", f"the word {w} is spelled " + " ".join(w) + " . done"


def _days(rng):
    i = rng.randrange(7)
    n = rng.randrange(3, 8)
    seq = [DAYS[(i + j) % 7] for j in range(n)]
    return f"list {n} days starting from {DAYS[i]}", "the days are " + " ".join(seq) + " . done"


def _months(rng):
    i = rng.randrange(12)
    n = rng.randrange(3, 10)
    seq = [MONTHS[(i + j) % 12] for j in range(n)]
    return f"list {n} months starting from {MONTHS[i]}", "the months are " + " ".join(seq) + " . done"


def _rainbow(rng):
    return "list the colors of the rainbow", "the colors are " + " ".join(COLORS) + " . done"


TASKS = [_count, _count_down, _steps, _repeat, _spell, _days, _months, _rainbow]


def conversation(rng) -> list[tuple[str, str]]:
    """One to three exchanges of (user, assistant)."""
    return [rng.choice(TASKS)(rng) for _ in range(rng.choice([1, 1, 2, 3]))]


def main() -> None:
    train = [conversation(random.Random(f"train-{i}")) for i in range(3000)]
    heldout = [conversation(random.Random(f"heldout-{i}")) for i in range(64)]
    with open(os.path.join(HERE, "tiny-chat-train.jsonl"), "w") as f:
        for conv in train:
            turns = [t for u, a in conv for t in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]
            f.write(json.dumps({"conversations": turns}) + "\n")
    with open(os.path.join(HERE, "tiny-chat-heldout.jsonl"), "w") as f:
        for conv in heldout:
            turns = [t for u, a in conv for t in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
            f.write(json.dumps({"messages": turns}) + "\n")
    words = sorted({w for conv in train + heldout for u, a in conv for w in (u + " " + a).split()})
    save_tokenizer(os.path.join(HERE, "tokenizer"), ["USER:", "ASSISTANT:"] + words)


def save_tokenizer(path: str, words: list[str]) -> None:
    """A whitespace word-level tokenizer: <unk>, <s>, </s>, <pad>, then `words`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)


if __name__ == "__main__":
    main()
