"""PEFT's LoRA-*variant* fields of :class:`~peft_lora.LoraConfig`, as data: ``use_bdlora``, ``kasa_config`` and
``velora_config`` (each a PEFT sub-config), beside ``use_dora`` and the variant value of ``init_lora_weights``
(``"mica"``).

LoRA itself implements only DoRA. The other variants are implemented by plugins (peft-core's ``lora_variants``
extension) through LoRA's ``lora_variant`` hook; the fields live here, in LoRA's config, so that a config reads and
writes the same whether or not such a plugin is installed, and a file that asks for a variant no installed plugin
implements fails at ``inject`` with a message naming the field, before the model changes
(:func:`peft_lora.variant.check_claims`).

A sub-config is stored as a read-only dict holding every one of PEFT's keys, defaults filled in, so the
``adapter_config.json`` written is the one PEFT writes for the same settings. It accepts a mapping (a JSON object,
``{"nblocks": 2}``) or PEFT's own dataclass (``peft.tuners.lora.config.KasaConfig()``); ``None`` is off, and an
empty mapping is *on* with PEFT's defaults (as in PEFT). Keys PEFT does not define are a ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from peft_core.config import FrozenDict, short_repr
from peft_core.errors import ConfigError

__all__ = ["SUBCONFIGS", "VARIANT_FIELDS", "VARIANT_INITS", "subconfig"]

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def _number(low: float, strict: bool) -> Check:
    def problem(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a finite number"
        if v < low or (strict and v == low):
            return f"must be {'>' if strict else '>='} {low}"
        return None
    return problem


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "must be an int >= 1"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def _choice(*options: str) -> Check:
    return lambda v: None if v in options else f"must be one of {list(options)!r}"


def _names(v: Any) -> str | None:
    ok = v is None or (isinstance(v, tuple) and all(isinstance(s, str) and s for s in v))
    return None if ok else "must be a list of module-name substrings or None"


#: PEFT 0.21's sub-configs: field -> {key: (PEFT's default, check)}, keys in PEFT's order.
SUBCONFIGS: Mapping[str, Mapping[str, tuple[Any, Check]]] = {
    "use_bdlora": {"target_modules_bd_a": (None, _names), "target_modules_bd_b": (None, _names),
                   "nblocks": (1, _count), "match_strict": (True, _flag)},
    "kasa_config": {"beta": (1e-4, _number(0, strict=False)), "gamma": (1e-3, _number(0, strict=False))},
    "velora_config": {"num_groups": (64, _count), "scale": (1.0, _number(0, strict=True)),
                      "init_type": ("batch_average", _choice("batch_average", "batch_average_once", "random"))},
}
_PEFT_CLASS = {"use_bdlora": "BdLoraConfig", "kasa_config": "KasaConfig", "velora_config": "VeloraConfig"}

#: The LoraConfig fields that ask for a LoRA variant when set (not None/False); a variant claims them.
VARIANT_FIELDS = ("use_dora", *SUBCONFIGS)
#: Values of ``init_lora_weights`` that are variants (PEFT's MiCA also freezes B), not LoRA initialisations.
VARIANT_INITS = frozenset({"mica"})


def subconfig(name: str) -> Callable[[Any], Any]:
    """The converter of the LoraConfig field ``name`` (one of :data:`SUBCONFIGS`): None, or the sub-config as a
    read-only dict with all of PEFT's keys; a ConfigError naming the field and key for anything else."""
    schema = SUBCONFIGS[name]

    def convert(value: Any) -> Any:
        if value is None:
            return None
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # PEFT's own sub-config object
            value = dataclasses.asdict(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"LoraConfig.{name} must be a mapping of PEFT's {_PEFT_CLASS[name]} fields "
                              f"({', '.join(schema)}) or None, got {short_repr(value)}")
        unknown = [k for k in value if k not in schema]
        if unknown:
            raise ConfigError(f"LoraConfig.{name} has key {short_repr(unknown[0])}, which PEFT's "
                              f"{_PEFT_CLASS[name]} does not support (its fields: {', '.join(schema)})")
        out = {}
        for key, (default, check) in schema.items():
            v = value.get(key, default)
            v = tuple(v) if isinstance(v, list) else v  # JSON lists: tuples, so configs stay hashable
            problem = check(v)
            if problem:
                raise ConfigError(f"LoraConfig.{name}[{key!r}] {problem}, got {short_repr(v)}")
            out[key] = v
        if name == "use_bdlora":  # as PEFT: a module cannot have both factors block-diagonal
            both = set(out["target_modules_bd_a"] or ()) & set(out["target_modules_bd_b"] or ())
            if both:
                raise ConfigError(f"LoraConfig.use_bdlora names {sorted(both)} in both target_modules_bd_a and "
                                  "target_modules_bd_b; a module has a block-diagonal A or B, not both")
        return FrozenDict(out)

    return convert

