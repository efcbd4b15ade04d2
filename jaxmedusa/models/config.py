"""ModelConfig: the frozen, hashable description of a base model, and the helpers that read HF config.json.

ModelConfig holds what every family shares and what the cache, kernels, heads and memory planner read
(widths, head counts, positions, special tokens). Each family subclasses it with its own fields
(models/decoder.py: DecoderConfig; models/opt.py: OPTConfig) and maps config.json onto it in its own
module; `ModelConfig.from_hf_dict` picks the family from `architectures` through the registry
(models/__init__.py). Validation happens once, here or in the family's mapping, and names the field.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from ..atomic import read_json_object

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A config.json that jaxmedusa cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters.

    Default: HF's split-halves layout over the whole head. GLM/ChatGLM rotate only the first
    `partial_rotary_factor` of each head, in interleaved pairs (x[2i], x[2i+1]).
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    partial_rotary_factor: float = 1.0
    interleaved: bool = False

    def rotary_dim(self, head_dim: int) -> int:
        """How many leading dims of each head are rotated (as transformers: int(head_dim * factor))."""
        return int(head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What every family shares; a family's own fields live in its subclass."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    sliding_window: int | None = None  # attention limited to this many past tokens (max_len is capped by it)

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

    @property
    def family(self) -> str:
        """The registry name of the config's family ("llama", "opt", "qwen", "glm")."""
        from . import family_of

        return family_of(self.architecture).name

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings, of the final hidden states the LM head (and Medusa heads) read."""
        return self.hidden_size

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, >1 = GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """The config of a config.json's contents, built by the family its `architectures` name."""
        from . import family_for_hf

        family, arch = family_for_hf(d)
        return family.from_hf(arch, d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that from_hf_dict (and transformers, or the checkpoint's own code) read back."""
        from . import family_of

        return family_of(self.architecture).to_hf(self)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads config.json (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json at {path}")
        try:
            d = read_json_object(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls.from_hf_dict(d)


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family: how its config.json maps to a config, its NNX module and checkpoint table."""

    name: str
    architectures: Mapping[str, str]  # HF `architectures` name -> its model_type
    from_hf: Callable[[str, Mapping[str, Any]], ModelConfig]  # (architecture, config.json dict) -> config
    to_hf: Callable[[Any], dict[str, Any]]
    model_class: type
    param_table: Callable[[Any], list]  # config -> list[params.ParamEntry]
    normalize_key: Callable[[str], str] | None = None  # other spellings of a checkpoint key -> the table's


def eos_tuple(eos) -> tuple[int, ...]:
    """config.json's eos_token_id (int, list or null) as a tuple."""
    ids = eos if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return tuple(int(e) for e in ids)


def hf_eos(ids: tuple[int, ...]):
    """The inverse of eos_tuple: one id as an int, several as a list."""
    return list(ids) if len(ids) != 1 else ids[0]


def required(d: Mapping[str, Any], *names: str) -> tuple[int, ...]:
    """Integer fields config.json must have; the first missing one is named."""
    missing = [n for n in names if d.get(n) is None]
    if missing:
        raise ConfigError(f"config.json lacks the required field {missing[0]!r}")
    return tuple(int(d[n]) for n in names)


def read_rope(d: Mapping[str, Any], max_pos: int, *, theta_default: float = 10000.0,
              partial_default: float = 1.0, interleaved: bool = False) -> RopeConfig:
    """RoPE settings from `rope_parameters` (transformers 5) or top-level `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", theta_default)))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rtype!r} (rope_scaling/rope_parameters) is not supported; "
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rtype != "default" and "factor" not in merged:
        raise ConfigError(f"rope type {rtype!r} needs a 'factor' in rope_scaling/rope_parameters")
    partial = float(merged.get("partial_rotary_factor", d.get("partial_rotary_factor", partial_default)))
    if not 0.0 < partial <= 1.0:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {partial}")
    return RopeConfig(
        theta=theta,
        type=rtype,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))),
        partial_rotary_factor=partial,
        interleaved=interleaved,
    )


def hf_rope(rope: RopeConfig) -> dict[str, Any]:
    """config.json fields for `rope`, in both dialects (top-level rope_theta and rope_parameters)."""
    params: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type != "default":
        params["factor"] = rope.factor
    if rope.type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                      original_max_position_embeddings=rope.original_max_position_embeddings)
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_parameters": params}
    if rope.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = rope.partial_rotary_factor
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    return out


def silu_act(d: Mapping[str, Any], field: str = "hidden_act") -> None:
    """SwiGLU families accept only silu; anything else is named."""
    act = d.get(field, "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{field} {act!r} is not supported (this family's MLP is SwiGLU with 'silu')")
