"""The LoHa method plugin: the hook implementations that connect :class:`LoHaLayer` to peft-core.

Published in the ``peft_core.methods`` entry-point group as ``loha = "peft_loha.plugin:plugin"``. Files are
PEFT's: ``base_model.model.<path>.hada_w1_a`` ... ``hada_t2`` (``ParameterDict`` tensors, no ``.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import adapter_keys_from_disk, adapter_keys_to_disk
from peft_core.errors import TargetError
from peft_core.layers import is_adapter_layer, remove_adapter
from peft_core.merging import merge_all_or_nothing, unmerge_all
from peft_core.runtime import AdapterRuntime
from peft_core.targeting import DEFAULT_ATTENTION_TARGETS, find_targets
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoHaConfig
from .layer import TENSOR_NAMES, LoHaLayer, layer_kind

__all__ = ["LoHaPlugin", "layers_of", "plugin", "targets_of"]


def layers_of(model: nn.Module, adapter_name: str) -> list[tuple[str, LoHaLayer]]:
    """``(path, layer)`` of every LoHa layer holding ``adapter_name``, in model order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoHaLayer) and adapter_name in m.hada_w1_a]


def _adaptable(module: nn.Module) -> bool:
    return layer_kind(module) is not None


def _linear(module: nn.Module) -> bool:
    # PEFT's "all-linear" selects transformers' Conv1D too (and then refuses it for LoHa): so do we, so that a
    # GPT-2 model fails with a message naming the layer type instead of silently adapting nothing
    return isinstance(module, (nn.Linear, Conv1D))


def targets_of(model: nn.Module, config: LoHaConfig) -> list[str]:
    """The paths to adapt, by PEFT's targeting rules (its LoHa defaults are LoRA's table); TargetError for none,
    or for a target of a type LoHa cannot adapt, naming it and the fix."""
    paths = find_targets(model, config.target_modules, adaptable=_adaptable, linear=_linear,
                         exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                         layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save,
                         default_targets=DEFAULT_ATTENTION_TARGETS, method="LoHa")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoHaLayer):
            continue
        kind = f"{type(module).__module__}.{type(module).__name__}"
        if is_adapter_layer(module):
            raise TargetError(f"LoHa target {path!r} is already adapted by another method's layer "
                              f"({type(module).__name__}); LoHa adapts plain layers only: exclude it with "
                              "exclude_modules or target other modules")
        if isinstance(module, Conv1D):
            raise TargetError(f"LoHa target {path!r} is a {kind} (GPT-2's transposed linear layer), which LoHa "
                              "cannot adapt: Hugging Face PEFT's LoHa supports torch.nn.Linear, torch.nn.Conv1d and "
                              "torch.nn.Conv2d only, and refuses it too. Use LoRA or IA3 for such models, or "
                              "exclude it with exclude_modules")
        if layer_kind(module) is None:
            raise TargetError(f"LoHa target {path!r} is a {kind}; LoHa adapts torch.nn.Linear, torch.nn.Conv1d and "
                              "torch.nn.Conv2d (as Hugging Face PEFT). Narrow target_modules or add it to "
                              "exclude_modules")
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            raise TargetError(f"LoHa target {path!r} ({type(module).__name__}) has a {getattr(weight, 'dtype', None)} "
                              "weight; LoHa adapts layers with floating-point weights only (quantized layers are not "
                              "supported)")
    return paths


class LoHaPlugin:
    """LoHa (LyCORIS): a Hadamard product of two low-rank products as the weight update of Linear/Conv layers."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="LOHA", config_cls=LoHaConfig, task_types=list(TaskType), mergeable=True,
                           summary="LoHa: the weight update is the Hadamard product of two low-rank products "
                                   "(LyCORIS)")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: LoHaConfig) -> LoHaConfig | None:
        # PEFT writes the architecture's default names into the file when target_modules was None; so do we
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in DEFAULT_ATTENTION_TARGETS:
            return config.replace(target_modules=tuple(DEFAULT_ATTENTION_TARGETS[model_type]))
        return None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: LoHaConfig, runtime: AdapterRuntime) -> list[str]:
        paths = targets_of(model, config)
        layers: dict[str, LoHaLayer] = {}
        for path in paths:  # every layer is built before any is put in: a failure leaves the model as it was
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, LoHaLayer) else LoHaLayer(module, runtime, path)
        for path, layer in layers.items():
            r, alpha = config.rank_and_alpha(path)
            layer.add(adapter_name, r, alpha, config.rank_dropout, config.module_dropout, config.init_weights,
                      config.use_effective_conv2d)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return paths

    @hookimpl
    def state_dict_filter(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_to_disk(state_dict, adapter_name, TENSOR_NAMES)

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_from_disk(state_dict, adapter_name, TENSOR_NAMES)

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, safe: bool) -> bool:
        layers = layers_of(model, adapter_name)
        merge_all_or_nothing(layers, adapter_name, safe,
                             check=lambda layer, name, path: layer.check_merge(name, path),
                             merge=lambda layer, name, path: layer.merge(name, safe=False, where=path))
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        unmerge_all(layers_of(model, adapter_name), adapter_name)
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        remove_adapter(model, layers_of(model, adapter_name), adapter_name, lambda layer: bool(layer.hada_w1_a))
        return True


plugin = LoHaPlugin()
