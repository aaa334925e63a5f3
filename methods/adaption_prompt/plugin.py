"""The adaption-prompt (LLaMA-Adapter) method plugin: the hooks that connect :class:`AdaptedAttention` to
peft-core.

Which modules are adapted follows Hugging Face PEFT: every module whose path ends with
``"." + target_modules``, in model order, and of those the last ``adapter_layers`` (the top of the stack).

State-dict keys are PEFT's: in the model ``base_model.<path>.adaption_prompt.<adapter>`` (and
``adaption_gate``), on disk ``base_model.model.<path>.adaption_prompt`` with the adapter name stripped, e.g.
``base_model.model.model.layers.1.self_attn.adaption_gate``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import adapter_keys_from_disk, adapter_keys_to_disk
from peft_core.errors import ConfigError, TargetError
from peft_core.runtime import AdapterRuntime
from torch import nn

from .architectures import architecture_of
from .config import AdaptionPromptConfig
from .layer import AdaptedAttention

__all__ = ["AdaptionPromptPlugin", "plugin"]

_PARAMS = ("adaption_prompt", "adaption_gate")


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdaptedAttention]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, AdaptedAttention) and adapter_name in m.adaption_prompt]


def _targets(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    """PEFT's rule: the paths ending in ``.<target_modules>``, the last ``adapter_layers`` of them."""
    suffix = f".{config.target_modules}"
    found = [name for name, _ in model.named_modules() if name.endswith(suffix)]
    assert config.adapter_layers is not None  # complete_config refused None
    if len(found) < config.adapter_layers:
        raise TargetError(f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} but "
                          f"{type(model).__name__} has {len(found)} modules named {config.target_modules!r}; "
                          f"use adapter_layers <= {len(found)}" if found else
                          f"no module of {type(model).__name__} is named {config.target_modules!r} "
                          "(target_modules is the attention sub-module's name); leave it unset for the default")
    # Model order is layer order for ModuleList stacks (all supported architectures).
    return found[-config.adapter_layers:]


class AdaptionPromptPlugin:
    """LLaMA-Adapter (Zhang et al., 2023): zero-gated learned prompts in the top attention layers."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="ADAPTION_PROMPT", config_cls=AdaptionPromptConfig,
                           task_types=[TaskType.CAUSAL_LM], mergeable=False,
                           summary="LLaMA-Adapter: zero-gated learned prompts attended by the top attention layers")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: AdaptionPromptConfig) -> AdaptionPromptConfig:
        for field, example in (("adapter_len", 10), ("adapter_layers", 30)):
            if getattr(config, field) is None:
                raise ConfigError(f"AdaptionPromptConfig.{field} is required to add the adapter; "
                                  f"set it, e.g. {field}={example}")
        _, arch = architecture_of(model)
        if config.target_modules is None:
            return config.replace(target_modules=arch.target_modules)
        return config

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: AdaptionPromptConfig,
               runtime: AdapterRuntime) -> list[str]:
        _, arch = architecture_of(model)
        targets = _targets(model, config)
        # Build every new layer before changing the model: a wrong target raises with the model untouched.
        layers: dict[str, AdaptedAttention] = {}
        for path in targets:
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, AdaptedAttention) else AdaptedAttention(
                module, runtime, arch, path)
        assert config.adapter_len is not None
        for path, layer in layers.items():
            layer.add(adapter_name, config.adapter_len)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return targets

    @hookimpl
    def state_dict_filter(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_to_disk(state_dict, adapter_name, _PARAMS)

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_from_disk(state_dict, adapter_name, _PARAMS)

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        for path, layer in _layers(model, adapter_name):
            layer.drop(adapter_name)
            if not layer.adaption_prompt:  # no adapter left: the original attention goes back
                model.set_submodule(path, layer.base_layer)
        return True


plugin = AdaptionPromptPlugin()
