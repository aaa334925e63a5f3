"""The LoKr method plugin: the hook implementations that connect ``LoKrLayer`` to peft-core."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import adapter_keys_from_disk, adapter_keys_to_disk
from peft_core.errors import TargetError
from peft_core.layers import is_adapter_layer, remove_adapter
from peft_core.merging import merge_all_or_nothing, unmerge_all
from peft_core.runtime import AdapterRuntime
from peft_core.targeting import DEFAULT_ATTENTION_TARGETS, find_targets, pattern_value
from torch import nn

from .config import LoKrConfig
from .layer import TENSOR_NAMES, LoKrLayer, layer_kind

__all__ = ["LoKrPlugin", "find_lokr_targets", "plugin"]


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoKrLayer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoKrLayer) and adapter_name in m.r]


def _adaptable(module: nn.Module) -> bool:
    return layer_kind(module) is not None


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def find_lokr_targets(model: nn.Module, config: LoKrConfig) -> list[str]:
    """The paths to adapt, by PEFT's targeting rules; TargetError (naming the module, its type and the fix) for
    none, or for a module LoKr cannot adapt, before anything is changed."""
    paths = find_targets(model, config.target_modules, adaptable=_adaptable, linear=_linear,
                         exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                         layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save,
                         default_targets=DEFAULT_ATTENTION_TARGETS, method="LoKr")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoKrLayer):
            continue
        if is_adapter_layer(module):
            raise TargetError(f"LoKr target {path!r} is already adapted by another method's layer "
                              f"({type(module).__name__}); LoKr adapts plain layers only: exclude it with "
                              "exclude_modules or target other modules")
        if layer_kind(module) is None:
            kind = f"{type(module).__module__}.{type(module).__name__}"
            extra = (" (GPT-2 style transposed linear layer; Hugging Face PEFT's LoKr refuses it too)"
                     if type(module).__name__ == "Conv1D" else "")
            raise TargetError(f"LoKr target {path!r} is a {kind}{extra}; LoKr adapts torch.nn.Linear, torch.nn.Conv1d "
                              "and torch.nn.Conv2d. Narrow target_modules or add the module to exclude_modules "
                              "(for GPT-2, use LoRA or IA3, which adapt Conv1D)")
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            raise TargetError(f"LoKr target {path!r} ({type(module).__name__}) has a {getattr(weight, 'dtype', None)} "
                              "weight; LoKr adapts layers with floating-point weights only (quantized layers are "
                              "not supported)")
        if getattr(module, "padding_mode", "zeros") != "zeros":
            # PEFT's update convolves with zero padding whatever the layer pads with: refused rather than wrong
            raise TargetError(f"LoKr target {path!r} pads with padding_mode={module.padding_mode!r}; LoKr's update "
                              "is a zero-padded convolution, so only padding_mode='zeros' is supported. Exclude it")
    return paths


class LoKrPlugin:
    """LoKr: a low-rank Kronecker product update of Linear / Conv1d / Conv2d weights."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="LOKR", config_cls=LoKrConfig, task_types=list(TaskType), mergeable=True,
                           summary="LoKr (LyCORIS): a low-rank Kronecker product update of Linear/Conv weights")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: LoKrConfig) -> LoKrConfig | None:
        """PEFT writes the architecture's default targets into the saved config: so does this."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in DEFAULT_ATTENTION_TARGETS:
            return config.replace(target_modules=tuple(DEFAULT_ATTENTION_TARGETS[model_type]))
        return None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: LoKrConfig, runtime: AdapterRuntime) -> list[str]:
        paths = find_lokr_targets(model, config)
        layers: dict[str, LoKrLayer] = {}
        for path in paths:  # every layer is built first: a failure leaves the model as it was
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, LoKrLayer) else LoKrLayer(module, runtime, path)
        for path, layer in layers.items():  # model order: a seeded init draws what PEFT draws
            r = pattern_value(config.rank_pattern, path)
            alpha = pattern_value(config.alpha_pattern, path)
            layer.add(adapter_name, int(config.r if r is None else r), config.alpha if alpha is None else alpha,
                      rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                      rank_dropout_scale=config.rank_dropout_scale, init_weights=config.init_weights,
                      decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                      use_effective_conv2d=config.use_effective_conv2d)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return paths

    @hookimpl
    def state_dict_filter(self, adapter_name: str,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_to_disk(state_dict, adapter_name, TENSOR_NAMES)

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_from_disk(state_dict, adapter_name, TENSOR_NAMES)

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, safe: bool) -> bool:
        layers = _layers(model, adapter_name)
        merge_all_or_nothing(layers, adapter_name, safe)
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        unmerge_all(_layers(model, adapter_name), adapter_name)
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        remove_adapter(model, _layers(model, adapter_name), adapter_name, lambda layer: bool(layer.r))
        return True


plugin = LoKrPlugin()
