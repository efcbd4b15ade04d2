"""Which model class a config builds: the one place that maps an architecture family to its code."""

from __future__ import annotations

from flax import nnx

from .config import ModelConfig
from .model import LlamaForCausalLM
from .opt import OPTForCausalLM

CausalLM = LlamaForCausalLM | OPTForCausalLM


def model_class(cfg: ModelConfig) -> type:
    return OPTForCausalLM if cfg.family == "opt" else LlamaForCausalLM


def create_lm(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs | None = None) -> CausalLM:
    """A randomly initialised model of the config's architecture."""
    return model_class(cfg)(cfg, dtype=dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))


def abstract_lm(cfg: ModelConfig, dtype) -> CausalLM:
    """The model's structure and shapes without allocating it (for graphdefs and loading)."""
    return nnx.eval_shape(lambda: create_lm(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
