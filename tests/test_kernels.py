"""Pallas kernels in interpret mode against the pure-JAX references: fresh random inputs every time."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmedusa.kernels import (attention, decode_attention, decode_attention_reference, tree_attention,
                               tree_attention_reference)

from jaxmedusa.tree import TREES_FILE as TREES


def ancestor_mask(paths: list[list[int]]) -> np.ndarray:
    """Ancestor-or-self mask [T, T] for a published tree (root first, nodes sorted by (depth, path))."""
    nodes = [()] + sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(nodes)}
    mask = np.zeros((len(nodes), len(nodes)), bool)
    for p, i in index.items():
        for j in range(len(p) + 1):
            mask[i, index[p[:j]]] = True
    return mask


def published_tree_mask(name: str = "mc_sim_7b_63") -> np.ndarray:
    with open(TREES) as f:
        return ancestor_mask(json.load(f)["trees"][name])


def random_inputs(rng, b, s, h, kvh, d, dtype, t=None, garbage_from=None):
    shape_q = (b, h, d) if t is None else (b, t, h, d)
    q = rng.standard_normal(shape_q).astype(np.float32)
    k = rng.standard_normal((b, s, kvh, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kvh, d)).astype(np.float32)
    if garbage_from is not None:  # what lies beyond the visible slots must not matter
        for i, n in enumerate(garbage_from):
            k[i, n:] = np.nan
            v[i, n:] = 1e30
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """The float32 comparisons here (1e-5) assume true float32 products. On a GPU, XLA's default float32 dot may
    round its inputs to TF32, in the interpreted kernel and in the reference alike but not identically."""
    with jax.default_matmul_precision("highest"):
        yield


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("b, s, h, kvh, d, dtype", [
    (3, 200, 8, 8, 64, jnp.float32),    # MHA
    (3, 200, 8, 2, 128, jnp.float32),   # GQA 4
    (2, 333, 16, 2, 64, jnp.float32),   # GQA 8, odd capacity
    (3, 256, 8, 2, 64, jnp.bfloat16),
])
@pytest.mark.parametrize("unified_max", [0.0, None])
def test_decode_attention_matches_reference(b, s, h, kvh, d, dtype, unified_max):
    rng = np.random.default_rng()
    lengths = np.concatenate([[1, s], rng.integers(1, s + 1, size=b)])[:b].astype(np.int32)
    q, k, v = random_inputs(rng, b, s, h, kvh, d, dtype, garbage_from=lengths)
    lengths = jnp.asarray(lengths)
    out = decode_attention(q, k, v, lengths, unified_max=unified_max, block_k=32, interpret=True)
    ref = decode_attention_reference(q, k, v, lengths)
    assert out.shape == (b, h, d) and out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("t, kvh, d", [(1, 2, 64), (5, 4, 64), (64, 2, 128)])
@pytest.mark.parametrize("unified_max", [0.0, None])
def test_tree_attention_matches_reference(t, kvh, d, unified_max):
    rng = np.random.default_rng()
    b, s, h = 3, 160, 8
    if t == 64:
        mask = published_tree_mask()
    else:
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
        mask = np.eye(t, dtype=bool)
        for i in range(1, t):
            mask[i] |= mask[parents[i]]
    lengths = np.array([0, 1, s - t], np.int32)
    q, k, v = random_inputs(rng, b, s, h, kvh, d, jnp.float32, t=t, garbage_from=lengths + t)
    lengths, mask = jnp.asarray(lengths), jnp.asarray(mask)
    out = tree_attention(q, k, v, lengths, mask, unified_max=unified_max, block_k=32, interpret=True)
    ref = tree_attention_reference(q, k, v, lengths, mask)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("t, h, kvh, d, rotary, interleaved, dtype", [
    (1, 8, 8, 64, 64, False, jnp.float32),    # decode, MHA, Llama's RoPE
    (7, 8, 2, 64, 64, False, jnp.float32),    # tree, GQA 4
    (5, 4, 2, 64, 32, True, jnp.float32),     # GLM: interleaved pairs on half of each head
    (64, 4, 4, 128, 128, False, jnp.bfloat16),
])
def test_attention_reads_query_heads_of_the_fused_product_and_applies_rope(t, h, kvh, d, rotary, interleaved, dtype):
    """q handed over as the whole fused q/k/v output [B, T, H + 2 KVH, D] (num_heads=H) and not yet rotated, with
    cos/sin: the kernel reads the query heads in place and rotates them, matching the reference on the model's
    apply_rope(q)."""
    from jaxmedusa.models.rope import apply_rope

    rng = np.random.default_rng()
    b, s = 3, 150
    lengths = np.array([0, 1, s - t], np.int32)
    qkv = jnp.asarray(rng.standard_normal((b, t, h + 2 * kvh, d)), dtype)
    _, k, v = random_inputs(rng, b, s, h, kvh, d, dtype, t=t, garbage_from=lengths + t)
    positions = jnp.asarray(lengths)[:, None] + jnp.arange(t)[None]
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rng.uniform(0.01, 1.0, rotary // 2), jnp.float32)
    emb = jnp.repeat(angles, 2, axis=-1) if interleaved else jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    q = apply_rope(qkv[:, :, :h], cos, sin, interleaved)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    if t == 1:
        out = decode_attention(qkv[:, 0], k, v, jnp.asarray(lengths) + 1, num_heads=h, cos=cos[:, 0], sin=sin[:, 0],
                               rope_interleaved=interleaved, block_k=32, interpret=True)
        ref = decode_attention_reference(q[:, 0], k, v, jnp.asarray(lengths) + 1)
    else:
        mask = jnp.asarray(published_tree_mask()[:t, :t])
        out = tree_attention(qkv, k, v, jnp.asarray(lengths), mask, num_heads=h, cos=cos, sin=sin,
                             rope_interleaved=interleaved, block_k=32, interpret=True)
        ref = tree_attention_reference(q, k, v, jnp.asarray(lengths), mask)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol
    with pytest.raises(ValueError, match="num_heads"):
        tree_attention(qkv, k, v, jnp.asarray(lengths), jnp.ones((t, t), bool), num_heads=h + 2 * kvh + 1,
                       interpret=True)


def test_attention_kernels_lower_to_triton_for_a_gpu():
    """Lowered for CUDA on this host (jax.export, nothing compiled or run): the Triton lowering takes the kernel
    as written, the fused-q/RoPE variant included, so a GPU session does not find that out first."""
    from jax import export

    if jax.__version_info__ >= (0, 11) and jax.default_backend() != "gpu":
        pytest.skip("jax 0.11 lowers Pallas GPU kernels only with a GPU present (or an abstract GPU device)")
    q = jax.ShapeDtypeStruct((1, 64, 48, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1, 300, 8, 128), jnp.bfloat16)
    lengths, mask = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((64, 64), jnp.bool_)
    rope = jax.ShapeDtypeStruct((1, 64, 128), jnp.float32)

    def both(q, k, v, lengths, mask, cos, sin):
        tree = tree_attention(q, k, v, lengths, mask, layer=1, num_heads=32, cos=cos, sin=sin)
        decode = decode_attention(q[:, 0], k, v, lengths, layer=0)
        return tree, decode

    exported = export.export(jax.jit(both), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        q, kv, kv, lengths, mask, rope, rope)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2


def test_default_tiling_per_tile_and_tree_with_defaults_matches_reference():
    """Tiles of up to 64 rows (decode's 16, trees' up to 64) take 64-slot blocks three stages deep; 128-row
    tiles 128 / 2 (H200 sweeps over 32 layers' caches). The defaults give the reference's answer on ragged lengths."""
    from jaxmedusa.kernels.attention_pallas import default_tiling

    assert default_tiling(16) == default_tiling(64) == (64, 3)
    assert default_tiling(128) == (128, 2)
    rng = np.random.default_rng()
    b, s, h, kvh, d, t = 2, 300, 4, 4, 32, 9
    lengths = np.array([s - t, 37], np.int32)
    q, k, v = random_inputs(rng, b, s, h, kvh, d, jnp.float32, t=t, garbage_from=lengths + t)
    mask = jnp.asarray(published_tree_mask()[:t, :t])
    out = tree_attention(q, k, v, jnp.asarray(lengths), mask, interpret=True)
    assert rel_err(out, tree_attention_reference(q, k, v, jnp.asarray(lengths), mask)) < 1e-5


@pytest.mark.parametrize("t", [None, 5])
def test_float16_scores_beyond_e11_do_not_overflow(t):
    """exp(s - 0) > 65504 for scores above ~11: float16 must not take the unified max (found on an H100 with
    the embedded default model, whose fp16 scores reach ~20)."""
    rng = np.random.default_rng()
    b, s, h, kvh, d = 2, 96, 4, 2, 64
    q, k, v = random_inputs(rng, b, s, h, kvh, d, jnp.float32, t=t)
    q = (q * 4.0).astype(jnp.float16)  # scores ~ N(0, 16): the largest of each row is around +10 .. +20
    k, v = k.astype(jnp.float16), v.astype(jnp.float16)
    lengths = jnp.array([40, s - (t or 0)], jnp.int32)
    if t is None:
        out = decode_attention(q, k, v, lengths, block_k=32, interpret=True)
        ref = decode_attention_reference(q, k, v, lengths)
        scores = jnp.einsum("bhd,bskd->bhs", q.astype(jnp.float32), jnp.repeat(k, h // kvh, 2).astype(jnp.float32))
    else:
        mask = jnp.asarray(np.tril(np.ones((t, t), bool)))
        out = tree_attention(q, k, v, lengths, mask, block_k=32, interpret=True)
        ref = tree_attention_reference(q, k, v, lengths, mask)
        scores = jnp.einsum("bthd,bskd->bths", q.astype(jnp.float32), jnp.repeat(k, h // kvh, 2).astype(jnp.float32))
    assert float(scores.max()) / np.sqrt(d) > 12.0  # the test really reaches float16's overflow
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < 1e-2


def test_unified_max_falls_back_exactly_when_scores_leave_its_range():
    rng = np.random.default_rng()
    b, s, h, kvh, d = 2, 128, 4, 2, 64
    q, k, v = random_inputs(rng, b, s, h, kvh, d, jnp.float32)
    lengths = jnp.array([97, 128], jnp.int32)
    for sign in (1.0, -1.0):  # scores near +80, then near -80: beyond the margin of the unified max 0
        qs = q.at[:, :, 0].set(25.3)
        ks = k.at[:, :, :, 0].set(sign * 25.3)
        ref = decode_attention_reference(qs, ks, v, lengths)
        unified = decode_attention(qs, ks, v, lengths, unified_max=0.0, block_k=32, interpret=True)
        exact = decode_attention(qs, ks, v, lengths, unified_max=None, block_k=32, interpret=True)
        assert np.isfinite(np.asarray(unified)).all()
        # the fallback is the exact scheme: same result as the exact kernel
        assert rel_err(unified, exact) < 1e-6
        # scores of magnitude ~80 carry ~1e-5 relative fp32 rounding in any implementation, the reference too
        assert rel_err(exact, ref) < 1e-4


def test_split_count_and_block_sizes_do_not_change_the_result():
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 2, 300, 8, 2, 64, jnp.float32)
    lengths = jnp.array([300, 45], jnp.int32)
    ref = decode_attention_reference(q, k, v, lengths)
    for splits, block_k in ((1, 16), (3, 32), (7, 64)):
        out = decode_attention(q, k, v, lengths, num_splits=splits, block_k=block_k, interpret=True)
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("args, expected", [
    ((1, 32, 1, 1024, 128, 16), 4),    # decode, 7B MHA, 1k: the sweep's best (14.9 us vs 18.2 at 8 splits)
    ((1, 32, 1, 1024, 128, 64), 3),    # 64-node tree, 1k: fewer, heavier programs (25.5 us vs 31.5 at 8)
    ((1, 32, 1, 8192, 128, 64), 4),    # long cache: one split per 2048 slots
    ((4, 32, 1, 8192, 128, 64), 3),    # ... but at most two waves of programs
    ((1, 8, 2, 4096, 128, 128), 6),    # GQA: 4 query heads x 64 nodes in two 128-row tiles
    ((8, 32, 1, 1024, 128, 16), 1),    # a full wave without splitting
    ((1, 1, 1, 100, 128, 16), 1),      # never more splits than the cache has blocks
])
def test_default_split_count_follows_the_h100_sweep(args, expected):
    from jaxmedusa.kernels.attention_pallas import default_num_splits

    assert default_num_splits(*args) == expected


def test_bad_tuning_is_rejected():
    q, k, v = random_inputs(np.random.default_rng(), 1, 64, 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        decode_attention(q, k, v, jnp.array([10]), block_k=48, interpret=True)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        q2, k2, v2 = random_inputs(np.random.default_rng(), 1, 64, 4, 2, 48, jnp.float32)
        decode_attention(q2, k2, v2, jnp.array([10]), interpret=True)


def test_dispatcher_routes_and_validates(monkeypatch):
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 2, 64, 4, 2, 64, jnp.float32, t=1)
    lengths = jnp.array([10, 40], jnp.int32)
    one = jnp.ones((1, 1), bool)
    ref = attention(q, k, v, lengths, one, impl="reference")
    np.testing.assert_allclose(attention(q, k, v, lengths, one, impl="interpret"), ref, atol=1e-5)
    with pytest.raises(ValueError, match="cos/sin"):
        attention(q, k, v, lengths, one, impl="reference", cos=jnp.ones((2, 1, 64)), sin=jnp.zeros((2, 1, 64)))
    monkeypatch.setenv("JAXMEDUSA_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        attention(q, k, v, lengths, one)


def test_auto_attention_keeps_exact_float32_on_xla(monkeypatch):
    """On a GPU, "auto" sends float32 queries traced under true float32 products (as generate() traces a float32
    model) to the XLA reference; otherwise, and for half precision, to the Pallas kernels."""
    from jaxmedusa.kernels import dispatch

    called = []

    def kernel_spy(q, *args, **kwargs):
        called.append(q.dtype)
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch.attention_pallas, "tree_attention", kernel_spy)
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 2, 64, 4, 2, 64, jnp.float32, t=4)
    lengths, mask = jnp.array([10, 40], jnp.int32), jnp.tril(jnp.ones((4, 4), bool))
    with jax.default_matmul_precision("highest"):
        got = attention(q, k, v, lengths, mask)
        assert not called
        attention(q, k, v, lengths, mask, impl="auto")  # asked for by name: the same rule
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lengths, mask)
    assert called == [jnp.bfloat16]
    np.testing.assert_allclose(got, attention(q, k, v, lengths, mask, impl="reference"), atol=1e-6)
    with jax.default_matmul_precision("default"):  # JAX's default (this module's tests run at "highest")
        attention(q, k, v, lengths, mask)
    assert called == [jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("q_rope", ["auto", "kernel"])
def test_model_logits_with_kernels_equal_reference_path(monkeypatch, q_rope):
    from conftest import random_lm
    from jaxmedusa.cache import KVCache
    from jaxmedusa.kernels import q_rope_in_kernel

    monkeypatch.setenv("JAXMEDUSA_Q_ROPE", q_rope)  # kernel: the decoder hands the kernels the fused q/k/v output
    assert q_rope_in_kernel("interpret", jnp.float32, 32) == (q_rope == "kernel")
    assert not q_rope_in_kernel("reference", jnp.float32, 32)

    lm = random_lm(seed=31, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head_dim 32
    ids = jnp.asarray(np.random.default_rng().integers(0, 97, size=(2, 12)), jnp.int32)
    mask = jnp.asarray(published_tree_mask()[:6, :6])
    outs = {}
    for impl in ("reference", "interpret"):
        cache = KVCache.create(lm.config, 2, 32)
        h, cache = lm(ids, jnp.broadcast_to(jnp.arange(12), (2, 12)), cache, jnp.tril(jnp.ones((12, 12), bool)),
                      prefill=True, attn_impl=impl)
        cache = cache._replace(lengths=jnp.array([12, 7], jnp.int32))
        h1, cache = lm(ids[:, :1], cache.lengths[:, None], cache, jnp.ones((1, 1), bool), attn_impl=impl)
        depth = jnp.asarray(mask.sum(1) - 1)
        h6, _ = lm(ids[:, :6], cache.lengths[:, None] + depth[None], cache, mask, attn_impl=impl)
        outs[impl] = (np.asarray(lm.logits(h1)), np.asarray(lm.logits(h6)))
    for a, b in zip(outs["reference"], outs["interpret"]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_kernels_read_one_layer_of_a_stacked_cache_in_place():
    rng = np.random.default_rng()
    b, s, h, kvh, d, t, layers = 2, 96, 4, 2, 32, 5, 3
    lengths = jnp.asarray([40, 77], jnp.int32)
    mask = jnp.asarray(published_tree_mask()[:t, :t])
    qd, _, _ = random_inputs(rng, b, s, h, kvh, d, jnp.float32)
    qt, _, _ = random_inputs(rng, b, s, h, kvh, d, jnp.float32, t=t)
    k = jnp.asarray(rng.standard_normal((layers, b, s, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((layers, b, s, kvh, d)), jnp.float32)
    for layer in range(layers):
        got = decode_attention(qd, k, v, lengths, layer=layer, interpret=True)
        want = decode_attention_reference(qd, k[layer], v[layer], lengths)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        got = tree_attention(qt, k, v, lengths, mask, layer=layer, interpret=True)
        want = tree_attention_reference(qt, k[layer], v[layer], lengths, mask)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, k, n, dtype, split_k", [
    (1, 128, 48, jnp.float32, 1), (64, 384, 96, jnp.float32, 1), (37, 256, 128, jnp.float32, 1),
    (128, 256, 64, jnp.bfloat16, 1),
    (64, 512, 256, jnp.float32, 2), (37, 640, 128, jnp.float32, 3),  # 5 K steps in ranges of 2, 2, 1
    (5, 768, 256, jnp.bfloat16, 4), (16, 384, 48, jnp.float16, 3)])
def test_flat_gemm_matches_reference(m, k, n, dtype, split_k):
    from jaxmedusa.kernels import flat_gemm, flat_gemm_reference

    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    got = flat_gemm(x, w, split_k=split_k, interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, flat_gemm_reference(x, w)) < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_flat_gemm_split_k_limits():
    from jaxmedusa.kernels import flat_gemm

    x, w = jnp.ones((4, 256), jnp.float32), jnp.ones((256, 128), jnp.float32)
    with pytest.raises(ValueError, match="split_k=3"):
        flat_gemm(x, w, split_k=3, interpret=True)  # 2 K steps of 128


def test_gemm_dispatcher_choice_per_rows(monkeypatch):
    from jaxmedusa.kernels import dispatch

    assert dispatch.resolve_gemm_impl(64, 4096, 4096, jnp.bfloat16) == "xla"  # CPU
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    if dispatch.FLAT_GEMM_ROWS is None:  # today's measured default: XLA at every M on the GPU too
        assert all(dispatch.resolve_gemm_impl(m, 4096, 4096, jnp.bfloat16) == "xla" for m in (1, 16, 64, 128))
        monkeypatch.setattr(dispatch, "FLAT_GEMM_ROWS", (16, 128))
    low, high = dispatch.FLAT_GEMM_ROWS
    for m in (1, low - 1, low, high, high + 1, 256):
        want = "pallas" if low <= m <= high else "xla"
        assert dispatch.resolve_gemm_impl(m, 4096, 11008, jnp.bfloat16) == want, m
    assert dispatch.resolve_gemm_impl(64, 4096, 4096, jnp.float32) == "xla"  # float32 stays with XLA
    assert dispatch.resolve_gemm_impl(64, 100, 4096, jnp.bfloat16) == "xla"  # K the kernel does not tile
    monkeypatch.setenv("JAXMEDUSA_GEMM", "xla")
    assert dispatch.resolve_gemm_impl(64, 4096, 4096, jnp.bfloat16) == "xla"
    monkeypatch.setenv("JAXMEDUSA_GEMM", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        dispatch.resolve_gemm_impl(64, 4096, 4096, jnp.bfloat16)


def test_loop_compiler_options_send_verify_gemms_to_cublas_and_keep_head_gemms_apart_on_a_gpu(monkeypatch):
    from jaxmedusa.kernels import dispatch

    assert dispatch.loop_compiler_options(tree=True) is None  # CPU: nothing to choose
    assert dispatch.loop_compiler_options(tree=False, impl="cublas") == dispatch.CUBLAS_OPTIONS
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    low = dispatch.CUBLAS_MIN_ROWS
    verify = {"xla_disable_hlo_passes": "dot-merger"}  # every verify loop: no per-step copy of the heads' weights
    assert dispatch.VERIFY_OPTIONS == verify
    assert dispatch.loop_compiler_options(tree=True, rows=low) == {"xla_gpu_enable_triton_gemm": False, **verify}
    assert dispatch.loop_compiler_options(tree=True, rows=4 * low) == {**dispatch.CUBLAS_OPTIONS, **verify}
    assert dispatch.loop_compiler_options(tree=True, rows=low - 1) == verify  # few rows: XLA's GEMM pick was faster
    assert dispatch.loop_compiler_options(tree=False, rows=low) is None  # one-row decode keeps XLA's pick
    assert dispatch.loop_compiler_options(tree=False, impl="cublas") == dispatch.CUBLAS_OPTIONS  # no heads to keep apart
    assert dispatch.loop_compiler_options(tree=True, rows=low, quantized_heads=True) == verify  # Triton fuses int8
    for impl in ("xla", "pallas"):
        assert dispatch.loop_compiler_options(tree=True, rows=low, impl=impl) == verify
    x = jnp.ones((4, 4), jnp.float32)  # XLA knows the options' names (it rejects unknown ones at compile time)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile(compiler_options={**dispatch.CUBLAS_OPTIONS, **verify})
    np.testing.assert_allclose(np.asarray(compiled(x)), np.full((4, 4), 4.0))
    assert dispatch.resolve_gemm_impl(64, 4096, 4096, jnp.bfloat16, "cublas") == "xla"
    monkeypatch.setenv("JAXMEDUSA_GEMM", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        dispatch.loop_compiler_options(tree=True)


def test_matmul_through_the_flat_gemm_and_its_gradient():
    import jax

    from jaxmedusa.kernels import matmul

    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((2, 24, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    assert rel_err(matmul(x, w, impl="interpret"), matmul(x, w, impl="xla")) < 1e-5
    loss = lambda impl: (lambda x, w: jnp.sum(jnp.sin(matmul(x, w, impl=impl))))
    gi = jax.grad(loss("interpret"), argnums=(0, 1))(x, w)
    gx = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
    for a, b in zip(gi, gx):
        assert rel_err(a, b) < 1e-5


def logits_per_impl(monkeypatch, lm, env_var: str, t: int) -> list[np.ndarray]:
    """A random prompt chunk of t tokens (batch 2) through lm with env_var set to xla, then interpret."""
    from jaxmedusa.cache import KVCache

    ids = jnp.asarray(np.random.default_rng().integers(0, 97, size=(2, t)), jnp.int32)
    outs = []
    for impl in ("xla", "interpret"):
        monkeypatch.setenv(env_var, impl)
        cache = KVCache.create(lm.config, 2, 2 * t)
        h, _ = lm(ids, jnp.broadcast_to(jnp.arange(t), (2, t)), cache, jnp.tril(jnp.ones((t, t), bool)))
        outs.append(np.asarray(lm.logits(h)))
    return outs


def test_model_with_flat_gemm_equals_xla_path(monkeypatch):
    from conftest import random_lm

    lm = random_lm(seed=33, hidden_size=128, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2)
    outs = logits_per_impl(monkeypatch, lm, "JAXMEDUSA_GEMM", 16)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape, dtype, wdtype, scale_f32", [
    ((1, 1, 256), jnp.bfloat16, jnp.bfloat16, False), ((2, 7, 64), jnp.float32, jnp.float32, False),
    ((3, 5, 128), jnp.float16, jnp.float16, True), ((4, 64), jnp.bfloat16, jnp.float32, False),
    ((2, 3, 32), jnp.bfloat16, jnp.bfloat16, True)])
def test_add_rms_norm_matches_reference(shape, dtype, wdtype, scale_f32):
    from jaxmedusa.kernels import add_rms_norm_reference
    from jaxmedusa.kernels.norm_pallas import add_rms_norm

    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    a = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), wdtype)
    s, y = add_rms_norm(x, a, w, eps=1e-5, scale_in_float32=scale_f32, interpret=True)
    rs, ry = add_rms_norm_reference(x, a, w, 1e-5, scale_f32)
    assert s.dtype == rs.dtype and y.dtype == ry.dtype and y.shape == shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(rs, np.float32))  # the add: exact
    # the normalised row: equal up to the mean's summation order (a last-bit difference, at most one step of
    # the input dtype, to which the normalised value is rounded before the weight multiplies it)
    tol = 1e-6 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    assert rel_err(y, ry) < tol


def test_add_rms_norm_dispatch_and_gradient(monkeypatch):
    import jax

    from jaxmedusa.kernels import add_rms_norm, add_rms_norm_reference, resolve_norm_impl

    assert resolve_norm_impl(4096) == "xla"  # auto: XLA until measured faster
    assert resolve_norm_impl(4096, "pallas") == "pallas" and resolve_norm_impl(5120, "pallas") == "xla"
    monkeypatch.setenv("JAXMEDUSA_NORM", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        resolve_norm_impl(4096)
    monkeypatch.delenv("JAXMEDUSA_NORM")
    rng = np.random.default_rng()
    x, a = (jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32) for _ in range(2))
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(64), jnp.float32)
    loss = lambda impl: (lambda x, a, w: sum(jnp.sum(jnp.sin(o)) for o in
                                             add_rms_norm(x, a, w, eps=1e-6, impl=impl)))
    assert rel_err(add_rms_norm(x, a, w, eps=1e-6, impl="interpret")[1], add_rms_norm_reference(x, a, w, 1e-6)[1]) < 1e-6
    for gi, gx in zip(jax.grad(loss("interpret"), argnums=(0, 1, 2))(x, a, w),
                      jax.grad(loss("xla"), argnums=(0, 1, 2))(x, a, w)):
        assert rel_err(gi, gx) < 1e-6


def test_model_with_fused_add_norm_equals_xla_path(monkeypatch):
    from conftest import random_lm

    lm = random_lm(seed=34, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    outs = logits_per_impl(monkeypatch, lm, "JAXMEDUSA_NORM", 9)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


FOLD_VARIANTS = {
    "llama": dict(),
    "qwen2-bias-lora": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "chatglm-scale-in-float32": {"architectures": ["ChatGLMModel"], "num_layers": 2, "padded_vocab_size": 97,
                                 "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16,
                                 "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
                                 "add_qkv_bias": True, "seq_length": 256},
}


@pytest.mark.parametrize("variant", list(FOLD_VARIANTS))
def test_folded_norms_give_the_models_logits(monkeypatch, variant):
    """JAXMEDUSA_NORM=fold (each decoder norm's weight on the next product's input, its per-row factor on the
    product's output, before the bias and with LoRA's update inside) gives the norms' logits, for a prompt chunk
    and a decode step; with biases (Qwen2), LoRA, and ChatGLM's float32 scaling."""
    from flax import nnx

    from conftest import tiny_config
    from jaxmedusa.cache import KVCache
    from jaxmedusa.models import ModelConfig, create_lm
    from jaxmedusa.models.lora import add_lora

    d = FOLD_VARIANTS[variant]
    cfg = ModelConfig.from_hf_dict(d if "num_layers" in d else tiny_config(**d))
    lm = create_lm(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5))
    if "lora" in variant:
        add_lora(lm, 4, 8.0, rngs=nnx.Rngs(6))
    graphdef, state = nnx.split(lm)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree_util.tree_leaves(state))))
    lm = nnx.merge(graphdef, jax.tree_util.tree_map(  # every weight random: norms, biases and LoRA's B too
        lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * (0.2 if x.ndim == 2 else 0.1)
        + (x if x.ndim == 1 else 0), state))
    ids = jnp.asarray(np.random.default_rng().integers(0, 97, size=(2, 8)), jnp.int32)
    outs = {}
    for impl in ("xla", "fold"):
        monkeypatch.setenv("JAXMEDUSA_NORM", impl)
        cache = KVCache.create(lm.config, 2, 16)
        h, cache = lm(ids[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), cache, jnp.tril(jnp.ones((7, 7), bool)))
        h1, _ = lm(ids[:, 7:], jnp.full((2, 1), 7), cache, jnp.ones((1, 1), bool))
        outs[impl] = [np.asarray(lm.logits(x)) for x in (h, h1)]
    for fold, ref in zip(outs["fold"], outs["xla"]):
        assert np.abs(ref).max() > 0.1  # logits of random weights, not a constant
        np.testing.assert_allclose(fold, ref, atol=2e-5, rtol=0)


