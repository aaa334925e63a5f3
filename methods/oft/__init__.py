"""OFT for peft-core (built in): orthogonal fine-tuning rotates each targeted layer's input by a learned
block-diagonal orthogonal matrix (Qiu et al., 2023), reading and writing Hugging Face PEFT's OFT adapters."""

from .config import OFTConfig
from .layer import OFTLayer
from .plugin import plugin

__all__ = ["OFTConfig", "OFTLayer", "plugin"]
