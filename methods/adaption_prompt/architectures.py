"""Which transformers model types LLaMA-Adapter supports, and how each one's attention is read.

The table is Hugging Face PEFT 0.21's: llama and mistral (separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
rotary positions, grouped-query attention) and gpt2 (one fused ``c_attn``, learned positions). Supporting a
model type is more than naming its attention module: the layer recomputes the attention's queries, so it
must know the projection layout and where positions enter.
"""

from __future__ import annotations

import attrs
from peft_core.errors import TargetError
from torch import nn

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of"]


@attrs.frozen
class Architecture:
    """How one family's attention is laid out.

    - ``kind``: ``"rotary"`` (separate q/k/v/o projections, RoPE on the queries, the adapter output goes
      through ``o_proj``) or ``"fused"`` (GPT-2's ``c_attn``; the adapter output is added unprojected, as PEFT
      does).
    - ``target_modules``: the default attention sub-module name.
    - ``projections``: the sub-modules the attention must have for the layer to read it.
    """

    kind: str
    target_modules: str
    projections: tuple[str, ...]


_ROTARY = Architecture(kind="rotary", target_modules="self_attn", projections=("q_proj", "k_proj", "v_proj", "o_proj"))
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _ROTARY,
    "mistral": _ROTARY,
    "gpt2": Architecture(kind="fused", target_modules="attn", projections=("c_attn",)),
}


def architecture_of(model: nn.Module) -> tuple[str, Architecture]:
    """``(model_type, Architecture)`` of a transformers model; TargetError naming both lists otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (it has no config.model_type)"
        raise TargetError(f"adaption prompt (LLaMA-Adapter) does not support {what}; supported model types: "
                          f"{sorted(ARCHITECTURES)}. Use LoRA or prefix tuning for this model")
    return model_type, ARCHITECTURES[model_type]
