"""``add_weighted_adapter`` for (IA)^3: a new adapter whose vectors are weighted sums of existing ones (Hugging
Face PEFT 0.21's ``IA3Model.add_weighted_adapter``: ``v_new = sum_i w_i * v_i`` on every layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft_core.errors import AdapterError, ConfigError

from .config import IA3Config
from .layer import IA3Layer

__all__ = ["add_weighted_adapter"]


def _union(values: list[Any], field: str) -> tuple[str, ...] | str:
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise AdapterError(f"add_weighted_adapter: the adapters' {field} must all be lists or all be regex strings "
                           f"(as in PEFT), got {[type(v).__name__ for v in values]}")
    if kinds == {str}:
        return "|".join(f"({v})" for v in values)
    return tuple(sorted(set().union(*values)))


def add_weighted_adapter(model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
    """Add adapter ``adapter_name`` (inactive, like any added adapter) whose vector on each layer is
    ``sum_i weights[i] * adapters[i]``'s vector there; layers an adapter does not scale contribute nothing from it
    (as in PEFT). It targets the union of the adapters' targets and feed-forward modules."""
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ConfigError("add_weighted_adapter needs as many weights as adapters (at least one)")
    if adapter_name in model.peft_config:  # PEFT returns silently here; a silent no-op hides a typo
        raise AdapterError(f"add_weighted_adapter: adapter {adapter_name!r} already exists; choose another name or "
                           "delete_adapter it first")
    configs = []
    for name in adapters:
        cfg = model.peft_config.get(name)
        if not isinstance(cfg, IA3Config):
            raise AdapterError(f"add_weighted_adapter: {name!r} is not an IA3 adapter of this model; it has "
                               f"{list(model.peft_config)}")
        configs.append(cfg)
    with_saved = [n for n, c in zip(adapters, configs) if c.modules_to_save]
    if len(with_saved) > 1:
        raise AdapterError(f"add_weighted_adapter: adapters {with_saved} each train modules_to_save copies, which "
                           "cannot be combined (as in PEFT); combine at most one such adapter")
    targets = _union([c.target_modules for c in configs], "target_modules")
    feedforward = _union([c.feedforward_modules for c in configs], "feedforward_modules")
    layers = [(p, m) for p, m in model.base_model.named_modules() if isinstance(m, IA3Layer)]
    for path, layer in layers:  # roles must agree, or the vectors have different shapes and meanings
        roles = {layer.feedforward[a] for a in adapters if a in layer.ia3_l}
        if len(roles) > 1:
            raise AdapterError(f"add_weighted_adapter: the adapters scale {path!r} differently (some its input, some "
                               "its output); their vectors cannot be added")
    model.add_adapter(adapter_name, configs[0].replace(target_modules=targets, feedforward_modules=feedforward))
    layers = [(p, m) for p, m in model.base_model.named_modules()
              if isinstance(m, IA3Layer) and adapter_name in m.ia3_l]
    clash = [p for p, m in layers if any(a in m.ia3_l and m.feedforward[a] != m.feedforward[adapter_name]
                                         for a in adapters)]
    if clash:
        model.delete_adapter(adapter_name)
        raise AdapterError(f"add_weighted_adapter: the combined feed-forward modules give {clash[0]!r} another role "
                           "than the adapters give it; give the adapters consistent feedforward_modules")
    with torch.no_grad():
        for _, layer in layers:
            new = layer.ia3_l[adapter_name]
            total = torch.zeros(new.shape, dtype=torch.float32, device=new.device)
            for name, weight in zip(adapters, weights):
                if name in layer.ia3_l:
                    total += layer.ia3_l[name].detach().float().to(new.device) * weight
            new.copy_(total.to(new.dtype))
