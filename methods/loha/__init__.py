"""LoHa for peft-core (built in): the weight update of Linear and Conv layers is the Hadamard product of two
low-rank products (FedPara / LyCORIS), reading and writing Hugging Face PEFT's LOHA adapters."""

from .config import LoHaConfig
from .layer import LoHaLayer
from .plugin import plugin

__all__ = ["LoHaConfig", "LoHaLayer", "plugin"]
