"""peft_p_tuning: P-tuning for peft-core, a method plugin (entry point ``peft_core.methods: p_tuning``)."""

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .encoder import PromptEncoder
from .plugin import PTuningPlugin, plugin

__all__ = ["PTuningPlugin", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType", "plugin"]
