"""Llama family (Llama 1/2/3, Vicuna, Mistral, Zephyr): config.json mapping and checkpoint table.

Both config.json dialects are read: the classic one (`rope_theta` + `rope_scaling`) and transformers 5's
(`rope_parameters`). Llama's `attention_bias` puts biases on q, k, v and o alike.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import Family, eos_tuple, hf_eos, hf_rope, read_rope, required, silu_act
from .decoder import DecoderConfig, DecoderLM, decoder_param_table

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

LlamaForCausalLM = DecoderLM  # the Llama family's model class (the shared decoder)


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


def from_hf(arch: str, d: Mapping[str, Any]) -> DecoderConfig:
    fields = decoder_fields(d)
    bias = bool(d.get("attention_bias", False))
    sliding = d.get("sliding_window") if arch == "MistralForCausalLM" else None
    return DecoderConfig(architecture=arch, **fields, rope=read_rope(d, fields["max_position_embeddings"]),
                         qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)),
                         sliding_window=int(sliding) if sliding else None)


def to_hf(c: DecoderConfig) -> dict[str, Any]:
    d = decoder_hf_fields(c, ARCHITECTURES[c.architecture])
    d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    if c.architecture == "MistralForCausalLM":
        d["sliding_window"] = c.sliding_window
    return d


FAMILY = Family("llama", ARCHITECTURES, from_hf, to_hf, DecoderLM, decoder_param_table)
