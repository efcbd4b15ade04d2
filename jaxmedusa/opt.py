"""OPT causal LM (OPT-125m ... 66B) in Flax NNX, behind the same interface as the Llama family.

Differences from Llama, all from the config: learned position embeddings (looked up at position + 2, the
offset HF's checkpoints carry), LayerNorm with bias (before each block, or after it with
`do_layer_norm_before=False` as in 350m), a ReLU MLP (fc1/fc2), biases everywhere, and for 350m token
embeddings of width word_embed_proj_dim mapped in and out of the hidden width by project_in/project_out.
The forward returns the states the LM head reads (after the final norm and project_out), so Medusa heads
read them too and have width word_embed_proj_dim. K/V go through the shared cache and kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .cache import KVCache
from .config import ModelConfig
from .model import cached_attention, linear, lm_head_logits

POSITION_OFFSET = 2  # HF OPT reserves the first two rows of embed_positions


def _layer_norm(dim: int, cfg: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-5, use_bias=cfg.layer_norm_affine, use_scale=cfg.layer_norm_affine,
                         dtype=dtype, param_dtype=dtype, rngs=rngs)


class OPTAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.q_proj = linear(h, h, cfg.attention_bias, dtype, rngs)
        self.k_proj = linear(h, h, cfg.attention_bias, dtype, rngs)
        self.v_proj = linear(h, h, cfg.attention_bias, dtype, rngs)
        self.out_proj = linear(h, h, cfg.attention_bias, dtype, rngs)
        self.cfg = cfg

    def __call__(self, x, cache, layer, tree_mask, prefill, attn_impl):
        cfg = self.cfg
        b, t, _ = x.shape
        shape = (b, t, cfg.num_heads, cfg.head_dim)
        q, k, v = self.q_proj(x).reshape(shape), self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
        o, cache = cached_attention(q, k, v, cache, layer, tree_mask, prefill, attn_impl)
        return self.out_proj(o.reshape(b, t, cfg.hidden_size)), cache


class OPTDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.self_attn = OPTAttention(cfg, dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(cfg.hidden_size, cfg, dtype, rngs)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype, rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype, rngs)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg, dtype, rngs)
        self.pre_ln = cfg.do_layer_norm_before
        self.act = jax.nn.relu if cfg.activation == "relu" else (lambda a: jax.nn.gelu(a, approximate=False))

    def __call__(self, x, cache, layer, tree_mask, prefill, attn_impl):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        a, cache = self.self_attn(h, cache, layer, tree_mask, prefill, attn_impl)
        x = x + a
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(h)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, cache


class OPTForCausalLM(nnx.Module):
    """Parameter names mirror HF's (model.decoder.*), so the checkpoint table is a rename + transpose."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        init = nnx.initializers.normal(0.02)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                      embedding_init=init)
        self.embed_positions = nnx.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size, dtype=dtype,
                                         param_dtype=dtype, rngs=rngs, embedding_init=init)
        proj = cfg.word_embed_proj_dim is not None
        self.project_in = linear(cfg.embed_dim, cfg.hidden_size, False, dtype, rngs) if proj else None
        self.project_out = linear(cfg.hidden_size, cfg.embed_dim, False, dtype, rngs) if proj else None
        self.layers = nnx.List([OPTDecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg, dtype, rngs) if cfg.final_layer_norm else None
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.embed_dim, cfg.vocab_size, False, dtype, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, tree_mask: jax.Array | None,
                 *, prefill: bool = False, attn_impl: str | None = None) -> tuple[jax.Array, KVCache | None]:
        """As LlamaForCausalLM.__call__; returns the LM head's input [B, T, embed_dim]."""
        x = self.embed_tokens(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cache, i, tree_mask, prefill, attn_impl)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits (float32)."""
        return lm_head_logits(self.embed_tokens, self.lm_head, hidden)
