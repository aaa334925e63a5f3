"""Which layers an IA3Config adapts, and which of them are feed-forward (input-side) layers."""

from __future__ import annotations

import re

from peft_core.errors import TargetError
from torch import nn

from .config import IA3Config
from .layer import IA3Layer, base_kind

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


def _matches(name: str, spec: str | tuple[str, ...]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _adaptable_names(model: nn.Module) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and base_kind(m) is not None})
    return ", ".join(leaves[:20]) or "(none)"


def find_targets(model: nn.Module, config: IA3Config) -> list[str]:
    """Paths of the layers to adapt, in model order; raises :class:`TargetError` when none match."""
    spec = config.target_modules
    model_type = _model_type(model)
    if spec is None:
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(f"target_modules=None, and peft-ia3 has no default targets for model_type="
                              f"{model_type!r} ({type(model).__name__}); set target_modules (and "
                              f"feedforward_modules), e.g. from: {_adaptable_names(model)}")
        spec = DEFAULT_TARGETS[model_type]
    head = None
    if spec == "all-linear":
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
    found: list[str] = []
    inside: list[str] = []  # already-adapted layers: their base_layer must not be matched again
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, IA3Layer):
            inside.append(name)
        if spec == "all-linear":
            if base_kind(module) is None or module is head or (isinstance(module, IA3Layer)
                                                               and module.base_layer is head):
                continue
        elif not _matches(name, spec):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        found.append(name)
    if not found:
        shown = list(spec) if isinstance(spec, tuple) else spec
        raise TargetError(f"target_modules={shown!r} matched no module of {type(model).__name__}; its "
                          f"adaptable layers are named {_adaptable_names(model)}")
    return found


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
