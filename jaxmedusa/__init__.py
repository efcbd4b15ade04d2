"""jaxmedusa: Medusa speculative decoding for LLMs in pure JAX."""

from .cache import KVCache
from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .generate import GenerationResult, generate
from .loading import Model, load, save
from .model import LlamaForCausalLM

__version__ = "0.1.0"

__all__ = ["KVCache", "CheckpointError", "ConfigError", "ModelConfig", "GenerationResult", "generate", "Model",
           "load", "save", "LlamaForCausalLM", "__version__"]
