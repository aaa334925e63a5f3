"""VeRA for peft-core (built in): frozen random projections shared by every adapted layer, scaled per layer by two
trained vectors (Kopiczko et al., 2024), reading and writing Hugging Face PEFT's VERA adapters."""

from .config import VeraConfig
from .layer import VeraLayer
from .plugin import plugin
from .projections import VeraProjections

__all__ = ["VeraConfig", "VeraLayer", "VeraProjections", "plugin"]
