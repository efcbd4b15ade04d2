"""Builds the embedded default model (jaxmedusa/assets/default) from Python sources every install has.

    python configs/default-model/build.py            # every stage, in order
    python configs/default-model/build.py --stage corpus tokenizer
    python configs/default-model/build.py --stage pretrain distill heads    # the GPU stages, on a GPU host

Stages (outputs under --work, default runs/default-model; only `export` writes into the package):
  corpus     the Python standard library plus the sources of the project's dependencies (SOURCES) ->
             corpus/{train,heldout,heldout_deps}.jsonl ({"text": source, "path": ...} per file),
             corpus/train_sample.jsonl (every SAMPLE_EVERY-th train file) and corpus/manifest.json
             (Python and package versions, every file with its split, size and sha256)
  tokenizer  byte-level BPE (vocab VOCAB) trained on the train split -> tokenizer/ (HF tokenizer files)
  pretrain   `jaxmedusa train pretrain.yaml`: a Llama from scratch -> pretrain/model          [GPU, 5.3 min]
  distill    self-distillation: the base's own greedy continuations of DISTILL_PROMPTS windows spread over
             the train split -> corpus/distilled.jsonl (what greedy Medusa must predict is the model's output)
  heads      `jaxmedusa train heads.yaml`: Medusa-2, the heads trained jointly with the base, which a KL
             loss holds to the pretrained model, on the distilled data and the train sample -> heads/model
             and heads/heads                                          [GPU, 2.6 min; distill 1 min]
  export     the tree (grown from the heads' top-k accuracies), float16 model (heads/model) + heads (+ tree)
             + tokenizer + held-out prompts + a compact manifest -> jaxmedusa/assets/default
  measure    held-out bits per byte, acceptance, parse rate and vanilla-vs-Medusa speed -> build.json

pretrain, distill and heads run anywhere, but their settings are sized for one GPU (times above: an H200);
the other stages run on a CPU. Each stage runs in its own process when several are asked for.

The corpus is deterministic for a given Python version and package versions (the pinned ones in
pyproject.toml; jax and numpy as installed; all recorded in the manifest): every `.py` file under each
source's directory, sorted by path, minus the folders in EXCLUDED (tests, GUI, vendored or generated
code) and files over MAX_FILE_BYTES. A file is held out when crc32 of its path is 0 mod HELDOUT_MOD:
held-out standard-library files (heldout.jsonl, the same files and rule as the first shipped model) give
the reported bits per byte; held-out dependency files (heldout_deps.jsonl) are not trained on either, and
`bench/default_model.py --heldout-deps` measures them (2.1M tokens: long on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
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
EXCLUDED = {"test", "tests", "testing", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
            "encodings", "pydoc_data", "__phello__", "venv", "unittest", "_vendor", "vendor", "third_party"}
# Dependencies whose sources join the standard library: import name -> distribution (its version is recorded).
# All are Apache-2.0 or BSD licensed. torch comes with the `torch` / `test` extras.
SOURCES = {"transformers": "transformers", "torch": "torch", "jax": "jax", "numpy": "numpy", "flax": "flax",
           "optax": "optax", "orbax": "orbax-checkpoint"}
MAX_FILE_BYTES = 400_000  # larger files are generated tables, not code anyone writes
HELDOUT_MOD = 20
SAMPLE_EVERY = 8  # corpus/train_sample.jsonl: every 8th train file, the real text of the heads stage's mix
VOCAB = 8192
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; the model's bos 1, eos 2
PROMPT_CHARS = 160  # held-out prompts: the first lines of a held-out function, up to this many characters
NUM_PROMPTS = 24
TREE_NODES = 8  # the shipped tree's size (root included): 4 and 8 nodes tie on the 2-core CPU (1.00x / 0.97x at
#                128 new tokens), and 8 accepts more (2.46 vs 2.14 tokens/step), which longer replies and GPUs
#                turn into speed: bench/default_model.py --sweep (bench/results/default_model-sweep-2026-12-01-*)
ACCURACY_DOCS = 256  # distilled documents whose head accuracies shape the tree
DISTILL_PROMPTS, DISTILL_PROMPT_TOKENS, DISTILL_NEW_TOKENS, DISTILL_BATCH = 16384, 48, 208, 512


def source_roots() -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (directory, version) of every corpus source: "stdlib" first, then SOURCES in order."""
    roots = {"stdlib": (pathlib.Path(sysconfig.get_paths()["stdlib"]), sys.version.split()[0])}
    for name, dist in SOURCES.items():
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"corpus: the package {name} ({dist}) is not installed; install the project with "
                             f"pip install -e '.[torch]'")
        roots[name] = (pathlib.Path(list(spec.submodule_search_locations)[0]), importlib.metadata.version(dist))
    return roots


