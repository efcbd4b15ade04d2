"""GLM family: transformers' GlmForCausalLM (model_type "glm": GLM-4-9B-hf, converted ChatGLM) and the
original THUDM ChatGLM2/ChatGLM3/GLM-4 checkpoint layout (model_type "chatglm"), on the shared decoder.

The math (transformers' modeling_glm.py and THUDM's modeling_chatglm.py agree): RoPE over the first half
of each head only, rotating interleaved pairs (x[2i], x[2i+1]); biases on q/k/v but not on o; a fused
gate_up SwiGLU MLP (gate's columns first); GQA/MQA. THUDM's files differ from the HF ones in these ways,
each mapped here:
- keys: `transformer.embedding.word_embeddings`, `transformer.encoder.layers.N.self_attention.
  query_key_value` (q, k, v rows stacked, as the model's fused qkv kernel), `self_attention.dense` (o),
  `mlp.dense_h_to_4h` / `dense_4h_to_h`, `transformer.encoder.final_layernorm`, `transformer.output_layer`;
- config: num_layers, padded_vocab_size, ffn_hidden_size, kv_channels (head_dim), multi_query_group_num
  (KV heads), layernorm_epsilon, seq_length, add_qkv_bias, add_bias_linear (o and MLP biases), and
  rope_ratio (RoPE base = 10000 * rope_ratio, as the THUDM code and vLLM's chatglm loader do), and
  original_rope=False (CogAgent) meaning split-halves rotation over the same half of each head;
- RMSNorm: THUDM scales in float32 before casting back, HF casts then scales (layers.RMSNorm), which
  differ only below float32.
THUDM options no released checkpoint turns on (LayerNorm instead of RMSNorm, post-norm residuals, no
final norm, per-head interleaved q/k/v without multi-query, quantized weights)
are refused by name. The THUDM tokenizer needs remote code, so such a directory loads without one.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import ConfigError, Family, RopeConfig, eos_tuple, hf_eos, read_rope, required, silu_act
from .decoder import DecoderConfig, DecoderKeys, DecoderLM, decoder_fields, decoder_hf_fields, decoder_param_table

CHATGLM_ARCHITECTURES = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
ARCHITECTURES = {"GlmForCausalLM": "glm", **{a: "chatglm" for a in CHATGLM_ARCHITECTURES}}

GLM_KEYS = DecoderKeys(gate_up=("mlp.gate_up_proj",))
CHATGLM_KEYS = DecoderKeys(
    embed="transformer.embedding.word_embeddings.weight", layer="transformer.encoder.layers.{n}",
    qkv=("self_attention.query_key_value",), o="self_attention.dense", gate_up=("mlp.dense_h_to_4h",),
    down="mlp.dense_4h_to_h", final_norm="transformer.encoder.final_layernorm.weight",
    lm_head="transformer.output_layer.weight")

# THUDM config fields whose other values the released code implements differently: (field, required value)
_CHATGLM_FIXED = (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False), ("post_layer_norm", True))


def _glm_from_hf(arch: str, d: Mapping[str, Any]) -> DecoderConfig:
    fields = decoder_fields(d)
    rope = read_rope(d, fields["max_position_embeddings"], partial_default=0.5, interleaved=True)
    return DecoderConfig(architecture=arch, **fields, rope=rope, qkv_bias=bool(d.get("attention_bias", True)))


def _chatglm_from_hf(arch: str, d: Mapping[str, Any]) -> DecoderConfig:
    for field, value in _CHATGLM_FIXED:
        if field in d and bool(d[field]) != value:
            raise ConfigError(f"ChatGLM config field {field}={d[field]!r} is not supported (only {value})")
    if d.get("quantization_bit"):
        raise ConfigError(f"ChatGLM config field quantization_bit={d['quantization_bit']!r}: quantized "
                          f"checkpoints are not supported; use the unquantized weights")
    if d.get("padded_vocab_size") is None and d.get("vocab_size") is not None:
        d = {**d, "padded_vocab_size": d["vocab_size"]}
    layers, vocab, hidden, heads, ffn = required(d, "num_layers", "padded_vocab_size", "hidden_size",
                                                 "num_attention_heads", "ffn_hidden_size")
    if not d.get("multi_query_attention", False):  # THUDM's default: per-head interleaved q/k/v rows
        raise ConfigError(f"ChatGLM config field multi_query_attention={d.get('multi_query_attention')!r} is not "
                          f"supported (only true, as every released checkpoint sets it)")
    if "multi_query_group_num" not in d:
        raise ConfigError("ChatGLM config lacks the required field 'multi_query_group_num'")
    silu_act(d, "hidden_act")  # absent in THUDM configs (SwiGLU is hard-coded there)
    bias = bool(d.get("add_bias_linear", False))
    max_pos = int(d.get("seq_length", 2048))
    return DecoderConfig(
        architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
        num_heads=heads, num_kv_heads=int(d["multi_query_group_num"]),
        head_dim=int(d.get("kv_channels") or hidden // heads), max_position_embeddings=max_pos,
        rms_norm_eps=float(d.get("layernorm_epsilon", 1e-5)),
        rope=RopeConfig(theta=10000.0 * float(d.get("rope_ratio", 1.0)), partial_rotary_factor=0.5,
                        interleaved=bool(d.get("original_rope", True)), original_max_position_embeddings=max_pos),
        qkv_bias=bool(d.get("add_qkv_bias", False)) or bias, o_bias=bias, mlp_bias=bias, norm_scale_in_float32=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_tuple(d.get("eos_token_id")), pad_token_id=d.get("pad_token_id"))


def from_hf(arch: str, d: Mapping[str, Any]) -> DecoderConfig:
    return _chatglm_from_hf(arch, d) if arch in CHATGLM_ARCHITECTURES else _glm_from_hf(arch, d)


def to_hf(c: DecoderConfig) -> dict[str, Any]:
    if c.architecture not in CHATGLM_ARCHITECTURES:
        return dict(decoder_hf_fields(c, "glm"), attention_bias=c.qkv_bias)
    if c.o_bias != c.mlp_bias or c.rope.partial_rotary_factor != 0.5 or c.rope.type != "default":
        raise ConfigError(f"this config has no THUDM ChatGLM spelling (o/MLP biases {c.o_bias}/{c.mlp_bias}, "
                          f"rope {c.rope})")
    return {
        "architectures": [c.architecture], "model_type": "chatglm", "num_layers": c.num_layers,
        "padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
        "kv_channels": c.head_dim, "num_attention_heads": c.num_heads, "multi_query_attention": True,
        "multi_query_group_num": c.num_kv_heads, "seq_length": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps, "rope_ratio": c.rope.theta / 10000.0, "add_qkv_bias": c.qkv_bias,
        "add_bias_linear": c.o_bias, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True, "original_rope": c.rope.interleaved, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": hf_eos(c.eos_token_ids), "pad_token_id": c.pad_token_id,
    }


def param_table(cfg: DecoderConfig) -> list:
    return decoder_param_table(cfg, CHATGLM_KEYS if cfg.architecture in CHATGLM_ARCHITECTURES else GLM_KEYS)


FAMILY = Family("glm", ARCHITECTURES, from_hf, to_hf, DecoderLM, param_table)
