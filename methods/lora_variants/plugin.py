"""The LoRA-variants extension: Hugging Face PEFT 0.21's newer LoRA variants through LoRA's ``lora_variant`` hook.

An extension, not a method: it declares no method and changes nothing in ``peft_lora``; it is found through the
``peft_core.methods`` entry-point group like any plugin (``lora_variants``). Each variant answers for the
adapters whose config sets its field, and claims that field (``claims``), so LoRA refuses a set field that no
installed variant implements:

=================  ======================================  ==================================================
variant            LoraConfig field                        layers (as in PEFT 0.21)
=================  ======================================  ==================================================
MiCA               ``init_lora_weights="mica"``            Linear, GPT-2 Conv1D, Embedding
KaSA               ``kasa_config={...}``                   Linear
BD-LoRA            ``use_bdlora={...}``                    Linear (Conv1D only as plain LoRA)
VeLoRA             ``velora_config={...}``                 Linear, GPT-2 Conv1D
=================  ======================================  ==================================================

Besides ``lora_variant`` it wraps LoRA's ``inject`` for LoRA adapters: KaSA and non-KaSA adapters cannot share a
model (checked before anything changes), and KaSA is refused on a tied weight (checked after, then undone). The
variants' own tensors (KaSA's ``lora_diag``, VeLoRA's ``lora_velora_embed``) are each a per-adapter module's
``weight``, which LoRA saves under PEFT's key ``<path>.<attr>``, as it does DoRA's magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from peft_core import PeftConfig, hookimpl
from peft_lora import LoraConfig, LoraLayer, LoraVariant
from torch import nn

from .bdlora import bdlora_for
from .kasa import check_kasa_mixing, check_kasa_untied, kasa_for, tied_weight_modules
from .mica import mica_for
from .velora import velora_for

__all__ = ["LoraVariantsPlugin", "plugin"]

#: Which config setting selects which variant, most used first; a config that sets two gets the first, and
#: LoRA's claim check then refuses the other field (one variant per adapter, as in PEFT).
_CHOOSERS: tuple[tuple[Callable[[LoraConfig], bool], Callable[[LoraConfig, LoraLayer, str], LoraVariant]], ...] = (
    (lambda c: c.init_lora_weights == "mica", mica_for),
    (lambda c: c.kasa_config is not None, kasa_for),
    (lambda c: c.use_bdlora is not None, bdlora_for),
    (lambda c: c.velora_config is not None, velora_for),
)


class LoraVariantsPlugin:
    """PEFT 0.21's LoRA variants MiCA, KaSA, BD-LoRA and VeLoRA (through lora_variant)."""

    @hookimpl
    def lora_variant(self, config: LoraConfig, layer: LoraLayer, path: str) -> LoraVariant | None:
        for wanted, choose in _CHOOSERS:
            if wanted(config):
                return choose(config, layer, path)
        return None

    @hookimpl(wrapper=True)
    def inject(self, model: nn.Module, adapter_name: str, config: PeftConfig) -> Generator[None, Any, Any]:
        kasa = isinstance(config, LoraConfig) and config.kasa_config is not None
        if isinstance(config, LoraConfig):
            check_kasa_mixing(model, adapter_name, config)
        tied = tied_weight_modules(model) if kasa else set()
        targets = yield
        if tied:
            check_kasa_untied(model, adapter_name, tied)  # raising here: the core puts the model back as it was
        return targets


plugin = LoraVariantsPlugin()
