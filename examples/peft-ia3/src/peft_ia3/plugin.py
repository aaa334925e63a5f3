"""The (IA)^3 method plugin: the hook implementations that connect :class:`IA3Layer` to peft-core.

Published in the ``peft_core.methods`` entry-point group as ``ia3 = "peft_ia3.plugin:plugin"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import DISK_MODEL_PREFIX, MODEL_PREFIX, disk_to_model_key, model_to_disk_key
from peft_core.runtime import AdapterRuntime
from torch import nn

from .config import IA3Config
from .layer import IA3Layer, warn_layout
from .targeting import feedforward_spec, find_targets, is_feedforward

__all__ = ["IA3Plugin", "plugin"]

# in the model: base_model.<path>.ia3_l.<adapter>; on disk: base_model.model.<path>.ia3_l
_MODEL_KEY = re.compile(r"\.ia3_l\.([^.]+)$")
_DISK_SUFFIX = ".ia3_l"


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, IA3Layer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer) and adapter_name in m.ia3_l]


class IA3Plugin:
    """(IA)^3 (Liu et al., 2022) on ``nn.Linear`` and transformers ``Conv1D`` layers."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="IA3", config_cls=IA3Config, task_types=list(TaskType), mergeable=True,
                           summary="(IA)^3: learned vectors rescale layer outputs (inputs of feed-forward layers)")]

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: IA3Config, runtime: AdapterRuntime) -> list[str]:
        targets = find_targets(model, config)
        feedforward = feedforward_spec(model, config)
        # Build every new layer before putting any into the model: a target of an unsupported type
        # raises here, with the model untouched (the core would roll back anyway; this keeps it cheap).
        layers: dict[str, IA3Layer] = {}
        for path in targets:
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, IA3Layer) else IA3Layer(module, runtime, path)
        for path, layer in layers.items():
            warn_layout(path, layer, config.fan_in_fan_out)
            layer.add(adapter_name, is_feedforward(path, feedforward), config.init_ia3_weights)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return targets

    @hookimpl
    def state_dict_filter(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = _MODEL_KEY.search(key)
            if key.startswith(MODEL_PREFIX) and m is not None and m.group(1) == adapter_name:
                out[model_to_disk_key(key[: m.start()] + _DISK_SUFFIX)] = value
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith(DISK_MODEL_PREFIX) and key.endswith(_DISK_SUFFIX):
                out[f"{disk_to_model_key(key)}.{adapter_name}"] = value
            else:
                out[key] = value  # not ours: passed through so the core reports it as unexpected
        return out

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, safe: bool) -> bool:
        layers = _layers(model, adapter_name)
        if safe:  # check every layer before changing any
            for path, layer in layers:
                layer.check_merge(adapter_name, path)
        for _, layer in layers:
            layer.merge(adapter_name)
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        for _, layer in _layers(model, adapter_name):
            layer.unmerge(adapter_name)
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        for path, layer in _layers(model, adapter_name):
            layer.drop(adapter_name)
            if not layer.ia3_l:  # no adapter left: put the original module back
                model.set_submodule(path, layer.base_layer)
        return True


plugin = IA3Plugin()
