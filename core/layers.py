"""The adapter-layer protocol: what a layer that a method plugin puts into the model declares about itself.

A method's ``inject`` usually replaces a base layer by a layer of its own that keeps the original as
``base_layer`` and holds one or more adapters. The core does the bookkeeping every method shares — which
parameters belong to which adapter, which are trained when, which base parameters an adapter trains,
whether a mixed batch can be routed through the layer — by *asking* such layers, never by guessing (no
comparing parameter sets before and after ``inject``). A layer answers through :class:`AdapterLayer`, a
structural :class:`typing.Protocol`: any ``nn.Module`` with these members qualifies, with no base class
to inherit::

    class ScaleLayer(nn.Module):
        supports_routing = False          # mixed batches raise a clear AdapterError naming this module

        def __init__(self, base_layer):
            super().__init__()
            self.base_layer = base_layer
            self.scale = nn.ParameterDict()

        @property
        def adapter_names(self):
            return list(self.scale)

        def adapter_parameters(self, adapter_name):
            return {f"scale.{adapter_name}": self.scale[adapter_name]}

        def adapter_state(self, adapter_name):
            return {}

        def trained_base_parameters(self, adapter_name):
            return ()

Names are relative to the layer (``"lora_A.default.weight"``, ``"base_layer.bias"``); the core prefixes
the layer's path. What the core does with the answers:

- ``adapter_parameters``: the adapter owns these. They are trainable exactly while the adapter is
  active and not in inference mode, frozen otherwise; ``print_trainable_parameters`` counts them; loading
  an adapter file must fill every one of them; ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` apply
  to them.
- ``adapter_state``: tensors that belong to the adapter but are never trained (buffers, projections
  shared by all layers). Never made trainable, never cast.
- ``trained_base_parameters``: parameters of the *base* layer that this adapter trains (LoRA's
  ``bias="lora_only"``). Trainable while some active, trainable adapter claims them; frozen again when
  none does. Base parameters elsewhere in the model are claimed through the ``trained_base_parameters``
  hook (LoRA's ``bias="all"``).
- ``supports_routing``: whether the layer computes each row of a mixed batch (``adapter_names=[...]``)
  with that row's adapter. A layer that says False makes such a call an :class:`~peft_core.AdapterError`
  naming it, instead of a silently wrong row.

Merging is the method's business (``merge``/``unmerge`` hooks); layers that fold an update into a
weight do it exactly with :mod:`peft_core.merging`. A layer may also offer :class:`MergeableLayer`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["AdapterLayer", "MergeableLayer", "adapter_layers", "is_adapter_layer", "remove_adapter"]


@runtime_checkable
class AdapterLayer(Protocol):
    """A module holding adapters beside a base layer (see the module docstring for what the core does with
    each answer)."""

    #: Whether each row of a mixed batch is computed with its own adapter (``adapter_names=[...]``).
    supports_routing: bool

    @property
    def adapter_names(self) -> Sequence[str]:
        """The adapters this layer holds."""
        ...

    def adapter_parameters(self, adapter_name: str) -> Mapping[str, nn.Parameter]:
        """The parameters ``adapter_name`` trains, created by the method, keyed by name relative to the layer."""
        ...

    def adapter_state(self, adapter_name: str) -> Mapping[str, torch.Tensor]:
        """Tensors of ``adapter_name`` that are never trained (buffers, shared projections)."""
        ...

    def trained_base_parameters(self, adapter_name: str) -> Collection[str]:
        """Names (relative to the layer) of base-layer parameters that ``adapter_name`` trains."""
        ...


@runtime_checkable
class MergeableLayer(Protocol):
    """An adapter layer that can fold one adapter into its base weight and take it out again exactly."""

    def merge(self, adapter_name: str, safe: bool) -> None:
        """Fold ``adapter_name`` into the base weight (no-op if already merged); ``safe`` raises
        :class:`~peft_core.MergeError` before changing anything when the result would not be finite."""
        ...

    def unmerge(self, adapter_name: str) -> None:
        """Restore the base weight bit for bit (no-op if not merged)."""
        ...


_MEMBERS = ("supports_routing", "adapter_names", "adapter_parameters", "adapter_state", "trained_base_parameters")


@functools.lru_cache(maxsize=1024)
def _class_is_adapter_layer(cls: type) -> bool:
    return all(hasattr(cls, m) for m in _MEMBERS)


def is_adapter_layer(module: object) -> bool:
    """``isinstance(module, AdapterLayer)``, answered per class and cached: the core asks it of every module of
    the model when an adapter is added (``typing``'s structural check costs ~20 µs a call, which a 70B model's
    thousands of modules turn into a visible part of ``get_peft_model``). The members must be defined on the
    class (a ``property`` or method), which is where a layer class defines them."""
    return _class_is_adapter_layer(type(module))


def adapter_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """``(path, layer)`` for every :class:`AdapterLayer` in ``model`` (holding ``adapter_name``, if given)."""
    for path, module in model.named_modules():
        if is_adapter_layer(module) and (adapter_name is None or adapter_name in module.adapter_names):  # type: ignore[attr-defined]
            yield path, module  # type: ignore[misc]


def remove_adapter(model: nn.Module, layers: Sequence[tuple[str, Any]], adapter_name: str,
                   holds_any: Callable[[Any], bool]) -> None:
    """A method's ``remove`` hook over its ``(path, layer)`` pairs: ``layer.drop(adapter_name)`` on each, and a
    layer for which ``holds_any(layer)`` is then False (no adapter left) gives its place back to its
    ``base_layer``, so the model is the original module tree again."""
    for path, layer in layers:
        layer.drop(adapter_name)
        if not holds_any(layer):
            model.set_submodule(path, layer.base_layer)
