"""The LN-tuning method plugin: the hook implementations that connect ``LNTuningLayer`` to peft-core."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import DISK_MODEL_PREFIX, MODEL_PREFIX, disk_to_model_key, model_to_disk_key
from peft_core.layers import remove_adapter
from peft_core.merging import unmerge_all
from peft_core.runtime import AdapterRuntime
from torch import nn

from .config import LNTuningConfig
from .layer import LNTuningLayer
from .targeting import DEFAULT_TARGETS, find_targets

__all__ = ["LNTuningPlugin", "plugin"]

_ATTR = ".ln_tuning_layers."
_MODEL_KEY = re.compile(r"\.ln_tuning_layers\.([^.]+)\.")  # adapter names never contain "."


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LNTuningLayer]]:
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, LNTuningLayer) and adapter_name in m.ln_tuning_layers]


class LNTuningPlugin:
    """LN tuning: each adapter trains its own copy of the targeted LayerNorm/RMSNorm layers."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="LN_TUNING", config_cls=LNTuningConfig, task_types=list(TaskType), mergeable=True,
                           summary="LayerNorm tuning: each adapter trains its own copy of the targeted norm layers")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: LNTuningConfig) -> LNTuningConfig | None:
        """``target_modules=None`` becomes the architecture's default names, as PEFT writes them."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in DEFAULT_TARGETS:
            return config.replace(target_modules=DEFAULT_TARGETS[model_type])
        return None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: LNTuningConfig,
               runtime: AdapterRuntime) -> list[str]:
        paths = find_targets(model, config)
        layers: dict[str, LNTuningLayer] = {}
        for path in paths:  # build every layer first: a failure leaves the model as it was
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, LNTuningLayer) else LNTuningLayer(module, runtime, path)
        for path, layer in layers.items():
            layer.add(adapter_name)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return paths

    @hookimpl
    def state_dict_filter(self, adapter_name: str,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state_dict.items():
            m = _MODEL_KEY.search(key)
            if m is not None and m.group(1) == adapter_name and key.startswith(MODEL_PREFIX):
                out[model_to_disk_key(key[: m.start()] + _ATTR + key[m.end():])] = value
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state_dict.items():
            if key.startswith(DISK_MODEL_PREFIX) and _ATTR in key:
                out[disk_to_model_key(key).replace(_ATTR, f"{_ATTR}{adapter_name}.", 1)] = value
            else:
                out[key] = value  # not an LN-tuning key: the core reports it as unexpected
        return out

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, safe: bool) -> bool:
        layers = _layers(model, adapter_name)
        for _, layer in layers:  # every layer is checked before any changes (one merge per layer, finiteness)
            if layer.merged_adapters and adapter_name not in layer.merged_adapters:
                layer.merge(adapter_name)  # raises the MergeError naming the merged adapter
            if safe:
                layer.check_merge(adapter_name)
        for _, layer in layers:
            layer.merge(adapter_name)
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        unmerge_all(_layers(model, adapter_name), adapter_name)
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        remove_adapter(model, _layers(model, adapter_name), adapter_name, lambda layer: bool(layer.ln_tuning_layers))
        return True


plugin = LNTuningPlugin()
