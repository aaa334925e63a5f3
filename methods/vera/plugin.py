"""The VeRA method plugin: the hook implementations that connect ``VeraLayer`` and the shared projections to
peft-core."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import (
    DISK_MODEL_PREFIX,
    MODEL_PREFIX,
    STORE_PREFIX,
    adapter_keys_from_disk,
    adapter_keys_to_disk,
    disk_to_model_key,
    model_to_disk_key,
)
from peft_core.errors import AdapterError, CheckpointError, TargetError
from peft_core.layers import remove_adapter
from peft_core.merging import merge_all_or_nothing, unmerge_all
from peft_core.runtime import AdapterRuntime
from peft_core.targeting import DEFAULT_ATTENTION_TARGETS
from torch import nn

from .config import VeraConfig
from .layer import VeraLayer, layer_kind
from .projections import VeraProjections, draw_projections
from .targeting import find_targets

__all__ = ["VeraPlugin", "plugin"]

_NAMES = ("vera_lambda_b", "vera_lambda_d")
#: PEFT's file keys of the projections (one adapter per file, so no adapter name in them)
DISK_A, DISK_B = "base_model.vera_A", "base_model.vera_B"


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, VeraLayer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, VeraLayer) and adapter_name in m.vera_lambda_d]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, VeraLayer) else module


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear or Conv1D target."""
    base = _base(module)
    if layer_kind(base) == "conv1d":
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    return int(base.in_features), int(base.out_features)


def _bias_key(key: str, adapter_name: str) -> str:
    """A trained bias's file key in the model's namespace. PEFT's ``bias="all"`` files also repeat a
    ``modules_to_save`` copy's bias as ``<path>.modules_to_save.bias`` (adapter name stripped): it goes to the
    adapter's copy (the core has taken the copy's own keys out already)."""
    model_key = disk_to_model_key(key)
    if ".modules_to_save." in model_key:
        model_key = model_key.replace(".modules_to_save.", f".modules_to_save.{adapter_name}.", 1)
    return model_key


