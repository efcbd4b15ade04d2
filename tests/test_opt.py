"""OPT through the same interface: logits and greedy generation against transformers' OPTForCausalLM, the
checkpoint layouts it reads, and greedy Medusa == vanilla with random heads."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmedusa
from jaxmedusa.checkpoint import CheckpointError
from jaxmedusa.models import ConfigError, ModelConfig, create_lm

from conftest import random_heads

OPT_TINY = dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=97, hidden_size=64, ffn_dim=96,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, pad_token_id=1,
                bos_token_id=2, eos_token_id=2, word_embed_proj_dim=64)
VARIANTS = {
    "pre-ln": {},
    "350m-style": dict(word_embed_proj_dim=32, do_layer_norm_before=False),  # project_in/out, post-LN
    "untied-gelu": dict(tie_word_embeddings=False, activation_function="gelu"),
}


def hf_opt(tmp_path, variant: str, seed: int = 0, layout: str = "safetensors"):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    d = dict(OPT_TINY, init_std=0.2, **VARIANTS[variant])
    d.pop("architectures")
    d.pop("model_type")
    model = OPTForCausalLM(OPTConfig(**d)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:  # non-trivial norms and biases
                p.add_(0.1 * torch.randn_like(p))
    path = os.path.join(tmp_path, f"opt-{variant}-{seed}-{layout}")
    if layout == "safetensors":
        model.save_pretrained(path)
    else:  # the released facebook/opt-* layout: OPTModel keys without the "model." prefix, in a .bin
        model.config.save_pretrained(path)
        sd = {k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.")}
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    return model, path


def jax_logits(model, ids):
    b, t = ids.shape
    cache = jaxmedusa.KVCache.create(model.config, b, t)
    h, _ = model.lm(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), (b, t)), cache,
                    jnp.tril(jnp.ones((t, t), bool)), prefill=True)
    return np.asarray(model.lm.logits(h))


@pytest.mark.torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_opt_logits_match_transformers(tmp_path, variant, seed):
    import torch

    hf, path = hf_opt(tmp_path, variant, seed)
    model = jaxmedusa.load(path, max_len=256)
    assert isinstance(model.lm, jaxmedusa.OPTForCausalLM)
    ids = np.random.default_rng(seed).integers(3, 97, size=(2, 150))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax_logits(model, ids), want, atol=1e-4, rtol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["pre-ln", "350m-style"])
def test_opt_greedy_generate_equals_transformers(tmp_path, variant):
    import torch

    hf, path = hf_opt(tmp_path, variant, seed=3)
    model = jaxmedusa.load(path, max_len=128)
    for prompt in ([5, 9, 14], list(range(3, 43))):
        with torch.no_grad():
            out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=1)
        got = jaxmedusa.generate(model, prompt, max_new_tokens=20, eos_token_id=[])
        assert got.tokens[0] == out[0, len(prompt):].tolist()


@pytest.mark.torch
def test_opt_released_layout_and_save_round_trip(tmp_path):
    import torch
    from transformers import OPTForCausalLM

    hf, path = hf_opt(tmp_path, "350m-style", seed=5, layout="bin")
    model = jaxmedusa.load(path, max_len=64)
    ids = np.random.default_rng(5).integers(3, 97, size=(1, 40))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax_logits(model, ids), want, atol=1e-4, rtol=1e-4)
    out = os.path.join(tmp_path, "saved")
    jaxmedusa.save(model, out)
    back = OPTForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.as_tensor(ids)).logits.numpy(), want, atol=1e-4, rtol=1e-4)


def random_opt(seed: int = 0, **overrides):
    cfg = ModelConfig.from_hf_dict(dict(OPT_TINY, **overrides))
    lm = create_lm(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(lm)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree_util.tree_leaves(state))))
    state = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.2
                                   if x.ndim == 2 else x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                                   state)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("variant", ["pre-ln", "350m-style"])
def test_opt_greedy_medusa_equals_vanilla(variant):
    lm = random_opt(7, **VARIANTS[variant])
    model = jaxmedusa.Model(lm=lm, max_len=200, heads=random_heads(lm, num_heads=4, seed=7))
    assert model.heads.hidden == lm.config.embed_dim
    prompts = [[5], list(range(3, 20)), list(range(10, 70))]
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=24, medusa=False, eos_token_id=[])
    for tree in ("mc_sim_7b_63", "chain-3"):
        medusa = jaxmedusa.generate(model, prompts, max_new_tokens=24, tree=tree, eos_token_id=[])
        assert medusa.tokens == vanilla.tokens
        assert medusa.stats["medusa"]


def test_opt_loading_errors(tmp_path):
    lm = random_opt(1)
    path = os.path.join(tmp_path, "opt")
    jaxmedusa.save(lm, path)
    with pytest.raises(ConfigError, match="max_position_embeddings 256"):
        jaxmedusa.load(path, max_len=512)
    from jaxmedusa.safetensors_io import iter_safetensors, save_safetensors

    f = os.path.join(path, "model.safetensors")
    tensors = {k: np.array(v) for k, v in iter_safetensors(f)}
    tensors["model.decoder.layers.1.fc1.weight"] = tensors["model.decoder.layers.1.fc1.weight"][:, :10]
    save_safetensors(f, tensors)
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.1\.fc1\.weight.*\(96, 64\)"):
        jaxmedusa.load(path, max_len=64)
    with pytest.raises(ConfigError, match="activation_function 'silu'"):
        ModelConfig.from_hf_dict(dict(OPT_TINY, activation_function="silu"))


def test_opt_medusa1_training_and_heads_round_trip(tmp_path):
    from conftest import save_word_tokenizer
    from jaxmedusa.train import Trainer, config_from_dict

    from test_train import write_chat_data

    path = os.path.join(tmp_path, "opt")
    jaxmedusa.save(random_opt(2, **VARIANTS["350m-style"]), path)
    save_word_tokenizer(path)
    write_chat_data(os.path.join(tmp_path, "data.jsonl"), n=12)
    cfg = config_from_dict(dict(model=path, data=[os.path.join(tmp_path, "data.jsonl")], seq_len=32, batch_size=2,
                                steps=2, heads=2, output_dir=os.path.join(tmp_path, "out"), progress=False))
    trainer = Trainer(cfg)
    result = trainer.run()
    model = jaxmedusa.load(path, heads=result.heads_dir, max_len=64)
    assert model.heads.hidden == 32  # OPT-350m-style heads read the projected-out states
    _, heads = trainer.trained_modules()
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 32)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(model.heads(hidden, model.lm.logits)),
                               np.asarray(heads(hidden, model.lm.logits)), rtol=1e-6, atol=1e-6)
