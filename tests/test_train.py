"""Training: config, data masking, per-head label shifts, Medusa-1/2 invariants, sharding, exact resume, export."""

import dataclasses
import json
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmedusa
from jaxmedusa.cli import main
from jaxmedusa.train import (ChatRenderer, DataError, Message, TrainConfigError, Trainer, config_from_dict,
                             load_config, load_conversations, tokenize)
from jaxmedusa.train import losses
from jaxmedusa.train.data import batch_indices
from jaxmedusa.train.distill import distill

from conftest import random_heads, random_lm, run_on_host_mesh, save_word_tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))


def write_chat_data(path: str, n: int = 40, seed: int = 0) -> None:
    """Conversations whose user turns use words w3..w29 and assistant replies w40..w90 (disjoint)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            turns = []
            for _ in range(rng.choice([1, 2])):
                u = rng.randrange(3, 25)
                a = rng.randrange(40, 80)
                turns += [{"from": "human", "value": " ".join(f"w{u + j}" for j in range(4))},
                          {"from": "gpt", "value": " ".join(f"w{a + j}" for j in range(10))}]
            f.write(json.dumps({"conversations": turns}) + "\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train"))
    jaxmedusa.save(random_lm(0), os.path.join(d, "model"))
    save_word_tokenizer(os.path.join(d, "model"))
    write_chat_data(os.path.join(d, "data.jsonl"))
    write_chat_data(os.path.join(d, "heldout.jsonl"), n=8, seed=1)
    return d


def make_cfg(run_dir, out, **kw):
    base = dict(model=os.path.join(run_dir, "model"), data=[os.path.join(run_dir, "data.jsonl")], seq_len=32,
                batch_size=4, steps=4, output_dir=out, checkpoint_every=2, log_every=1, progress=False, heads=3,
                learning_rate=1e-2, warmup_ratio=0.0)
    base.update(kw)
    return config_from_dict(base)


def flat(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def assert_same_training(a, b):
    """Two runs did the same arithmetic up to fp32 summation order: the loss and gradient norm of every
    step agree tightly; the parameters agree per tensor by norm. (Element by element they need not: AdamW
    divides each gradient by its own magnitude, so a weight whose gradient is ~0, an embedding row seen
    once, moves by a different fraction of the learning rate when its tiny gradient is summed in another
    order.)"""
    assert a.step == b.step
    for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
        np.testing.assert_allclose([h[key] for h in a.history], [h[key] for h in b.history], rtol=rtol)
    for x, y in zip(flat(a.params), flat(b.params)):
        assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(x) + 1e-7, (np.linalg.norm(x - y), x.shape)


# ---- config -------------------------------------------------------------------------------------------

def test_config_yaml_overrides_and_relative_paths(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("model: m\ndata: [d.jsonl]\nmode: medusa1\nsteps: 10\nmesh: {fsdp: 1}\n")
    cfg = load_config(str(path), ["steps=20", "learning_rate=0.5", "mesh.data=1", "data=other.jsonl"])
    assert cfg.model == str(tmp_path / "cfg" / "m")  # relative to the YAML file
    assert cfg.data == ("other.jsonl",)  # --set paths stay relative to the working directory
    assert (cfg.steps, cfg.learning_rate, cfg.mesh.data, cfg.mesh.fsdp) == (20, 0.5, 1, 1)


@pytest.mark.parametrize("raw, match", [
    (dict(model="m", data=["d"], stepz=3), "unknown key 'stepz'"),
    (dict(model="m", data=["d"], mesh={"dp": 2}), "mesh.dp"),
    (dict(model="m", data=["d"], steps="many"), "steps: expected a number"),
    (dict(model="m", data=["d"], mode="medusa3"), "mode"),
    (dict(data=["d"]), "exactly one of model"),
    (dict(model="m", data=[]), "data"),
    (dict(model="m", data=["d"], batch_size=6, grad_accum=4), "grad_accum"),
    (dict(model="m", data=["d"], heads_warmup_steps=2), "heads_warmup_steps"),
    (dict(model="m", data=["d"], mesh={"tensor": 0}), "mesh.tensor"),
    (dict(model_init={"vocab_size": 9}, data=["d"], mode="medusa1"), "model_init"),
])
def test_config_errors_name_the_key(raw, match):
    with pytest.raises(TrainConfigError, match=match):
        config_from_dict(raw)


# ---- data ---------------------------------------------------------------------------------------------

def _tokenizer(tmp_path, template: str | None = None):
    from transformers import AutoTokenizer

    path = str(tmp_path / "tok")
    save_word_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if template:
        tok.chat_template = template
    return tok


CONV = [Message("system", "w3 w4"), Message("user", "w5 w6 w7"), Message("assistant", "w50 w51"),
        Message("user", "w8"), Message("assistant", "w60 w61 w62")]
JINJA = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w33 {{ m['content'] }} </s> "
         "{% else %}w30 {{ m['content'] }} w31 {% endif %}{% endfor %}{% if add_generation_prompt %}w33 {% endif %}")


@pytest.mark.parametrize("template", [None, JINJA], ids=["plain", "chat-template"])
def test_loss_mask_covers_assistant_tokens_only(tmp_path, template):
    tok = _tokenizer(tmp_path, template)
    renderer = ChatRenderer(tok, "auto")
    assert renderer.use_chat_template == (template is not None)
    ids, mask = renderer.encode(CONV)
    words = tok.convert_ids_to_tokens(ids)
    masked = [w for w, m in zip(words, mask) if m]
    assert masked == ["w50", "w51", "</s>", "w60", "w61", "w62", "</s>"]  # replies and their end-of-turn
    for w, m in zip(words, mask):  # no system, user or template token ever counts
        if w in ("w3", "w4", "w5", "w6", "w7", "w8", "w30", "w31", "w33", "<s>", "<unk>"):
            assert not m


def test_both_record_formats_and_bad_records(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"conversations": [{"from": "human", "value": "w3"}, {"from": "gpt", "value": "w4"}]})
                 + "\n" + json.dumps({"messages": [{"role": "user", "content": "w3"},
                                                   {"role": "assistant", "content": "w4"}]}) + "\n")
    a, b = load_conversations(str(p))
    assert a == b == [Message("user", "w3"), Message("assistant", "w4")]
    p.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1, turn 0: unknown role 'robot'"):
        load_conversations(str(p))


def test_plain_text_documents_train_on_every_token(tmp_path):
    tok = _tokenizer(tmp_path, JINJA)  # a chat template does not apply to a plain document
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"text": "w5 w6 w7", "path": "a.py"}) + "\n" + json.dumps({"text": "w8"}) + "\n")
    docs = load_conversations(str(p))
    assert docs == [[Message("text", "w5 w6 w7")], [Message("text", "w8")]]
    ids, mask = ChatRenderer(tok, "auto").encode(docs[0])
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "w5", "w6", "w7", "</s>"]
    assert mask == [False, True, True, True, True]  # everything the model predicts: the text and its EOS
    p.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="line 1: 'text' must be a string"):
        load_conversations(str(p))


def test_packing_padding_and_deterministic_shuffle(tmp_path):
    tok = _tokenizer(tmp_path)
    renderer = ChatRenderer(tok)
    convs = [CONV, CONV[:3]]
    padded = tokenize(convs, renderer, 64, packing=False)
    ids, mask = renderer.encode(CONV)
    assert padded.tokens.shape == (2, 64)
    assert padded.tokens[0, :len(ids)].tolist() == ids and padded.mask[0, :len(ids)].tolist() == mask
    assert not padded.mask[0, len(ids):].any()
    packed = tokenize(convs * 4, renderer, 16, packing=True)
    assert packed.tokens.shape[1] == 16 and packed.tokens.reshape(-1)[:len(ids)].tolist() == ids
    first = batch_indices(10, 7, 6, seed=3)  # crosses from epoch 0 into epoch 1
    assert first.tolist() == batch_indices(10, 7, 6, seed=3).tolist()
    epoch0 = batch_indices(10, 0, 10, seed=3)
    assert sorted(epoch0.tolist()) == list(range(10)) and epoch0.tolist() != list(range(10))
    assert first[:3].tolist() == epoch0[7:].tolist()


# ---- losses -------------------------------------------------------------------------------------------

def test_head_k_targets_the_token_k_plus_2_ahead():
    rng = np.random.default_rng(0)
    b, t, v = 2, 12, 11
    tokens = rng.integers(0, v, (b, t))
    mask = rng.random((b, t)) > 0.3
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    for shift in (1, 2, 3, 5):
        got = losses.shifted_cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask), shift)
        ce, n, correct = 0.0, 0, 0
        for i in range(b):
            for p in range(t - shift):
                if mask[i, p + shift]:
                    lp = logits[i, p] - np.log(np.exp(logits[i, p]).sum())
                    ce -= lp[tokens[i, p + shift]]
                    correct += int(np.argmax(logits[i, p]) == tokens[i, p + shift])
                    n += 1
        np.testing.assert_allclose(float(got.loss), ce / n, rtol=1e-5)
        assert (int(got.count), int(got.correct)) == (n, correct)

    # heads whose logits are one-hot at tokens[t + k + 2] are perfect for exactly that shift
    lm = random_lm(1)
    heads = random_heads(lm, num_heads=3)
    hidden = jnp.asarray(rng.normal(size=(b, t, 64)).astype(np.float32))
    tok = jnp.asarray(tokens)

    class Oracle:
        def __init__(self, shift):
            self.shift = shift

        def __call__(self, h, lm_logits):
            target = jnp.concatenate([tok[:, self.shift:], jnp.zeros((b, self.shift), tok.dtype)], axis=1)
            return jax.nn.one_hot(target, 97) * 50.0

    heads.heads = [Oracle(k + 2) for k in range(3)]
    hl = losses.head_losses(heads, hidden, lm.logits, tok, jnp.ones((b, t), bool))
    np.testing.assert_allclose(np.asarray(hl.correct), np.asarray(hl.count))
    assert float(jnp.max(hl.loss)) < 1e-6
    assert hl.count.tolist() == [b * (t - k - 2) for k in range(3)]


def test_training_forward_without_cache_equals_prefill():
    lm = random_lm(3)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 40)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    h_train, none = lm(ids, pos, None, None)
    cache = jaxmedusa.KVCache.create(lm.config, 2, 40)
    h_pref, _ = lm(ids, pos, cache, jnp.tril(jnp.ones((40, 40), bool)), prefill=True)
    assert none is None
    np.testing.assert_allclose(np.asarray(h_train), np.asarray(h_pref), atol=2e-5)


# ---- training runs -----------------------------------------------------------------------------------

def test_medusa1_lowers_loss_keeps_base_bit_identical_and_exports(run_dir, tmp_path):
    cfg = make_cfg(run_dir, str(tmp_path / "out"), steps=12, eval_data=[os.path.join(run_dir, "heldout.jsonl")])
    trainer = Trainer(cfg)
    base_before = flat(trainer.frozen["lm"])
    result = trainer.run()
    assert "lm" not in result.params  # nothing of the base is trained
    assert all(np.array_equal(a, b) for a, b in zip(base_before, flat(trainer.frozen["lm"])))
    on_disk = jaxmedusa.load(cfg.model)
    assert all(np.array_equal(a, b) for a, b in zip(base_before, flat(nnx.split(on_disk.lm)[1])))
    train_rows = [h for h in result.history if h.get("split") != "eval"]
    assert np.mean([h["loss"] for h in train_rows[-3:]]) < np.mean([h["loss"] for h in train_rows[:3]])
    assert len(train_rows[-1]["head_acc"]) == 3 and result.history[-1]["split"] == "eval"
    logged = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [r["step"] for r in logged if "split" not in r] == list(range(1, 13))

    # the exported heads, loaded the official way, give the trainer's head logits
    model = jaxmedusa.load(cfg.model, heads=result.heads_dir)
    _, heads = trainer.trained_modules()
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(model.heads(hidden, model.lm.logits)),
                               np.asarray(heads(hidden, model.lm.logits)), rtol=1e-6, atol=1e-6)
    with open(os.path.join(result.heads_dir, "config.json")) as f:
        assert json.load(f)["medusa_num_heads"] == 3


def test_kill_and_resume_equals_uninterrupted(run_dir, tmp_path):
    full = Trainer(make_cfg(run_dir, str(tmp_path / "a"), steps=5)).run()
    cfg = make_cfg(run_dir, str(tmp_path / "b"), steps=5)
    Trainer(cfg).run(until=3)  # "killed" after step 3: the checkpoint at step 2 survives, step 3 is lost
    resumed_trainer = Trainer(cfg)
    assert resumed_trainer.restore() and resumed_trainer.step == 2 and resumed_trainer.position == 8
    resumed = Trainer(cfg).run()
    assert resumed.step == 5
    for a, b in zip(flat(full.params), flat(resumed.params)):
        np.testing.assert_array_equal(a, b)


def test_grad_accumulation_equals_one_big_batch(run_dir, tmp_path):
    a = Trainer(make_cfg(run_dir, str(tmp_path / "a"), steps=3)).run(until=3)
    b = Trainer(make_cfg(run_dir, str(tmp_path / "b"), steps=3, grad_accum=2)).run(until=3)
    assert_same_training(a, b)


def test_medusa2_warmup_freezes_base_then_trains_it_and_exports_model(run_dir, tmp_path):
    cfg = make_cfg(run_dir, str(tmp_path / "m2"), mode="medusa2", steps=4, heads_warmup_steps=2,
                   head_coefficient=0.2, coefficient_schedule="sine")
    trainer = Trainer(cfg)
    base0 = flat(trainer.state["params"]["lm"])
    heads0 = flat(trainer.state["params"]["heads"])
    trainer.run(until=2)
    assert all(np.array_equal(a, b) for a, b in zip(base0, flat(trainer.state["params"]["lm"])))
    assert not all(np.array_equal(a, b) for a, b in zip(heads0, flat(trainer.state["params"]["heads"])))
    result = trainer.run()
    assert not all(np.array_equal(a, b) for a, b in zip(base0, flat(result.params["lm"])))
    assert 0 < result.history[-1]["coefficient"] <= 0.2
    model = jaxmedusa.load(result.model_dir, heads=result.heads_dir)
    lm, _ = trainer.trained_modules()
    ids = [[3, 4, 5, 6]]
    assert jaxmedusa.generate(model, ids, max_new_tokens=8, medusa=False).tokens == \
        jaxmedusa.generate(jaxmedusa.Model(lm=lm), ids, max_new_tokens=8).tokens


def test_distill_kl_medusa2_runs_against_frozen_teacher(run_dir, tmp_path):
    cfg = make_cfg(run_dir, str(tmp_path / "kl"), mode="medusa2", steps=2, distill_kl=True)
    trainer = Trainer(cfg)
    teacher0 = flat(trainer.frozen["teacher"])
    result = trainer.run()
    assert result.history[0]["kl"] < 1e-6  # the student starts as the teacher
    assert all(np.array_equal(a, b) for a, b in zip(teacher0, flat(trainer.frozen["teacher"])))


def test_resume_refuses_a_checkpoint_of_another_mode(run_dir, tmp_path):
    out = str(tmp_path / "x")
    Trainer(make_cfg(run_dir, out, steps=2)).run()
    with pytest.raises(ValueError, match="other settings .*mode: 'medusa1' -> 'medusa2'"):
        Trainer(make_cfg(run_dir, out, steps=2, mode="medusa2")).run()
    os.remove(os.path.join(out, "run.json"))  # a run from before manifests: the checkpoint itself is checked
    with pytest.raises(ValueError, match="different model or mode"):
        Trainer(make_cfg(run_dir, out, steps=2, mode="medusa2")).run()


def test_four_device_mesh_equals_one_device(run_dir, tmp_path):
    script = f"""
