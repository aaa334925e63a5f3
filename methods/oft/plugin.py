"""The OFT method plugin: the hook implementations that connect ``OFTLayer`` to peft-core."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import (
    DISK_MODEL_PREFIX,
    MODEL_PREFIX,
    adapter_keys_from_disk,
    adapter_keys_to_disk,
    disk_to_model_key,
    model_to_disk_key,
)
from peft_core.errors import CheckpointError, MergeError, TargetError
from peft_core.layers import is_adapter_layer, remove_adapter
from peft_core.merging import merge_all_or_nothing, unmerge_all
from peft_core.runtime import AdapterRuntime
from peft_core.targeting import DEFAULT_ATTENTION_TARGETS
from peft_core.targeting import find_targets as _find_targets
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import OFTConfig
from .layer import OFTLayer, layer_kind

__all__ = ["OFTPlugin", "find_targets", "plugin"]

_NAMES = ("oft_R", "oft_embedding_R")
# PEFT keeps each adapter's tensor in a module of its own: ``<path>.oft_R.weight`` on disk
_DISK_KEY = re.compile(r"\.(oft_R|oft_embedding_R)\.weight$")


def _adaptable(module: nn.Module) -> bool:
    return layer_kind(module) is not None


def _linear(module: nn.Module) -> bool:
    # "all-linear" also picks GPT-2's Conv1D, as in PEFT, which then refuses it (below: a clear TargetError)
    return isinstance(module, (nn.Linear, Conv1D))


def find_targets(model: nn.Module, config: OFTConfig) -> list[str]:
    """The paths to adapt, by PEFT's targeting rules; TargetError for none, or for one OFT cannot adapt."""
    paths = _find_targets(model, config.target_modules, adaptable=_adaptable, linear=_linear,
                          exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                          layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save,
                          default_targets=DEFAULT_ATTENTION_TARGETS, method="OFT")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, OFTLayer):
            continue
        if is_adapter_layer(module):
            raise TargetError(f"OFT target {path!r} is already adapted by another method's layer "
                              f"({type(module).__name__}); OFT rotates plain layers only: exclude it with "
                              "exclude_modules or target other modules")
        if layer_kind(module) is None:
            raise TargetError(f"OFT target {path!r} is a {type(module).__module__}.{type(module).__name__}; OFT adapts "
                              "torch.nn.Linear, torch.nn.Conv2d and torch.nn.Embedding (as Hugging Face PEFT 0.21, "
                              "which refuses GPT-2's Conv1D too). Narrow target_modules or add the module to "
                              "exclude_modules")
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            raise TargetError(f"OFT target {path!r} ({type(module).__name__}) has a {getattr(weight, 'dtype', None)} "
                              "weight; this plugin rotates layers with floating-point weights only (quantized "
                              "layers are not supported)")
    return paths


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, OFTLayer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, OFTLayer) and adapter_name in m.params]


