"""peft_ia3: (IA)^3 for peft-core, an out-of-tree method plugin (entry point ``peft_core.methods: ia3``).

Importing this package is never needed to use the method: peft-core finds it through its entry point,
and ``peft_core.IA3Config`` resolves to :class:`IA3Config` once it is installed.
"""

from .config import IA3Config
from .layer import IA3Layer
from .plugin import IA3Plugin, plugin

__all__ = ["IA3Config", "IA3Layer", "IA3Plugin", "plugin"]
__version__ = "0.1.0"
