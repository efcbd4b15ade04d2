"""Qwen family: Qwen2 (and Qwen2.5, which ships as Qwen2ForCausalLM) and Qwen3, on the shared decoder.

Qwen2: biases on q, k and v but not o; GQA; tied or untied embeddings. Qwen3: an RMSNorm over each head
of q and k (qk-norm) before RoPE, an explicit head_dim that may differ from hidden / heads, and
`attention_bias` (default off) on q, k, v and o alike. Keys are transformers' Llama spellings plus
`self_attn.q_norm` / `k_norm`. Sliding-window attention is off in every released config
(`use_sliding_window: false`); a config that turns it on caps max_len at the window, as for Mistral.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import Family, read_rope
from .decoder import DecoderConfig, DecoderLM, decoder_fields, decoder_hf_fields, decoder_param_table

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _sliding_window(d: Mapping[str, Any], layers: int) -> int | None:
    """The window when some layer really slides (transformers: layers from max_window_layers on, or the ones
    layer_types names), else None."""
    if not d.get("use_sliding_window", False) or not d.get("sliding_window"):
        return None
    types = d.get("layer_types")
    sliding = ("sliding_attention" in types) if types else int(d.get("max_window_layers", layers)) < layers
    return int(d["sliding_window"]) if sliding else None


def from_hf(arch: str, d: Mapping[str, Any]) -> DecoderConfig:
    fields = decoder_fields(d)
    qwen3 = arch == "Qwen3ForCausalLM"
    bias = bool(d.get("attention_bias", False))
    return DecoderConfig(architecture=arch, **fields, rope=read_rope(d, fields["max_position_embeddings"]),
                         qkv_bias=bias if qwen3 else True, o_bias=bias if qwen3 else False, qk_norm=qwen3,
                         sliding_window=_sliding_window(d, fields["num_layers"]))


def to_hf(c: DecoderConfig) -> dict[str, Any]:
    d = decoder_hf_fields(c, ARCHITECTURES[c.architecture])
    if c.architecture == "Qwen3ForCausalLM":
        d["attention_bias"] = c.qkv_bias
    d.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
             max_window_layers=0 if c.sliding_window is not None else c.num_layers)
    return d


FAMILY = Family("qwen", ARCHITECTURES, from_hf, to_hf, DecoderLM, decoder_param_table)
