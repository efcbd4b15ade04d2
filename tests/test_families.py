"""Qwen2, Qwen3 and GLM (HF and THUDM ChatGLM layouts) through the one model interface: logits and greedy
generation against transformers' PyTorch models (float32, tiny random configs with non-zero biases and
norms), greedy Medusa == vanilla with random heads, config round trips and refusals."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmedusa
from jaxmedusa.models import ConfigError, ModelConfig, create_lm
from jaxmedusa.models.layers import RMSNorm

from conftest import random_heads
from test_hf_parity import hf_greedy, jax_full_logits, torch_logits

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "qwen2-gqa": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen2-tied-mqa": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True,
                           num_key_value_heads=1, rope_theta=1e6),
    "qwen3-headdim": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24),
    "qwen3-bias-tied": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=True,
                            tie_word_embeddings=True, num_key_value_heads=4),
    "glm-gqa": dict(model_type="glm", architectures=["GlmForCausalLM"], head_dim=16, pad_token_id=0),
    "glm-mqa": dict(model_type="glm", architectures=["GlmForCausalLM"], head_dim=32, num_key_value_heads=1,
                    pad_token_id=0, rope_theta=5e5),
}


def hf_family_model(tmp_path, variant: str, seed: int = 0):
    """A random transformers model of `variant`, with non-trivial 1-D parameters, saved; returns (model, path)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    d = dict(BASE, initializer_range=0.2, **VARIANTS[variant])
    d.pop("architectures")
    config = AutoConfig.for_model(**d)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norms, so a swapped or missing one is caught
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    path = os.path.join(tmp_path, f"{variant}-{seed}")
    model.save_pretrained(path)
    return model, path


@pytest.mark.torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    ref, path = hf_family_model(tmp_path, variant, seed=1)
    model = jaxmedusa.load(path, max_len=160)
    assert type(ref).__name__ == model.config.architecture
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 150))  # past 128 positions: RoPE's later rows
    np.testing.assert_allclose(jax_full_logits(model, ids), torch_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["qwen2-gqa", "qwen3-headdim", "glm-mqa"])
def test_greedy_generate_matches_transformers(tmp_path, variant):
    ref, path = hf_family_model(tmp_path, variant, seed=2)
    model = jaxmedusa.load(path, max_len=128)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (1, 12, 40)]
    expected = [hf_greedy(ref, p, 20) for p in prompts]
    assert jaxmedusa.generate(model, prompts, max_new_tokens=20, eos_token_id=[]).tokens == expected


def chatglm_dir_from_glm(ref, path: str) -> str:
    """The THUDM ChatGLM layout (config keys, fused query_key_value, transformer.* names, a .bin with the
    rotary buffer) of the same weights as a transformers GlmForCausalLM."""
    import torch

    c, sd = ref.config, ref.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(c.head_dim // 4)}
    for n in range(c.num_hidden_layers):
        hf, th = f"model.layers.{n}", f"transformer.encoder.layers.{n}"
        out[f"{th}.input_layernorm.weight"] = sd[f"{hf}.input_layernorm.weight"]
        out[f"{th}.post_attention_layernorm.weight"] = sd[f"{hf}.post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[f"{th}.self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[f"{hf}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{th}.self_attention.dense.weight"] = sd[f"{hf}.self_attn.o_proj.weight"]
        out[f"{th}.mlp.dense_h_to_4h.weight"] = sd[f"{hf}.mlp.gate_up_proj.weight"]
        out[f"{th}.mlp.dense_4h_to_h.weight"] = sd[f"{hf}.mlp.down_proj.weight"]
    theta = c.rope_parameters["rope_theta"]
    cfg = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
           "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
           "num_layers": c.num_hidden_layers, "padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
           "ffn_hidden_size": c.intermediate_size, "kv_channels": c.head_dim,
           "num_attention_heads": c.num_attention_heads, "multi_query_attention": True,
           "multi_query_group_num": c.num_key_value_heads, "seq_length": c.max_position_embeddings,
           "layernorm_epsilon": c.rms_norm_eps, "rope_ratio": theta / 10000.0, "add_qkv_bias": True,
           "add_bias_linear": False, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
           "post_layer_norm": True, "original_rope": True, "tie_word_embeddings": False, "eos_token_id": 2,
           "pad_token_id": 0, "torch_dtype": "float32"}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.save({k: v.contiguous() for k, v in out.items()}, os.path.join(path, "pytorch_model.bin"))
    return path


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["glm-gqa", "glm-mqa"])
def test_thudm_chatglm_layout_gives_the_same_logits(tmp_path, variant):
    ref, _ = hf_family_model(tmp_path, variant, seed=3)
    path = chatglm_dir_from_glm(ref, os.path.join(tmp_path, "chatglm"))
    model = jaxmedusa.load(path, max_len=160)
    assert model.config.architecture == "ChatGLMModel" and model.config.rope.interleaved
    ids = np.random.default_rng(3).integers(0, 97, size=(1, 150))
    np.testing.assert_allclose(jax_full_logits(model, ids), torch_logits(ref, ids), atol=1e-4, rtol=0)
    # saved back in its own layout, and read again to the same model
    jaxmedusa.save(model, os.path.join(tmp_path, "again"))
    with open(os.path.join(tmp_path, "again", "config.json")) as f:
        assert json.load(f)["model_type"] == "chatglm"
    again = jaxmedusa.load(os.path.join(tmp_path, "again"), max_len=160)
    np.testing.assert_array_equal(jax_full_logits(again, ids), jax_full_logits(model, ids))


