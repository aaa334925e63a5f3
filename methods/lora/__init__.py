"""peft_lora: LoRA for peft-core, a method plugin (entry point ``peft_core.methods: lora``)."""

from .config import LoraConfig
from .layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .plugin import LoraPlugin, plugin

__all__ = ["LoraConfig", "LoraConv2d", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraPlugin", "plugin"]
