"""The pre-norm RMSNorm/RoPE/SwiGLU decoder that Llama, Mistral, Qwen2, Qwen3 and GLM share, in Flax NNX.

One forward serves prefill, decode and Medusa tree verification: it takes the tokens, their positions,
the cache and a [T, T] mask among the new tokens (causal for a prompt chunk, ancestors for a tree),
writes the new K/V at slots [lengths, lengths + T) and returns the final-norm hidden states. The cache's
`lengths` are left for the caller to advance, since only the caller knows how many tokens to keep.
With `cache=None` the same forward is plain causal self-attention over the given tokens (training).

The families differ only in DecoderConfig fields (biases, qk-norm, partial/interleaved RoPE, where the
norm scales) and in their checkpoint key names (DecoderKeys); each family module maps its config.json
and picks its keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ..cache import KVCache
from .config import ConfigError, ModelConfig, RopeConfig, eos_tuple, hf_eos, hf_rope, required, silu_act
from ..kernels import fold_norm, q_rope_in_kernel
from .layers import RMSNorm, cached_attention, checkpointed, linear, lm_head_logits, split_columns
from .params import ParamEntry, fused_linear_entries, linear_entries
from .rope import apply_rope, inv_freq, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """A pre-norm decoder's own fields."""

    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False  # biases on q/k/v (Qwen2, GLM; Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    norm_scale_in_float32: bool = False  # THUDM ChatGLM's RMSNorm (see layers.RMSNorm)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in (("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope.theta),
                            ("rope factor", self.rope.factor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite positive number, got {value!r}")
        rd = self.rope.rotary_dim(self.head_dim)
        if rd <= 0 or rd % 2:
            raise ConfigError(f"rotary dims int(head_dim {self.head_dim} * partial_rotary_factor "
                              f"{self.rope.partial_rotary_factor}) = {rd} must be a positive even number")


def decoder_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The fields Llama-style config.json files spell alike (Llama, Mistral, Qwen2/3, GLM)."""
    hidden, heads, layers, vocab, inter = required(d, "hidden_size", "num_attention_heads", "num_hidden_layers",
                                                   "vocab_size", "intermediate_size")
    silu_act(d)
    max_pos = int(d.get("max_position_embeddings", 2048))
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(d.get("head_dim") or hidden // heads),
        max_position_embeddings=max_pos, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_tuple(d.get("eos_token_id")), pad_token_id=d.get("pad_token_id"))


def decoder_hf_fields(c: DecoderConfig, model_type: str) -> dict[str, Any]:
    """The inverse of decoder_fields (plus the RoPE fields) for a transformers-layout config.json."""
    return {
        "architectures": [c.architecture], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": hf_eos(c.eos_token_ids), "pad_token_id": c.pad_token_id, **hf_rope(c.rope),
    }


@dataclasses.dataclass(frozen=True)
class DecoderKeys:
    """A checkpoint's key names for a pre-norm decoder; `{n}` is the layer. Several q/k/v or gate/up names
    are separate tensors laid side by side in the model's fused kernel; one name is a fused tensor."""

    embed: str = "model.embed_tokens.weight"
    layer: str = "model.layers.{n}"
    input_norm: str = "input_layernorm.weight"
    post_norm: str = "post_attention_layernorm.weight"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    q_norm: str = "self_attn.q_norm.weight"
    k_norm: str = "self_attn.k_norm.weight"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"


HF_KEYS = DecoderKeys()  # transformers' Llama, Mistral, Qwen2, Qwen3


class Attention(nnx.Module):
    fused = "qkv_proj"  # the product whose columns are q, k and v side by side (sharding.interleave_fused)
    fused_names = ("q_proj", "k_proj", "v_proj")  # its parts as transformers names them (LoRA targets)
    shards = 1  # devices those columns are interleaved for: each device's q, k and v heads side by side

    def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        # q, k and v as one product (a checkpoint's q/k/v tensors side by side; the family's table maps them).
        self.qkv_proj = linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, cfg.qkv_bias, dtype, rngs)
        self.o_proj = linear(cfg.num_heads * d, h, cfg.o_bias, dtype, rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=dtype) if cfg.qk_norm else None
        self.cfg = cfg

    def fused_parts(self) -> tuple[tuple[int, ...], int]:
        """The widths of q, k and v in qkv_proj's columns, and the unit a device's share must be a multiple of."""
        cfg = self.cfg
        return (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim), \
            cfg.head_dim

    def __call__(self, x, cos, sin, cache: KVCache, layer: int, tree_mask, prefill: bool, attn_impl, scale=None):
        """x: the normalised hidden states, or with `scale` the input of a folded norm (RMSNorm.fold)."""
        cfg = self.cfg
        b, t, _ = x.shape
        with jax.named_scope("qkv_proj"):
            qkv = self.qkv_proj(x, scale)
            q, k, v = split_columns(qkv, self.fused_parts()[0], self.shards)
            q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
            k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # with JAXMEDUSA_Q_ROPE=kernel, decode and verify steps on the Pallas kernels rotate q in the attention
        # kernel, which reads the query heads straight from the fused product (kernels.q_rope_in_kernel)
        in_kernel = (cache is not None and not prefill and self.q_norm is None
                     and q_rope_in_kernel(attn_impl, q.dtype, cfg.head_dim))
        with jax.named_scope("rope"):
            k = apply_rope(k, cos, sin, cfg.rope.interleaved)
            if not in_kernel:
                q = apply_rope(q, cos, sin, cfg.rope.interleaved)
        if in_kernel:
            o, cache = cached_attention(qkv.reshape(b, t, -1, cfg.head_dim), k, v, cache, layer, tree_mask, prefill,
                                        attn_impl, rope=(cos, sin, cfg.rope.interleaved))
        else:
            o, cache = cached_attention(q, k, v, cache, layer, tree_mask, prefill, attn_impl)
        with jax.named_scope("o_proj"):
            return self.o_proj(o.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one product (gate's columns first)."""

    fused = "gate_up_proj"
    fused_names = ("gate_proj", "up_proj")
    shards = 1  # as Attention.shards, for gate and up

    def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = linear(h, 2 * i, cfg.mlp_bias, dtype, rngs)
        self.down_proj = linear(i, h, cfg.mlp_bias, dtype, rngs)

    def fused_parts(self) -> tuple[tuple[int, ...], int]:
        i = self.down_proj.kernel.shape[0]
        return (i, i), 1

    def __call__(self, x, scale=None):
        """x: the normalised hidden states, or with `scale` the input of a folded norm (RMSNorm.fold)."""
        with jax.named_scope("mlp"):
            gate, up = split_columns(self.gate_up_proj(x, scale), self.fused_parts()[0], self.shards)
            return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
        norm = dict(param_dtype=dtype, scale_in_float32=cfg.norm_scale_in_float32)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, cache, layer, tree_mask, prefill, attn_impl):
        # a few-row step: each norm's weight on the next product's input, its per-row factor on the product's output
        if fold_norm(x.shape[-1], math.prod(x.shape[:-1])):
            xw, s = self.input_layernorm.fold(x)
            a, cache = self.self_attn(xw, cos, sin, cache, layer, tree_mask, prefill, attn_impl, scale=s)
            x = x + a
            x = x + self.mlp(*self.post_attention_layernorm.fold(x))
            return x, cache
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, tree_mask, prefill, attn_impl)
        x, h = self.post_attention_layernorm.add(x, a)
        x = x + self.mlp(h)
        return x, cache


