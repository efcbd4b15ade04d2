"""Tiny models for tests: HF PyTorch ones (reference) and jaxmedusa ones saved as HF directories."""

from __future__ import annotations

import os

import jax
import pytest
from flax import nnx

import jaxmedusa
from jaxmedusa.models import ModelConfig

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
            eos_token_id=2)


def tiny_config(arch: str = "llama", **overrides) -> dict:
    d = dict(TINY, model_type=arch,
             architectures=["LlamaForCausalLM" if arch == "llama" else "MistralForCausalLM"])
    d.update(overrides)
    return d


def random_lm(seed: int = 0, std: float = 0.2, **overrides) -> jaxmedusa.LlamaForCausalLM:
    """A random jaxmedusa model with weights large enough that greedy choices are not near-ties."""
    cfg = ModelConfig.from_hf_dict(tiny_config(**overrides))
    lm = jaxmedusa.LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(lm)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree_util.tree_leaves(state))))
    state = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * std
                                   if x.ndim == 2 else x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                                   state)
    return nnx.merge(graphdef, state)


@pytest.fixture
def jax_model_dir(tmp_path):
    """Factory: saves a random jaxmedusa model as an HF directory and returns its path (no torch needed)."""

    def make(seed: int = 0, name: str = "model", **overrides) -> str:
        path = os.path.join(tmp_path, name)
        jaxmedusa.save(random_lm(seed, **overrides), path)
        return path

    return make


@pytest.fixture
def hf_model(tmp_path):
    """Factory: a random transformers model saved in a chosen layout; returns (torch model, directory)."""

    def make(arch: str = "llama", layout: str = "safetensors", seed: int = 0, **overrides):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        d = tiny_config(arch, initializer_range=0.2, **overrides)
        d.pop("architectures")
        config = AutoConfig.for_model(**d)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # non-trivial norms, so a transposed or swapped norm weight is caught
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        path = os.path.join(tmp_path, f"{arch}-{layout}-{seed}")
        if layout == "safetensors":
            model.save_pretrained(path)
        elif layout == "sharded":
            model.save_pretrained(path, max_shard_size="40KB")
            assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        elif layout == "bin":
            config.save_pretrained(path)
            torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
        else:
            raise ValueError(layout)
        return model, path

    return make


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `torch` when torch is not installed (the jax 0.11 CI leg)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="needs torch")
        for item in items:
            if "torch" in item.keywords:
                item.add_marker(skip)


def random_heads(lm, num_heads: int = 4, num_layers: int = 1, seed: int = 0, std: float = 0.2,
                 shared_lm_head: bool = False):
    """Random Medusa heads for `lm` (weights perturbed away from the zero/identity init)."""
    from jaxmedusa.heads import MedusaHeads

    heads = MedusaHeads.for_model(lm, num_heads, num_layers, shared_lm_head=shared_lm_head, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(heads)
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree_util.tree_leaves(state))))
    state = jax.tree_util.tree_map(lambda x: x + std * jax.random.normal(next(keys), x.shape, x.dtype), state)
    return nnx.merge(graphdef, state)


def save_word_tokenizer(path: str, vocab_size: int = 97) -> None:
    """A whitespace word-level tokenizer ('<unk>', '<s>', '</s>', w3 ... wN) that AutoTokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def run_on_host_mesh(script: str, devices: int, timeout: int = 600) -> str:
    """Runs a Python script in a fresh process that sees `devices` CPU devices (jax fixes the count at start)
    and returns its stdout; a failure shows the script's stderr."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
