"""Layers every family builds on: RMSNorm, the GEMM-dispatching Linear, cached attention and the LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmedusa.kernels import add_rms_norm, attention, matmul, prefill_attention, training_attention

from ..cache import KVCache, write_kv, write_prefix
from ..sharding import by_heads


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, normalised in float32.

    HF's Llama/Qwen/GLM norms cast the normalised value back to the input dtype, then scale
    (`scale_in_float32=False`); THUDM's ChatGLM code scales in float32, then casts. Equal in float32.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, scale_in_float32: bool = False):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.scale_in_float32 = scale_in_float32

    def _factor(self, xf: jax.Array) -> jax.Array:
        """rsqrt(mean(x^2) + eps) of each float32 row, [..., 1]: what the row is multiplied by."""
        return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * self._factor(xf)
        if self.scale_in_float32:
            return (self.weight[...].astype(jnp.float32) * xf).astype(x.dtype)
        return self.weight[...] * xf.astype(x.dtype)

    @jax.named_scope("norm")
    def fold(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(weight * x, s [..., 1] float32) with self(x) = weight * x * s up to rounding: the next product takes
        weight * x as its input (XLA fuses that multiply into the GEMM) and s onto its output rows
        (Linear(..., scale=s)), so a few-row step runs no normalising kernel of its own (kernels.fold_norm)."""
        xf = x.astype(jnp.float32)
        s = self._factor(xf)
        if self.scale_in_float32:
            return (self.weight[...].astype(jnp.float32) * xf).astype(x.dtype), s
        return self.weight[...] * x, s

    @jax.named_scope("norm")
    def add(self, x: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x + a, self(x + a)): a residual add and this norm, one kernel where the dispatcher fuses them
        (kernels.add_rms_norm, JAXMEDUSA_NORM)."""
        return add_rms_norm(x, a, self.weight[...], eps=self.eps, scale_in_float32=self.scale_in_float32)


def cached_attention(q, k, v, cache: KVCache | None, layer: int, tree_mask, prefill: bool, attn_impl, rope=None):
    """Writes k/v [B, T, KVH, D] into the cache at [lengths, lengths + T) and attends q [B, T, H, D] over it.

    cache=None: causal attention over these T tokens alone (training). prefill=True: the cache is empty
    (lengths 0) and tree_mask causal, so K/V go in at slot 0 and flash attention runs on the fresh K/V
    without reading the cache. rope=(cos, sin, interleaved) (decode and verify, where
    kernels.q_rope_in_kernel): q is the fused q/k/v output [B, T, H + 2 KVH, D], not rotated; the kernel reads
    its query heads and rotates them. Returns (o [B, T, H, D], cache).
    """
    if cache is None:
        with jax.named_scope("attention"):
            return training_attention(q, k, v), None
    with jax.named_scope("kv_write"):
        if prefill:
            ck, cv = write_prefix(cache.k, layer, k), write_prefix(cache.v, layer, v)
        else:
            ck, cv = write_kv(cache.k, layer, k, cache.lengths), write_kv(cache.v, layer, v, cache.lengths)
    with jax.named_scope("attention"):  # per device on its heads when tensor-parallel (sharding.by_heads)
        if prefill:
            o = by_heads(lambda q, k, v: prefill_attention(q, k, v, impl=attn_impl), q, k, v, stacked_cache=False)
        elif rope is None:
            o = by_heads(lambda q, ck, cv, lengths, mask: attention(q, ck, cv, lengths, mask, impl=attn_impl,
                                                                   layer=layer),
                         q, ck, cv, cache.lengths, tree_mask, stacked_cache=True)
        else:  # this device's part of the fused product is its q heads, then its k and v heads
            o = by_heads(lambda q, ck, cv, lengths, mask, cos, sin: attention(
                q, ck, cv, lengths, mask, impl=attn_impl, layer=layer, num_heads=q.shape[2] - 2 * ck.shape[-2],
                cos=cos, sin=sin, rope_interleaved=rope[2]), q, ck, cv, cache.lengths, tree_mask, rope[0], rope[1],
                stacked_cache=True)
    return o, cache._replace(k=ck, v=cv)


def split_columns(y: jax.Array, widths: tuple[int, ...], shards: int = 1) -> list[jax.Array]:
    """The parts of a fused product's output y [..., sum(widths)]: side by side (shards = 1), or interleaved
    per device (sharding.interleave_fused: device d's share of every part, then device d + 1's), so each
    device splits its own columns and no part crosses devices."""
    if shards == 1:
        return jnp.split(y, list(np.cumsum(widths[:-1])), axis=-1)
    lead = y.shape[:-1]
    y = y.reshape(*lead, shards, y.shape[-1] // shards)
    parts = jnp.split(y, list(np.cumsum([w // shards for w in widths[:-1]])), axis=-1)
    return [p.reshape(*lead, w) for p, w in zip(parts, widths)]


def checkpointed(layer: nnx.Module, call, x: jax.Array, *arrays: jax.Array) -> jax.Array:
    """call(layer, x, *arrays) with its activations recomputed in the backward pass (gradient
    checkpointing): jax.checkpoint over the layer's split state, so no NNX object crosses the boundary."""
    graphdef, state = nnx.split(layer)
    return jax.checkpoint(lambda state, *xs: call(nnx.merge(graphdef, state), *xs))(state, x, *arrays)


def lm_head_logits(embed_tokens: nnx.Embed, lm_head: nnx.Linear | None, hidden: jax.Array) -> jax.Array:
    """float32 logits from the untied lm_head, or from the token embeddings when they are tied."""
    with jax.named_scope("lm_head"):
        out = embed_tokens.attend(hidden) if lm_head is None else lm_head(hidden)
        return out.astype(jnp.float32)


class Linear(nnx.Linear):
    """nnx.Linear (same parameters, same checkpoint names) whose product goes through the GEMM dispatcher,
    so the few-row products of a verify step can take the Pallas flat GEMM."""

    lora = None  # a LoRA adapter (models/lora.py add_lora) set on an instance adds its low-rank update

    def __call__(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """x @ kernel (+ LoRA's update) (+ bias); scale [..., 1] (float32) multiplies each row of the product
        before the bias: the factor of an RMSNorm folded into this product (RMSNorm.fold)."""
        x = x.astype(self.dtype)
        y = matmul(x, self.kernel[...])
        if scale is not None:
            if self.lora is not None:
                y = y + self.lora(x).astype(y.dtype)
            y = (y.astype(jnp.float32) * scale).astype(y.dtype)
            return y if self.bias is None else y + self.bias[...].astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


def linear(cfg_in: int, cfg_out: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return Linear(cfg_in, cfg_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
                  kernel_init=nnx.initializers.normal(0.02))
