"""(IA)^3 for peft-core (built in): learned vectors rescale the activations of chosen layers (Liu et al., 2022),
reading and writing Hugging Face PEFT's IA3 adapters."""

from .config import IA3Config
from .layer import IA3Layer
from .plugin import plugin

__all__ = ["IA3Config", "IA3Layer", "plugin"]
