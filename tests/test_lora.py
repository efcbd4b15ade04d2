"""LoRA (Medusa-2 on a frozen base): adapters, their exact merge, full-rank equivalence with full fine-tuning
through the trainer's loss, and a LoRA run that trains, resumes and exports the merged model."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmedusa
from jaxmedusa.models import create_lm, abstract_lm
from jaxmedusa.models.config import ModelConfig
from jaxmedusa.models.layers import Linear
from jaxmedusa.models.lora import add_lora, lora_target_names, merged_state
from jaxmedusa.train import TrainConfigError, Trainer, config_from_dict
from jaxmedusa.train.trainer import build_models, make_loss_fn

from conftest import tiny_config
from test_opt import OPT_TINY
from test_train import flat, make_cfg, run_dir  # noqa: F401 (run_dir: the fixture)


def randomize_adapters(lm, seed: int, std: float = 0.05) -> None:
    """Non-zero B (a fresh adapter's B is zero, which would hide a wrong merge)."""
    _, lora, _ = nnx.split(lm, nnx.LoRAParam, ...)
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(lm, jax.tree_util.tree_unflatten(
        treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def tokens_positions(seed: int, b: int = 2, t: int = 11):
    ids = jnp.asarray(np.random.default_rng(seed).integers(3, 90, size=(b, t)), jnp.int32)
    return ids, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@pytest.mark.parametrize("arch,targets", [("llama", ("k_proj", "o_proj", "up_proj")), ("llama", ()),
                                          ("opt", ("q_proj", "fc2"))])
def test_fresh_adapters_change_nothing_and_the_merge_is_exact(arch, targets):
    cfg = ModelConfig.from_hf_dict(OPT_TINY if arch == "opt" else tiny_config(arch))
    lm = create_lm(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
    ids, pos = tokens_positions(3)
    before = lm.logits(lm(ids, pos, None, None)[0])
    add_lora(lm, 4, 8.0, targets, rngs=nnx.Rngs(4))
    np.testing.assert_array_equal(lm.logits(lm(ids, pos, None, None)[0]), before)
    randomize_adapters(lm, 5)
    adapted = lm.logits(lm(ids, pos, None, None)[0])
    assert float(jnp.max(jnp.abs(adapted - before))) > 1e-3  # the adapters do change the model
    merged = nnx.merge(nnx.split(abstract_lm(cfg, jnp.float32))[0], merged_state(lm))
    assert not any(getattr(m, "lora", None) is not None for _, m in nnx.iter_modules(merged))
    np.testing.assert_allclose(merged.logits(merged(ids, pos, None, None)[0]), adapted, rtol=1e-5, atol=1e-5)


def test_targets_are_transformers_names_and_unknown_ones_are_named():
    lm = create_lm(ModelConfig.from_hf_dict(tiny_config("llama")), dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert lora_target_names(lm) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match="'query' is not a projection of this model; known: q_proj, k_proj"):
        add_lora(lm, 4, 8.0, ["q_proj", "query"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(lm, 0, 8.0, (), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("raw,match", [
    (dict(mode="medusa1", lora={"rank": 4}), "lora: medusa1 keeps the base frozen"),
    (dict(mode="medusa2", lora={"rank": 0}), "lora.rank: must be a positive integer"),
    (dict(mode="medusa2", lora={"rank": 4, "alpha": 0}), "lora.alpha: must be > 0"),
    (dict(mode="medusa2", lora={"ranks": 4}), "unknown key 'lora.ranks'"),
    (dict(mode="medusa2", lora={"targets": [1]}), "lora.targets: expected a list"),
    (dict(mode="medusa2", lora={"export": "peft"}), "lora.export: 'peft' is not one of merged, adapter, both"),
    (dict(mode="medusa2", epochs=2, steps=10), "epochs: give steps or epochs, not both"),
])
def test_lora_and_epochs_config_errors_name_the_key(raw, match):
    with pytest.raises(TrainConfigError, match=match):
        config_from_dict(dict(model="m", data=["d"], **raw))


def test_unknown_lora_target_is_a_config_error(run_dir, tmp_path):  # noqa: F811
    with pytest.raises(TrainConfigError, match="lora.targets: 'qkv' is not a projection"):
        build_models(make_cfg(run_dir, str(tmp_path / "x"), mode="medusa2", lora={"targets": ["qkv"]}))


def test_full_rank_lora_gradients_are_the_full_finetuning_gradient(run_dir):  # noqa: F811
    """Through the trainer's loss: a LoRA model (W + s A B, rank = min(in, out) so the adapters span every
    update of W) has full fine-tuning's loss at the merged weights, and its adapter gradients are exactly
    the chain rule of full fine-tuning's weight gradient G: dA = s G B^T, dB = s A^T G on each part's block.
    A gradient step on the adapters therefore moves W along what full fine-tuning would."""
    rank = 64  # the tiny model's hidden size: full rank for every projection
    lcfg = make_cfg(run_dir, "unused", mode="medusa2", lora={"rank": rank, "alpha": 16.0}, heads=2)
    fcfg = make_cfg(run_dir, "unused", mode="medusa2", heads=2)
    lmodels, fmodels = build_models(lcfg), build_models(fcfg)
    lm = jaxmedusa.load(lcfg.model, dtype=jnp.float32).lm
    assert lm.config.hidden_size == rank
    add_lora(lm, rank, 16.0, (), rngs=nnx.Rngs(1))
    randomize_adapters(lm, 2)
    _, lora, base = nnx.split(lm, nnx.LoRAParam, ...)
    tokens, _ = tokens_positions(7, b=2, t=32)
    mask = jnp.asarray(np.random.default_rng(7).random((2, 32)) < 0.8)
    heads = lmodels.params["heads"]

    lloss = make_loss_fn(lcfg, lmodels)
    floss = make_loss_fn(fcfg, fmodels)
    def grad(loss, params, frozen):
        return jax.jit(jax.value_and_grad(lambda p, f: loss(p, f, tokens, mask, jnp.float32(1.0), None, True),
                                          has_aux=True))(params, frozen)

    (lv, _), lg = grad(lloss, {"lora": lora, "heads": heads}, {"lm": base})
    (fv, _), fg = grad(floss, {"lm": merged_state(lm), "heads": heads}, {})
    np.testing.assert_allclose(lv, fv, rtol=1e-5)
    checked = 0
    for path, lin in nnx.iter_modules(lm):
        if not isinstance(lin, Linear) or lin.lora is None:
            continue
        g = _at(fg["lm"], path + ("kernel",))
        a, s, r = lin.lora.a[...], lin.lora.scale, rank
        np.testing.assert_allclose(_at(lg["lora"], path + ("lora", "a")), s * g @ lin.lora.b_full(jnp.float32).T,
                                   rtol=2e-4, atol=1e-6)
        db = s * a.T @ g
        for j, (start, end) in enumerate(lin.lora.parts):
            np.testing.assert_allclose(_at(lg["lora"], path + ("lora", "b", j)), db[j * r:(j + 1) * r, start:end],
                                       rtol=2e-4, atol=1e-6)
        checked += 1
    assert checked == 4 * lm.config.num_layers  # qkv, o, gate_up and down in every layer
    for a, b in zip(jax.tree_util.tree_leaves(lg["heads"]), jax.tree_util.tree_leaves(fg["heads"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def _at(state, path):
    """The array at an nnx state path."""
    node = state
    for p in path:
        node = node[p]
    return node[...] if hasattr(node, "get_value") else node


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gradient_checkpointing_keeps_outputs_and_gradients(arch):
    """remat=True (the trainer's gradient_checkpointing) recomputes each layer in the backward pass: the same
    hidden states and parameter gradients, op for op."""
    cfg = ModelConfig.from_hf_dict(OPT_TINY if arch == "opt" else tiny_config())
    graphdef, state = nnx.split(create_lm(cfg, dtype=jnp.float32, rngs=nnx.Rngs(8)))
    ids, pos = tokens_positions(8, b=2, t=12)

    def loss(state, remat):
        hidden, _ = nnx.merge(graphdef, state)(ids, pos, None, None, remat=remat)
        return jnp.sum(jnp.sin(hidden))

    (plain, g_plain), (rematted, g_remat) = (jax.value_and_grad(loss)(state, r) for r in (False, True))
    np.testing.assert_allclose(rematted, plain, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_lora_run_freezes_the_base_resumes_exactly_and_exports_the_merged_model(run_dir, tmp_path):  # noqa: F811
    kw = dict(mode="medusa2", steps=4, lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]},
              gradient_checkpointing=True)
    adapter_only = dict(kw, lora=dict(kw["lora"], export="adapter"))
    trainer = Trainer(make_cfg(run_dir, str(tmp_path / "a"), **adapter_only))
    assert set(trainer.state["params"]) == {"lora", "heads"}
    base0, lora0 = flat(trainer.frozen["lm"]), flat(trainer.state["params"]["lora"])
    trainer.run(until=3)  # killed after step 3: the checkpoint of step 2 survives
    resumed = Trainer(make_cfg(run_dir, str(tmp_path / "a"), **adapter_only)).run()
    straight = Trainer(make_cfg(run_dir, str(tmp_path / "b"), **kw)).run()
    assert resumed.step == straight.step == 4
    for a, b in zip(flat(resumed.params), flat(straight.params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.model_dir is None and not os.path.exists(tmp_path / "a" / "model")  # export: adapter
    adapters = [_safetensors_dir(str(tmp_path / d / "adapter")) for d in ("a", "b")]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 3 * 2  # A and B of q, v, down; 2 layers
    for key in adapters[0]:
        np.testing.assert_array_equal(adapters[0][key], adapters[1][key])
    assert all(np.array_equal(a, b) for a, b in zip(base0, flat(trainer.frozen["lm"])))
    assert not all(np.array_equal(a, b) for a, b in zip(lora0, flat(straight.params["lora"])))

    exported = jaxmedusa.load(straight.model_dir, dtype=jnp.float32)
    lm = jaxmedusa.load(os.path.join(run_dir, "model"), dtype=jnp.float32).lm
    add_lora(lm, 4, 8.0, ["q_proj", "v_proj", "down_proj"], rngs=nnx.Rngs(0))
    nnx.update(lm, jax.device_get(straight.params["lora"]))
    ids, pos = tokens_positions(9)
    np.testing.assert_allclose(exported.lm.logits(exported.lm(ids, pos, None, None)[0]),
                               lm.logits(lm(ids, pos, None, None)[0]), rtol=1e-5, atol=1e-5)


def _safetensors_dir(path):
    from jaxmedusa.safetensors_io import iter_safetensors

    return {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors")
            for k, v in iter_safetensors(os.path.join(path, f))}


def test_peft_adapter_applied_to_the_checkpoint_gives_the_merged_export(run_dir, tmp_path):  # noqa: F811
    """output_dir/adapter is a PEFT LoRA adapter: W + lora_alpha / r * lora_B @ lora_A, applied to the base
    checkpoint's tensors by their PEFT key names, gives exactly the exported merged checkpoint's tensors."""
    import json

    targets = ["k_proj", "o_proj", "up_proj"]
    kw = dict(mode="medusa2", steps=2, lora={"rank": 4, "alpha": 8.0, "targets": targets})
    result = Trainer(make_cfg(run_dir, str(tmp_path / "p"), **kw)).run()
    adapter = os.path.join(str(tmp_path / "p"), "adapter")
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (config["peft_type"], config["r"], config["lora_alpha"], sorted(config["target_modules"])) == \
        ("LORA", 4, 8.0, sorted(targets))
    lora = _safetensors_dir(adapter)
    assert len(lora) == 2 * 3 * 2  # A and B, three targets, two layers
    base, merged = _safetensors_dir(os.path.join(run_dir, "model")), _safetensors_dir(result.model_dir)
    scale = config["lora_alpha"] / config["r"]
    rebuilt = dict(base)
    for key in lora:
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
            assert a.shape[0] == b.shape[1] == 4
            rebuilt[module + ".weight"] = base[module + ".weight"].astype(np.float32) + scale * b @ a
    assert set(rebuilt) == set(merged)
    for key, value in merged.items():
        np.testing.assert_allclose(value, rebuilt[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert not np.allclose(merged["model.layers.0.self_attn.k_proj.weight"],
                           base["model.layers.0.self_attn.k_proj.weight"])


def test_adapter_of_a_part_the_checkpoint_fuses_is_refused_by_name():
    from jaxmedusa.models.lora import peft_adapter_tensors

    glm = dict(tiny_config(), model_type="glm", architectures=["GlmForCausalLM"], head_dim=16, pad_token_id=0)
    lm = create_lm(ModelConfig.from_hf_dict(glm), dtype=jnp.float32, rngs=nnx.Rngs(0))
    add_lora(lm, 2, 4.0, ["q_proj", "gate_proj"], rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="the gate_proj adapter of layers.0.mlp.gate_up_proj has no tensor of its own"):
        peft_adapter_tensors(lm)
    lm = create_lm(ModelConfig.from_hf_dict(glm), dtype=jnp.float32, rngs=nnx.Rngs(0))
    add_lora(lm, 2, 4.0, ["q_proj"], rngs=nnx.Rngs(1))
    tensors, names = peft_adapter_tensors(lm)
    assert names == ["q_proj"] and "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in tensors


def test_lora_distill_kl_uses_the_frozen_base_as_teacher(run_dir, tmp_path):  # noqa: F811
    cfg = make_cfg(run_dir, str(tmp_path / "kl"), mode="medusa2", steps=2, distill_kl=True, shared_lm_head=True,
                   lora={"rank": 2, "targets": ["v_proj"], "export": "adapter"})
    trainer = Trainer(cfg)
    assert "teacher" not in trainer.frozen  # no second copy of the base
    result = trainer.run()
    assert result.history[0]["kl"] < 1e-6 < result.history[-1]["kl"]  # B = 0: the student starts as the teacher


def test_an_adapter_peft_cannot_hold_is_refused_before_training(tmp_path):
    from conftest import save_word_tokenizer
    from test_train import write_chat_data

    glm = dict(tiny_config(), model_type="glm", architectures=["GlmForCausalLM"], head_dim=16, pad_token_id=0)
    jaxmedusa.save(create_lm(ModelConfig.from_hf_dict(glm), dtype=jnp.float32, rngs=nnx.Rngs(0)),
                   str(tmp_path / "model"))
    save_word_tokenizer(str(tmp_path / "model"))
    write_chat_data(str(tmp_path / "data.jsonl"), n=4)
    cfg = make_cfg(str(tmp_path), str(tmp_path / "out"), mode="medusa2", lora={"targets": ["up_proj"]})
    with pytest.raises(TrainConfigError, match="lora.export: the up_proj adapter .* export merged"):
        Trainer(cfg)
    merged_only = make_cfg(str(tmp_path), str(tmp_path / "out"), mode="medusa2",
                           lora={"targets": ["up_proj"], "export": "merged"})
    assert set(Trainer(merged_only).state["params"]) == {"lora", "heads"}


def test_epochs_set_the_number_of_steps(run_dir, tmp_path):  # noqa: F811
    raw = dict(make_cfg(run_dir, str(tmp_path / "e")).to_dict(), epochs=1.5)
    del raw["steps"]
    cfg = config_from_dict(raw)
    trainer = Trainer(cfg)
    assert trainer.cfg.steps == math.ceil(1.5 * len(trainer.data) / cfg.batch_size) > 1
