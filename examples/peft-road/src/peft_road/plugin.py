"""The RoAd method plugin: the hook implementations that connect :class:`RoadLayer` to peft-core.

Published in the ``peft_core.methods`` entry-point group as ``road = "peft_road.plugin:plugin"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import DISK_MODEL_PREFIX, MODEL_PREFIX, disk_to_model_key, model_to_disk_key
from peft_core.runtime import AdapterRuntime
from peft_core.targeting import DEFAULT_ATTENTION_TARGETS, find_targets
from torch import nn

from .config import RoadConfig
from .layer import RoadLayer

__all__ = ["RoadPlugin", "plugin"]

# in the model: base_model.<path>.road_theta.<adapter>; on disk: base_model.model.<path>.road_theta
_MODEL_KEY = re.compile(r"\.(road_theta|road_alpha)\.([^.]+)$")
_DISK_KEY = re.compile(r"\.(road_theta|road_alpha)$")


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, RoadLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoadLayer) and adapter_name in m.road_theta]


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


class RoadPlugin:
    """RoAd (Liao et al., 2024) on ``nn.Linear`` layers."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="ROAD", config_cls=RoadConfig, task_types=list(TaskType), mergeable=True,
                           summary="RoAd: learned 2-D rotations (with scales) of pairs of layer outputs")]

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: RoadConfig, runtime: AdapterRuntime) -> list[str]:
        targets = find_targets(model, config.target_modules, adaptable=_adaptable,
                               modules_to_save=config.modules_to_save, default_targets=DEFAULT_ATTENTION_TARGETS,
                               method="peft-road")
        # Build and check every layer before putting any into the model: a target of an unsupported type
        # or size raises here, with the model untouched.
        layers: dict[str, RoadLayer] = {}
        for path in targets:
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, RoadLayer) else RoadLayer(module, runtime, path)
            layers[path].check_add(config.variant, config.group_size)
        for path, layer in layers.items():
            layer.add(adapter_name, config.variant, config.group_size, config.init_weights)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return targets

    @hookimpl
    def state_dict_filter(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = _MODEL_KEY.search(key)
            if key.startswith(MODEL_PREFIX) and m is not None and m.group(2) == adapter_name:
                out[model_to_disk_key(f"{key[: m.start()]}.{m.group(1)}")] = value
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith(DISK_MODEL_PREFIX) and _DISK_KEY.search(key):
                out[f"{disk_to_model_key(key)}.{adapter_name}"] = value
            else:
                out[key] = value  # not ours: passed through so the core reports it as unexpected
        return out

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, safe: bool) -> bool:
        layers = _layers(model, adapter_name)
        if safe:  # check every layer before changing any
            for _, layer in layers:
                layer.check_merge(adapter_name)
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
            if not layer.road_theta:  # no adapter left: put the original module back
                model.set_submodule(path, layer.base_layer)
        return True


plugin = RoadPlugin()
