"""peft_prompt_tuning: prompt tuning for peft-core, a method plugin (entry point ``peft_core.methods:
prompt_tuning``)."""

from .config import PromptTuningConfig, PromptTuningInit
from .embedding import PromptEmbedding
from .plugin import PromptTuningPlugin, attach_prompt, plugin

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit", "PromptTuningPlugin", "attach_prompt", "plugin"]
