"""Training Medusa heads (jaxmedusa.train): Medusa-1 (heads on a frozen base), Medusa-2 (joint), LM
pretraining; ShareGPT-style data, sharding over a device mesh, Orbax checkpoints with exact resume."""

from .config import LoRAConfig, MeshConfig, TrainConfig, TrainConfigError, config_from_dict, load_config
from .data import ChatRenderer, DataError, Message, load_conversations, save_conversations, tokenize
from .trainer import Trainer, TrainResult, train

__all__ = ["LoRAConfig", "MeshConfig", "TrainConfig", "TrainConfigError", "config_from_dict", "load_config", "ChatRenderer",
           "DataError", "Message", "load_conversations", "save_conversations", "tokenize", "Trainer",
           "TrainResult", "train"]
