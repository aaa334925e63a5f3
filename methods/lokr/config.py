"""``LoKrConfig``: the fields of Hugging Face PEFT 0.21's ``LoKrConfig`` (a LyCORIS config), frozen and validated."""

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

__all__ = ["LoKrConfig"]


def _module_spec(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
        return
    if isinstance(value, str):
        if value != "all-linear":  # a regex: an invalid (or catastrophic) one is refused now, not at inject
            compile_module_pattern(value, f"{type(instance).__name__}.{attribute.name}")
        return
    raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a list of module names, a regex string, "
                      f"'all-linear' or None, got {short_repr(value)}")


def _patterns(value: Any) -> Any:
    if value is None:
        return FrozenDict()
    if isinstance(value, Mapping):
        return FrozenDict(value)
    return value  # the validator names it


def _pattern_values(kind: type | tuple[type, ...]) -> Any:
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        name = f"{type(instance).__name__}.{attribute.name}"
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping of module-name patterns to values, got {short_repr(value)}")
        for key, v in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{name}: keys must be non-empty module-name patterns, got {short_repr(key)}")
            # not (0 < v <= 1e6) also refuses NaN; PEFT divides by the rank, so 0 is meaningless there too
            if isinstance(v, bool) or not isinstance(v, kind) or not 0 < v <= 1_000_000:
                raise ConfigError(f"{name}[{short_repr(key)}] must be a positive number (an int for ranks) at most "
                                  f"1e6, got {short_repr(v)}")
            # the key is used as re.match(rf"(.*\.)?(?:{key})$", module_path), PEFT's rank_pattern lookup
            compile_module_pattern(rf"(.*\.)?(?:{key})$", f"{name} key {short_repr(key)}, as the regex")
    return validate


def _to_float(value: Any) -> Any:
    """JSON's 0 and 1 mean 0.0 and 1.0."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    return value


def _init_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is True or value is False or value == "lycoris":
        return
    raise ConfigError(f"LoKrConfig.init_weights must be True (w1 zero: the adapter starts as the identity), "
                      f"'lycoris' (w2 zero, LyCORIS' style) or False (all random, for tests), got {short_repr(value)}")


@attrs.frozen(kw_only=True)
class LoKrConfig(PeftConfig):
    """LoKr (LyCORIS' low-rank Kronecker product): ``W x + kron(w1, w2) x * alpha / r`` on the targeted layers.

    ``w1`` holds the small factors of the output and input sizes (``factorization(dim, decompose_factor)``), ``w2``
    the large ones. Each is a full matrix, or the product of two rank-``r`` factors when ``r`` is below half of its
    larger side (``w1`` only with ``decompose_both=True``), exactly as Hugging Face PEFT chooses, so its files load.

    - ``r``, ``alpha``: the rank of the decomposed factors and the scale ``alpha / r`` (applied whether the factors
      are full or not, as PEFT does; LyCORIS itself uses 1 for full factors).
    - ``rank_dropout``: in training, each output row of the update is dropped with this probability
      (``rank_dropout_scale=True`` divides the kept rows by the kept fraction).
    - ``module_dropout``: in training, the whole adapter is skipped for a forward call with this probability.
    - ``use_effective_conv2d``: for Conv1d/Conv2d with a kernel larger than 1, a decomposed ``w2`` is a Tucker core
      ``lokr_t2`` times two factors ("Proposition 3" of FedPara) instead of a flattened matrix.
    - ``decompose_both``, ``decompose_factor``: see above; ``-1`` factorises near the square root.
    - ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``: PEFT's targeting
      rules (``peft_core.targeting``); None targets the architecture's attention projections (PEFT's LoRA table).
    - ``rank_pattern`` / ``alpha_pattern``: per-module ``r`` / ``alpha`` (a key matches the end of a module path).
    - ``init_weights``: True, ``"lycoris"`` or False (see the error message of a wrong value).
    """

    peft_type: ClassVar[str] = "LOKR"

    r: int = attrs.field(default=8, validator=check(int, low=1, high=1_000_000, fix="r is the rank, e.g. 8."))
    alpha: int | float = attrs.field(default=8, validator=check((int, float), low=0))
    rank_dropout: float = attrs.field(default=0.0, converter=_to_float, validator=check(float, low=0.0, high=1.0))
    module_dropout: float = attrs.field(default=0.0, converter=_to_float, validator=check(float, low=0.0, high=1.0))
    use_effective_conv2d: bool = attrs.field(default=False, validator=check(bool))
    decompose_both: bool = attrs.field(default=False, validator=check(bool))
    decompose_factor: int = attrs.field(default=-1, validator=check(int, low=-1, fix="use -1 (near the square "
                                                                                     "root) or a positive factor"))
    rank_dropout_scale: bool = attrs.field(default=False, validator=check(bool))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_module_spec)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_module_spec)
    init_weights: bool | str = attrs.field(default=True, validator=_init_ok)
    layers_to_transform: int | tuple[int, ...] | None = attrs.field(default=None, converter=to_layer_indices,
                                                                     validator=check_layer_indices)
    layers_pattern: str | tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                               validator=check((str, tuple), optional=True))
    rank_pattern: dict[str, int] = attrs.field(factory=FrozenDict, converter=_patterns, validator=_pattern_values(int))
    alpha_pattern: dict[str, int | float] = attrs.field(factory=FrozenDict, converter=_patterns,
                                                        validator=_pattern_values((int, float)))

    def __attrs_post_init__(self) -> None:
        if self.layers_pattern is not None and self.layers_to_transform is None:  # PEFT refuses it too
            raise ConfigError("LoKrConfig.layers_pattern only has a meaning with layers_to_transform; set "
                              "layers_to_transform too, or drop layers_pattern")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # PEFT silently ignores layers_to_transform next to a regex; refusing says so instead of surprising
            raise ConfigError(f"LoKrConfig.layers_to_transform cannot be combined with a regex target_modules "
                              f"({self.target_modules!r}) (PEFT ignores it there); put the layer indices in the "
                              "regex, or give target_modules as a list of names")
