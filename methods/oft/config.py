"""``OFTConfig``: the fields of Hugging Face PEFT 0.21's ``OFTConfig``, as a frozen, validated value."""

from __future__ import annotations

import re
import warnings
from typing import Any, ClassVar

import attrs
from peft_core.config import PeftConfig, check, check_layer_indices, short_repr, to_layer_indices, to_str_tuple
from peft_core.errors import ConfigError
from peft_core.patterns import compile_module_pattern

__all__ = ["OFTConfig"]


def _module_spec(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
        return
    if isinstance(value, str):
        if value != "all-linear":
            compile_module_pattern(value, f"{type(instance).__name__}.{attribute.name}")
        return
    raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a list of module names, a regex string, "
                      f"'all-linear' or None, got {short_repr(value)}")


@attrs.frozen(kw_only=True)
class OFTConfig(PeftConfig):
    """Orthogonal fine-tuning (Qiu et al., 2023; Liu et al., 2024): the input of each targeted layer is
    rotated by a learned block-diagonal orthogonal matrix, so the layer computes ``base(x @ R)``.

    - ``r`` / ``oft_block_size``: exactly one of them is non-zero (PEFT's rule, with its defaults ``r=0``,
      ``oft_block_size=32``); ``r`` is the number of blocks per layer, ``oft_block_size`` their size, and
      ``r * oft_block_size`` equals the rotated dimension (a Linear's ``in_features``, a Conv2d's
      ``in_channels * kh * kw``, an Embedding's ``embedding_dim``). A value that does not divide it is moved to
      the nearest one that does, per layer, with a warning, as PEFT does.
    - ``use_cayley_neumann`` / ``num_cayley_neumann_terms``: the rotation of a skew-symmetric block ``Q`` is the
      exact Cayley transform ``(I - Q)(I + Q)^-1`` or, by default, PEFT's truncated Neumann series
      ``I + 2Q + 2Q^2 + ... + 2Q^(m-2) + Q^(m-1)`` (cheaper, only nearly orthogonal). As in PEFT, the series is that of
      ``(I + Q)(I - Q)^-1``, the *transpose* of the exact transform: switching the option on a trained adapter
      changes what it computes.
    - ``coft`` / ``eps``: constrained OFT: before each use, every block's skew matrix is pulled back into a ball
      of radius ``eps / sqrt(blocks)`` around zero (written back into the parameter, as PEFT does).
    - ``block_share``: one block shared by all block positions of a layer.
    - ``module_dropout``: accepted and written for PEFT, but has no effect: PEFT 0.21 builds its block dropout and
      never calls it, and this plugin matches what PEFT computes.
    - ``bias``: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"oft_only"`` (the adapted
      layers' biases).
    - ``init_weights``: True gives zero skew matrices (the identity rotation); False draws them from
      ``N(0, 0.1)`` (tests).
    - ``fan_in_fan_out``: PEFT's OFT adapts no transposed layer (GPT-2's ``Conv1D`` is refused), so the completed
      config always says False, as PEFT corrects it.
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = attrs.field(default=0, validator=check(int, low=0))
    oft_block_size: int = attrs.field(default=32, validator=check(int, low=0))
    module_dropout: float = attrs.field(default=0.0, converter=lambda v: float(v) if isinstance(v, int)
                                        and not isinstance(v, bool) else v, validator=check(float, low=0.0, high=1.0))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_module_spec)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_module_spec)
    fan_in_fan_out: bool = attrs.field(default=False, validator=check(bool))
    bias: str = attrs.field(default="none", validator=check(str, choices=("none", "all", "oft_only")))
    init_weights: bool = attrs.field(default=True, validator=check(bool, fix="use True (identity) or False "
                                                                             "(random, for tests)"))
    layers_to_transform: int | tuple[int, ...] | None = attrs.field(default=None, converter=to_layer_indices,
                                                                     validator=check_layer_indices)
    layers_pattern: str | tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                               validator=check((str, tuple), optional=True))
    coft: bool = attrs.field(default=False, validator=check(bool))
    eps: float = attrs.field(default=6e-5, converter=lambda v: float(v) if isinstance(v, int)
                             and not isinstance(v, bool) else v, validator=check(float, low=0.0))
    block_share: bool = attrs.field(default=False, validator=check(bool))
    use_cayley_neumann: bool = attrs.field(default=True, validator=check(bool))
    num_cayley_neumann_terms: int = attrs.field(default=5, validator=check(int, low=1))

    def __attrs_post_init__(self) -> None:
        # PEFT's three checks, in its order
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("OFTConfig.layers_pattern is given but layers_to_transform is not; layers_pattern only "
                              "says where the layer index is, so give layers_to_transform too (as PEFT requires)")
        if self.r == 0 and self.oft_block_size == 0:
            raise ConfigError(f"OFTConfig: either r or oft_block_size must be non-zero, got r={self.r} and "
                              f"oft_block_size={self.oft_block_size}; set oft_block_size (e.g. 32)")
        if self.r != 0 and self.oft_block_size != 0:
            raise ConfigError(f"OFTConfig: give r ({self.r}) or oft_block_size ({self.oft_block_size}), not both, "
                              "since r * oft_block_size is the layer's input size; set the other to 0 (e.g. "
                              "OFTConfig(r=8, oft_block_size=0)). An adapter_config.json written by PEFT < 0.14 "
                              "lacks oft_block_size: such adapters cannot be loaded (PEFT refuses them too)")
        if self.use_cayley_neumann and _older_than_0_18(self.peft_version):
            # PEFT 0.18 changed its Neumann series; PEFT warns the same way
            warnings.warn(f"OFTConfig: this adapter was written by PEFT {self.peft_version}, before PEFT 0.18 changed "
                          "the Cayley-Neumann series it uses (use_cayley_neumann=True); its rotations are computed "
                          "with the new series and differ from what it was trained with. Retrain it with PEFT >= "
                          "0.18 or peft-core", stacklevel=3)


def _older_than_0_18(version: str | None) -> bool:
    """Whether a ``peft_version`` such as ``"0.17.1"`` or ``"0.16.0@abc123"`` is before 0.18 (major.minor is
    enough, and it avoids a dependency on ``packaging``); False for anything unparsable."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return m is not None and (int(m.group(1)), int(m.group(2))) < (0, 18)
