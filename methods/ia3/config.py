"""``IA3Config``: the fields of Hugging Face PEFT 0.21's ``IA3Config``, as a frozen, validated value."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, check, short_repr, to_str_tuple
from peft_core.errors import ConfigError

__all__ = ["IA3Config"]


def _module_spec(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a list of module names or a regex "
                          f"string, got {short_repr(value)}")


@attrs.frozen(kw_only=True)
class IA3Config(PeftConfig):
    """(IA)^3 (Liu et al., 2022): a learned vector rescales the output of each targeted layer, or its input
    for the layers named in ``feedforward_modules``.

    - ``target_modules``: names (a module matches when its path equals one or ends with ``"." + name``), a
      regex that must match the whole path, ``"all-linear"``, or None for PEFT's defaults per architecture.
    - ``exclude_modules``: the same forms, taken out of the targets.
    - ``feedforward_modules``: the targets whose *input* is scaled (PEFT's rule: a regex matches the whole
      path; a list entry matches a path that ends with it). None: PEFT's defaults per architecture. With
      ``target_modules`` as a list it must be a subset of it (PEFT refuses otherwise).
    - ``fan_in_fan_out``: whether the targets store their weight as (in, out). The layer type decides it
      here (GPT-2's ``Conv1D`` does, ``nn.Linear`` does not); the completed config says it for PEFT.
    - ``init_ia3_weights``: vectors of ones (the identity, the default), or random normal values (tests).
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_module_spec)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_module_spec)
    feedforward_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                     validator=_module_spec)
    fan_in_fan_out: bool = attrs.field(default=False, validator=check(bool))
    init_ia3_weights: bool = attrs.field(default=True, validator=check(bool, fix="use True (identity) or False"))

    def __attrs_post_init__(self) -> None:
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if stray:
                raise ConfigError(f"IA3Config.feedforward_modules must be a subset of target_modules (as in PEFT); "
                                  f"{stray} are not in target_modules={list(self.target_modules)}. Add them to "
                                  "target_modules or drop them from feedforward_modules")