def test_norms_fold_for_few_rows_on_a_gpu_only(monkeypatch):
    from jaxmedusa.kernels import dispatch, fold_norm

    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "cpu")
    assert not fold_norm(4096, 1)  # off a GPU auto never folds
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    assert [fold_norm(4096, m) for m in (1, dispatch.FOLD_MAX_ROWS, dispatch.FOLD_MAX_ROWS + 1, 64)] == \
        [True, True, False, False]
    assert dispatch.resolve_norm_impl(4096) == "xla"  # rows unknown: the add + norm of old
    monkeypatch.setenv("JAXMEDUSA_NORM", "xla")
    assert not fold_norm(4096, 1)
    monkeypatch.setenv("JAXMEDUSA_NORM", "fold")
    assert fold_norm(4096, 256) and dispatch.resolve_norm_impl(5120, rows=1) == "fold"
    x, a = (jnp.asarray(np.random.default_rng().standard_normal((2, 64)), jnp.float32) for _ in range(2))
    w = jnp.full((64,), 1.5, jnp.float32)  # add_rms_norm alone under "fold": the reference
    for got, want in zip(dispatch.add_rms_norm(x, a, w, eps=1e-6), dispatch.add_rms_norm_reference(x, a, w, 1e-6)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("t", [7, 8])
def test_training_attention_pads_odd_lengths_for_cudnn_without_changing_rows(monkeypatch, t):
    """The cuDNN branch (taken on a GPU; here cuDNN is stood in for by XLA's attention, which it is checked
    against on the GPU by bench/train.py) pads an odd length by one position: outputs and gradients of the
    real rows equal unpadded causal attention's."""
    from jaxmedusa.kernels import dispatch

    calls = []
    real = jax.nn.dot_product_attention

    def fake_cudnn(q, k, v, *, is_causal, implementation=None):
        calls.append((q.shape[1], implementation))
        return real(q, k, v, is_causal=is_causal)

    monkeypatch.setattr(dispatch, "cudnn_supports", lambda dtype, d: True)
    monkeypatch.setattr(dispatch.jax.nn, "dot_product_attention", fake_cudnn)
    rng = np.random.default_rng(t)
    q, k, v, w = (jnp.asarray(rng.standard_normal((2, t, n, 16)), jnp.float32) for n in (4, 2, 2, 4))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    got = jax.value_and_grad(lambda *a: loss(dispatch.training_attention, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(lambda *a: loss(lambda q, k, v: real(q, k, v, is_causal=True), *a),
                              argnums=(0, 1, 2))(q, k, v)
    assert calls[0] == (t + t % 2, "cudnn")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
