"""Llama-family causal LM (Llama 1/2/3, Vicuna, Mistral, Zephyr) in Flax NNX, with an explicit KV cache.

One forward serves prefill, decode and Medusa tree verification: it takes the tokens, their positions,
the cache and a [T, T] mask among the new tokens (causal for a prompt chunk, ancestors for a tree),
writes the new K/V at slots [lengths, lengths + T) and returns the final-norm hidden states. The cache's
`lengths` are left for the caller to advance, since only the caller knows how many tokens to keep.
With `cache=None` the same forward is plain causal self-attention over the given tokens (training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmedusa.kernels import attention, matmul, prefill_attention

from .cache import KVCache, write_kv, write_prefix
from .config import ModelConfig
from .rope import apply_rope, inv_freq, rope_cos_sin


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def cached_attention(q, k, v, cache: KVCache | None, layer: int, tree_mask, prefill: bool, attn_impl):
    """Writes k/v [B, T, KVH, D] into the cache at [lengths, lengths + T) and attends q [B, T, H, D] over it.

    cache=None: causal attention over these T tokens alone (training). prefill=True: the cache is empty
    (lengths 0) and tree_mask causal, so K/V go in at slot 0 and flash attention runs on the fresh K/V
    without reading the cache. Returns (o [B, T, H, D], cache).
    """
    if cache is None:
        with jax.named_scope("attention"):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True), None
    with jax.named_scope("kv_write"):
        if prefill:
            ck, cv = write_prefix(cache.k, layer, k), write_prefix(cache.v, layer, v)
        else:
            ck, cv = write_kv(cache.k, layer, k, cache.lengths), write_kv(cache.v, layer, v, cache.lengths)
    with jax.named_scope("attention"):
        if prefill:
            o = prefill_attention(q, k, v, impl=attn_impl)
        else:
            o = attention(q, ck, cv, cache.lengths, tree_mask, impl=attn_impl, layer=layer)
    return o, cache._replace(k=ck, v=cv)


def lm_head_logits(embed_tokens: nnx.Embed, lm_head: nnx.Linear | None, hidden: jax.Array) -> jax.Array:
    """float32 logits from the untied lm_head, or from the token embeddings when they are tied."""
    with jax.named_scope("lm_head"):
        out = embed_tokens.attend(hidden) if lm_head is None else lm_head(hidden)
        return out.astype(jnp.float32)


class Linear(nnx.Linear):
    """nnx.Linear (same parameters, same checkpoint names) whose product goes through the GEMM dispatcher,
    so the few-row products of a verify step can take the Pallas flat GEMM."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x.astype(self.dtype), self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def linear(cfg_in: int, cfg_out: int, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return Linear(cfg_in, cfg_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
                  kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        # q, k and v as one product (HF's q_proj/k_proj/v_proj side by side; params.py maps them).
        self.qkv_proj = linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, cfg.attention_bias, dtype, rngs)
        self.o_proj = linear(cfg.num_heads * d, h, cfg.attention_bias, dtype, rngs)
        self.cfg = cfg

    def __call__(self, x, cos, sin, cache: KVCache, layer: int, tree_mask, prefill: bool, attn_impl):
        cfg = self.cfg
        b, t, _ = x.shape
        with jax.named_scope("qkv_proj"):
            qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), [qd, qd + kvd], axis=-1)
            q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
            k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        with jax.named_scope("rope"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o, cache = cached_attention(q, k, v, cache, layer, tree_mask, prefill, attn_impl)
        with jax.named_scope("o_proj"):
            return self.o_proj(o.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one product (HF's gate_proj/up_proj side by side)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = linear(h, 2 * i, cfg.mlp_bias, dtype, rngs)
        self.down_proj = linear(i, h, cfg.mlp_bias, dtype, rngs)

    def __call__(self, x):
        with jax.named_scope("mlp"):
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, cache, layer, tree_mask, prefill, attn_impl):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, tree_mask, prefill, attn_impl)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class LlamaForCausalLM(nnx.Module):
    """The base model. Parameter names mirror HF's so the checkpoint table is a plain rename + transpose."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs, embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.hidden_size, cfg.vocab_size, False,
                                                                     dtype, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, tree_mask: jax.Array | None,
                 *, prefill: bool = False, attn_impl: str | None = None) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions [B, T]; tree_mask [T, T] bool. Returns (final-norm hidden [B, T, H], cache).

        cache=None: causal self-attention over the T tokens alone (tree_mask unused), for training.
        """
        cfg = self.config
        x = self.embed_tokens(tokens)
        inv = inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions)
        cos, sin = rope_cos_sin(inv, positions)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, cache, i, tree_mask, prefill, attn_impl)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits (float32) for final-norm hidden states."""
        return lm_head_logits(self.embed_tokens, self.lm_head, hidden)
