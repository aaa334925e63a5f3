"""Which modules a LoraConfig adapts: names, regexes, 'all-linear', per-architecture defaults, layer
filters, exclusions, and per-module rank/alpha patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable

from peft_core.errors import TargetError
from torch import nn

from .config import LoraConfig

__all__ = ["DEFAULT_TARGETS", "find_targets", "rank_and_alpha"]

#: target_modules=None: the attention projections each architecture family adapts by default
#: (the same choice as Hugging Face PEFT's defaults).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "umt5": ("q", "v"), "longt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"), "mbart": ("q_proj", "v_proj"), "marian": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",), "bloom": ("query_key_value",), "gpt_neox": ("query_key_value",),
    "opt": ("q_proj", "v_proj"), "gptj": ("q_proj", "v_proj"), "gpt_neo": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"), "phi": ("q_proj", "v_proj"), "falcon": ("query_key_value",),
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"), "deberta": ("in_proj",), "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"), "mpnet": ("q", "v"),
}

_LAYER_NAMES = ("layers", "h", "block", "blocks", "layer")


def _supported(module: nn.Module) -> bool:
    from .layers import supported_base

    return supported_base(module) is not None


def _matches(name: str, spec: str | tuple[str, ...]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, patterns: Iterable[str]) -> int | None:
    for pat in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def _output_layer_names(model: nn.Module) -> set[str]:
    """The output head(s), which 'all-linear' leaves alone."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] in {"lm_head", "score",
                                                                             "classifier", "qa_outputs"}:
            names.add(name)
    return names


def _leaf_names(model: nn.Module) -> list[str]:
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if n and _supported(m)})


def _saved(name: str, modules_to_save: tuple[str, ...]) -> bool:
    """``name`` is, or is inside, a module that ``modules_to_save`` names (the core's rule: the path equals
    an entry or ends in ``.`` + it)."""
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in modules_to_save)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules to adapt, in model order. Raises TargetError naming the model class and
    the module names it does have when nothing matches.

    Modules in ``modules_to_save`` (and inside another adapter's copies) are never targets, as in Hugging
    Face PEFT: the module is trained whole, and a LoRA inside the copy would not be in PEFT's file."""
    from peft_core.modules_to_save import ModulesToSave
    spec = config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec is None:
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(
                f"target_modules=None, and peft-core has no default targets for model_type={model_type!r} "
                f"({type(model).__name__}); set target_modules, e.g. one of: {', '.join(_leaf_names(model)[:12])}")
        spec = DEFAULT_TARGETS[model_type]
    all_linear = spec == "all-linear"
    heads = _output_layer_names(model) if all_linear else set()
    layer_filter = config.layers_to_transform
    wanted_layers = None if layer_filter is None else (
        {layer_filter} if isinstance(layer_filter, int) else set(layer_filter))
    layer_patterns: tuple[str, ...] = ((config.layers_pattern,) if isinstance(config.layers_pattern, str)
                                       else tuple(config.layers_pattern or _LAYER_NAMES))
    exclude = config.exclude_modules
    saved = tuple(config.modules_to_save or ())
    wrapped: list[str] = []
    skipped_saved = False
    found: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, ModulesToSave):
            wrapped.append(name)
        if _saved(name, saved) or any(name == w or name.startswith(w + ".") for w in wrapped):
            skipped_saved = True
            continue
        if all_linear:
            from .layers import supported_base

            kind = supported_base(module)
            if kind not in ("linear", "conv1d") or name in heads:
                continue
        elif not _matches(name, spec):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        if wanted_layers is not None:
            idx = _layer_index(name, layer_patterns)
            if idx is None or idx not in wanted_layers:
                continue
        if any(name.startswith(f + ".") for f in found):
            continue  # inside a module already adapted (a LoRA layer's own children)
        found.append(name)
    if not found:
        shown = list(spec) if isinstance(spec, tuple) else spec
        extra = ""
        if wanted_layers is not None:
            extra = f" with layers_to_transform={config.layers_to_transform!r}"
        if exclude is not None:
            extra += f" and exclude_modules={list(exclude) if isinstance(exclude, tuple) else exclude!r}"
        if skipped_saved:
            extra += f" (modules_to_save={list(saved)} and their copies are never LoRA targets)"
        raise TargetError(f"target_modules={shown!r}{extra} matched no module of {type(model).__name__}; "
                          f"its adaptable layers are named {', '.join(_leaf_names(model)[:20])}")
    return found


def _pattern_value(patterns: dict[str, float], name: str) -> float | None:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return None


def rank_and_alpha(config: LoraConfig, name: str) -> tuple[int, float]:
    """(r, alpha) for the module at ``name``: the first matching rank_pattern/alpha_pattern, else the
    config's r and lora_alpha."""
    r = _pattern_value(config.rank_pattern, name)
    alpha = _pattern_value(config.alpha_pattern, name)
    return int(r if r is not None else config.r), float(alpha if alpha is not None else config.lora_alpha)