def random_family_lm(variant: str, seed: int):
    """A random jaxmedusa model of `variant` with weights large enough that greedy choices are not near-ties."""
    import jax
    from flax import nnx

    lm = create_lm(ModelConfig.from_hf_dict(dict(BASE, **VARIANTS[variant])), dtype=jnp.float32,
                   rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(lm)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree_util.tree_leaves(state))))
    state = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.2
                                   if x.ndim == 2 else x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                                   state)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("variant", ["qwen2-gqa", "qwen3-headdim", "glm-mqa"])
def test_greedy_medusa_equals_vanilla(variant):
    lm = random_family_lm(variant, seed=4)
    model = jaxmedusa.Model(lm=lm, max_len=160, heads=random_heads(lm, num_heads=4, seed=4))
    prompts = [[5], list(range(3, 30))]
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=20, medusa=False, eos_token_id=[])
    for tree in ("mc_sim_7b_63", "chain-3"):
        medusa = jaxmedusa.generate(model, prompts, max_new_tokens=20, tree=tree, eos_token_id=[])
        assert medusa.tokens == vanilla.tokens
        assert medusa.stats["medusa"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trip(variant):
    cfg = ModelConfig.from_hf_dict(dict(BASE, **VARIANTS[variant]))
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_family_fields_are_read():
    q2 = ModelConfig.from_hf_dict(dict(BASE, **VARIANTS["qwen2-gqa"]))
    assert (q2.family, q2.qkv_bias, q2.o_bias, q2.qk_norm) == ("qwen", True, False, False)
    q3 = ModelConfig.from_hf_dict(dict(BASE, **VARIANTS["qwen3-headdim"]))
    assert (q3.head_dim, q3.qkv_bias, q3.qk_norm) == (24, False, True)
    glm = ModelConfig.from_hf_dict(dict(BASE, **VARIANTS["glm-gqa"]))
    assert (glm.family, glm.rope.rotary_dim(16), glm.rope.interleaved, glm.qkv_bias, glm.o_bias) == \
        ("glm", 8, True, True, False)
    chatglm = ModelConfig.from_hf_dict({"architectures": ["ChatGLMModel"], "num_layers": 2, "padded_vocab_size": 97,
                                        "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16,
                                        "num_attention_heads": 4, "multi_query_attention": True,
                                        "multi_query_group_num": 2, "rope_ratio": 50,
                                        "add_qkv_bias": True, "seq_length": 512})
    assert (chatglm.rope.theta, chatglm.max_position_embeddings, chatglm.num_kv_heads, chatglm.qkv_bias,
            chatglm.o_bias, chatglm.norm_scale_in_float32) == (500000.0, 512, 2, True, False, True)


CHATGLM = {"architectures": ["ChatGLMModel"], "num_layers": 2, "padded_vocab_size": 97, "hidden_size": 64,
           "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4, "multi_query_attention": True,
           "multi_query_group_num": 2}


@pytest.mark.parametrize("config, message", [
    (dict(CHATGLM, rmsnorm=False), "rmsnorm=False"),
    (dict(CHATGLM, apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
    (dict(CHATGLM, multi_query_attention=False), "multi_query_attention=False"),
    ({k: v for k, v in CHATGLM.items() if k != "multi_query_attention"}, "multi_query_attention=None"),
    (dict(CHATGLM, quantization_bit=4), "quantization_bit=4"),
    ({k: v for k, v in CHATGLM.items() if k != "ffn_hidden_size"}, "'ffn_hidden_size'"),
    ({k: v for k, v in CHATGLM.items() if k != "multi_query_group_num"}, "'multi_query_group_num'"),
    (dict(BASE, **VARIANTS["glm-gqa"], partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(BASE, **VARIANTS["qwen3-headdim"], hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(BASE, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe"), "unsupported architecture Qwen2Moe"),
])
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(config)


def test_qwen_sliding_window_only_when_a_layer_slides(tmp_path):
    off = dict(BASE, **VARIANTS["qwen2-gqa"], use_sliding_window=False, sliding_window=32, max_window_layers=0)
    assert ModelConfig.from_hf_dict(off).sliding_window is None
    late = dict(off, use_sliding_window=True, max_window_layers=2)  # layers 2.. slide: there are none
    assert ModelConfig.from_hf_dict(late).sliding_window is None
    on = dict(off, use_sliding_window=True)
    assert ModelConfig.from_hf_dict(on).sliding_window == 32
    jaxmedusa.save(create_lm(ModelConfig.from_hf_dict(on), dtype=jnp.float32), tmp_path / "q")
    with pytest.raises(ConfigError, match="sliding_window 32"):
        jaxmedusa.load(tmp_path / "q", max_len=64)
    assert jaxmedusa.load(tmp_path / "q").max_len == 32


def test_rmsnorm_scales_where_each_checkpoint_code_does():
    """HF casts the normalised value to the input dtype, then scales; THUDM scales in float32, then casts."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.bfloat16)
    w = jnp.asarray(1 + 0.3 * rng.normal(size=64), jnp.bfloat16)
    xf = np.asarray(x, np.float32)
    normed = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + 1e-5)
    wf = np.asarray(w, np.float32)
    expect_hf = np.asarray(jnp.asarray(wf * np.asarray(jnp.asarray(normed, jnp.bfloat16), np.float32), jnp.bfloat16))
    expect_thudm = np.asarray(jnp.asarray(wf * normed, jnp.bfloat16))
    for scale_f32, expect in ((False, expect_hf), (True, expect_thudm)):
        norm = RMSNorm(64, 1e-5, param_dtype=jnp.bfloat16, scale_in_float32=scale_f32)
        norm.weight.set_value(w)
        np.testing.assert_array_equal(np.asarray(norm(x), np.float32), np.asarray(expect, np.float32))
    assert not np.array_equal(expect_hf, expect_thudm)  # the two orders do differ in bfloat16
