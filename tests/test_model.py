"""Model, cache, loading and generation invariants that need no PyTorch."""

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmedusa
from jaxmedusa.cache import KVCache
from jaxmedusa.safetensors_io import iter_safetensors, save_safetensors

from conftest import random_lm


def full_forward_logits(lm, ids):
    b, t = ids.shape
    cache = KVCache.create(lm.config, b, t)
    h, _ = lm(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), (b, t)), cache, jnp.tril(jnp.ones((t, t), bool)),
              prefill=True)
    return np.asarray(lm.logits(h))


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 1}, {"tie_word_embeddings": True}])
def test_prefill_then_incremental_decode_equals_full_forward(overrides):
    lm = random_lm(seed=2, **overrides)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 97, size=(2, 30)).astype(np.int32)
    full = full_forward_logits(lm, ids)

    graphdef, state = nnx.split(lm)

    @partial(jax.jit, static_argnames="prefill")  # one compile per chunk shape, not every op eagerly
    def step(ids, pos, cache, prefill=False):
        m = nnx.merge(graphdef, state)
        n = ids.shape[1]
        h, cache = m(ids, pos, cache, jnp.tril(jnp.ones((n, n), bool)), prefill=prefill)
        return m.logits(h), cache

    prompt = 11
    cache = KVCache.create(lm.config, 2, 40)
    logits, cache = step(jnp.asarray(ids[:, :prompt]), jnp.broadcast_to(jnp.arange(prompt), (2, prompt)), cache,
                         prefill=True)
    cache = cache._replace(lengths=jnp.full((2,), prompt, jnp.int32))
    got = [np.asarray(logits)]
    t = prompt
    while t < 30:  # then chunks of 1 and 3 tokens through the cache (decode and multi-token paths)
        n = 1 if t % 2 else min(3, 30 - t)
        logits, cache = step(jnp.asarray(ids[:, t:t + n]), cache.lengths[:, None] + jnp.arange(n)[None], cache)
        cache = cache._replace(lengths=cache.lengths + n)
        got.append(np.asarray(logits))
        t += n
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-4, rtol=0)


def test_garbage_beyond_lengths_does_not_leak():
    lm = random_lm(seed=4)
    ids = np.random.default_rng(4).integers(0, 97, size=(1, 9)).astype(np.int32)
    full = full_forward_logits(lm, ids)
    cache = KVCache.create(lm.config, 1, 16)
    cache = cache._replace(k=cache.k.at[:, :, 8:].set(jnp.nan), v=cache.v.at[:, :, 8:].set(1e30))
    h, cache = lm(jnp.asarray(ids[:, :8]), jnp.arange(8)[None], cache, jnp.tril(jnp.ones((8, 8), bool)))
    cache = cache._replace(lengths=jnp.array([8], jnp.int32))
    h2, _ = lm(jnp.asarray(ids[:, 8:]), jnp.array([[8]]), cache, jnp.ones((1, 1), bool))
    np.testing.assert_allclose(np.asarray(lm.logits(h2))[:, 0], full[:, 8], atol=1e-4, rtol=0)


def test_ragged_batch_rows_equal_their_own_runs(jax_model_dir):
    model = jaxmedusa.load(jax_model_dir(seed=7), max_len=96)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (1, 5, 23, 40)]
    batched = jaxmedusa.generate(model, prompts, max_new_tokens=16, eos_token_id=[])
    singles = [jaxmedusa.generate(model, p, max_new_tokens=16, eos_token_id=[]).tokens[0] for p in prompts]
    assert batched.tokens == singles
    assert all(len(t) == 16 for t in singles)
    # greedy decoding equals teacher forcing: each token is the argmax of a full forward over its prefix
    seq = prompts[2] + singles[2]
    logits = full_forward_logits(model.lm, np.array([seq], np.int32))[0]
    assert singles[2] == np.argmax(logits[len(prompts[2]) - 1:-1], axis=-1).tolist()


