"""Which modules an (IA)^3 adapter scales, and which of them are feed-forward: Hugging Face PEFT 0.21's rules
and default tables (``TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from peft_core.errors import TargetError
from peft_core.layers import is_adapter_layer
from peft_core.targeting import find_targets as _find_targets
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import IA3Config

__all__ = ["DEFAULT_FEEDFORWARD", "DEFAULT_TARGETS", "find_targets", "is_feedforward", "layer_kind",
           "resolve_feedforward"]

#: ``target_modules=None``: the modules PEFT's (IA)^3 adapts, per ``model.config.model_type``.
DEFAULT_TARGETS: Mapping[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"), "mt5": ("k", "v", "wi_1"), "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"), "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"), "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"), "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"), "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"), "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"), "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"), "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"), "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"), "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"), "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"), "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "qwen3": ("q_proj", "v_proj", "down_proj"),
}

#: ``feedforward_modules=None``: the targets whose input PEFT's (IA)^3 scales, per model type.
DEFAULT_FEEDFORWARD: Mapping[str, tuple[str, ...]] = {
    "t5": ("wo",), "mt5": (), "gpt2": ("mlp.c_proj",), "bloom": ("mlp.dense_4h_to_h",), "roberta": ("output.dense",),
    "opt": ("fc2",), "gptj": ("fc_out",), "gpt_neox": ("dense_4h_to_h",), "gpt_neo": ("c_proj",), "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",), "llama": ("down_proj",), "llama4": ("down_proj",), "mistral": ("down_proj",),
    "mixtral": ("w2",), "bert": ("output.dense",), "deberta-v2": ("output.dense",), "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",), "RefinedWebModel": ("dense_4h_to_h",), "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",), "gemma": ("down_proj",), "gemma2": ("down_proj",), "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",), "qwen3": ("down_proj",),
}


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (GPT-2's transposed linear), ``"conv"`` (Conv2d/Conv3d), or None: the layer
    types PEFT's (IA)^3 adapts."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _adaptable(module: nn.Module) -> bool:
    return layer_kind(module) is not None


def _linear(module: nn.Module) -> bool:
    return layer_kind(module) in ("linear", "conv1d")


def find_targets(model: nn.Module, config: IA3Config) -> list[str]:
    """The paths to adapt, by PEFT's targeting rules; TargetError for none, or for one of another type."""
    from .layer import IA3Layer

    paths = _find_targets(model, config.target_modules, adaptable=_adaptable, linear=_linear,
                          exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save,
                          default_targets=DEFAULT_TARGETS, method="IA3")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, IA3Layer):
            continue
        if is_adapter_layer(module):
            raise TargetError(f"IA3 target {path!r} is already adapted by another method's layer "
                              f"({type(module).__name__}); (IA)^3 scales plain layers only: exclude it with "
                              "exclude_modules or target other modules")
        if layer_kind(module) is None:
            raise TargetError(f"IA3 target {path!r} is a {type(module).__name__}; (IA)^3 adapts torch.nn.Linear, "
                              "transformers' Conv1D, torch.nn.Conv2d and torch.nn.Conv3d (as Hugging Face PEFT). "
                              "Narrow target_modules or add the module to exclude_modules")
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            raise TargetError(f"IA3 target {path!r} ({type(module).__name__}) has a {getattr(weight, 'dtype', None)} "
                              "weight; this plugin scales layers with floating-point weights only (quantized "
                              "layers are not supported)")
    return paths


def is_feedforward(path: str, feedforward: str | Sequence[str] | None) -> bool:
    """PEFT's rule: a regex must match the whole path; a list entry matches a path ending with it (no dot
    boundary, exactly as PEFT checks)."""
    if feedforward is None:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(f) for f in feedforward)


def resolve_feedforward(model_type: str | None, targets: str | Sequence[str] | None,
                        paths: Sequence[str]) -> tuple[str, ...] | str:
    """``feedforward_modules`` for a config that left it None: PEFT's default for the architecture (none when it
    has no table entry). With ``target_modules`` as a list, written as the entries of that list whose modules the
    defaults make feed-forward, so the file stays loadable (PEFT refuses feed-forward names outside the list)
    while every module keeps the role PEFT would give it."""
    defaults = DEFAULT_FEEDFORWARD.get(model_type or "", ())
    if not isinstance(targets, tuple):
        return tuple(defaults)
    chosen = []
    for entry in targets:
        mine = [p for p in paths if p == entry or p.endswith("." + entry)]
        if mine and all(is_feedforward(p, defaults) for p in mine):
            chosen.append(entry)
    return tuple(chosen)
