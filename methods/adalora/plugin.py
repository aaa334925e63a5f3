"""The AdaLoRA method plugin: hook implementations connecting :class:`AdaLoraLayer` and the rank allocator to
peft-core.

Published in the ``peft_core.methods`` entry-point group as ``adalora = "peft_adalora.plugin:plugin"``. Besides the
layer hooks it implements the two training-step hooks: ``training_loss_term`` (the orthogonality regulariser)
and ``on_optimizer_step`` (the rank schedule, which returns the config with its new ``rank_pattern``). PEFT's
``update_and_allocate(global_step)`` is offered as a model operation.

Files are PEFT's: ``base_model.model.<path>.lora_A`` / ``lora_E`` / ``lora_B`` (no ``ranknum``), and once the
schedule has set a ``rank_pattern``, only the kept ranks are written (A's rows, E's entries, B's columns). A
config with a ``rank_pattern`` builds its layers at the kept ranks, which is how such files load back.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import MODEL_PREFIX, adapter_keys_from_disk, model_to_disk_key
from peft_core.errors import AdapterError, ConfigError, TargetError
from peft_core.layers import remove_adapter
from peft_core.merging import merge_all_or_nothing, unmerge_all
from peft_core.runtime import AdapterRuntime
from peft_core.targeting import find_targets
from torch import nn

from . import allocator
from .config import AdaLoraConfig
from .layers import AdaLoraLayer, base_kind

__all__ = ["DEFAULT_TARGETS", "AdaLoraPlugin", "plugin", "update_and_allocate"]

#: target_modules=None: PEFT 0.21's AdaLoRA defaults per model_type (wider than LoRA's for T5, BART, OPT...).
DEFAULT_TARGETS: Mapping[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"), "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "gpt2": ("c_attn",),
    "bloom": ("query_key_value",), "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "v_proj"), "gpt_neox": ("query_key_value",), "gpt_neo": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"), "llama4": ("q_proj", "v_proj"), "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"), "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "gpt_bigcode": ("c_attn",), "deberta": ("in_proj",), "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}

# in the model: base_model.<path>.lora_X.<adapter>; on disk: base_model.model.<path>.lora_X
_MODEL_KEY = re.compile(r"\.(lora_A|lora_E|lora_B)\.([^.]+)$")
_TENSORS = ("lora_A", "lora_E", "lora_B")
_ONE_TRAINABLE = ("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode "
                  "to True for all adapters except the one you want to train.")


def layers_of(model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
    """``(path, layer)`` of every AdaLoRA layer holding ``adapter_name``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A]


def _adaptable(module: nn.Module) -> bool:
    return base_kind(module) is not None


