"""Published tokenizer layouts load and round-trip (issue #17): a Vicuna/Llama-2 directory with only a
sentencepiece tokenizer.model, a Llama-3-style byte-level BPE tokenizer.json with its special tokens and
generation_config eos list. Every tokenizer is built here (sentencepiece trains one in milliseconds)."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest

import jaxmedusa
from jaxmedusa.loading import load_tokenizer

from conftest import random_lm

CORPUS = ["the quick brown fox jumps over the lazy dog", "def main(): return 0", "hello world, hello jax",
          "medusa heads predict several tokens ahead", "print('tree attention')", "x = [i * 2 for i in range(10)]"]


def sentencepiece_model(vocab_size: int = 300) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)  # as Llama's own tokenizer.model
    return buf.getvalue()


def vicuna_like_dir(path: str, vocab_size: int = 300) -> str:
    """A model directory laid out like lmsys/vicuna-7b-v1.3: weights, tokenizer.model, a LlamaTokenizer
    tokenizer_config.json and special_tokens_map.json, no tokenizer.json."""
    jaxmedusa.save(random_lm(seed=0, vocab_size=vocab_size), path)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(sentencepiece_model(vocab_size))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048,
                   "legacy": False, "clean_up_tokenization_spaces": False}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return path


def test_sentencepiece_directory_encodes_like_sentencepiece_itself(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = vicuna_like_dir(str(tmp_path / "vicuna"))
    tok = load_tokenizer(path)
    assert tok is not None
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    for text in ["hello world", "def main(): return 0", "tree  attention", "naïve café ☃"]:
        assert tok(text)["input_ids"] == [1] + sp.encode(text)  # <s> then sentencepiece's own pieces
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert "<0xE2>" in tok.convert_ids_to_tokens(tok("☃")["input_ids"])  # byte fallback for unseen characters


def test_vicuna_like_directory_generates_from_text(tmp_path):
    path = vicuna_like_dir(str(tmp_path / "vicuna"))
    model = jaxmedusa.load(path, max_len=64)
    result = jaxmedusa.generate(model, ["hello world", "def main():"], max_new_tokens=5, eos_token_id=[])
    ids = [model.tokenizer(p)["input_ids"] for p in ("hello world", "def main():")]
    assert result.tokens == jaxmedusa.generate(model, ids, max_new_tokens=5, eos_token_id=[]).tokens
    assert all(isinstance(t, str) for t in result.texts)


def llama3_like_dir(path: str) -> str:
    """A byte-level BPE tokenizer.json with Llama-3's special tokens, and generation_config's eos list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = bpe.token_to_id("<|begin_of_text|>")
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    vocab = bpe.get_vocab_size()
    jaxmedusa.save(random_lm(seed=1, vocab_size=vocab, bos_token_id=bos, eos_token_id=1), path)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>").save_pretrained(path)
    eos = [bpe.token_to_id("<|end_of_text|>"), bpe.token_to_id("<|eot_id|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos}, f)
    return path


def test_llama3_style_tokenizer_and_generation_config_eos_list(tmp_path):
    path = llama3_like_dir(str(tmp_path / "llama3"))
    model = jaxmedusa.load(path, max_len=64)
    tok = model.tokenizer
    assert model.eos_token_ids == (tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>"))
    ids = tok("print('héllo')")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.decode(ids, skip_special_tokens=True) == "print('héllo')"  # byte-level: any text round-trips
    free = jaxmedusa.generate(model, [ids], max_new_tokens=12, eos_token_id=[]).tokens[0]
    unused = next(t for t in range(tok.vocab_size) if t not in free)
    stops = dataclasses.replace(model, eos_token_ids=(unused, free[3]))  # the model's default: a list of two
    assert jaxmedusa.generate(stops, [ids], max_new_tokens=12).tokens[0] == free[:free.index(free[3]) + 1]


def cache_snapshot(cache: str, repo: str, src: str, revision: str = "main") -> str:
    """Lays `src` out in a Hugging Face hub cache as repo's snapshot at `revision` (what `hf download` leaves)."""
    import shutil

    commit = (repo.replace("/", "") * 40)[:40].encode().hex()[:40]
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", revision), "w") as f:
        f.write(commit)
    shutil.copytree(src, os.path.join(root, "snapshots", commit))
    return os.path.join(root, "snapshots", commit)


def test_hub_ids_resolve_in_the_local_cache_and_never_download(jax_model_dir, tmp_path, monkeypatch, capsys):
    from conftest import random_heads
    from jaxmedusa.cli import main

    src = jax_model_dir(seed=3)
    heads_src = tmp_path / "heads"
    jaxmedusa.save_heads(random_heads(jaxmedusa.load(src, max_len=16).lm, num_heads=2), heads_src)
    cache = str(tmp_path / "hub")
    snap = cache_snapshot(cache, "acme/tiny-llama", src)
    cache_snapshot(cache, "acme/tiny-llama-medusa", str(heads_src))
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = jaxmedusa.load("acme/tiny-llama", heads="acme/tiny-llama-medusa", max_len=32)
    assert model.path == snap and model.heads.num_heads == 2
    assert main(["generate", "--model", "acme/tiny-llama", "--heads", "acme/tiny-llama-medusa", "--ids", "3,4",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "acme/not-cached", "--ids", "3,4"]) == 2
    err = capsys.readouterr().err
    assert "'acme/not-cached' is neither a local directory nor in the Hugging Face cache" in err
    assert "hf download acme/not-cached" in err and cache in err
    with pytest.raises(FileNotFoundError, match="at revision 'v2'"):
        jaxmedusa.load("acme/tiny-llama", revision="v2")


def test_quiet_and_light_start(tmp_path):
    """`import jaxmedusa` pulls in neither transformers nor torch, and loading a tokenizer on an install without
    torch prints no "PyTorch was not found" banner."""
    import subprocess
    import sys

    from conftest import save_word_tokenizer

    save_word_tokenizer(str(tmp_path / "tok"))
    code = ("import sys, jaxmedusa\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
            "from jaxmedusa.loading import load_tokenizer\n"
            "assert load_tokenizer(sys.argv[1]) is not None\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tok")], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "PyTorch was not found" not in r.stderr


@pytest.mark.torch
def test_vicuna_layout_sharded_fp16_bin_with_index(tmp_path):
    """lmsys/vicuna-7b-v1.3 as published: fp16 pytorch_model-0000N-of-0000M.bin shards with
    pytorch_model.bin.index.json, tokenizer.model and no safetensors."""
    import torch

    from jaxmedusa.safetensors_io import iter_safetensors
    from test_hf_parity import jax_full_logits

    path = vicuna_like_dir(str(tmp_path / "vicuna"))
    reference = jaxmedusa.load(path, dtype="float16", max_len=32)
    tensors = {k: torch.from_numpy(np.array(v)).half() for k, v in iter_safetensors(os.path.join(path, "model.safetensors"))}
    os.remove(os.path.join(path, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: tensors[k] for k in part}, os.path.join(path, name))
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}, f)
    model = jaxmedusa.load(path, dtype="float16", max_len=32)
    ids = np.asarray([model.tokenizer("hello world")["input_ids"]])
    np.testing.assert_array_equal(jax_full_logits(model, ids), jax_full_logits(reference, ids))
