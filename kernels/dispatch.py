"""The one attention entry point the model calls; it picks the implementation.

Implementations: "reference" (pure JAX, any backend). The Pallas kernels plug in here, so the model
never changes when they do. Choose with `impl=` or the JAXMEDUSA_ATTENTION environment variable.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from . import reference

IMPLS = ("auto", "reference")
ENV_VAR = "JAXMEDUSA_ATTENTION"


def resolve_impl(impl: str | None = None) -> str:
    """Returns the implementation to use: explicit argument, then the environment variable, then auto."""
    choice = impl or os.environ.get(ENV_VAR) or "auto"
    if choice not in IMPLS:
        raise ValueError(f"attention impl {choice!r} ({ENV_VAR} or impl=) is not one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "reference"
    return choice


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, tree_mask: jax.Array, *,
              prefill: bool = False, sm_scale: float | None = None, impl: str | None = None) -> jax.Array:
    """Attention of T new tokens q [B, T, H, D] whose K/V were already written at slots [lengths, lengths+T).

    Each query sees the cache prefix [0, lengths) and the new slots tree_mask [T, T] allows (a causal
    mask for a prompt chunk, ancestors + self for a Medusa tree). `prefill=True` promises the cache was
    empty (lengths == 0), so only the first T slots are read.
    """
    resolve_impl(impl)
    t = q.shape[1]
    if prefill:
        zeros = jnp.zeros_like(lengths)
        return reference.tree_attention_reference(q, k[:, :t], v[:, :t], zeros, tree_mask, sm_scale=sm_scale)
    if t == 1:
        return reference.decode_attention_reference(q[:, 0], k, v, lengths + 1, sm_scale=sm_scale)[:, None]
    return reference.tree_attention_reference(q, k, v, lengths, tree_mask, sm_scale=sm_scale)
