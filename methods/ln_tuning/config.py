"""``LNTuningConfig``: the fields of Hugging Face PEFT 0.21's ``LNTuningConfig``, as a frozen, validated value."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, short_repr, to_str_tuple
from peft_core.errors import ConfigError

__all__ = ["LNTuningConfig"]


def _module_spec(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a list of module names or a regex "
                          f"string, got {short_repr(value)}")


@attrs.frozen(kw_only=True)
class LNTuningConfig(PeftConfig):
    """LayerNorm tuning (Zhao et al., 2023): each adapter trains its own copy of every targeted module (the
    models' LayerNorm/RMSNorm layers by default), which replaces the original while the adapter is active.

    - ``target_modules``: names (a module matches when its path equals one or ends with ``"." + name``), a
      regex that must match the whole path, or None for PEFT's defaults per architecture.
    - ``exclude_modules``: the same forms, taken out of the targets.
    - ``modules_to_save``: further modules trained whole (task heads are added by the task model).
    """

    peft_type: ClassVar[str] = "LN_TUNING"

    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_module_spec)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_module_spec)