def test_sequences_stop_at_their_own_eos(jax_model_dir):
    model = jaxmedusa.load(jax_model_dir(seed=8), max_len=64)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    free = jaxmedusa.generate(model, prompts, max_new_tokens=12, eos_token_id=[]).tokens
    eos = free[0][3]
    first = free[0].index(eos)
    res = jaxmedusa.generate(model, prompts, max_new_tokens=12, eos_token_id=eos)
    assert res.tokens[0] == free[0][:first + 1]
    expected1 = free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert res.tokens[1] == expected1
    assert res.stats["new_tokens"] == len(res.tokens[0]) + len(res.tokens[1])
    assert res.stats["steps"] == max(len(t) for t in res.tokens)


def test_sampling_is_seeded_and_respects_top_p(jax_model_dir):
    model = jaxmedusa.load(jax_model_dir(seed=9), max_len=64)
    a = jaxmedusa.generate(model, [4, 5, 6], max_new_tokens=20, temperature=1.0, seed=1, eos_token_id=[]).tokens
    b = jaxmedusa.generate(model, [4, 5, 6], max_new_tokens=20, temperature=1.0, seed=1, eos_token_id=[]).tokens
    c = jaxmedusa.generate(model, [4, 5, 6], max_new_tokens=20, temperature=1.0, seed=2, eos_token_id=[]).tokens
    assert a == b and a != c
    tiny_p = jaxmedusa.generate(model, [4, 5, 6], max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3,
                                eos_token_id=[]).tokens
    greedy = jaxmedusa.generate(model, [4, 5, 6], max_new_tokens=20, eos_token_id=[]).tokens
    assert tiny_p == greedy  # a nucleus that keeps only the top token is greedy decoding


def test_top_p_filter_keeps_smallest_nucleus():
    from jaxmedusa.sampling import filtered_logits

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(filtered_logits(logits, 1.0, 0.7, True)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filtered_logits(logits, 1.0, 0.81, True)))
    assert kept.tolist() == [[True, True, True, False]]


def test_save_load_round_trip_sharded(tmp_path):
    lm = random_lm(seed=10, tie_word_embeddings=True)
    jaxmedusa.save(lm, tmp_path / "m", max_shard_bytes=30_000)
    assert os.path.isfile(tmp_path / "m" / "model.safetensors.index.json")
    model = jaxmedusa.load(tmp_path / "m", max_len=16)
    ids = np.arange(3, 15, dtype=np.int32)[None]
    np.testing.assert_array_equal(full_forward_logits(model.lm, ids), full_forward_logits(lm, ids))


def test_fused_qkv_and_gate_up_hold_hf_tensors_side_by_side(tmp_path):
    """The model keeps q/k/v and gate/up as one kernel each; the files keep HF's separate tensors, and each
    lands in its own columns (GQA widths and q/k/v biases included), both ways."""
    lm = random_lm(seed=11, num_key_value_heads=1, attention_bias=True)
    jaxmedusa.save(lm, tmp_path / "m")
    cfg = lm.config
    qd, kvd, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    files = dict(iter_safetensors(tmp_path / "m" / "model.safetensors"))
    attn, mlp = lm.layers[1].self_attn, lm.layers[1].mlp
    qkv, qkv_b, gate_up = (np.asarray(attn.qkv_proj.kernel[...]), np.asarray(attn.qkv_proj.bias[...]),
                           np.asarray(mlp.gate_up_proj.kernel[...]))
    for name, cols in (("q_proj", (0, qd)), ("k_proj", (qd, qd + kvd)), ("v_proj", (qd + kvd, qd + 2 * kvd))):
        np.testing.assert_array_equal(files[f"model.layers.1.self_attn.{name}.weight"], qkv[:, cols[0]:cols[1]].T)
        np.testing.assert_array_equal(files[f"model.layers.1.self_attn.{name}.bias"], qkv_b[cols[0]:cols[1]])
    np.testing.assert_array_equal(files["model.layers.1.mlp.gate_proj.weight"], gate_up[:, :inter].T)
    np.testing.assert_array_equal(files["model.layers.1.mlp.up_proj.weight"], gate_up[:, inter:].T)
    back = jaxmedusa.load(tmp_path / "m", max_len=16).lm
    np.testing.assert_array_equal(np.asarray(back.layers[1].self_attn.qkv_proj.kernel[...]), qkv)
    np.testing.assert_array_equal(np.asarray(back.layers[1].self_attn.qkv_proj.bias[...]), qkv_b)
    np.testing.assert_array_equal(np.asarray(back.layers[1].mlp.gate_up_proj.kernel[...]), gate_up)


