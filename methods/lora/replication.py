"""``layer_replication`` (PEFT's field): rebuild a model's stack of decoder/encoder layers from ranges of the
original ones, the copies sharing the base weights, so each copy can get its own LoRA (a bigger model for the
memory of the original, as in "LLaMA Pro"-style expansions).

``[[0, 4], [2, 5]]`` turns layers ``0 1 2 3 4`` into ``0 1 2 3 2 3 4``. The layer stack is found as PEFT finds
it (``<model>.layers``, BERT's ``encoder.layer``, Falcon/GPT-style ``h``), and ``config.num_hidden_layers``
follows, so a file written here loads in PEFT and the other way round. Merging is refused: a merge into a
shared base weight would reach every copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from peft_core.errors import ConfigError
from torch import nn

__all__ = ["replicate_layers"]

#: Set on the module whose layer stack was rebuilt: replicating twice would compound the copies.
_MARK = "_peft_core_replicated_layers"


def _stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    if isinstance(getattr(inner, "bert", None), nn.Module):
        inner = inner.bert
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        layers = getattr(owner, attr, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return owner, attr, layers  # type: ignore[return-value]
    raise ConfigError(f"layer_replication: no layer stack found in {type(model).__name__} (looked for "
                      "<model>.layers, encoder.layer and h, as PEFT does); drop layer_replication for this model")


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are the original's (buffers are copied)."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def replicate_layers(model: nn.Module, ranges: Sequence[Sequence[int]]) -> None:
    """Rebuild the layer stack of ``model`` from ``ranges`` (``[start, end)`` pairs), checked first."""
    owner, attr, layers = _stack(model)
    if getattr(owner, _MARK, False):
        raise ConfigError("layer_replication: this model's layers were replicated by an earlier adapter already; "
                          "give layer_replication to one adapter only (later adapters see the replicated stack)")
    for pair in ranges:
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] <= len(layers):
            raise ConfigError(f"layer_replication: {list(pair)} is not a [start, end) range of the model's "
                              f"{len(layers)} layers")
    new: list[nn.Module] = []
    for start, end in ranges:
        for i in range(start, end):
            clone = _shared_copy(layers[i])
            for sub in clone.modules():  # transformers' attention finds its KV-cache slot by layer_idx
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    setattr(owner, attr, nn.ModuleList(new))
    object.__setattr__(owner, _MARK, True)
    config = getattr(owner, "config", None) or getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new)
        # transformers 5 configs may list one attention type per layer; the copies keep their source's
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(layers):
            config.layer_types = [types[i] for start, end in ranges for i in range(start, end)]
