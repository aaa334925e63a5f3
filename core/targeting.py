"""Which modules a method adapts, by Hugging Face PEFT's rules — one implementation for every method.

PEFT's tuners share their targeting rules; so do peft-core's plugins, through :func:`find_targets`:

- ``target_modules``: a list of names (a module matches when its path *equals* an entry or *ends with*
  ``"." + entry``), a regex string (must match the *whole* path), ``"all-linear"`` (every linear-like layer
  but the output head), or None (the architecture's defaults from a table such as
  :data:`DEFAULT_ATTENTION_TARGETS`, keyed by ``model.config.model_type``);
- ``exclude_modules``: the same forms, taken out afterwards;
- ``layers_to_transform`` / ``layers_pattern``: keep modules of these layer indices (the number after
  ``layers``, ``h``, ``block``... in the path, or after the given pattern);
- ``modules_to_save`` modules, and everything inside them or another adapter's copies, are never targets
  (the module is trained whole; an adapter inside the copy would not be in PEFT's file);
- a module inside an adapter layer (its ``base_layer``) is never a target of its own: the layer is.

Errors name the model class and the names its adaptable layers do have. Example (a method plugin)::

    from peft_core.targeting import DEFAULT_ATTENTION_TARGETS, find_targets

    paths = find_targets(model, config.target_modules, exclude_modules=config.exclude_modules,
                         modules_to_save=config.modules_to_save, adaptable=is_linear, linear=is_linear,
                         default_targets=DEFAULT_ATTENTION_TARGETS, method="LoHa")
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

from .errors import TargetError
from .layers import is_adapter_layer
from .modules_to_save import ModulesToSave

__all__ = ["DEFAULT_ATTENTION_TARGETS", "LAYER_NAMES", "find_targets", "layer_index", "matches",
           "output_layer_names", "pattern_value"]

#: ``target_modules=None``: the attention projections each architecture family adapts by default (the same
#: choice as Hugging Face PEFT's LoRA defaults, which most of its methods share).
DEFAULT_ATTENTION_TARGETS: Mapping[str, tuple[str, ...]] = {
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

#: Where transformers models keep their numbered layers (``model.layers.3``, ``transformer.h.3``...).
LAYER_NAMES = ("layers", "h", "block", "blocks", "layer")

#: Names of output heads, which ``"all-linear"`` leaves alone.
_HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "qa_outputs"})


def matches(name: str, spec: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry equals the path or is a suffix
    after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, patterns: Iterable[str] = LAYER_NAMES) -> int | None:
    """The layer number in ``name`` after one of ``patterns`` (``model.layers.3.self_attn`` -> 3), or None."""
    for pat in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def output_layer_names(model: nn.Module) -> set[str]:
    """The output head(s): the module ``get_output_embeddings()`` returns, and modules named like heads."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (head is not None and (module is head or getattr(module, "base_layer", None) is head)) \
                or name.split(".")[-1] in _HEAD_NAMES:
            names.add(name)
    return names


def pattern_value(patterns: Mapping[str, float], name: str) -> float | None:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key whose regex matches the end of ``name``
    (at a dot boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return None


def _saved(name: str, modules_to_save: Sequence[str]) -> bool:
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in modules_to_save)


def _leaf_names(model: nn.Module, adaptable: Callable[[nn.Module], bool]) -> str:
    leaves = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and adaptable(m)})
    return ", ".join(leaves[:20]) or "(none)"


def find_targets(model: nn.Module, target_modules: str | Sequence[str] | None, *,
                 adaptable: Callable[[nn.Module], bool], linear: Callable[[nn.Module], bool] | None = None,
                 exclude_modules: str | Sequence[str] | None = None,
                 layers_to_transform: int | Sequence[int] | None = None,
                 layers_pattern: str | Sequence[str] | None = None, modules_to_save: Sequence[str] | None = None,
                 default_targets: Mapping[str, Sequence[str]] | None = None, method: str = "this method",
                 ) -> list[str]:
    """Paths of the modules to adapt, in model order (see the module docstring for the rules).

    ``adaptable(module)``: the module types the method can adapt (for messages). ``linear(module)``: what
    ``"all-linear"`` selects (default: ``adaptable``). ``default_targets``: the table for
    ``target_modules=None``. Raises :class:`TargetError` naming the model class and its adaptable layer names
    when nothing matches, or when there are no defaults for the architecture.
    """
    spec = target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec is None:
        if not default_targets or model_type not in default_targets:
            raise TargetError(
                f"target_modules=None, and {method} has no default targets for model_type={model_type!r} "
                f"({type(model).__name__}); set target_modules, e.g. from: {_leaf_names(model, adaptable)}")
        spec = tuple(default_targets[model_type])
    is_linear = linear or adaptable
    all_linear = spec == "all-linear"
    heads = output_layer_names(model) if all_linear else set()
    wanted_layers = None if layers_to_transform is None else (
        {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform))
    patterns = (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern or LAYER_NAMES)
    saved = tuple(modules_to_save or ())
    # named_modules() walks depth first: a subtree's modules come right after its root, so one prefix at a time
    # tells what lies inside an adapter layer, a modules_to_save wrapper or an already chosen module (none of
    # which is a target) — a list of them made this quadratic in the model's size
    closed: str | None = None
    skipped_saved = False
    found: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if closed is not None:
            if name.startswith(closed):
                continue
            closed = None
        if isinstance(module, ModulesToSave):
            closed = name + "."
            skipped_saved = True
            continue
        layer = is_adapter_layer(module)
        if layer:
            closed = name + "."
        if _saved(name, saved):
            skipped_saved = True
            continue
        if all_linear:
            inner = module.base_layer if layer else module
            if not is_linear(inner) or name in heads:
                continue
        elif not matches(name, spec):
            continue
        if exclude_modules is not None and matches(name, exclude_modules):
            continue
        if wanted_layers is not None:
            idx = layer_index(name, patterns)
            if idx is None or idx not in wanted_layers:
                continue
        found.append(name)
        closed = name + "."  # inside a chosen module: not a target of its own
    if not found:
        shown = list(spec) if not isinstance(spec, str) else spec
        extra = ""
        if wanted_layers is not None:
            extra = f" with layers_to_transform={layers_to_transform!r}"
        if exclude_modules is not None:
            shown_ex = list(exclude_modules) if not isinstance(exclude_modules, str) else exclude_modules
            extra += f" and exclude_modules={shown_ex!r}"
        if skipped_saved and saved:
            extra += f" (modules_to_save={list(saved)} and their copies are never targets)"
        hint = ""
        if isinstance(spec, str) and spec != "all-linear" and re.fullmatch(r"[\w.]+", spec):
            hint = (f". A string is a regex that must match the whole module path (PEFT's rule); to match modules "
                    f"by name use a list: target_modules=[{spec!r}]")
        raise TargetError(f"target_modules={shown!r}{extra} matched no module of {type(model).__name__}; "
                          f"its adaptable layers are named {_leaf_names(model, adaptable)}{hint}")
    return found
