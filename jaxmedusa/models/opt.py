"""OPT family (OPT-125m ... 66B): config mapping, Flax NNX model and checkpoint table, behind the same
interface as the pre-norm decoder.

Differences from Llama, all from the config: learned position embeddings (looked up at position + 2, the
offset HF's checkpoints carry), LayerNorm with bias (before each block, or after it with
`do_layer_norm_before=False` as in 350m), a ReLU MLP (fc1/fc2), biases everywhere, and for 350m token
embeddings of width word_embed_proj_dim mapped in and out of the hidden width by project_in/project_out.
The forward returns the states the LM head reads (after the final norm and project_out), so Medusa heads
read them too and have width word_embed_proj_dim. K/V go through the shared cache and kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ..cache import KVCache
from .config import ConfigError, Family, ModelConfig, eos_tuple, hf_eos, required
from .layers import cached_attention, checkpointed, linear, lm_head_logits
from .params import ParamEntry, linear_entries

POSITION_OFFSET = 2  # HF OPT reserves the first two rows of embed_positions
ARCHITECTURES = {"OPTForCausalLM": "opt"}
OPT_ACTIVATIONS = ("relu", "gelu")


@dataclasses.dataclass(frozen=True)
class OPTConfig(ModelConfig):
    """OPT's own fields."""

    word_embed_proj_dim: int | None = None  # token-embedding width when it differs from hidden (350m)
    do_layer_norm_before: bool = True  # pre-LN (all OPTs but 350m)
    final_layer_norm: bool = True
    layer_norm_affine: bool = True
    activation: str = "relu"
    bias: bool = True  # enable_bias: biases on every projection

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size


def from_hf(arch: str, d: Mapping[str, Any]) -> OPTConfig:
    hidden, heads, layers, vocab, ffn = required(d, "hidden_size", "num_attention_heads", "num_hidden_layers",
                                                 "vocab_size", "ffn_dim")
    act = d.get("activation_function", "relu")
    if act not in OPT_ACTIVATIONS:
        raise ConfigError(f"activation_function {act!r} is not supported for OPT; supported: "
                          f"{', '.join(OPT_ACTIVATIONS)}")
    if hidden % heads:
        raise ConfigError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    proj = d.get("word_embed_proj_dim") or hidden
    pre_ln = bool(d.get("do_layer_norm_before", True))
    return OPTConfig(
        architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), bias=bool(d.get("enable_bias", True)),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_tuple(d.get("eos_token_id")),
        word_embed_proj_dim=int(proj) if int(proj) != hidden else None, do_layer_norm_before=pre_ln,
        final_layer_norm=pre_ln and not d.get("_remove_final_layer_norm", False),
        layer_norm_affine=bool(d.get("layer_norm_elementwise_affine", True)), activation=act,
        pad_token_id=d.get("pad_token_id"))


def to_hf(c: OPTConfig) -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "ffn_dim": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "max_position_embeddings": c.max_position_embeddings,
        "word_embed_proj_dim": c.embed_dim, "do_layer_norm_before": c.do_layer_norm_before,
        "_remove_final_layer_norm": c.do_layer_norm_before and not c.final_layer_norm,
        "layer_norm_elementwise_affine": c.layer_norm_affine, "activation_function": c.activation,
        "enable_bias": c.bias, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id, "eos_token_id": hf_eos(c.eos_token_ids),
    }


def _layer_norm(dim: int, cfg: OPTConfig, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-5, use_bias=cfg.layer_norm_affine, use_scale=cfg.layer_norm_affine,
                         dtype=dtype, param_dtype=dtype, rngs=rngs)


class OPTAttention(nnx.Module):
    def __init__(self, cfg: OPTConfig, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.q_proj = linear(h, h, cfg.bias, dtype, rngs)
        self.k_proj = linear(h, h, cfg.bias, dtype, rngs)
        self.v_proj = linear(h, h, cfg.bias, dtype, rngs)
        self.out_proj = linear(h, h, cfg.bias, dtype, rngs)
        self.cfg = cfg

    def __call__(self, x, cache, layer, tree_mask, prefill, attn_impl):
        cfg = self.cfg
        b, t, _ = x.shape
        shape = (b, t, cfg.num_heads, cfg.head_dim)
        q, k, v = self.q_proj(x).reshape(shape), self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
        o, cache = cached_attention(q, k, v, cache, layer, tree_mask, prefill, attn_impl)
        return self.out_proj(o.reshape(b, t, cfg.hidden_size)), cache


class OPTDecoderLayer(nnx.Module):
    def __init__(self, cfg: OPTConfig, dtype, rngs: nnx.Rngs):
        self.self_attn = OPTAttention(cfg, dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(cfg.hidden_size, cfg, dtype, rngs)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, cfg.bias, dtype, rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, cfg.bias, dtype, rngs)
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

    def __init__(self, cfg: OPTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
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
                 *, prefill: bool = False, attn_impl: str | None = None,
                 remat: bool = False) -> tuple[jax.Array, KVCache | None]:
        """As DecoderLM.__call__; returns the LM head's input [B, T, embed_dim]."""
        x = self.embed_tokens(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        if remat and cache is None:
            for layer in self.layers:
                x = checkpointed(layer, lambda m, x: m(x, None, 0, None, False, attn_impl)[0], x)
        else:
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


def opt_param_table(cfg: OPTConfig) -> list[ParamEntry]:
    h, e, f = cfg.hidden_size, cfg.embed_dim, cfg.intermediate_size
    d = "model.decoder"
    table = [ParamEntry(f"{d}.embed_tokens.weight", ("embed_tokens", "embedding"), (cfg.vocab_size, e)),
             ParamEntry(f"{d}.embed_positions.weight", ("embed_positions", "embedding"),
                        (cfg.max_position_embeddings + 2, h))]

    def linear(hf: str, path: tuple, out_dim: int, in_dim: int, bias: bool) -> None:
        table.extend(linear_entries(hf, path, out_dim, in_dim, bias))

    def norm(hf: str, path: tuple) -> None:
        if cfg.layer_norm_affine:
            table.append(ParamEntry(f"{hf}.weight", path + ("scale",), (h,)))
            table.append(ParamEntry(f"{hf}.bias", path + ("bias",), (h,)))

    if cfg.word_embed_proj_dim is not None:
        linear(f"{d}.project_in", ("project_in",), h, e, False)
        linear(f"{d}.project_out", ("project_out",), e, h, False)
    for n in range(cfg.num_layers):
        p, hp = ("layers", n), f"{d}.layers.{n}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{hp}.self_attn.{name}", p + ("self_attn", name), h, h, cfg.bias)
        norm(f"{hp}.self_attn_layer_norm", p + ("self_attn_layer_norm",))
        linear(f"{hp}.fc1", p + ("fc1",), f, h, cfg.bias)
        linear(f"{hp}.fc2", p + ("fc2",), h, f, cfg.bias)
        norm(f"{hp}.final_layer_norm", p + ("final_layer_norm",))
    if cfg.final_layer_norm:
        norm(f"{d}.final_layer_norm", ("final_layer_norm",))
    if not cfg.tie_word_embeddings:
        table.append(ParamEntry("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, e), transpose=True))
    return table


def normalize_key(key: str) -> str:
    """OPT checkpoints saved from OPTModel (the released facebook/opt-* files among them) lack `model.`."""
    return "model." + key if key.startswith("decoder.") else key


FAMILY = Family("opt", ARCHITECTURES, from_hf, to_hf, OPTForCausalLM, opt_param_table, normalize_key)
