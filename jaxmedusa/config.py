"""ModelConfig: the frozen, hashable description of a base model, built from a Hugging Face config.json.

Two families: Llama (Llama 1/2/3, Vicuna, Mistral, Zephyr: RMSNorm, RoPE, SwiGLU) and OPT (LayerNorm with
bias, learned positions, ReLU MLP, biases, optional project_in/out). For Llama both config.json dialects
are read: the classic one (`rope_theta` + `rope_scaling`) and transformers 5's (`rope_parameters`).
Validation happens here, once, and every error names the field at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "OPTForCausalLM")
_MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM"}
OPT_ACTIVATIONS = ("relu", "gelu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A config.json that jaxmedusa cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF's split-halves layout, no permutation of q/k weights)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about a Llama-family checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # OPT only
    word_embed_proj_dim: int | None = None  # token-embedding width when it differs from hidden (350m)
    do_layer_norm_before: bool = True  # pre-LN (all OPTs but 350m)
    final_layer_norm: bool = True
    layer_norm_affine: bool = True
    activation: str = "silu"
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})")
        if self.rope.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope.type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def family(self) -> str:
        """"opt" or "llama" (Llama and Mistral share one implementation)."""
        return "opt" if self.architecture == "OPTForCausalLM" else "llama"

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings, of the final hidden states the LM head (and Medusa heads) read."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, >1 = GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from the contents of an HF config.json."""
        arch = _architecture(d)
        if arch == "OPTForCausalLM":
            return _opt_from_hf(d)
        hidden, heads, layers, vocab, inter = _required(d, "intermediate_size")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported (Llama-family models use 'silu')")
        head_dim = d.get("head_dim") or hidden // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        sliding = d.get("sliding_window") if arch == "MistralForCausalLM" else None
        max_pos = int(d.get("max_position_embeddings", 2048))
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope(d, max_pos),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config.json dict that from_hf_dict (and transformers) read back as this config."""
        if self.family == "opt":
            return _opt_to_hf(self)
        model_type = {v: k for k, v in _MODEL_TYPE_TO_ARCH.items()}[self.architecture]
        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type != "default":
            rope["factor"] = self.rope.factor
        if self.rope.type == "llama3":
            rope.update(low_freq_factor=self.rope.low_freq_factor, high_freq_factor=self.rope.high_freq_factor,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        d: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta, "rope_parameters": rope, "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.architecture == "MistralForCausalLM":
            d["sliding_window"] = self.sliding_window
        return d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads config.json (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {path}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)


def _eos_tuple(eos) -> tuple[int, ...]:
    ids = eos if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return tuple(int(e) for e in ids)


def _required(d: Mapping[str, Any], mlp_field: str) -> tuple[int, int, int, int, int]:
    """(hidden, heads, layers, vocab, MLP width) from config.json; a missing field is named."""
    names = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", mlp_field)
    missing = [n for n in names if n not in d]
    if missing:
        raise ConfigError(f"config.json lacks the required field {missing[0]!r}")
    return tuple(int(d[n]) for n in names)  # type: ignore[return-value]


def _opt_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    hidden, heads, layers, vocab, ffn = _required(d, "ffn_dim")
    act = d.get("activation_function", "relu")
    if act not in OPT_ACTIVATIONS:
        raise ConfigError(f"activation_function {act!r} is not supported for OPT; supported: "
                          f"{', '.join(OPT_ACTIVATIONS)}")
    if hidden % heads:
        raise ConfigError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    proj = d.get("word_embed_proj_dim") or hidden
    pre_ln = bool(d.get("do_layer_norm_before", True))
    return ModelConfig(
        architecture="OPTForCausalLM", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)), rms_norm_eps=1e-5,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bool(d.get("enable_bias", True)), mlp_bias=bool(d.get("enable_bias", True)),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=_eos_tuple(d.get("eos_token_id")),
        word_embed_proj_dim=int(proj) if int(proj) != hidden else None, do_layer_norm_before=pre_ln,
        final_layer_norm=pre_ln and not d.get("_remove_final_layer_norm", False),
        layer_norm_affine=bool(d.get("layer_norm_elementwise_affine", True)), activation=act,
        pad_token_id=d.get("pad_token_id"))


def _opt_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "ffn_dim": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "max_position_embeddings": c.max_position_embeddings,
        "word_embed_proj_dim": c.embed_dim, "do_layer_norm_before": c.do_layer_norm_before,
        "_remove_final_layer_norm": c.do_layer_norm_before and not c.final_layer_norm,
        "layer_norm_elementwise_affine": c.layer_norm_affine, "activation_function": c.activation,
        "enable_bias": c.attention_bias, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) != 1 else c.eos_token_ids[0],
    }


def _architecture(d: Mapping[str, Any]) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    mt = d.get("model_type")
    if not archs and mt in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[mt]
    found = ", ".join(archs) if archs else f"model_type={mt!r}"
    raise ConfigError(f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope(d: Mapping[str, Any], max_pos: int) -> RopeConfig:
    """Reads RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rtype!r} (rope_scaling/rope_parameters) is not supported; "
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rtype != "default" and "factor" not in merged:
        raise ConfigError(f"rope type {rtype!r} needs a 'factor' in rope_scaling/rope_parameters")
    return RopeConfig(
        theta=theta,
        type=rtype,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))),
    )
