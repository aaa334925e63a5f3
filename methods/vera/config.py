"""``VeraConfig``: the fields of Hugging Face PEFT 0.21's ``VeraConfig``, as a frozen, validated value."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, check, check_layer_indices, short_repr, to_layer_indices, to_str_tuple
from peft_core.errors import ConfigError

__all__ = ["VeraConfig"]


def _module_spec(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a list of module names or a regex "
                          f"string, got {short_repr(value)}")


def _float(value: Any) -> Any:
    """JSON writes ``0.0`` as ``0`` in some tools: an int is a float here (a bool is still refused)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


@attrs.frozen(kw_only=True)
class VeraConfig(PeftConfig):
    """VeRA (Kopiczko et al., 2024): one pair of frozen random matrices per adapter, shared by every adapted
    layer, and two small trained vectors per layer that scale them.

    - ``r``: the rank of the shared projections (``vera_A`` is ``r x max_in``, ``vera_B`` is ``max_out x r``);
      larger than a LoRA rank, since a layer trains only ``r + out_features`` numbers.
    - ``target_modules``: names (a module matches when its path equals one or ends with ``"." + name``), a regex
      that must match the whole path, ``"all-linear"``, or None for PEFT's defaults per architecture.
    - ``projection_prng_key``: the seed the projections are drawn from (a CPU ``torch.Generator``), the same
      for every VeRA adapter of a model, as PEFT requires.
    - ``save_projection``: write the projections into the adapter file (the default), or leave them out and
      draw them again from ``projection_prng_key`` when loading (smaller files; relies on the generator).
    - ``vera_dropout``: dropout on the adapter branch's input, in training mode only.
    - ``d_initial``: the starting value of every ``vera_lambda_d`` (``vera_lambda_b`` starts at 0, so a new
      adapter changes nothing).
    - ``fan_in_fan_out``: whether the targets store their weight as (in, out); the layer type decides it here
      (GPT-2's ``Conv1D`` does, ``nn.Linear`` does not) and the completed config says it for PEFT.
    - ``bias``: ``"none"``, ``"all"`` (every bias of the model trains) or ``"vera_only"`` (the adapted layers'
      biases train).
    - ``init_weights``: the initialisation above (True), or ``vera_lambda_b = 1`` and a normal random
      ``vera_lambda_d`` (False: an adapter that changes outputs from the start, for tests).
    - ``layers_to_transform`` / ``layers_pattern``: only adapt the blocks with these indices (PEFT's rule).
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = attrs.field(default=256, validator=check(int, low=1, fix="use a positive rank"))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_module_spec)
    projection_prng_key: int = attrs.field(default=0, validator=check(int))
    save_projection: bool = attrs.field(default=True, validator=check(bool))
    vera_dropout: float = attrs.field(default=0.0, converter=_float, validator=check(float, low=0.0, high=1.0))
    d_initial: float = attrs.field(default=0.1, converter=_float, validator=check(float))
    fan_in_fan_out: bool = attrs.field(default=False, validator=check(bool))
    bias: str = attrs.field(default="none", validator=check(str, choices=("none", "all", "vera_only")))
    init_weights: bool = attrs.field(default=True, validator=check(bool))
    layers_to_transform: int | tuple[int, ...] | None = attrs.field(default=None, converter=to_layer_indices,
                                                                     validator=check_layer_indices)
    layers_pattern: str | tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                               validator=check((str, tuple), optional=True))

    def __attrs_post_init__(self) -> None:
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("VeraConfig.layers_pattern only has a meaning with layers_to_transform (PEFT refuses "
                              "it too); set layers_to_transform, or drop layers_pattern")
