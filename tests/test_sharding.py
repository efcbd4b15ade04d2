"""Tensor-parallel inference on a CPU host mesh (issue #19): parameters and the KV cache split across devices
give the single-device logits, greedy tokens and greedy Medusa tokens, with the attention kernels run per
device under shard_map. Runs in a subprocess, since the host device count is fixed when jax starts."""

import json
import os

import numpy as np
import pytest

import jaxmedusa
from jax.sharding import PartitionSpec as P

from jaxmedusa.sharding import TENSOR, param_spec

from conftest import run_on_host_mesh

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_param_specs_follow_the_megatron_layout():
    n = 4
    assert param_spec(("layers", 0, "self_attn", "qkv_proj", "kernel"), (64, 128), n) == P(None, TENSOR)
    assert param_spec(("layers", 0, "self_attn", "qkv_proj", "bias"), (128,), n) == P(TENSOR)
    assert param_spec(("layers", 0, "self_attn", "o_proj", "kernel"), (64, 64), n) == P(TENSOR, None)
    assert param_spec(("layers", 0, "self_attn", "o_proj", "bias"), (64,), n) == P()
    assert param_spec(("layers", 0, "mlp", "down_proj", "kernel"), (96, 64), n) == P(TENSOR, None)
    assert param_spec(("embed_tokens", "embedding"), (96, 64), n) == P(TENSOR, None)
    assert param_spec(("lm_head", "kernel"), (64, 96), n) == P(None, TENSOR)
    assert param_spec(("heads", 1, "proj", "kernel"), (64, 96), n) == P(None, TENSOR)
    assert param_spec(("layers", 0, "input_layernorm", "weight"), (64,), n) == P()
    assert param_spec(("embed_tokens", "embedding"), (97, 64), n) == P()  # not divisible: replicated


SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {tests!r})
import jaxmedusa
from test_hf_parity import jax_full_logits
assert len(jax.devices()) == 4
path, heads, n = {path!r}, {heads!r}, {n}
one = jaxmedusa.load(path, heads=heads, max_len=160)
tp = jaxmedusa.load(path, heads=heads, max_len=160, mesh=n)
k = tp.lm.layers[0].self_attn.qkv_proj.kernel[...]
assert len(k.sharding.device_set) == n and k.addressable_shards[0].data.shape[1] == k.shape[1] // n
kv_divides = tp.config.num_kv_heads % n == 0
assert tp.lm.layers[0].self_attn.shards == (n if kv_divides else 1) and tp.lm.layers[0].mlp.shards == n
# each device holds its own q/k/v heads and gate/up columns: the compiled decode step moves no activations
# between devices but the row-parallel products' all-reduces (two a layer, one for the embedding)
import re
from flax import nnx
from jaxmedusa.cache import KVCache
gd, st = nnx.split(tp.lm)
def step(st, cache, tok):
    m = nnx.merge(gd, st)
    h, cache = m(tok, cache.lengths[:, None], cache, jnp.ones((1, 1), bool))
    return m.logits(h), cache
with jaxmedusa.sharding.active(tp.mesh):
    hlo = jax.jit(step).lower(st, KVCache.create(tp.config, 2, 16), jnp.zeros((2, 1), jnp.int32)).compile().as_text()
moves = {{op: len(re.findall(rf"\\b{{op}}(-start)?\\(", hlo)) for op in ("all-gather", "all-to-all", "collective-permute")}}
if kv_divides:
    assert moves == {{"all-gather": 0, "all-to-all": 0, "collective-permute": 0}}, moves
    assert len(re.findall(r"\\ball-reduce(-start)?\\(", hlo)) == 2 * tp.config.num_layers + 1
# save() writes the checkpoint's column order back
import tempfile
with tempfile.TemporaryDirectory() as d:
    jaxmedusa.save(tp, d + "/m")
    again = jaxmedusa.load(d + "/m", max_len=160)
