"""Logits and greedy generation against transformers' PyTorch models (float32, tiny random configs)."""

import numpy as np
import pytest

import jaxmedusa
from jaxmedusa.cache import KVCache

pytestmark = pytest.mark.torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

VARIANTS = {
    "llama-gqa": dict(arch="llama"),
    "llama-mha": dict(arch="llama", num_key_value_heads=4),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "biases": dict(arch="llama", attention_bias=True, mlp_bias=True),
    "mistral-gqa": dict(arch="mistral", sliding_window=None),
}


def jax_full_logits(model: jaxmedusa.Model, ids: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    b, t = ids.shape
    cache = KVCache.create(model.config, b, t)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    hidden, _ = model.lm(jnp.asarray(ids), positions, cache, jnp.tril(jnp.ones((t, t), bool)), prefill=True)
    return np.asarray(model.lm.logits(hidden))


def assert_weights_equal(model: jaxmedusa.Model, ref_model) -> None:
    """Every tensor of the loaded model equals transformers' bit for bit (float32 both sides), named by HF key:
    a logits mismatch after this passes is in the computation, not in loading."""
    from flax import nnx

    from jaxmedusa.checkpoint import export_params
    from jaxmedusa.models import param_table

    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model.lm, nnx.Param))}
    ours = export_params(flat, param_table(model.config))
    theirs = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    assert ours and set(ours) <= set(theirs), sorted(set(ours) - set(theirs))[:3]
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_transformers(hf_model, variant, seed):
    ref_model, path = hf_model(seed=seed, **VARIANTS[variant])
    model = jaxmedusa.load(path, max_len=160)
    ids = np.random.default_rng(seed).integers(0, 97, size=(2, 150))  # long enough to exercise RoPE
    assert_weights_equal(model, ref_model)
    np.testing.assert_allclose(jax_full_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_dynamic_ntk_rope_past_trained_length(hf_model):
    ref_model, path = hf_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    model = jaxmedusa.load(path, max_len=128)
    for length in (40, 100):  # within, then beyond max_position_embeddings
        ids = np.random.default_rng(length).integers(0, 97, size=(1, length))
        np.testing.assert_allclose(jax_full_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_every_checkpoint_layout_loads(hf_model, layout):
    ref_model, path = hf_model(layout=layout, seed=3)
    model = jaxmedusa.load(path, max_len=32)
    ids = np.random.default_rng(3).integers(0, 97, size=(1, 17))
    np.testing.assert_allclose(jax_full_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)


def hf_greedy(ref_model, prompt, n, eos=None):
    import torch

    out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral-gqa", "llama3-rope"])
def test_greedy_generate_matches_transformers(hf_model, variant):
    ref_model, path = hf_model(seed=5, **VARIANTS[variant])
    model = jaxmedusa.load(path, max_len=128)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (1, 9, 40)]
    expected = [hf_greedy(ref_model, p, 20) for p in prompts]
    single = [jaxmedusa.generate(model, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    batched = jaxmedusa.generate(model, prompts, max_new_tokens=20, eos_token_id=[]).tokens
    assert single == expected
    assert batched == expected


def test_generate_stops_at_eos_like_transformers(hf_model):
    ref_model, path = hf_model(seed=6)
    model = jaxmedusa.load(path, max_len=64)
    prompt = [5, 17, 33, 2, 60]
    free = hf_greedy(ref_model, prompt, 12)
    eos = free[4]
    assert eos not in free[:4]
    got = jaxmedusa.generate(model, [prompt, [7, 8]], max_new_tokens=12, eos_token_id=eos).tokens
    assert got[0] == hf_greedy(ref_model, prompt, 12, eos=eos) == free[:5]
