import json

import pytest

from jaxmedusa.models import ConfigError, ModelConfig

from conftest import tiny_config


def test_reads_classic_and_transformers5_rope_fields():
    classic = tiny_config(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    new = tiny_config(rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0})
    a, b = ModelConfig.from_hf_dict(classic), ModelConfig.from_hf_dict(new)
    assert a == b
    assert a.rope.type == "linear" and a.rope.theta == 500000.0 and a.rope.factor == 2.0


def test_gqa_head_dim_and_eos_list():
    cfg = ModelConfig.from_hf_dict(tiny_config(eos_token_id=[2, 5]))
    assert cfg.group_size == 2 and cfg.head_dim == 16 and cfg.eos_token_ids == (2, 5)


def test_round_trip_through_hf_dict():
    cfg = ModelConfig.from_hf_dict(tiny_config(
        tie_word_embeddings=True, attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}))
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture GPT2LMHeadModel"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "needs a 'factor'"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(tiny_config(**change))


def test_missing_field_is_named():
    d = tiny_config()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size'"):
        ModelConfig.from_hf_dict(d)
