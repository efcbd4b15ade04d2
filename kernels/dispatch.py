"""The one attention entry point the model calls; it picks the implementation.

Implementations:
  "reference"  pure JAX (XLA), any backend; the ground truth.
  "pallas"     the Pallas kernels (kernels/attention_pallas.py), compiled for the GPU.
  "interpret"  the same Pallas kernels in interpret mode (CPU); slow, for tests.
  "auto"       "pallas" on GPU, "reference" elsewhere (the default).
Choose with `impl=` (the model's `attn_impl`) or the JAXMEDUSA_ATTENTION environment variable.
Prompt prefill (many tokens over an empty cache) always uses the reference: it is one causal block,
not cache-bound decoding.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from . import attention_pallas, reference
from .attention_pallas import kernel_supports

IMPLS = ("auto", "reference", "pallas", "interpret")
ENV_VAR = "JAXMEDUSA_ATTENTION"


def resolve_impl(impl: str | None = None) -> str:
    """Returns the implementation to use: explicit argument, then the environment variable, then auto."""
    choice = impl or os.environ.get(ENV_VAR) or "auto"
    if choice not in IMPLS:
        raise ValueError(f"attention impl {choice!r} ({ENV_VAR} or impl=) is not one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return choice


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, tree_mask: jax.Array, *,
              prefill: bool = False, sm_scale: float | None = None, impl: str | None = None,
              layer: int | None = None) -> jax.Array:
    """Attention of T new tokens q [B, T, H, D] whose K/V were already written at slots [lengths, lengths+T).

    Each query sees the cache prefix [0, lengths) and the new slots tree_mask [T, T] allows (a causal
    mask for a prompt chunk, ancestors + self for a Medusa tree). `prefill=True` promises the cache was
    empty (lengths == 0), so only the first T slots are read. With `layer`, k/v are the whole stacked
    cache [L, B, S, KVH, D] and the kernels read that layer in place (no per-call copy of it).
    """
    chosen = resolve_impl(impl)
    t = q.shape[1]
    if prefill:
        zeros = jnp.zeros_like(lengths)
        if layer is not None:
            k, v = k[layer], v[layer]
        return reference.tree_attention_reference(q, k[:, :t], v[:, :t], zeros, tree_mask, sm_scale=sm_scale)
    if chosen in ("pallas", "interpret") and not kernel_supports(q.shape[-1]):
        if impl or os.environ.get(ENV_VAR):
            raise ValueError(f"attention impl {chosen!r} needs head_dim a power of two >= 16, got {q.shape[-1]}")
        chosen = "reference"
    if chosen == "reference":
        if layer is not None:
            k, v = k[layer], v[layer]
        if t == 1:
            return reference.decode_attention_reference(q[:, 0], k, v, lengths + 1, sm_scale=sm_scale)[:, None]
        return reference.tree_attention_reference(q, k, v, lengths, tree_mask, sm_scale=sm_scale)
    interpret = chosen == "interpret"
    if t == 1:
        return attention_pallas.decode_attention(q[:, 0], k, v, lengths + 1, sm_scale=sm_scale,
                                                 interpret=interpret, layer=layer)[:, None]
    return attention_pallas.tree_attention(q, k, v, lengths, tree_mask, sm_scale=sm_scale, interpret=interpret,
                                           layer=layer)
