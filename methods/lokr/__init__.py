"""LoKr for peft-core (built in): a low-rank Kronecker product update of Linear and Conv weights (LyCORIS; Yeh et
al., 2023), reading and writing Hugging Face PEFT's LOKR adapters."""

from .config import LoKrConfig
from .layer import LoKrLayer, factorization
from .plugin import plugin

__all__ = ["LoKrConfig", "LoKrLayer", "factorization", "plugin"]
