"""Which layers an IA3Config adapts, and which of them are feed-forward (input-side) layers."""

from __future__ import annotations

import re

from peft_core.errors import TargetError
from peft_core.targeting import find_targets as _find
from torch import nn

from .config import IA3Config
from .layer import base_kind

__all__ = ["DEFAULT_FEEDFORWARD", "DEFAULT_TARGETS", "feedforward_spec", "find_targets", "is_feedforward"]

#: ``target_modules=None``: the layers (IA)^3 adapts by default per architecture: keys and values of
#: attention, and the second feed-forward projection (the layers the paper rescales).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "gemma": ("q_proj", "v_proj", "down_proj"),
    "gpt2": ("c_attn", "mlp.c_proj"), "t5": ("k", "v", "wo"), "mt5": ("k", "v", "wo"),
    "bert": ("key", "value", "output.dense"), "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"), "bart": ("q_proj", "v_proj", "fc2"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"), "falcon": ("query_key_value", "dense_4h_to_h"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"), "gptj": ("q_proj", "v_proj", "fc_out"),
}
#: ``feedforward_modules=None``: the default targets whose vector scales the input.
DEFAULT_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "llama": ("down_proj",), "mistral": ("down_proj",), "qwen2": ("down_proj",), "gemma": ("down_proj",),
    "gpt2": ("mlp.c_proj",), "t5": ("wo",), "mt5": ("wo",), "bert": ("output.dense",),
    "roberta": ("output.dense",), "opt": ("fc2",), "bart": ("fc2",), "gpt_neox": ("dense_4h_to_h",),
    "falcon": ("dense_4h_to_h",), "bloom": ("mlp.dense_4h_to_h",), "gptj": ("fc_out",),
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _adaptable(module: nn.Module) -> bool:
    return base_kind(module) is not None


def find_targets(model: nn.Module, config: IA3Config) -> list[str]:
    """Paths of the layers to adapt, in model order, by Hugging Face PEFT's targeting rules (peft-core's shared
    implementation); raises :class:`TargetError` when none match."""
    return _find(model, config.target_modules, adaptable=_adaptable, exclude_modules=config.exclude_modules,
                 modules_to_save=config.modules_to_save, default_targets=DEFAULT_TARGETS, method="peft-ia3")


def feedforward_spec(model: nn.Module, config: IA3Config) -> str | tuple[str, ...]:
    """The config's feed-forward modules, or the architecture's defaults."""
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    model_type = _model_type(model)
    if model_type not in DEFAULT_FEEDFORWARD:
        raise TargetError(f"feedforward_modules=None, and peft-ia3 has no default for model_type={model_type!r} "
                          f"({type(model).__name__}); set feedforward_modules (use [] if no target is "
                          "feed-forward)")
    return DEFAULT_FEEDFORWARD[model_type]


def is_feedforward(name: str, spec: str | tuple[str, ...]) -> bool:
    """Hugging Face PEFT's rule: a regex must match the whole name; a list entry need only be a suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(t) for t in spec)
