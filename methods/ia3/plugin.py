"""The (IA)^3 method plugin: the hook implementations that connect ``IA3Layer`` to peft-core."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import adapter_keys_from_disk, adapter_keys_to_disk
from peft_core.errors import TargetError
from peft_core.layers import remove_adapter
from peft_core.merging import merge_all_or_nothing, unmerge_all
from peft_core.runtime import AdapterRuntime
from torch import nn

from .config import IA3Config
from .layer import IA3Layer
from .operations import add_weighted_adapter
from .targeting import DEFAULT_TARGETS, find_targets, is_feedforward, layer_kind, resolve_feedforward

__all__ = ["IA3Plugin", "plugin"]


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, IA3Layer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, IA3Layer) and adapter_name in m.ia3_l]


class IA3Plugin:
    """(IA)^3: learned vectors rescale layer outputs (inputs of feed-forward layers)."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="IA3", config_cls=IA3Config, task_types=list(TaskType), mergeable=True,
                           summary="(IA)^3: learned vectors rescale layer outputs (inputs of feed-forward layers)",
                           operations={"add_weighted_adapter": add_weighted_adapter})]

    @hookimpl
    def complete_config(self, model: nn.Module, config: IA3Config) -> IA3Config | None:
        """Write what the adapter really does, as PEFT does: the default targets and feed-forward modules of the
        architecture, and ``fan_in_fan_out`` as the targets' layer type says (True for GPT-2's Conv1D)."""
        changes: dict[str, object] = {}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in DEFAULT_TARGETS:
            changes["target_modules"] = DEFAULT_TARGETS[model_type]
        draft = config.replace(**changes) if changes else config
        try:
            paths = find_targets(model, draft)
        except TargetError:
            return draft if changes else None  # inject reports it, with the model left untouched
        if config.feedforward_modules is None:
            changes["feedforward_modules"] = resolve_feedforward(model_type, draft.target_modules, paths)
        kinds = {layer_kind(model.get_submodule(p).base_layer if isinstance(model.get_submodule(p), IA3Layer)
                            else model.get_submodule(p)) for p in paths} & {"linear", "conv1d"}
        if len(kinds) == 1 and config.fan_in_fan_out != (kinds == {"conv1d"}):
            changes["fan_in_fan_out"] = kinds == {"conv1d"}  # PEFT corrects it the same way (with a warning)
        return config.replace(**changes) if changes else None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: IA3Config, runtime: AdapterRuntime) -> list[str]:
        paths = find_targets(model, config)
        layers: dict[str, IA3Layer] = {}
        for path in paths:  # build every layer first: a failure leaves the model as it was
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, IA3Layer) else IA3Layer(module, runtime, path)
        for path, layer in layers.items():
            layer.add(adapter_name, is_feedforward(path, config.feedforward_modules), config.init_ia3_weights)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return paths

    @hookimpl
    def state_dict_filter(self, adapter_name: str,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_to_disk(state_dict, adapter_name, ("ia3_l",))

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_from_disk(state_dict, adapter_name, ("ia3_l",))

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
        remove_adapter(model, _layers(model, adapter_name), adapter_name, lambda layer: bool(layer.ia3_l))
        return True


plugin = IA3Plugin()
