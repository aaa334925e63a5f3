"""AdaLoraConfig: Hugging Face PEFT 0.21's AdaLoRA fields, defaults and checks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
from peft_core.config import ANY, FrozenDict, PeftConfig, check, short_repr, to_layer_indices, to_str_tuple
from peft_core.errors import ConfigError

__all__ = ["AdaLoraConfig"]


def _rank_pattern(value: Any) -> Any:
    """JSON lists of booleans become tuples (configs are hashable); None stays None (PEFT's default)."""
    if value is None or not isinstance(value, Mapping):
        return value
    return FrozenDict({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()})


def _rank_pattern_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ConfigError(f"AdaLoraConfig.rank_pattern must map '<module path>.lora_E' to a list of booleans (one "
                          f"per initial rank: kept or pruned), or be None; got {short_repr(value)}")
    for key, mask in value.items():
        if not isinstance(key, str) or ".lora_E" not in key:
            raise ConfigError(f"AdaLoraConfig.rank_pattern: keys are '<module path>.lora_E' (as AdaLoRA writes "
                              f"them), got {short_repr(key)}")
        if not isinstance(mask, tuple) or not all(isinstance(b, bool) for b in mask):
            raise ConfigError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of booleans, got "
                              f"{short_repr(mask)}")


def _int_to_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


@attrs.frozen(kw_only=True)
class AdaLoraConfig(PeftConfig):
    """AdaLoRA (Zhang et al., 2023): an SVD-shaped update ``B diag(E) A * lora_alpha / ranknum`` whose ranks are
    pruned during training, from ``init_r`` per layer to ``target_r`` on average, by importance.

    The schedule has three phases over ``total_step`` optimiser steps: ``tinit`` warm-up steps at full rank,
    a cubic decrease of the total rank budget (masking every ``deltaT`` steps) until ``total_step - tfinal``,
    and ``tfinal`` final steps at the reached ranks. ``rank_pattern`` records which ranks each layer kept (set
    by the schedule; saved files hold only the kept ranks)."""

    peft_type: ClassVar[str] = "ADALORA"
    #: PEFT's LoraConfig fields that AdaLoRA does not use (PEFT ignores or refuses them for AdaLoRA too).
    peft_inert_fields: ClassVar[Mapping[str, Any]] = {
        "use_rslora": ANY, "alpha_pattern": ANY, "megatron_config": None, "megatron_core": ANY,
        "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
        "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
        "use_qalora": False, "qalora_group_size": ANY, "monteclora_config": None, "layer_replication": None,
        "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
        "kasa_config": None, "ensure_weight_tying": False,
    }

    #: What PEFT writes for those fields (an AdaLoraConfig is a LoraConfig there): written too, so the two files
    #: hold the same fields.
    peft_written_defaults: ClassVar[Mapping[str, Any]] = {
        "use_rslora": False, "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
        "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
        "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
        "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
        "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
        "kasa_config": None, "ensure_weight_tying": False,
    }

    #: LoRA's rank, unused by AdaLoRA (``init_r`` is the initial rank); a value other than 8 warns, as in PEFT.
    r: int = attrs.field(default=8, validator=check(int, low=0))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=check((tuple, str), optional=True))
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=check((tuple, str), optional=True))
    #: The update's scale numerator: ``lora_alpha / ranknum`` (``ranknum`` is ``init_r``); 0 means ``r``.
    lora_alpha: int | float = attrs.field(default=8, validator=check((int, float), low=0))
    lora_dropout: float = attrs.field(default=0.0, converter=_int_to_float,
                                      validator=check(float, low=0.0, high=0.999999))
    fan_in_fan_out: bool = attrs.field(default=False, validator=check(bool))
    bias: str = attrs.field(default="none", validator=check(str, choices=("none",),
                                                            fix="peft-core's AdaLoRA trains no biases."))
    #: True: E zero (the model starts as the base model), A and B normal with std 0.02; False: all normal.
    init_lora_weights: bool = attrs.field(default=True, validator=check(bool))
    layers_to_transform: int | tuple[int, ...] | None = attrs.field(default=None, converter=to_layer_indices,
                                                                     validator=check((int, tuple), optional=True))
    layers_pattern: str | tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                               validator=check((str, tuple), optional=True))
    #: The target average rank per layer at the end of the budget phase.
    target_r: int = attrs.field(default=8, validator=check(int, low=0))
    #: The initial rank of every layer.
    init_r: int = attrs.field(default=12, validator=check(int, low=0))
    #: Warm-up steps at full budget.
    tinit: int = attrs.field(default=0, validator=check(int, low=0))
    #: Final steps at the reached ranks (no more reallocation).
    tfinal: int = attrs.field(default=0, validator=check(int, low=0))
    #: Steps between two budget allocations in the budget phase.
    deltaT: int = attrs.field(default=1, validator=check(int, low=1))
    #: EMA coefficients of the sensitivity and of its uncertainty.
    beta1: float = attrs.field(default=0.85, converter=_int_to_float, validator=check(float))
    beta2: float = attrs.field(default=0.85, converter=_int_to_float, validator=check(float))
    #: Weight of the orthogonality regulariser added to the training loss.
    orth_reg_weight: float = attrs.field(default=0.5, converter=_int_to_float, validator=check(float))
    #: The number of optimiser steps the schedule spans; required, as in PEFT.
    total_step: int | None = attrs.field(default=None, validator=check(int, optional=True))
    #: Which initial ranks each layer keeps (``{"<path>.lora_E": [True, False, ...]}``); set by the schedule.
    rank_pattern: dict[str, tuple[bool, ...]] | None = attrs.field(default=None, converter=_rank_pattern,
                                                                   validator=_rank_pattern_ok)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for AdaLoRA: these fields plus LoRA's unused ones at PEFT's values."""
        return {**self.peft_written_defaults, **super().to_dict()}

    def __attrs_post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("AdaLoraConfig.layers_to_transform cannot be used when target_modules is a regex "
                              "string; give target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("AdaLoraConfig.layers_pattern needs layers_to_transform too; set it, or drop "
                              "layers_pattern")
        if self.r != 8:
            warnings.warn("AdaLoraConfig.r is not used by AdaLoRA and is ignored; the initial rank is init_r",
                          UserWarning, stacklevel=4)
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError(f"AdaLoraConfig.total_step must be the number of training steps (an int > 0), got "
                              f"{self.total_step!r}: AdaLoRA's rank schedule is laid out over it")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"AdaLoraConfig: tinit={self.tinit}, tfinal={self.tfinal} and total_step="
                              f"{self.total_step} leave no budgeting phase (tinit must be < total_step - tfinal); "
                              "decrease tinit or tfinal, or increase total_step")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"AdaLoraConfig.{name} must be between 0 and 1 (exclusive), got {value}")
