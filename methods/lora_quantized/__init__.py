"""peft_lora_quantized: LoRA on quantized base models (QLoRA), an extension of the LoRA plugin.

Found through the ``peft_core.methods`` entry-point group (``lora_quantized``); it teaches LoRA
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` and torchao int8 ``nn.Linear`` layers through LoRA's published
``lora_make_layer`` hook, without any change to ``peft_lora``. Install the quantization library with
``pip install peft-core[bnb]`` (or ``[torchao]``).
"""

from .layers import LoraLinear4bit, LoraLinear8bitLt, LoraTorchaoLinear, QuantizedLoraLinear
from .plugin import QuantizedLoraPlugin, plugin

__all__ = ["LoraLinear4bit", "LoraLinear8bitLt", "LoraTorchaoLinear", "QuantizedLoraLinear", "QuantizedLoraPlugin",
           "plugin"]
