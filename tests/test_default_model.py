"""The embedded default model (jaxmedusa/assets/default): loads with no path, matches transformers, and
its trained heads keep their acceptance. A regression in the heads, trees or acceptance fails here."""

import json
import os
import re

import numpy as np
import pytest

import jaxmedusa
from jaxmedusa.cli import COMPARE_MIN_RUNS, main
from jaxmedusa.loading import DEFAULT_MODEL_DIR

# Measured 2.18 when the shipped model was built (these 24 prompts batched, 48 new tokens, the shipped 8-node
# tree; 2.46 at 128 tokens one prompt at a time in assets/default/build.json); the margin covers float32
# rounding across platforms.
MIN_ACCEPTED_TOKENS_PER_STEP = 2.0
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def model():
    return jaxmedusa.load(max_len=512)


@pytest.fixture(scope="module")
def prompts():
    with open(os.path.join(DEFAULT_MODEL_DIR, "heldout_prompts.json")) as f:
        return json.load(f)


def test_load_without_a_path_brings_heads_tree_and_tokenizer(model):
    assert model.heads is not None and model.heads.num_heads == 5
    assert model.tokenizer is not None and model.tokenizer.bos_token == "<s>"
    assert model.tree is not None and len(model.tree) + 1 == json.load(
        open(os.path.join(DEFAULT_MODEL_DIR, "build.json")))["tree_nodes"]
    ids = model.tokenizer("def fibonacci(n):")["input_ids"]
    assert ids[0] == model.config.bos_token_id and model.tokenizer.decode(ids[1:]) == "def fibonacci(n):"
    import jax

    assert model.dtype == (np.float32 if jax.default_backend() == "cpu" else np.float16)  # fp16: the checkpoint's
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEFAULT_MODEL_DIR) for f in fs)
    assert size <= 30_000_000  # the limit on what the package ships


@pytest.mark.torch
def test_logits_match_transformers(model, prompts):
    import torch
    from transformers import LlamaForCausalLM

    from test_hf_parity import jax_full_logits

    ref = LlamaForCausalLM.from_pretrained(os.path.join(DEFAULT_MODEL_DIR, "model"), torch_dtype=torch.float32)
    ref.eval()
    f32 = jaxmedusa.load(dtype="float32", max_len=256)
    rng = np.random.default_rng()
    picked = rng.choice(len(prompts), size=2, replace=False)
    enc = [model.tokenizer(prompts[i])["input_ids"] for i in picked]
    t = min(len(e) for e in enc)
    ids = np.array([e[:t] for e in enc])
    with torch.no_grad():
        expected = ref(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax_full_logits(f32, ids), expected, atol=1e-4, rtol=0)


def test_medusa_equals_vanilla_and_keeps_its_acceptance(model, prompts):
    medusa = jaxmedusa.generate(model, prompts, max_new_tokens=NEW_TOKENS)
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=NEW_TOKENS, medusa=False)
    assert medusa.tokens == vanilla.tokens
    assert medusa.stats["tree_nodes"] == len(model.tree) + 1
    assert medusa.stats["mean_accepted_tokens_per_step"] >= MIN_ACCEPTED_TOKENS_PER_STEP
    # real text, not special tokens: a reply is blank only when the model ends the file at once (EOS first,
    # as after a module's closing `doctest.testmod()`), and most replies are not
    eos = model.config.eos_token_ids
    assert all(t.strip() or (len(toks) == 1 and toks[0] in eos) for t, toks in zip(medusa.texts, medusa.tokens))
    assert sum(bool(t.strip()) for t in medusa.texts) > len(prompts) // 2


def test_cli_generate_uses_the_embedded_model(capsys):
    rc = main(["generate", "def fibonacci(n):", "--max-new-tokens", "24", "--compare"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def fibonacci(n):") and len(captured.out) > len("def fibonacci(n):\n")
    stats = captured.err.strip().splitlines()
    assert "accepted tokens/step" in stats[0] and "tokens/s" in stats[0]
    assert "speedup" in stats[1] and "identical tokens" in stats[1]
    runs = int(re.search(r"median of (\d+) runs of each, ([\d.]+)\.\.([\d.]+)\)", stats[1]).group(1))
    assert runs >= COMPARE_MIN_RUNS  # a median over several timed runs of each side, with its spread
