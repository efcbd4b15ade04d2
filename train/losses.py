"""Losses for Medusa training, all masked to assistant tokens.

Shifts: at position t the LM head predicts tokens[t + 1] and head k (0-indexed) predicts tokens[t + k + 2].
A target counts when it lies inside the sequence and the loss mask is set at the target's position.
Each loss is the mean over its counted targets (0 when there are none); a caller that splits one batch
into micro-batches passes the whole batch's target count as `denom`, so the micro-batch losses add up to
exactly the whole batch's mean.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class TokenLoss(NamedTuple):
    loss: jax.Array  # [] mean cross-entropy over counted targets
    correct: jax.Array  # [] counted targets whose argmax is right
    count: jax.Array  # [] counted targets


def target_count(mask: jax.Array, shift: int) -> jax.Array:
    """How many targets a loss with this shift counts in mask [..., T]."""
    return jnp.sum(mask[..., shift:]).astype(jnp.float32)


def shifted_cross_entropy(logits: jax.Array, tokens: jax.Array, mask: jax.Array, shift: int,
                          denom: jax.Array | None = None) -> TokenLoss:
    """logits [B, T, V] at positions t predict tokens[t + shift] where mask[t + shift]."""
    t = tokens.shape[1]
    logits = logits[:, :t - shift].astype(jnp.float32)
    targets = tokens[:, shift:]
    weight = mask[:, shift:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = weight.sum()
    loss = jnp.sum(ce * weight) / jnp.maximum(count if denom is None else denom, 1.0)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weight)
    return TokenLoss(loss, correct, count)


def projected_cross_entropy(project, hidden: jax.Array, tokens: jax.Array, mask: jax.Array, shift: int,
                            denom: jax.Array | None = None, chunk: int = 0) -> TokenLoss:
    """shifted_cross_entropy(project(hidden), ...) without the whole [B, T, V] logits: with chunk > 0 the
    positions go through project in chunks of `chunk` under a rematerialised scan, so one chunk's
    [B, chunk, V] float32 logits are live, forward and backward (the sums are the same up to fp32 order)."""
    b, t, _ = hidden.shape
    n = t - shift  # positions that predict a token inside the sequence
    if chunk <= 0 or chunk >= n:
        return shifted_cross_entropy(project(hidden), tokens, mask, shift, denom)
    pad = -n % chunk
    parts = (hidden[:, :n], tokens[:, shift:], mask[:, shift:].astype(jnp.float32))
    hs, tg, w = (jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in parts)
    hs, tg, w = (x.reshape((b, (n + pad) // chunk, chunk) + x.shape[2:]).swapaxes(0, 1) for x in (hs, tg, w))

    @jax.checkpoint
    def body(carry, xs):
        hc, tc, wc = xs
        logits = project(hc).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tc)
        correct = jnp.sum((jnp.argmax(logits, -1) == tc) * wc)
        return (carry[0] + jnp.sum(ce * wc), carry[1] + correct), None

    (ce_sum, correct), _ = jax.lax.scan(body, (jnp.float32(0.0), jnp.float32(0.0)), (hs, tg, w))
    count = parts[2].sum()
    return TokenLoss(ce_sum / jnp.maximum(count if denom is None else denom, 1.0), correct, count)


def head_losses(heads, hidden: jax.Array, lm_logits, tokens: jax.Array, mask: jax.Array,
                denoms: jax.Array | None = None, chunk: int = 0) -> TokenLoss:
    """Each head's TokenLoss (fields [K]); head k's logits are recomputed in the backward pass (remat), so
    the [B, T, V] logits of one head at a time are live, not K of them; with chunk > 0 only [B, chunk, V]
    (the chunks' own remat bounds the memory then: no second, whole-head remat that would run every
    projection once more)."""
    out = []
    for k, head in enumerate(heads.heads):
        def one(h, head=head, k=k):
            return projected_cross_entropy(lambda x: head(x, lm_logits), h, tokens, mask, k + 2,
                                           None if denoms is None else denoms[k], chunk)
        out.append((one if chunk > 0 else jax.checkpoint(one))(hidden))
    return TokenLoss(*(jnp.stack(x) for x in zip(*out)))


def lm_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array, denom: jax.Array | None = None) -> TokenLoss:
    """The base model's next-token loss."""
    return shifted_cross_entropy(logits, tokens, mask, 1, denom)


def distill_kl(logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
               denom: jax.Array | None = None) -> jax.Array:
    """Mean KL(teacher || student) of the next-token distributions at positions whose next token counts."""
    weight = mask[:, 1:].astype(jnp.float32)
    s = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    t = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(t) * (t - s), -1)
    return jnp.sum(kl * weight) / jnp.maximum(weight.sum() if denom is None else denom, 1.0)


def head_weights(num_heads: int, coefficient, decay: float) -> jax.Array:
    """coefficient * decay^k for k = 0 .. K-1."""
    return coefficient * decay ** jnp.arange(num_heads, dtype=jnp.float32)


def coefficient_at(step, steps: int, coefficient: float, schedule: str):
    """The heads' loss coefficient at a step: constant, or a sine ramp from 0 to `coefficient` over the run."""
    if schedule == "constant":
        return jnp.float32(coefficient)
    frac = jnp.clip(step.astype(jnp.float32) / max(steps, 1), 0.0, 1.0)
    return coefficient * jnp.sin(frac * jnp.pi / 2)