for a, b in zip(jax.tree_util.tree_leaves(nnx.state(again.lm)), jax.tree_util.tree_leaves(nnx.state(one.lm))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert tp.heads.heads[0].proj.kernel[...].addressable_shards[0].data.shape[1] == tp.config.vocab_size // n
ids = np.random.default_rng(0).integers(3, 96, size=(2, 40))
from jaxmedusa import sharding
with sharding.active(tp.mesh):
    got = jax_full_logits(tp, ids)
# row-parallel products sum in another order (all-reduce of partial sums): fp32 rounding, the 1e-4 of the
# project's parity tests
np.testing.assert_allclose(got, jax_full_logits(one, ids), atol=1e-4, rtol=0)
prompts = [[5, 6, 7], list(range(3, 40))]
want = jaxmedusa.generate(one, prompts, max_new_tokens=12, medusa=False, eos_token_id=[]).tokens
for impl in (None, "interpret") if n == 2 else (None,):  # the Pallas kernels per device: once is enough
    assert jaxmedusa.generate(tp, prompts, max_new_tokens=12, medusa=False, eos_token_id=[],
                              attn_impl=impl).tokens == want, impl
    assert jaxmedusa.generate(tp, prompts, max_new_tokens=12, eos_token_id=[], attn_impl=impl).tokens == want, impl
if n == 2:  # stream() and int8 heads split as the rest does: one mesh size shows it (each compiles anew)
    chunks = list(jaxmedusa.stream(tp, prompts, max_new_tokens=12, eos_token_id=[]))
    assert [sum((c[i] for c in chunks), []) for i in range(2)] == want
    # int8 heads keep the vocab split of the projections they come from
    tp.heads = jaxmedusa.quantize_heads(tp.heads)
    proj = tp.heads.heads[0].proj
    assert proj.qkernel[...].addressable_shards[0].data.shape[1] == tp.config.vocab_size // n
    assert proj.scale[...].addressable_shards[0].data.shape[0] == tp.config.vocab_size // n
    assert jaxmedusa.generate(tp, prompts, max_new_tokens=12, eos_token_id=[]).tokens == want
print("OK")
"""


@pytest.mark.parametrize("n, kv_heads", [(2, 2), (4, 4), (4, 2)])  # (4, 2): KV heads not divisible, GSPMD alone
def test_tensor_parallel_equals_one_device(jax_model_dir, tmp_path, n, kv_heads):
    from conftest import random_heads

    path = jax_model_dir(seed=30, vocab_size=96, num_key_value_heads=kv_heads)
    model = jaxmedusa.load(path, max_len=32)
    heads = str(tmp_path / "heads")
    jaxmedusa.save_heads(random_heads(model.lm, num_heads=4, seed=30), heads)
    assert "OK" in run_on_host_mesh(SCRIPT.format(tests=TESTS, path=path, heads=heads, n=n), devices=4)


def test_interleave_order_groups_each_devices_parts_and_inverts():
    from jaxmedusa.sharding import interleave_order

    order = interleave_order((4, 2, 2), 2)  # q 4 columns, k 2, v 2 over 2 devices
    assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    x = np.arange(24).reshape(3, 8)
    np.testing.assert_array_equal(x[:, order][:, np.argsort(order)], x)
    from jaxmedusa.models.layers import split_columns

    q, k, v = split_columns(x[:, order], (4, 2, 2), 2)
    np.testing.assert_array_equal(q, x[:, :4])
    np.testing.assert_array_equal(k, x[:, 4:6])
    np.testing.assert_array_equal(v, x[:, 6:])


def test_tensor_parallel_needs_the_devices():
    import jax

    with pytest.raises(ValueError, match=f"needs {len(jax.devices()) + 1} devices"):
        jaxmedusa.sharding.tensor_mesh(len(jax.devices()) + 1)
    assert np.asarray(jaxmedusa.sharding.tensor_mesh(1).devices).size == 1


def test_cli_tensor_parallel_flag(jax_model_dir):
    path = jax_model_dir(seed=31, vocab_size=96)
    script = ("import sys, json\nfrom jaxmedusa.cli import main\n"
              f"sys.exit(main(['generate', '--model', {path!r}, '--ids', '--json', '--max-new-tokens', '5', "
              "'--max-len', '32', '--tensor-parallel', '2', '3,4,5']))")
    stdout = run_on_host_mesh(script, devices=2)
    one = jaxmedusa.generate(jaxmedusa.load(path, max_len=32), [[3, 4, 5]], max_new_tokens=5)
    assert json.loads(stdout)["tokens"] == one.tokens
    from jaxmedusa.cli import main

    assert main(["generate", "--model", path, "--ids", "--tensor-parallel", "99", "3,4"]) == 2


def test_training_with_a_tensor_axis_equals_one_device(tmp_path):
    """medusa2 (base and heads trained) on a data=1 x fsdp=2 x tensor=2 host mesh does the single-device
    arithmetic up to fp32 summation order, with the base's projections split over `tensor` (fused columns
    interleaved per device) and the same exported model."""
    script = f"""
import sys, dataclasses
import jax
sys.path.insert(0, {TESTS!r})
assert len(jax.devices()) == 4
import jaxmedusa
from conftest import random_lm, save_word_tokenizer
import numpy as np
from test_train import make_cfg, write_chat_data
from jaxmedusa.train import Trainer
from jaxmedusa.train.config import MeshConfig
d = {str(tmp_path)!r}
jaxmedusa.save(random_lm(0, vocab_size=96), d + "/model")
save_word_tokenizer(d + "/model", vocab_size=96)
write_chat_data(d + "/data.jsonl")
one = Trainer(make_cfg(d, d + "/one", steps=3, mode="medusa2"), devices=jax.devices()[:1]).run()
cfg = dataclasses.replace(make_cfg(d, d + "/tp", steps=3, mode="medusa2"), mesh=MeshConfig(data=1, fsdp=2, tensor=2))
t = Trainer(cfg)
spec = t.state_sharding["params"]["lm"]["layers"][0]["self_attn"]["qkv_proj"]["kernel"].value.spec
assert "tensor" in str(spec) and "fsdp" in str(spec), spec
tp = t.run()
# the base's fused q/k/v and gate/up columns train interleaved per device (no resharding between devices);
# the export writes the checkpoint's order back, so the two runs export the same model
lm_tp, heads_tp = t.trained_modules()
assert lm_tp.layers[0].self_attn.shards == 2 and lm_tp.layers[0].mlp.shards == 2
for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
    np.testing.assert_allclose([h[key] for h in one.history], [h[key] for h in tp.history], rtol=rtol)
from flax import nnx
a, b = (nnx.state(jaxmedusa.load(r.model_dir).lm) for r in (one, tp))
for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(x) + 1e-7, (np.linalg.norm(x - y), x.shape)
# on a pure tensor mesh the compiled step moves no activations between devices but reductions and the
# gathers of vocabulary-split logits (in the checkpoint's column order: 5 collective-permutes and 7
# all-to-alls a layer)
import re
t4 = Trainer(dataclasses.replace(cfg, output_dir=d + "/tp2", mesh=MeshConfig(data=1, fsdp=1, tensor=2)),
             devices=jax.devices()[:2])
tokens, mask = t4.batch(0)
hlo = t4._step_fn(True).lower(t4.state, t4.frozen, tokens, mask).compile().as_text()
assert not re.findall(r"\\b(collective-permute|all-to-all)(-start)?\\(", hlo)
print("OK")
"""
    assert "OK" in run_on_host_mesh(script, devices=4)