class VeraPlugin:
    """VeRA: frozen random projections shared by all layers, scaled per layer by two trained vectors."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="VERA", config_cls=VeraConfig, task_types=list(TaskType), mergeable=True,
                           summary="VeRA: shared frozen random projections, scaled per layer by two trained vectors")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: VeraConfig) -> VeraConfig | None:
        """Write what the adapter really does, as PEFT does: the default targets of the architecture, and
        ``fan_in_fan_out`` as the targets' layer type says (True for GPT-2's Conv1D)."""
        try:
            paths = find_targets(model, config)
        except TargetError:
            return None  # inject reports it, with the model left untouched
        changes: dict[str, object] = {}
        if config.target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            changes["target_modules"] = tuple(DEFAULT_ATTENTION_TARGETS[model_type])
        kinds = {layer_kind(_base(model.get_submodule(p))) for p in paths}
        if len(kinds) == 1 and config.fan_in_fan_out != (kinds == {"conv1d"}):
            changes["fan_in_fan_out"] = kinds == {"conv1d"}  # PEFT corrects it the same way (with a warning)
        return config.replace(**changes) if changes else None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: VeraConfig, runtime: AdapterRuntime,
               store: nn.ModuleDict) -> list[str]:
        paths = find_targets(model, config)
        if not config.save_projection:  # the same caution PEFT gives, once per adapter rather than per config copy
            warnings.warn(f"VeRA adapter {adapter_name!r} has save_projection=False: vera_A and vera_B are not "
                          "written to its file, and loading draws them again from projection_prng_key, which relies "
                          "on torch's CPU generator giving the same numbers on the loading machine", UserWarning,
                          stacklevel=2)
        others = [(n, m) for n, m in store.items() if isinstance(m, VeraProjections)]
        biased = [(n, m.bias) for n, m in others if m.bias != "none"]
        if biased and config.bias != "none":
            raise AdapterError(f"VeRA: only one VeRA adapter of a model may train biases (as in PEFT); adapter "
                               f"{biased[0][0]!r} already has bias={biased[0][1]!r}. Add this one with bias='none'")
        if others:
            projections = self._shared_with(others, config)
        else:
            sizes = [_features(model.get_submodule(p)) for p in paths]
            vera_a, vera_b = draw_projections(config.r, max(i for i, _ in sizes), max(o for _, o in sizes),
                                              config.projection_prng_key)
            w = _base(model.get_submodule(paths[0])).weight
            device = torch.device("cpu") if w.is_meta else w.device  # the projections are data: never on meta
            projections = VeraProjections(vera_a.to(device), vera_b.to(device), config.projection_prng_key,
                                          config.save_projection, config.bias)
        layers: dict[str, VeraLayer] = {}
        for path in paths:  # build and check every layer first: a failure leaves the model as it was
            module = model.get_submodule(path)
            layer = module if isinstance(module, VeraLayer) else VeraLayer(module, runtime, path)
            problem = layer.check_add(projections)
            if problem is not None:
                raise TargetError(f"VeRA adapter {adapter_name!r}: {problem}; the projections of a model's VeRA "
                                  "adapters are sized by its first VeRA adapter's targets, so a later adapter may not "
                                  "target larger layers (as in PEFT). Add the larger layers first, or target smaller "
                                  "ones")
            layers[path] = layer
        store[adapter_name] = projections
        for path, layer in layers.items():
            layer.add(adapter_name, projections, config.r, config.vera_dropout, config.d_initial,
                      config.init_weights, trains_bias=config.bias == "vera_only")
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return paths

    @staticmethod
    def _shared_with(others: list[tuple[str, VeraProjections]], config: VeraConfig) -> VeraProjections:
        """A later adapter's projections: a copy of the first VeRA adapter's, after PEFT's checks."""
        first_name, first = others[0]
        keys = {m.prng_key for _, m in others}
        if keys != {config.projection_prng_key}:
            raise AdapterError(f"VeRA: projection_prng_key must be the same for all VeRA adapters of a model (as in "
                               f"PEFT); adapter {first_name!r} has {first.prng_key}, the new one "
                               f"{config.projection_prng_key}. Use projection_prng_key={first.prng_key}")
        saves = {m.save_projection for _, m in others} | {config.save_projection}
        if len(saves) > 1:
            raise AdapterError(f"VeRA: save_projection must be the same for all VeRA adapters of a model (as in "
                               f"PEFT), got {sorted(saves)}; use save_projection={first.save_projection}")
        if config.r != first.r:
            # PEFT refuses a larger r, and a smaller one fails at its first forward: refused here, either way
            raise AdapterError(f"VeRA: every VeRA adapter of a model shares the rank of the first one's projections "
                               f"(r={first.r}, adapter {first_name!r}); the new adapter asks for r={config.r}. Use "
                               f"r={first.r}, or add the adapter with the larger r first")
        return first.copy(config.save_projection, config.bias)

    @hookimpl
    def trained_base_parameters(self, model: nn.Module, config: VeraConfig) -> list[str] | None:
        """``bias="all"`` trains every bias of the model (``"vera_only"``: the adapted layers', which the layers
        declare themselves)."""
        if config.bias != "all":
            return None
        return [n for n, _ in model.named_parameters() if n.endswith("bias") and ".vera_" not in n
                and ".modules_to_save." not in n and ".original_module." not in n]

    @hookimpl
    def state_dict_filter(self, model: nn.Module, adapter_name: str, config: VeraConfig, store: nn.ModuleDict,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = adapter_keys_to_disk(state_dict, adapter_name, _NAMES)
        if config.save_projection:
            key_a, key_b = f"{STORE_PREFIX}{adapter_name}.vera_A", f"{STORE_PREFIX}{adapter_name}.vera_B"
            if key_a not in state_dict or key_b not in state_dict:
                raise CheckpointError(f"VeRA adapter {adapter_name!r} has save_projection=True, but the state dict "
                                      f"being saved has no {key_a} / {key_b}; pass the whole model's state dict, or "
                                      "use save_projection=False")
            out[DISK_A], out[DISK_B] = state_dict[key_a], state_dict[key_b]
        if config.bias != "none":  # PEFT writes the trained biases under their base-model keys
            layer_paths = {p for p, _ in _layers(model, adapter_name)}
            for key, value in state_dict.items():
                if not key.startswith(MODEL_PREFIX) or not key.endswith("bias") or ".vera_" in key:
                    continue
                if ".modules_to_save." in key or ".original_module." in key:
                    continue
                stem = key[len(MODEL_PREFIX):-len(".base_layer.bias")] if key.endswith(".base_layer.bias") else None
                if config.bias == "all" or stem in layer_paths:
                    out[model_to_disk_key(key)] = value
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, config: VeraConfig,
                        state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state_dict)
        vera_a, vera_b = state.pop(DISK_A, None), state.pop(DISK_B, None)
        if config.save_projection and (vera_a is None or vera_b is None):
            raise CheckpointError(f"VeRA adapter {adapter_name!r}: its config says save_projection=True, but the file "
                                  f"has no {DISK_A} / {DISK_B} (PEFT refuses it too). If it was saved with "
                                  "save_projection=False, set that in its adapter_config.json so the projections "
                                  "are drawn again from projection_prng_key")
        out = adapter_keys_from_disk(state, adapter_name, _NAMES)
        out = {_bias_key(k, adapter_name) if k.startswith(DISK_MODEL_PREFIX) and k.endswith("bias") else k: v
               for k, v in out.items()}
        if config.save_projection:
            out[f"{STORE_PREFIX}{adapter_name}.vera_A"] = vera_a  # type: ignore[assignment]
            out[f"{STORE_PREFIX}{adapter_name}.vera_B"] = vera_b  # type: ignore[assignment]
        elif vera_a is not None:
            warnings.warn(f"VeRA adapter {adapter_name!r}: the file holds vera_A / vera_B but its config says "
                          "save_projection=False, so they are ignored and the projections drawn from "
                          "projection_prng_key are kept (as PEFT does); set save_projection=True to use the saved "
                          "ones", UserWarning, stacklevel=2)
        return out

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
        remove_adapter(model, _layers(model, adapter_name), adapter_name, lambda layer: bool(layer.vera_lambda_d))
        return True  # the core drops store[adapter_name], the projections


plugin = VeraPlugin()
