"""Builds the embedded default model (jaxmedusa/assets/default) from the Python standard library's sources.

    python configs/default-model/build.py            # every stage; resumes where a run stopped
    python configs/default-model/build.py --stage corpus tokenizer

Stages (outputs under --work, default runs/default-model; only `export` writes into the package):
  corpus     the stdlib subset below -> corpus/{train,heldout}.jsonl ({"text": source} per file) and
             corpus/manifest.json (Python version, every file with its split, size and sha256)
  tokenizer  byte-level BPE (vocab 4096) trained on the train split -> tokenizer/ (HF tokenizer files)
  pretrain   `jaxmedusa train pretrain.yaml`: a small Llama from scratch -> pretrain/model
  distill    self-distillation: the base's own greedy continuations of DISTILL_PROMPTS windows of the
             train split -> corpus/distilled.jsonl (what greedy Medusa must predict is the model's output)
  heads      `jaxmedusa train heads.yaml`: 4 Medusa-1 heads on the frozen base, trained on the distilled
             data -> heads/heads
  export     the tree (grown from the heads' top-k accuracies), float16 model + heads (+ tree) + tokenizer
             + held-out prompts -> jaxmedusa/assets/default
  measure    held-out perplexity, acceptance and vanilla-vs-Medusa speed -> assets/default/build.json

The corpus is deterministic for a given Python version: every `.py` file under the stdlib directory,
sorted by path, minus the folders in EXCLUDED (tests, GUI, data tables, vendored or generated code);
a file is held out when crc32 of its relative path is 0 mod HELDOUT_MOD. The shipped model was built with
the Python and file list recorded in assets/default/manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zlib

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ASSETS = ROOT / "jaxmedusa" / "assets" / "default"
STAGES = ("corpus", "tokenizer", "pretrain", "distill", "heads", "export", "measure")
EXCLUDED = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
            "encodings", "pydoc_data", "__phello__", "venv", "unittest"}
HELDOUT_MOD = 20
VOCAB = 4096
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; the model's bos 1, eos 2
PROMPT_CHARS = 160  # held-out prompts: the first lines of a held-out function, up to this many characters
NUM_PROMPTS = 24
TREE_NODES = 8  # the shipped tree's size (root included): the fastest on a 2-core CPU in the sweep of
#                bench/default_model.py --sweep (bench/results/default_model-sweep-2026-11-24-*.json)
ACCURACY_DOCS = 256  # distilled documents whose head accuracies shape the tree
DISTILL_PROMPTS, DISTILL_PROMPT_TOKENS, DISTILL_NEW_TOKENS, DISTILL_STRIDE = 4096, 48, 208, 512


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
    """(relative path, file) of the corpus, sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(part in EXCLUDED or part.startswith("config-") for part in rel.split("/")[:-1]):
            continue
        out.append((rel, p))
    return out


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELDOUT_MOD == 0


def stage_corpus(work: pathlib.Path) -> None:
    out = work / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"python": sys.version.split()[0], "excluded_dirs": sorted(EXCLUDED), "heldout_mod": HELDOUT_MOD,
                "files": []}
    with open(out / "train.jsonl", "w") as tr, open(out / "heldout.jsonl", "w") as ho:
        for rel, path in stdlib_files():
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            split = "heldout" if is_heldout(rel) else "train"
            (ho if split == "heldout" else tr).write(json.dumps({"text": text, "path": rel}) + "\n")
            manifest["files"].append({"path": rel, "split": split, "bytes": len(raw),
                                      "sha256": hashlib.sha256(raw).hexdigest()})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    n_ho = sum(f["split"] == "heldout" for f in manifest["files"])
    size = sum(f["bytes"] for f in manifest["files"]) / 1e6
    print(f"corpus: {len(manifest['files'])} files ({size:.1f} MB), {n_ho} held out -> {out}")


