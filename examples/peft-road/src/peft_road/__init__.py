"""peft_road: RoAd for peft-core, an out-of-tree method plugin (entry point ``peft_core.methods: road``).

Importing this package is never needed to use the method: peft-core finds it through its entry point,
and ``peft_core.RoadConfig`` resolves to :class:`RoadConfig` once it is installed.
"""

from .config import RoadConfig
from .layer import RoadLayer
from .plugin import RoadPlugin, plugin

__all__ = ["RoadConfig", "RoadLayer", "RoadPlugin", "plugin"]
__version__ = "0.1.0"
