"""LayerNorm tuning for peft-core (built in): each adapter trains its own copy of the targeted norm layers
(Zhao et al., 2023), reading and writing Hugging Face PEFT's LN_TUNING adapters."""

from .config import LNTuningConfig
from .layer import LNTuningLayer
from .plugin import plugin

__all__ = ["LNTuningConfig", "LNTuningLayer", "plugin"]