def source_files(name: str, root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(corpus path, file) of one source, sorted: stdlib paths are relative to the stdlib directory (as in the
    first shipped model), a package's start with its name."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(part in EXCLUDED or part.startswith("config-") for part in rel.split("/")[:-1]):
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append((rel if name == "stdlib" else f"{name}/{rel}", p))
    return out


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELDOUT_MOD == 0


def stage_corpus(work: pathlib.Path) -> None:
    from jaxmedusa.atomic import atomic_open, write_json

    out = work / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    roots = source_roots()
    manifest = {"python": sys.version.split()[0], "versions": {k: v for k, (_, v) in roots.items()},
                "excluded_dirs": sorted(EXCLUDED), "max_file_bytes": MAX_FILE_BYTES, "heldout_mod": HELDOUT_MOD,
                "files": []}
    with contextlib.ExitStack() as stack:
        files = {n: stack.enter_context(atomic_open(out / f"{n}.jsonl")) for n in ("train", "heldout", "heldout_deps")}
        for name, (root, _) in roots.items():
            for rel, path in source_files(name, root):
                raw = path.read_bytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                split = "train" if not is_heldout(rel) else "heldout" if name == "stdlib" else "heldout_deps"
                files[split].write(json.dumps({"text": text, "path": rel}) + "\n")
                manifest["files"].append({"source": name, "path": rel, "split": split, "bytes": len(raw),
                                          "sha256": hashlib.sha256(raw).hexdigest()})
    with open(out / "train.jsonl") as f, atomic_open(out / "train_sample.jsonl") as g:
        g.writelines(line for i, line in enumerate(f) if i % SAMPLE_EVERY == 0)
    write_json(out / "manifest.json", manifest, indent=1)
    for name, src in compact_manifest(manifest)["sources"].items():
        print(f"corpus: {name} {manifest['versions'][name]}: {src['files']} files ({src['bytes'] / 1e6:.1f} MB), "
              f"{src['files'] - src['train_files']} held out")
    print(f"corpus -> {out}")


def compact_manifest(manifest: dict) -> dict:
    """What the package ships of the corpus manifest: versions and rules, per source its file count, bytes and
    one sha256 over its (path, sha256) list, and the held-out standard-library files by name and hash (the
    full per-file list stays in the work directory; it is too large to ship)."""
    out = {k: v for k, v in manifest.items() if k != "files"}
    out["sources"] = {}
    for name in manifest["versions"]:
        mine = [f for f in manifest["files"] if f["source"] == name]
        digest = hashlib.sha256("".join(f"{f['path']} {f['sha256']}\n" for f in mine).encode()).hexdigest()
        out["sources"][name] = {"files": len(mine), "bytes": sum(f["bytes"] for f in mine),
                                "train_files": sum(f["split"] == "train" for f in mine), "sha256": digest}
    out["heldout"] = [{"path": f["path"], "sha256": f["sha256"]} for f in manifest["files"] if f["split"] == "heldout"]
    return out


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
    """Greedy continuations of DISTILL_PROMPTS windows spread evenly over the train split (batched)."""
    import jaxmedusa
    from jaxmedusa.atomic import atomic_open

    # float32 on any device: the continuations are what the shipped model says when it runs on a CPU
    model = jaxmedusa.load(work / "pretrain" / "model", dtype="float32",
                           max_len=DISTILL_PROMPT_TOKENS + DISTILL_NEW_TOKENS)
    texts = read_texts(work / "corpus" / "train.jsonl")
    stream = [t for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]
    stride = (len(stream) - DISTILL_PROMPT_TOKENS) // DISTILL_PROMPTS
    prompts = [[model.config.bos_token_id] + stream[s:s + DISTILL_PROMPT_TOKENS - 1]
               for s in range(0, stride * DISTILL_PROMPTS, stride)]
    out = work / "corpus" / "distilled.jsonl"
    with atomic_open(out) as f:
        for i in range(0, len(prompts), DISTILL_BATCH):
            batch = prompts[i:i + DISTILL_BATCH]
            r = jaxmedusa.generate(model, batch, max_new_tokens=DISTILL_NEW_TOKENS, medusa=False)
            for p, t in zip(batch, r.tokens):
                f.write(json.dumps({"text": model.tokenizer.decode(p[1:] + t, skip_special_tokens=True)}) + "\n")
    print(f"distill: {len(prompts)} greedy continuations of {DISTILL_NEW_TOKENS} tokens, one every {stride} "
          f"tokens of {len(stream)} -> {out}")


def stage_heads(work: pathlib.Path) -> None:
    corpus = work / "corpus"
    jaxmedusa_train(HERE / "heads.yaml", f"output_dir={work / 'heads'}", f"model={work / 'pretrain' / 'model'}",
                    f"data=[{corpus / 'distilled.jsonl'}, {corpus / 'train_sample.jsonl'}]",
                    f"eval_data={corpus / 'heldout.jsonl'}")


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

    acc = measure_accuracies(str(work / "heads" / "model"), str(work / "heads" / "heads"),
                             str(work / "corpus" / "distilled.jsonl"), top_k=10, seq_len=512, packing=True,
                             limit=ACCURACY_DOCS)
    return grow_tree(acc, TREE_NODES)[0], acc.round(4).tolist()


def stage_export(work: pathlib.Path) -> None:
    import jax.numpy as jnp

    import jaxmedusa
    from jaxmedusa.atomic import write_json

    tree, acc = default_tree(work)
    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    model = jaxmedusa.load(work / "heads" / "model", heads=work / "heads" / "heads", dtype="float32", max_len=16)
    jaxmedusa.save(model, ASSETS / "model", dtype=jnp.float16)
    jaxmedusa.save_heads(model.heads, ASSETS / "heads", base_model="jaxmedusa/assets/default/model",
                         dtype=jnp.float16, tree=tree)
    manifest = json.loads((work / "corpus" / "manifest.json").read_text())
    write_json(ASSETS / "manifest.json", compact_manifest(manifest), indent=1)
    write_json(ASSETS / "heldout_prompts.json", heldout_prompts(work), indent=1)
    write_json(ASSETS / "build.json", {"tree_nodes": TREE_NODES, "head_topk_accuracy": acc}, indent=1)
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
    stages = [s for s in STAGES if s in args.stage]
    if len(stages) == 1:
        globals()[f"stage_{stages[0]}"](work)
        return
    for stage in stages:  # each in its own process, so no stage holds the accelerator while the next starts
        subprocess.run([sys.executable, __file__, "--work", str(work), "--stage", stage], check=True)


if __name__ == "__main__":
    main()
