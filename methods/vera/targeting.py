"""Which modules a VeRA adapter adapts: Hugging Face PEFT 0.21's rules (its VeRA defaults are LoRA's table),
restricted to the layer types its VeRA supports."""

from __future__ import annotations

from peft_core.errors import TargetError
from peft_core.layers import is_adapter_layer
from peft_core.targeting import DEFAULT_ATTENTION_TARGETS
from peft_core.targeting import find_targets as _find_targets
from torch import nn

from .config import VeraConfig
from .layer import VeraLayer, layer_kind

__all__ = ["find_targets"]


def _adaptable(module: nn.Module) -> bool:
    return layer_kind(module) is not None


def find_targets(model: nn.Module, config: VeraConfig) -> list[str]:
    """The paths to adapt, by PEFT's targeting rules; TargetError for none, or for one of another type."""
    paths = _find_targets(model, config.target_modules, adaptable=_adaptable,
                          layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                          modules_to_save=config.modules_to_save, default_targets=DEFAULT_ATTENTION_TARGETS,
                          method="VeRA")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, VeraLayer):
            continue
        if is_adapter_layer(module):
            raise TargetError(f"VeRA target {path!r} is already adapted by another method's layer "
                              f"({type(module).__name__}); VeRA adapts plain layers only: narrow target_modules")
        if layer_kind(module) is None:
            raise TargetError(f"VeRA target {path!r} is a {type(module).__name__}; VeRA adapts torch.nn.Linear and "
                              "transformers' Conv1D only (as Hugging Face PEFT). Narrow target_modules so that it "
                              "does not match this module")
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            raise TargetError(f"VeRA target {path!r} ({type(module).__name__}) has a {getattr(weight, 'dtype', None)} "
                              "weight; this plugin adapts layers with floating-point weights only (quantized layers "
                              "are not supported)")
    return paths
