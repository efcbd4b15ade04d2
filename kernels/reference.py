"""Pure-JAX reference attention for the KV-cache layout [batch, slots, kv_heads, head_dim].

These are the ground truth the Pallas kernels are tested against, and the implementation used on CPU.
Slots beyond what a query may see are masked by position, never by value, so whatever they hold
(garbage, NaN) cannot leak into the output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _scale(sm_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     sm_scale: float | None = None) -> jax.Array:
    """Grouped-query attention of q [B, T, H, D] over k/v [B, S, KVH, D] where mask [B, T, S] is True.

    Softmax in float32; a query with no visible slot gets zeros. Masked slots are zeroed in v as well,
    so a NaN stored there cannot propagate through 0 * NaN.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * _scale(sm_scale, d)
    m = mask[:, None, None, :, :]
    s = jnp.where(m, s, -jnp.inf)
    smax = jnp.max(s, axis=-1, keepdims=True)
    smax = jnp.where(jnp.isfinite(smax), smax, 0.0)
    p = jnp.where(m, jnp.exp(s - smax), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    visible = jnp.any(mask, axis=1)  # [B, S]: slots any query may read
    v = jnp.where(visible[:, :, None, None], v, jnp.zeros((), v.dtype))
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


def tree_mask_over_cache(lengths: jax.Array, tree_mask: jax.Array, num_slots: int) -> jax.Array:
    """[B, T, S] visibility: the prefix [0, lengths) plus tree slots [lengths, lengths + T) per tree_mask."""
    t = tree_mask.shape[0]
    slots = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    rel = slots - lengths[:, None]  # [B, S] slot index relative to the tree block
    in_block = (rel >= 0) & (rel < t)
    block = jnp.take(tree_mask, jnp.clip(rel, 0, t - 1), axis=1)  # [T, B, S]
    block = jnp.transpose(block, (1, 0, 2)) & in_block[:, None, :]
    return (rel < 0)[:, None, :] | block


def tree_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                             tree_mask: jax.Array, *, sm_scale: float | None = None) -> jax.Array:
    """q [B, T, H, D]; each query sees cache slots [0, lengths) and the tree slots tree_mask allows.

    The T tree tokens' own K/V sit at slots [lengths, lengths + T). A causal lower-triangular tree_mask
    makes this ordinary causal attention of a T-token chunk over the cache.
    """
    mask = tree_mask_over_cache(lengths.astype(jnp.int32), tree_mask.astype(bool), k.shape[1])
    return masked_attention(q, k, v, mask, sm_scale)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                               sm_scale: float | None = None) -> jax.Array:
    """q [B, H, D] over cache slots [0, lengths) -> [B, H, D]."""
    mask = jnp.arange(k.shape[1], dtype=jnp.int32)[None, None, :] < lengths.astype(jnp.int32)[:, None, None]
    return masked_attention(q[:, None], k, v, mask, sm_scale)[:, 0]


def prefill_block_rows(batch: int, heads: int, t: int, budget_bytes: int = 1 << 28) -> int:
    """Query rows per block so one block's float32 scores [B, H, rows, T] stay within budget_bytes."""
    rows = budget_bytes // max(1, 4 * batch * heads * t)
    return int(max(16, min(1024, 1 << max(0, int(rows).bit_length() - 1))))


def causal_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
                               block_rows: int | None = None) -> jax.Array:
    """Causal self-attention of a prompt, q [B, T, H, D] over its own k/v [B, T, KVH, D], in blocks of query
    rows (lax.map), so memory is O(T * block) rather than O(T^2). Same numerics as masked_attention.

    Right-padded ragged prompts need no lengths: causality keeps every real row off the padding after it.
    """
    b, t, h, d = q.shape
    rows = min(block_rows or prefill_block_rows(b, h, t), t)
    n = -(-t // rows)
    qp = jnp.pad(q, ((0, 0), (0, n * rows - t), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(qp.reshape(b, n, rows, h, d), 1, 0)  # [n, B, rows, H, D]
    cols = jnp.arange(t, dtype=jnp.int32)

    def one(args):
        i, qb = args
        pos = i * rows + jnp.arange(rows, dtype=jnp.int32)
        mask = jnp.broadcast_to(pos[:, None] >= cols[None, :], (b, rows, t))
        return masked_attention(qb, k, v, mask, sm_scale)

    out = jax.lax.map(one, (jnp.arange(n, dtype=jnp.int32), blocks))  # [n, B, rows, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * rows, h, d)[:, :t]
