"""``LoHaConfig``: the fields Hugging Face PEFT 0.21's ``LoHaConfig`` writes, as a frozen, validated value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
from peft_core.config import (
    FrozenDict,
    PeftConfig,
    check,
    check_layer_indices,
    short_repr,
    to_layer_indices,
    to_str_tuple,
)
from peft_core.errors import ConfigError
from peft_core.patterns import compile_module_pattern
from peft_core.targeting import pattern_value

__all__ = ["LoHaConfig"]


def _modules_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name = f"{type(instance).__name__}.{attribute.name}"
    if value is None:
        return
    if isinstance(value, tuple):
        if all(isinstance(v, str) and v for v in value):
            return
    elif isinstance(value, str):
        if value != "all-linear":
            compile_module_pattern(value, name)  # a regex from a file may be malformed or catastrophic
        return
    raise ConfigError(f"{name} must be a list of module names, a regex string, 'all-linear' or None, "
                      f"got {short_repr(value)}")


def _to_float(value: Any) -> Any:
    # JSON writes 0 for 0.0 now and then; an int here means the same probability
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    return value


def _patterns(value: Any) -> Any:
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        raise ConfigError(f"LoHaConfig.rank_pattern/alpha_pattern must map module-name patterns to values, "
                          f"got {short_repr(value)}")
    return FrozenDict(value)


def _pattern_values(kind: type | tuple[type, ...]) -> Any:
    def validate(instance: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
        for key, v in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"LoHaConfig.{attribute.name}: keys must be non-empty module-name patterns, "
                                  f"got {short_repr(key)}")
            # not (0 < v <= 1e6) also refuses NaN; alpha 0 is allowed (an adapter that does nothing), rank 0 is not
            low_ok = v > 0 if attribute.name == "rank_pattern" else v >= 0
            if isinstance(v, bool) or not isinstance(v, kind) or not (low_ok and v <= 1_000_000):
                raise ConfigError(f"LoHaConfig.{attribute.name}[{short_repr(key)}] must be a "
                                  f"{'positive int' if attribute.name == 'rank_pattern' else 'number >= 0'} "
                                  f"(at most 1e6), got {short_repr(v)}")
            # the key is used as re.match(rf"(.*\.)?(?:{key})$", path), as PEFT's get_pattern_key does
            compile_module_pattern(rf"(.*\.)?(?:{key})$", f"LoHaConfig.{attribute.name} key {short_repr(key)}")
    return validate


@attrs.frozen(kw_only=True)
class LoHaConfig(PeftConfig):
    """LoHa (Hyeon-Woo et al., 2022, FedPara; as in LyCORIS): the weight update is the Hadamard product of two
    rank-``r`` products, ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``, so it can reach rank ``r**2``.

    - ``r``, ``alpha``: the rank of each factor product and the scale numerator (scale = alpha / r).
    - ``rank_dropout``: in training, each output row of ``dW`` is zeroed with this probability and the kept rows
      are rescaled by ``1 / (fraction kept)`` (PEFT's rule, which names it after the rank).
    - ``module_dropout``: in training, the whole adapter is skipped on a layer with this probability, per forward.
    - ``use_effective_conv2d``: for ``Conv1d``/``Conv2d`` with a kernel larger than 1, the Tucker form (a core
      ``hada_t1``/``hada_t2`` of shape ``r x r x kernel`` beside ``r x out`` and ``r x in`` factors) instead of
      flattening the kernel into the input dimension.
    - ``target_modules``: names (a path equals one or ends with ``"." + name``), a regex that must match the whole
      path, ``"all-linear"``, or None for PEFT's defaults per architecture (LoRA's table). ``exclude_modules``:
      the same forms, taken out. ``layers_to_transform`` / ``layers_pattern``: keep only those layer indices.
    - ``init_weights``: True makes ``dW`` zero at the start (``w2_b`` is zeros, the rest Kaiming-uniform, as PEFT);
      False draws every factor at random (tests).
    - ``rank_pattern`` / ``alpha_pattern``: per-module ``r`` / ``alpha``, keyed by a regex matched against the
      end of the module path.

    Layers: ``torch.nn.Linear``, ``torch.nn.Conv1d`` and ``torch.nn.Conv2d``, as in PEFT (GPT-2's ``Conv1D`` is
    refused, as PEFT refuses it).
    """

    peft_type: ClassVar[str] = "LOHA"

    r: int = attrs.field(default=8, validator=check(int, low=1, high=1_000_000, fix="r is the rank, e.g. 8"))
    alpha: int | float = attrs.field(default=8, validator=check((int, float), low=0))
    rank_dropout: float = attrs.field(default=0.0, converter=_to_float, validator=check(float, low=0.0, high=1.0))
    module_dropout: float = attrs.field(default=0.0, converter=_to_float, validator=check(float, low=0.0, high=1.0))
    use_effective_conv2d: bool = attrs.field(default=False, validator=check(bool))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_modules_ok)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_modules_ok)
    init_weights: bool = attrs.field(default=True, validator=check(bool, fix="use True (dW = 0) or False"))
    layers_to_transform: int | tuple[int, ...] | None = attrs.field(default=None, converter=to_layer_indices,
                                                                     validator=check_layer_indices)
    layers_pattern: str | tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                               validator=check((str, tuple), optional=True))
    rank_pattern: dict[str, int] = attrs.field(factory=FrozenDict, converter=_patterns,
                                               validator=_pattern_values(int))
    alpha_pattern: dict[str, int | float] = attrs.field(factory=FrozenDict, converter=_patterns,
                                                        validator=_pattern_values((int, float)))

    def __attrs_post_init__(self) -> None:
        if self.layers_pattern and self.layers_to_transform is None:
            # PEFT refuses it too: a pattern alone would silently select every layer
            raise ConfigError("LoHaConfig.layers_pattern needs layers_to_transform (the layer indices to keep); "
                              "set layers_to_transform or drop layers_pattern")

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """``(r, alpha)`` for the module at ``path``: the first matching ``rank_pattern`` / ``alpha_pattern`` key
        (a regex matched against the end of the path at a dot), else ``r`` / ``alpha``."""
        r = pattern_value(self.rank_pattern, path)
        alpha = pattern_value(self.alpha_pattern, path)
        return int(self.r if r is None else r), float(self.alpha if alpha is None else alpha)
