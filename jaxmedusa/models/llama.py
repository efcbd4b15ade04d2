"""Llama family (Llama 1/2/3, Vicuna, Mistral, Zephyr): config.json mapping and checkpoint table.

Both config.json dialects are read: the classic one (`rope_theta` + `rope_scaling`) and transformers 5's
(`rope_parameters`). Llama's `attention_bias` puts biases on q, k, v and o alike.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import Family, read_rope
from .decoder import DecoderConfig, DecoderLM, decoder_fields, decoder_hf_fields, decoder_param_table

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

LlamaForCausalLM = DecoderLM  # the Llama family's model class (the shared decoder)


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