def read_texts(path: pathlib.Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def stage_tokenizer(work: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(read_texts(work / "corpus" / "train.jsonl"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2, 3]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=2048)
    fast.save_pretrained(work / "tokenizer")
    ids = fast("def fibonacci(n):")["input_ids"]
    print(f"tokenizer: vocab {fast.vocab_size}; 'def fibonacci(n):' -> {fast.convert_ids_to_tokens(ids)}")


def jaxmedusa_train(config: pathlib.Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "jaxmedusa", "train", str(config), *[f"--set={o}" for o in overrides]]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stage_pretrain(work: pathlib.Path) -> None:
    jaxmedusa_train(HERE / "pretrain.yaml", f"output_dir={work / 'pretrain'}",
                    f"tokenizer={work / 'tokenizer'}", f"data={work / 'corpus' / 'train.jsonl'}",
                    f"eval_data={work / 'corpus' / 'heldout.jsonl'}")


def stage_distill(work: pathlib.Path) -> None:
    """Greedy continuations of windows taken every DISTILL_STRIDE tokens of the train split (batched)."""
    import jaxmedusa

    model = jaxmedusa.load(work / "pretrain" / "model", max_len=DISTILL_PROMPT_TOKENS + DISTILL_NEW_TOKENS)
    stream = [t for text in read_texts(work / "corpus" / "train.jsonl")
              for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    starts = range(0, len(stream) - DISTILL_PROMPT_TOKENS, DISTILL_STRIDE)[:DISTILL_PROMPTS]
    prompts = [[model.config.bos_token_id] + stream[s:s + DISTILL_PROMPT_TOKENS - 1] for s in starts]
    out = work / "corpus" / "distilled.jsonl"
    with open(out, "w") as f:
        for i in range(0, len(prompts), 128):
            batch = prompts[i:i + 128]
            r = jaxmedusa.generate(model, batch, max_new_tokens=DISTILL_NEW_TOKENS, medusa=False)
            for p, t in zip(batch, r.tokens):
                f.write(json.dumps({"text": model.tokenizer.decode(p[1:] + t, skip_special_tokens=True)}) + "\n")
    print(f"distill: {len(prompts)} greedy continuations of {DISTILL_NEW_TOKENS} tokens -> {out}")


def stage_heads(work: pathlib.Path) -> None:
    jaxmedusa_train(HERE / "heads.yaml", f"output_dir={work / 'heads'}", f"model={work / 'pretrain' / 'model'}",
                    f"data={work / 'corpus' / 'distilled.jsonl'}", f"eval_data={work / 'corpus' / 'heldout.jsonl'}")


def heldout_prompts(work: pathlib.Path) -> list[str]:
    """The first lines of top-level functions in held-out files, one per file in turn, deterministic."""
    per_file = []
    for text in read_texts(work / "corpus" / "heldout.jsonl"):
        lines = text.splitlines(keepends=True)
        found = []
        for i, line in enumerate(lines):
            if line.startswith("def ") and line.rstrip().endswith(":"):
                found.append("".join(lines[i:i + 3])[:PROMPT_CHARS])
        per_file.append(found)
    prompts, k = [], 0
    while len(prompts) < NUM_PROMPTS and any(k < len(f) for f in per_file):
        prompts += [f[k] for f in per_file if k < len(f)]
        k += 1
    return prompts[:NUM_PROMPTS]


def default_tree(work: pathlib.Path) -> tuple[list[list[int]], list[list[float]]]:
    """The TREE_NODES-node tree grown from the heads' top-k accuracies on distilled text (the model's own
    greedy output, which is what greedy Medusa verifies)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from speedup_sim import measure_accuracies

    from jaxmedusa.tree import grow_tree

    acc = measure_accuracies(str(work / "pretrain" / "model"), str(work / "heads" / "heads"),
                             str(work / "corpus" / "distilled.jsonl"), top_k=10, seq_len=512, packing=True,
                             limit=ACCURACY_DOCS)
    return grow_tree(acc, TREE_NODES)[0], acc.round(4).tolist()


def stage_export(work: pathlib.Path) -> None:
    import jax.numpy as jnp

    import jaxmedusa

    tree, acc = default_tree(work)
    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    model = jaxmedusa.load(work / "pretrain" / "model", heads=work / "heads" / "heads", dtype="float32", max_len=16)
    jaxmedusa.save(model, ASSETS / "model", dtype=jnp.float16)
    jaxmedusa.save_heads(model.heads, ASSETS / "heads", base_model="jaxmedusa/assets/default/model",
                         dtype=jnp.float16, tree=tree)
    shutil.copy(work / "corpus" / "manifest.json", ASSETS / "manifest.json")
    (ASSETS / "heldout_prompts.json").write_text(json.dumps(heldout_prompts(work), indent=1))
    (ASSETS / "build.json").write_text(json.dumps({"tree_nodes": TREE_NODES, "head_topk_accuracy": acc}, indent=1))
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    print(f"export: {ASSETS} ({size:.1f} MiB)")


def stage_measure(work: pathlib.Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "default_model.py"), "--heldout", str(work / "corpus" / "heldout.jsonl"),
           "--out", str(ASSETS / "build.json")]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--work", default=str(ROOT / "runs" / "default-model"))
    args = ap.parse_args()
    work = pathlib.Path(args.work).resolve()
    for stage in STAGES:
        if stage in args.stage:
            globals()[f"stage_{stage}"](work)


if __name__ == "__main__":
    main()
