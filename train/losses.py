"""Losses for Medusa training, all masked to assistant tokens.

Shifts: at position t the LM head predicts tokens[t + 1] and head k (0-indexed) predicts tokens[t + k + 2].
A target counts when it lies inside the sequence and the loss mask is set at the target's position.
Each loss is the mean over its counted targets (0 when there are none); a caller that splits one batch
into micro-batches passes the whole batch's target count as `denom`, so the micro-batch losses add up to
exactly the whole batch's mean.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


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


def _chunked(hidden, tokens, mask, shift: int, chunk: int):
    """hidden [B, T, H], targets and weights cut into [n, B, chunk, ...] chunks (zero-padded at the end)."""
    b, t, _ = hidden.shape
    n = t - shift  # positions that predict a token inside the sequence
    pad = -n % chunk
    parts = (hidden[:, :n], tokens[:, shift:], mask[:, shift:].astype(jnp.float32))
    padded = (jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in parts)
    return tuple(x.reshape((b, (n + pad) // chunk, chunk) + x.shape[2:]).swapaxes(0, 1) for x in padded)


def _chunk_ce(logits, targets, weights):
    """(sum of weighted cross-entropy, weighted correct count) of one chunk's float32 logits."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights), jnp.sum((jnp.argmax(logits, -1) == targets) * weights)


def projected_cross_entropy(project, hidden: jax.Array, tokens: jax.Array, mask: jax.Array, shift: int,
                            denom: jax.Array | None = None, chunk: int = 0) -> TokenLoss:
    """shifted_cross_entropy(project(hidden), ...) without the whole [B, T, V] logits: with chunk > 0 the
    positions go through project in chunks of `chunk` under a rematerialised scan, so one chunk's
    [B, chunk, V] float32 logits are live, forward and backward (the sums are the same up to fp32 order)."""
    n = hidden.shape[1] - shift
    if chunk <= 0 or chunk >= n:
        return shifted_cross_entropy(project(hidden), tokens, mask, shift, denom)
    hs, tg, w = _chunked(hidden, tokens, mask, shift, chunk)

    @jax.checkpoint
    def body(carry, xs):
        ce, correct = _chunk_ce(project(xs[0]).astype(jnp.float32), xs[1], xs[2])
        return (carry[0] + ce, carry[1] + correct), None

    (ce_sum, correct), _ = jax.lax.scan(body, (jnp.float32(0.0), jnp.float32(0.0)), (hs, tg, w))
    count = mask[:, shift:].astype(jnp.float32).sum()
    return TokenLoss(ce_sum / jnp.maximum(count if denom is None else denom, 1.0), correct, count)


def fused_cross_entropy(apply, params, hidden: jax.Array, tokens: jax.Array, mask: jax.Array, shift: int,
                        denom: jax.Array | None = None, chunk: int = 512) -> TokenLoss:
    """projected_cross_entropy for project(x) = apply(params, x), params explicit, with each chunk's
    gradients (for params and hidden) computed in the forward pass right after its loss: the backward pass
    only scales them, so the vocabulary projection runs 3 times per position (forward and the two products
    of its gradient) instead of 4 under remat, and one chunk's [B, chunk, V] logits are live at a time."""
    n = hidden.shape[1] - shift
    chunk = min(chunk, n) if chunk > 0 else n
    hs, tg, w = _chunked(hidden, tokens, mask, shift, chunk)
    ce_sum, correct = _fused_ce(apply, params, hs, tg, w)
    count = mask[:, shift:].astype(jnp.float32).sum()
    return TokenLoss(ce_sum / jnp.maximum(count if denom is None else denom, 1.0), correct, count)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_ce(apply, params, hs, tg, w):
    def body(carry, xs):
        ce, correct = _chunk_ce(apply(params, xs[0]).astype(jnp.float32), xs[1], xs[2])
        return (carry[0] + ce, carry[1] + correct), None

    (ce_sum, correct), _ = jax.lax.scan(body, (jnp.float32(0.0), jnp.float32(0.0)), (hs, tg, w))
    return ce_sum, correct


def _fused_ce_fwd(apply, params, hs, tg, w):
    def body(carry, xs):
        ce_acc, correct_acc, grads = carry
        hc, tc, wc = xs
        logits, vjp = jax.vjp(apply, params, hc)
        lf = logits.astype(jnp.float32)
        ce, correct = _chunk_ce(lf, tc, wc)
        dlogits = (jax.nn.softmax(lf, -1) - jax.nn.one_hot(tc, lf.shape[-1], dtype=jnp.float32)) * wc[..., None]
        dp, dh = vjp(dlogits.astype(logits.dtype))
        grads = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grads, dp)
        return (ce_acc + ce, correct_acc + correct, grads), dh

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (ce_sum, correct, grads), dhs = jax.lax.scan(body, (jnp.float32(0.0), jnp.float32(0.0), zeros), (hs, tg, w))
    return (ce_sum, correct), (grads, dhs, params)


def _fused_ce_bwd(apply, res, cotangents):
    grads, dhs, params = res
    g = cotangents[0]  # d(total)/d(ce_sum); the correct count has no gradient
    dparams = jax.tree_util.tree_map(lambda x, p: (g * x).astype(p.dtype), grads, params)
    return dparams, (g * dhs.astype(jnp.float32)).astype(dhs.dtype), None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def head_losses(heads, hidden: jax.Array, lm_logits, tokens: jax.Array, mask: jax.Array,
                denoms: jax.Array | None = None, chunk: int = 0) -> TokenLoss:
    """Each head's TokenLoss (fields [K]). chunk > 0 with the heads' own projections: fused_cross_entropy
    (gradients in the forward pass, one [B, chunk, V] at a time). Otherwise head k's logits are recomputed
    in the backward pass (remat), so one head's logits are live at a time, not K of them: [B, T, V] with
    chunk 0, [B, chunk, V] under the chunks' own remat (heads sharing the base lm_head, whose weights the
    fused path cannot take as explicit parameters)."""
    out = []
    for k, head in enumerate(heads.heads):
        denom = None if denoms is None else denoms[k]
        if chunk > 0 and not heads.shared_lm_head:
            graphdef, state = nnx.split(head)
            out.append(fused_cross_entropy(lambda st, x: nnx.merge(graphdef, st)(x, None), state, hidden, tokens,
                                           mask, k + 2, denom, chunk))
            continue

        def one(h, head=head, k=k):
            return projected_cross_entropy(lambda x: head(x, lm_logits), h, tokens, mask, k + 2, denom, chunk)
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