import numpy as np, jax, sys
sys.path.insert(0, {TESTS!r})
assert len(jax.devices()) == 4
from test_train import make_cfg, assert_same_training
from jaxmedusa.train import Trainer
from jaxmedusa.train.config import MeshConfig
import dataclasses
one = Trainer(make_cfg({run_dir!r}, {str(tmp_path / 'one')!r}, steps=3, mode="medusa2"), devices=jax.devices()[:1]).run()
cfg = make_cfg({run_dir!r}, {str(tmp_path / 'four')!r}, steps=3, mode="medusa2")
cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=2))
t = Trainer(cfg)
assert any("fsdp" in str(s.spec) for s in jax.tree_util.tree_leaves(t.state_sharding["params"]))
four = t.run()
assert one.step == four.step == 3
assert_same_training(one, four)
print("OK")
"""
    assert "OK" in run_on_host_mesh(script, devices=4)


# ---- distillation and CLI ----------------------------------------------------------------------------

def test_distill_regenerates_assistant_turns_with_the_model(run_dir, tmp_path):
    model = jaxmedusa.load(os.path.join(run_dir, "model"), max_len=128)
    convs = load_conversations(os.path.join(run_dir, "heldout.jsonl"))[:3]
    out = distill(model, convs, max_new_tokens=6, batch_size=2)
    renderer = ChatRenderer(model.tokenizer)
    for src, got in zip(convs, out):
        assert [m for m in got if m.role != "assistant"] == [m for m in src if m.role != "assistant"]
        assert [m.role for m in got] == [m.role for m in src]
        first_user = got[:next(i for i, m in enumerate(got) if m.role == "assistant")]
        ids = model.tokenizer(renderer.prompt(first_user), add_special_tokens=False)["input_ids"]
        expected = jaxmedusa.generate(model, [ids], max_new_tokens=6, eos_token_id=model.eos_token_ids).texts[0]
        assert got[len(first_user)].content == expected.lstrip()
    with_heads = dataclasses.replace(model, heads=random_heads(model.lm, num_heads=3, seed=5))
    assert distill(with_heads, convs, max_new_tokens=6, batch_size=2, medusa=True) == out  # heads: same replies


def test_cli_train_and_distill(run_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {run_dir}/model\ndata: {run_dir}/data.jsonl\nseq_len: 32\nbatch_size: 4\nsteps: 2\n"
                   f"heads: 2\nprogress: false\ncheckpoint_every: 2\n")
    rc = main(["train", str(cfg), "--set", f"output_dir={tmp_path}/out", "--set", "log_every=1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and len(summary["head_acc"]) == 2
    assert os.path.isfile(os.path.join(summary["heads"], "medusa_lm_head.safetensors"))

    assert main(["train", str(cfg), "--set", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err

    out = tmp_path / "distilled.jsonl"
    rc = main(["distill", "--model", f"{run_dir}/model", "--data", f"{run_dir}/heldout.jsonl", "--out", str(out),
               "--max-new-tokens", "4", "--limit", "2", "--max-len", "128"])
    assert rc == 0
    assert len(load_conversations(str(out))) == 2


def test_shipped_tiny_cpu_config_is_valid():
    cfg = load_config(os.path.join(TESTS, "..", "configs", "train", "tiny-cpu.yaml"))
    assert cfg.mode == "medusa2" and all(os.path.isfile(p) for p in cfg.data + cfg.eval_data)
    assert os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json"))
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)) <= cfg.model_init["vocab_size"]


def test_shipped_vicuna_recipe_is_the_papers_and_runs(run_dir, tmp_path):
    path = os.path.join(TESTS, "..", "configs", "train", "vicuna-7b-medusa1.yaml")
    cfg = load_config(path)
    assert (cfg.mode, cfg.heads, cfg.chat_template, cfg.seq_len, cfg.epochs, cfg.learning_rate) == \
        ("medusa1", 5, "vicuna", 2048, 2.0, 1e-3)
    assert cfg.batch_size == 128 and cfg.compute_dtype == "bfloat16" and not cfg.packing
    small = load_config(path, [f"model={run_dir}/model", f"data={run_dir}/data.jsonl", "seq_len=32", "batch_size=8",
                               "grad_accum=2", "epochs=0.2", f"output_dir={tmp_path}/v", "progress=false"])
    result = Trainer(small).run()
    assert result.step == math.ceil(0.2 * 40 / 8) and os.path.isfile(os.path.join(result.heads_dir, "config.json"))


@pytest.mark.parametrize("chunk,shared", [(2, False), (5, False), (8, True), (13, False), (30, True)])
def test_chunked_losses_equal_whole_sequence_losses_and_gradients(chunk, shared):
    """The memory-bounded losses (vocabulary projections over `chunk` positions at a time: the heads' own
    projections with gradients computed in the forward pass, the shared lm_head and the LM loss
    rematerialised) give the whole-sequence losses, counts and gradients up to fp32 summation order."""
    lm = random_lm(seed=40)
    heads = random_heads(lm, num_heads=3, seed=40, shared_lm_head=shared)
    rng = np.random.default_rng(40)
    tokens = jnp.asarray(rng.integers(3, 97, size=(2, 23)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 23)) < 0.7)
    hidden = jnp.asarray(rng.normal(size=(2, 23, 64)).astype(np.float32))
    graphdef, state = nnx.split(heads)

    def total(state, hidden, chunk):
        h = nnx.merge(graphdef, state)
        hl = losses.head_losses(h, hidden, lm.logits, tokens, mask, chunk=chunk)
        ll = losses.projected_cross_entropy(lm.logits, hidden, tokens, mask, 1, chunk=chunk)
        return jnp.sum(hl.loss) + ll.loss, (hl, ll)

    grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True), static_argnums=2)
    (whole, (hw, lw)), gw = grad(state, hidden, 0)
    (part, (hp, lp)), gp = grad(state, hidden, chunk)
    np.testing.assert_allclose(part, whole, rtol=1e-6)
    for a, b in ((hp, hw), (lp, lw)):
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
        np.testing.assert_array_equal(a.correct, b.correct)
        np.testing.assert_array_equal(a.count, b.count)
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gw)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
