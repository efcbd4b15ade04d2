"""Token choice from logits: greedy, temperature and nucleus (top-p), as transformers applies them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(logits: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float,
                    use_top_p: bool) -> jax.Array:
    """Logits [..., V] divided by temperature, with tokens outside the top-p nucleus set to -inf.

    The nucleus keeps the smallest set of most likely tokens whose mass reaches top_p (at least one).
    """
    logits = logits.astype(jnp.float32) / temperature
    if not use_top_p:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


@jax.named_scope("sampling")
def choose_tokens(logits: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool,
                  use_top_p: bool) -> jax.Array:
    """One token per row of logits [B, V] -> [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, temperature, top_p, use_top_p)).astype(jnp.int32)