def _refuse_tied_merge(model: nn.Module, layers: list[tuple[str, OFTLayer]], adapter_name: str) -> None:
    """MergeError, before anything changes, when a layer's base weight is also another module's (GPT-2's ``wte``
    and ``lm_head``, tied embeddings generally): rotating it in place would rotate those modules' weight too, so
    the merged model would not compute what the unmerged one does."""
    holders: dict[int, set[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, OFTLayer):
            continue
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(path)
    for path, layer in layers:
        others = sorted(holders.get(id(layer.base_layer.weight), set()) - {f"{path}.base_layer"})
        if others:
            raise MergeError(f"OFT adapter {adapter_name!r} cannot be merged: {path!r}'s base weight is tied to "
                             f"{', '.join(repr(o) for o in others[:3])}, so a merge would rotate those too; keep it "
                             "unmerged (or untie the weights first)")


def _is_bias_key(key: str) -> bool:
    return (key.startswith(MODEL_PREFIX) and (key.endswith(".bias")) and ".modules_to_save." not in key
            and ".original_module." not in key)


class OFTPlugin:
    """OFT: a learned block-diagonal orthogonal rotation of each targeted layer's input."""

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="OFT", config_cls=OFTConfig, task_types=list(TaskType), mergeable=True,
                           summary="OFT: learned block-diagonal orthogonal rotations of layer inputs")]

    @hookimpl
    def complete_config(self, model: nn.Module, config: OFTConfig) -> OFTConfig | None:
        """Write what the adapter really does, as PEFT does: the architecture's default targets, and
        ``fan_in_fan_out=False`` (no layer OFT adapts is stored transposed; PEFT corrects it with a warning)."""
        changes: dict[str, object] = {}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type in DEFAULT_ATTENTION_TARGETS:
            changes["target_modules"] = tuple(DEFAULT_ATTENTION_TARGETS[model_type])
        if config.fan_in_fan_out:
            warnings.warn("OFTConfig.fan_in_fan_out=True, but OFT adapts no transposed (Conv1D) layer; setting "
                          "fan_in_fan_out to False (as PEFT does)", stacklevel=2)
            changes["fan_in_fan_out"] = False
        return config.replace(**changes) if changes else None

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: OFTConfig, runtime: AdapterRuntime) -> list[str]:
        paths = find_targets(model, config)
        layers: dict[str, OFTLayer] = {}
        for path in paths:  # build and check every layer first: a failure leaves the model as it was
            module = model.get_submodule(path)
            layer = module if isinstance(module, OFTLayer) else OFTLayer(module, runtime, path)
            layer.check_add()
            layers[path] = layer
        for path, layer in layers.items():
            layer.add(adapter_name, config.r, config.oft_block_size, block_share=config.block_share,
                      coft=config.coft, eps=config.eps, neumann=config.use_cayley_neumann,
                      terms=config.num_cayley_neumann_terms, init_weights=config.init_weights,
                      trains_bias=config.bias == "oft_only")
            if model.get_submodule(path) is not layer:
                model.set_submodule(path, layer)
        return paths

    @hookimpl
    def trained_base_parameters(self, model: nn.Module, config: OFTConfig) -> list[str] | None:
        """``bias="all"`` trains every bias of the model (``"oft_only"``: the adapted layers' biases, which the
        layers declare themselves)."""
        if config.bias != "all":
            return None
        return [n for n, _ in model.named_parameters() if n.endswith("bias") and ".oft_" not in n
                and ".modules_to_save." not in n and ".original_module." not in n]

    @hookimpl
    def state_dict_filter(self, adapter_name: str, config: OFTConfig,
                          state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mine = adapter_keys_to_disk(state_dict, adapter_name, _NAMES)
        out = {f"{key}.weight": value for key, value in mine.items()}
        if config.bias == "all":
            out.update({model_to_disk_key(k): v for k, v in state_dict.items() if _is_bias_key(k)})
        elif config.bias == "oft_only":
            stems = {key.rsplit(".", 1)[0] for key in mine}  # base_model.model.<path> of this adapter's layers
            for key, value in state_dict.items():
                if _is_bias_key(key) and key.endswith(".base_layer.bias"):
                    disk = model_to_disk_key(key)
                    if disk[: -len(".base_layer.bias")] in stems:
                        out[disk] = value
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        old = next((k for k in state_dict if ".oft_r." in k or k.endswith(".oft_r")), None)
        if old is not None:  # PEFT <= 0.15 stored whole (unpacked) blocks as oft_r, with other maths
            raise CheckpointError(f"{old!r} is an OFT tensor of PEFT <= 0.15.2, whose format and maths changed; "
                                  "neither PEFT 0.21 nor peft-core loads it: retrain the adapter (or use PEFT "
                                  "0.15.2 to run it)")
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith(DISK_MODEL_PREFIX) and _DISK_KEY.search(key):
                renamed[key[: -len(".weight")]] = value
            elif key.startswith(DISK_MODEL_PREFIX):
                # a base-model key: a bias (bias="all" / "oft_only"), or the embedding weight PEFT adds to the file
                # when an embedding is targeted (its save_embedding_layers="auto"); loaded as PEFT loads them
                renamed[disk_to_model_key(key)] = value
            else:
                renamed[key] = value  # not ours: the core reports it as unexpected
        out = adapter_keys_from_disk(renamed, adapter_name, _NAMES)
        # PEFT's bias="all" files repeat a modules_to_save copy's bias as <path>.modules_to_save.bias, without the
        # adapter name (the core has taken the copy's own keys out already)
        return {k.replace(".modules_to_save.", f".modules_to_save.{adapter_name}.", 1)
                if ".modules_to_save." in k else k: v for k, v in out.items()}

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str, safe: bool) -> bool:
        layers = _layers(model, adapter_name)
        _refuse_tied_merge(model, layers, adapter_name)
        merge_all_or_nothing(layers, adapter_name, safe)
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        unmerge_all(_layers(model, adapter_name), adapter_name)
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        remove_adapter(model, _layers(model, adapter_name), adapter_name, lambda layer: bool(layer.params))
        return True


plugin = OFTPlugin()
