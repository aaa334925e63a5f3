"""Which modules a LoraConfig adapts: peft-core's shared targeting rules (:mod:`peft_core.targeting`) with
LoRA's layer kinds, and per-module rank/alpha patterns."""

from __future__ import annotations

from peft_core.targeting import DEFAULT_ATTENTION_TARGETS, pattern_value
from peft_core.targeting import find_targets as _find
from torch import nn

from .config import LoraConfig

__all__ = ["DEFAULT_TARGETS", "find_targets", "rank_and_alpha"]

#: target_modules=None: the attention projections each architecture family adapts by default.
DEFAULT_TARGETS = DEFAULT_ATTENTION_TARGETS


def _adaptable(module: nn.Module) -> bool:
    from .layers import supported_base

    return supported_base(module) is not None


def _linear(module: nn.Module) -> bool:
    from .layers import supported_base

    return supported_base(module) in ("linear", "conv1d")


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules to adapt, in model order; TargetError naming the model's layer names if none."""
    return _find(model, config.target_modules, adaptable=_adaptable, linear=_linear,
                 exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                 layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save,
                 default_targets=DEFAULT_TARGETS, method="peft-core's LoRA")


def rank_and_alpha(config: LoraConfig, name: str) -> tuple[int, float]:
    """(r, alpha) for the module at ``name``: the first matching rank_pattern/alpha_pattern, else the
    config's r and lora_alpha."""
    r = pattern_value(config.rank_pattern, name)
    alpha = pattern_value(config.alpha_pattern, name)
    return int(r if r is not None else config.r), float(alpha if alpha is not None else config.lora_alpha)
