"""Medusa heads: logits against a PyTorch implementation of the official head, and the checkpoint formats."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmedusa
from jaxmedusa.checkpoint import CheckpointError
from jaxmedusa.heads_io import heads_state_dict, save_heads
from jaxmedusa.safetensors_io import iter_safetensors, save_safetensors

from conftest import random_heads, random_lm


def official_heads_torch(state: dict, num_heads: int, num_layers: int, hidden: int, vocab: int):
    """The reference implementation's head: Sequential(ResBlock * L, Linear(H, V, bias=False))."""
    import torch
    from torch import nn

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(hidden, hidden)
            self.act = nn.SiLU()

        def forward(self, x):
            return x + self.act(self.linear(x))

    heads = nn.ModuleList([nn.Sequential(*[ResBlock() for _ in range(num_layers)],
                                         nn.Linear(hidden, vocab, bias=False)) for _ in range(num_heads)])
    heads.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return heads


@pytest.mark.torch
def test_head_logits_match_pytorch_official_head():
    import torch

    lm = random_lm(seed=51)
    heads = random_heads(lm, 3, 2, seed=51)
    state = heads_state_dict(heads)
    ref = official_heads_torch(state, 3, 2, 64, 97)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    ours = np.asarray(heads(jnp.asarray(x), lm.logits))
    with torch.no_grad():
        theirs = np.stack([h(torch.from_numpy(x)).numpy() for h in ref])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.torch
def test_official_pt_round_trip(tmp_path):
    """torch state dict -> medusa_lm_head.pt -> jaxmedusa -> saved safetensors -> the same state dict."""
    import torch

    rng = np.random.default_rng(52)
    state = {}
    for i in range(5):
        state[f"{i}.0.linear.weight"] = rng.standard_normal((64, 64)).astype(np.float32)
        state[f"{i}.0.linear.bias"] = rng.standard_normal(64).astype(np.float32)
        state[f"{i}.1.weight"] = rng.standard_normal((97, 64)).astype(np.float32)
    src = tmp_path / "src"
    src.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src / "medusa_lm_head.pt")
    (src / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))  # under-reports
    heads = jaxmedusa.load_heads(str(src), hidden=64, vocab=97, dtype=jnp.float32)
    assert heads.num_heads == 5 and heads.num_layers == 1
    save_heads(heads, str(tmp_path / "out"))
    back = dict(iter_safetensors(tmp_path / "out" / "medusa_lm_head.safetensors"))
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 5 and cfg["medusa_num_layers"] == 1


def _write_heads(path, tensors, config=None):
    os.makedirs(path, exist_ok=True)
    save_safetensors(os.path.join(path, "medusa_lm_head.safetensors"), tensors)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config or {}, f)


def test_aliased_layers_and_shared_lm_head_variants(tmp_path):
    lm = random_lm(seed=53)
    rng = np.random.default_rng(53)
    w, b, proj = (rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32),
                  rng.standard_normal((97, 64)).astype(np.float32))
    # the reference code's aliasing: 2 layers configured, only layer 0's keys stored, projection at index 2
    _write_heads(tmp_path / "aliased", {"0.0.linear.weight": w, "0.0.linear.bias": b, "0.2.weight": proj},
                 {"medusa_num_layers": 2})
    heads = jaxmedusa.load_heads(str(tmp_path / "aliased"), hidden=64, vocab=97, dtype=jnp.float32)
    assert heads.num_layers == 2
    for block in heads.heads[0].blocks:
        np.testing.assert_array_equal(np.asarray(block.linear.kernel[...]), w.T)
    # "version 2": no projection, the base lm_head is reused
    _write_heads(tmp_path / "v2", {"0.0.linear.weight": w, "0.0.linear.bias": b, "1.0.linear.weight": w,
                                   "1.0.linear.bias": b}, {"medusa_num_layers": 1})
    heads = jaxmedusa.load_heads(str(tmp_path / "v2"), hidden=64, vocab=97, dtype=jnp.float32)
    assert heads.shared_lm_head and heads.num_heads == 2
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    res = x + jnp.asarray(np.asarray(x) @ w.T + b) * (1 / (1 + jnp.exp(-(jnp.asarray(np.asarray(x) @ w.T + b)))))
    np.testing.assert_allclose(np.asarray(heads(x, lm.logits)[1]), np.asarray(lm.logits(res)), atol=1e-4)


