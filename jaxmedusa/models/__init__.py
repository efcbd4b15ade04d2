"""Model families and the registry from config.json's `architectures` to them.

A family is one module (llama, qwen, glm, opt) holding its config.json mapping, its NNX module (the
pre-norm decoder in decoder.py, or its own) and its checkpoint table; adding a family is one module plus
its entry in FAMILIES. Everything outside this package goes through the functions here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx

from . import glm, llama, opt, qwen
from .config import ConfigError, Family, ModelConfig, RopeConfig
from .decoder import DecoderConfig, DecoderLM
from .opt import OPTConfig, OPTForCausalLM
from .params import ParamEntry

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen.FAMILY, glm.FAMILY, opt.FAMILY)
_BY_ARCH = {arch: f for f in FAMILIES for arch in f.architectures}
_BY_MODEL_TYPE = {mt: arch for f in FAMILIES for arch, mt in f.architectures.items()}
SUPPORTED_ARCHITECTURES = tuple(_BY_ARCH)

CausalLM = DecoderLM | OPTForCausalLM


def family_of(architecture: str) -> Family:
    """The family of a config's architecture name."""
    if architecture not in _BY_ARCH:
        raise ConfigError(f"unsupported architecture {architecture}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _BY_ARCH[architecture]


def family_for_hf(d: Mapping[str, Any]) -> tuple[Family, str]:
    """(family, architecture) of a config.json: its first supported `architectures` entry, else its model_type."""
    archs = d.get("architectures") or []
    for a in archs:
        if a in _BY_ARCH:
            return _BY_ARCH[a], a
    mt = d.get("model_type")
    if not archs and mt in _BY_MODEL_TYPE:
        return _BY_ARCH[_BY_MODEL_TYPE[mt]], _BY_MODEL_TYPE[mt]
    found = ", ".join(archs) if archs else f"model_type={mt!r}"
    raise ConfigError(f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def model_class(cfg: ModelConfig) -> type:
    return family_of(cfg.architecture).model_class


def create_lm(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs | None = None) -> CausalLM:
    """A randomly initialised model of the config's architecture."""
    return model_class(cfg)(cfg, dtype=dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))


def abstract_lm(cfg: ModelConfig, dtype) -> CausalLM:
    """The model's structure and shapes without allocating it (for graphdefs and loading)."""
    return nnx.eval_shape(lambda: create_lm(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def param_table(cfg: ModelConfig) -> list[ParamEntry]:
    """The checkpoint table of the config's family and checkpoint layout."""
    return family_of(cfg.architecture).param_table(cfg)


def normalize_key(cfg: ModelConfig, key: str) -> str:
    """A checkpoint key as the family's table spells it (e.g. OPT files saved without `model.`)."""
    norm = family_of(cfg.architecture).normalize_key
    return key if norm is None else norm(key)


def optional_keys(cfg: ModelConfig) -> set[str]:
    """Keys a checkpoint may carry beyond the table without being wrong (a tied LM head saved anyway)."""
    if not cfg.tie_word_embeddings:
        return set()
    untied = dataclasses.replace(cfg, tie_word_embeddings=False, num_layers=1)
    return {e.hf_key for e in param_table(untied) if e.path == ("lm_head", "kernel")}


__all__ = ["ConfigError", "Family", "ModelConfig", "RopeConfig", "DecoderConfig", "DecoderLM", "OPTConfig",
           "OPTForCausalLM", "ParamEntry", "FAMILIES", "SUPPORTED_ARCHITECTURES", "CausalLM", "family_of",
           "family_for_hf", "model_class", "create_lm", "abstract_lm", "param_table", "normalize_key",
           "optional_keys"]