def test_bfloat16_safetensors_round_trip(tmp_path):
    import ml_dtypes

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    save_safetensors(tmp_path / "t.safetensors", {"x": x, "y": np.arange(4, dtype=np.int64)})
    got = dict(iter_safetensors(tmp_path / "t.safetensors"))
    assert got["x"].dtype == x.dtype and np.array_equal(got["x"], x)
    assert got["y"].tolist() == [0, 1, 2, 3]


def _rewrite_weights(path, edit):
    f = os.path.join(path, "model.safetensors")
    tensors = {k: np.array(v) for k, v in iter_safetensors(f)}
    edit(tensors)
    save_safetensors(f, tensors)


def test_missing_key_is_named(jax_model_dir):
    path = jax_model_dir(seed=11)
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(jaxmedusa.CheckpointError, match=r"missing key 'model.layers.1.mlp.up_proj.weight'"):
        jaxmedusa.load(path)


def test_wrong_shape_is_named(jax_model_dir):
    path = jax_model_dir(seed=12)

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _rewrite_weights(path, edit)
    with pytest.raises(jaxmedusa.CheckpointError,
                       match=r"'model.layers.0.self_attn.k_proj.weight': expected shape \(32, 64\), found \(16, 64\)"):
        jaxmedusa.load(path)


def test_unexpected_key_is_named(jax_model_dir):
    path = jax_model_dir(seed=13)
    _rewrite_weights(path, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(jaxmedusa.CheckpointError, match="unexpected key 'model.layers.0.extra.weight'"):
        jaxmedusa.load(path)


def test_no_weights_and_bad_request_errors(jax_model_dir, tmp_path):
    path = jax_model_dir(seed=14)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(jaxmedusa.CheckpointError, match="no weights in"):
        jaxmedusa.load(path)
    model = jaxmedusa.Model(random_lm(seed=14), max_len=16)
    with pytest.raises(ValueError, match="needs 20 cache slots, but max_len is 16"):
        jaxmedusa.generate(model, [1, 2, 3, 4], max_new_tokens=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jaxmedusa.generate(model, [1, 500], max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokenizer"):
        jaxmedusa.generate(model, "hello", max_new_tokens=2)


def test_sliding_window_limit_is_explicit(jax_model_dir):
    path = jax_model_dir(seed=15, arch="mistral", architectures=["MistralForCausalLM"], sliding_window=32)
    with pytest.raises(jaxmedusa.ConfigError, match="sliding_window 32"):
        jaxmedusa.load(path, max_len=64)
    assert jaxmedusa.load(path, max_len=32).config.sliding_window == 32


def test_generation_config_eos_is_used(jax_model_dir):
    path = jax_model_dir(seed=16)
    model = jaxmedusa.load(path, max_len=64)
    free = jaxmedusa.generate(model, [3, 4], max_new_tokens=10, eos_token_id=[]).tokens[0]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [free[2]]}, f)
    model = jaxmedusa.load(path, max_len=64)
    assert model.eos_token_ids == (free[2],)
    assert jaxmedusa.generate(model, [3, 4], max_new_tokens=10).tokens[0] == free[:free.index(free[2]) + 1]
