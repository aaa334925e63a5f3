"""RoadConfig: the fields Hugging Face PEFT writes for RoAd, with the same names and meanings."""

from __future__ import annotations

from typing import ClassVar

import attrs
from peft_core.config import PeftConfig, check, to_str_tuple
from peft_core.errors import ConfigError

__all__ = ["VARIANTS", "RoadConfig"]

VARIANTS = ("road_1", "road_2", "road_4")


def _even(instance: RoadConfig, attribute: attrs.Attribute, value: int) -> None:
    if value % 2:
        raise ConfigError(f"RoadConfig.group_size={value} must be even: each group pairs its first half with "
                          "its second half")


@attrs.frozen(kw_only=True)
class RoadConfig(PeftConfig):
    """RoAd (Liao et al., 2024): learned 2-D rotations, each with a scale, of a layer's output features.

    - ``variant``: ``"road_1"`` shares one angle and one scale per pair of features (out/2 of each per
      layer); ``"road_2"`` has one per feature (out); ``"road_4"`` has separate ones for the diagonal and
      the off-diagonal of every 2x2 block (2*out).
    - ``group_size``: features are paired within groups of this size: feature ``i`` of a group with feature
      ``i + group_size/2``. Every target's ``out_features`` must be a multiple of it.
    - ``init_weights``: start from angles 0 and scales 1 (the identity); ``False`` draws random ones.
    - ``target_modules``: the ``nn.Linear`` layers to adapt: names (exact, or a ``.``-suffix), a regex that
      must match the whole name, ``"all-linear"``, or ``None`` for the architecture's defaults.
    """

    peft_type: ClassVar[str] = "ROAD"

    variant: str = attrs.field(default="road_1", validator=check(str, choices=VARIANTS))
    group_size: int = attrs.field(default=64, validator=[check(int, low=2), _even])
    init_weights: bool = attrs.field(default=True, validator=check(bool))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple)
