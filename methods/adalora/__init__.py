"""peft-core's AdaLoRA method plugin (import name ``peft_adalora``): PEFT's ``AdaLoraConfig`` and files."""

from __future__ import annotations

from .config import AdaLoraConfig
from .layers import AdaLoraLayer

__all__ = ["AdaLoraConfig", "AdaLoraLayer"]
