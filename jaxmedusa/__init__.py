"""jaxmedusa: Medusa speculative decoding for LLMs in pure JAX."""

from .cache import KVCache
from .checkpoint import CheckpointError
from .generate import GenerationResult, generate, stream
from .heads import MedusaHeads, quantize_heads
from .heads_io import load_heads, save_heads
from .loading import Model, load, save
from .models import SUPPORTED_ARCHITECTURES, ConfigError, DecoderLM, ModelConfig, OPTForCausalLM
from .models.llama import LlamaForCausalLM
from .tree import TreeError, build_tree, cartesian_tree, chain_tree, published_trees

__version__ = "0.1.0"

__all__ = ["KVCache", "CheckpointError", "ConfigError", "ModelConfig", "GenerationResult", "generate", "stream", "Model",
           "load", "save", "MedusaHeads", "quantize_heads", "load_heads", "save_heads", "TreeError", "build_tree",
           "cartesian_tree", "chain_tree", "published_trees", "DecoderLM", "LlamaForCausalLM", "OPTForCausalLM",
           "SUPPORTED_ARCHITECTURES", "__version__"]
