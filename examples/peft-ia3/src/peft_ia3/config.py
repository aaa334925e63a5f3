"""IA3Config: the fields Hugging Face PEFT writes for (IA)^3, with the same names and meanings."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, check, to_str_tuple
from peft_core.errors import ConfigError

__all__ = ["IA3Config"]


def _modules_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A list of module names (exact or ``.``-suffix match), a regex (full match), 'all-linear', or None."""
    name = f"{type(instance).__name__}.{attribute.name}"
    if value is None or isinstance(value, tuple):
        return
    if isinstance(value, str):
        if value == "all-linear" and attribute.name != "target_modules":
            raise ConfigError(f"{name}='all-linear' is only meaningful for target_modules")
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression ({e}); give a list of "
                              "module names, or a valid regex") from None
        return
    raise ConfigError(f"{name} must be a list of module names, a regex string or None, got {value!r}")


@attrs.frozen(kw_only=True)
class IA3Config(PeftConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale activations of the targeted layers.

    - ``target_modules``: the layers to adapt. A list matches a module whose name equals an entry or ends
      with ``"." + entry``; a string is a regex that must match the whole name; ``"all-linear"`` takes every
      ``nn.Linear``/``Conv1D`` except the output head; ``None`` uses the architecture's defaults.
    - ``exclude_modules``: layers to leave alone, matched the same way.
    - ``feedforward_modules``: which targets are "feed-forward": their vector scales the layer's *input*
      (shape ``(1, in_features)``) instead of its output (``(out_features, 1)``). A list matches names that
      *end with* an entry (Hugging Face PEFT's rule, kept so that configs mean the same in both); a string
      is a full-match regex; ``None`` uses the architecture's defaults.
    - ``fan_in_fan_out``: the layer stores its weight as (in, out), like GPT-2's ``Conv1D``. The plugin
      reads the layout from the layer type and warns when this disagrees.
    - ``init_ia3_weights``: start from ones (the identity); ``False`` starts from random values.
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_modules_ok)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_modules_ok)
    feedforward_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                     validator=_modules_ok)
    fan_in_fan_out: bool = attrs.field(default=False, validator=check(bool))
    init_ia3_weights: bool = attrs.field(default=True, validator=check(bool))

    def __attrs_post_init__(self) -> None:
        # A feed-forward module that is not a target would silently do nothing; PEFT refuses it too.
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            stray = [m for m in self.feedforward_modules if m not in self.target_modules]
            if stray:
                raise ConfigError(f"IA3Config.feedforward_modules must be a subset of target_modules; "
                                  f"{stray} are not targets (target_modules={list(self.target_modules)})")