def _targets(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    return find_targets(model, config.target_modules, adaptable=_adaptable, exclude_modules=config.exclude_modules,
                        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                        modules_to_save=config.modules_to_save, default_targets=DEFAULT_TARGETS,
                        method="peft-core's AdaLoRA")


def _trainable_elsewhere(model: nn.Module, adapter_name: str) -> str | None:
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            for name, trainable in module.trainable.items():
                if trainable and name != adapter_name:
                    return name
    return None


def _orthogonality(layers: list[tuple[str, AdaLoraLayer]], name: str) -> torch.Tensor | None:
    """mean over A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (PEFT's order of summation)."""
    total: Any = 0
    count = 0
    for _, layer in layers:
        for p, is_a in ((layer.lora_A[name], True), (layer.lora_B[name], False)):
            cov = p @ p.T if is_a else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return None if count == 0 else total / count


class AdaLoraPlugin:
    """AdaLoRA (Zhang et al., 2023) on ``nn.Linear`` and transformers ``Conv1D`` layers."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="ADALORA", config_cls=AdaLoraConfig, task_types=list(TaskType), mergeable=True,
                           summary="AdaLoRA: SVD-shaped LoRA whose rank budget is reallocated by importance "
                                   "during training",
                           # operations are looked up by name across every installed method, so AdaLoRA offers only
                           # its own name (LoRA's add_weighted_adapter refuses non-LoRA adapters itself)
                           operations={"update_and_allocate": update_and_allocate})]

    @hookimpl
    def complete_config(self, model: nn.Module, config: AdaLoraConfig) -> AdaLoraConfig | None:
        # PEFT writes what the adapter really targets: target_modules=None becomes the architecture's default
        # names, and fan_in_fan_out follows the layer type it meets (the last target decides, with a warning).
        # So do we, so that the two files say the same.
        changes: dict[str, Any] = {}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in DEFAULT_TARGETS:
            changes["target_modules"] = DEFAULT_TARGETS[model_type]
        try:
            targets = _targets(model, config.replace(**changes) if changes else config)
        except TargetError:
            targets = []  # inject reports it, with the model untouched
        kind = base_kind(model.get_submodule(targets[-1])) if targets else None
        transposed = kind == "conv1d"
        if kind is not None and transposed != config.fan_in_fan_out:
            layer_type = "Conv1D" if transposed else "torch.nn.Linear"
            warnings.warn(f"AdaLoraConfig.fan_in_fan_out={config.fan_in_fan_out} but the targets are {layer_type} "
                          f"layers; setting fan_in_fan_out={transposed}", UserWarning, stacklevel=2)
            changes["fan_in_fan_out"] = transposed
        return config.replace(**changes) if changes else None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig, runtime: AdapterRuntime) -> list[str]:
        if not config.inference_mode:
            other = _trainable_elsewhere(model, adapter_name)
            if other is not None:
                raise ConfigError(f"{_ONE_TRAINABLE} (adapter {other!r} is trainable already)")
        targets = _targets(model, config)
        # every new layer is built before any is put in: an unsupported target raises with the model untouched
        layers: dict[str, AdaLoraLayer] = {}
        for path in targets:
            module = model.get_submodule(path)
            layers[path] = module if isinstance(module, AdaLoraLayer) else AdaLoraLayer(module, runtime, path)
        if config.rank_pattern:
            known = {allocator.pattern_key(p) for p in targets}
            stray = [k for k in config.rank_pattern if k not in known and k.rsplit(".", 1)[0] not in known]
            if stray:
                raise ConfigError(f"AdaLoraConfig.rank_pattern names {stray[0]!r}, which is not a targeted layer "
                                  f"of {type(model).__name__}; the adapter was made for another model")
        for path, layer in layers.items():
            if config.fan_in_fan_out != layer.transposed:
                kind = "Conv1D" if layer.transposed else "torch.nn.Linear"
                warnings.warn(f"AdaLoraConfig.fan_in_fan_out={config.fan_in_fan_out} but {path} is a {kind}; using "
                              f"fan_in_fan_out={layer.transposed} for it", stacklevel=3)
            mask = allocator.rank_pattern_mask(config, path)
            rank = config.init_r if mask is None else sum(mask)
            layer.add(adapter_name, rank, config.init_r, config.lora_alpha, config.lora_dropout,
                      config.init_lora_weights, trainable=not config.inference_mode)
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return targets

    @hookimpl
    def state_dict_filter(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = _MODEL_KEY.search(key)
            if key.startswith(MODEL_PREFIX) and m is not None and m.group(2) == adapter_name:
                path = key[len(MODEL_PREFIX): m.start()]
                out[model_to_disk_key(key[: m.start()] + "." + m.group(1))] = _kept(config, path, m.group(1), value)
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return adapter_keys_from_disk(state_dict, adapter_name, _TENSORS)

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
        remove_adapter(model, layers_of(model, adapter_name), adapter_name, lambda layer: bool(layer.lora_A))
        return True

    @hookimpl
    def training_loss_term(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> torch.Tensor | None:
        if config.inference_mode:
            return None
        reg = _orthogonality(layers_of(model, adapter_name), adapter_name)
        return None if reg is None else config.orth_reg_weight * reg

    @hookimpl
    def on_optimizer_step(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig,
                          global_step: int) -> AdaLoraConfig | None:
        if config.inference_mode:
            return None
        return allocator.step(layers_of(model, adapter_name), adapter_name, config, global_step)


def _kept(config: AdaLoraConfig, path: str, kind: str, value: torch.Tensor) -> torch.Tensor:
    """The tensor cut to the ranks ``rank_pattern`` keeps (PEFT's saved shape); as it is when already cut."""
    mask = allocator.rank_pattern_mask(config, path)
    if mask is None:
        return value
    rows = value.shape[1] if kind == "lora_B" else value.shape[0]
    if rows != len(mask) or sum(mask) == rows:
        return value
    keep = torch.tensor(mask, dtype=torch.bool, device=value.device)
    return value[:, keep] if kind == "lora_B" else value[keep]


def update_and_allocate(model: Any, global_step: int) -> None:
    """PEFT's name for one step of AdaLoRA's schedule: ``model.update_and_allocate(step)`` after
    ``optimizer.step()`` and before ``optimizer.zero_grad()``. Runs the schedule of the trainable AdaLoRA adapter
    (``model.on_optimizer_step(step)`` runs it too, with every other method's step hook; call one of the two,
    and neither under :class:`~peft_core.integrations.transformers.AdapterTrainer`, which calls the latter)."""
    names = [n for n, c in model.peft_config.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
    if not names:
        raise AdapterError("update_and_allocate: the model has no trainable AdaLoRA adapter (load one with "
                           "is_trainable=True, or add one without inference_mode)")
    for name in names:
        config = model.peft_config[name]
        with torch.no_grad():
            updated = allocator.step(layers_of(model.base_model, name), name, config, global_step)
        if updated is not None:
            model.peft_config[name] = updated


plugin = AdaLoraPlugin()