class DecoderLM(nnx.Module):
    """The base model of every pre-norm decoder family (Llama, Mistral, Qwen2, Qwen3, GLM, ChatGLM)."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs, embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=dtype,
                            scale_in_float32=cfg.norm_scale_in_float32)
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.hidden_size, cfg.vocab_size, False,
                                                                     dtype, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, tree_mask: jax.Array | None,
                 *, prefill: bool = False, attn_impl: str | None = None,
                 remat: bool = False) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions [B, T]; tree_mask [T, T] bool. Returns (final-norm hidden [B, T, H], cache).

        cache=None: causal self-attention over the T tokens alone (tree_mask unused), for training;
        remat=True then keeps only each layer's input for the backward pass (gradient checkpointing).
        """
        cfg = self.config
        x = self.embed_tokens(tokens)
        inv = inv_freq(cfg.rope, cfg.rope.rotary_dim(cfg.head_dim), cfg.max_position_embeddings, positions)
        cos, sin = rope_cos_sin(inv, positions, cfg.rope.interleaved)
        if remat and cache is None:
            for layer in self.layers:
                x = checkpointed(layer, lambda m, x, cos, sin: m(x, cos, sin, None, 0, None, False, attn_impl)[0],
                                 x, cos, sin)
            return self.norm(x), None
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, cache, i, tree_mask, prefill, attn_impl)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits (float32) for final-norm hidden states."""
        return lm_head_logits(self.embed_tokens, self.lm_head, hidden)


def decoder_param_table(cfg: DecoderConfig, keys: DecoderKeys = HF_KEYS) -> list[ParamEntry]:
    """The checkpoint table of a decoder whose checkpoint spells its keys as `keys`."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qd, kvd = cfg.num_heads * d, cfg.num_kv_heads * d
    table = [ParamEntry(keys.embed, ("embed_tokens", "embedding"), (cfg.vocab_size, h))]
    qkv_widths = (qd, kvd, kvd) if len(keys.qkv) == 3 else (qd + 2 * kvd,)
    gate_up_widths = (i, i) if len(keys.gate_up) == 2 else (2 * i,)
    for n in range(cfg.num_layers):
        p, hp = ("layers", n), keys.layer.format(n=n)
        table.append(ParamEntry(f"{hp}.{keys.input_norm}", p + ("input_layernorm", "weight"), (h,)))
        table.append(ParamEntry(f"{hp}.{keys.post_norm}", p + ("post_attention_layernorm", "weight"), (h,)))
        table.extend(fused_linear_entries([(f"{hp}.{k}", w) for k, w in zip(keys.qkv, qkv_widths)],
                                          p + ("self_attn", "qkv_proj"), h, cfg.qkv_bias))
        table.extend(linear_entries(f"{hp}.{keys.o}", p + ("self_attn", "o_proj"), h, qd, cfg.o_bias))
        if cfg.qk_norm:
            table.append(ParamEntry(f"{hp}.{keys.q_norm}", p + ("self_attn", "q_norm", "weight"), (d,)))
            table.append(ParamEntry(f"{hp}.{keys.k_norm}", p + ("self_attn", "k_norm", "weight"), (d,)))
        table.extend(fused_linear_entries([(f"{hp}.{k}", w) for k, w in zip(keys.gate_up, gate_up_widths)],
                                          p + ("mlp", "gate_up_proj"), h, cfg.mlp_bias))
        table.extend(linear_entries(f"{hp}.{keys.down}", p + ("mlp", "down_proj"), h, i, cfg.mlp_bias))
    table.append(ParamEntry(keys.final_norm, ("norm", "weight"), (h,)))
    if not cfg.tie_word_embeddings:
        table.append(ParamEntry(keys.lm_head, ("lm_head", "kernel"), (cfg.vocab_size, h), transpose=True))
    return table
