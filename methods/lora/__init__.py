"""peft_lora: LoRA for peft-core, a method plugin (entry point ``peft_core.methods: lora``).

Public for extensions (plugins that teach LoRA new layer types through the ``lora_make_layer`` hook,
:mod:`peft_lora.hookspecs`): the layer classes below, to subclass.
"""

from .config import LoraConfig
from .layers import (
           ConvLoraLayer,
           LoraConv1d,
           LoraConv2d,
           LoraConv3d,
           LoraEmbedding,
           LoraLayer,
           LoraLinear,
           ModulePairLayer,
           new_parameter_kwargs,
)
from .plugin import LoraPlugin, plugin
from .variant import LoraVariant

__all__ = ["ConvLoraLayer", "LoraConfig", "LoraConv1d", "LoraConv2d", "LoraConv3d", "LoraEmbedding", "LoraLayer",
           "LoraLinear", "LoraPlugin", "LoraVariant", "ModulePairLayer", "new_parameter_kwargs", "plugin"]
