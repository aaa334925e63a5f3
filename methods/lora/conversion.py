"""PiSSA/OLoRA adapters rewritten as plain LoRA at save time (``path_initial_model_for_weight_conversion``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from peft_core import PeftConfig
from peft_core.errors import ConfigError

from .config import LoraConfig

__all__ = ["to_plain_lora"]

#: The initialisations that move part of the base weight into the adapter, so that the trained adapter only
#: fits the residual base model until converted.
_RESIDUAL_INITS = ("pissa", "olora")


def _residual(init: object) -> bool:
    return isinstance(init, str) and (init in _RESIDUAL_INITS or init.startswith("pissa_niter_"))


def to_plain_lora(adapter_name: str, config: LoraConfig, state_dict: Mapping[str, torch.Tensor],
                  initial_config: PeftConfig, initial_state_dict: Mapping[str, torch.Tensor],
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    where = "path_initial_model_for_weight_conversion"
    if not _residual(config.init_lora_weights):
        raise ConfigError(f"{where}: adapter {adapter_name!r} was initialised with init_lora_weights="
                          f"{config.init_lora_weights!r}, which leaves the base weights as they were: there is "
                          "nothing to convert (the conversion is for 'pissa', 'pissa_niter_<n>' and 'olora')")
    if config.use_dora:
        raise ConfigError(f"{where}: adapter {adapter_name!r} uses DoRA, whose magnitude has no plain-LoRA form "
                          "(Hugging Face PEFT does not convert it either)")
    if not isinstance(initial_config, LoraConfig) or (initial_config.r, initial_config.rank_pattern) != (
            config.r, config.rank_pattern):
        raise ConfigError(f"{where}: the folder's adapter is not this adapter's initial state (a LoRA with r="
                          f"{config.r} and the same rank_pattern); save the adapter there right after get_peft_model")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        is_a, is_b = key.endswith(".lora_A.weight"), key.endswith(".lora_B.weight")
        if not (is_a or is_b):
            out[key] = value
            continue
        start = initial_state_dict.get(key)
        if start is None or start.shape != value.shape:
            raise ConfigError(f"{where}: the initial adapter has no tensor {key!r} of shape {tuple(value.shape)}; "
                              "it is not this adapter's initial state")
        start = start.to(device=value.device, dtype=value.dtype)
        # B A - B0 A0 = [B, -B0] @ [A; A0]
        out[key] = torch.cat([value, start], dim=0) if is_a else torch.cat([value, -start], dim=1)
    double = math.sqrt(2) if config.use_rslora else 2
    converted = config.replace(
        init_lora_weights=True, r=config.r * 2, lora_alpha=config.lora_alpha * double,
        rank_pattern={k: v * 2 for k, v in config.rank_pattern.items()},
        # alpha_pattern like lora_alpha (PEFT 0.21 doubles it even under rsLoRA, which changes those layers' scaling)
        alpha_pattern={k: v * double for k, v in config.alpha_pattern.items()})
    return converted, out