@pytest.mark.parametrize("tensors, config, message", [
    ({"0.0.linear.weight": np.zeros((64, 64), np.float32), "0.0.linear.bias": np.zeros(64, np.float32),
      "0.1.weight": np.zeros((97, 64), np.float32), "0.0.extra": np.zeros(1, np.float32)}, {},
     "unexpected key '0.0.extra'"),
    ({"0.0.linear.weight": np.zeros((64, 32), np.float32), "0.0.linear.bias": np.zeros(64, np.float32),
      "0.1.weight": np.zeros((97, 64), np.float32)}, {}, r"'0.0.linear.weight': expected shape \(64, 64\)"),
    ({"0.0.linear.weight": np.zeros((64, 64), np.float32), "0.1.weight": np.zeros((97, 64), np.float32)}, {},
     "missing key '0.0.linear.bias'"),
    ({"0.0.linear.weight": np.zeros((64, 64), np.float32), "0.0.linear.bias": np.zeros(64, np.float32),
      "0.1.weight": np.zeros((97, 64), np.float32)}, {"medusa_num_layers": 3},
     "medusa_num_layers=3 but the heads file .* has 1"),
])
def test_bad_heads_files_are_named(tmp_path, tensors, config, message):
    _write_heads(tmp_path / "h", tensors, config)
    with pytest.raises(CheckpointError, match=message):
        jaxmedusa.load_heads(str(tmp_path / "h"), hidden=64, vocab=97, dtype=jnp.float32)


def test_load_with_heads_dir_and_medusa2_checkpoint(tmp_path):
    lm = random_lm(seed=54)
    heads = random_heads(lm, 3, 1, seed=54)
    jaxmedusa.save(lm, tmp_path / "base")
    save_heads(heads, str(tmp_path / "heads"), base_model=str(tmp_path / "base"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64)), jnp.float32)
    want = np.asarray(heads(x, lm.logits))

    model = jaxmedusa.load(tmp_path / "base", heads=tmp_path / "heads", max_len=32)
    np.testing.assert_allclose(np.asarray(model.heads(x, model.lm.logits)), want, atol=1e-6)

    # Medusa-2 layout: the same tensors as medusa_head.* inside the model weights, counts in config.json
    f = tmp_path / "base" / "model.safetensors"
    tensors = {k: np.array(v) for k, v in iter_safetensors(f)}
    tensors.update({f"medusa_head.{k}": v for k, v in heads_state_dict(heads).items()})
    save_safetensors(f, tensors)
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg.update(medusa_num_heads=3, medusa_num_layers=1)
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    model = jaxmedusa.load(tmp_path / "base", max_len=128)
    assert model.heads is not None and model.heads.num_heads == 3
    np.testing.assert_allclose(np.asarray(model.heads(x, model.lm.logits)), want, atol=1e-6)
    vanilla = jaxmedusa.generate(model, [3, 4, 5], max_new_tokens=8, medusa=False, eos_token_id=[]).tokens
    assert jaxmedusa.generate(model, [3, 4, 5], max_new_tokens=8, eos_token_id=[]).tokens == vanilla


def test_heads_tree_round_trip_becomes_the_default_tree(tmp_path):
    lm = random_lm(seed=55)
    heads = random_heads(lm, 2, 1, seed=55, shared_lm_head=True)
    jaxmedusa.save(lm, tmp_path / "base")
    tree = [[0], [1], [0, 0]]
    save_heads(heads, str(tmp_path / "heads"), tree=tree)
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["medusa_choices"] == tree
    model = jaxmedusa.load(tmp_path / "base", heads=tmp_path / "heads", max_len=64)
    assert model.tree == tree
    out = jaxmedusa.generate(model, [3, 4, 5], max_new_tokens=6, eos_token_id=[])
    assert out.stats["tree_nodes"] == 4  # the heads' tree, not mc_sim_7b_63
    assert jaxmedusa.generate(model, [3, 4, 5], max_new_tokens=6, eos_token_id=[], tree=[[0], [0, 0]]
                              ).stats["tree_nodes"] == 3  # an explicit tree still wins
    assert out.tokens == jaxmedusa.generate(model, [3, 4, 5], max_new_tokens=6, eos_token_id=[], medusa=False).tokens


@pytest.mark.parametrize("tree, message", [
    ([[0], "x"], "medusa_choices must be a list of non-empty lists of integer ranks"),
    ([[0], [0, 0, 0]], "medusa_choices is not a valid tree for these heads: .*depth 3"),
])
def test_bad_heads_tree_is_named(tmp_path, tree, message):
    lm = random_lm(seed=56)
    jaxmedusa.save(lm, tmp_path / "base")
    save_heads(random_heads(lm, 2, 1, seed=56), str(tmp_path / "heads"))
    cfg = json.loads((tmp_path / "heads" / "config.json").read_text())
    (tmp_path / "heads" / "config.json").write_text(json.dumps(dict(cfg, medusa_choices=tree)))
    with pytest.raises((CheckpointError, jaxmedusa.ConfigError), match=message):
        jaxmedusa.load(tmp_path / "base", heads=tmp_path / "heads", max_len=64)


def test_vllm_layout_round_trip_and_load(jax_model_dir, tmp_path, capsys):
    """convert heads --to vllm writes vLLM's Medusa draft layout (its config keys and tensor names), and it
    converts back, and loads, to the same heads."""
    from jaxmedusa.cli import main
    from jaxmedusa.safetensors_io import iter_safetensors

    src = jax_model_dir(seed=21)
    model = jaxmedusa.load(src, max_len=16)
    heads = random_heads(model.lm, num_heads=3, num_layers=2, seed=21)
    jaxmedusa.save_heads(heads, tmp_path / "official")
    assert main(["convert", "heads", str(tmp_path / "official"), str(tmp_path / "vllm"), "--to", "vllm"]) == 0
    cfg = json.load(open(tmp_path / "vllm" / "config.json"))
    assert {k: cfg[k] for k in ("model_type", "architectures", "num_heads", "num_hidden_layers", "medusa_fc_bias",
                                 "original_lm_head", "truncated_vocab_size")} == \
        {"model_type": "medusa", "architectures": ["MedusaModel"], "num_heads": 3, "num_hidden_layers": 2,
         "medusa_fc_bias": True, "original_lm_head": False, "truncated_vocab_size": model.config.vocab_size}
    keys = {k for k, _ in iter_safetensors(tmp_path / "vllm" / "model.safetensors")}
    assert keys == ({f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
                    | {f"lm_heads.{i}.weight" for i in range(3)})
    assert main(["convert", "heads", str(tmp_path / "vllm"), str(tmp_path / "back"), "--from", "vllm"]) == 0
    official = dict(iter_safetensors(tmp_path / "official" / "medusa_lm_head.safetensors"))
    back = dict(iter_safetensors(tmp_path / "back" / "medusa_lm_head.safetensors"))
    assert official.keys() == back.keys() and all(np.array_equal(official[k], back[k]) for k in official)
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, model.config.hidden_size)).astype(np.float32))
    via_vllm = jaxmedusa.load(src, heads=tmp_path / "vllm", max_len=16)
    np.testing.assert_array_equal(np.asarray(via_vllm.heads(hidden, model.lm.logits)),
                                  np.asarray(heads(hidden, model.lm.logits)))
    assert main(["convert", "heads", str(tmp_path / "vllm"), str(tmp_path / "x"), "--from", "official"]) == 2
    assert "vllm layout, not official" in capsys.readouterr().err


def test_vllm_shared_lm_head_and_bias_free_heads(jax_model_dir, tmp_path, capsys):
    from jaxmedusa.cli import main
    from jaxmedusa.safetensors_io import iter_safetensors, save_safetensors

    src = jax_model_dir(seed=22)
    model = jaxmedusa.load(src, max_len=16)
    heads = random_heads(model.lm, num_heads=2, shared_lm_head=True, seed=22)
    jaxmedusa.save_heads(heads, tmp_path / "v2")
    assert main(["convert", "heads", str(tmp_path / "v2"), str(tmp_path / "vllm"), "--to", "vllm"]) == 2
    assert "pass the base model (--model)" in capsys.readouterr().err
    assert main(["convert", "heads", str(tmp_path / "v2"), str(tmp_path / "vllm"), "--to", "vllm",
                 "--model", src]) == 0
    stored = dict(iter_safetensors(tmp_path / "vllm" / "model.safetensors"))
    np.testing.assert_array_equal(stored["lm_heads.0.weight"], np.asarray(model.lm.lm_head.kernel[...]).T)
    assert json.load(open(tmp_path / "vllm" / "config.json"))["original_lm_head"] is True
    again = jaxmedusa.load(src, heads=tmp_path / "vllm", max_len=16).heads
    assert again.shared_lm_head and again.num_heads == 2
    # vLLM heads trained without biases (medusa_fc_bias false): loaded with zero biases
    cfg = json.load(open(tmp_path / "vllm" / "config.json"))
    json.dump(dict(cfg, medusa_fc_bias=False), open(tmp_path / "vllm" / "config.json", "w"))
    save_safetensors(tmp_path / "vllm" / "model.safetensors",
                     {k: np.array(v) for k, v in stored.items() if not k.endswith(".bias")})
    nobias = jaxmedusa.load(src, heads=tmp_path / "vllm", max_len=16).heads
    assert not np.any(np.asarray(nobias.heads[1].blocks[0].linear.bias[...]))
