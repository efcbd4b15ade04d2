"""The compile cache and static arguments: compile once per signature, hash a GraphDef once per model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmedusa
from jaxmedusa import compile_cache
from jaxmedusa.compile_cache import Hashed, cache_key, call_compiled, merge
from jaxmedusa.generate import vanilla_stream_step

from conftest import random_heads, random_lm


class CountingHash:
    """A static value that counts how often it is hashed."""

    def __init__(self, name: str) -> None:
        self.name, self.hashes = name, 0

    def __hash__(self) -> int:
        self.hashes += 1
        return hash(self.name)

    def __eq__(self, other) -> bool:
        return isinstance(other, CountingHash) and other.name == self.name


def test_hashed_hashes_once_and_compares_by_value():
    v = CountingHash("a")
    h = Hashed(v)
    for _ in range(5):
        hash(h)
    assert v.hashes == 1
    assert h == Hashed(v) and h == Hashed(CountingHash("a"))  # by identity, then by content
    assert h != Hashed(CountingHash("b")) and h != v  # never equal to the bare value


def test_hashed_static_argument_hits_jits_cache_without_rehashing():
    v = CountingHash("scale")

    f = jax.jit(lambda x, s: x * 2, static_argnums=1)
    h = Hashed(v)
    x = jnp.arange(3.0)
    for _ in range(4):
        np.testing.assert_array_equal(f(x, h), 2 * np.arange(3.0))
    assert v.hashes == 1 and f._cache_size() == 1
    f(x, Hashed(CountingHash("scale")))  # an equal value from elsewhere reuses the compilation
    assert f._cache_size() == 1


def test_model_split_graphdef_is_hashed_and_merges():
    lm = random_lm(seed=2)
    model = jaxmedusa.Model(lm, heads=random_heads(lm, num_heads=2))
    graphdef, state = model.split()
    assert isinstance(graphdef, Hashed) and model.split()[0] is graphdef
    heads_graphdef, heads_state = model.split_heads()
    assert isinstance(heads_graphdef, Hashed)
    plain_graphdef, plain_state = nnx.split(lm)
    assert merge(graphdef, state).config == merge(plain_graphdef, plain_state).config
    assert isinstance(merge(heads_graphdef, heads_state), type(model.heads))


def test_call_compiled_compiles_once_per_signature():
    fn = jax.jit(lambda x, *, k: x * k, static_argnames=("k",))
    x32 = jnp.ones((4,), jnp.float32)
    (out, first) = call_compiled(fn, (x32,), dict(k=3))
    (out2, again) = call_compiled(fn, (x32 + 1,), dict(k=3))
    assert first > 0 and again == 0.0
    np.testing.assert_array_equal(out2, np.full(4, 6.0))
    _, other_dtype = call_compiled(fn, (x32.astype(jnp.bfloat16),), dict(k=3))
    _, other_shape = call_compiled(fn, (jnp.ones((5,), jnp.float32),), dict(k=3))
    _, other_static = call_compiled(fn, (x32,), dict(k=4))
    assert other_dtype > 0 and other_shape > 0 and other_static > 0
    assert cache_key(fn, (x32,), dict(k=3)) == cache_key(fn, (x32 * 0,), dict(k=3))
    assert cache_key(fn, (x32,), dict(k=3)) != cache_key(fn, (np.ones(4, np.float32),), dict(k=3))


def test_call_compiled_keys_on_compiler_options():
    fn = jax.jit(lambda x: x @ x)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
    plain, first = call_compiled(fn, (x,), {})
    tuned, other = call_compiled(fn, (x,), {}, {"xla_gpu_enable_triton_gemm": False})
    _, again = call_compiled(fn, (x,), {}, {"xla_gpu_enable_triton_gemm": False})
    assert first > 0 and other > 0 and again == 0.0
    np.testing.assert_allclose(tuned, plain, rtol=1e-6)
    with pytest.raises(Exception, match="no_such_option"):
        call_compiled(fn, (x,), {}, {"no_such_option": 1})


def test_generate_and_stream_reuse_compilations_across_equal_models():
    """A second Model over an equal LM (a distinct GraphDef object, equal by content) compiles nothing new."""
    a = jaxmedusa.Model(random_lm(seed=4), max_len=64)
    b = jaxmedusa.Model(random_lm(seed=4), max_len=64)
    assert a.split()[0].value is not b.split()[0].value
    first = jaxmedusa.generate(a, [3, 4, 5], max_new_tokens=3, eos_token_id=[])
    second = jaxmedusa.generate(b, [3, 4, 5], max_new_tokens=3, eos_token_id=[])
    assert first.stats["compile_seconds"] > 0 and second.stats["compile_seconds"] == 0.0
    assert first.tokens == second.tokens
    chunks = list(jaxmedusa.stream(a, [3, 4, 5], max_new_tokens=3, eos_token_id=[]))
    steps = [key for key in compile_cache._CACHE if key[0] is vanilla_stream_step]
    again = list(jaxmedusa.stream(b, [3, 4, 5], max_new_tokens=3, eos_token_id=[]))
    assert steps and [key for key in compile_cache._CACHE if key[0] is vanilla_stream_step] == steps  # none new
    assert sum(chunks, []) == sum(again, []) and [t for c in chunks for t in c[0]] == first.tokens[0]


def test_cache_key_describes_a_model_state_once_and_forgets_it_with_the_state():
    import gc

    fn = jax.jit(lambda s, x: x)
    x = jnp.ones((2,), jnp.float32)
    _, state = nnx.split(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    key = cache_key(fn, (state, x), {})
    assert compile_cache._STATES[id(state)][0]() is state
    assert cache_key(fn, (state, x), {}) == key
    _, wider = nnx.split(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    assert cache_key(fn, (wider, x), {}) != key  # another state: described on its own, no stale hit
    _, same_shapes = nnx.split(nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
    assert cache_key(fn, (same_shapes, x), {}) == key  # equal shapes still share a compilation
    gone = id(state)
    del state
    gc.collect()
    assert gone not in compile_cache._STATES


def test_call_compiled_passes_leaves_reads_state_values_afresh_and_keeps_donation():
    """call_compiled runs a compilation over the arguments' leaves (a model state's read from its Variables, not
    flattened again): a weight assigned in place is seen by the next call, and donated arguments are consumed."""
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    _, state = nnx.split(layer)
    rng = np.random.default_rng(0)

    @jax.jit
    def apply(s, x, scale):
        return x @ s["kernel"][...] * scale["by"] + s["bias"][...]

    fn = jax.jit(lambda s, acc, x, scale: (apply(s, x, scale), acc + 1), donate_argnums=1)
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    scale = {"by": jnp.float32(2.0)}
    acc = jnp.zeros((3,), jnp.float32)
    (y, acc2), first = call_compiled(fn, (state, acc, x, scale), {})
    np.testing.assert_allclose(y, apply(state, x, scale), rtol=1e-6)
    assert first > 0 and acc.is_deleted() and not x.is_deleted()  # the accumulator was donated, x was not
    new_kernel = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    layer.kernel[...] = new_kernel  # in place: the same State object, the same Variable, a new array
    (y2, acc3), again = call_compiled(fn, (state, acc2, x, scale), {})
    assert again == 0.0
    np.testing.assert_allclose(y2, 2 * x @ new_kernel + layer.bias[...], rtol=1e-6)
    np.testing.assert_array_equal(acc3, np.full(3, 2.0))


def test_request_values_are_made_on_the_device_once_per_set_of_values():
    from jaxmedusa.generate import request_values

    params, eos = request_values(0.0, 0.9, 0.09, 0.3, (2, 5))
    np.testing.assert_allclose([float(x) for x in params], [1e-6, 0.9, 0.09, 0.3], rtol=1e-6)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in params)
    assert eos.dtype == jnp.int32 and eos.tolist() == [2, 5]
    assert request_values(0.0, 0.9, 0.09, 0.3, (2, 5))[0] is params  # the next request with these values
    assert request_values(0.0, 0.9, 0.09, 0.3, ())[1].tolist() == [-1]  # no EOS: an id no token has
    assert float(request_values(0.7, 0.9, 0.09, 0.3, (2, 5))[0].temperature) == pytest.approx(0.7)


def test_seed_key_is_jax_random_key_made_once_per_seed():
    from jaxmedusa.generate import seed_key

    for seed in (0, 7, 2**40 + 3):
        np.testing.assert_array_equal(jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed)))
        assert seed_key(seed) is seed_key(seed)
