"""The static KV cache: an explicit pytree passed into and returned from jitted functions (and donated)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # models/ imports this module
    from .models.config import ModelConfig


class KVCache(NamedTuple):
    """k, v: [layers, batch, max_len, kv_heads, head_dim]; lengths: [batch] int32 valid slots per sequence.

    Slot i holds position i. Slots at or past `lengths` may hold anything (a padded prompt's tail, a
    rejected tree branch); attention masks them by position, so they are simply overwritten later.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def write_kv(buf: jax.Array, layer: int, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """Scatters new [B, T, KVH, D] into buf[layer] at slots [lengths, lengths + T) of each sequence."""
    b, t = new.shape[:2]
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    slots = lengths[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
    # each (row, slot) is written once and the indices come sorted: XLA emits a plain parallel copy
    # instead of a scatter that must serialise possibly colliding updates
    return buf.at[layer, rows, slots].set(new.astype(buf.dtype), mode="drop", unique_indices=True,
                                          indices_are_sorted=True)


def write_prefix(buf: jax.Array, layer: int, new: jax.Array) -> jax.Array:
    """Writes new [B, T, KVH, D] into buf[layer] at slots [0, T) (a prefill): one in-place slice update."""
    return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), (layer, 0, 0, 0, 0))
