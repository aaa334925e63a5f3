"""LoRA-only model operations, offered to users through ``MethodSpec.operations``
(``model.add_weighted_adapter(...)`` works on any AdaptedModel holding LoRA adapters)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from peft_core.errors import AdapterError, ConfigError
from torch import nn

from .config import LoraConfig
from .variant_fields import VARIANT_FIELDS, VARIANT_INITS

__all__ = ["add_weighted_adapter"]


def add_weighted_adapter(model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "cat") -> None:
    """Combine LoRA adapters into a new adapter ``adapter_name``.

    - ``"cat"`` (exact): the new adapter's delta is ``sum_i w_i * scaling_i * B_i A_i``; its rank is the
      sum of the ranks (A stacked by rows, B by columns).
    - ``"linear"`` (approximate, needs equal ranks): ``A = sum_i c_i A_i`` and ``B = sum_i c_i B_i`` with
      ``c_i = sqrt(|w_i| * scaling_i)`` (sign on B): the classic weighted average of adapters, which
      adds cross terms ``B_i A_j``.
    """
    from .layers import LoraLayer

    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError("add_weighted_adapter needs as many weights as adapters (at least one)")
    configs = []
    for name in adapters:
        cfg = model.peft_config.get(name)
        if not isinstance(cfg, LoraConfig):
            raise AdapterError(f"add_weighted_adapter: {name!r} is not a LoRA adapter of this model")
        if cfg.target_parameters:  # as PEFT: an expert stack's per-expert factors do not combine like a matrix's
            raise AdapterError(f"add_weighted_adapter: adapter {name!r} uses target_parameters, which it does not "
                               "support (nor does PEFT); combine adapters that target modules only")
        special = [f for f in (*VARIANT_FIELDS, "lora_bias") if getattr(cfg, f, None)]
        if cfg.init_lora_weights in VARIANT_INITS:
            special.append(f"init_lora_weights={cfg.init_lora_weights!r}")
        if special:  # a variant's tensors (DoRA's magnitude, KaSA's diagonal) or a bias do not combine as B A does
            raise AdapterError(f"add_weighted_adapter: adapter {name!r} uses {special[0]}, which it cannot combine "
                               "exactly; combine plain LoRA adapters")
        configs.append(cfg)
    if combination_type not in ("cat", "linear"):
        raise ConfigError(f"combination_type={combination_type!r} is not supported; use 'cat' or 'linear'")
    base: nn.Module = model.base_model
    layer_paths = sorted({p for p, m in base.named_modules() if isinstance(m, LoraLayer)
                          and any(a in m.r for a in adapters)})
    ranks: dict[str, int] = {}
    for path in layer_paths:
        layer = base.get_submodule(path)
        held = [layer.r[a] for a in adapters if a in layer.r]
        if combination_type == "linear" and len(set(held)) > 1:
            raise ConfigError(f"combination_type='linear' needs equal ranks; {path} has ranks {held}. Use 'cat'")
        ranks[path] = sum(held) if combination_type == "cat" else held[0]
    rank_pattern = {re.escape(p): r for p, r in ranks.items()}
    top = max(ranks.values())
    new = configs[0].replace(r=top, lora_alpha=top, target_modules=tuple(layer_paths), rank_pattern=rank_pattern,
                             alpha_pattern=rank_pattern, use_rslora=False, layers_to_transform=None,
                             layers_pattern=None, exclude_modules=None, lora_dropout=0.0,
                             modules_to_save=None)
    model.add_adapter(adapter_name, new)
    with torch.no_grad():
        for path in layer_paths:
            layer = base.get_submodule(path)
            a_parts, b_parts = [], []
            for name, w in zip(adapters, weights):
                if name not in layer.r:
                    continue
                a, b = _ab(layer, name)
                s = layer.scaling[name]
                if combination_type == "cat":
                    a_parts.append(a)
                    b_parts.append(b * (w * s))
                else:
                    c = math.sqrt(abs(w) * s)
                    a_parts.append(a * c)
                    b_parts.append(b * (c if w >= 0 else -c))
            if combination_type == "cat":
                new_a, new_b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
            else:
                new_a, new_b = sum(a_parts), sum(b_parts)
            ta, tb = _ab(layer, adapter_name)
            if ta.shape != new_a.shape:
                # a module matched by another module's pattern; keep the exact shape we built
                raise AdapterError(f"internal: rank mismatch at {path}")
            ta.copy_(new_a)
            tb.copy_(new_b)


def _ab(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(layer, "lora_embedding_A"):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight
