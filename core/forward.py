"""The forward side of an AdaptedModel: the signature it shows, positional binding, mixed-batch checks.

- ``model.forward`` calls the base model but *shows* the base model's signature (plus ``adapter_names``),
  so tools that inspect it — the transformers Trainer choosing which dataset columns to keep — see
  ``input_ids``, ``labels``... instead of ``*args, **kwargs``.
- ``prepare_inputs`` hooks receive keyword inputs: positional arguments are bound to their names first.
- A mixed batch (``adapter_names=[...]``, one name per row) is checked before anything runs: one name per
  row, known names, unmerged adapters, eval mode, and every layer holding a named adapter able to route.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterError
from .runtime import BASE_ROW

if TYPE_CHECKING:
    from .model import AdaptedModel

__all__ = ["ForwardWithBaseSignature", "bind_positional", "check_routing"]


class _BoundForward:
    __slots__ = ("_model",)

    def __init__(self, model: AdaptedModel) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model._forward(*args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]  # help(model.forward) describes this forward
        from .model import AdaptedModel

        return AdaptedModel._forward.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        return _signature_with_routing(type(self._model.base_model))


class ForwardWithBaseSignature:
    """Descriptor for ``AdaptedModel.forward`` (see the module docstring)."""

    def __get__(self, obj: AdaptedModel | None, objtype: type | None = None) -> Any:
        if obj is None:
            from .model import AdaptedModel

            return AdaptedModel._forward
        return _BoundForward(obj)


@functools.lru_cache(maxsize=64)
def _signature_with_routing(cls: type) -> inspect.Signature:
    params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    routing = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, routing)
    else:
        params.append(routing)
    return inspect.Signature(params)


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> tuple[str, ...]:
    sig = inspect.signature(cls.forward)
    return tuple(p.name for p in sig.parameters.values()
                 if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def bind_positional(module: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    names = _forward_params(type(module))
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    return dict(zip(names, args))


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward/generate call, from its token ids or embeddings (None when unknown)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def check_routing(model: AdaptedModel, adapter_names: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise :class:`AdapterError` for a mixed-batch call that could not be computed correctly."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise AdapterError("adapter_names must be a non-empty list with one adapter name per row")
    rows = _batch_rows(args, kwargs)
    if rows is not None and len(adapter_names) != rows:
        raise AdapterError(f"adapter_names has {len(adapter_names)} entries but the batch has {rows} rows; "
                           "give one adapter name per row")
    unknown = sorted({n for n in adapter_names if n != BASE_ROW and n not in model.peft_config})
    if unknown:
        raise AdapterError(f"adapter_names has unknown adapter(s) {unknown}; this model has "
                           f"{list(model.peft_config)} (use {BASE_ROW!r} for rows without an adapter)")
    if model.merged_adapters:
        raise AdapterError("adapter_names (mixed-batch inference) needs unmerged adapters; "
                           "call unmerge_adapter() first")
    if model.training:
        raise AdapterError("adapter_names (mixed-batch inference) is for inference; call model.eval() first")
    named = [n for n in dict.fromkeys(adapter_names) if n != BASE_ROW]
    stuck = model._ownership.unroutable(named)
    if stuck:
        kinds = {type(model.base_model.get_submodule(p)).__name__ for p in stuck}
        raise AdapterError(f"adapter_names: module(s) {', '.join(stuck[:5])} ({', '.join(sorted(kinds))}) cannot "
                           "compute each row with its own adapter (their layer type does not support routing); "
                           "run one adapter per call with set_adapter() instead")
    # the method's own input preparation (an extension merely wrapping prepare_inputs does not make LoRA prompt-like)
    inputs = [n for n in named
              if model._registry.implements(type(model.peft_config[n]).peft_type, "prepare_inputs", owner_only=True)]
    if inputs:
        raise AdapterError(f"mixed-batch inference (adapter_names) cannot route adapter(s) {inputs} per row: they "
                           "change the model's inputs (prompt-style methods); run them with set_adapter() instead")
