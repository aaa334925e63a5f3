"""peft_lora_variants: Hugging Face PEFT 0.21's newer LoRA variants (MiCA, KaSA, BD-LoRA, VeLoRA), an extension of
the LoRA plugin.

Found through the ``peft_core.methods`` entry-point group (``lora_variants``); it answers LoRA's published
``lora_variant`` hook for the adapters whose :class:`~peft_lora.LoraConfig` sets one of PEFT's variant fields
(``init_lora_weights="mica"``, ``kasa_config``, ``use_bdlora``, ``velora_config``), without any change to
``peft_lora``'s layers. :func:`kasa_loss` is KaSA's regulariser, to add to a training loss.
"""

from .bdlora import BdLora, BlockDiagonal
from .kasa import Kasa, kasa_loss
from .mica import Mica
from .plugin import LoraVariantsPlugin, plugin
from .velora import Velora

__all__ = ["BdLora", "BlockDiagonal", "Kasa", "LoraVariantsPlugin", "Mica", "Velora", "kasa_loss", "plugin"]
