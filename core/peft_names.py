"""Hugging Face PEFT's top-level names that are not a method's: the enum of method names, helpers, errors,
and the status reports — so code written for ``peft`` runs with ``peft_core``.

Names of a method (``LoraConfig``, ``PromptTuningInit``, ``PrefixEncoder``...) come from the installed
plugins (their package's ``__all__``), never from here. Names of PEFT that peft-core does not provide raise an
``AttributeError`` saying so and what to use instead (see ``peft_core.__getattr__``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from .config import PeftConfig
from .errors import PeftCoreError
from .tasks import PeftType

if TYPE_CHECKING:
    from .model import AdaptedModel

__all__ = ["LayerStatus", "ModelStatus", "PeftError", "PeftType", "PeftWarning", "cast_mixed_precision_params",
           "get_layer_status", "get_model_status", "get_peft_config", "inject_adapter_in_model", "load_peft_weights",
           "unsupported_message"]


#: PEFT's base error class: peft-core's own.
PeftError = PeftCoreError


class PeftWarning(UserWarning):
    """Warnings peft-core issues where Hugging Face PEFT warns (PEFT's ``PeftWarning``)."""


def get_peft_config(config_dict: Mapping[str, Any]) -> PeftConfig:
    """The config described by ``config_dict`` (an ``adapter_config.json``'s content), of its method's class."""
    return PeftConfig.from_dict(config_dict, source="get_peft_config")


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Add an adapter to ``model`` in place and return ``model`` itself (no wrapper), as PEFT's function does.

    The adapter is active and trains; its layers keep working without a wrapper object. ``state_dict``: adapter
    tensors in PEFT's file keys, loaded into the new adapter (all checked first)."""
    from .model import AdaptedModel

    wrapper = AdaptedModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    if state_dict is not None:
        wrapper.load_adapter_state_dict(adapter_name, dict(state_dict), source="inject_adapter_in_model(state_dict)")
    return model


def load_peft_weights(model_id: str | os.PathLike[str], device: str | None = None,
                      **hf_hub_download_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file at ``model_id`` (a folder or a Hub repo), keyed as on disk."""
    from .serialization import load_weights, resolve_weights

    weights = load_weights(resolve_weights(model_id, **hf_hub_download_kwargs))
    return {k: v.to(device) for k, v in weights.items()} if device is not None else weights


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """PEFT's helper for mixed-precision training: frozen floating parameters go to ``dtype``, trainable ones
    (the adapter's) to float32, in place."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


@attrs.frozen
class LayerStatus:
    """One adapter layer (PEFT's ``TunerLayerStatus``)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | str]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@attrs.frozen
class ModelStatus:
    """The whole model's adapters (PEFT's ``TunerModelStatus``)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | str]
    available_adapters: list[str]
    devices: dict[str, list[str]]


def _grad_state(values: list[bool | str]) -> bool | str:
    return values[0] if values and all(v == values[0] for v in values) else "irregular"


def get_layer_status(model: AdaptedModel) -> list[LayerStatus]:
    """A status line per adapter layer of ``model`` (a peft-core model), as PEFT's ``get_layer_status``."""
    from .layers import adapter_layers

    out = []
    merged = set(model.merged_adapters)
    for path, layer in adapter_layers(model.base_model):
        names = list(layer.adapter_names)
        grads = {n: _grad_state([bool(p.requires_grad) for p in layer.adapter_parameters(n).values()]) for n in names}
        devices = {n: sorted({str(p.device.type) for p in layer.adapter_parameters(n).values()}) for n in names}
        out.append(LayerStatus(name=path, module_type=type(layer).__name__, enabled=not model._runtime.disabled,
                               active_adapters=[n for n in model.active_adapters if n in names],
                               merged_adapters=[n for n in names if n in merged], requires_grad=grads,
                               available_adapters=names, devices=devices))
    return out


def get_model_status(model: AdaptedModel) -> ModelStatus:
    """The adapters of ``model`` at a glance, as PEFT's ``get_model_status``."""
    layers = get_layer_status(model)
    trainable, total = model.get_nb_trainable_parameters()
    grads: dict[str, list[bool | str]] = {}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for n, g in status.requires_grad.items():
            grads.setdefault(n, []).append(g)
        for n, d in status.devices.items():
            devices.setdefault(n, set()).update(d)
    return ModelStatus(
        base_model_type=type(model.base_model).__name__, adapter_model_type=type(model).__name__,
        peft_types={n: type(c).peft_type for n, c in model.peft_config.items()}, trainable_params=trainable,
        total_params=total, num_adapter_layers=len(layers), enabled=not model._runtime.disabled,
        active_adapters=model.active_adapters, merged_adapters=model.merged_adapters,
        requires_grad={n: _grad_state(g) for n, g in grads.items()},
        available_adapters=list(model.peft_config), devices={n: sorted(d) for n, d in devices.items()})


def unsupported_message(name: str) -> str:
    """What ``peft_core.<name>`` says for a name of Hugging Face PEFT that peft-core does not provide."""
    if name.endswith("Config"):
        return (f"peft_core has no {name}: no installed method plugin declares it (peft-core list-methods shows "
                "the installed methods); it is a Hugging Face PEFT method that peft-core does not implement yet")
    if name.endswith("Model") and name not in {"PeftModel", "PeftMixedModel"}:
        return (f"peft_core has no {name}: peft-core has no per-method tuner models; every adapter lives in the "
                "model get_peft_model returns (PeftModel / AdaptedModel)")
    return f"peft_core has no {name}: this Hugging Face PEFT feature is not supported by peft-core yet"
