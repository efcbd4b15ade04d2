"""The Pallas kernels compiled for the GPU (not interpreted) against their pure-JAX references, at the shapes
the 7B-class models run. Interpret mode checks the kernels' logic on a CPU; only these check what Triton
makes of them (block shapes that are not powers of two, real tensor-core dots). Skipped without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmedusa.kernels import decode_attention, tree_attention
from test_kernels import published_tree_mask, random_inputs, rel_err

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas kernels need a GPU")


@pytest.mark.parametrize("m, k, n", [(64, 4096, 4096), (64, 4096, 12288), (64, 4096, 22016), (64, 11008, 4096),
                                     (1, 11008, 4096), (16, 8192, 4096), (37, 5120, 1024)])
@pytest.mark.parametrize("split_k", [1, 4])
def test_compiled_flat_gemm_matches_reference(m, k, n, split_k):
    from jaxmedusa.kernels import flat_gemm, flat_gemm_reference

    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16)
    got = flat_gemm(x, w, split_k=split_k)
    assert got.shape == (m, n)
    assert rel_err(got, flat_gemm_reference(x, w)) < 1e-2


@pytest.mark.parametrize("b, s, h, kvh", [(1, 1184, 32, 32), (4, 1184, 32, 8), (3, 333, 16, 2), (2, 700, 12, 4)])
@pytest.mark.parametrize("t", [1, 16, 64])
def test_compiled_attention_matches_reference(b, s, h, kvh, t):
    from jaxmedusa.kernels import decode_attention_reference, tree_attention_reference

    rng = np.random.default_rng()
    lengths = rng.integers(1, s - t + 1, size=b).astype(np.int32)
    lengths[0] = s - t
    q, k, v = random_inputs(rng, b, s, h, kvh, 128, jnp.bfloat16, t=None if t == 1 else t)
    lengths = jnp.asarray(lengths)
    if t == 1:
        got = decode_attention(q, k, v, lengths + 1)
        want = decode_attention_reference(q, k, v, lengths + 1)
    else:
        mask = jnp.asarray(published_tree_mask()[:t, :t])
        got = tree_attention(q, k, v, lengths, mask)
        want = tree_attention_reference(q, k, v, lengths, mask)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("b, h, kvh, t, interleaved", [(1, 32, 32, 1, False), (1, 32, 32, 64, False),
                                                        (4, 32, 8, 64, False), (2, 32, 2, 16, True)])
def test_compiled_attention_reads_the_fused_product_and_applies_rope(b, h, kvh, t, interleaved):
    """The query heads read in place from the fused q/k/v output and rotated in the kernel, compiled."""
    from jaxmedusa.kernels import decode_attention_reference, tree_attention_reference
    from jaxmedusa.models.rope import apply_rope

    rng = np.random.default_rng()
    s, d = 1184, 128
    rotary = d // 2 if interleaved else d
    lengths = jnp.asarray(rng.integers(1, s - t + 1, size=b), jnp.int32)
    qkv = jnp.asarray(rng.standard_normal((b, t, h + 2 * kvh, d)), jnp.bfloat16)
    _, k, v = random_inputs(rng, b, s, h, kvh, d, jnp.bfloat16, t=t)
    angles = (lengths[:, None] + jnp.arange(t))[..., None] * jnp.asarray(rng.uniform(1e-4, 1, rotary // 2), jnp.float32)
    emb = jnp.repeat(angles, 2, axis=-1) if interleaved else jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    q = apply_rope(qkv[:, :, :h], cos, sin, interleaved)
    if t == 1:
        got = decode_attention(qkv[:, 0], k, v, lengths + 1, num_heads=h, cos=cos[:, 0], sin=sin[:, 0],
                               rope_interleaved=interleaved)
        want = decode_attention_reference(q[:, 0], k, v, lengths + 1)
    else:
        mask = jnp.asarray(published_tree_mask()[:t, :t])
        got = tree_attention(qkv, k, v, lengths, mask, num_heads=h, cos=cos, sin=sin, rope_interleaved=interleaved)
        want = tree_attention_reference(q, k, v, lengths, mask)
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("shape, dtype, scale_f32", [((1, 1, 4096), jnp.bfloat16, False),
                                                     ((1, 64, 4096), jnp.bfloat16, False),
                                                     ((4, 64, 4096), jnp.float16, True)])
def test_compiled_add_rms_norm_matches_reference(shape, dtype, scale_f32):
    from jaxmedusa.kernels import add_rms_norm_reference
    from jaxmedusa.kernels.norm_pallas import add_rms_norm

    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    a = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), dtype)
    s, y = add_rms_norm(x, a, w, eps=1e-5, scale_in_float32=scale_f32)
    rs, ry = add_rms_norm_reference(x, a, w, 1e-5, scale_f32)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(rs, np.float32))
    assert rel_err(y, ry) < float(jnp.finfo(dtype).eps)
