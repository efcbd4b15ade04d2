"""Prompt prefill: blockwise flash attention vs the reference, no cache-sized copies, bounded memory, caches
sized by the request, and clear out-of-memory errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmedusa
from jaxmedusa.cache import KVCache
from jaxmedusa.cli import main
from jaxmedusa.models import ModelConfig
from jaxmedusa.generate import prefill
from jaxmedusa.kernels import causal_attention_blockwise, prefill_attention, resolve_prefill_impl
from jaxmedusa.kernels.reference import tree_attention_reference
from jaxmedusa.memory import (InsufficientMemoryError, cache_bucket, check_request, clear_oom)

from conftest import random_lm, tiny_config


def causal_reference(q, k, v):
    t = q.shape[1]
    return tree_attention_reference(q, k, v, jnp.zeros((q.shape[0],), jnp.int32), jnp.tril(jnp.ones((t, t), bool)))


@pytest.mark.parametrize("b, t, h, kvh, rows, dtype", [
    (2, 77, 4, 4, 16, jnp.float32),     # MHA, T not a multiple of the block
    (1, 130, 8, 2, 32, jnp.float32),    # GQA 4
    (2, 64, 4, 1, 64, jnp.float32),     # MQA, one block exactly
    (2, 100, 8, 2, 16, jnp.bfloat16),
])
def test_blockwise_prefill_matches_reference(b, t, h, kvh, rows, dtype):
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, 32)), dtype) for n in (h, kvh, kvh))
    got = causal_attention_blockwise(q, k, v, block_rows=rows)
    want = causal_reference(q, k, v)
    assert got.shape == q.shape and got.dtype == dtype
    err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max() / jnp.abs(want).max())
    assert err < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_prefill_dispatcher_choices(monkeypatch):
    assert resolve_prefill_impl(jnp.float32, 64) == "blockwise"  # CPU
    monkeypatch.setenv("JAXMEDUSA_PREFILL", "cudnn")
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_prefill_impl(jnp.bfloat16, 64)
    monkeypatch.setenv("JAXMEDUSA_PREFILL", "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        prefill_attention(*(jnp.ones((1, 4, 2, 16)),) * 3)


def _instructions(hlo: str):
    """(opcode, dims) of every instruction with an array shape in HLO text."""
    for m in re.finditer(r"=\s*[a-z0-9]+\[([\d,]*)\][^ ]*\s+([a-z\-]+)\(", hlo):
        dims = tuple(int(x) for x in m.group(1).split(",") if x)
        yield m.group(2), dims


def test_prefill_writes_the_cache_without_copying_it():
    lm = random_lm(seed=3)
    cfg = lm.config
    graphdef, state = jax.tree_util.tree_map(lambda x: x, jaxmedusa.Model(lm).split())
    slots = 1000  # a size nothing else in the program has
    tokens = jnp.ones((2, 48), jnp.int32)
    hlo = prefill.lower(state, tokens, jnp.array([48, 30], jnp.int32), graphdef=graphdef,
                        max_len=slots).compile().as_text()
    cache_dims = sorted((cfg.num_layers, 2, slots, cfg.num_kv_heads, cfg.head_dim))
    big = [(op, dims) for op, dims in _instructions(hlo) if sorted(dims) == cache_dims]
    assert big, "the cache should appear in the compiled prefill"
    copies = [(op, dims) for op, dims in big if op in ("copy", "transpose", "copy-start")]
    assert not copies, f"cache-sized copies in the compiled prefill: {copies}"


def test_long_prompt_prefill_memory_is_not_quadratic():
    cfg = ModelConfig.from_hf_dict(tiny_config(max_position_embeddings=20000))
    lm = jaxmedusa.LlamaForCausalLM(cfg)
    graphdef, state = jaxmedusa.Model(lm).split()
    t = 16384  # [H, T, T] float32 scores would be 4 GiB
    compiled = prefill.lower(state, jnp.ones((1, t), jnp.int32), jnp.array([t], jnp.int32), graphdef=graphdef,
                             max_len=t + 64).compile()
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < 1.5 * 2**30, mem.temp_size_in_bytes


@pytest.mark.torch
def test_long_prompt_matches_transformers(hf_model):
    """A 3000-token prompt (several prefill blocks): last-position logits within 1e-4 and greedy tokens equal."""
    import torch

    ref, path = hf_model(seed=5, max_position_embeddings=4096)
    model = jaxmedusa.load(path)
    ids = np.random.default_rng(5).integers(3, 97, size=3000).tolist()
    graphdef, state = model.split()
    _, hidden = prefill(state, jnp.asarray([ids]), jnp.asarray([len(ids)]), graphdef=graphdef, max_len=3072)
    ours = jaxmedusa.generate(model, [ids], max_new_tokens=8, eos_token_id=[]).tokens[0]
    seq = torch.tensor([ids])
    with torch.no_grad():
        want = ref(seq).logits[0, -1].numpy()
        for _ in range(8):  # plain greedy: no generation-config rules (min length, EOS) in the way
            seq = torch.cat([seq, ref(seq).logits[:, -1:].argmax(-1)], dim=1)
    np.testing.assert_allclose(np.asarray(model.lm.logits(hidden))[0], want, atol=1e-4, rtol=0)
    assert ours == seq[0, len(ids):].tolist()


def test_cache_bucket_bounds():
    prev = 0
    for need in range(1, 5000, 7):
        got = cache_bucket(need, 1 << 20)
        assert need <= got <= max(64, int(need * 1.25) + 1) and got >= prev
        prev = got
    assert cache_bucket(1000, 900) == 900
    assert cache_bucket(1000, 1 << 20) == cache_bucket(1010, 1 << 20)  # nearby requests share a compilation


def test_generate_sizes_the_cache_to_the_request():
    lm = random_lm(seed=8)
    prompts = [[5, 6, 7, 8], [9, 10]]
    small = jaxmedusa.generate(jaxmedusa.Model(lm, max_len=256), prompts, max_new_tokens=10, eos_token_id=[])
    large = jaxmedusa.generate(jaxmedusa.Model(lm, max_len=32768), prompts, max_new_tokens=10, eos_token_id=[])
    assert small.tokens == large.tokens
    assert small.stats["cache_slots"] == large.stats["cache_slots"] == cache_bucket(4 + 10, 256)


def test_memory_check_names_the_numbers():
    cfg = random_lm(seed=8).config
    with pytest.raises(InsufficientMemoryError, match=r"KV cache .* batch 4 x 100000 slots.*only 0.00 GiB"):
        check_request(cfg, jnp.float32, 4, 100000, 64, free=1000)
    check_request(cfg, jnp.float32, 1, 64, 16, free=1 << 40)  # fits: no error


def test_request_larger_than_memory_fails_before_allocating():
    model = jaxmedusa.Model(random_lm(seed=8), max_len=1 << 40)
    with pytest.raises(InsufficientMemoryError, match="lower the batch"):
        jaxmedusa.generate(model, [[5, 6, 7]], max_new_tokens=10**12)


def test_xla_out_of_memory_becomes_one_clear_error():
    with pytest.raises(InsufficientMemoryError, match="out of device memory in the prefill"):
        with clear_oom("the prefill"):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 bytes")
    with pytest.raises(jax.errors.JaxRuntimeError):  # anything else passes through
        with clear_oom("the prefill"):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


def test_cli_huge_request_is_one_line_exit_2(jax_model_dir, capsys):
    path = jax_model_dir(seed=4)
    assert main(["generate", "--model", path, "--ids", "--max-new-tokens", "1000000000", "5,6,7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_len is 256" in err
    assert main(["generate", "--model", path, "--ids", "--max-new-tokens", "100000000000", "--max-len",
                 str(1 << 40), "5,6,7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB" in err and "lower the batch" in err
