"""peft_adaption_prompt: LLaMA-Adapter (adaption prompts) for peft-core (entry point ``adaption_prompt``).

``peft_core.AdaptionPromptConfig`` resolves to :class:`AdaptionPromptConfig` through the registry.
"""

from .config import AdaptionPromptConfig
from .layer import AdaptedAttention
from .plugin import AdaptionPromptPlugin, plugin

__all__ = ["AdaptedAttention", "AdaptionPromptConfig", "AdaptionPromptPlugin", "plugin"]
