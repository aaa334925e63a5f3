"""peft_prefix: prefix tuning for peft-core, a method plugin (entry point ``peft_core.methods:
prefix_tuning``)."""

from .config import PrefixTuningConfig
from .encoder import PrefixEncoder
from .plugin import PrefixTuningPlugin, plugin

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "PrefixTuningPlugin", "plugin"]
